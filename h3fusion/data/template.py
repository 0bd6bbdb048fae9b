"""The paper's Alpaca prompt template and the tokenisation of (prompt, response) pairs.

Decision on the separator: the paper's template ends with "### Response:"; we end the prompt with
"### Response:\\n" (one newline, as alpaca-lora and most Alpaca reproductions do) so that the answer starts on
its own line and its first word is tokenised as a word, not glued to the colon. The prompt and the response
are tokenised SEPARATELY and concatenated, so the prompt's token ids during training are exactly those that
`encode_prompt` gives at generation time: evaluation must build its inputs with `encode_prompt(format_prompt(...))`
and decode only the generated tokens.
"""

from __future__ import annotations

import re
from typing import Any

from h3fusion.data.splits import TrainExample

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (prompt and padding)."""

PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the Alpaca field is called input
    """The Alpaca prompt (the `### Input:` variant when `input` is not blank), ending with "### Response:\\n"."""
    if input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


_PROMPT_PATTERN = re.compile(
    r"### Instruction:\n(?P<instruction>.*?)\n\n(?:### Input:\n(?P<input>.*?)\n\n)?### Response:\n?$", re.S
)


def is_formatted_prompt(prompt: str) -> bool:
    """Whether PROMPT ends in the Alpaca template (as `format_prompt` makes it)."""
    return _PROMPT_PATTERN.search(prompt) is not None


def split_prompt(prompt: str) -> str:
    """The request inside an Alpaca-template prompt (instruction, plus its input after a blank line); a prompt
    that is not in the template is returned as it is."""
    m = _PROMPT_PATTERN.search(prompt)
    if m is None:
        return prompt.strip()
    inp = (m.group("input") or "").strip()
    return m.group("instruction").strip() + (f"\n\n{inp}" if inp else "")


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt token ids with the tokenizer's own special tokens (BOS for Llama-2, none for SmolLM2), never EOS.

    Use this both for training and for generation so both see the same ids."""
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos and eos != tokenizer.bos_token_id:
        ids = ids[:-1]
    return ids


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Response ids followed by EOS (the model learns to stop)."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def truncate(prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Fit prompt + response into max_length, keeping the response's start.

    The response is guaranteed min(len(response), max_length // 2) tokens; the prompt loses tokens from the
    LEFT (its end, next to the answer, matters most), then the response loses tokens from the RIGHT."""
    if len(prompt) + len(response) <= max_length:
        return prompt, response
    keep_prompt = min(len(prompt), max_length - min(len(response), max_length // 2))
    keep_response = min(len(response), max_length - keep_prompt)
    return prompt[len(prompt) - keep_prompt :], response[:keep_response]


def tokenize_example(tokenizer: Any, example: TrainExample, max_length: int) -> dict[str, list[int]] | None:
    """input_ids / attention_mask / labels of one example; labels are -100 on the prompt.

    Returns None when no response token is left (the caller counts and reports those)."""
    prompt = encode_prompt(tokenizer, format_prompt(example.instruction, example.input))
    response = encode_response(tokenizer, example.output)
    prompt, response = truncate(prompt, response, max_length)
    if not response:
        return None
    ids = prompt + response
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [IGNORE_INDEX] * len(prompt) + response,
    }
