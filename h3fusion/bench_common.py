"""What every section of `h3fusion bench` shares: the benchmarked model configs, how much to run, interleaved
timing, and random expert adapters upcycled into a fused model (on the meta device for parameter counts)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from h3fusion.config import Profile

SMOLLM2_CONFIG: dict[str, Any] = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
)
"""HuggingFaceTB/SmolLM2-135M-Instruct's config (the cpu profile's base)."""

LLAMA2_7B_CONFIG: dict[str, Any] = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    tie_word_embeddings=False,
)
"""meta-llama/Llama-2-7b-hf's config (its parameter count is computed on the meta device)."""

MODEL_CONFIGS: dict[str, dict[str, Any]] = {"smollm2": SMOLLM2_CONFIG, "llama2_7b": LLAMA2_7B_CONFIG}

LAYER_SHAPES: dict[str, tuple[int, int]] = {
    name: (cfg["hidden_size"], cfg["intermediate_size"]) for name, cfg in MODEL_CONFIGS.items()
}
"""(hidden, FFN) widths of the benchmarked layers: SmolLM2-135M and LLaMA-2-7B, read from their configs."""


@dataclass(frozen=True)
class Plan:
    """How much to run: the full benchmark or the --quick end-to-end check."""

    profile: str
    tokens: dict[str, int]
    warmup: int
    repeats: int
    step_repeats: int
    gen_repeats: int
    lik_questions: int = 24
    lik_repeats: int = 3


def make_plan(quick: bool) -> Plan:
    if quick:
        return Plan(
            "smoke",
            {"smollm2": 64, "llama2_7b": 8},
            warmup=1,
            repeats=2,
            step_repeats=2,
            gen_repeats=1,
            lik_questions=4,
            lik_repeats=1,
        )
    return Plan("cpu", {"smollm2": 0, "llama2_7b": 256}, warmup=2, repeats=7, step_repeats=5, gen_repeats=3)


def interleaved_medians(
    candidates: dict[str, Callable[[], Any]], warmup: int, repeats: int, desc: str = ""
) -> dict[str, float]:
    """Median seconds of each candidate; each round runs all of them, in a rotating order."""
    from tqdm.auto import tqdm

    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in tqdm(range(repeats), desc=desc or "timing", leave=False):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    return {n: statistics.median(t) for n, t in times.items()}


def random_adapters(config: Any, num: int, rank: int, device: str = "meta") -> list[Any]:
    """One rank-r LoRA on every FFN projection of every layer per expert (values irrelevant on meta)."""
    from h3fusion.moe.low_rank import PROJECTIONS, projection_shapes
    from h3fusion.moe.upcycle import ExpertAdapter

    shapes = projection_shapes(config.hidden_size, config.intermediate_size)
    gen = torch.Generator().manual_seed(num)
    adapters = []
    for e in range(num):
        factors = {}
        for layer in range(config.num_hidden_layers):
            for p in PROJECTIONS:
                out_f, in_f = shapes[p]
                if device == "meta":
                    a, b = torch.empty(rank, in_f, device="meta"), torch.empty(out_f, rank, device="meta")
                else:
                    a = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
                    b = torch.randn(out_f, rank, generator=gen) * 0.01
                factors[(layer, p)] = (a, b)
        adapters.append(ExpertAdapter(name=f"expert{e}", scale=1.0, factors=factors))
    return adapters


def fuse_random(model: Any, profile: Profile, storage: str, adapters: list[Any]) -> Any:
    """The model upcycled with `adapters` as the profile's fusion would (k, seed), without progress bars."""
    from h3fusion.moe import upcycle

    return upcycle(
        model, adapters, top_k=profile.fusion.top_k, storage=storage, seed=profile.seed, show_progress=False
    )
