"""Helpfulness (Alpaca for training, AlpacaEval for evaluation): the judge's probability that the answer beats
the reference answer; on the likelihood track, the mean per-token log-likelihood of the reference answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from h3fusion.dimensions.base import Dimension, Metric, SourceReport
from h3fusion.sections import JudgeSettings

if TYPE_CHECKING:
    from h3fusion.config import Profile


def item_values(rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    p = np.asarray([r["win_probability"] for r in rows], dtype=float)
    return {"win_rate": 100.0 * (p > 0.5)}


def judge(judge: Any, keys: list[dict[str, Any]], answers: list[str]) -> list[dict[str, Any]]:
    p = judge.win_probability(
        [k["instruction"] + (f"\n\n{k['input']}" if k["input"] else "") for k in keys],
        answers,
        [k["reference"] for k in keys],
    )
    return [{"win_probability": float(x)} for x in p]


def inputs(items: Sequence[Any]) -> Any:
    """The Alpaca prompt of each AlpacaEval instruction, and its reference answer for the judge."""
    from h3fusion.data import format_prompt
    from h3fusion.evaluation.inputs import DimensionInputs, item_field

    keys = [
        {
            "item_id": item_field(it, "id"),
            "instruction": item_field(it, "instruction"),
            "input": item_field(it, "input", "") or "",
            "reference": item_field(it, "reference", None) or item_field(it, "output"),
        }
        for it in items
    ]
    return DimensionInputs([format_prompt(k["instruction"], k["input"]) for k in keys], keys)


def likelihood_inputs(profile: Profile, tok: Any) -> Any:
    """The reference answers of the first `evaluation.likelihood.items.helpful` AlpacaEval instructions that have
    one (each cut to `max_answer_tokens`), scored after the instruction's Alpaca prompt."""
    from h3fusion.data import format_prompt
    from h3fusion.data.splits import eval_items_all
    from h3fusion.evaluation.likelihood import LikelihoodInputs, truncate_tokens

    cfg = profile.evaluation.likelihood
    with_reference = [it for it in eval_items_all(profile, "helpful") if it.get("reference")]
    items = with_reference[: cfg.items_of("helpful")]
    pairs, tokens = [], []
    for it in items:
        answer, n = truncate_tokens(tok, it["reference"], cfg.max_answer_tokens)
        pairs.append((format_prompt(it["instruction"], it.get("input", "") or ""), answer))
        tokens.append(n)
    ids = [str(it["id"]) for it in items]
    return LikelihoodInputs(
        "helpful", ids, pairs, list(range(len(items))), ["reference"] * len(items), tokens, []
    )


def likelihood_rows(lm: Any, inputs: Any, mc_format: str) -> list[dict[str, Any]]:
    """Per reference answer, its mean log-likelihood per token (nats)."""
    from h3fusion.evaluation.likelihood import per_token_logprobs

    per_token = per_token_logprobs(lm, inputs)
    return [
        {"item_id": i, "tokens": n, "ref_logprob": float(v)}
        for i, n, v in zip(inputs.ids, inputs.tokens, per_token, strict=True)
    ]


def train_pool(profile: Profile) -> list[Any]:
    """Every training example of the source (`data.splits.helpful_train_all`)."""
    from h3fusion.data.splits import helpful_train_all

    return helpful_train_all(profile)[0]


def eval_pool(profile: Profile) -> list[dict[str, Any]]:
    """Every evaluation item, in file order (`data.splits.helpful_eval_all`)."""
    from h3fusion.data.splits import helpful_eval_all

    return helpful_eval_all(profile)


class HelpfulJudgeSettings(JudgeSettings):
    """``judges.helpful``."""

    judge: Literal["offline", "alpaca_eval"] = "offline"
    """`offline`: the pairwise judge trained here on GPT-4's AlpacaEval verdicts (a proxy, validated in chapter 0);
    `alpaca_eval`: AlpacaEval with GPT-4, the paper's judge (needs the alpaca_eval package and OPENAI_API_KEY)."""
    validation_instructions: int = Field(200, gt=0)
    """AlpacaEval instructions held out (beyond the scored ones) to validate the offline pairwise judge."""
    annotator: str = "alpaca_eval_gpt4"
    """The alpaca_eval annotator config of the `alpaca_eval` judge."""


def load_judge(profile: Profile) -> Any:
    """AlpacaEval with GPT-4 (`judges.helpful.judge: alpaca_eval`), else the offline judge (trained once)."""
    from h3fusion.evaluation.judges import helpful, paper

    if profile.judges.helpful.judge == "alpaca_eval":
        return paper.AlpacaEvalJudge(profile)
    return helpful.load_offline(profile)


ALPACA_FULL = 52_002
"""Records of the full Stanford Alpaca data (the paper trains on a 20k cleaned subset of it)."""


def source_report(profile: Profile) -> SourceReport:
    """Alpaca (training) and AlpacaEval (evaluation; the paper scores its first 50 instructions)."""
    from h3fusion.data import format_prompt, sources, splits

    examples, skipped = splits.helpful_train_all(profile)
    n_alpaca = len(examples) + skipped
    items = splits.helpful_eval_all(profile)
    deviations = []
    if n_alpaca < ALPACA_FULL:
        deviations.append(
            f"helpful training data is a {n_alpaca:,}-record random sample of Alpaca "
            f"({sources.SOURCES['alpaca'].local_path}); the paper trains on a 20k cleaned subset of the "
            f"{ALPACA_FULL:,} records (alpaca_small.json, not obtainable)"
        )
    if skipped:
        deviations.append(f"{skipped} Alpaca records with an empty output are skipped")
    return SourceReport(
        summary=f"helpful : Alpaca {n_alpaca:,} records ({skipped} with an empty output skipped); AlpacaEval "
        f"{len(items)} items",
        deviations=deviations,
        paper_eval=f"the paper's first {min(50, len(items))} AlpacaEval instructions",
        paper_n=min(50, len(items)),
        paper_takes_first=True,
        first_eval=(
            "helpful: first eval item (prompt + reference)",
            format_prompt(items[0]["instruction"]),
            items[0]["reference"],
        ),
    )


def reference_responses(profile: Profile, n: int) -> list[Any]:
    """The first n evaluation instructions with their reference answers (the ablations' held-out NLL)."""
    from h3fusion.data import TrainExample, load_eval_items

    return [
        TrainExample(
            "helpful", it["instruction"], it.get("input", "") or "", it.get("reference") or it["output"]
        )
        for it in load_eval_items(profile, "helpful")[:n]
    ]


HELPFUL = Dimension(
    name="helpful",
    judged=(Metric("win_rate", "Helpful: win % ↑"),),
    likelihood=(Metric("ref_logprob", "Helpful: reference log-lik ↑", nats=True),),
    likelihood_headline="ref_logprob",
    prompt_field="instruction",
    strata="AlpacaEval subset",
    item_values=item_values,
    judge=judge,
    inputs=inputs,
    likelihood_inputs=likelihood_inputs,
    likelihood_rows=likelihood_rows,
    train_pool=train_pool,
    eval_pool=eval_pool,
    load_judge=load_judge,
    source_report=source_report,
    reference_responses=reference_responses,
    judge_settings=HelpfulJudgeSettings,
)
