"""Stage 2: upcycle the experts into an MoE and fine-tune it on the task mix (H3Fusion-MoE).

``L = L_LM + lambda * L_gate + L_drift (+ w_lb * L_balance)`` (book: method.md), trained on the mixed
dataset with each example's own task label. Trainable: every layer's router and a per-expert LoRA
on the expert FFNs (`fusion.lora`); attention stays frozen unless `fusion.attention_lora` (the
released code's choice). The drift of expert i is its fusion LoRA's change (alpha/r) B_i A_i.

Artifacts (each written atomically with a manifest):
``runs/<p>/fusion/raw/``        the upcycled MoE before training (a standard Mixtral folder),
``runs/<p>/fusion/<variant>/``  the trained model, LoRA merged, exported the same way;
the variant is named after lambda, gamma and k (`FusionConfig.variant`). Trainer checkpoints hold
only the trainable tensors and live in ``fusion/.work-<variant>/`` until the model is complete, so a
run killed mid-way resumes from its last complete checkpoint.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from h3fusion.artifacts import Stopwatch, digest, is_complete, make_manifest, read_manifest
from h3fusion.config import TRAINING_DATA_KEYS, Profile, ReleasedCodeSwitches, shown_path
from h3fusion.fusion_objective import LOSS_TERMS, TRAINABLE_WEIGHTS, fusion_trainer_class, trainable_state
from h3fusion.training import loss_log, prepare_work_dir, train_from, training_arguments

if TYPE_CHECKING:
    from transformers import Trainer

    from h3fusion.moe import MoECausalLM
    from h3fusion.moe.upcycle import ExpertAdapter

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_RAW_FUSION_KEYS = ("top_k", "storage", "router_init", "router_init_examples")


# ---------------------------------------------------------------------------------------------- paths


def fusion_dir(profile: Profile, variant: str | None = None) -> Path:
    """``fusion/<variant>``: a trained variant's folder (default: the profile's variant), or a raw MoE's."""
    return profile.run_dir / "fusion" / (variant or profile.fusion.variant)


RAW_FOLDERS = {"random": "raw", "hidden": "raw-hidden"}
"""The raw MoE's folder per router init: the `hidden` one is also the training-free MoE baseline (mergekit-moe's
recipe: upcycle, route by hidden states, no training), so both can exist side by side."""
TRAINING_FREE_MOE = "training-free-moe"
"""The evaluation name of ``fusion/raw-hidden``."""


def raw_dir(profile: Profile) -> Path:
    """``fusion/raw`` (or ``raw-hidden``), with the suffix of the released code's upcycling switches that are on."""
    f = profile.fusion
    return fusion_dir(profile, RAW_FOLDERS[f.router_init] + f.released_code_suffix(f.released_code.UPCYCLING))


def raw_hash(profile: Profile) -> str:
    """The raw MoE depends on the experts and on how they are upcycled (not on fusion training)."""
    from h3fusion.experts import expert_hash

    fusion = profile.fusion.model_dump(mode="json")
    upcycling = profile.fusion.released_code.on(profile.fusion.released_code.UPCYCLING)
    extra = {"released_code": upcycling} if upcycling else {}
    return digest({"experts": expert_hash(profile), **{k: fusion[k] for k in _RAW_FUSION_KEYS}, **extra})


def variant_hash(profile: Profile) -> str:
    """A trained variant depends on its raw MoE, the fusion section and the training data."""
    data = {k: profile.section_hash(k) for k in TRAINING_DATA_KEYS}
    return digest({"raw": raw_hash(profile), "fusion": profile.fusion.hash_payload(), "data": data})


# ---------------------------------------------------------------------------------------------- upcycling


def _prompt_batches(
    profile: Profile, tokenizer: Any, task: str, batch_size: int = 8
) -> list[dict[str, torch.Tensor]]:
    """Left-aligned, padded batches of a task's training prompts (for the `hidden` router init)."""
    from h3fusion.data import encode_prompt, format_prompt, load_train_examples

    examples = load_train_examples(profile, task)[: profile.fusion.router_init_examples]
    ids = [
        encode_prompt(tokenizer, format_prompt(e.instruction, e.input))[-profile.data.max_length :]
        for e in examples
    ]
    batches = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(len(x) for x in chunk)
        batches.append(
            {
                "input_ids": torch.tensor([x + [tokenizer.pad_token_id] * (width - len(x)) for x in chunk]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in chunk]),
            }
        )
    return batches


def upcycle_profile(profile: Profile, show_progress: bool = True) -> tuple[MoECausalLM, Any]:
    """The raw MoE in memory, in the profile's storage: base + the profile's experts, router initialised.

    The base's family is checked from its config first: an unsupported base fails before any weights load."""
    from h3fusion.experts import require_expert
    from h3fusion.models import base_config, load_base
    from h3fusion.moe import check_base_family, upcycle

    check_base_family(base_config(profile))
    folders = [require_expert(profile, name, "`h3fusion fuse`") for name in profile.expert_names]
    base, tok = load_base(profile)
    f = profile.fusion
    # the hidden init: each expert's router row is the mean hidden state of its dimension's training prompts
    hidden = (
        [_prompt_batches(profile, tok, d) for d in profile.expert_dimensions] if f.router_init == "hidden" else None
    )
    moe = upcycle(
        base,
        released_code_adapters(folders, f.released_code),
        top_k=f.top_k,
        storage=f.storage,
        router_init=f.router_init,
        seed=profile.seed,
        hidden_batches=hidden,
        expert_names=profile.expert_names,
        show_progress=show_progress,
    )
    return moe, tok


def released_code_adapters(folders: list[Path], switches: ReleasedCodeSwitches) -> list[Path | ExpertAdapter]:
    """The experts as the released code upcycles them when its switches are on: unscaled (W + B A) and/or
    aliased (every expert W + the sum of all deltas); the folders themselves otherwise."""
    from h3fusion.moe.upcycle import aliased, load_adapter, unscaled

    if not switches.on(switches.UPCYCLING):
        return list(folders)
    adapters = [load_adapter(folder, folder.name) for folder in folders]
    if switches.unscaled_lora:
        adapters = [unscaled(a) for a in adapters]
    return list(aliased(adapters)) if switches.aliased_experts else list(adapters)


def build_raw(profile: Profile, *, quiet: bool = False) -> Path:
    """Write ``fusion/raw/`` (skipped when complete with this config; `quiet`: without saying so)."""
    from h3fusion.moe import export_mixtral

    folder = raw_dir(profile)
    if is_complete(folder, raw_hash(profile)):
        if not quiet:
            print(f"[fusion] raw MoE complete with this config, skipped ({shown_path(folder)})")
        return folder
    with Stopwatch() as sw:
        moe, tok = upcycle_profile(profile)
    manifest = make_manifest(
        profile,
        raw_hash(profile),
        sw.seconds,
        stage="fusion-raw",
        num_experts=moe.num_experts,
        top_k=moe.top_k,
        storage=moe.storage,
    )
    export_mixtral(moe, tok, folder, manifest=manifest)
    print(f"[fusion] raw MoE written to {shown_path(folder)} ({sw.seconds:.1f} s)")
    return folder


# ---------------------------------------------------------------------------------------------- training


def add_attention_lora(moe: MoECausalLM, r: int, alpha: float, dropout: float) -> None:
    """LoRA on the attention projections (the released code's fusion setting; off in the paper's text)."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(ATTENTION_PROJECTIONS))
    inject_adapter_in_model(cfg, moe)


def merge_attention_lora(moe: MoECausalLM) -> None:
    """Fold attention LoRA into the base weights and restore plain Linear modules (for a clean export)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(moe.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(moe.get_submodule(parent_name), child, module.get_base_layer())


def prepare_for_training(moe: MoECausalLM, profile: Profile) -> None:
    """Add the fusion LoRA (and optional attention LoRA); freeze everything else."""
    lora = profile.fusion.lora
    moe.add_fusion_lora(lora.r, lora.alpha, lora.target_modules, lora.dropout, seed=profile.seed)
    if profile.fusion.attention_lora:  # before freezing: peft's injection marks only its own LoRA trainable
        add_attention_lora(moe, lora.r, lora.alpha, lora.dropout)
    moe.freeze_for_fusion()
    if profile.fusion.attention_lora:
        for name, p in moe.named_parameters():
            if "lora_" in name and ".self_attn." in name:
                p.requires_grad_(True)
    if profile.fusion.released_code.frozen_router:
        for p in moe.router_parameters():
            p.requires_grad_(False)


def work_dir(profile: Profile) -> Path:
    return profile.run_dir / "fusion" / f".work-{profile.fusion.variant}"


def fusion_trainer(
    profile: Profile, args: Any, callbacks: list[Any] | None = None
) -> tuple[Trainer, MoECausalLM, Any]:
    """The seeded raw MoE made trainable and its `FusionTrainer` on the mixed dataset: (trainer, model, tokenizer).

    Shared by `train_fusion` and the ablations' in-memory runs, so both train exactly the same way."""
    from transformers import set_seed

    from h3fusion.data import PadCollator, build_mixed_dataset
    from h3fusion.routing import template_header_ids

    set_seed(profile.seed)
    moe, tok = upcycle_profile(profile, show_progress=False)
    prepare_for_training(moe, profile)
    moe.train()
    trainer = fusion_trainer_class()(
        model=moe,
        args=args,
        train_dataset=build_mixed_dataset(profile, tok),
        data_collator=PadCollator(tok.pad_token_id),
        callbacks=callbacks,
        profile=profile,
        template_headers=template_header_ids(tok),
    )
    return trainer, moe, tok


def train_fusion(profile: Profile, callbacks: list[Any] | None = None) -> Path:
    """Fusion-train the profile's variant from the raw MoE and export it; returns its folder."""
    from accelerate import PartialState

    from h3fusion.moe import export_mixtral

    folder = fusion_dir(profile)
    config_hash = variant_hash(profile)
    work = work_dir(profile)
    # an expert not selected in a batch gets no gradient: DDP must look for unused parameters
    args = training_arguments(
        profile.fusion.train,
        profile.seed,
        work,
        ddp_find_unused_parameters=profile.fusion.top_k < profile.num_experts,
    )  # also sets up torch.distributed under torchrun
    with PartialState().main_process_first():  # under torchrun, rank 0 writes/cleans, the others wait
        build_raw(profile)
        resume = prepare_work_dir(work, config_hash, TRAINABLE_WEIGHTS)
    with Stopwatch() as sw:
        trainer, moe, tok = fusion_trainer(profile, args, callbacks)
        dataset = trainer.train_dataset
        print(
            f"[fusion] {profile.fusion.variant}: {len(dataset)} mixed examples"
            + (f", resuming from {resume}" if resume else "")
        )
        train_loss_mean = train_from(trainer, resume)
    if trainer.is_world_process_zero():
        losses = loss_log(trainer, ("loss", *LOSS_TERMS))
        moe.eval()
        moe.merge_fusion_lora()
        merge_attention_lora(moe)
        manifest = make_manifest(
            profile,
            config_hash,
            sw.seconds,
            stage="fusion",
            variant=profile.fusion.variant,
            train_examples=len(dataset),
            train_loss_mean=train_loss_mean,
            final=losses[-1] if losses else None,
            loss_log=losses,
            global_step=trainer.state.global_step,
            world_size=trainer.args.world_size,
            resumed_from=Path(resume).name if resume else None,
            trainable_parameters=sum(v.numel() for v in trainable_state(trainer.model).values()),
        )
        export_mixtral(moe, tok, folder, manifest=manifest)
        shutil.rmtree(work, ignore_errors=True)
        print(f"[fusion] {profile.fusion.variant} written to {shown_path(folder)} ({sw.seconds:.1f} s)")
    trainer.accelerator.wait_for_everyone()
    return folder


def fuse(profile: Profile, raw_only: bool = False) -> Path:
    """`h3fusion fuse`: the raw MoE, then (unless `raw_only`) the trained variant; complete ones are skipped."""
    if raw_only:
        return build_raw(profile)
    folder = fusion_dir(profile)
    if is_complete(folder, variant_hash(profile)):
        print(f"[fusion] {profile.fusion.variant} complete with this config, skipped ({shown_path(folder)})")
        return folder
    return train_fusion(profile)


def trained_variants(profile: Profile) -> Iterator[tuple[str, dict[str, Any]]]:
    """(variant, manifest) of every complete fused model under ``fusion/`` (raw excluded)."""
    root = profile.run_dir / "fusion"
    for folder in sorted(root.glob("*")) if root.exists() else []:
        manifest = read_manifest(folder)
        if (
            folder.name not in RAW_FOLDERS.values()
            and manifest is not None
            and manifest.get("stage") == "fusion"
        ):
            yield folder.name, manifest
