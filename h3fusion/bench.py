"""`h3fusion bench`: what the fused model costs next to the dense one, measured in one process.

Five measurements, each reported as a ratio (fused / dense) of medians taken in the same run, the
dense and fused candidates interleaved run by run so that load from other processes on the machine
hits both alike:

1. the MoE FFN layer vs the dense FFN at the same token count, at SmolLM2-135M and LLaMA-2-7B layer
   widths (random weights; the token count is cut to fit a CPU, the widths are kept):
   * ``fwd`` (inference): the upcycled MoE (E experts = base + rank-r LoRA delta each, top-k) vs the
     plain dense SwiGLU FFN, under ``torch.no_grad``;
   * ``fwd_bwd`` (fusion training): the MoE with its trainable fusion LoRA (rank from the profile) and
     router, base and expert deltas frozen, vs the dense FFN with a trainable peft LoRA of the same rank
     on gate/up/down, base frozen; both get an input that requires grad (as every layer but the first
     does in training), backward from a fixed random output gradient;
2. parameter bytes of the whole fused model (both storages) vs its dense base, counted exactly on
   the meta device (no memory) for the SmolLM2 config and the LLaMA-2-7B config;
3. one fusion training step (delta storage: forward, LM + gating + drift loss, backward, AdamW) vs
   one dense LoRA step (the experts' LoRA on the same base: forward, LM loss, backward, AdamW) on the
   same batch size and sequence length (the profile's fusion batch);
4. batched greedy generation tokens/s of the fused (raw, upcycled) model vs the dense base;
5. the wall time per stage of the cpu profile's pipeline and book, read from the manifests;
6. likelihood scoring (`h3fusion.bench_likelihood`): the scorer's tokens/s vs a plain batched forward of the
   same tokens, dense and fused, and one two-thread process vs two one-thread processes.

Sections 1-2 live in `h3fusion.bench_ffn`, 6 in `h3fusion.bench_likelihood`, the token ensemble in
`h3fusion.bench_ensemble`, what they share in `h3fusion.bench_common`; this module runs them and reports.

``--quick`` runs the tiny random model (smoke profile) and few tokens/repeats: it checks that the
command works end to end, its numbers are not meaningful. Targets come from issues 7 and 17;
``--json PATH`` writes every measurement and every ratio with its target and whether it holds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from h3fusion import bench_ensemble, bench_ffn, bench_likelihood
from h3fusion.bench_common import (
    Plan,
    fuse_random,
    interleaved_medians,
    make_plan,
    random_adapters,
)
from h3fusion.config import PROJECT_ROOT, Profile, load_profile
from h3fusion.errors import H3FusionError

TARGETS: dict[str, tuple[str, float]] = {
    "ffn.llama2_7b.delta.fwd": ("<=", 1.15),
    "ffn.llama2_7b.delta.fwd_bwd": ("<=", 1.2),
    "ffn.smollm2.delta.fwd_bwd": ("<=", 1.3),
    "params.llama2_7b.delta": ("<=", 1.05),
    "params.smollm2.delta": ("<=", 1.05),
    "train_step.fusion_vs_dense_lora": ("<=", 1.2),
    "generation.delta_vs_dense": (">=", 0.95),
    "book.total_min": ("<=", 90.0),
    **bench_likelihood.TARGETS,
    **bench_ensemble.TARGETS,
}
"""Issue 7's and 17's targets; every other ratio is reported without one."""


# ---------------------------------------------------------------------------------------------- 3. training step


def _batch(profile: Profile, vocab: int, num_experts: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(profile.seed)
    shape = (profile.fusion.train.batch_size, profile.data.max_length)
    ids = torch.randint(0, vocab, shape, generator=gen)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids.clone(),
        "task_labels": torch.randint(0, num_experts, (shape[0],), generator=gen),
    }


def bench_train_step(profile: Profile, plan: Plan, base: Any) -> dict[str, Any]:
    """One fusion step (delta storage, the profile's fusion setting) vs one dense LoRA step (experts' LoRA)."""
    from peft import LoraConfig, get_peft_model

    from h3fusion.fusion import prepare_for_training
    from h3fusion.fusion_objective import fusion_losses, total_loss

    lora = profile.experts.lora
    dense = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=list(lora.target_modules),
        ),
    )
    adapters = random_adapters(base.config, profile.num_experts, lora.r, device="cpu")
    moe = fuse_random(copy.deepcopy(base), profile, "delta", adapters)
    prepare_for_training(moe, profile)
    dense.train()
    moe.train()
    batch = _batch(profile, base.config.vocab_size, moe.num_experts)
    lm_batch = {k: v for k, v in batch.items() if k != "task_labels"}
    no_template = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)  # random tokens: no template
    opt_dense = torch.optim.AdamW(
        [p for p in dense.parameters() if p.requires_grad], lr=profile.fusion.train.lr
    )
    opt_moe = torch.optim.AdamW([p for p in moe.parameters() if p.requires_grad], lr=profile.fusion.train.lr)

    def dense_step() -> None:
        opt_dense.zero_grad(set_to_none=True)
        dense(**lm_batch).loss.backward()
        opt_dense.step()

    def fusion_step() -> None:
        opt_moe.zero_grad(set_to_none=True)
        out = moe(**lm_batch, output_router_logits=True)
        total_loss(fusion_losses(moe, out, batch, profile, no_template), profile).backward()
        opt_moe.step()

    med = interleaved_medians(
        {"dense_lora": dense_step, "fusion": fusion_step}, 1, plan.step_repeats, "training step"
    )
    return {
        "batch_size": batch["input_ids"].shape[0],
        "seq_len": batch["input_ids"].shape[1],
        "dense_lora_s": med["dense_lora"],
        "fusion_s": med["fusion"],
        "ratio": med["fusion"] / med["dense_lora"],
    }


# ---------------------------------------------------------------------------------------------- 4. generation


def bench_generation(profile: Profile, plan: Plan, base: Any) -> dict[str, Any]:
    """Batched greedy decoding (the evaluation's batch size and new tokens) of fused vs dense models."""
    gen_cfg = profile.evaluation.generation
    adapters = random_adapters(base.config, profile.num_experts, profile.experts.lora.r, device="cpu")
    models = {"dense": base}
    for storage in ("delta", "materialised"):
        models[storage] = fuse_random(copy.deepcopy(base), profile, storage, adapters).eval()
    gen = torch.Generator().manual_seed(profile.seed)
    prompt_len = min(32, profile.data.max_length)
    ids = torch.randint(0, base.config.vocab_size, (gen_cfg.batch_size, prompt_len), generator=gen)
    pad = base.generation_config.pad_token_id
    kwargs = dict(
        max_new_tokens=gen_cfg.max_new_tokens,
        min_new_tokens=gen_cfg.max_new_tokens,  # every model generates the same number of tokens
        do_sample=False,
        pad_token_id=pad if pad is not None else 0,
    )

    def generate(model: Any, new_tokens: int = gen_cfg.max_new_tokens) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    **{**kwargs, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens},
                )

        return run

    for model in models.values():  # a short warm-up instead of a whole extra round
        generate(model, min(4, gen_cfg.max_new_tokens))()
    med = interleaved_medians({n: generate(m) for n, m in models.items()}, 0, plan.gen_repeats, "generation")
    new_tokens = gen_cfg.batch_size * gen_cfg.max_new_tokens
    return {
        "batch_size": gen_cfg.batch_size,
        "prompt_len": prompt_len,
        "new_tokens": gen_cfg.max_new_tokens,
        **{f"{n}_tok_s": new_tokens / s for n, s in med.items()},
        "delta_ratio": med["dense"] / med["delta"],
        "materialised_ratio": med["dense"] / med["materialised"],
    }


# ---------------------------------------------------------------------------------------------- 5. book


def _manifests(run_dir: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(run_dir.rglob("manifest.json")) if run_dir.is_dir() else []:
        if any(part.startswith(".") or ".tmp-" in part for part in path.relative_to(run_dir).parts):
            continue
        try:
            yield str(path.parent.relative_to(run_dir)), json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue


def book_times(profile: Profile, book_dir: Path) -> dict[str, Any]:
    """Stage wall times (s) from the profile's manifests (`reproducibility.artifact_seconds`: an evaluation's phases
    included), the notebooks' latest wall times, and the total of the last batch that ran every notebook from an
    empty runs folder (the budget; a resumed batch costs less)."""
    from h3fusion.notebooks import FROM_SCRATCH, wall_times_path
    from h3fusion.reproducibility import artifact_seconds

    stages = {name: artifact_seconds(m) for name, m in _manifests(profile.run_dir)}
    data: dict[str, Any] = {}
    path = wall_times_path(book_dir, profile.name)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            data = {}
    notebooks = {k: v.get("wall_s") for k, v in data.get("notebooks", {}).items() if isinstance(v, dict)}
    scratch = data.get(FROM_SCRATCH) or {}
    expected = sorted(path.stem for path in (PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    ran = scratch.get("notebooks", {})
    return {
        "profile": profile.name,
        "stages_s": stages,
        "notebooks_s": notebooks,
        "from_scratch_s": ran,
        "total_s": scratch.get("total_wall_s"),
        "commit": scratch.get("commit"),
        "complete": bool(ran) and all(name in ran for name in expected),  # every notebook, from scratch
    }


# ---------------------------------------------------------------------------------------------- report


def ratios(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every ratio with its target (if any) and whether it holds (None when not measured)."""
    values: dict[str, float | None] = {}
    for row in results["ffn"]:
        values[f"ffn.{row['shape']}.{row['storage']}.{row['mode']}"] = row["ratio"]
    for row in results["params"]:
        values[f"params.{row['model']}.{row['storage']}"] = row["ratio"]
    values["train_step.fusion_vs_dense_lora"] = results["train_step"]["ratio"]
    values["generation.delta_vs_dense"] = results["generation"]["delta_ratio"]
    values["generation.materialised_vs_dense"] = results["generation"]["materialised_ratio"]
    total = results["book"]["total_s"]
    values["book.total_min"] = None if total is None else total / 60
    lik = results.get("likelihood")
    if lik is not None:
        for model in ("dense", "moe"):
            values[f"likelihood.{model}.scorer_vs_plain_forward"] = lik[model]["ratio"]
        values["likelihood.threads.two_processes_vs_two_threads"] = lik["threads"]["ratio"]
    ens = results.get("ensemble")
    if ens is not None:
        for prefix, regime in (("ensemble", ens), ("ensemble.batch1", ens["batch1"])):
            for key in bench_ensemble.RATIOS:
                values[f"{prefix}.{key}"] = regime[key]
    out = {}
    for key, value in values.items():
        op, target = TARGETS.get(key, (None, None))
        holds = None
        partial = key == "book.total_min" and not results["book"].get("complete", False)
        if op is not None and value is not None and not partial:
            holds = value <= target if op == "<=" else value >= target
        out[key] = {"value": value, "target": None if op is None else f"{op} {target}", "holds": holds}
    return out


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "not run yet"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def print_report(results: dict[str, Any]) -> None:
    m = results["meta"]
    print(
        f"\nh3fusion bench ({'quick' if m['quick'] else 'full'}; profile {m['profile']}; "
        f"torch {m['torch']}, {m['threads']} threads, {m['cpu']})"
    )
    print("\n1. MoE FFN vs dense FFN (ms, medians; fwd = inference, fwd_bwd = fusion vs dense-LoRA training)")
    print(f"{'shape':<10}{'tokens':>7} {'storage':<13}{'mode':<8}{'dense':>10}{'moe':>10}{'ratio':>8}")
    for r in results["ffn"]:
        print(
            f"{r['shape']:<10}{r['tokens']:>7} {r['storage']:<13}{r['mode']:<8}"
            f"{r['dense_ms']:>10.2f}{r['moe_ms']:>10.2f}{r['ratio']:>8.2f}"
        )
    print("\n2. Parameter bytes (GB)")
    for r in results["params"]:
        print(
            f"{r['model']:<10} {r['storage']:<13} dense {r['dense_gb']:.3f}  fused {r['fused_gb']:.3f}  "
            f"ratio {r['ratio']:.3f}"
        )
    t = results["train_step"]
    print(
        f"\n3. Training step (batch {t['batch_size']} x {t['seq_len']} tokens): dense LoRA {t['dense_lora_s']:.3f} s, "
        f"fusion {t['fusion_s']:.3f} s, ratio {t['ratio']:.2f}"
    )
    g = results["generation"]
    print(
        f"\n4. Greedy generation (batch {g['batch_size']}, {g['new_tokens']} new tokens): dense "
        f"{g['dense_tok_s']:.1f} tok/s, delta {g['delta_tok_s']:.1f} tok/s, materialised "
        f"{g['materialised_tok_s']:.1f} tok/s"
    )
    b = results["book"]
    print(f"\n5. Wall times of the {b['profile']} profile (s; an evaluation: its phases as first computed)")
    if not b["stages_s"] and not b["notebooks_s"]:
        print("   not run yet")
    for name, s in {**b["stages_s"], **{f"notebook {k}": v for k, v in b["notebooks_s"].items()}}.items():
        print(f"   {name:<50}{_fmt(s, 1):>12}")
    partial = "" if b.get("complete") or b["total_s"] is None else "  (partial: not every notebook ran yet)"
    print(f"   {'total (notebooks)':<50}{_fmt(b['total_s'], 1):>12}{partial}")
    if "likelihood" in results:
        bench_likelihood.print_section(results["likelihood"])
    if "ensemble" in results:
        bench_ensemble.print_section(results["ensemble"])
    print("\nRatios and targets")
    for key, r in results["ratios"].items():
        holds = {True: "holds", False: "MISSED", None: "-" if r["target"] is None else "not run yet"}[
            r["holds"]
        ]
        print(f"   {key:<48}{_fmt(r['value'], 3):>12}  {r['target'] or '':<9} {holds}")


def run_bench(args: argparse.Namespace) -> None:
    """`h3fusion bench [--quick] [--json PATH]`."""
    from h3fusion.models import load_base

    quick = bool(getattr(args, "quick", False))
    plan = make_plan(quick)
    profile = load_profile(plan.profile)
    cpu_profile = load_profile("cpu")
    json_out = getattr(args, "json_out", None)
    if json_out and Path(json_out).is_dir():
        raise H3FusionError(f"--json {json_out} is a folder; give a file path, e.g. bench.json")
    threads = os.environ.get("H3FUSION_BENCH_THREADS")
    if threads:  # on a loaded machine, 1 thread gives steadier ratios than oversubscribed threads
        if not threads.isdigit() or int(threads) < 1:
            raise H3FusionError(f"H3FUSION_BENCH_THREADS={threads!r} must be a positive integer")
        torch.set_num_threads(int(threads))
    torch.manual_seed(profile.seed)
    results: dict[str, Any] = {
        "meta": {
            "quick": quick,
            "profile": profile.name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "plan": plan.__dict__,
        }
    }
    print("[bench] 1/7 MoE FFN layer")
    results["ffn"] = bench_ffn.bench_ffn(profile, plan)
    base, tokenizer = load_base(profile)
    print("[bench] 2/7 parameter bytes")
    results["params"] = bench_ffn.bench_params(profile, bench_ffn.param_configs())
    print("[bench] 3/7 training step")
    results["train_step"] = bench_train_step(profile, plan, base)
    print("[bench] 4/7 generation")
    results["generation"] = bench_generation(profile, plan, base)
    print("[bench] 5/7 book wall times")
    results["book"] = book_times(cpu_profile, PROJECT_ROOT / "book")
    print("[bench] 6/7 likelihood scoring")
    results["likelihood"] = bench_likelihood.bench_likelihood(profile, plan, base, tokenizer)
    print("[bench] 7/7 token ensemble generation")
    results["ensemble"] = bench_ensemble.bench_ensemble(profile, plan, base, tokenizer)
    results["ratios"] = ratios(results)
    print_report(results)
    if json_out:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\n[bench] results written to {path}")
