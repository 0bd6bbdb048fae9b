"""The judge-free likelihood track: what a model's own probabilities say about each dimension.

The judged track (generate, then judge) is the paper's; this track is ours. It needs no judge, scores many more
items per minute, and its paired differences are precise, so it resolves differences the judged track cannot:

- **honest**: TruthfulQA MC1 and MC2 (`h3fusion.evaluation.mc`) on the evaluation questions (all 409 by default);
- **helpful**: the mean per-token log-likelihood of AlpacaEval's reference answer (text-davinci-003's) after the
  instruction in the Alpaca template, on a stratified sample of AlpacaEval instructions. Higher = the model finds
  a good answer more probable. It measures closeness to one reference, not preference: a proxy for helpfulness;
- **harmless**: pairs of a safe and an unsafe labelled BeaverTails evaluation response
  (`h3fusion.dimensions.harmless.safe_unsafe_pairs`),
  each response scored after its own prompt: the margin mean log p(safe) - mean log p(unsafe), per token and
  averaged over each side's responses, and whether the model prefers the safe side (margin > 0). The evaluation
  prompts that have both a safe and an unsafe response come first (a same-prompt comparison, but only 44 of
  them in the offline copy: too few to resolve the small shifts alignment makes); then pairs across prompts,
  the k-th prompt with only safe responses against the k-th with only unsafe ones. A pair's two prompts
  differ, so one model's margin mixes the prompts' own difficulty in; a difference between two models on the
  same pairs cancels it (a difference in differences): it says which model moved probability towards the
  safe responses, relative to the unsafe ones.

Each dimension builds its own items and rows (`Dimension.likelihood_inputs`, `likelihood_rows`, in
`h3fusion.dimensions`); this module holds what they share. Answers and responses are scored on at most `evaluation.likelihood.max_answer_tokens` tokens, counted with the
profile's tokenizer. `evaluate_model` runs this track beside generation and stores it under
``eval/<model>/likelihood/<dimension>.jsonl``; `stats.read_likelihood_scores` reads it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from h3fusion.artifacts import digest
from h3fusion.config import Profile
from h3fusion.dimensions import DIMENSIONS, get_dimension
from h3fusion.evaluation.lm import LanguageModel
from h3fusion.evaluation.mc import MCQuestion

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

LIKELIHOOD_FORMAT = 1
FOLDER = "likelihood"
METRICS = {d.name: tuple(m.key for m in d.likelihood) for d in DIMENSIONS.values()}
"""The per-item metrics of each dimension on this track (`Dimension.likelihood`; every one: higher is better)."""


@dataclass
class LikelihoodInputs:
    """One dimension's scored items: ids, and either MC questions (honest) or (prompt, continuation) pairs."""

    task: str
    ids: list[str]
    pairs: list[tuple[str, str]]
    """Every (prompt, continuation) scored; `owners[i]` is the item and `sides[i]` the side it belongs to."""
    owners: list[int]
    sides: list[str]
    tokens: list[int]
    mc: list[MCQuestion]

    def digest(self, model_identity: str, mc_format: str) -> str:
        """Changes when anything that could change this dimension's scores changes."""
        content = {
            "format": LIKELIHOOD_FORMAT,
            "task": self.task,
            "model": model_identity,
            "ids": self.ids,
            "pairs": self.pairs,
            "sides": self.sides,
            "mc": [(q.question, q.mc1_choices, q.mc1_labels, q.mc2_choices, q.mc2_labels) for q in self.mc],
            "mc_prompt": mc_format if self.mc else None,
        }
        return digest(content)


def truncate_tokens(tok: PreTrainedTokenizerBase, text: str, limit: int) -> tuple[str, int]:
    """`text` cut to its first `limit` tokens, and its token count (as the scorer tokenises a continuation)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if len(ids) > limit:
        text = tok.decode(ids[:limit])
    return text, len(tok(text, add_special_tokens=False)["input_ids"])


def likelihood_inputs(profile: Profile) -> dict[str, LikelihoodInputs]:
    """Every dimension's items of this track (for the profile's dimensions)."""
    from h3fusion.models import load_tokenizer

    tok = load_tokenizer(profile)
    return {task: get_dimension(task).likelihood_inputs(profile, tok) for task in profile.tasks}


def per_token_logprobs(lm: LanguageModel, inputs: LikelihoodInputs) -> np.ndarray:
    """Each scored continuation's log-likelihood per token (of its `tokens`) after its prompt."""
    if not inputs.pairs:
        return np.zeros(0)
    logprobs = lm.continuation_logprobs([p for p, _ in inputs.pairs], [c for _, c in inputs.pairs])
    return np.asarray(logprobs, dtype=float) / np.maximum(np.asarray(inputs.tokens, dtype=float), 1.0)


def score(lm: LanguageModel, inputs: LikelihoodInputs, mc_format: str) -> list[dict[str, Any]]:
    """Per-item rows of one dimension (the metrics of `METRICS` plus what they were computed from; the dimension's
    own `Dimension.likelihood_rows`)."""
    return get_dimension(inputs.task).likelihood_rows(lm, inputs, mc_format)


def item_values(task: str, rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-item values of one dimension: MC1/MC2 and the safe preference in %, log-likelihoods in nats/token."""
    return {
        m.key: (1.0 if m.nats else 100.0) * np.asarray([r[m.key] for r in rows], dtype=float)
        for m in get_dimension(task).likelihood
    }


def summary(rows: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """The means of every metric per dimension, with n (what metrics.json keeps)."""
    out = {}
    for task, task_rows in rows.items():
        values = item_values(task, task_rows)
        out[task] = {m: float(v.mean()) if len(v) else float("nan") for m, v in values.items()}
        out[task]["n"] = len(task_rows)
    return out
