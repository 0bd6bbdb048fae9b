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

``--quick`` runs the tiny random model (smoke profile) and few tokens/repeats: it checks that the
command works end to end, its numbers are not meaningful. Targets come from issues 7 and 17;
``--json PATH`` writes every measurement and every ratio with its target and whether it holds.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from h3fusion import bench_ensemble, bench_likelihood
from h3fusion.config import PROJECT_ROOT, Profile, load_profile
from h3fusion.errors import H3FusionError

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


# ---------------------------------------------------------------------------------------------- timing


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


# ---------------------------------------------------------------------------------------------- 1. FFN layer


class _Mlp(nn.Module):
    """transformers' LlamaMLP (the dense FFN) with given weights."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP

        super().__init__()
        cfg = LlamaConfig(hidden_size=gate.shape[1], intermediate_size=gate.shape[0], hidden_act="silu")
        with torch.device("meta"):
            self.mlp = LlamaMLP(cfg)
        for name, w in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
            getattr(self.mlp, name).weight = nn.Parameter(w, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def _ffn_pair(
    hidden: int, ffn: int, profile: Profile, seed: int
) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Random base FFN weights, per-expert rank-r deltas (A, B) for each projection, a router weight."""
    from h3fusion.moe.layer import projection_shapes

    gen = torch.Generator().manual_seed(seed)
    num, r = len(profile.tasks), profile.experts.lora.r
    shapes = projection_shapes(hidden, ffn)
    base = {p: torch.randn(shape, generator=gen) / math.sqrt(shape[1]) for p, shape in shapes.items()}
    deltas = [torch.randn(num, r, shapes[p][1], generator=gen) / math.sqrt(shapes[p][1]) for p in shapes] + [
        torch.randn(num, shapes[p][0], r, generator=gen) * 0.01 for p in shapes
    ]
    router = torch.randn(num, hidden, generator=gen) * 0.02
    return base, deltas, router


def _moe_layer(
    storage: str,
    base: dict[str, torch.Tensor],
    deltas: list[torch.Tensor],
    router: torch.Tensor,
    profile: Profile,
) -> nn.Module:
    """An upcycled MoE layer sharing the dense base tensors (delta) or holding base + delta (materialised)."""
    from h3fusion.moe.layer import PROJECTIONS, MoEFeedForward

    f, d = base["gate_proj"].shape
    num, r = router.shape[0], deltas[0].shape[1]
    moe = MoEFeedForward(d, f, num, profile.fusion.top_k, storage, delta_rank=r)  # type: ignore[arg-type]
    moe.router.weight = nn.Parameter(router.clone())
    a_of, b_of = (
        dict(zip(PROJECTIONS, deltas[:3], strict=True)),
        dict(zip(PROJECTIONS, deltas[3:], strict=True)),
    )
    with torch.no_grad():
        for p in PROJECTIONS:
            if storage == "delta":
                moe.register_parameter(f"base_{p}", nn.Parameter(base[p], requires_grad=False))
                assert moe.expert_deltas is not None
                moe.expert_deltas.A[p].copy_(a_of[p])
                moe.expert_deltas.B[p].copy_(b_of[p])
            else:
                setattr(moe, p, nn.Parameter(base[p] + torch.bmm(b_of[p], a_of[p]), requires_grad=False))
    return moe


def _train_setting(module: nn.Module, profile: Profile, dense: bool) -> nn.Module:
    """Fusion training (MoE: fusion LoRA + router trainable) or dense LoRA training (peft LoRA on the FFN)."""
    lora = profile.fusion.lora
    # a copy that shares the frozen weight tensors (peft wraps Linear modules in place)
    module = copy.deepcopy(module, memo={id(p): p for p in module.parameters() if not p.requires_grad})
    if dense:
        from peft import LoraConfig, inject_adapter_in_model

        module.requires_grad_(False)
        cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules))
        inject_adapter_in_model(cfg, module)
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
        return module
    module.add_fusion_lora(lora.r, lora.alpha, lora.target_modules)
    module.requires_grad_(False)
    module.router.requires_grad_(True)
    module.fusion_lora.requires_grad_(True)
    return module


def _fwd(module: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def run() -> None:
        with torch.no_grad():
            module(x)

    return run


def _fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], Any]:
    params = [p for p in module.parameters() if p.requires_grad]

    def run() -> None:
        for p in (*params, x):
            p.grad = None
        module(x).backward(grad)

    return run


def bench_ffn(profile: Profile, plan: Plan) -> list[dict[str, Any]]:
    """MoE FFN (delta, materialised) vs dense FFN, fwd and fwd+bwd, at each layer shape."""
    rows = []
    for shape_name, (hidden, ffn) in LAYER_SHAPES.items():
        tokens = plan.tokens[shape_name] or profile.fusion.train.batch_size * profile.data.max_length
        base, deltas, router = _ffn_pair(hidden, ffn, profile, profile.seed)
        dense = _Mlp(base["gate_proj"], base["up_proj"], base["down_proj"])
        moes = {s: _moe_layer(s, base, deltas, router, profile) for s in ("delta", "materialised")}
        gen = torch.Generator().manual_seed(profile.seed + 1)
        x = torch.randn(tokens, hidden, generator=gen)
        x_grad = x.clone().requires_grad_(True)
        grad = torch.randn(tokens, hidden, generator=gen)
        fwd = interleaved_medians(
            {"dense": _fwd(dense, x), **{s: _fwd(m, x) for s, m in moes.items()}},
            plan.warmup,
            plan.repeats,
            f"FFN {shape_name} fwd",
        )
        trained = {"dense": _train_setting(dense, profile, dense=True)}
        trained.update({s: _train_setting(m, profile, dense=False) for s, m in moes.items()})
        fwd_bwd = interleaved_medians(
            {n: _fwd_bwd(m, x_grad, grad) for n, m in trained.items()},
            plan.warmup,
            plan.repeats,
            f"FFN {shape_name} fwd+bwd",
        )
        for mode, med in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            for storage in moes:
                rows.append(
                    {
                        "shape": shape_name,
                        "hidden": hidden,
                        "ffn": ffn,
                        "tokens": tokens,
                        "experts": router.shape[0],
                        "top_k": profile.fusion.top_k,
                        "storage": storage,
                        "mode": mode,
                        "dense_ms": 1e3 * med["dense"],
                        "moe_ms": 1e3 * med[storage],
                        "ratio": med[storage] / med["dense"],
                    }
                )
        del dense, moes, trained, base, deltas
    return rows


# ---------------------------------------------------------------------------------------------- 2. parameters


def _param_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameters and buffers (shared tensors counted once; works on meta)."""
    seen: dict[int, int] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen.setdefault(id(t), t.numel() * t.element_size())
    return sum(seen.values())


def _random_adapters(config: Any, num: int, rank: int, device: str = "meta") -> list[Any]:
    """One rank-r LoRA on every FFN projection of every layer per expert (values irrelevant on meta)."""
    from h3fusion.moe.layer import PROJECTIONS, projection_shapes
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


def _fuse(model: Any, profile: Profile, storage: str, adapters: list[Any]) -> Any:
    from h3fusion.moe import upcycle

    return upcycle(
        model, adapters, top_k=profile.fusion.top_k, storage=storage, seed=profile.seed, show_progress=False
    )


def bench_params(profile: Profile, configs: dict[str, Any]) -> list[dict[str, Any]]:
    """Parameter bytes of the fused model in both storages vs the dense base, on the meta device."""
    from transformers import AutoModelForCausalLM

    rows = []
    for name, config in configs.items():
        with torch.device("meta"):
            dense = AutoModelForCausalLM.from_config(config)
        dense_bytes = _param_bytes(dense)
        adapters = _random_adapters(config, len(profile.tasks), profile.experts.lora.r)
        for storage in ("delta", "materialised"):
            with torch.device("meta"):
                fused = _fuse(copy.deepcopy(dense), profile, storage, adapters)
            fused_bytes = _param_bytes(fused)
            rows.append(
                {
                    "model": name,
                    "storage": storage,
                    "dense_gb": dense_bytes / 1e9,
                    "fused_gb": fused_bytes / 1e9,
                    "ratio": fused_bytes / dense_bytes,
                }
            )
    return rows


def param_configs() -> dict[str, Any]:
    """The whole-model configs whose parameter bytes are counted (on meta: instant at any size)."""
    from transformers import LlamaConfig

    return {name: LlamaConfig(**cfg) for name, cfg in MODEL_CONFIGS.items()}


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

    from h3fusion.fusion import fusion_losses, prepare_for_training, total_loss

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
    adapters = _random_adapters(base.config, len(profile.tasks), lora.r, device="cpu")
    moe = _fuse(copy.deepcopy(base), profile, "delta", adapters)
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
        out = moe(**lm_batch)
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
    adapters = _random_adapters(base.config, len(profile.tasks), profile.experts.lora.r, device="cpu")
    models = {"dense": base}
    for storage in ("delta", "materialised"):
        models[storage] = _fuse(copy.deepcopy(base), profile, storage, adapters).eval()
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
    """Stage wall times (s) from the profile's manifests, the notebooks' latest wall times, and the total of the
    last batch that ran every notebook from an empty runs folder (the budget; a resumed batch costs less)."""
    from h3fusion.notebooks import FROM_SCRATCH, wall_times_path

    stages = {name: m.get("wall_time_s") for name, m in _manifests(profile.run_dir)}
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
        values["ensemble.one_pass_vs_one_model"] = ens["one_pass_vs_one_model"]
        values["ensemble.separate_passes_vs_one_model"] = ens["separate_passes_vs_one_model"]
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
    print(f"\n5. Wall times of the {b['profile']} profile (s)")
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
    results["ffn"] = bench_ffn(profile, plan)
    base, tokenizer = load_base(profile)
    print("[bench] 2/7 parameter bytes")
    results["params"] = bench_params(profile, param_configs())
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
