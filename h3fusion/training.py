"""What both training stages share: Trainer arguments from a profile section, resumable work folders,
and the loss log read back from the Trainer's state."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h3fusion.config import TrainConfig
from h3fusion.progress import bars_disabled

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments

_WORK_HASH = "config_hash.txt"


def training_arguments(
    train: TrainConfig, seed: int, output_dir: Path, **overrides: Any
) -> TrainingArguments:
    """`TrainingArguments` from a profile's `train` section (CPU, GPU or torchrun alike; no reporting)."""
    import torch
    from transformers import TrainingArguments

    length = (
        {"max_steps": train.max_steps} if train.max_steps is not None else {"num_train_epochs": train.epochs}
    )
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        **length,
        per_device_train_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        weight_decay=train.weight_decay,
        warmup_steps=train.warmup_ratio,  # a float < 1 is a ratio of the total steps (transformers 5)
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=2,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        report_to="none",
        disable_tqdm=bars_disabled(),
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,  # the collator decides what the model sees
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=False,
        # without this, torchrun on CPU would run independent copies instead of DDP over gloo
        use_cpu=not torch.cuda.is_available(),
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def hide_progress(trainer: Trainer) -> None:
    """Drop the Trainer's progress bar or table and its printed logs when bars are hidden (executed notebooks):
    they duplicate the loss curves the chapters plot from `loss_log`."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.utils.notebook import NotebookProgressCallback

    if bars_disabled():
        for callback in (PrinterCallback, ProgressCallback, NotebookProgressCallback):
            trainer.remove_callback(callback)


def prepare_work_dir(work: Path, config_hash: str) -> str | None:
    """The checkpoint to resume from, or None. Checkpoints of another config are discarded, never resumed."""
    from transformers.trainer_utils import get_last_checkpoint

    marker = work / _WORK_HASH
    if work.exists() and (not marker.exists() or marker.read_text().strip() != config_hash):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(config_hash)
    return get_last_checkpoint(str(work))


def loss_log(trainer: Trainer, keys: tuple[str, ...] = ("loss",)) -> list[dict[str, float]]:
    """The logged loss terms per step, from the Trainer's history."""
    return [
        {"step": int(e["step"]), **{k: float(e[k]) for k in keys if k in e}}
        for e in trainer.state.log_history
        if "loss" in e and "step" in e
    ]
