"""Routing measured where it means something: on held-out items of the routers' own training sources.

The gating loss trains the router to send a sequence of task t to t's expert (or experts). Whether it learned that can only be
read on text of the distribution it trained on, held out: the evaluation prompts of another source (AlpacaEval
for "helpful") need not read like that task's training data at all, so their routing is a description, not an
accuracy (`h3fusion.analysis.routing_per_prompt` describes it).

An item is a (prompt, reference answer) pair of a task's training source that the training sample left out
(`data.splits.load_heldout_examples`), tokenised exactly as training tokenises it. Its routing is the router's
softmax averaged over layers and over the tokens of one of four masks:

- ``sequence``: every token (prompt and answer);
- ``prompt``: the prompt's tokens alone (generation starts from these);
- ``sequence after template`` and ``prompt after template``: the same without the Alpaca template's shared
  header ("Below is an instruction ... ### Instruction:"), which is the same text for every task and comes
  first, so under causal attention its hidden states, and any router's output on them, are the same whatever
  the task: no router can route it by task, and in an average it only adds the same constant to every item.

The gating loss averages over the masks `fusion.gate_averages` names (sequence and prompt), with or without
the header (`fusion.gate_skip_template`). The book's headline accuracies are always the two masks after the
header, whatever the loss did with it: an accuracy over the header would measure the header's routing, which
no router can make depend on the task (and which decides the argmax of a short prompt's average).

An item is routed correctly when its layer-averaged top expert is aligned on its task. Accuracies carry Wilson
95 % intervals. Two reference routers give the floor: a constant router (every item to one expert) and a
uniformly random one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from h3fusion.errors import H3FusionError

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from h3fusion.config import Profile

MASKS: tuple[str, ...] = ("sequence", "prompt", "sequence after template", "prompt after template")
BATCH_SIZE = 8


def template_header_ids(tokenizer: Any) -> list[list[int]]:
    """Token ids of the template text before the instruction, for both Alpaca variants (with and without input)."""
    from h3fusion.data.template import PROMPT_NO_INPUT, PROMPT_WITH_INPUT, encode_prompt

    return [
        encode_prompt(tokenizer, t.split("{instruction}")[0]) for t in (PROMPT_NO_INPUT, PROMPT_WITH_INPUT)
    ]


def template_lengths(input_ids: torch.Tensor, headers: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per row of `input_ids` [B, T], the length of the longest prefix it shares with one of the headers (token
    merges at the boundary can make the last header token differ; the shared part is what every task's prompt
    starts with, and under causal attention its hidden states are the same for every task)."""
    import torch

    best = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    for header in headers:
        n = min(len(header), input_ids.shape[1])
        if n == 0:
            continue
        ref = torch.as_tensor(list(header[:n]), device=input_ids.device)
        same = (input_ids[:, :n] == ref).long().cumprod(dim=1).sum(dim=1)
        best = torch.maximum(best, same)
    return best


def routing_masks(
    attention_mask: torch.Tensor, labels: torch.Tensor, template: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The four token masks of a right-padded batch (see the module docstring), each [B, T] of 0/1; `template`
    holds each row's template length (`template_lengths`)."""
    import torch

    from h3fusion.losses import prompt_token_mask

    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    after = (positions[None, :] >= template[:, None].to(attention_mask.device)).to(attention_mask.dtype)
    prompt = prompt_token_mask(attention_mask, labels).to(attention_mask.dtype)
    return {
        "sequence": attention_mask,
        "prompt": prompt,
        "sequence after template": attention_mask * after,
        "prompt after template": prompt * after,
    }


def heldout_routing(
    model: Any, tokenizer: Any, profile: Profile, n: int, batch_size: int = BATCH_SIZE
) -> dict[str, dict[str, np.ndarray]]:
    """{task: {mask: [items, layers, experts]}} mean router probability of n held-out items per task."""
    import torch

    from h3fusion.analysis import router_logits, routing_probs_per_layer
    from h3fusion.data import PadCollator, tokenize_example
    from h3fusion.data.splits import load_heldout_examples

    headers = template_header_ids(tokenizer)
    collate = PadCollator(tokenizer.pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, dict[str, np.ndarray]] = {}
    try:
        for task in profile.tasks:
            examples = load_heldout_examples(profile, task, n)
            encoded = [tokenize_example(tokenizer, e, profile.data.max_length) for e in examples]
            encoded = [e for e in encoded if e is not None]
            per_mask: dict[str, list[np.ndarray]] = {m: [] for m in MASKS}
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start : start + batch_size]
                batch = collate(chunk)
                masks = routing_masks(
                    batch["attention_mask"], batch["labels"], template_lengths(batch["input_ids"], headers)
                )
                with torch.no_grad():
                    logits = router_logits(
                        model,
                        {
                            "input_ids": batch["input_ids"].to(device),
                            "attention_mask": batch["attention_mask"].to(device),
                        },
                    )
                for name, mask in masks.items():
                    probs = routing_probs_per_layer(logits, mask.to(device))
                    per_mask[name].append(probs.cpu().double().numpy())
            out[task] = {m: np.concatenate(v, axis=0) for m, v in per_mask.items()}
    finally:
        model.train(was_training)
    return out


def top_experts(per_item: np.ndarray) -> np.ndarray:
    """Each item's top expert after averaging its routing over layers ([items, layers, experts] -> [items])."""
    return np.asarray(per_item).mean(axis=1).argmax(axis=-1)


def reference_routers(
    n_by_task: Mapping[str, int], num_experts: int, seed: int = 0
) -> dict[str, dict[str, np.ndarray]]:
    """{router: {task: top expert per item}} of the two floors: every item to expert 0, and uniformly at random."""
    rng = np.random.default_rng(seed)
    return {
        "constant router (expert 0)": {t: np.zeros(n, dtype=int) for t, n in n_by_task.items()},
        "random router": {t: rng.integers(0, num_experts, size=n) for t, n in n_by_task.items()},
    }


def wilson(correct: int, n: int) -> tuple[float, float]:
    from scipy import stats

    ci = stats.binomtest(correct, n).proportion_ci(0.95, method="wilson")
    return 100.0 * ci.low, 100.0 * ci.high


def accuracy_rows(
    top_by_task: Mapping[str, np.ndarray], expert_dimensions: Sequence[str]
) -> list[dict[str, Any]]:
    """One row per task and one for all items: n, accuracy % and its Wilson 95 % interval. An item is routed
    correctly when its top expert is aligned on the item's task (`expert_dimensions`: each expert's task, in
    expert order; `Profile.expert_dimensions`)."""
    rows, hits = [], []
    dims = np.asarray(list(expert_dimensions))
    for task, top in top_by_task.items():
        if task not in expert_dimensions:
            raise H3FusionError(
                f"routing accuracy: task {task!r} has no expert; the experts' tasks are {list(expert_dimensions)}"
            )
        correct = dims[np.asarray(top, dtype=int)] == task
        hits.append(correct)
        rows.append({"task": task, "n": len(correct), "correct": int(correct.sum())})
    everything = np.concatenate(hits) if hits else np.zeros(0, dtype=bool)
    rows.append({"task": "all", "n": len(everything), "correct": int(everything.sum())})
    for row in rows:
        if row["n"] == 0:
            raise H3FusionError(f"routing accuracy: no items for {row['task']}")
        row["accuracy %"] = 100.0 * row["correct"] / row["n"]
        row["low"], row["high"] = wilson(row["correct"], row["n"])
    return rows


def routing_table(
    per_item_by_model: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
    expert_dimensions: Sequence[str],
    masks: Sequence[str] = MASKS,
    references: bool = True,
    seed: int = 0,
) -> pd.DataFrame:
    """Routing accuracy per model, mask and task (+ all), with Wilson intervals; reference routers appended.
    `expert_dimensions`: each expert's task, in expert order (`Profile.expert_dimensions`)."""
    import pandas as pd

    records = []
    n_by_task: dict[str, int] = {}
    for model, by_task in per_item_by_model.items():
        for mask in masks:
            top = {t: top_experts(by_mask[mask]) for t, by_mask in by_task.items()}
            n_by_task = {t: len(v) for t, v in top.items()}
            records += [{"model": model, "tokens": mask, **r} for r in accuracy_rows(top, expert_dimensions)]
    if references and n_by_task:
        for name, top in reference_routers(n_by_task, len(expert_dimensions), seed).items():
            records += [{"model": name, "tokens": "any", **r} for r in accuracy_rows(top, expert_dimensions)]
    return pd.DataFrame.from_records(records).set_index(["model", "tokens", "task"])


def accuracy_summary(table: pd.DataFrame, model: str, mask: str) -> dict[str, float]:
    """{task or "all": accuracy %} of one model and mask from `routing_table`."""
    part = table.sort_index().loc[(model, mask)]
    return {str(task): float(row["accuracy %"]) for task, row in part.iterrows()}


def interval_frame(table: pd.DataFrame) -> pd.DataFrame:
    """`routing_table` for reading: rows (model, tokens), one column per task (+ all) holding
    "accuracy [low, high]" in %, the items per task in the column header."""
    cells = table.apply(lambda r: f"{r['accuracy %']:.1f} [{r['low']:.1f}, {r['high']:.1f}]", axis=1)
    wide = cells.unstack("task")
    n = table["n"].groupby(level="task").first()
    order = [t for t in dict.fromkeys(table.index.get_level_values("task"))]
    wide = wide[order]
    wide.columns = [f"{t} (n={n[t]})" for t in order]
    rows = list(dict.fromkeys(tuple(i[:2]) for i in table.index))
    return wide.loc[rows]


def layer_profiles(
    per_item_by_task: Mapping[str, Mapping[str, np.ndarray]], mask: str
) -> dict[str, np.ndarray]:
    """{task: [layers, experts]} mean routing over a task's items under one mask (for the heat-maps)."""
    return {task: np.asarray(by_mask[mask]).mean(axis=0) for task, by_mask in per_item_by_task.items()}


def accuracy_cell(table: pd.DataFrame, model: str, mask: str, task: str = "all") -> str:
    """One accuracy of `routing_table` as prose: "87.5 % [80.1, 92.3] (n=192)"."""
    row = table.loc[(model, mask, task)]
    return f"{row['accuracy %']:.1f} % [{row['low']:.1f}, {row['high']:.1f}] (n={int(row['n'])})"
