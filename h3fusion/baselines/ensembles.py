"""Inference-time ensembles of the experts (book chapter 3), as `LanguageModel`s the evaluation treats like any model.

- `AdapterBank`: the base weights loaded ONCE with every expert's LoRA adapter attached (peft multi-adapter);
  `use(name)` switches the active adapter, so n experts cost about one model's memory. `merged(name)` merges
  one adapter into the weights for a block, exactly as the expert's evaluation does (`merge_and_unload`).
- `TokenEnsemble`: at every decoding step each expert gives a next-token distribution p_i (all experts in one
  forward: the batch repeated once per expert, peft's mixed-adapter batches applying each row's LoRA); the
  ensemble decodes from p = sum_i w_i p_i (probability averaging). Weights are uniform, or PackLLM-sim
  (Mavromatis et al., "Pack of LLMs: Model Fusion at Test-Time via Perplexity Optimization", arXiv 2404.11531,
  eq. for PackLLM-sim): w_i = softmax_i(-log PPL_i(prompt) / tau), where log PPL_i is expert i's mean negative
  log-likelihood of the prompt's tokens, computed once per prompt before decoding. With temperature T > 0 each
  expert's logits are divided by T before mixing, then the mixture is sampled. Its likelihood of a text mixes the
  experts' per-token log-probabilities, read from what the experts' own evaluations stored when it can.

The output-level ensemble that picks one expert's answer is `h3fusion.baselines.select`; the experts' answers it
starts from, `h3fusion.baselines.answers`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from h3fusion.config import GenerationConfig
from h3fusion.evaluation.generate import (
    DEFAULT_STOP_STRINGS,
    cut_at_stop,
    encode_prompts,
    eos_token_ids,
    generation_batches,
    left_pad,
)

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from h3fusion.evaluation.logprob_cache import TokenLogprobCache

Weighting = Literal["uniform", "perplexity"]


class AdapterBank:
    """One base model with n named LoRA adapters; `use(name)` activates one (the base weights are shared)."""

    def __init__(self, base_model: PreTrainedModel, adapters: Mapping[str, str | Path]) -> None:
        from peft import PeftModel

        if not adapters:
            raise ValueError("an adapter bank needs at least one adapter")
        self.names: tuple[str, ...] = tuple(adapters)
        first, *rest = self.names
        model = PeftModel.from_pretrained(base_model, str(adapters[first]), adapter_name=first)
        for name in rest:
            model.load_adapter(str(adapters[name]), adapter_name=name)
        self.model: PeftModel = model.eval()

    def use(self, name: str) -> PeftModel:
        self.model.set_adapter(name)
        return self.model

    def add(self, name: str, folder: str | Path) -> None:
        """Attach one more adapter (e.g. the trained fuser of H3Fusion-Instruct)."""
        self.model.load_adapter(str(folder), adapter_name=name)
        self.model.eval()

    @contextmanager
    def merged(self, name: str) -> Iterator[PeftModel]:
        """Adapter NAME merged into the base weights inside the block (W + scale * B @ A, peft's `merge`, the
        same sum `merge_and_unload` makes for the expert's evaluation); the exact base weights come back after.

        Why: an expert's answers generated here are then the very tokens its evaluation generated, so cached
        evaluation answers can stand in for them; a merged forward is also cheaper than base + LoRA. Costs one
        copy of the adapted weights while inside."""
        import torch
        from peft.tuners.lora import LoraLayer

        if name not in self.model.peft_config:
            raise ValueError(f"adapter {name!r} is not loaded in the bank ({list(self.model.peft_config)})")
        model = self.use(name)
        layers = [m for m in model.modules() if isinstance(m, LoraLayer) and name in m.lora_A]
        saved = [_base_params(m) for m in layers]
        try:
            with torch.no_grad():
                for m in layers:
                    m.merge(adapter_names=[name])
            yield model
        finally:
            for m, params in zip(layers, saved, strict=False):
                base = m.get_base_layer()
                for attr, data in params.items():
                    getattr(base, attr).data = data
                if name in m.merged_adapters:
                    m.merged_adapters.remove(name)

    @contextmanager
    def base(self) -> Iterator[PeftModel]:
        """The base model alone (every adapter disabled) inside the block."""
        with self.model.disable_adapter():
            yield self.model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _base_params(layer: Any) -> dict[str, torch.Tensor]:
    """Copies of a LoRA layer's base weight (and bias), to restore them bit for bit after a merge."""
    base = layer.get_base_layer()
    out = {"weight": base.weight.data.clone()}
    if getattr(base, "bias", None) is not None:
        out["bias"] = base.bias.data.clone()
    return out


def perplexity_weights(prompt_nll: torch.Tensor, temperature: float) -> torch.Tensor:
    """PackLLM-sim weights from [batch, experts] mean prompt NLLs (= log perplexities): softmax(-nll / tau)."""
    import torch

    if temperature <= 0:
        raise ValueError(f"PackLLM temperature must be > 0, got {temperature}")
    return torch.softmax(-prompt_nll / temperature, dim=-1)


def mixture_logprobs(logits: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """log sum_i w_i softmax(logits_i): the log of the weighted probability average, [batch, vocab]."""
    import torch

    logp = torch.stack([torch.log_softmax(lg.float(), dim=-1) for lg in logits], dim=1)  # [B, n, V]
    return torch.logsumexp(logp + weights.clamp_min(1e-30).log().unsqueeze(-1), dim=1)


class TokenEnsemble:
    """Token-level probability averaging of the bank's adapters (uniform or PackLLM-sim weights)."""

    def __init__(
        self,
        bank: AdapterBank,
        tokenizer: PreTrainedTokenizerBase,
        *,
        weighting: Weighting = "uniform",
        temperature: float = 1.0,
        experts: Sequence[str] | None = None,
        stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
        logprob_batch_size: int = 16,
        token_logprobs: dict[Any, dict[str, Any]] | None = None,
        expert_logprobs: tuple[TokenLogprobCache, Mapping[str, str]] | None = None,
        progress: bool = True,
    ) -> None:
        """`logprob_batch_size`: prompts per batch of the PackLLM prompt pass (it keeps every position's logits).
        `token_logprobs`: a store of each expert's prompt NLLs and continuation token log-probabilities per
        scored list, to share between ensembles of the SAME bank that differ only in their weighting (uniform and
        PackLLM score the same MC choices with the same expert forwards; only the mixing weights differ).
        `expert_logprobs`: (the profile's token log-prob cache, {expert: its artifact identity}); an expert's
        per-token log-probabilities are then read from what its own evaluation stored, and scored with the
        adapter merged (as its evaluation scores it) and stored when missing."""
        if weighting not in ("uniform", "perplexity"):
            raise ValueError(f"unknown weighting {weighting!r}; use 'uniform' or 'perplexity'")
        self.bank, self.tokenizer = bank, tokenizer
        self._token_logprobs = token_logprobs if token_logprobs is not None else {}
        self.expert_logprobs = expert_logprobs
        self.weighting, self.temperature = weighting, temperature
        self.experts = tuple(experts or bank.names)
        self.stop_strings = tuple(stop_strings)
        self.logprob_batch_size = logprob_batch_size
        self.progress = progress
        self._scored: dict[tuple[tuple[str, ...], tuple[str, ...]], list[float]] = {}

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    def _weights(self, prompt_nll: torch.Tensor) -> torch.Tensor:
        import torch

        if self.weighting == "uniform":
            return torch.full_like(prompt_nll, 1.0 / prompt_nll.shape[-1])
        return perplexity_weights(prompt_nll, self.temperature)

    def prompt_weights(self, prompts: list[str]) -> torch.Tensor:
        """The ensemble weights of each prompt, [prompts, experts] (rows sum to one)."""
        import torch

        if self.weighting == "uniform":  # no prompt pass needed
            return torch.full((len(prompts), len(self.experts)), 1.0 / len(self.experts))
        return self._weights(self._prompt_nll(prompts))

    def _prompt_nll(self, prompts: list[str]) -> torch.Tensor:
        """Each expert's mean NLL of each prompt's tokens (from the second on), [prompts, experts]; the prompts'
        shared prefix (a few-shot primer) is scored once per expert."""
        import torch

        from h3fusion.evaluation.lm import HFLanguageModel

        columns = []
        for e in self.experts:
            lm = HFLanguageModel(self.bank.use(e), self.tokenizer, progress=False)
            per_token = lm.prompt_token_logprobs(prompts, batch_size=self.logprob_batch_size)
            columns.append([-sum(t) / max(len(t), 1) for t in per_token])
        return torch.tensor(columns, dtype=torch.float32).T  # [prompts, experts]

    def generate(
        self, prompts: list[str], cfg: GenerationConfig, seed: int, desc: str = "ensemble generate"
    ) -> list[str]:
        import torch

        from h3fusion.progress import progress

        if not prompts:
            return []
        encoded = encode_prompts(self.tokenizer, prompts)
        answers = [""] * len(prompts)
        gen = torch.Generator().manual_seed(seed)
        weights = self.prompt_weights(prompts)  # uniform: no prompt pass
        bar = progress(total=len(prompts), desc=desc, show=self.progress, unit="prompt")
        with torch.inference_mode():
            for batch in generation_batches([len(e) for e in encoded], cfg.batch_size, cfg.max_new_tokens):
                texts = self._generate_batch([encoded[i] for i in batch], cfg, gen, weights[batch])
                for i, text in zip(batch, texts, strict=True):
                    answers[i] = text
                bar.update(len(batch))
        bar.close()
        return answers

    def _generate_batch(
        self, encoded: list[list[int]], cfg: GenerationConfig, gen: torch.Generator, weights: torch.Tensor
    ) -> list[str]:
        """Greedy (or seeded sampling) decoding from the mixture with `weights` [prompts, experts].

        Every expert runs in ONE forward per step: the batch is repeated once per expert (expert-major rows)
        and peft's mixed-adapter batches (`adapter_names`) apply each row's own LoRA, so the base weights are
        read once per step for all experts instead of once per expert (one KV cache of n x B rows)."""
        import torch

        device = self.bank.device
        n, rows = len(self.experts), len(encoded)
        ids, mask = left_pad(encoded, self.pad_id)
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        eos = torch.tensor(eos_token_ids(self.bank.model, self.tokenizer), device=device)
        names = [e for e in self.experts for _ in range(rows)]
        model = self.bank.model

        def forward(tokens: torch.Tensor, cache: Any = None) -> Any:
            return model(
                input_ids=tokens.repeat(n, 1),
                attention_mask=mask.repeat(n, 1),
                position_ids=pos.repeat(n, 1),
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
                adapter_names=names,
            )

        out = forward(ids)
        weights = weights.to(device)
        done = torch.zeros(rows, dtype=torch.bool, device=device)
        new: list[torch.Tensor] = []
        for _ in range(cfg.max_new_tokens):
            last = list(out.logits[:, -1].unflatten(0, (n, rows)).unbind(0))
            scaled = [lg / cfg.temperature for lg in last] if cfg.temperature > 0 else last
            logp = mixture_logprobs(scaled, weights)
            if cfg.temperature > 0:
                token = torch.multinomial(logp.exp().cpu(), 1, generator=gen).squeeze(-1).to(device)
            else:
                token = logp.argmax(-1)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            new.append(token)
            done |= torch.isin(token, eos) | self._hit_stop(torch.stack(new, dim=1))
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            out = forward(token[:, None], out.cache)
        rows_out = torch.stack(new, dim=1).tolist() if new else [[] for _ in encoded]
        eos_ids = eos.tolist()
        return [cut_at_stop(self._decode(r, eos_ids), self.stop_strings) for r in rows_out]

    def _decode(self, tokens: list[int], eos_ids: list[int]) -> str:
        for j, t in enumerate(tokens):
            if t in eos_ids:
                tokens = tokens[:j]
                break
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _hit_stop(self, new: torch.Tensor) -> torch.Tensor:
        """Rows whose generated tail contains a stop string (a new turn of the template)."""
        import torch

        if not self.stop_strings:
            return torch.zeros(new.shape[0], dtype=torch.bool, device=new.device)
        tails = self.tokenizer.batch_decode(new[:, -16:], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop_strings) for t in tails], device=new.device)

    def continuation_logprobs(self, prompts: list[str], continuations: list[str]) -> list[float]:
        """sum_t log sum_i w_i p_i(token t | prompt, earlier tokens): the mixture's likelihood of each continuation.

        Remembered per (prompts, continuations) list: one shared uniform mixture scores TruthfulQA MC once for
        both ensemble-uniform and ensemble-select (whose MC is that mixture's), with the same batches."""
        if len(prompts) != len(continuations):
            raise ValueError(
                f"{len(prompts)} prompts but {len(continuations)} continuations; pass one per pair"
            )
        key = (tuple(prompts), tuple(continuations))
        if key not in self._scored:
            self._scored[key] = self._continuation_logprobs(prompts, continuations)
        return list(self._scored[key])

    def _continuation_logprobs(self, prompts: list[str], continuations: list[str]) -> list[float]:
        """Each expert scores every continuation token by token against its cached prompt (one prompt pass per
        distinct prompt, `HFLanguageModel`); the tokens' probabilities are then mixed with the prompt's weights."""
        import torch


        unique = list(dict.fromkeys(prompts))
        # the experts' forwards, shared with ensembles of the same bank and other weights
        stored = self._token_logprobs.setdefault((self.experts, tuple(prompts), tuple(continuations)), {})
        if "tokens" not in stored:
            stored["tokens"] = [self._expert_token_logprobs(e, prompts, continuations) for e in self.experts]
        if self.weighting != "uniform" and "prompt_nll" not in stored:  # uniform weights need no prompt pass
            stored["prompt_nll"] = self._prompt_nll(unique)
        nll = stored.get("prompt_nll", torch.zeros(len(unique), len(self.experts)))
        log_w = self._weights(nll).double().clamp_min(1e-30).log()  # [unique prompts, n]
        row = {p: i for i, p in enumerate(unique)}
        out = []
        for k, prompt in enumerate(prompts):
            lp = torch.tensor([tokens[k] for tokens in stored["tokens"]], dtype=torch.float64)  # [n, tokens]
            out.append(float(torch.logsumexp(lp + log_w[row[prompt]][:, None], dim=0).sum()))
        return out

    def _expert_token_logprobs(self, expert: str, prompts: list[str], continuations: list[str]) -> list[list[float]]:
        """One expert's per-token log-probabilities of the call: from the cache of expert evaluations when there
        is one (computed merged and stored on a miss), else from the bank's active adapter."""
        from h3fusion.evaluation.lm import HFLanguageModel

        if self.expert_logprobs is None:
            lm = HFLanguageModel(self.bank.use(expert), self.tokenizer, progress=False)
            return lm.continuation_token_logprobs(prompts, continuations)
        cache, identities = self.expert_logprobs
        hit = cache.get(identities[expert], prompts, continuations)
        if hit is not None:
            return hit
        with self.bank.merged(expert) as model:
            lm = HFLanguageModel(model, self.tokenizer, progress=False)
            lm.store_logprobs(cache, identities[expert])
            return lm.continuation_token_logprobs(prompts, continuations)


# ---------------------------------------------------------------------------------------------- selection
