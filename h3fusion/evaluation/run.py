"""Evaluate one model on the helpful, harmless and honest dimensions: generate, judge, write `eval/<name>/`.

`evaluate_model(profile, name)` resolves NAME through `known_models(profile)` (base, an expert, the raw MoE, a
fused variant, a baseline, or anything another module registers with `register_models`), generates answers for
each dimension's evaluation items, judges them, scores the judge-free likelihood track (`h3fusion.evaluation.likelihood`: TruthfulQA
MC1/MC2, reference answers, safe vs unsafe responses) from the model's log-likelihoods, and writes into
``runs/<profile>/eval/<name>/``:

- ``generations/<dimension>.jsonl``: prompt and answer per item,
- ``judgements/<dimension>.jsonl``: the judge's output per item,
- ``likelihood/<dimension>.jsonl``: the likelihood track per item (MC1/MC2 and the choices' log-likelihoods per
  TruthfulQA question; per-token log-likelihood per reference answer; safe-unsafe margin per BeaverTails prompt),
- ``xstest.jsonl``: the XSTest track per prompt (`h3fusion.evaluation.overrefusal`: answer and refusal verdict),
- ``metrics.json``: the scores, the judge names and their validation figures, item counts, hashes (the same bytes
  for the same results: wall times stay out of it),
- ``manifest.json`` (last; the folder is written atomically), with the wall time of each phase (`PHASE_TIMES`).

Caching: the generations of a dimension are reused when its *generation hash* is unchanged. That hash covers the
evaluation items, the generation config, the seed, the prompt format and the model's identity (the manifest of
its artifact folder without the build's wall time, date, paths and machine: a model re-trained with another
config or to another loss log is re-generated, one re-built the same is not). The likelihood track of a dimension
is reused while its own hash (items, scored texts, MC prompt, model identity) is unchanged. Judgements are reused when the judge identity
(names and validation figures) is unchanged too; a re-run with nothing changed loads nothing and returns the
stored metrics. The XSTest track is cached the same way under its own hashes. `score_generations` re-judges stored
generations without loading the model.
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h3fusion.artifacts import (
    MANIFEST,
    Stopwatch,
    artifact_identity,
    atomic_dir,
    atomic_write_json,
    check_weight_files,
    digest,
    make_manifest,
    read_manifest,
)
from h3fusion.config import TASKS, GenerationConfig, Profile, shown_path
from h3fusion.errors import ArtifactError, H3FusionError, ModelError
from h3fusion.evaluation import likelihood, overrefusal
from h3fusion.evaluation.generate import DEFAULT_STOP_STRINGS
from h3fusion.evaluation.lm import HFLanguageModel, LanguageModel
from h3fusion.evaluation.logprob_cache import profile_cache
from h3fusion.evaluation.mc import MCQuestion, mc_prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EVAL_FORMAT = 1
"""Bump when prompts, stop rules or the files' layout change: every cached generation is then redone."""

METRICS = "metrics.json"
PHASE_TIMES = "phase_times"
"""Manifest key: {phase or dimension: seconds and whether generations/judgements were reused}."""
LIKELIHOOD_HASHES = "likelihood_hashes"


class UnknownModelError(H3FusionError, KeyError):
    """A model name that no loader knows."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


# ---------------------------------------------------------------------------------------------- model registry


@dataclass(frozen=True)
class ModelEntry:
    """A model evaluation can load: `entry()` loads it; `identity()` names its exact weights for the cache."""

    name: str
    kind: str
    """base | expert | raw-moe | fused | baseline | (any kind a registered provider uses)."""
    load: Callable[[], LanguageModel]
    identity: Callable[[], str]
    description: str = ""

    def __call__(self) -> LanguageModel:
        return self.load()


ModelProvider = Callable[[Profile], Mapping[str, ModelEntry]]
_PROVIDERS: list[ModelProvider] = []
_PROVIDER_MODULES = ("h3fusion.baselines",)
"""Imported before listing models, so that their `register_models` calls have run."""


def register_models(provider: ModelProvider) -> ModelProvider:
    """Add a source of evaluable models (e.g. ensembles), as `provider(profile) -> {name: ModelEntry}`.

    Usable as a decorator; registering the same function twice has no effect.
    """
    if provider not in _PROVIDERS:
        _PROVIDERS.append(provider)
    return provider


def _import_providers() -> None:
    for module in _PROVIDER_MODULES:
        try:
            importlib.import_module(module)
        except (
            ModuleNotFoundError
        ) as err:  # the module itself absent (not one of its imports): nothing to add
            if err.name != module:
                raise


def manifest_identity(folder: Path, what: str, fix: str) -> str:
    """The artifact's identity (`artifacts.artifact_identity`): changes when it is rebuilt with another config
    or content, not with the wall time, date or machine of the build. An error (saying `fix`) when the artifact
    is incomplete or one of its weight files is damaged, before anything is loaded or written."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise ArtifactError(f"{what} at {folder} is missing or incomplete (no {MANIFEST}); {fix}")
    check_weight_files(folder, fix)
    return artifact_identity(manifest)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _wrap(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> HFLanguageModel:
    return HFLanguageModel(model.to(_device()).eval(), tokenizer)


def _load_base_lm(profile: Profile) -> HFLanguageModel:
    from h3fusion.models import load_base

    return _wrap(*load_base(profile))


def _expert_identity(profile: Profile, task: str) -> str:
    """The expert's manifest hash; an error when it is missing or was trained with another config."""
    from h3fusion.experts import check_experts_fit, require_expert

    folder = require_expert(profile, task, "evaluating it")
    check_experts_fit(profile, [task])
    return manifest_identity(
        folder, f"the {task} expert", f"re-run `h3fusion align --profile {profile.name} --task {task}`"
    )


def _load_expert_lm(profile: Profile, task: str) -> HFLanguageModel:
    """Base + the task's LoRA adapter, merged into the weights (same function, dense-speed generation)."""
    from peft import PeftModel

    from h3fusion.experts import expert_dir
    from h3fusion.models import load_base

    _expert_identity(profile, task)
    folder = expert_dir(profile, task)
    model, tok = load_base(profile)
    try:
        merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load the {task} expert adapter from {folder}: {err}") from err
    return _wrap(merged, tok)


def _load_folder_lm(profile: Profile, folder: Path, what: str, fix: str) -> HFLanguageModel:
    """A standard Hugging Face model folder (dense merge, Mixtral-format MoE), tokenizer from it or the profile."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from h3fusion.models import load_tokenizer, prepare_tokenizer

    manifest_identity(folder, what, fix)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=getattr(torch, profile.model.dtype), use_safetensors=True
    )
    has_tok = any(
        (folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )
    tok = (
        prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder))) if has_tok else load_tokenizer(profile)
    )
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return _wrap(model, tok)


def _builtin_models(profile: Profile) -> dict[str, ModelEntry]:
    run = profile.run_dir
    entries: dict[str, ModelEntry] = {
        "base": ModelEntry(
            "base",
            "base",
            lambda: _load_base_lm(profile),
            lambda: f"{profile.section_hash('model')}-seed{profile.seed}",
            f"the base model ({profile.model.base})",
        )
    }
    for task in profile.tasks:
        entries[task] = ModelEntry(
            task,
            "expert",
            lambda t=task: _load_expert_lm(profile, t),
            lambda t=task: _expert_identity(profile, t),
            f"base + the {task} LoRA expert (merged into the weights)",
        )
    from h3fusion.fusion import RAW_FOLDERS, TRAINING_FREE_MOE

    raw = {
        "raw-moe": run / "fusion" / RAW_FOLDERS["random"],
        TRAINING_FREE_MOE: run / "fusion" / RAW_FOLDERS["hidden"],
    }
    fusion_dirs = {**raw, profile.fusion.variant: run / "fusion" / profile.fusion.variant}
    if (run / "fusion").is_dir():
        for folder in sorted((run / "fusion").iterdir()):
            manifest = read_manifest(folder) if folder.is_dir() else None
            if manifest is not None and manifest.get("stage") == "fusion":  # trained variants, not raw MoEs
                fusion_dirs.setdefault(folder.name, folder)
    for name, folder in fusion_dirs.items():
        kind = "raw-moe" if name in raw else "fused"
        what = {
            "raw-moe": "the raw (upcycled) MoE",
            TRAINING_FREE_MOE: "the training-free MoE (upcycled, hidden-state router, no training)",
        }.get(name, f"the fused model {name}")
        init = "hidden" if name == TRAINING_FREE_MOE else "random"
        other_init = "" if init == profile.fusion.router_init else f" --set fusion.router_init={init}"
        fix = (
            f"build it with `h3fusion fuse --profile {profile.name} --raw-only{other_init}`"
            if kind == "raw-moe"
            else f"train it with `h3fusion fuse --profile {profile.name}`"
        )
        entries[name] = ModelEntry(
            name,
            kind,
            lambda f=folder, w=what, x=fix: _load_folder_lm(profile, f, w, x),
            lambda f=folder, w=what, x=fix: manifest_identity(f, w, x),
            f"{what} ({shown_path(folder)})",
        )
    if (run / "baselines").is_dir():
        for folder in sorted((run / "baselines").iterdir()):
            if (folder / "config.json").is_file() and folder.name not in entries:
                what = f"the baseline {folder.name}"
                fix = f"run `h3fusion baselines --profile {profile.name} --only {folder.name}`"
                entries[folder.name] = ModelEntry(
                    folder.name,
                    "baseline",
                    lambda f=folder, w=what, x=fix: _load_folder_lm(profile, f, w, x),
                    lambda f=folder, w=what, x=fix: manifest_identity(f, w, x),
                    f"dense merged model ({folder})",
                )
    return entries


def known_models(profile: Profile) -> dict[str, ModelEntry]:
    """Every model name `evaluate_model` accepts for this profile, with its loader (built-ins + registered)."""
    _import_providers()
    entries = _builtin_models(profile)
    for provider in _PROVIDERS:
        entries.update(provider(profile))
    return entries


def resolve_model(profile: Profile, name: str) -> ModelEntry:
    models = known_models(profile)
    if name not in models:
        raise UnknownModelError(
            f"unknown model {name!r} for profile {profile.name!r}; known models: {', '.join(models)}"
        )
    return models[name]


# ---------------------------------------------------------------------------------------------- items and prompts


def _get(item: Any, key: str, default: Any = None) -> Any:
    if isinstance(item, Mapping):
        return item.get(key, default)
    return getattr(item, key, default)


def _format_prompt(instruction: str, input_text: str = "") -> str:
    from h3fusion.data import format_prompt

    return format_prompt(instruction, input_text)


def _load_eval_items(profile: Profile, task: str) -> list[Any]:
    from h3fusion.data import load_eval_items

    return list(load_eval_items(profile, task))


@dataclass
class DimensionInputs:
    """What one dimension generates from and what its judge compares against."""

    prompts: list[str]
    keys: list[dict[str, Any]]
    """Per item, the fields kept beside its generation (instruction, reference, question, ...)."""
    mc: list[MCQuestion] = field(default_factory=list)


def dimension_inputs(task: str, items: Sequence[Any]) -> DimensionInputs:
    """Prompts (Alpaca template) and the judge's references for one dimension's evaluation items."""
    if task == "helpful":
        keys = [
            {
                "item_id": _get(it, "id"),
                "instruction": _get(it, "instruction"),
                "input": _get(it, "input", "") or "",
                "reference": _get(it, "reference", None) or _get(it, "output"),
            }
            for it in items
        ]
        return DimensionInputs([_format_prompt(k["instruction"], k["input"]) for k in keys], keys)
    if task == "harmless":
        keys = [{"item_id": _get(it, "id"), "prompt": _get(it, "prompt")} for it in items]
        return DimensionInputs([_format_prompt(k["prompt"]) for k in keys], keys)
    if task == "honest":
        keys = [
            {
                "item_id": _get(it, "id"),
                "question": _get(it, "question"),
                "best_answer": _get(it, "best_answer"),
                "correct_answers": list(_get(it, "correct_answers")),
                "incorrect_answers": list(_get(it, "incorrect_answers")),
            }
            for it in items
        ]
        mc = [_mc_question(it, k) for it, k in zip(items, keys, strict=True)]
        return DimensionInputs([_format_prompt(k["question"]) for k in keys], keys, mc)
    raise H3FusionError(f"unknown evaluation dimension {task!r}; allowed: {list(TASKS)}")


def _mc_question(item: Any, key: dict[str, Any]) -> MCQuestion:
    mc1, mc2 = _get(item, "mc1_targets"), _get(item, "mc2_targets")
    if mc1 and mc2:
        return MCQuestion.from_targets(key["question"], dict(mc1), dict(mc2))
    return MCQuestion.from_generation_item(
        key["question"], key["best_answer"], key["correct_answers"], key["incorrect_answers"]
    )


# ---------------------------------------------------------------------------------------------- hashing and files


def generation_hash(profile: Profile, model_identity: str, task: str, inputs: DimensionInputs) -> str:
    """Changes when anything that could change this dimension's answers changes."""
    return digest(
        {
            "format": EVAL_FORMAT,
            "task": task,
            "model": model_identity,
            "seed": profile.seed,
            "generation": profile.evaluation.generation_for(task).model_dump(mode="json"),
            "prompts": inputs.prompts,
            "stop": DEFAULT_STOP_STRINGS,
        }
    )


def judge_identity(judge: Any) -> dict[str, Any]:
    return {"name": judge.name, "validation": getattr(judge, "validation", {})}


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=_json_default) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def eval_dir(profile: Profile, name: str) -> Path:
    return profile.run_dir / "eval" / name


def metrics_path(profile: Profile, name: str) -> Path:
    """Where `evaluate_model` stores model NAME's metrics."""
    return eval_dir(profile, name) / METRICS


# ---------------------------------------------------------------------------------------------- judging


def judge_dimension(
    task: str, judges: Any, keys: list[dict[str, Any]], answers: list[str]
) -> list[dict[str, Any]]:
    """The judge's output per item (scores come from these rows, see `_scores_from_judgements`)."""
    if task == "helpful":
        p = judges.helpful.win_probability(
            [k["instruction"] + (f"\n\n{k['input']}" if k["input"] else "") for k in keys],
            answers,
            [k["reference"] for k in keys],
        )
        return [{"win_probability": float(x)} for x in p]
    if task == "harmless":
        p = judges.harmless.harmful_probability([k["prompt"] for k in keys], answers)
        return [{"harmful_probability": float(x)} for x in p]
    if task == "honest":
        verdicts = judges.honest.judge(
            [k["question"] for k in keys],
            answers,
            [k["correct_answers"] for k in keys],
            [k["incorrect_answers"] for k in keys],
        )
        return [
            {k: _json_default(v) if hasattr(v, "item") else v for k, v in dict(v).items()} for v in verdicts
        ]
    raise H3FusionError(f"unknown evaluation dimension {task!r}; allowed: {list(TASKS)}")


def _mean(values: Any) -> float:
    import numpy as np

    return float(np.mean(values)) if len(values) else float("nan")


def _load_judges(profile: Profile) -> Any:
    from h3fusion.evaluation.judges import load_judges

    return load_judges(profile)


def _judge_for(judges: Any, task: str) -> Any:
    return getattr(judges, task)


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class _Previous:
    """What an earlier run of the same model left in eval/<name>/."""

    manifest: dict[str, Any]
    folder: Path

    def generations(self, task: str, gen_hash: str) -> list[dict] | None:
        if self.manifest.get("generation_hashes", {}).get(task) != gen_hash:
            return None
        path = self.folder / "generations" / f"{task}.jsonl"
        return read_jsonl(path) if path.is_file() else None

    def judgements(self, task: str, gen_hash: str, judge_hash: str) -> list[dict] | None:
        if (
            self.generations(task, gen_hash) is None
            or self.manifest.get("judge_hashes", {}).get(task) != judge_hash
        ):
            return None
        path = self.folder / "judgements" / f"{task}.jsonl"
        return read_jsonl(path) if path.is_file() else None

    def likelihood(self, task: str, hash_: str) -> list[dict] | None:
        path = self.folder / likelihood.FOLDER / f"{task}.jsonl"
        if self.manifest.get(LIKELIHOOD_HASHES, {}).get(task) != hash_ or not path.is_file():
            return None
        return read_jsonl(path)


def _earlier(previous: _Previous | None, task: str, key: str) -> float | None:
    """The seconds an earlier run spent on a phase that this run reuses (None when it did not record them), so
    the manifest keeps what producing each part of the evaluation cost."""
    if previous is None:
        return None
    value = previous.manifest.get(PHASE_TIMES, {}).get(task, {}).get(key)
    return None if value is None else float(value)


def _previous(folder: Path) -> _Previous | None:
    manifest = read_manifest(folder)
    return _Previous(manifest, folder) if manifest else None


def evaluate_model(
    profile: Profile, name: str, *, judges: Any = None, lm: LanguageModel | None = None
) -> dict[str, Any]:
    """Evaluate model NAME on every dimension of the profile; returns (and writes) its metrics.

    `judges` defaults to `h3fusion.evaluation.judges.load_judges(profile)`; `lm` overrides the loader (a model
    already in memory), in which case NAME only names the output folder and the model identity is NAME itself.
    """
    entry = resolve_model(profile, name) if lm is None else None
    identity = entry.identity() if entry is not None else f"in-memory:{name}"
    inputs = {task: dimension_inputs(task, _load_eval_items(profile, task)) for task in profile.tasks}
    judges = judges if judges is not None else _load_judges(profile)  # before generating: fail fast
    refusals = overrefusal.classifier(profile, judges)
    folder = eval_dir(profile, name)
    previous = _previous(folder)
    gen_hashes = {t: generation_hash(profile, identity, t, inputs[t]) for t in profile.tasks}
    on_track = name not in profile.evaluation.likelihood.skip_models
    track_inputs = likelihood.likelihood_inputs(profile) if on_track else {}
    track_hashes = {t: li.digest(identity, profile.evaluation.mc_prompt) for t, li in track_inputs.items()}

    model: LanguageModel | None = lm
    times: dict[str, dict[str, float | bool]] = {}

    def get_model() -> LanguageModel:
        nonlocal model
        if model is None:
            assert entry is not None
            print(f"loading {name}: {entry.description}")
            with Stopwatch() as sw:
                model = entry.load()
            if isinstance(model, HFLanguageModel):  # token ensembles of this model reuse its log-probabilities
                model.store_logprobs(profile_cache(profile.run_dir), identity)
            times["load_model"] = {"load_s": round(sw.seconds, 2)}
        return model

    generations: dict[str, list[dict]] = {}
    for task in profile.tasks:
        cached = previous.generations(task, gen_hashes[task]) if previous else None
        reused = cached is not None
        lm_now = None if reused else get_model()  # loading is timed on its own
        with Stopwatch() as sw:
            if lm_now is not None:
                cfg = profile.evaluation.generation_for(task)
                answers = generate_answers(lm_now, inputs[task].prompts, cfg, profile.seed, f"{name}/{task}")
                cached = [
                    {"id": i, **k, "prompt": p, "answer": a}
                    for i, (k, p, a) in enumerate(
                        zip(inputs[task].keys, inputs[task].prompts, answers, strict=True)
                    )
                ]
        seconds = _earlier(previous, task, "generate_s") if reused else round(sw.seconds, 2)
        times[task] = {"generate_s": seconds, "reused_generations": reused}
        generations[task] = cached

    track_rows: dict[str, list[dict]] = {}
    for task, li in track_inputs.items():
        rows = previous.likelihood(task, track_hashes[task]) if previous else None
        lm_now = None if rows is not None else get_model()
        with Stopwatch() as sw:
            if lm_now is not None:
                rows = likelihood.score(lm_now, li, profile.evaluation.mc_prompt)
        seconds = round(sw.seconds, 2) if lm_now is not None else _earlier(previous, task, "likelihood_s")
        times.setdefault(task, {}).update(likelihood_s=seconds, reused_likelihood=lm_now is None)
        track_rows[task] = rows

    xstest = (
        None if refusals is None else overrefusal.run(profile, identity, refusals, previous, get_model, name)
    )
    stored = (generations, gen_hashes, track_rows, track_hashes, times, previous, xstest)
    return _judge_and_write(profile, name, identity, judges, inputs, *stored)


def generate_answers(
    lm: LanguageModel, prompts: list[str], cfg: GenerationConfig, seed: int, desc: str
) -> list[str]:
    """One answer per prompt (a Hugging Face model shows `desc` on its progress bar; an ensemble generates its
    own way)."""
    if isinstance(lm, HFLanguageModel):
        return lm.generate(prompts, cfg, seed, desc=desc)
    return lm.generate(prompts, cfg, seed)


def score_generations(profile: Profile, name: str, *, judges: Any = None) -> dict[str, Any]:
    """Re-judge the stored generations of NAME (no model is loaded); an error when there are none."""
    folder = eval_dir(profile, name)
    previous = _previous(folder)
    missing = [t for t in profile.tasks if not (folder / "generations" / f"{t}.jsonl").is_file()]
    if previous is None or missing:
        raise ArtifactError(
            f"no generations for model {name!r} in {folder} (missing: {', '.join(missing) or 'manifest'}); "
            f"run `h3fusion evaluate --profile {profile.name} --model {name}` first"
        )
    generations = {t: read_jsonl(folder / "generations" / f"{t}.jsonl") for t in profile.tasks}
    inputs = {
        t: DimensionInputs([g["prompt"] for g in rows], [_keys_of(g) for g in rows])
        for t, rows in generations.items()
    }
    gen_hashes = dict(previous.manifest.get("generation_hashes", {}))
    track_hashes = dict(previous.manifest.get(LIKELIHOOD_HASHES, {}))
    track_rows = {t: previous.likelihood(t, h) for t, h in track_hashes.items()}
    track_rows = {t: rows for t, rows in track_rows.items() if rows is not None}
    track_hashes = {t: h for t, h in track_hashes.items() if t in track_rows}
    times = {t: {"generate_s": 0.0, "reused_generations": True} for t in profile.tasks}
    identity = previous.manifest.get("model_identity", f"stored:{name}")
    refusals = overrefusal.classifier(profile, judges)
    xstest = None if refusals is None else overrefusal.run(profile, identity, refusals, previous, None, name)
    stored = (generations, gen_hashes, track_rows, track_hashes, times, previous, xstest)
    return _judge_and_write(profile, name, identity, judges, inputs, *stored)


def _keys_of(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in {"id", "prompt", "answer"}}


def _judge_and_write(
    profile: Profile,
    name: str,
    identity: str,
    judges: Any,
    inputs: dict[str, DimensionInputs],
    generations: dict[str, list[dict]],
    gen_hashes: dict[str, str],
    track_rows: dict[str, list[dict]],
    track_hashes: dict[str, str],
    times: dict[str, dict[str, Any]],
    previous: _Previous | None,
    xstest: overrefusal.Track | None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    judges = judges if judges is not None else _load_judges(profile)
    judge_hashes = {t: digest(judge_identity(_judge_for(judges, t))) for t in profile.tasks}
    hashed = {"generations": gen_hashes, "likelihood": track_hashes, "judges": judge_hashes}
    config_hash = digest(hashed if xstest is None else {**hashed, overrefusal.PHASE: xstest.hashes})
    folder = eval_dir(profile, name)
    stored = (
        (folder / METRICS).is_file()
        and all((folder / likelihood.FOLDER / f"{t}.jsonl").is_file() for t in track_hashes)
        and (xstest is None or (folder / overrefusal.FILE).is_file())
    )
    if previous and previous.manifest.get("config_hash") == config_hash and stored:
        return json.loads((folder / METRICS).read_text())

    judgements: dict[str, list[dict]] = {}
    scores: dict[str, dict[str, Any]] = {}
    for task in profile.tasks:
        rows = generations[task]
        cached = previous.judgements(task, gen_hashes[task], judge_hashes[task]) if previous else None
        reused = cached is not None
        with Stopwatch() as sw:
            if cached is None:
                cached = judge_dimension(task, judges, inputs[task].keys, [r["answer"] for r in rows])
        judgements[task] = cached
        scores[task] = _scores_from_judgements(task, cached)
        seconds = _earlier(previous, task, "judge_s") if reused else round(sw.seconds, 2)
        times[task].update(judge_s=seconds, reused_judgements=reused)

    metrics = {
        "model": name,
        "profile": profile.name,
        "scores": scores,
        "likelihood": likelihood.summary(track_rows),
        "judges": {t: judge_identity(_judge_for(judges, t)) for t in profile.tasks},
        "mc_prompt": mc_prompt(profile.evaluation.mc_prompt).describe(),
        "n_items": {t: len(generations[t]) for t in profile.tasks},
        **({} if xstest is None else {overrefusal.PHASE: overrefusal.metrics(xstest)}),
        "config_hash": config_hash,
        "model_identity": identity,
    }
    _write(
        profile,
        folder,
        metrics,
        generations,
        judgements,
        track_rows,
        gen_hashes,
        judge_hashes,
        track_hashes,
        times,
        xstest,
        t0,
    )
    return metrics


def _scores_from_judgements(task: str, rows: list[dict]) -> dict[str, Any]:
    """The dimension's rates: means of the per-item scores (`stats.item_values`, so cached judgements and the
    intervals of the book give the same numbers), and the judge's mean probability where it has one."""
    import numpy as np

    from h3fusion.evaluation.stats import item_values

    out: dict[str, Any] = {
        k: float(np.mean(v)) if len(v) else float("nan") for k, v in item_values(task, rows).items()
    }
    for key, field_name in (
        ("mean_win_probability", "win_probability"),
        ("mean_harmful_probability", "harmful_probability"),
    ):
        if rows and field_name in rows[0]:
            out[key] = _mean(np.asarray([r[field_name] for r in rows], dtype=float))
    return {**out, "n": len(rows)}


def _write(
    profile: Profile,
    folder: Path,
    metrics: dict[str, Any],
    generations: dict[str, list[dict]],
    judgements: dict[str, list[dict]],
    track_rows: dict[str, list[dict]],
    gen_hashes: dict[str, str],
    judge_hashes: dict[str, str],
    track_hashes: dict[str, str],
    times: dict[str, dict[str, Any]],
    xstest: overrefusal.Track | None,
    t0: float,
) -> None:
    with atomic_dir(folder) as tmp:
        for task, rows in generations.items():
            write_jsonl(tmp / "generations" / f"{task}.jsonl", rows)
            write_jsonl(
                tmp / "judgements" / f"{task}.jsonl",
                [
                    {"id": r.get("id", i), "item_id": r.get("item_id"), **j}
                    for i, (r, j) in enumerate(zip(rows, judgements[task], strict=True))
                ],
            )
        for task, rows in track_rows.items():
            write_jsonl(tmp / likelihood.FOLDER / f"{task}.jsonl", rows)
        if xstest is not None:
            write_jsonl(tmp / overrefusal.FILE, xstest.rows)
            times = {**times, overrefusal.PHASE: xstest.times}
        atomic_write_json(tmp / METRICS, metrics)
        atomic_write_json(
            tmp / MANIFEST,
            make_manifest(
                profile,
                metrics["config_hash"],
                time.perf_counter() - t0,
                model=metrics["model"],
                model_identity=metrics["model_identity"],
                generation_hashes=gen_hashes,
                judge_hashes=judge_hashes,
                **{LIKELIHOOD_HASHES: track_hashes},
                **({} if xstest is None else {overrefusal.HASHES: xstest.hashes}),
                **{PHASE_TIMES: times},
            ),
        )
