"""The experts' answers to the evaluation prompts: cached by their own evaluations, or generated.

Ensemble-select and H3Fusion-Instruct start from every expert's answer to each evaluation prompt. The experts'
evaluations (book chapter 1) already generated exactly those answers (same items, generation config, seed, stop
strings, expert weights), so the baselines read them from ``eval/<expert>/`` instead of generating them again;
a cached answer is used only under the generation hash `evaluate_model` itself would check (`KnownAnswers`,
`expert_eval_answers`); anything else is generated with the expert merged into the weights, as its evaluation
generates it, which gives the same tokens (`expert_answers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from h3fusion.config import GenerationConfig, Profile
from h3fusion.evaluation.generate import DEFAULT_STOP_STRINGS, generate_texts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from h3fusion.baselines.ensembles import AdapterBank


def expert_identities(profile: Profile) -> dict[str, str]:
    """{expert: sha of its manifest}; an error naming the command to run when an expert is missing."""
    from h3fusion.evaluation.registry import manifest_identity
    from h3fusion.experts import require_expert

    out = {}
    for expert in profile.expert_names:
        folder = require_expert(profile, expert, "the baselines (they combine the experts)")
        out[expert] = manifest_identity(folder, f"the {expert} expert", "run `h3fusion align`")
    return out


def expert_eval_answers(profile: Profile) -> KnownAnswers:
    """The experts' answers cached by their evaluation (eval/<expert>/generations/<dimension>.jsonl), for each
    dimension whose generation hash matches this profile and the current expert (same items, generation config,
    seed, stop strings, expert weights: what `evaluate_model` would regenerate)."""
    from h3fusion.evaluation import overrefusal
    from h3fusion.evaluation.generate import DEFAULT_STOP_STRINGS
    from h3fusion.evaluation.inputs import profile_inputs
    from h3fusion.evaluation.store import eval_dir, read_jsonl

    identities = expert_identities(profile)
    inputs = profile_inputs(profile)
    runs: dict[str, dict[tuple[str, tuple[str, ...]], tuple[str, ...]]] = {}
    for expert in profile.expert_names:
        for dim in cached_dimensions(profile, expert, identities[expert], inputs):
            rows = read_jsonl(eval_dir(profile, expert) / "generations" / f"{dim}.jsonl")
            if [r.get("prompt") for r in rows] == inputs[dim].prompts:
                key = (profile.evaluation.generation_for(dim).model_dump_json(), tuple(inputs[dim].prompts))
                runs.setdefault(expert, {})[key] = tuple(r["answer"] for r in rows)
        found = overrefusal.stored_answers(profile, expert, identities[expert])  # the XSTest track's answers
        if found is not None:
            runs.setdefault(expert, {})[found[0]] = found[1]
    return KnownAnswers(profile.seed, tuple(DEFAULT_STOP_STRINGS), runs)


def cached_dimensions(profile: Profile, name: str, identity: str, inputs: dict[str, Any]) -> list[str]:
    """The dimensions whose generations eval/<name>/ holds for this model identity and profile (run.py's key)."""
    from h3fusion.artifacts import read_manifest
    from h3fusion.evaluation.run import generation_hash
    from h3fusion.evaluation.store import eval_dir

    folder = eval_dir(profile, name)
    stored = (read_manifest(folder) or {}).get("generation_hashes", {})
    return [
        t
        for t in profile.tasks
        if stored.get(t) == generation_hash(profile, identity, t, inputs[t])
        and (folder / "generations" / f"{t}.jsonl").is_file()
    ]


@dataclass(frozen=True)
class KnownAnswers:
    """Answers the experts already gave to whole prompt lists (their evaluation generations), keyed by expert.

    A lookup hits only for the same generation config, seed and stop strings and the SAME prompt list in the
    same order: batching (which prompts share a padded batch) can move a greedy answer at the rounding level, so
    only the list the expert generated is certain to give the same tokens again. Anything else is generated."""

    seed: int
    stop_strings: tuple[str, ...]
    runs: Mapping[str, Mapping[tuple[str, tuple[str, ...]], tuple[str, ...]]] = field(default_factory=dict)
    """{expert: {(generation config as JSON, prompts): answers}}: dimensions may have their own caps."""

    def lookup(
        self,
        expert: str,
        prompts: Sequence[str],
        cfg: GenerationConfig,
        seed: int,
        stop_strings: Sequence[str],
    ) -> list[str] | None:
        if (seed, tuple(stop_strings)) != (self.seed, self.stop_strings):
            return None
        hit = self.runs.get(expert, {}).get((cfg.model_dump_json(), tuple(prompts)))
        return list(hit) if hit is not None else None

    def __len__(self) -> int:
        return sum(len(r) for r in self.runs.values())


def expert_answers(
    bank: AdapterBank,
    tokenizer: PreTrainedTokenizerBase,
    experts: Sequence[str],
    prompts: list[str],
    cfg: GenerationConfig,
    seed: int,
    *,
    stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
    known: KnownAnswers | None = None,
    progress: bool = True,
) -> dict[str, list[str]]:
    """{expert: its answer to each prompt}: the known (cached evaluation) answers when they cover this exact
    prompt list, else generated with the expert merged into the weights, which gives the same tokens."""
    out: dict[str, list[str]] = {}
    for e in experts:
        hit = known.lookup(e, prompts, cfg, seed, stop_strings) if known is not None else None
        if hit is None:
            with bank.merged(e) as model:
                hit = generate_texts(
                    model,
                    tokenizer,
                    prompts,
                    cfg,
                    seed,
                    stop_strings=stop_strings,
                    desc=f"answers of {e}",
                    progress=progress,
                )
        out[e] = hit
    return out
