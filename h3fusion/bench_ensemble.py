"""`h3fusion bench`, token ensembles: the cost per generated token of a three-expert token ensemble.

A token ensemble mixes its experts' next-token distributions at every step. `TokenEnsemble` runs all experts in
one forward per step (the batch repeated once per expert, peft's mixed-adapter batches applying each row's
LoRA), so the base weights are read once per step. This section times it against one model generating the same
prompts (the evaluation's dense path, Hugging Face `generate`; target: at most 1.5x per generated token, issue
17) and against the experts run in separate passes, one forward and one KV cache per expert per step (the
implementation it replaced), on the evaluation's batch size and cap, and again at batch 1. Both regimes also
time one model on n times the rows, the floor no sharing of the base can beat (`bench_ensemble`). Adapters are
random LoRA factors of the experts' rank on the real base, prompts are Alpaca-formatted sentences of random words.
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
RATIOS = ("one_pass_vs_one_model", "separate_passes_vs_one_model", "same_rows_vs_one_model", "one_pass_vs_same_rows")
"""The ratios of each regime that `h3fusion bench` reports."""


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


def _seconds_per_step(
    models: dict[str, tuple[Any, list[int]]], prompts: list[str], cfg: GenerationConfig, seed: int, repeats: int,
    forwards_per_step: dict[str, int],
) -> dict[str, float]:
    """Median seconds per decoding step of each model on PROMPTS (forward calls counted by hooks)."""
    per_step: dict[str, list[float]] = {name: [] for name in models}
    for lm, _ in models.values():  # warm-up, a few tokens each
        lm.generate(prompts[:4], cfg.model_copy(update={"max_new_tokens": 2}), seed)
    for _ in range(repeats):
        for name, (lm, counter) in models.items():
            before = counter[0]
            start = time.perf_counter()
            lm.generate(prompts, cfg, seed)
            seconds = time.perf_counter() - start
            steps = (counter[0] - before) // forwards_per_step.get(name, 1)
            per_step[name].append(seconds / max(steps, 1))
    return {name: sorted(v)[len(v) // 2] for name, v in per_step.items()}


def _regime(
    dense: Any, ensembles: dict[str, tuple[Any, list[int]]], dense_calls: list[int], prompts: list[str],
    cfg: GenerationConfig, seed: int, repeats: int, n: int,
) -> dict[str, float]:
    """Seconds per step of one model, the ensembles, and one model on n x the rows (`same_rows`), and ratios."""
    separate = {"separate_passes": n}  # one forward per expert per step
    med = _seconds_per_step({"one_model": (dense, dense_calls), **ensembles}, prompts, cfg, seed, repeats, separate)
    wide = cfg.model_copy(update={"batch_size": n * cfg.batch_size})
    med["same_rows"] = _seconds_per_step(
        {"same_rows": (dense, dense_calls)}, [q for q in prompts for _ in range(n)], wide, seed, repeats, {}
    )["same_rows"]
    return {
        **{f"{name}_s_per_step": s for name, s in med.items()},
        "one_pass_vs_one_model": med["one_pass"] / med["one_model"],
        "separate_passes_vs_one_model": med["separate_passes"] / med["one_model"],
        "one_pass_vs_separate_passes": med["one_pass"] / med["separate_passes"],
        "same_rows_vs_one_model": med["same_rows"] / med["one_model"],
        "one_pass_vs_same_rows": med["one_pass"] / med["same_rows"],
    }


def bench_ensemble(profile: Any, plan: Any, base: Any, tokenizer: Any) -> dict[str, Any]:
    """Seconds per decoding step (up to `max_new_tokens` steps) of one model, the one-pass ensemble and the
    separate-pass ensemble, medians over `plan.gen_repeats` rounds, at the evaluation's batch size B (the target's
    setting) and at batch 1.

    Each regime also times one model decoding n x the rows (`same_rows`: the ensemble's arithmetic, the base
    weights read once per step). Every expert's rows carry their own hidden states, so no sharing makes an
    ensemble cheaper than that floor, and the floor says what sharing the base can buy on the machine at hand:
    where decoding is bound by reading the weights (small batches of a large model on a GPU), n rows cost about
    what one row costs; where it is bound by arithmetic (the 2-core CPU this was measured on, even at batch 1),
    up to n times.
    """
    n = profile.num_experts
    cfg = profile.evaluation.generation.model_copy(update={"temperature": 0.0})
    prompts = _prompts(cfg.batch_size, profile.seed)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = _random_adapters(base, Path(tmp), n, profile.experts.lora.r, profile.seed)
        bank = AdapterBank(copy.deepcopy(base), adapters)
    dense = HFLanguageModel(base, tokenizer, stop_strings=(), progress=False)
    dense_calls, bank_calls = _counted(dense.model), _counted(bank.model.get_base_model())
    ensembles = {
        "one_pass": (TokenEnsemble(bank, tokenizer, stop_strings=(), progress=False), bank_calls),
        "separate_passes": (SeparatePassEnsemble(bank, tokenizer, stop_strings=(), progress=False), bank_calls),
    }
    args = (profile.seed, plan.gen_repeats, n)
    single = cfg.model_copy(update={"batch_size": 1})
    return {
        "batch_size": cfg.batch_size,
        "max_new_tokens": cfg.max_new_tokens,
        "experts": n,
        **_regime(dense, ensembles, dense_calls, prompts, cfg, *args),
        "batch1": _regime(dense, ensembles, dense_calls, prompts[: plan.gen_repeats + 1], single, *args),
    }


def print_section(ens: dict[str, Any]) -> None:
    print(
        f"\n7. Token ensemble of {ens['experts']} experts, greedy, batch {ens['batch_size']}, up to "
        f"{ens['max_new_tokens']} new tokens (s per decoding step): one model {ens['one_model_s_per_step']:.3f}, "
        f"one-pass ensemble {ens['one_pass_s_per_step']:.3f} ({ens['one_pass_vs_one_model']:.2f}x), separate "
        f"passes {ens['separate_passes_s_per_step']:.3f} ({ens['separate_passes_vs_one_model']:.2f}x); one model "
        f"on {ens['experts']}x the rows (the floor) {ens['same_rows_s_per_step']:.3f} "
        f"({ens['same_rows_vs_one_model']:.2f}x; one-pass / floor {ens['one_pass_vs_same_rows']:.2f})"
    )
    b1 = ens["batch1"]
    print(
        f"   at batch 1: one model {b1['one_model_s_per_step']:.4f}, one-pass {b1['one_pass_s_per_step']:.4f} "
        f"({b1['one_pass_vs_one_model']:.2f}x), separate passes {b1['separate_passes_s_per_step']:.4f} "
        f"({b1['separate_passes_vs_one_model']:.2f}x); one model on {ens['experts']} rows "
        f"{b1['same_rows_s_per_step']:.4f} ({b1['same_rows_vs_one_model']:.2f}x; one-pass / floor "
        f"{b1['one_pass_vs_same_rows']:.2f})"
    )
