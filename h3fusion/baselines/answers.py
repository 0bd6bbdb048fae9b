"""The experts' answers the output-level baselines start from: read from the generation cache, or generated.

Ensemble-select and H3Fusion-Instruct start from every expert's answer to each prompt they are asked, which are
the prompts the experts answer in their own evaluations (book chapter 1). Whichever stage generates an expert's
answers to a prompt list first stores them in the language-model-level generation cache
(`evaluation.generation_cache`) under the expert's identity, the one its evaluation uses; the other reads them
(`KnownAnswers`). A miss is generated with the expert merged into the weights, as its evaluation generates it,
which gives the same tokens (`expert_answers`), and stored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from h3fusion.config import GenerationConfig, Profile
from h3fusion.evaluation.generate import DEFAULT_STOP_STRINGS, generate_texts

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from h3fusion.baselines.ensembles import AdapterBank
    from h3fusion.evaluation.generation_cache import GenerationCache, GenerationCall


def expert_identities(profile: Profile) -> dict[str, str]:
    """{expert: sha of its manifest}; an error naming the command to run when an expert is missing."""
    from h3fusion.evaluation.registry import manifest_identity
    from h3fusion.experts import require_expert

    out = {}
    for expert in profile.expert_names:
        folder = require_expert(profile, expert, "the baselines (they combine the experts)")
        out[expert] = manifest_identity(folder, f"the {expert} expert", "run `h3fusion align`")
    return out


@dataclass(frozen=True)
class KnownAnswers:
    """The experts' answers in the generation cache, under each expert's identity (`expert_identities`, the one its
    own evaluation stores its answers under). A lookup hits only for the same expert weights, prompt list (in
    order), generation config, seed and stop strings."""

    cache: GenerationCache
    identities: Mapping[str, str]

    def lookup(self, expert: str, call: GenerationCall) -> list[str] | None:
        if expert not in self.identities:
            return None
        return self.cache.get(self.identities[expert], call)

    def store(self, expert: str, call: GenerationCall, answers: Sequence[str]) -> None:
        if expert in self.identities:
            self.cache.put(self.identities[expert], call, answers)


def known_answers(profile: Profile) -> KnownAnswers:
    """The profile's generation cache under its experts' identities (an error naming `h3fusion align` when an
    expert is missing)."""
    from h3fusion.evaluation.generation_cache import profile_generation_cache

    return KnownAnswers(profile_generation_cache(profile.run_dir), expert_identities(profile))


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
    """{expert: its answer to each prompt}: the known (cached) answers when they cover this exact prompt list, else
    generated with the expert merged into the weights, which gives the same tokens, and stored in `known`."""
    from h3fusion.evaluation.generation_cache import GenerationCall

    call = GenerationCall.of(prompts, cfg, seed, stop_strings)
    out: dict[str, list[str]] = {}
    for e in experts:
        hit = known.lookup(e, call) if known is not None else None
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
            if known is not None:
                known.store(e, call, hit)
        out[e] = hit
    return out
