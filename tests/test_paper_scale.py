"""The paper-scale memory estimate's parameter counts equal the models the code builds (on the meta device)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from h3fusion.bench_common import LLAMA2_7B_CONFIG, fuse_random, random_adapters
from h3fusion.config import load_profile
from h3fusion.paper_scale import Shapes, kv_cache_bytes, memory_table

CONFIGS = {
    "llama2_7b": LlamaConfig(**LLAMA2_7B_CONFIG),
    "gqa_tied": LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True),
}


def parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied ones once), buffers such as the rotary frequencies left out."""
    return sum({id(p): p.numel() for p in model.parameters()}.values())


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("storage", ["delta", "materialised"])
def test_parameter_counts_equal_the_models_the_code_builds(name, storage):
    profile = load_profile("smoke")
    config = CONFIGS[name]
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(config)
    shapes, rank = Shapes.of(config), profile.experts.lora.r
    assert shapes.dense_params() == parameters(dense)
    adapters = random_adapters(config, profile.num_experts, rank)
    with torch.device("meta"):
        fused = fuse_random(copy.deepcopy(dense), profile, storage, adapters)
    assert shapes.moe_params(profile.num_experts, storage, rank) == parameters(fused)


def test_kv_cache_and_the_table_follow_the_shapes():
    shapes = Shapes.of(CONFIGS["llama2_7b"])
    # Llama-2-7B, bf16: 2 (k, v) x 32 layers x 4096 x 2 bytes = 0.5 MiB per token
    assert kv_cache_bytes(shapes, batch=1, tokens=1, dtype_bytes=2) == 2 * 32 * 4096 * 2
    table = memory_table(load_profile("paper"), CONFIGS["llama2_7b"])
    assert list(table.index) == [
        "expert LoRA training (stage 1)",
        "fusion training (materialised MoE, top-2)",
        "evaluation: generation with the fused model",
    ]
    parts = ["weights", "gradients, AdamW", "activations or KV cache"]
    assert table["total"].to_numpy() == pytest.approx(table[parts].sum(axis=1).to_numpy())
    # three materialised experts' FFNs: the fused weights are about 2.3x the dense 6.7B (bf16: 12.6 GiB)
    assert table.loc["expert LoRA training (stage 1)", "weights"] == pytest.approx(12.6, abs=0.1)
    assert 2.2 < table.iloc[2]["weights"] / table.iloc[0]["weights"] < 2.4
