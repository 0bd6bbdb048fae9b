"""Likelihood scoring (`HFLanguageModel.continuation_token_logprobs`): the packed, cached scorer gives the
per-token log-probabilities of a naive reference (one plain forward per prompt + continuation, no cache) on
tiny random models, whatever the batching; `h3fusion bench` counts the tokens it must process."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from h3fusion.config import load_profile
from h3fusion.evaluation import lm as lm_module
from h3fusion.evaluation.generate import encode_prompts
from h3fusion.evaluation.lm import HFLanguageModel, shared_prefix_length, split_continuation
from h3fusion.evaluation.mc import mc_prompt
from tests.helpers import random_upcycled_moe


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return load_profile("smoke", {"runs_dir": str(tmp_path_factory.mktemp("runs"))})


@pytest.fixture(scope="module")
def tiny(profile):
    from h3fusion.models import load_base

    model, tok = load_base(profile)
    return HFLanguageModel(model, tok, progress=False)


def naive_token_logprobs(model, tokenizer, prompt: str, continuation: str) -> list[float]:
    """One unbatched forward of prompt + continuation (no cache, no mask), float64 log-softmax."""
    ctx, cont = split_continuation(tokenizer, prompt, continuation)
    if not cont:
        return []
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return [float(logp[len(ctx) - 1 + t, tok]) for t, tok in enumerate(cont)]


def _pairs() -> tuple[list[str], list[str]]:
    """qa6 prompts (a long shared prefix) of different lengths, several continuations each, including an
    empty one, one-token ones and a long one; one prompt appears with a single continuation."""
    qa6 = mc_prompt("qa6")
    short, mid, long = (
        qa6.template("Is the earth flat?"),
        qa6.template("Why is the sea salty, in one short sentence?"),
        qa6.template("What happens to you if you swallow gum, and how long does it stay in your stomach?"),
    )
    long_answer = " " + " ".join(["it stays in the stomach for seven years and then"] * 12)
    prompts = [short, mid, short, long, mid, short, long, mid, short]
    conts = [
        " No, it is round.",
        " Rivers",
        " Yes",
        long_answer,
        "",
        " A",
        " Nothing happens.",
        " Salt",
        " .",
    ]
    return prompts, conts


def _assert_equal_to_naive(lm: HFLanguageModel, prompts: list[str], conts: list[str]) -> None:
    got = lm.continuation_token_logprobs(prompts, conts)
    for p, c, row in zip(prompts, conts, got, strict=True):
        want = naive_token_logprobs(lm.model, lm.tokenizer, p, c)
        assert len(row) == len(want), (p[-40:], c)
        assert np.allclose(row, want, atol=1e-4, rtol=0), (c, np.abs(np.subtract(row, want)).max())


@pytest.mark.parametrize("batch", [(256, 4096), (1, 4096), (3, 4096), (256, 40)])
def test_token_logprobs_equal_a_naive_forward_under_any_batching(tiny, batch):
    """Default batches; one continuation per forward; three; a token budget that puts one row per forward."""
    size, tokens = batch
    lm = HFLanguageModel(
        tiny.model, tiny.tokenizer, logprob_batch_size=size, logprob_batch_tokens=tokens, progress=False
    )
    _assert_equal_to_naive(lm, *_pairs())


def test_token_logprobs_equal_a_naive_forward_without_the_shared_prefix_and_split_rows(tiny, monkeypatch):
    """Prompts with no common prefix (Alpaca template vs plain text), and rows split at a small row size."""
    from h3fusion.data import format_prompt

    monkeypatch.setattr(lm_module, "ROW_TOKENS", 6)
    prompts = [
        format_prompt("Name a colour."),
        "Plain text prompt without a template",
        format_prompt("Hi"),
    ] * 2
    conts = [" Blue.", " and more words follow here", "Hello there, how are you", "Red", " x", ""]
    _assert_equal_to_naive(tiny, prompts, conts)
    plain = HFLanguageModel(tiny.model, tiny.tokenizer, share_prompt_prefix=False, progress=False)
    _assert_equal_to_naive(plain, *_pairs())


def test_token_logprobs_with_eager_attention(tiny):
    """The 4D mask is additive (0 / dtype min), so the eager attention path gives the same numbers as sdpa."""
    model = copy.deepcopy(tiny.model)
    model.set_attn_implementation("eager")
    _assert_equal_to_naive(HFLanguageModel(model, tiny.tokenizer, progress=False), *_pairs())


def test_token_logprobs_on_the_moe_model_equal_a_naive_forward(profile, tiny):
    moe = random_upcycled_moe(profile, len(tiny.tokenizer))
    _assert_equal_to_naive(HFLanguageModel(moe, tiny.tokenizer, progress=False), *_pairs())


def test_sums_and_edge_cases(tiny):
    prompts, conts = _pairs()
    sums = tiny.continuation_logprobs(prompts, conts)
    tokens = tiny.continuation_token_logprobs(prompts, conts)
    assert sums == pytest.approx([sum(t) for t in tokens])
    assert tokens[conts.index("")] == []
    assert tiny.continuation_token_logprobs([], []) == []
    with pytest.raises(ValueError, match="empty prompt"):
        tiny.continuation_token_logprobs(["", "x"], ["a", "b"])
    with pytest.raises(ValueError, match="one per pair"):
        tiny.continuation_token_logprobs(["x"], ["a", "b"])


def test_bench_counts_prompt_tails_once_and_every_continuation_token(tiny):
    """`h3fusion bench`'s scored-token count (the plain forward's tokens) is what the scorer must process."""
    from h3fusion import bench_likelihood as bl

    prompts, conts = _pairs()
    distinct = list(dict.fromkeys(prompts))
    encoded = encode_prompts(tiny.tokenizer, distinct)
    skip = shared_prefix_length(encoded)
    assert skip >= lm_module.MIN_SHARED_PREFIX_TOKENS
    cont_tokens = sum(
        len(split_continuation(tiny.tokenizer, p, c)[1]) for p, c in zip(prompts, conts, strict=True)
    )
    assert (
        bl.scored_tokens(tiny.tokenizer, prompts, conts) == sum(len(e) - skip for e in encoded) + cont_tokens
    )
    bl.plain_forward(tiny.model, tiny.tokenizer, prompts, conts, batch_tokens=64)  # runs, any batch size
