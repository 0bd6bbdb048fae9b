"""The data-mix LoRA baseline: one LoRA trained on the fusion stage's mixed data with the whole pipeline's budget.

It answers the question readers ask first, "mix the data or merge the models?" (Yang et al. 2025, arXiv
2502.06876): the experts' LoRA (`experts.lora`, the same target modules) on the base model, trained the way an
expert is (stage 1's Trainer, `experts.train`'s batch size and learning rate) on `build_mixed_dataset`, the data
fusion trains on, for as many optimiser steps as the three experts and fusion together. The adapter is merged
into a dense folder like the merges; Trainer checkpoints live in ``baselines/.work-lora-data-mix/`` until it is
complete, so a killed build resumes from its last complete checkpoint.
"""

from __future__ import annotations

import math
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h3fusion.config import TRAINING_DATA_KEYS, Profile, TrainConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Trainer

DATA_MIX = "lora-data-mix"


def stage_steps(train: TrainConfig, examples: int) -> int:
    """Optimiser steps of one training stage: `max_steps`, else its epochs over `examples` (on one process)."""
    if train.max_steps is not None:
        return train.max_steps
    assert train.epochs is not None  # TrainConfig sets exactly one of the two
    return math.ceil(train.epochs * math.ceil(examples / (train.batch_size * train.grad_accum)))


def step_budget(profile: Profile) -> dict[str, int]:
    """H3Fusion-MoE's training steps: {expert: its steps, "fusion": fusion's, "total": their sum}.

    Epochs are counted over `data.train_examples` (what a source lacks or tokenisation drops aside), so the budget,
    and with it the baseline's hash, follows from the profile alone."""
    budget = {
        e: stage_steps(profile.experts.train, profile.expert_train_examples(e)) for e in profile.expert_names
    }
    fusion_examples = sum(profile.data.train_examples[t] for t in profile.tasks)
    budget["fusion"] = stage_steps(profile.fusion.train, fusion_examples)
    budget["total"] = sum(budget.values())
    return budget


def data_mix_train(profile: Profile) -> TrainConfig:
    """`experts.train` (batch size, learning rate, schedule) run for the pipeline's total steps."""
    return profile.experts.train.model_copy(
        update={"max_steps": step_budget(profile)["total"], "epochs": None}
    )


def data_mix_params(profile: Profile) -> dict[str, Any]:
    """What determines the data-mix LoRA (its hash and its baseline.json), the budget stated in words."""
    budget, train = step_budget(profile), data_mix_train(profile)
    experts = " + ".join(str(budget[e]) for e in profile.expert_names)
    return {
        "recipe": "one LoRA (experts.lora) on the fusion's mixed data, trained like an expert",
        "budget": f"{experts} expert steps + {budget['fusion']} fusion steps = {budget['total']} steps at the "
        f"experts' batch size {train.batch_size} (x{train.grad_accum} accumulation) and learning rate {train.lr}",
        "steps": budget,
        "lora": profile.experts.lora.model_dump(mode="json"),
        "train": train.model_dump(mode="json"),
        "data": profile.section_hash(*TRAINING_DATA_KEYS),
        "tasks": list(profile.tasks),
        "seed": profile.seed,
    }


def data_mix_trainer(
    profile: Profile, work: Path, callbacks: list[Any] | None = None
) -> tuple[Trainer, Any, PreTrainedTokenizerBase]:
    """The seeded base with the experts' LoRA and stage 1's Trainer on the mixed dataset: (trainer, model, tokenizer)."""
    from transformers import Trainer, set_seed

    from h3fusion.data import PadCollator, build_mixed_dataset
    from h3fusion.experts import LMCollator, lora_model
    from h3fusion.models import load_base
    from h3fusion.training import hide_progress, training_arguments

    set_seed(profile.seed)
    base, tok = load_base(profile)
    base.train()
    model = lora_model(profile, base)
    trainer = Trainer(
        model=model,
        args=training_arguments(data_mix_train(profile), profile.seed, work),
        train_dataset=build_mixed_dataset(profile, tok),
        data_collator=LMCollator(PadCollator(tok.pad_token_id)),
        callbacks=callbacks,
    )
    hide_progress(trainer)
    return trainer, model, tok


def build_data_mix(profile: Profile, name: str, tmp: Path, shared: Any) -> dict[str, Any]:
    """`runner.build_baseline`'s builder: train (or resume) the LoRA, write base + its merged delta into `tmp`."""
    from h3fusion.baselines.runner import baseline_dir, baseline_hash
    from h3fusion.lora_files import ADAPTER_WEIGHTS
    from h3fusion.training import loss_log, prepare_work_dir, train_from

    work = baseline_dir(profile, name).with_name(f".work-{name}")
    resume = prepare_work_dir(work, baseline_hash(profile, name), ADAPTER_WEIGHTS)
    trainer, model, tok = data_mix_trainer(profile, work)
    dataset = trainer.train_dataset
    print(
        f"[baselines] {name}: {len(dataset)} mixed examples, {trainer.args.max_steps} steps"
        + (f", resuming from {resume}" if resume else "")
    )
    train_loss_mean = train_from(trainer, resume)
    losses = loss_log(trainer)
    trainable, _ = model.get_nb_trainable_parameters()
    model.merge_and_unload().save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "global_step": trainer.state.global_step,
        "train_examples": len(dataset),
        "sources": dict(Counter(dataset.sources)),
        "train_loss_mean": train_loss_mean,
        "final_train_loss": losses[-1]["loss"] if losses else None,
        "loss_log": losses,
        "trainable_parameters": trainable,
        "resumed_from": Path(resume).name if resume else None,
    }
