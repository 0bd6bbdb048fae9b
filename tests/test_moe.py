"""MoE layer, upcycling and Mixtral export: mathematical invariants on a tiny random Llama."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
)
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func

from h3fusion.errors import ArtifactError, ModelError
from h3fusion.losses import drift_loss, gating_loss
from h3fusion.moe import (
    PROJECTIONS,
    DeltaExperts,
    ExpertAdapter,
    MoECausalLM,
    adapter_from_state_dict,
    export_mixtral,
    load_adapter,
    load_moe,
    upcycle,
)
from h3fusion.moe import model as model_module

HIDDEN, FFN, LAYERS, VOCAB = 32, 48, 3, 97
R, ALPHA = 4, 8.0
ATOL = 1e-5


def tiny_llama(hidden: int = HIDDEN, layers: int = LAYERS, seed: int = 0) -> LlamaForCausalLM:
    """GQA, tied embeddings and a non-default RoPE theta, so the export must carry them over."""
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=FFN,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        tie_word_embeddings=True,
        rope_parameters={"rope_theta": 50000.0, "rope_type": "default"},
        rms_norm_eps=1e-5,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def write_adapter(
    base: LlamaForCausalLM, folder: Path, seed: int, targets=("gate_proj", "up_proj", "down_proj"), r: int = R
) -> Path:
    """A real peft LoRA folder with non-trivial (random) B."""
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=r, lora_alpha=ALPHA, target_modules=list(targets))
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("experts")
    # the third expert has another rank: delta storage pads ranks
    return [
        write_adapter(base, root / "helpful", 1),
        write_adapter(base, root / "harmless", 2),
        write_adapter(base, root / "honest", 3, r=2),
    ]


@pytest.fixture()
def batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def fused(base, adapters, storage="delta", top_k=2, **kw) -> MoECausalLM:
    return upcycle(
        copy.deepcopy(base), adapters, top_k=top_k, storage=storage, show_progress=False, **kw
    ).eval()


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------- upcycling
def test_experts_equal_base_plus_scaled_delta_and_do_not_alias(base, adapters):
    moe = fused(base, adapters, "materialised")
    delta = fused(base, adapters, "delta")
    for i, folder in enumerate(adapters):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        scale = cfg["lora_alpha"] / cfg["r"]
        state = load_file(str(folder / "adapter_model.safetensors"))
        for layer in range(LAYERS):
            for p in PROJECTIONS:
                key = f"base_model.model.model.layers.{layer}.mlp.{p}"
                a, b = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
                expected = getattr(base.model.layers[layer].mlp, p).weight + scale * b @ a
                torch.testing.assert_close(
                    moe.experts_modules()[layer].stored_weight(p)[i], expected, atol=ATOL, rtol=0
                )
                torch.testing.assert_close(
                    delta.experts_modules()[layer].expert_weight(p)[i], expected, atol=ATOL, rtol=0
                )
    gate = moe.experts_modules()[0].stored_weight("gate_proj")
    before = gate[1].clone()
    with torch.no_grad():
        gate[0].add_(1.0)  # writing expert 0 must leave the other experts alone
    torch.testing.assert_close(gate[1], before)
    assert len({gate[e].data_ptr() for e in range(3)}) == 3


def test_zero_deltas_give_dense_logits_whatever_the_router(base, tmp_path, batch):
    zero = []
    for i in range(3):
        model = get_peft_model(
            copy.deepcopy(base), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(PROJECTIONS))
        )
        model.save_pretrained(tmp_path / f"zero{i}")  # peft's init: B = 0
        zero.append(tmp_path / f"zero{i}")
    dense = logits_of(base, batch)
    for storage in ("delta", "materialised"):
        for k, seed in ((1, 0), (2, 5), (3, 9)):
            moe = fused(base, zero, storage, top_k=k, seed=seed)
            torch.testing.assert_close(logits_of(moe, batch), dense, atol=ATOL, rtol=0)


def test_forced_expert_reproduces_base_with_merged_adapter(base, adapters, batch):
    moes = [fused(base, adapters, storage, top_k=1) for storage in ("delta", "materialised")]
    for i, folder in enumerate(adapters):
        merged = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).merge_and_unload().eval()
        expected = logits_of(merged, batch)
        for moe in moes:
            with moe.force_expert(i):
                torch.testing.assert_close(logits_of(moe, batch), expected, atol=1e-4, rtol=0)


def test_router_logits_come_out_of_forward(base, adapters, batch):
    moe = fused(base, adapters)
    out = moe(**batch, labels=batch["input_ids"], output_router_logits=True)
    assert out.loss is not None and out.loss.ndim == 0
    assert len(out.router_logits) == moe.config.num_hidden_layers == LAYERS
    b, t = batch["input_ids"].shape
    assert all(lg.shape == (b * t, 3) for lg in out.router_logits)
    # the auxiliary loss is transformers' own, and it stays out of the LM loss
    assert out.aux_loss is not None and out.aux_loss.ndim == 0
    torch.testing.assert_close(out.loss, moe(**batch, labels=batch["input_ids"]).loss)


@pytest.mark.parametrize("top_k", [1, 2])
def test_the_aux_loss_is_the_load_balancing_loss_over_real_tokens_at_the_current_k(base, adapters, batch, top_k):
    """The fusion objective's balance term is the model's `aux_loss`: transformers' Mixtral load-balancing loss
    over the non-padding tokens, with the k in use (also after `set_top_k`)."""
    moe = fused(base, adapters, top_k=top_k)
    with torch.no_grad():  # decisive routing, so that padding tokens change the statistics
        for w in moe.router_parameters():
            w.mul_(50)
    for k in (top_k, 3 - top_k):
        moe.set_top_k(k)
        out = moe(**batch, output_router_logits=True)
        mask = batch["attention_mask"]
        torch.testing.assert_close(out.aux_loss, load_balancing_loss_func(out.router_logits, 3, k, mask))
        assert not torch.allclose(out.aux_loss, load_balancing_loss_func(out.router_logits, 3, k))


def test_random_router_init_is_seeded(base, adapters):
    a = fused(base, adapters, seed=3).router_parameters()
    b = fused(base, adapters, seed=3).router_parameters()
    c = fused(base, adapters, seed=4).router_parameters()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


def test_hidden_router_init_is_the_mean_ffn_input(base, adapters, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"]
    per_expert = [[{"input_ids": ids[i : i + 1], "attention_mask": mask[i : i + 1]}] for i in range(3)]
    # reference: the dense model's FFN inputs captured by forward pre-hooks (fine in a test)
    ref = copy.deepcopy(base)
    seen: dict[int, torch.Tensor] = {}
    for layer_idx, layer in enumerate(ref.model.layers):
        layer.mlp.register_forward_pre_hook(lambda _m, args, j=layer_idx: seen.__setitem__(j, args[0]))
    moe = fused(base, adapters, router_init="hidden", hidden_batches=per_expert)
    for i in range(3):
        with torch.no_grad():
            ref(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
        m = mask[i : i + 1].unsqueeze(-1).float()
        for layer_idx, router in enumerate(moe.router_parameters()):
            mean = (seen[layer_idx] * m).sum(dim=(0, 1)) / m.sum()
            torch.testing.assert_close(router[i], mean / mean.norm(), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ layer maths
def reference_moe(layer, h: torch.Tensor) -> torch.Tensor:
    """The MoE block written out densely: every expert on every token, then top-k mixing."""
    x = h.reshape(-1, h.shape[-1])
    p = F.softmax((x @ layer.gate.weight.T).float(), dim=-1)
    top, idx = torch.topk(p, layer.gate.top_k, dim=-1)
    mix = torch.zeros(p.shape).scatter(1, idx, top / top.sum(-1, keepdim=True))  # p~ on S, 0 elsewhere
    w = layer.experts.expert_weights()
    outs = torch.stack(
        [
            (F.silu(x @ w["gate_proj"][e].T) * (x @ w["up_proj"][e].T)) @ w["down_proj"][e].T
            for e in range(layer.experts.num_experts)
        ],
        dim=1,
    )
    return (mix.unsqueeze(-1) * outs).sum(1).reshape(h.shape)


@pytest.mark.parametrize(("num_experts", "top_k"), [(2, 1), (3, 2), (4, 3), (4, 4)])
def test_any_number_of_experts_and_k(base, num_experts, top_k):
    gen = torch.Generator().manual_seed(num_experts)
    shapes = {"gate_proj": (FFN, HIDDEN), "up_proj": (FFN, HIDDEN), "down_proj": (HIDDEN, FFN)}
    ads = [
        adapter_from_state_dict(
            {
                f"base_model.model.model.layers.{li}.mlp.{p}.lora_{ab}.weight": torch.randn(
                    (R, i) if ab == "A" else (o, R), generator=gen
                )
                * 0.2
                for li in range(LAYERS)
                for p, (o, i) in shapes.items()
                for ab in "AB"
            },
            scale=2.0,
            name=f"e{e}",
        )
        for e in range(num_experts)
    ]
    h = torch.randn(2, 5, HIDDEN, generator=gen)
    results = []
    for storage in ("delta", "materialised"):
        moe = fused(base, ads, storage, top_k=top_k, seed=1)
        assert moe.num_experts == num_experts and moe.top_k == top_k
        layer = moe.moe_layers()[1]
        with torch.no_grad():
            out = layer(h)
            torch.testing.assert_close(out, reference_moe(layer, h), atol=ATOL, rtol=0)
        results.append(out)
    torch.testing.assert_close(results[0], results[1], atol=ATOL, rtol=0)


def _loss_and_grads(moe: MoECausalLM, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = moe(**batch, labels=batch["input_ids"], output_router_logits=True)
    labels = torch.tensor([0, 2, 1])
    loss = out.loss + 0.5 * gating_loss(out.router_logits, batch["attention_mask"], labels)
    loss = loss + drift_loss(moe.drift_factors(), [0.1, 0.2, 0.3], moe.fusion_lora_scale())
    loss.backward()
    grads = {f"router{i}": layer.gate.weight.grad for i, layer in enumerate(moe.moe_layers())}
    for i, experts in enumerate(moe.experts_modules()):
        for p in experts.fusion_lora.targets:
            grads[f"A{i}{p}"] = experts.fusion_lora.A[p].grad
            grads[f"B{i}{p}"] = experts.fusion_lora.B[p].grad
    grads["q_proj"] = moe.model.layers[0].self_attn.q_proj.weight.grad
    return loss.detach(), grads


def test_delta_and_materialised_give_same_logits_and_gradients(base, adapters, batch):
    results = []
    for storage in ("delta", "materialised"):
        moe = fused(base, adapters, storage, top_k=2, seed=11)
        moe.add_fusion_lora(rank=3, alpha=6.0, seed=5)
        with torch.no_grad():  # non-zero fusion deltas, identical in both models
            gen = torch.Generator().manual_seed(0)
            for experts in moe.experts_modules():
                for p in experts.fusion_lora.targets:
                    experts.fusion_lora.B[p].copy_(
                        torch.randn(experts.fusion_lora.B[p].shape, generator=gen) * 0.1
                    )
        trainable = moe.freeze_for_fusion()
        moe.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
        assert all(p.requires_grad for p in trainable)
        results.append((logits_of(moe, batch), *_loss_and_grads(moe, batch)))
    (l0, loss0, g0), (l1, loss1, g1) = results
    torch.testing.assert_close(l0, l1, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss0, loss1, atol=ATOL, rtol=0)
    assert g0.keys() == g1.keys()
    for key in g0:
        assert g0[key] is not None and g0[key].abs().sum() > 0, key
        torch.testing.assert_close(g0[key], g1[key], atol=1e-5, rtol=1e-4, msg=key)


def test_router_gets_gradient_from_gating_loss(base, adapters, batch):
    moe = fused(base, adapters, top_k=1)  # k=1: the LM loss alone gives the router no gradient
    moe.freeze_for_fusion()
    out = moe(**batch, output_router_logits=True)
    gating_loss(out.router_logits, batch["attention_mask"], torch.tensor([0, 1, 2])).backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in moe.router_parameters())


def test_router_logits_keep_their_graph_under_gradient_checkpointing(base, adapters, batch):
    grads = []
    for checkpointing in (False, True):
        moe = fused(base, adapters, top_k=2)
        moe.freeze_for_fusion()
        if checkpointing:
            moe.activation_checkpointing_enable()
        moe.train()
        out = moe(**batch, use_cache=False, output_router_logits=True)
        assert all(lg.requires_grad for lg in out.router_logits)
        gating_loss(out.router_logits, batch["attention_mask"], torch.tensor([0, 1, 2])).backward()
        grads.append([w.grad for w in moe.router_parameters()])
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1)
    with pytest.raises(ModelError, match="reentrant"):
        moe.activation_checkpointing_enable({"use_reentrant": True})


@pytest.mark.parametrize("storage", ["delta", "materialised"])
def test_fusion_lora_starts_at_zero_and_merges_exactly(base, adapters, batch, storage):
    moe = fused(base, adapters, storage)
    before = logits_of(moe, batch)
    moe.add_fusion_lora(rank=2, alpha=4.0, targets=("gate_proj", "down_proj"), seed=1)
    torch.testing.assert_close(logits_of(moe, batch), before, atol=0, rtol=0)
    assert drift_loss(moe.drift_factors(), [1.0, 1.0, 1.0], moe.fusion_lora_scale()).item() == 0.0
    with torch.no_grad():
        for experts in moe.experts_modules():
            for p in experts.fusion_lora.targets:
                experts.fusion_lora.B[p].normal_(0, 0.1)
    trained = logits_of(moe, batch)
    assert (trained - before).abs().max() > 1e-3
    moe.merge_fusion_lora()
    assert all(experts.fusion_lora is None for experts in moe.experts_modules())
    torch.testing.assert_close(logits_of(moe, batch), trained, atol=ATOL, rtol=0)


def test_low_rank_weight_norms_equal_the_dense_ones_with_their_gradients(base, adapters):
    """The released code's weight-norm penalty computed from the factors (`expert_sq_norms`) equals the norms of
    the materialised weights, and so do its gradients on the fusion LoRA (only some projections adapted)."""
    results = []
    for storage in ("delta", "materialised"):
        moe = fused(base, adapters, storage, top_k=2, seed=11)
        moe.add_fusion_lora(rank=2, alpha=4.0, targets=("gate_proj", "down_proj"), seed=1)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(0)
            for experts in moe.experts_modules():
                for p in experts.fusion_lora.targets:
                    experts.fusion_lora.B[p].copy_(torch.randn(experts.fusion_lora.B[p].shape, generator=gen) * 0.1)
        params = moe.freeze_for_fusion()
        fast = moe.expert_sq_norms()
        dense = [sum(w.pow(2).sum(dim=(1, 2)) for w in layer) for layer in moe.expert_weights()]
        for f, d in zip(fast, dense, strict=True):
            torch.testing.assert_close(f, d, rtol=1e-5, atol=1e-4)
        weights = torch.tensor([1.0, 2.0, 3.0])
        grads = torch.autograd.grad(sum((n * weights).sum() for n in fast), params, allow_unused=True)
        dense_grads = torch.autograd.grad(sum((n * weights).sum() for n in dense), params, allow_unused=True)
        for g, h in zip(grads, dense_grads, strict=True):
            if h is None:  # the routers: the norms do not depend on them
                assert g is None
                continue
            assert h.abs().sum() > 0
            torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-5)
        results.append(torch.stack(fast))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-4)


def test_set_top_k(base, adapters):
    moe = fused(base, adapters, top_k=2)
    moe.set_top_k(3)
    assert all(layer.gate.top_k == 3 for layer in moe.moe_layers()) and moe.num_experts_per_tok == 3
    with pytest.raises(ModelError, match="top_k"):
        moe.set_top_k(4)


# --------------------------------------------------------------------------------- export
@pytest.mark.parametrize("storage", ["delta", "materialised"])
def test_exported_mixtral_gives_the_same_logits(base, adapters, batch, tmp_path, storage):
    moe = fused(base, adapters, storage, top_k=2, seed=2)
    moe.add_fusion_lora(rank=2, alpha=4.0, seed=3)
    with torch.no_grad():
        for experts in moe.experts_modules():
            for p in experts.fusion_lora.targets:
                experts.fusion_lora.B[p].normal_(0, 0.1)
    expected = logits_of(moe, batch)
    folder = export_mixtral(moe, None, tmp_path / "raw", manifest={"config_hash": "abc"})
    assert json.loads((folder / "manifest.json").read_text())["config_hash"] == "abc"
    assert not list(tmp_path.glob("raw.tmp-*"))

    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()  # plain transformers, no custom code
    assert type(loaded).__name__ == "MixtralForCausalLM"
    cfg = loaded.config
    assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (3, 2)
    assert cfg.num_key_value_heads == 2 and cfg.tie_word_embeddings
    assert cfg.rope_parameters["rope_theta"] == 50000.0
    torch.testing.assert_close(logits_of(loaded, batch), expected, atol=ATOL, rtol=0)

    keys = set(load_file(str(folder / "model.safetensors")))
    assert "model.layers.0.block_sparse_moe.experts.2.w1.weight" in keys
    assert "model.layers.0.block_sparse_moe.gate.weight" in keys

    back = load_moe(folder).eval()
    assert back.expert_names == moe.expert_names and back.storage == "materialised"
    torch.testing.assert_close(logits_of(back, batch), expected, atol=ATOL, rtol=0)
    assert len(back(**batch, output_router_logits=True).router_logits) == LAYERS
    again = AutoModelForCausalLM.from_pretrained(export_mixtral(back, None, tmp_path / "again")).eval()
    torch.testing.assert_close(logits_of(again, batch), expected, atol=ATOL, rtol=0)


def test_generate_matches_the_exported_model(base, adapters, batch, tmp_path):
    moe = fused(base, adapters, "delta", top_k=2)
    prompt = batch["input_ids"][1:2]
    ours = moe.generate(prompt, max_new_tokens=6, do_sample=False)
    export_mixtral(moe, None, tmp_path / "m")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m").generate(
        prompt, max_new_tokens=6, do_sample=False
    )
    assert ours.shape == (1, prompt.shape[1] + 6)
    assert torch.equal(ours, theirs)


# ------------------------------------------------------------------- base model families
FAMILY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=VOCAB,
)
FAMILIES = {
    "llama": lambda: LlamaConfig(**FAMILY_SHAPE),
    # a window shorter than the batch, so a dropped sliding_window would change the logits
    "mistral": lambda: MistralConfig(**FAMILY_SHAPE, sliding_window=4),
    "qwen2": lambda: Qwen2Config(**FAMILY_SHAPE),
    "gemma": lambda: GemmaConfig(**FAMILY_SHAPE),
}


def family_base(family: str):
    """A tiny random base of `family` whose norms and biases are random too (their defaults hide differences)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5)
    return model


def family_adapters(base) -> list:
    from h3fusion.moe.low_rank import projection_shapes

    shapes = projection_shapes(base.config.hidden_size, base.config.intermediate_size)
    gen = torch.Generator().manual_seed(0)
    return [
        ExpertAdapter(
            name=f"e{i}",
            scale=2.0,
            factors={
                (layer, p): (
                    0.1 * torch.randn(R, shapes[p][1], generator=gen),
                    0.1 * torch.randn(shapes[p][0], R, generator=gen),
                )
                for layer in range(base.config.num_hidden_layers)
                for p in PROJECTIONS
            },
        )
        for i in range(3)
    ]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_accepted_families_export_exactly(family, batch, tmp_path):
    base = family_base(family)
    moe = upcycle(base, family_adapters(base), top_k=2, show_progress=False).eval()
    expected = logits_of(moe, batch)
    export_mixtral(moe, None, tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.sliding_window == getattr(base.config, "sliding_window", None)
    torch.testing.assert_close(logits_of(loaded, batch), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "gemma"])
def test_other_families_are_refused_before_upcycling(family):
    base = family_base(family)
    with pytest.raises(ModelError, match=rf"{family!r} model.*\['llama', 'mistral'\].*model\.base"):
        upcycle(base, family_adapters(base), top_k=2, show_progress=False)
    assert all(type(layer.mlp).__name__ != "MixtralSparseMoeBlock" for layer in base.model.layers)


def test_llama_with_attention_biases_is_refused():
    base = LlamaForCausalLM(LlamaConfig(**FAMILY_SHAPE, attention_bias=True))
    with pytest.raises(ModelError, match="biases"):
        upcycle(base, family_adapters(base), top_k=2, show_progress=False)


def test_a_wrong_family_is_caught_by_the_shell_check(monkeypatch):
    """Gemma let through the allow-list: the Mixtral around its weights computes another function, so upcycling
    refuses before any experts are built."""
    monkeypatch.setattr(model_module, "MIXTRAL_EXACT_FAMILIES", ("llama", "mistral", "gemma"))
    base = family_base("gemma")
    with pytest.raises(ModelError, match="does not reproduce"):
        upcycle(base, family_adapters(base), top_k=2, show_progress=False)


def test_fuse_checks_the_family_before_loading_the_base(tmp_path, monkeypatch):
    """A Gemma folder as `model.base`: refused from its config.json, before weights or experts are read."""
    from h3fusion import fusion, models
    from h3fusion.config import load_profile

    family_base("gemma").save_pretrained(tmp_path / "gemma")
    profile = load_profile(
        "smoke", {"runs_dir": str(tmp_path / "runs"), "model": {"base": str(tmp_path / "gemma")}}
    )

    def refuse(*args, **kwargs):
        raise AssertionError("the base weights were loaded")

    monkeypatch.setattr(models, "load_base", refuse)
    with pytest.raises(ModelError, match="'gemma' model"):
        fusion.upcycle_profile(profile)


# ------------------------------------------------------------------------------ bad inputs
def test_missing_expert_folder(base, adapters, tmp_path):
    with pytest.raises(ArtifactError, match="align"):
        upcycle(copy.deepcopy(base), [adapters[0], tmp_path / "nope"], top_k=1, show_progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="adapter_config.json"):
        load_adapter(tmp_path / "empty")


def test_adapter_from_another_base(base, adapters, tmp_path):
    other = write_adapter(tiny_llama(hidden=16), tmp_path / "other", 1)
    with pytest.raises(ModelError, match="another base"):
        upcycle(copy.deepcopy(base), [adapters[0], other], top_k=1, show_progress=False)
    deeper = write_adapter(tiny_llama(layers=LAYERS + 1), tmp_path / "deeper", 1)
    with pytest.raises(ModelError, match="layers"):
        upcycle(copy.deepcopy(base), [deeper], top_k=1, show_progress=False)


def test_adapter_without_ffn_targets(base, adapters, tmp_path):
    attn = write_adapter(base, tmp_path / "attn", 1, targets=("q_proj", "v_proj"))
    with pytest.raises(ModelError, match="gate_proj"):
        upcycle(copy.deepcopy(base), [adapters[0], attn], top_k=1, show_progress=False)


def test_bad_top_k_storage_and_router_init(base, adapters):
    model = copy.deepcopy(base)
    with pytest.raises(ModelError, match="top_k"):
        upcycle(model, adapters, top_k=4, show_progress=False)
    with pytest.raises(ModelError, match="top_k"):
        upcycle(model, adapters, top_k=0, show_progress=False)
    with pytest.raises(ModelError, match="storage"):
        upcycle(model, adapters, top_k=1, storage="sparse", show_progress=False)
    with pytest.raises(ModelError, match="hidden_batches"):
        upcycle(model, adapters, top_k=1, router_init="hidden", show_progress=False)
    # all checks run before the model is touched
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


# ---------------------------------------------------------------------------------------------- swiglu_mix


@pytest.mark.parametrize(("num_experts", "top_k"), [(3, 2), (4, 3), (2, 1)])
def test_swiglu_mix_matches_the_plain_formula_and_its_gradients(num_experts, top_k):
    """The fused node on expert-sorted tokens = the masked per-slot formula (gradcheck in float64)."""
    from h3fusion.moe.swiglu_mix import expert_order, swiglu_mix, swiglu_mix_reference

    gen = torch.Generator().manual_seed(num_experts)
    n, f, r, rd = 13, 7, 3, 2
    idx = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(n)])
    perm, runs = expert_order(idx, num_experts)
    args = [
        torch.randn(shape, generator=gen, dtype=torch.float64).requires_grad_(True)
        for shape in (
            (n, f),
            (n, f),
            (n, num_experts, r),
            (num_experts * r, f),
            (n, num_experts, r),
            (num_experts * r, f),
            (n, top_k),
            (num_experts * rd, f),
        )
    ]
    sort = [a[perm] if a.shape[0] == n else a for a in args]
    mix, z_down = swiglu_mix(*sort, runs)
    ref_mix, ref_z = swiglu_mix_reference(*args, idx)
    torch.testing.assert_close(mix, ref_mix[perm])
    torch.testing.assert_close(z_down, ref_z[:, perm])

    def sorted_fn(*xs):
        return swiglu_mix(*[x[perm] if x.shape[0] == n else x for x in xs], runs)

    assert torch.autograd.gradcheck(sorted_fn, args)
    grads_out = [torch.randn(mix.shape, dtype=torch.float64), torch.randn(z_down.shape, dtype=torch.float64)]
    got = torch.autograd.grad(sorted_fn(*args), args, grads_out)
    back = torch.argsort(perm)
    want = torch.autograd.grad(
        swiglu_mix_reference(*args, idx), args, [grads_out[0][back], grads_out[1][:, back]]
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_delta_training_path_equals_the_plain_path():
    """`_forward_delta_sorted` (autograd) = the per-slot ops (no autograd / other activation) to rounding."""
    torch.manual_seed(0)
    cfg = MixtralConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_local_experts=3, num_experts_per_tok=2)
    layer = MixtralSparseMoeBlock(cfg)
    layer.experts = DeltaExperts(HIDDEN, FFN, 3, delta_rank=R)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    layer.experts.add_fusion_lora(rank=3, alpha=6.0)
    with torch.no_grad():
        for b in layer.experts.fusion_lora.B.values():
            b.normal_(0, 0.1)
    layer.requires_grad_(False)
    layer.gate.requires_grad_(True)
    layer.experts.fusion_lora.requires_grad_(True)
    h = torch.randn(2, 9, HIDDEN)
    grad_out = torch.randn(2, 9, HIDDEN)
    results = []
    for act in ("silu", "plain"):  # any other name than "silu" takes the per-slot ops (same act_fn)
        layer.experts.hidden_act = act
        x = h.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out = layer(x)
        out.backward(grad_out)
        with torch.no_grad():
            torch.testing.assert_close(layer(h), out, atol=ATOL, rtol=0)
        params = [p.grad for p in layer.parameters() if p.requires_grad]
        results.append((out.detach(), x.grad, *params))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
