"""Analysis of fused models: routing statistics, hidden-state embeddings and expert drift.

Everything here is a function of a model (or of arrays) that returns numpy arrays, so the notebooks only
glue calls together and plot. A fused model is a Mixtral (`h3fusion.moe.MoECausalLM` in memory, a plain
``MixtralForCausalLM`` loaded from an exported folder); both return their router logits when asked with
``output_router_logits=True``.

Router logits come per layer, either as ``[B, T, E]`` or flattened ``[B*T, E]`` (Mixtral); both are reshaped
with the attention mask's shape. Averages are taken over each prompt's non-padding tokens only (the attention
mask), then over prompts, so padding never dilutes a statistic and a batch size never changes a result.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from h3fusion.dimensions import get_dimension
from h3fusion.errors import H3FusionError, ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from h3fusion.config import Profile

DEFAULT_BATCH_SIZE = 8
"""Prompts per forward pass; results do not depend on it (padding is masked out of every average)."""


# ---------------------------------------------------------------------------------------------- batching


def _batches(items: Sequence[str], batch_size: int) -> Iterator[list[str]]:
    if batch_size < 1:
        raise H3FusionError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(items), batch_size):
        yield list(items[start : start + batch_size])


def _check_prompts(prompts: Sequence[str], what: str) -> None:
    if isinstance(prompts, str):
        raise H3FusionError(f"{what}: pass a list of prompts, not one string")
    if len(prompts) == 0:
        raise H3FusionError(f"{what}: the list of prompts is empty; pass at least one prompt")


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def encode(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Tokenise a batch with padding (either side works: every average here uses the attention mask)."""
    if tokenizer.pad_token is None:
        raise ModelError(
            "the tokenizer has no pad token; load it with h3fusion.models.load_tokenizer (or pass it through "
            "h3fusion.models.prepare_tokenizer) so that batches can be padded"
        )
    enc = tokenizer(
        list(prompts),
        return_tensors="pt",
        padding=True,
        truncation=max_length is not None,
        max_length=max_length,
    )
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class _EvalMode:
    """Run a model in eval mode without grad, restoring its previous mode afterwards."""

    def __init__(self, model: Any) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        import torch

        self._no_grad = torch.no_grad()
        self._no_grad.__enter__()
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
        self._no_grad.__exit__(*exc)


def _progress(iterable: Any, total: int, desc: str) -> Any:
    from h3fusion.progress import progress

    return progress(iterable, total=total, desc=desc, leave=False, show=total > 1)


def _n_batches(n: int, batch_size: int) -> int:
    return (n + batch_size - 1) // batch_size


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` [B, T, ...] over the tokens where `mask` [B, T] is 1 -> [B, ...]."""
    m = mask.to(values.dtype).reshape(*mask.shape, *([1] * (values.dim() - 2)))
    counts = m.sum(dim=1).clamp(min=1)
    return (values * m).sum(dim=1) / counts


# ---------------------------------------------------------------------------------------------- prompts

def task_prompts(profile: Profile, split: str = "eval", n: int | None = None) -> dict[str, list[str]]:
    """{task: Alpaca-formatted prompts} of the profile's tasks, as the models see them (no response).

    split: ``eval`` (held-out items; the default, so routing is measured on prompts no model trained on) or
    ``train`` (the training examples of both stages). `n` keeps the first n per task (all when None).
    """
    from h3fusion.data import format_prompt, load_eval_items, load_train_examples

    if split not in ("eval", "train"):
        raise H3FusionError(f"task_prompts: split must be 'eval' or 'train', got {split!r}")
    if n is not None and n < 1:
        raise H3FusionError(f"task_prompts: n must be at least 1 (or None for all), got {n}")
    out = {}
    for task in profile.tasks:
        if split == "train":
            prompts = [format_prompt(ex.instruction, ex.input) for ex in load_train_examples(profile, task)]
        else:
            field = get_dimension(task).prompt_field
            prompts = [
                format_prompt(it[field], it.get("input", "") or "") for it in load_eval_items(profile, task)
            ]
        out[task] = prompts[:n]
    return out


# ---------------------------------------------------------------------------------------------- routing


def router_logits(model: Any, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    """Per-layer router logits of one forward pass of a fused model (an `MoECausalLM` or any Mixtral).

    ``logits_to_keep=1``: routing and hidden-state statistics need no vocabulary logits, which cost a fifth of a
    SmolLM2 forward and a [batch, tokens, 49152] tensor."""
    if getattr(getattr(model, "config", None), "num_local_experts", None) is None:
        raise ModelError(
            f"{type(model).__name__} has no experts, so no router logits: routing statistics need a fused MoE model "
            "(h3fusion.moe.MoECausalLM or an exported MixtralForCausalLM), not a dense model"
        )
    out = model(**batch, output_router_logits=True, logits_to_keep=1)
    logits = getattr(out, "router_logits", None)
    if not logits:
        raise ModelError(f"{type(model).__name__} returned no router logits for output_router_logits=True")
    return list(logits)


def routing_probs_per_layer(logits: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
    """Router logits (per layer, [B, T, E] or [B*T, E]) -> mean softmax probability per prompt [B, layers, E]."""
    import torch

    batch, tokens = attention_mask.shape
    per_layer = []
    for layer, lg in enumerate(logits):
        if lg.shape[:-1].numel() != batch * tokens:
            raise ModelError(
                f"router logits of layer {layer} have shape {tuple(lg.shape)}, which does not match the batch "
                f"({batch} prompts x {tokens} tokens)"
            )
        probs = lg.float().reshape(batch, tokens, lg.shape[-1]).softmax(dim=-1)
        per_layer.append(masked_mean(probs, attention_mask.to(probs.device)))
    return torch.stack(per_layer, dim=1)


def routing_per_prompt(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> np.ndarray:
    """Mean router probability per prompt, layer and expert, [prompts, layers, experts] (each row sums to 1)."""
    _check_prompts(prompts, "routing_per_prompt")
    device, out = _device(model), []
    with _EvalMode(model):
        batches = _batches(prompts, batch_size)
        for chunk in _progress(batches, _n_batches(len(prompts), batch_size), "routing"):
            batch = {k: v.to(device) for k, v in encode(tokenizer, chunk, max_length).items()}
            probs = routing_probs_per_layer(router_logits(model, batch), batch["attention_mask"])
            out.append(probs.cpu().double().numpy())
    return np.concatenate(out, axis=0)


def routing_profile(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> np.ndarray:
    """Mean router probability per layer and expert, [layers, experts]: tokens first, then prompts."""
    return routing_per_prompt(model, tokenizer, prompts, batch_size, max_length).mean(axis=0)


def routing_by_task(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts_by_task: Mapping[str, Sequence[str]],
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> dict[str, np.ndarray]:
    """{task: [layers, experts]} routing profile of each task's prompts (the heat-maps of the fusion notebook)."""
    if not prompts_by_task:
        raise H3FusionError("routing_by_task: no tasks given; pass {task: [prompt, ...]}")
    return {
        task: routing_profile(model, tokenizer, prompts, batch_size, max_length)
        for task, prompts in prompts_by_task.items()
    }


def task_expert_matrix(profiles_by_task: Mapping[str, np.ndarray]) -> np.ndarray:
    """Layer-averaged routing, [tasks, experts] in the dict's task order (the paper's Figure 2 analogue)."""
    if not profiles_by_task:
        raise H3FusionError("task_expert_matrix: no routing profiles given")
    shapes = {np.shape(m) for m in profiles_by_task.values()}
    if len(shapes) != 1:
        raise H3FusionError(f"task_expert_matrix: routing profiles of different shapes {sorted(shapes)}")
    return np.stack([np.asarray(m, dtype=float).mean(axis=0) for m in profiles_by_task.values()])


# ---------------------------------------------------------------------------------------------- embeddings


def hidden_embeddings(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    layer: int = -1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
) -> np.ndarray:
    """Mean-pooled hidden states of one layer over each prompt's non-padding tokens, [prompts, hidden].

    `layer` indexes ``output_hidden_states`` (0 = embeddings, -1 = the last layer after the final norm), so
    the same index means the same depth for the dense base, an expert, and a fused model of that base.
    """
    _check_prompts(prompts, "hidden_embeddings")
    device, out = _device(model), []
    with _EvalMode(model):
        batches = _batches(prompts, batch_size)
        for chunk in _progress(batches, _n_batches(len(prompts), batch_size), "embeddings"):
            batch = {k: v.to(device) for k, v in encode(tokenizer, chunk, max_length).items()}
            result = model(**batch, output_hidden_states=True, logits_to_keep=1)
            states = getattr(result, "hidden_states", None)
            if not states:
                raise ModelError(
                    f"{type(model).__name__} returned no hidden states for output_hidden_states=True"
                )
            if not -len(states) <= layer < len(states):
                raise H3FusionError(
                    f"layer {layer} does not exist: the model returns {len(states)} hidden states "
                    f"(0 = embeddings ... {len(states) - 1} = last layer); pick a layer in that range or -1"
                )
            pooled = masked_mean(states[layer].float(), batch["attention_mask"])
            out.append(pooled.cpu().double().numpy())
    return np.concatenate(out, axis=0)


# ---------------------------------------------------------------------------------------------- drift

_LAYER = re.compile(r"layers\.(\d+)\.")
_EXPERT = re.compile(r"experts\.(\d+)\.")


def _expert_squares(key: str, diff: torch.Tensor) -> dict[int, float]:
    """Squared Frobenius norm per expert of one tensor's difference (per-expert keys or packed [E, ...])."""
    found = _EXPERT.search(key)
    if found:
        return {int(found.group(1)): float(diff.double().pow(2).sum())}
    flat = diff.double().reshape(diff.shape[0], -1)
    return {i: float(v) for i, v in enumerate(flat.pow(2).sum(dim=1))}


def expert_state(model_or_state: Any) -> Mapping[str, torch.Tensor]:
    """Expert weights keyed like a Mixtral state dict, from a state dict, an MoECausalLM or a Mixtral model.

    An `MoECausalLM` gives its effective expert weights (base + delta + fusion LoRA, whatever the storage) as
    packed ``layers.<l>.experts.<projection>`` tensors [E, out, in]; any other module gives its state dict.
    """
    if isinstance(model_or_state, Mapping):
        return model_or_state
    if hasattr(model_or_state, "expert_weights"):
        with _EvalMode(model_or_state):
            per_layer = model_or_state.expert_weights()
        return {
            f"layers.{layer}.experts.proj{j}": weight.detach()
            for layer, weights in enumerate(per_layer)
            for j, weight in enumerate(weights)
        }
    if hasattr(model_or_state, "state_dict"):
        return model_or_state.state_dict()
    raise H3FusionError(
        f"expert_drift: cannot read expert weights from a {type(model_or_state).__name__}; pass an MoECausalLM, "
        f"a MixtralForCausalLM or a state dict"
    )


def expert_drift(model_a: Any, model_b: Any) -> np.ndarray:
    """Frobenius distance ||theta_i^a - theta_i^b|| of each expert's weights, per layer: [layers, experts].

    Takes two models of one shape (MoECausalLM or MixtralForCausalLM) or their state dicts in Mixtral form,
    in memory (packed ``mlp.experts.gate_up_proj`` [E, 2f, d] and ``down_proj`` [E, d, f]) or as saved
    (``block_sparse_moe.experts.{i}.w1/w2/w3``). E.g. the raw upcycled MoE against a trained one shows how far
    fusion training moved each expert: what gamma_i limits (the drift loss is gamma_i times its square).
    """
    state_a, state_b = expert_state(model_a), expert_state(model_b)
    keys = [k for k in state_a if ".experts." in k and _LAYER.search(k)]
    if not keys:
        raise H3FusionError(
            "expert_drift: no expert weights found (keys with `layers.<l>.` and `.experts.`); pass two MoE models "
            "(MoECausalLM or MixtralForCausalLM) or their state dicts"
        )
    missing = [k for k in keys if k not in state_b]
    if missing:
        raise H3FusionError(
            f"expert_drift: the second model lacks {missing[:3]}; compare models of one shape"
        )
    squares: dict[tuple[int, int], float] = {}
    for key in keys:
        a, b = state_a[key], state_b[key]
        if a.shape != b.shape:
            raise H3FusionError(f"expert_drift: {key} has shapes {tuple(a.shape)} and {tuple(b.shape)}")
        layer = int(_LAYER.search(key).group(1))
        for expert, sq in _expert_squares(key, a.detach().cpu() - b.detach().cpu()).items():
            squares[(layer, expert)] = squares.get((layer, expert), 0.0) + sq
    n_layers = 1 + max(layer for layer, _ in squares)
    n_experts = 1 + max(expert for _, expert in squares)
    out = np.zeros((n_layers, n_experts))
    for (layer, expert), sq in squares.items():
        out[layer, expert] = sq
    return np.sqrt(out)
