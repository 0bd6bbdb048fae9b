"""Stage 1: LoRA-align the profile's experts (peft + the transformers Trainer).

An expert (`Profile.expert_specs`: by default one per task, named after it) is the base model with LoRA on the
FFN projections only (`experts.lora.target_modules`), trained on its dimension's examples (its own seeded sample,
`data.load_expert_examples`) with the loss on response tokens. Artifacts: ``runs/<profile>/experts/<name>/``
holds the peft adapter folder and ``manifest.json`` (loss log, final loss, config hash), written atomically; a
complete expert with the same config hash is skipped. Trainer checkpoints go to a working folder
``experts/.work-<name>/``, so a killed run resumes from its last complete checkpoint when re-run.

`load_expert_adapter_weights` reads the trained deltas with `h3fusion.moe.load_adapter` (through `h3fusion.lora_files`) (A, B and alpha/r per
layer and projection), not through peft module paths.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from h3fusion.artifacts import (
    MANIFEST,
    Stopwatch,
    atomic_dir,
    atomic_write_json,
    check_weight_files,
    is_complete,
    make_manifest,
)
from h3fusion.config import TRAINING_DATA_KEYS, ConfigError, Profile, shown_path
from h3fusion.errors import ArtifactError
from h3fusion.lora_files import ADAPTER_WEIGHTS
from h3fusion.training import hide_progress, loss_log, prepare_work_dir, train_from, training_arguments

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer

    from h3fusion.config import LoraConfig as LoraSection
    from h3fusion.moe.upcycle import ExpertAdapter

HASHED_SECTIONS = (*TRAINING_DATA_KEYS, "model", "experts", "seed", "tasks")
"""The profile sections an expert depends on: a change in any of them re-trains it."""


# ---------------------------------------------------------------------------------------------- paths


def expert_dir(profile: Profile, expert: str) -> Path:
    """The finished expert: peft adapter folder + manifest.json."""
    return profile.run_dir / "experts" / expert


def work_dir(profile: Profile, expert: str) -> Path:
    """Trainer checkpoints of an expert still in training (removed once the expert is complete)."""
    return profile.run_dir / "experts" / f".work-{expert}"


def expert_hash(profile: Profile) -> str:
    return profile.section_hash(*HASHED_SECTIONS)


def _experts(profile: Profile, expert: str) -> list[str]:
    if expert == "all":
        return profile.expert_names
    if expert not in profile.expert_names:
        raise ConfigError(
            f"{expert!r} is not one of this profile's experts {profile.expert_names}; use one of them or 'all'"
        )
    return [expert]


# ---------------------------------------------------------------------------------------------- training


def _lora(profile: Profile, expert: str | None) -> LoraSection:
    """The LoRA an expert trains with (its own, else `experts.lora`); without an expert, `experts.lora`."""
    return profile.experts.lora if expert is None else profile.expert_lora(expert)


def _lora_key(profile: Profile, expert: str | None) -> str:
    """Where the LoRA an expert trains with is set, as error messages name it."""
    if expert is None or profile.expert_spec(expert).lora is None:
        return "experts.lora"
    return f"experts.members[{profile.expert_names.index(expert)}].lora"


def check_target_modules(profile: Profile, model: nn.Module, expert: str | None = None) -> None:
    """`experts.lora.target_modules` (or EXPERT's own) must name modules of the base (as peft matches them: the
    name or its last dotted parts) and include an FFN projection, which upcycling reads; otherwise peft fails with
    a traceback or experts train that `fuse` then refuses."""
    from torch import nn

    from h3fusion.moe.low_rank import PROJECTIONS

    targets = _lora(profile, expert).target_modules
    key = _lora_key(profile, expert)
    names = [n for n, _ in model.named_modules()]
    valid = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unknown:
        raise ConfigError(
            f"`{key}.target_modules` = {list(targets)}: {unknown} name no module of the base model "
            f"{profile.model.base!r}; its linear modules are {valid} (fusion needs {list(PROJECTIONS)})"
        )
    if not any(t.rsplit(".", 1)[-1] in PROJECTIONS for t in targets):
        raise ConfigError(
            f"`{key}.target_modules` = {list(targets)} adapts no FFN projection, so `h3fusion fuse` could not "
            f"upcycle the experts; include {list(PROJECTIONS)} (the default), e.g. "
            f"--set '{key}.target_modules=[{', '.join(PROJECTIONS)}]'"
        )


def lora_model(profile: Profile, model: PreTrainedModel, expert: str | None = None) -> Any:
    """`model` with the LoRA of EXPERT (its own, else `experts.lora`) added; without an expert, `experts.lora`
    (the data-mix baseline's adapter)."""
    from peft import LoraConfig, get_peft_model

    check_target_modules(profile, model, expert)
    lora = _lora(profile, expert)
    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


class LMCollator:
    """The data collator without `task_labels`: stage 1 is plain SFT and the LM's forward takes no task label."""

    def __init__(self, pad: Any) -> None:
        self.pad = pad

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.pad(features)
        batch.pop("task_labels", None)
        return batch


def _write_expert(
    profile: Profile,
    expert: str,
    model: Any,
    tok: PreTrainedTokenizerBase,
    trainer: Trainer,
    info: dict[str, Any],
) -> None:
    config_hash, lora = expert_hash(profile), _lora(profile, expert)
    losses = loss_log(trainer)
    with atomic_dir(expert_dir(profile, expert)) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        manifest = make_manifest(
            profile,
            config_hash,
            info.pop("wall_time_s"),
            stage="experts",
            task=expert,
            dimension=profile.expert_spec(expert).dimension,
            base=profile.model.base,
            lora=lora.model_dump(mode="json"),
            scale=lora.scale,
            final_train_loss=losses[-1]["loss"] if losses else None,
            loss_log=losses,
            global_step=trainer.state.global_step,
            **info,
        )
        atomic_write_json(tmp / MANIFEST, manifest)


def train_expert(profile: Profile, expert: str, callbacks: list[Any] | None = None) -> Path:
    """Train (or resume) one expert and write its artifact; returns the artifact folder.

    `callbacks` are extra `transformers.TrainerCallback`s (progress hooks, early stopping, tests).
    """
    from accelerate import PartialState
    from transformers import Trainer, set_seed

    from h3fusion.data import PadCollator, build_task_dataset, load_expert_examples
    from h3fusion.models import load_base

    config_hash = expert_hash(profile)
    work = work_dir(profile, expert)
    seed, dimension = profile.expert_seed(expert), profile.expert_spec(expert).dimension
    with Stopwatch() as sw:
        set_seed(seed)
        base, tok = load_base(profile)
        base.train()
        model = lora_model(profile, base, expert)
        dataset = build_task_dataset(profile, tok, dimension, load_expert_examples(profile, expert))
        # also sets up torch.distributed under torchrun
        args = training_arguments(profile.experts.train, seed, work)
        with PartialState().main_process_first():  # one rank cleans the working folder, then the others look
            resume = prepare_work_dir(work, config_hash, ADAPTER_WEIGHTS)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=LMCollator(PadCollator(tok.pad_token_id)),
            callbacks=callbacks,
        )
        hide_progress(trainer)
        print(f"[experts] {expert}: {len(dataset)} examples" + (f", resuming from {resume}" if resume else ""))
        train_loss_mean = train_from(trainer, resume)
    trainable, total = model.get_nb_trainable_parameters()
    info = {
        "wall_time_s": sw.seconds,
        "train_examples": len(dataset),
        "train_loss_mean": train_loss_mean,
        "resumed_from": Path(resume).name if resume else None,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "world_size": trainer.args.world_size,
    }
    if trainer.is_world_process_zero():
        _write_expert(profile, expert, model, tok, trainer, info)
        shutil.rmtree(work, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return expert_dir(profile, expert)


def align(profile: Profile, expert: str = "all") -> dict[str, Path]:
    """Stage 1 for one expert (by name) or "all": skip experts that are complete with this config, train the
    others."""
    config_hash = expert_hash(profile)
    out = {}
    for t in _experts(profile, expert):
        folder = expert_dir(profile, t)
        if is_complete(folder, config_hash):
            print(f"[experts] {t}: complete with this config, skipped ({shown_path(folder)})")
        else:
            train_expert(profile, t)
        out[t] = folder
    return out


# ---------------------------------------------------------------------------------------------- reading


def require_expert(profile: Profile, expert: str, needed_by: str) -> Path:
    """The folder of a complete expert trained with this profile's config, else an error naming the command."""
    folder = expert_dir(profile, expert)
    if not is_complete(folder, expert_hash(profile)):
        raise ArtifactError(
            f"expert {expert!r} is missing or was trained with another config ({folder}); {needed_by} needs it: "
            f"run `h3fusion align --profile {profile.name} --expert {expert}` (or `--expert all`) first"
        )
    check_weight_files(folder, f"re-run `h3fusion align --profile {profile.name} --expert {expert}`")
    return folder


def load_expert_adapter_weights(profile: Profile, expert: str) -> ExpertAdapter:
    """A trained expert's LoRA factors and scale (`h3fusion.moe.load_adapter`), refused when missing or stale."""
    from h3fusion.moe import load_adapter

    return load_adapter(require_expert(profile, expert, "reading its adapter"), expert)


def check_experts_fit(profile: Profile, experts: Sequence[str]) -> None:
    """`fuse`'s check (`moe.upcycle.check_adapters`: layers and shapes vs the base) for the consumers that load
    experts with peft, which fails with a size mismatch or silently drops the layers the base lacks; run on the
    base's config, before anything heavy."""
    from h3fusion.models import base_config
    from h3fusion.moe.upcycle import check_adapters

    check_adapters(base_config(profile), [load_expert_adapter_weights(profile, e) for e in experts])
