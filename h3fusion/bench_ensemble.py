"""`h3fusion bench`, token ensembles: the cost per generated token of a three-expert token ensemble.

A token ensemble mixes its experts' next-token distributions at every step. `TokenEnsemble` runs all experts in
one forward per step (the batch repeated once per expert, peft's mixed-adapter batches applying each row's
LoRA), so the base weights are read once per step. This section times it against one model generating the same
prompts (the evaluation's dense path, Hugging Face `generate`; target: at most 1.5x per generated token, issue
17) and against the experts run in separate passes, one forward and one KV cache per expert per step (the
implementation it replaced), on the evaluation's batch size and cap. Adapters are random LoRA factors of the
experts' rank on the real base, prompts are Alpaca-formatted sentences of random words.
"""

from __future__ import annotations

import copy
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from h3fusion.baselines.ensembles import AdapterBank, TokenEnsemble, mixture_logprobs
from h3fusion.config import GenerationConfig
from h3fusion.evaluation.generate import eos_token_ids, left_pad
from h3fusion.evaluation.lm import HFLanguageModel

TARGETS: dict[str, tuple[str, float]] = {"ensemble.one_pass_vs_one_model": ("<=", 1.5)}
"""Issue 17's target: a three-expert token ensemble at most 1.5x one model per generated token."""


class SeparatePassEnsemble(TokenEnsemble):
    """The same mixture decoded with one forward and one KV cache per expert per step (the replaced code)."""

    def _generate_batch(
        self, encoded: list[list[int]], cfg: GenerationConfig, gen: torch.Generator, weights: torch.Tensor
    ) -> list[str]:
        ids, mask = left_pad(encoded, self.pad_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        eos = torch.tensor(eos_token_ids(self.bank.model, self.tokenizer))
        caches, last = [], []
        for e in self.experts:
            out = self.bank.use(e)(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            caches.append(out.cache)
            last.append(out.logits[:, -1])
        done = torch.zeros(len(encoded), dtype=torch.bool)
        new: list[torch.Tensor] = []
        next_pos = pos[:, -1:] + 1
        for _ in range(cfg.max_new_tokens):
            token = mixture_logprobs(last, weights).argmax(-1)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            new.append(token)
            done |= torch.isin(token, eos)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            for i, e in enumerate(self.experts):
                out = self.bank.use(e)(
                    input_ids=token[:, None], attention_mask=mask, position_ids=next_pos, cache=caches[i],
                    use_cache=True,
                )
                caches[i], last[i] = out.cache, out.logits[:, -1]
            next_pos = next_pos + 1
        return [self._decode(r, eos.tolist()) for r in torch.stack(new, dim=1).tolist()]


def _random_adapters(base: Any, folder: Path, num: int, rank: int, seed: int) -> dict[str, Path]:
    """NUM peft LoRA folders on the FFN projections with non-zero random B (peft starts B at zero)."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for i in range(num):
        torch.manual_seed(seed + i)
        model = get_peft_model(
            copy.deepcopy(base),
            LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["gate_proj", "up_proj", "down_proj"]),
        )
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.02)
        out[f"expert{i}"] = folder / f"expert{i}"
        model.save_pretrained(str(out[f"expert{i}"]))
    return out


def _prompts(count: int, seed: int) -> list[str]:
    from h3fusion.bench_likelihood import _WORDS
    from h3fusion.data import format_prompt

    rng = random.Random(seed)
    return [format_prompt(" ".join(rng.sample(_WORDS, rng.randint(6, 16))).capitalize() + ".") for _ in range(count)]


def _counted(model: torch.nn.Module) -> list[int]:
    """A counter of the forward calls of MODEL (one per decoding step after the prompt's)."""
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def bench_ensemble(profile: Any, plan: Any, base: Any, tokenizer: Any) -> dict[str, Any]:
    """Seconds per decoding step (batch `generation.batch_size`, up to `max_new_tokens` steps) of one model, the
    one-pass ensemble and the separate-pass ensemble; medians over `plan.gen_repeats` rounds."""
    cfg = profile.evaluation.generation.model_copy(update={"temperature": 0.0})
    prompts = _prompts(cfg.batch_size, profile.seed)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = _random_adapters(base, Path(tmp), len(profile.tasks), profile.experts.lora.r, profile.seed)
        bank = AdapterBank(copy.deepcopy(base), adapters)
    dense = HFLanguageModel(base, tokenizer, stop_strings=(), progress=False)
    models = {
        "one_model": (dense, _counted(dense.model)),
        "one_pass": (TokenEnsemble(bank, tokenizer, stop_strings=(), progress=False), None),
        "separate_passes": (SeparatePassEnsemble(bank, tokenizer, stop_strings=(), progress=False), None),
    }
    bank_calls = _counted(bank.model.get_base_model())
    per_step: dict[str, list[float]] = {name: [] for name in models}
    for lm, _ in models.values():  # warm-up, a few tokens each
        lm.generate(prompts[:4], cfg.model_copy(update={"max_new_tokens": 2}), profile.seed)
    for _ in range(plan.gen_repeats):
        for name, (lm, calls) in models.items():
            counter = calls if calls is not None else bank_calls
            before = counter[0]
            start = time.perf_counter()
            lm.generate(prompts, cfg, profile.seed)
            seconds = time.perf_counter() - start
            steps = counter[0] - before
            if name == "separate_passes":
                steps //= len(profile.tasks)  # one forward per expert per step
            per_step[name].append(seconds / max(steps, 1))
    med = {name: sorted(v)[len(v) // 2] for name, v in per_step.items()}
    return {
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "experts": len(profile.tasks),
        **{f"{name}_s_per_step": s for name, s in med.items()},
        "one_pass_vs_one_model": med["one_pass"] / med["one_model"],
        "separate_passes_vs_one_model": med["separate_passes"] / med["one_model"],
        "one_pass_vs_separate_passes": med["one_pass"] / med["separate_passes"],
    }


def print_section(ens: dict[str, Any]) -> None:
    print(
        f"\n7. Token ensemble of {ens['experts']} experts, greedy, batch {ens['batch_size']}, up to "
        f"{ens['max_new_tokens']} new tokens (s per decoding step): one model {ens['one_model_s_per_step']:.3f}, "
        f"one-pass ensemble {ens['one_pass_s_per_step']:.3f} ({ens['one_pass_vs_one_model']:.2f}x), separate "
        f"passes {ens['separate_passes_s_per_step']:.3f} ({ens['separate_passes_vs_one_model']:.2f}x)"
    )
