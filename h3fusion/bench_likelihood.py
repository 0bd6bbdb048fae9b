"""`h3fusion bench`, likelihood scoring: the scorer's tokens/s against a plain batched forward of the same tokens.

The scorer (`HFLanguageModel.continuation_token_logprobs`, behind TruthfulQA MC1/MC2 and the token ensemble)
must process, per call, each distinct prompt's tokens after the shared prefix and every continuation token.
Its limit is a plain batched forward (no cache, logits at every position) of exactly those tokens: one row
per prompt, its tail then all its continuations, rows sorted by length. The ratio scorer tok/s / plain
tok/s has the target >= 0.8 (issue 17). The workload is TruthfulQA-shaped (the qa6 6-shot prompt; about 12
choices of 2-30 tokens per question) but synthetic, so the bench needs no data set.

It also compares one process with two threads against two one-thread processes splitting the same work.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from h3fusion.evaluation.mc import QA6_PRIMER

TARGETS: dict[str, tuple[str, float]] = {
    "likelihood.dense.scorer_vs_plain_forward": (">=", 0.8),
    "likelihood.moe.scorer_vs_plain_forward": (">=", 0.8),
}
"""Issue 17's target: the scorer within 80% of the forward-pass limit."""

_WORDS = tuple(sorted(set(re.findall(r"[A-Za-z]+", QA6_PRIMER))))
"""Words the synthetic questions and choices are made of."""


def mc_workload(
    questions: Sequence[Any], prompt_fn: Callable[[str], str], separator: str
) -> tuple[list[str], list[str]]:
    """The (prompt, continuation) pairs `score_mc` scores for `questions` (each distinct pair once)."""
    pairs = dict.fromkeys(
        (prompt_fn(q.question), separator + c) for q in questions for c in (*q.mc1_choices, *q.mc2_choices)
    )
    return [p for p, _ in pairs], [c for _, c in pairs]


def synthetic_mc_workload(questions: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """TruthfulQA-shaped pairs: qa6 prompts with 6-16-word questions, 5-9 distinct choices of 1-14 words
    (the cpu profile's 409 questions: about 7 distinct choices and 85 scored tokens per question)."""
    from h3fusion.evaluation.mc import mc_prompt

    rng = random.Random(seed)
    fmt = mc_prompt("qa6")
    prompts, conts = [], []
    for q in range(questions):
        words = rng.sample(_WORDS, rng.randint(6, 16))
        prompt = fmt.template(f"{q} {' '.join(words)}?")
        for _ in range(rng.randint(5, 9)):
            prompts.append(prompt)
            conts.append(fmt.separator + " ".join(rng.choices(_WORDS, k=rng.randint(1, 14))) + ".")
    return prompts, conts


def _rows(tokenizer: Any, prompts: list[str], conts: list[str]) -> list[list[int]]:
    """Per distinct prompt: its tokens after the shared prefix, then all its continuations' tokens."""
    from h3fusion.evaluation.generate import encode_prompts
    from h3fusion.evaluation.lm import shared_prefix_length

    groups: dict[str, list[int]] = {}
    for p, c in zip(prompts, conts, strict=True):
        groups.setdefault(p, []).extend(tokenizer(c, add_special_tokens=False)["input_ids"])
    encoded = encode_prompts(tokenizer, list(groups))
    skip = shared_prefix_length(encoded)
    return [e[skip:] + c for e, c in zip(encoded, groups.values(), strict=True)]


def scored_tokens(tokenizer: Any, prompts: list[str], conts: list[str]) -> int:
    """The tokens the scorer must process: distinct prompts' tokens after the shared prefix + continuations."""
    return sum(len(r) for r in _rows(tokenizer, prompts, conts))


def plain_forward(
    model: Any, tokenizer: Any, prompts: list[str], conts: list[str], batch_tokens: int = 4096
) -> None:
    """The limit: a plain batched forward of the scored tokens (length-sorted rows, right-padded)."""
    from h3fusion.evaluation.generate import length_sorted_batches

    rows = _rows(tokenizer, prompts, conts)
    longest = max(len(r) for r in rows)
    with torch.inference_mode():
        for batch in length_sorted_batches([len(r) for r in rows], max(1, batch_tokens // longest)):
            width = max(len(rows[i]) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for b, i in enumerate(batch):
                ids[b, : len(rows[i])] = torch.tensor(rows[i])
                mask[b, : len(rows[i])] = 1
            model(input_ids=ids, attention_mask=mask)


def _scorer(model: Any, tokenizer: Any, prompts: list[str], conts: list[str]) -> Callable[[], Any]:
    from h3fusion.evaluation.lm import HFLanguageModel

    lm = HFLanguageModel(model, tokenizer, progress=False)
    return lambda: lm.continuation_token_logprobs(prompts, conts)


def bench_likelihood(profile: Any, plan: Any, base: Any, tokenizer: Any) -> dict[str, Any]:
    """Scorer vs plain forward tok/s (medians, interleaved) on the dense base and on a fused MoE of random
    adapters (delta storage), then the thread comparison."""
    import copy

    from h3fusion.bench_common import fuse_random, interleaved_medians, random_adapters

    prompts, conts = synthetic_mc_workload(plan.lik_questions, profile.seed)
    tokens = scored_tokens(tokenizer, prompts, conts)
    adapters = random_adapters(base.config, profile.num_experts, profile.experts.lora.r, device="cpu")
    models = {"dense": base, "moe": fuse_random(copy.deepcopy(base), profile, "delta", adapters).eval()}
    out: dict[str, Any] = {"questions": plan.lik_questions, "pairs": len(prompts), "tokens": tokens}
    for name, model in models.items():
        med = interleaved_medians(
            {
                "scorer": _scorer(model, tokenizer, prompts, conts),
                "plain": lambda m=model: plain_forward(m, tokenizer, prompts, conts),
            },
            1,
            plan.lik_repeats,
            f"likelihood {name}",
        )
        out[name] = {
            "scorer_tok_s": tokens / med["scorer"],
            "plain_tok_s": tokens / med["plain"],
            "ratio": med["plain"] / med["scorer"],
        }
    out["threads"] = bench_threads(profile.name, plan.lik_questions, profile.seed)
    return out


def print_section(lik: dict[str, Any]) -> None:
    """Section 6 of the bench report."""
    print(
        f"\n6. Likelihood scoring ({lik['questions']} TruthfulQA-shaped questions, {lik['pairs']} pairs, "
        f"{lik['tokens']} scored tokens; plain = batched forward of the same tokens)"
    )
    for model in ("dense", "moe"):
        r = lik[model]
        print(
            f"   {model:<6} scorer {r['scorer_tok_s']:8.1f} tok/s  plain {r['plain_tok_s']:8.1f} tok/s  "
            f"ratio {r['ratio']:.2f}"
        )
    t = lik["threads"]
    print(
        f"   same work: one process x 2 threads {t['one_process_two_threads_s']:.2f} s, two processes x 1 "
        f"thread {t['two_processes_one_thread_s']:.2f} s (ratio {t['ratio']:.2f}; > 1: processes win)"
    )


# ---------------------------------------------------------------------------------------------- threads


def bench_threads(profile_name: str, questions: int, seed: int) -> dict[str, Any]:
    """Wall time of the scorer on the same work: one process with two torch threads vs two one-thread
    processes each scoring half the questions, all started after their model is loaded and warmed up.

    ratio = one-process time / two-process time: above 1, two one-thread processes get more done.
    """
    one = _run_workers(profile_name, questions, seed, [(2, 0, 1)])
    two = _run_workers(profile_name, questions, seed, [(1, 0, 2), (1, 1, 2)])
    return {
        "one_process_two_threads_s": one,
        "two_processes_one_thread_s": two,
        "ratio": one / two,
        "cpu_count": os.cpu_count(),
    }


def _run_workers(profile_name: str, questions: int, seed: int, workers: list[tuple[int, int, int]]) -> float:
    """Seconds from the common start signal until every (threads, part, parts) worker has scored its part."""
    procs = []
    for threads, part, parts in workers:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        cmd = [sys.executable, "-m", "h3fusion.bench_likelihood", profile_name, str(questions), str(seed)]
        cmd += [str(threads), str(part), str(parts)]
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True))
    try:
        for proc in procs:  # each loads its model and warms up, then says so
            if proc.stdout is None or proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a bench worker failed before it was ready")
        start = time.perf_counter()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "done":
                raise RuntimeError("a bench worker failed while scoring")
        return time.perf_counter() - start
    finally:
        for proc in procs:
            proc.communicate(timeout=60)


def _worker(profile_name: str, questions: int, seed: int, threads: int, part: int, parts: int) -> None:
    """Scores questions part, part + parts, ... of the workload when told to ("go" on stdin)."""
    from h3fusion.config import load_profile
    from h3fusion.models import load_base

    torch.set_num_threads(threads)
    model, tokenizer = load_base(load_profile(profile_name))
    prompts, conts = synthetic_mc_workload(questions, seed)
    order = list(dict.fromkeys(prompts))
    mine = {p for q, p in enumerate(order) if q % parts == part}
    pairs = [(p, c) for p, c in zip(prompts, conts, strict=True) if p in mine]
    score = _scorer(model, tokenizer, [p for p, _ in pairs], [c for _, c in pairs])
    score()  # warm-up
    print("ready", flush=True)
    sys.stdin.readline()
    score()
    print("done", flush=True)


if __name__ == "__main__":
    name, n, s, t, i, k = sys.argv[1:7]
    _worker(name, int(n), int(s), int(t), int(i), int(k))
