"""The three tasks' data: sources (local folder or hub), the paper's splits, the prompt template,
tokenisation, the mixed fusion dataset and the padding collator. See data/README.md (the data card)."""

from h3fusion.data.dataset import PadCollator, TokenizedDataset, build_mixed_dataset, build_task_dataset
from h3fusion.data.splits import (
    TrainExample,
    load_alpaca_eval_annotations,
    load_beavertails_labelled,
    load_eval_items,
    load_expert_examples,
    load_train_examples,
)
from h3fusion.data.template import IGNORE_INDEX, encode_prompt, format_prompt, split_prompt, tokenize_example

__all__ = [
    "IGNORE_INDEX",
    "PadCollator",
    "TokenizedDataset",
    "TrainExample",
    "build_mixed_dataset",
    "build_task_dataset",
    "encode_prompt",
    "format_prompt",
    "split_prompt",
    "load_alpaca_eval_annotations",
    "load_beavertails_labelled",
    "load_eval_items",
    "load_expert_examples",
    "load_train_examples",
    "tokenize_example",
]
