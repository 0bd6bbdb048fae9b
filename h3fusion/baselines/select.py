"""Output-level ensemble (book chapter 3): every expert answers, a judge-free rule picks one answer per prompt.

The experts' answers come from the generation cache when an earlier stage (their own evaluations, usually) stored
them for the same prompts (`answers.KnownAnswers`), so selecting costs one likelihood scoring of the candidates, not
three generations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from h3fusion.baselines.answers import KnownAnswers, expert_answers
from h3fusion.baselines.ensembles import TokenEnsemble
from h3fusion.config import GenerationConfig
from h3fusion.evaluation.generate import DEFAULT_STOP_STRINGS
from h3fusion.evaluation.lm import split_continuation

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from h3fusion.baselines.ensembles import AdapterBank

Selector = Callable[[list[str], list[list[str]]], list[int]]
"""(prompts, candidates per prompt [one answer per expert]) -> index of the chosen answer per prompt."""


def likelihood_selector(ensemble: TokenEnsemble) -> Selector:
    """Consensus selection: the answer with the highest mean per-token log-likelihood under the uniform mixture
    of all experts. Judge-free on purpose, so the judges that score the evaluation never pick the answers they
    score: it prefers the answer the experts jointly find most plausible (a minimum-Bayes-risk-like rule), not
    the longest one (per-token mean, not sum)."""

    def select(prompts: list[str], candidates: list[list[str]]) -> list[int]:
        flat_p = [p for p, cs in zip(prompts, candidates, strict=True) for _ in cs]
        flat_c = [c for cs in candidates for c in cs]
        scores = ensemble.continuation_logprobs(flat_p, flat_c)
        lengths = [
            max(1, len(split_continuation(ensemble.tokenizer, p, c)[1]))
            for p, c in zip(flat_p, flat_c, strict=True)
        ]
        out, k = [], 0
        for cs in candidates:
            per_token = [
                scores[k + j] / lengths[k + j] if cs[j].strip() else float("-inf") for j in range(len(cs))
            ]
            out.append(max(range(len(cs)), key=lambda j, s=per_token: (s[j], -j)))
            k += len(cs)
        return out

    return select


class SelectEnsemble:
    """Output-level ensemble: every expert answers with its own adapter, `selector` picks one answer.

    `continuation_logprobs` (TruthfulQA MC) is the uniform token-level mixture's: selection is defined on
    generated answers only. `mixture` may be an existing uniform `TokenEnsemble` of the same bank (its scores
    are then shared); `known` holds the experts' cached evaluation answers (see `expert_answers`).
    """

    def __init__(
        self,
        bank: AdapterBank,
        tokenizer: PreTrainedTokenizerBase,
        selector: Selector | None = None,
        *,
        stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
        known: KnownAnswers | None = None,
        mixture: TokenEnsemble | None = None,
        progress: bool = True,
    ) -> None:
        if mixture is not None and (mixture.bank is not bank or mixture.weighting != "uniform"):
            raise ValueError(
                "the selection ensemble's mixture must be a uniform TokenEnsemble of the same bank"
            )
        self.bank, self.tokenizer, self.known = bank, tokenizer, known
        self.mixture = mixture or TokenEnsemble(bank, tokenizer, stop_strings=stop_strings, progress=progress)
        self.selector = selector or likelihood_selector(self.mixture)
        self.stop_strings, self.progress = tuple(stop_strings), progress
        self.last_candidates: list[list[str]] = []
        self.last_choices: list[int] = []

    def candidates(self, prompts: list[str], cfg: GenerationConfig, seed: int) -> list[list[str]]:
        """Every expert's answer to every prompt, [prompt][expert]."""
        answers = expert_answers(
            self.bank,
            self.tokenizer,
            self.bank.names,
            prompts,
            cfg,
            seed,
            stop_strings=self.stop_strings,
            known=self.known,
            progress=self.progress,
        )
        return [list(c) for c in zip(*answers.values(), strict=True)]

    def generate(self, prompts: list[str], cfg: GenerationConfig, seed: int) -> list[str]:
        cands = self.candidates(prompts, cfg, seed)
        choices = self.selector(prompts, cands)
        self.last_candidates, self.last_choices = cands, list(choices)
        return [cs[j] for cs, j in zip(cands, choices, strict=True)]

    def continuation_logprobs(self, prompts: list[str], continuations: list[str]) -> list[float]:
        return self.mixture.continuation_logprobs(prompts, continuations)
