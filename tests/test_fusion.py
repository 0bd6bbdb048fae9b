"""Stage 2 on the smoke profile: upcycle, fusion-train, export; resume after kill -9; torchrun (gloo)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, TrainerCallback

from h3fusion.artifacts import read_manifest
from h3fusion.config import load_profile
from h3fusion.errors import ArtifactError
from h3fusion.experts import align
from h3fusion.fusion import (
    build_raw,
    fuse,
    fusion_dir,
    prepare_for_training,
    raw_dir,
    upcycle_profile,
)
from h3fusion.fusion_objective import fusion_losses, total_loss
from h3fusion.routing import template_header_ids, template_lengths

ROUTER = "model.layers.0.block_sparse_moe.gate.weight"
EXPERT = "model.layers.0.block_sparse_moe.experts.1.w2.weight"


@pytest.fixture(scope="module")
def experts_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Smoke experts trained once for this module; each test copies them into its own runs folder."""
    root = tmp_path_factory.mktemp("experts") / "runs"
    align(load_profile("smoke", {"runs_dir": str(root)}), "all")
    return root


def _profile(tmp_path: Path, experts_root: Path, **overrides):
    runs = tmp_path / "runs"
    if not (runs / "smoke" / "experts").exists():
        shutil.copytree(experts_root / "smoke" / "experts", runs / "smoke" / "experts")
    return load_profile("smoke", {"runs_dir": str(runs), **overrides})


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_missing_experts_are_named_before_any_work(smoke_profile):
    with pytest.raises(ArtifactError, match="h3fusion align --profile smoke"):
        build_raw(smoke_profile)


def test_raw_export_loads_without_custom_code_and_matches_memory(tmp_path, experts_root):
    profile = _profile(tmp_path, experts_root)
    folder = build_raw(profile)
    assert read_manifest(folder)["stage"] == "fusion-raw"
    exported = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(exported).__name__ == "MixtralForCausalLM"
    assert exported.config.num_local_experts == len(profile.tasks)
    assert exported.config.num_experts_per_tok == profile.fusion.top_k
    moe, _ = upcycle_profile(profile, show_progress=False)
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, moe.eval()(ids).logits, atol=1e-5, rtol=1e-4)


def test_fusion_steps_lower_the_total_loss(tmp_path, experts_root):
    from h3fusion.data import PadCollator, build_mixed_dataset

    profile = _profile(tmp_path, experts_root)
    moe, tok = upcycle_profile(profile, show_progress=False)
    prepare_for_training(moe, profile)
    data = build_mixed_dataset(profile, tok)
    batch = PadCollator(tok.pad_token_id)([data[i] for i in range(0, len(data), len(data) // 8)])
    params = [p for p in moe.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-2)

    template = template_lengths(batch["input_ids"], template_header_ids(tok))
    assert (template > 10).any()  # sequences start with the header unless truncation cut the prompt

    def loss() -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "task_labels"}
        out = moe(**inputs, output_router_logits=True)
        return total_loss(fusion_losses(moe, out, batch, profile, template), profile)

    before = loss().item()
    for _ in range(6):
        optim.zero_grad()
        value = loss()
        value.backward()
        optim.step()
    assert loss().item() < before


def test_router_gets_gradient_from_the_gating_loss_alone(tmp_path, experts_root):
    from h3fusion.data import PadCollator, build_mixed_dataset

    profile = _profile(tmp_path, experts_root)
    moe, tok = upcycle_profile(profile, show_progress=False)
    prepare_for_training(moe, profile)
    data = build_mixed_dataset(profile, tok)
    batch = PadCollator(tok.pad_token_id)([data[0], data[len(data) - 1]])
    inputs = {k: v for k, v in batch.items() if k != "task_labels"}
    template = template_lengths(batch["input_ids"], template_header_ids(tok))
    out = moe(**inputs, output_router_logits=True)
    fusion_losses(moe, out, batch, profile, template)["gate_loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in moe.router_parameters())


def test_routers_train_in_their_own_group_at_the_router_learning_rate(tmp_path, experts_root):
    from h3fusion.fusion import fusion_trainer
    from h3fusion.training import training_arguments

    profile = _profile(tmp_path, experts_root, **{"fusion.router_lr": 0.05})
    args = training_arguments(profile.fusion.train, profile.seed, tmp_path / "work", save_strategy="no")
    trainer, moe, _ = fusion_trainer(profile, args)
    optimizer = trainer.create_optimizer()
    routers = {id(p) for p in moe.router_parameters()}
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in optimizer.param_groups if g["params"]}
    assert by_lr[0.05] == routers
    others = set().union(*(ids for lr, ids in by_lr.items() if lr != 0.05))
    assert others and not others & routers
    assert others | routers == {id(p) for p in moe.parameters() if p.requires_grad}
    assert {profile.fusion.train.lr, 0.05} == set(by_lr)


def test_fuse_writes_variant_and_skips_when_complete(tmp_path, experts_root, capsys):
    profile = _profile(tmp_path, experts_root)
    folder = fuse(profile)
    assert folder == fusion_dir(profile) and folder.name == profile.fusion.variant
    manifest = read_manifest(folder)
    assert {"lm_loss", "gate_loss", "drift_loss"} <= set(manifest["final"])
    assert manifest["global_step"] == profile.fusion.train.max_steps
    assert AutoModelForCausalLM.from_pretrained(folder).config.model_type == "mixtral"
    # training changed the router and the experts, not the embeddings
    raw, trained = _weights(raw_dir(profile)), _weights(folder)
    assert not torch.equal(raw[ROUTER], trained[ROUTER])
    assert not torch.equal(raw[EXPERT], trained[EXPERT])
    assert torch.equal(raw["model.embed_tokens.weight"], trained["model.embed_tokens.weight"])
    capsys.readouterr()
    fuse(profile)
    assert "skipped" in capsys.readouterr().out


class _KillAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        os.kill(os.getpid(), signal.SIGKILL)


def test_evaluation_runs_the_exported_fused_model_on_factored_experts(tmp_path, experts_root):
    """The registry factors the exported experts back into the base FFN plus low-rank deltas (smoke: expert rank 4
    + fusion rank 4, within the cap of 8 at widths 64 and 128) with the exported model's logits."""
    from transformers import AutoModelForCausalLM

    from h3fusion.evaluation.registry import resolve_model
    from h3fusion.moe.experts import DeltaExperts

    profile = _profile(tmp_path, experts_root)
    folder = fuse(profile)
    evaluated = resolve_model(profile, profile.fusion.variant)().model
    assert all(isinstance(layer.mlp.experts, DeltaExperts) for layer in evaluated.model.layers)
    full = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, full.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            evaluated(input_ids=ids).logits, full(input_ids=ids).logits, atol=1e-5, rtol=0
        )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, experts_root):
    """The smoke variant fused once without interruption: the reference of the kill tests."""
    profile = _profile(tmp_path_factory.mktemp("uninterrupted"), experts_root)
    fuse(profile)
    return profile


def _run_killed(profile, setup: str, callbacks: str = "None") -> None:
    """`train_fusion` in a subprocess after `setup` (Python lines); it must end by SIGKILL."""
    script = (
        "from h3fusion.config import load_profile; from h3fusion.fusion import train_fusion\n"
        f"{setup}\n"
        f"train_fusion(load_profile('smoke', {{'runs_dir': {str(profile.run_dir.parent)!r}}}), callbacks={callbacks})"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not fusion_dir(profile).exists(), "a killed run must not leave a complete-looking artifact"


def _assert_same_weights(folder: Path, reference: Path) -> None:
    a, b = _weights(reference), _weights(folder)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path, experts_root, uninterrupted):
    """kill -9 right after the first checkpoint, re-run: same final weights as an uninterrupted run."""
    interrupted = _profile(tmp_path, experts_root)
    _run_killed(interrupted, "from tests.test_fusion import _KillAfterFirstSave", "[_KillAfterFirstSave()]")
    assert list((interrupted.run_dir / "fusion").glob(".work-*/checkpoint-*"))
    folder = fuse(interrupted)
    assert read_manifest(folder)["resumed_from"].startswith("checkpoint-")
    _assert_same_weights(folder, fusion_dir(uninterrupted))


@pytest.mark.slow
def test_kill_during_export_reruns_to_a_truthful_manifest(tmp_path, experts_root, uninterrupted):
    """kill -9 inside the export, after the last checkpoint: the re-run loads that checkpoint and runs no step
    (resuming from it ran one more, at learning rate 0: `global_step` 5 of 4), then exports over the dead run's
    temporary folder."""
    interrupted = _profile(tmp_path, experts_root)
    build_raw(interrupted)  # the kill below is in the trained variant's export, not in the raw one
    _run_killed(
        interrupted,
        "import os, signal; from h3fusion.moe import export\n"
        "export.atomic_write_json = lambda path, obj: os.kill(os.getpid(), signal.SIGKILL)",
    )
    steps = interrupted.fusion.train.max_steps
    assert list((interrupted.run_dir / "fusion").glob(f".work-*/checkpoint-{steps}"))
    assert list((interrupted.run_dir / "fusion").glob(f"{interrupted.fusion.variant}.tmp-*"))
    folder = fuse(interrupted)
    manifest, reference = read_manifest(folder), read_manifest(fusion_dir(uninterrupted))
    assert manifest["resumed_from"] == f"checkpoint-{steps}"
    assert manifest["global_step"] == steps
    assert manifest["loss_log"] == reference["loss_log"]
    assert manifest["train_loss_mean"] == pytest.approx(reference["train_loss_mean"], rel=1e-6)
    assert not [p.name for p in folder.parent.iterdir() if ".tmp-" in p.name or p.name.startswith(".work-")]
    _assert_same_weights(folder, fusion_dir(uninterrupted))


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, experts_root):
    profile = _profile(tmp_path, experts_root)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        "-m",
        "h3fusion.cli",
        "fuse",
        "--profile",
        "smoke",
        "--set",
        f"runs_dir={profile.run_dir.parent}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read_manifest(fusion_dir(profile))
    assert manifest is not None and manifest["global_step"] == profile.fusion.train.max_steps
    assert manifest["world_size"] == 2  # real DDP over gloo, not two independent copies


def test_transformers_own_resume_still_drops_a_mixtral_s_experts(tmp_path):
    """Why `FusionTrainer` checkpoints its trainable tensors itself: transformers' `save_pretrained` writes a
    Mixtral's experts under per-expert keys and the Trainer's resume loads them back without converting, so the
    experts keep whatever they held (huggingface/transformers#48805). When this test fails, transformers resumes a
    Mixtral correctly: drop `FusionTrainer._save` / `_load_from_checkpoint` and let the Trainer checkpoint."""
    from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainingArguments

    cfg = MixtralConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=3,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    saved = MixtralForCausalLM(cfg)
    saved.save_pretrained(tmp_path / "checkpoint")
    torch.manual_seed(1)
    resumed = MixtralForCausalLM(cfg)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True)
    Trainer(model=resumed, args=args)._load_from_checkpoint(str(tmp_path / "checkpoint"))
    experts = "model.layers.0.mlp.experts.down_proj"
    assert not torch.equal(resumed.state_dict()[experts], saved.state_dict()[experts])
