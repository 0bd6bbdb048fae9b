"""What every ablation run is scored on and how (book chapter 4): held-out response NLL, TruthfulQA MC and
routing, all from the model's own probabilities, so a dozen short runs fit the cpu budget without generation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from h3fusion.config import Profile
from h3fusion.errors import AblationError

SCORE_FORMAT = 2
"""Bump when the scores change meaning: every cached ablation result is then recomputed."""
NLL_BATCH = 8


@dataclass
class ScoringItems:
    """What every ablation run is scored on (the same items for every run)."""

    responses: dict[str, list[Any]]
    """{task: [TrainExample]} held-out (prompt, reference answer) pairs for the response NLL."""
    prompts: dict[str, list[str]]
    """{task: [formatted evaluation prompt]} for the routing statistics."""
    mc: list[Any]
    """MCQuestions (TruthfulQA's; empty when no dimension of the profile has any)."""


def heldout_responses(profile: Profile, task: str, n: int) -> list[Any]:
    """n held-out (prompt, reference answer) pairs of one task, as TrainExamples (its dimension's
    `reference_responses`)."""
    from h3fusion.dimensions import get_dimension

    out = get_dimension(task).reference_responses(profile, n)
    if not out:
        raise AblationError(
            f"no held-out {task} responses to score: the profile's data leaves none out; lower "
            f"data.train_examples.{task} or data.eval_examples.{task} is 0"
        )
    return out


def scoring_items(profile: Profile) -> ScoringItems:
    from h3fusion.analysis import task_prompts
    from h3fusion.data import load_eval_items
    from h3fusion.evaluation.inputs import dimension_inputs

    n = profile.ablations.score_examples
    responses = {t: heldout_responses(profile, t, n) for t in profile.tasks}
    prompts = task_prompts(profile, "eval", n)
    # the multiple-choice questions of every dimension that has them (TruthfulQA's)
    mc = [q for t in profile.tasks for q in dimension_inputs(t, load_eval_items(profile, t)[:n]).mc]
    return ScoringItems(responses, prompts, mc)


def response_nll(model: Any, tokenizer: Any, examples: Sequence[Any], max_length: int) -> float:
    """Mean NLL per response token (nats) of the examples, tokenised exactly as training tokenises them.

    Batches hold examples of similar length (less padding) and the vocabulary softmax is taken at response
    positions only."""
    import torch

    from h3fusion.data import IGNORE_INDEX, PadCollator, tokenize_example

    encoded = [e for e in (tokenize_example(tokenizer, ex, max_length) for ex in examples) if e is not None]
    if not encoded:
        raise AblationError("no example keeps a response token after truncation; raise data.max_length")
    encoded.sort(key=lambda e: len(e["input_ids"]))
    collate = PadCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(encoded), NLL_BATCH):
        batch = collate(encoded[start : start + NLL_BATCH])
        with torch.no_grad():
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
        targets = batch["labels"][:, 1:].to(device)
        mask = targets != IGNORE_INDEX
        logp = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)  # [response tokens, vocab]
        total += float(-logp.gather(-1, targets[mask].unsqueeze(-1)).sum())
        count += int(mask.sum())
    return total / count


def score_model(
    profile: Profile, model: Any, tokenizer: Any, items: ScoringItems | None = None
) -> dict[str, Any]:
    """Likelihood scores and routing of one MoE model (an `MoECausalLM` or an exported Mixtral)."""
    import torch

    from h3fusion.analysis import routing_per_prompt
    from h3fusion.evaluation.lm import HFLanguageModel
    from h3fusion.evaluation.mc import aggregate_mc, mc_prompt, score_mc
    from h3fusion.routing import MASKS, heldout_routing, routing_table

    items = items or scoring_items(profile)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            nll = {
                t: response_nll(model, tokenizer, ex, profile.data.max_length)
                for t, ex in items.responses.items()
            }
            per_prompt = {
                t: routing_per_prompt(model, tokenizer, p, max_length=profile.data.max_length)
                for t, p in items.prompts.items()
            }
            heldout = heldout_routing(model, tokenizer, profile, profile.ablations.routing_examples)
        fmt = mc_prompt(profile.evaluation.mc_prompt)
        mc = (
            aggregate_mc(
                score_mc(
                    HFLanguageModel(model, tokenizer, progress=False), items.mc, fmt.template, fmt.separator
                )
            )
            if items.mc
            else {}
        )
    finally:
        model.train(was_training)
    table = routing_table({"model": heldout}, profile.expert_dimensions, references=False)["accuracy %"]
    return {
        "nll": nll,
        "mc1": 100.0 * mc["mc1"] if mc else float("nan"),
        "mc2": 100.0 * mc["mc2"] if mc else float("nan"),
        # a description of the evaluation prompts' routing (their source need not read like the training task)
        "routing": {t: pp.mean(axis=0).tolist() for t, pp in per_prompt.items()},
        # routing accuracy % on held-out items of the training sources: {tokens: {task or "all": %}}
        "routing_accuracy": {
            mask: {task: float(table[("model", mask, task)]) for task in (*profile.tasks, "all")}
            for mask in MASKS
        },
        "routing_items": {t: int(v["sequence"].shape[0]) for t, v in heldout.items()},
    }
