"""Tokenised torch datasets (one task, or the mixed fusion set) and the padding collator.

Every item of the mixed dataset is labelled with the index (in `profile.tasks`) of the task it came from.
The released code built these labels from a running total, so later tasks got earlier tasks' labels
(with the paper's sizes every TruthfulQA sample is labelled harmless; book: released_code_bugs.md). That bug is reproduced
only when `profile.fusion.released_code.labels` is true.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from h3fusion.config import Profile
from h3fusion.data.splits import TrainExample, load_train_examples
from h3fusion.data.template import IGNORE_INDEX, tokenize_example
from h3fusion.errors import DataError
from h3fusion.progress import progress

log = logging.getLogger(__name__)


class TokenizedDataset(Dataset):
    """Items {input_ids, attention_mask, labels, task_label} (1-D LongTensors, task_label an int).

    `sources[i]` is the task item i was built from; `dropped[task]` counts examples left without any
    response token after truncation (reported, never silently lost)."""

    def __init__(self, items: list[dict[str, Any]], sources: list[str], dropped: dict[str, int]) -> None:
        self.items = items
        self.sources = sources
        self.dropped = dropped

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


def _task_index(profile: Profile, task: str) -> int:
    if task not in profile.tasks:
        raise DataError(
            f"task {task!r} is not in this profile's `tasks` {list(profile.tasks)}; add it there first"
        )
    return profile.tasks.index(task)


def _tokenize_task(
    profile: Profile, tokenizer: Any, task: str, examples: Sequence[TrainExample] | None = None
) -> tuple[list[dict[str, Any]], int]:
    examples = load_train_examples(profile, task) if examples is None else examples
    items, dropped = [], 0
    for example in progress(examples, desc=f"tokenising {task}", leave=False, show=len(examples) >= 1000):
        tok = tokenize_example(tokenizer, example, profile.data.max_length)
        if tok is None:
            dropped += 1
            continue
        items.append({k: torch.tensor(v, dtype=torch.long) for k, v in tok.items()})
    if dropped:
        log.warning(
            f"{task}: {dropped} of {len(examples)} examples have no response token within "
            f"data.max_length={profile.data.max_length} and were left out; raise data.max_length"
        )
    if not items:
        raise DataError(
            f"{task}: no usable training example (of {len(examples)}); check the data and data.max_length"
        )
    return items, dropped


def build_task_dataset(
    profile: Profile, tokenizer: Any, task: str, examples: Sequence[TrainExample] | None = None
) -> TokenizedDataset:
    """The tokenised training set of one task (default: its training sample), or of `examples` of that task (an
    expert's own sample, `load_expert_examples`)."""
    label = _task_index(profile, task)
    items, dropped = _tokenize_task(profile, tokenizer, task, examples)
    for item in items:
        item["task_label"] = label
    return TokenizedDataset(items, [task] * len(items), {task: dropped})


def released_code_labels(sizes: Sequence[int]) -> list[int]:
    """The released code's labels: task i contributes (sizes[0] + ... + sizes[i]) copies of i, read up to sum(sizes)."""
    running, labels = 0, []
    for i, n in enumerate(sizes):
        running += n
        labels.extend([i] * running)
    return labels[: sum(sizes)]


def build_mixed_dataset(profile: Profile, tokenizer: Any) -> TokenizedDataset:
    """All tasks' training sets, concatenated in `profile.tasks` order, each item labelled by its own task."""
    items, sources, dropped = [], [], {}
    for task in profile.tasks:
        task_items, dropped[task] = _tokenize_task(profile, tokenizer, task)
        label = _task_index(profile, task)
        for item in task_items:
            item["task_label"] = label
        items += task_items
        sources += [task] * len(task_items)
    if profile.fusion.released_code.labels:
        sizes = [sources.count(t) for t in profile.tasks]
        for item, label in zip(items, released_code_labels(sizes), strict=True):
            item["task_label"] = label
    return TokenizedDataset(items, sources, dropped)


class PadCollator:
    """Right-pads a batch to its longest sequence: input_ids with pad_token_id, attention_mask with 0, labels
    with -100; adds `task_labels` (LongTensor [B]) when the items carry `task_label`."""

    def __init__(self, pad_token_id: int) -> None:
        if pad_token_id is None:
            raise DataError(
                "the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token) first"
            )
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        seqs = {
            k: [torch.as_tensor(f[k], dtype=torch.long) for f in features] for k in ("input_ids", "labels")
        }
        if "attention_mask" in features[0]:
            masks = [torch.as_tensor(f["attention_mask"], dtype=torch.long) for f in features]
        else:
            masks = [torch.ones_like(s) for s in seqs["input_ids"]]
        longest = max(len(s) for s in seqs["input_ids"])
        batch = {
            "input_ids": _pad(seqs["input_ids"], longest, self.pad_token_id),
            "attention_mask": _pad(masks, longest, 0),
            "labels": _pad(seqs["labels"], longest, IGNORE_INDEX),
        }
        if "task_label" in features[0]:
            batch["task_labels"] = torch.tensor([int(f["task_label"]) for f in features], dtype=torch.long)
        return batch


def _pad(seqs: list[torch.Tensor], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(seqs), length), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out
