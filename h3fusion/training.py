"""What both training stages share: Trainer arguments from a profile section, resumable work folders,
training that resumes from the last complete checkpoint, and the loss log read back from the Trainer's state."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h3fusion.config import TrainConfig
from h3fusion.progress import bars_disabled

if TYPE_CHECKING:
    from transformers import Trainer, TrainingArguments

_WORK_HASH = "config_hash.txt"
TRAINER_STATE = "trainer_state.json"
_OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt")


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


def is_complete_checkpoint(folder: Path, weights: str) -> bool:
    """True when the Trainer can resume from `folder` (`weights`: the stage's model file in it).

    The Trainer writes trainer_state.json last, after the weights, optimizer, scheduler and RNG state, so a
    readable one means those were written whole; a kill inside a save leaves no or a truncated one, and a kill
    while old checkpoints are deleted leaves one without some of the other files.
    """
    try:
        json.loads((folder / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        return False
    needed = (weights, *_OPTIMIZER_FILES)
    return all((folder / name).is_file() for name in needed) and any(folder.glob("rng_state*.pth"))


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.removeprefix("checkpoint-"))


def prepare_work_dir(work: Path, config_hash: str, weights: str) -> str | None:
    """The last complete checkpoint to resume from, or None. Checkpoints of another config are discarded, never
    resumed; incomplete ones (a kill while saving) are removed, so the Trainer never tries to load one."""
    marker = work / _WORK_HASH
    if work.exists() and (not marker.exists() or marker.read_text().strip() != config_hash):
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(config_hash)
    checkpoints = sorted(
        (p for p in work.glob("checkpoint-*") if p.is_dir() and p.name.removeprefix("checkpoint-").isdigit()),
        key=_step,
    )
    complete = []
    for folder in checkpoints:
        if is_complete_checkpoint(folder, weights):
            complete.append(folder)
        else:
            print(f"[training] removing {folder.name}: incomplete (the run was killed while saving it)")
            shutil.rmtree(folder)
    return str(complete[-1]) if complete else None


def _logged_loss_sum(log_history: list[dict[str, Any]], up_to_step: int) -> float:
    """Sum of the per-step losses up to a step, from the logged means (each over the steps since the last log)."""
    total, previous = 0.0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry and entry["step"] <= up_to_step:
            total += entry["loss"] * (entry["step"] - previous)
            previous = entry["step"]
    return total


def train_from(trainer: Trainer, checkpoint: str | None) -> float:
    """Train, resuming from `checkpoint` when given; returns the mean training loss over all steps of the run.

    A checkpoint of the last step (the run was killed after training, e.g. while exporting) is loaded instead
    of resumed: the Trainer would run, and count, one more step at learning rate 0. After a resume the Trainer's
    mean covers only the steps it ran in this call, so the earlier steps' logged losses are added back.
    """
    from transformers import TrainerState

    if checkpoint is None:
        return trainer.train().training_loss
    state = TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE))
    start = state.global_step
    if start >= state.max_steps:
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = state
        return _logged_loss_sum(state.log_history, start) / start
    result = trainer.train(resume_from_checkpoint=checkpoint)
    steps = trainer.state.global_step
    return (
        _logged_loss_sum(trainer.state.log_history, start) + result.training_loss * (steps - start)
    ) / steps


def loss_log(trainer: Trainer, keys: tuple[str, ...] = ("loss",)) -> list[dict[str, float]]:
    """The logged loss terms per step, from the Trainer's history."""
    return [
        {"step": int(e["step"]), **{k: float(e[k]) for k in keys if k in e}}
        for e in trainer.state.log_history
        if "loss" in e and "step" in e
    ]
