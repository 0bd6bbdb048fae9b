"""Validated run configuration: one YAML profile -> one typed, frozen `Profile`.

Sizes, seeds and model ids live in profiles (``profiles/*.yaml``), never in code. Every
section forbids unknown keys, so a typo is an error that names the key instead of a silently
ignored setting. Errors are raised as `ConfigError` with one line per problem. The sections themselves live in
`h3fusion.config_sections` (building the models) and `h3fusion.config_evaluation` (evaluating them); import them
from here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, field_validator, model_validator

from h3fusion.config_evaluation import (
    AblationsConfig,
    BaselinesConfig,
    EvaluationConfig,
    GenerationConfig,
    JudgesConfig,
    LikelihoodConfig,
)
from h3fusion.config_sections import (
    TASKS,
    DataConfig,
    ExpertsConfig,
    ExpertSpec,
    FusionConfig,
    LoraConfig,
    ModelConfig,
    ReleasedCodeSwitches,
    Section,
    TinyModelConfig,
    TrainConfig,
    check_task_names,
)
from h3fusion.errors import H3FusionError

PACKAGE_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_ROOT.parent
PROFILES_DIR = PROJECT_ROOT / "profiles"


def shown_path(path: str | os.PathLike[str]) -> str:
    """`path` as log lines show it: relative to the project when inside it (``runs/cpu/experts/helpful``), so
    executed notebooks and logs do not carry one machine's folders; absolute otherwise."""
    absolute = Path(os.path.abspath(path))  # not resolve(): keep a linked folder's own name
    return str(absolute.relative_to(PROJECT_ROOT)) if absolute.is_relative_to(PROJECT_ROOT) else str(absolute)


class ConfigError(H3FusionError, ValueError):
    """A profile or override that cannot be used, with a message that says how to fix it."""


class Profile(Section):
    """A whole run's configuration (one YAML file in profiles/)."""

    name: str
    seed: int = 42
    tasks: tuple[str, ...] = TASKS
    runs_dir: str | None = None
    """Artifacts root; default: $H3FUSION_RUNS_DIR, else runs/ in the project. Artifacts go to <runs_dir>/<name>/."""
    data: DataConfig
    model: ModelConfig
    experts: ExpertsConfig
    fusion: FusionConfig
    evaluation: EvaluationConfig
    judges: JudgesConfig = JudgesConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    ablations: AblationsConfig = AblationsConfig()

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        check_task_names(list(v), "tasks")
        if len(set(v)) != len(v) or not v:
            raise ValueError(f"`tasks` must list distinct task names, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        for key in ("train_examples", "eval_examples"):
            missing = [t for t in self.tasks if t not in getattr(self.data, key)]
            if missing:
                raise ValueError(
                    f"`data.{key}` has no entry for {missing} (a task of this profile); add one number per task"
                )
        self._check_experts()
        n = self.num_experts
        if self.fusion.top_k > n:
            raise ValueError(
                f"`fusion.top_k` = {self.fusion.top_k} is larger than the number of experts ({n}); use a top_k "
                f"between 1 and {n}"
            )
        top_ks = self.ablations.top_ks or ()
        outside = [k for k in top_ks if not 1 <= k <= n]
        if outside:
            raise ValueError(
                f"`ablations.top_ks` = {list(top_ks)} has k = {outside} outside 1..{n} (the number of experts); "
                f"use values between 1 and {n}, or null for all of them"
            )
        return self

    def _check_experts(self) -> None:
        specs = self.expert_specs
        outside = [e.name for e in specs if e.dimension not in self.tasks]
        if outside:
            raise ValueError(
                f"`experts.members` {outside} are aligned on a dimension that is not in `tasks` {list(self.tasks)}; "
                "add the dimension to `tasks` or remove the expert"
            )
        expertless = [t for t in self.tasks if t not in self.expert_dimensions]
        if expertless:
            raise ValueError(
                f"the task(s) {expertless} have no expert in `experts.members`, so the gating loss could route their "
                "examples nowhere; add an expert for each task"
            )
        recipes = [(e.dimension, self.expert_seed(e.name), e.train_examples) for e in specs]
        twins = [e.name for e, r in zip(specs, recipes, strict=True) if recipes.count(r) > 1]
        if twins:
            raise ValueError(
                f"`experts.members` {twins} have the same dimension, seed and training examples, so they would be "
                "the same expert twice; give each a different `seed`"
            )
        # a dimension's name is accepted without its expert (a profile with fewer tasks keeps the shared gammas)
        unknown = [k for k in self.fusion.drift_gammas if k not in self.expert_names and k not in TASKS]
        if unknown:
            raise ValueError(
                f"`fusion.drift_gammas` names {unknown}, which are no experts of this profile; its experts are "
                f"{self.expert_names}"
            )

    @property
    def expert_specs(self) -> tuple[ExpertSpec, ...]:
        """The experts in the MoE's order: `experts.members`, or one per task named after it."""
        if self.experts.members is not None:
            return self.experts.members
        return tuple(ExpertSpec(name=t, dimension=t) for t in self.tasks)

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.expert_specs]

    @property
    def expert_dimensions(self) -> list[str]:
        """The dimension of each expert, in expert order (what a routed token's expert is correct for)."""
        return [e.dimension for e in self.expert_specs]

    @property
    def num_experts(self) -> int:
        return len(self.expert_specs)

    def expert_spec(self, name: str) -> ExpertSpec:
        for spec in self.expert_specs:
            if spec.name == name:
                return spec
        raise ConfigError(
            f"{name!r} is not an expert of profile {self.name!r}; its experts are {self.expert_names}"
        )

    def expert_lora(self, name: str) -> LoraConfig:
        """The expert's LoRA: its own, else `experts.lora`."""
        own = self.expert_spec(name).lora
        return self.experts.lora if own is None else own

    def expert_train_examples(self, name: str) -> int:
        """The expert's training examples: its own count, else `data.train_examples` of its dimension."""
        own = self.expert_spec(name).train_examples
        return self.data.train_examples[self.expert_spec(name).dimension] if own is None else own

    def expert_seed(self, name: str) -> int:
        seed = self.expert_spec(name).seed
        return self.seed if seed is None else seed

    @property
    def default_experts(self) -> bool:
        """One expert per task, named after it (the paper's layout)."""
        return self.expert_names == list(self.tasks) and self.expert_dimensions == list(self.tasks)

    @property
    def run_dir(self) -> Path:
        root = self.runs_dir or os.environ.get("H3FUSION_RUNS_DIR") or str(PROJECT_ROOT / "runs")
        return Path(root) / self.name

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir or os.environ.get("H3FUSION_DATA_DIR") or PROJECT_ROOT / "data" / "offline")

    def section_hash(self, *keys: str) -> str:
        """Stable short hash of the named sections or dotted keys (`data.max_length`): an artifact is
        reused only when these match."""
        from h3fusion.artifacts import digest  # artifacts imports config

        dump = self.model_dump(mode="json")
        for field, section in self:
            for key in getattr(section, "HASHED_WHEN_SET", ()):
                if dump[field][key] is None:
                    del dump[field][key]
        payload = {}
        for key in keys:
            node = dump
            for part in key.split("."):
                node = node[part]
            payload[key] = node
        return digest(payload)


TRAINING_DATA_KEYS: tuple[str, ...] = (
    "data.source",
    "data.dir",
    "data.max_length",
    "data.train_examples",
    "data.beavertails_eval_fraction",
)
"""The data keys a trained artifact depends on (evaluation sizes are not among them)."""


RENAMED_KEYS: dict[str, str] = {
    "evaluation.likelihood.harmless_prompts": "evaluation.likelihood.items.harmless",
    # the likelihood track's sizes moved into one entry per dimension
    "evaluation.likelihood.harmless_pairs": "evaluation.likelihood.items.harmless",
    "evaluation.likelihood.helpful_items": "evaluation.likelihood.items.helpful",
    "evaluation.likelihood.honest_questions": "evaluation.likelihood.items.honest",
    # the judges' settings moved into one section per dimension (its `Dimension.judge_settings`)
    "evaluation.helpful_judge": "judges.helpful.judge",
    "evaluation.harmless_judge": "judges.harmless.judge",
    "evaluation.honest_judge": "judges.honest.judge",
    "judges.alpaca_eval_annotator": "judges.helpful.annotator",
    "judges.helpful_validation_instructions": "judges.helpful.validation_instructions",
    **{
        f"judges.harmless_{k}": f"judges.harmless.{k}"
        for k in (
            "train_rows",
            "validation_rows",
            "epochs",
            "max_length",
            "batch_size",
            "lr",
            "frozen_layers",
        )
    },
    "judges.beaver_dam_model": "judges.harmless.model",
    "judges.honest_validation_questions": "judges.honest.validation_questions",
    "judges.honest_informative_min_similarity": "judges.honest.informative_min_similarity",
    "judges.truthfulqa_truth_model": "judges.honest.truth_model",
    "judges.truthfulqa_info_model": "judges.honest.info_model",
}
"""Keys an older profile may still use -> their current name (the error says so instead of "unknown key")."""


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid profile {origin}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<top level>"
        if e["type"] == "extra_forbidden" and key in RENAMED_KEYS:
            lines.append(f"  - `{key}` was renamed: use `{RENAMED_KEYS[key]}` (see profiles/cpu.yaml)")
        elif e["type"] == "extra_forbidden":
            lines.append(f"  - `{key}`: unknown key; check its spelling against profiles/cpu.yaml")
        elif e["type"] == "missing":
            lines.append(f"  - `{key}`: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            where = f"`{key}`: " if e["loc"] else ""  # a cross-key check names its keys itself
            got = (
                ""
                if e["type"] == "value_error" and isinstance(e.get("input"), dict)
                else _shown(e.get("input"))
            )
            lines.append(f"  - {where}{msg}{got}")
    return "\n".join(lines)


def _shown(value: Any) -> str:
    """` (got VALUE)`, cut short. Cross-key checks (value errors of a whole section) get none: their message names
    the keys and values, and their input is the section, or the entire profile."""
    shown = repr(value)
    return f" (got {shown if len(shown) <= 120 else shown[:117] + '...'})"


def _deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_update(out[key], value)
        else:
            out[key] = value
    return out


def dotted_to_nested(overrides: dict[str, Any]) -> dict[str, Any]:
    """{'fusion.top_k': 1} -> {'fusion': {'top_k': 1}} (the form papermill parameters take)."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def profile_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A profile name (`cpu`) or a path to a YAML file."""
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"} or candidate.exists():
        if not candidate.exists():
            raise ConfigError(f"profile file {candidate} does not exist")
        return candidate
    path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ConfigError(
            f"unknown profile {str(name_or_path)!r}; known profiles: {known} (in {PROFILES_DIR})"
        )
    return path


def load_profile(name_or_path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> Profile:
    """Load and validate a profile; `overrides` (nested or dotted keys) win over the file."""
    path = profile_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"profile {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"profile {path} must be a mapping of sections, got {type(raw).__name__}")
    return profile_from_dict(raw, overrides, origin=str(path))


def profile_from_dict(
    raw: dict[str, Any], overrides: dict[str, Any] | None = None, origin: str = "<dict>"
) -> Profile:
    if overrides:
        dotted = {k: v for k, v in overrides.items() if "." in k}
        plain = {k: v for k, v in overrides.items() if "." not in k}
        raw = _deep_update(_deep_update(raw, plain), dotted_to_nested(dotted))
    try:
        return Profile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def derived_profile(profile: Profile, overrides: Mapping[str, Any] | None = None) -> Profile:
    """The profile with dotted-key overrides applied (validated like a profile file)."""
    return profile_from_dict(
        profile.model_dump(mode="json"), dict(overrides or {}), origin=f"{profile.name} + overrides"
    )


__all__ = [
    "AblationsConfig",
    "BaselinesConfig",
    "ConfigError",
    "DataConfig",
    "EvaluationConfig",
    "ExpertSpec",
    "ExpertsConfig",
    "FusionConfig",
    "GenerationConfig",
    "JudgesConfig",
    "LikelihoodConfig",
    "LoraConfig",
    "ModelConfig",
    "PACKAGE_ROOT",
    "PROFILES_DIR",
    "PROJECT_ROOT",
    "Profile",
    "ReleasedCodeSwitches",
    "Section",
    "TASKS",
    "TRAINING_DATA_KEYS",
    "TinyModelConfig",
    "TrainConfig",
    "derived_profile",
    "dotted_to_nested",
    "load_profile",
    "profile_from_dict",
    "profile_path",
    "shown_path",
]
