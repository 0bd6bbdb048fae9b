"""What the `paper` profile needs from a GPU, computed from the model's shapes (book: "Run at paper scale").

Estimates, not measurements: parameter bytes are counted exactly from the shapes (checked against the MoE the
code builds on the meta device in the tests); activations follow the usual per-layer accounting with PyTorch's
scaled-dot-product attention (no stored s x s scores) and no activation checkpointing; the KV cache holds
keys and values of every layer for the whole prompt plus the answer. Optimiser states are AdamW's two
float32 moments per trainable parameter, gradients in the parameter's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from h3fusion.config import Profile

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PROJECTIONS = 3
"""gate, up and down: the SwiGLU projections every expert holds."""


@dataclass(frozen=True)
class Shapes:
    """The widths that set the memory of a Llama-family model."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def of(cls, config: Any) -> Shapes:
        return cls(
            config.hidden_size,
            config.intermediate_size,
            config.num_hidden_layers,
            config.num_attention_heads,
            getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            config.vocab_size,
            bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def attention_params(self) -> int:
        kv = self.kv_heads * self.head_dim
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv

    def ffn_params(self) -> int:
        return PROJECTIONS * self.hidden * self.ffn

    def other_params(self) -> int:
        """Embeddings, LM head (unless tied) and the norms."""
        heads = 1 if self.tied else 2
        return heads * self.vocab * self.hidden + (2 * self.layers + 1) * self.hidden

    def dense_params(self) -> int:
        return self.layers * (self.attention_params() + self.ffn_params()) + self.other_params()

    def moe_params(self, experts: int, storage: str, rank: int) -> int:
        """Parameters of the upcycled MoE: every expert's FFN in full (materialised, the exported Mixtral) or
        one shared FFN plus each expert's rank-r factors (delta); a router per layer either way."""
        lora = PROJECTIONS * rank * (self.hidden + self.ffn)
        ffn = experts * self.ffn_params() if storage == "materialised" else self.ffn_params() + experts * lora
        return self.layers * (self.attention_params() + ffn + experts * self.hidden) + self.other_params()

    def lora_params(self, rank: int, experts: int = 1) -> int:
        """LoRA factors on the three FFN projections of every layer, per expert."""
        return experts * self.layers * PROJECTIONS * rank * (self.hidden + self.ffn)


def activation_bytes(shapes: Shapes, batch: int, seq: int, dtype_bytes: int, top_k: int = 1) -> int:
    """Activations kept for backward, no checkpointing: per layer the attention block's inputs, q/k/v and
    output (about 6 x hidden per token), the FFN's input and top_k x (gate, up, SwiGLU output, product) of
    width ffn, two norms; plus the float32 logits of the loss."""
    per_token = 8 * shapes.hidden + top_k * 4 * shapes.ffn
    return shapes.layers * batch * seq * per_token * dtype_bytes + batch * seq * shapes.vocab * 4


def kv_cache_bytes(shapes: Shapes, batch: int, tokens: int, dtype_bytes: int) -> int:
    return 2 * shapes.layers * shapes.kv_heads * shapes.head_dim * batch * tokens * dtype_bytes


def memory_table(profile: Profile, config: Any) -> pd.DataFrame:
    """GiB per stage of PROFILE on a model of CONFIG's shapes: weights, gradients and AdamW moments, activations
    or KV cache, their total, and what the activations or cache are made of."""
    s = Shapes.of(config)
    b = DTYPE_BYTES[profile.model.dtype]
    n, k = profile.num_experts, profile.fusion.top_k
    seq = profile.data.max_length
    gen = profile.evaluation.generation
    rows = []

    def add(stage: str, weights: int, trainable: int, work: int, what: str, batch: int) -> None:
        state = trainable * (b + 8)  # gradient in the weights' dtype + AdamW's two float32 moments
        rows.append(
            {
                "stage": stage,
                "batch": batch,
                "weights": weights * b / GIB,
                "gradients, AdamW": state / GIB,
                "activations or KV cache": work / GIB,
                "total": (weights * b + state + work) / GIB,
                "of which": what,
            }
        )

    lora = profile.experts.lora.r
    eb = profile.experts.train.batch_size
    add("expert LoRA training (stage 1)", s.dense_params() + s.lora_params(lora), s.lora_params(lora),
        activation_bytes(s, eb, seq, b), f"activations of {eb} x {seq} tokens", eb)
    fb = profile.fusion.train.batch_size
    fused = s.moe_params(n, profile.fusion.storage, lora)  # routers included
    fusion_lora = s.lora_params(profile.fusion.lora.r, n)
    trainable = fusion_lora + s.layers * n * s.hidden  # fusion LoRA and the routers
    add(f"fusion training ({profile.fusion.storage} MoE, top-{k})", fused + fusion_lora, trainable,
        activation_bytes(s, fb, seq, b, top_k=k), f"activations of {fb} x {seq} tokens, {k} experts each", fb)
    tokens = seq + max(gen.max_new_tokens, profile.evaluation.longest_answer)
    add("evaluation: generation with the fused model", s.moe_params(n, "materialised", lora), 0,
        kv_cache_bytes(s, gen.batch_size, tokens, b), f"KV cache of {gen.batch_size} x {tokens} tokens",
        gen.batch_size)
    return pd.DataFrame(rows).set_index("stage")
