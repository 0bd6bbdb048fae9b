"""Stage 1 (experts) on the tiny random Llama: artifacts, skip/re-run rules, FFN-only LoRA, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from h3fusion import experts
from h3fusion.artifacts import MANIFEST, read_manifest
from h3fusion.config import ConfigError, load_profile
from h3fusion.errors import ArtifactError
from h3fusion.lora_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from h3fusion.training import TRAINER_STATE, prepare_work_dir

TASK = "helpful"


def smoke(tmp_path: Path, **overrides):
    return load_profile("smoke", {"runs_dir": str(tmp_path / "runs"), **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One expert trained once for the read-only checks below."""
    profile = smoke(tmp_path_factory.mktemp("experts"))
    experts.align(profile, TASK)
    return profile


def test_align_writes_adapter_and_manifest(trained):
    folder = experts.expert_dir(trained, TASK)
    assert (folder / ADAPTER_WEIGHTS).exists() and (folder / ADAPTER_CONFIG).exists()
    manifest = read_manifest(folder)
    assert manifest["config_hash"] == experts.expert_hash(trained)
    assert manifest["task"] == TASK and manifest["global_step"] == trained.experts.train.max_steps
    assert [e["step"] for e in manifest["loss_log"]] == sorted(e["step"] for e in manifest["loss_log"])
    assert manifest["final_train_loss"] == manifest["loss_log"][-1]["loss"] > 0
    assert not experts.work_dir(trained, TASK).exists()  # checkpoints are removed once the expert is complete
    assert not list(folder.parent.glob(f"{TASK}.tmp-*"))


def test_lora_targets_only_ffn_and_b_is_trained(trained):
    cfg = json.loads((experts.expert_dir(trained, TASK) / ADAPTER_CONFIG).read_text())
    assert set(cfg["target_modules"]) == set(trained.experts.lora.target_modules)
    adapter = experts.load_expert_adapter_weights(trained, TASK)
    layers = trained.model.tiny.num_hidden_layers
    lora = trained.experts.lora
    assert 1 + max(layer for layer, _ in adapter.factors) == layers
    assert set(adapter.factors) == {(i, p) for i in range(layers) for p in lora.target_modules}
    assert adapter.scale == pytest.approx(lora.alpha / lora.r)
    tiny = trained.model.tiny
    for (_, proj), (a, b) in adapter.factors.items():
        assert a.shape[0] == lora.r and b.shape[1] == lora.r
        out_dim = tiny.hidden_size if proj == "down_proj" else tiny.intermediate_size
        assert b.shape[0] == out_dim
        assert b.abs().max() > 0  # peft initialises B to zero: non-zero means it was trained
    a, b = adapter.factors[(0, "up_proj")]
    assert torch.allclose(adapter.delta(0, "up_proj"), adapter.scale * b @ a)


def test_second_call_is_skipped(trained, monkeypatch):
    manifest = experts.expert_dir(trained, TASK) / MANIFEST
    mtime = manifest.stat().st_mtime_ns

    def must_not_train(*args, **kwargs):
        raise AssertionError("a complete expert with the same config was trained again")

    monkeypatch.setattr(experts, "train_expert", must_not_train)
    assert experts.align(trained, TASK) == {TASK: experts.expert_dir(trained, TASK)}
    assert manifest.stat().st_mtime_ns == mtime


def test_changed_config_reruns(trained, monkeypatch):
    changed = trained.model_copy(
        update={
            "experts": trained.experts.model_copy(
                update={"train": trained.experts.train.model_copy(update={"lr": 2e-3})}
            )
        }
    )
    assert experts.expert_hash(changed) != experts.expert_hash(trained)
    calls = []
    monkeypatch.setattr(experts, "train_expert", lambda p, t, callbacks=None: calls.append((p, t)))
    experts.align(changed, TASK)
    assert calls == [(changed, TASK)]
    # Hash covers what an expert depends on, and not where runs are stored.
    assert experts.expert_hash(trained.model_copy(update={"runs_dir": "/elsewhere"})) == experts.expert_hash(
        trained
    )


def test_unknown_task_and_missing_expert_are_user_errors(tmp_path):
    profile = smoke(tmp_path, tasks=["helpful", "honest"], **{"ablations.top_ks": [1, 2]})  # k <= 2 experts
    with pytest.raises(ConfigError, match="harmless"):
        experts.align(profile, "harmless")
    with pytest.raises(ArtifactError, match="h3fusion align"):
        experts.load_expert_adapter_weights(profile, "honest")


class KillAtFirstSave(TrainerCallback):
    """Stands in for `kill -9` right after the first checkpoint is on disk."""

    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


def test_killed_training_resumes_from_last_checkpoint(tmp_path, trained):
    profile = smoke(tmp_path)
    train = profile.experts.train
    assert train.save_steps < train.max_steps  # the smoke profile must checkpoint before the end
    with pytest.raises(KeyboardInterrupt):
        experts.train_expert(profile, TASK, callbacks=[KillAtFirstSave()])
    assert not (experts.expert_dir(profile, TASK) / MANIFEST).exists()  # nothing half-written looks complete
    assert (experts.work_dir(profile, TASK) / f"checkpoint-{train.save_steps}").exists()

    experts.align(profile, TASK)
    manifest = read_manifest(experts.expert_dir(profile, TASK))
    assert manifest["resumed_from"] == f"checkpoint-{train.save_steps}"
    assert manifest["global_step"] == train.max_steps
    assert manifest["loss_log"][0]["step"] == 1  # the log from before the kill is kept
    # Resuming restores weights, optimizer, scheduler, RNG and data order: same expert as an uninterrupted run.
    reference = read_manifest(experts.expert_dir(trained, TASK))["loss_log"]
    assert [e["step"] for e in manifest["loss_log"]] == [e["step"] for e in reference]
    assert [e["loss"] for e in manifest["loss_log"]] == pytest.approx(
        [e["loss"] for e in reference], rel=1e-5
    )
    # the mean over all steps, not only over those after the resume
    assert manifest["train_loss_mean"] == pytest.approx(
        read_manifest(experts.expert_dir(trained, TASK))["train_loss_mean"], rel=1e-5
    )
    _assert_same_expert(profile, trained)


def _assert_same_expert(profile, reference):
    resumed = experts.load_expert_adapter_weights(profile, TASK).factors
    uninterrupted = experts.load_expert_adapter_weights(reference, TASK).factors
    assert resumed.keys() == uninterrupted.keys()
    for key, (a, b) in uninterrupted.items():
        assert torch.equal(resumed[key][0], a) and torch.equal(resumed[key][1], b), key


def test_kill_inside_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path, trained):
    """kill -9 while the last checkpoint's trainer_state.json is half written: the re-run removes that
    checkpoint, resumes from the one before and ends with the uninterrupted run's weights and step count."""
    profile = smoke(tmp_path)
    steps, every = profile.experts.train.max_steps, profile.experts.train.save_steps
    script = (
        "import os, signal; from pathlib import Path; from transformers import TrainerState\n"
        "from h3fusion import experts; from h3fusion.config import load_profile\n"
        "save = TrainerState.save_to_json\n"
        "def save_and_die(state, path):\n"
        "    save(state, path)\n"
        f"    if state.global_step == {steps}:\n"
        "        text = Path(path).read_text(); Path(path).write_text(text[: len(text) // 2])\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "TrainerState.save_to_json = save_and_die\n"
        f"experts.train_expert(load_profile('smoke', {{'runs_dir': {str(tmp_path / 'runs')!r}}}), {TASK!r})\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    work = experts.work_dir(profile, TASK)
    assert (work / f"checkpoint-{steps}" / TRAINER_STATE).is_file()  # there, but cut in the middle

    experts.align(profile, TASK)
    manifest = read_manifest(experts.expert_dir(profile, TASK))
    assert manifest["resumed_from"] == f"checkpoint-{steps - every}"
    assert manifest["global_step"] == steps
    assert not work.exists()
    _assert_same_expert(profile, trained)


def test_a_kill_while_writing_the_expert_reruns_without_an_extra_step(tmp_path, trained, monkeypatch):
    """Killed after training, while the artifact is written: the re-run loads the last checkpoint instead of
    resuming from it (the Trainer would run and count one more step), so the manifest matches an uninterrupted run."""
    profile = smoke(tmp_path)
    steps = profile.experts.train.max_steps

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experts, "atomic_write_json", killed)  # the manifest, written after the adapter
    with pytest.raises(KeyboardInterrupt):
        experts.align(profile, TASK)
    monkeypatch.undo()
    assert (experts.work_dir(profile, TASK) / f"checkpoint-{steps}").is_dir()

    experts.align(profile, TASK)
    manifest = read_manifest(experts.expert_dir(profile, TASK))
    reference = read_manifest(experts.expert_dir(trained, TASK))
    assert manifest["resumed_from"] == f"checkpoint-{steps}"
    assert manifest["global_step"] == steps
    assert manifest["loss_log"] == reference["loss_log"]
    assert manifest["train_loss_mean"] == pytest.approx(reference["train_loss_mean"], rel=1e-6)
    _assert_same_expert(profile, trained)


def _fake_checkpoint(folder: Path, state: str = '{"global_step": 2}') -> None:
    folder.mkdir(parents=True)
    for name in (ADAPTER_WEIGHTS, "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / name).write_bytes(b"x")
    (folder / TRAINER_STATE).write_text(state)


def test_incomplete_checkpoints_are_removed_and_the_last_complete_one_is_resumed(tmp_path):
    profile = smoke(tmp_path)
    work = experts.work_dir(profile, TASK)
    prepare_work_dir(work, experts.expert_hash(profile), ADAPTER_WEIGHTS)
    _fake_checkpoint(work / "checkpoint-2")
    _fake_checkpoint(work / "checkpoint-4", state='{"global_st')  # killed while writing its trainer state
    _fake_checkpoint(work / "checkpoint-6")
    (work / "checkpoint-6" / TRAINER_STATE).unlink()  # killed before its trainer state
    _fake_checkpoint(work / "checkpoint-8")
    (work / "checkpoint-8" / "optimizer.pt").unlink()  # killed while old checkpoints were deleted
    assert prepare_work_dir(work, experts.expert_hash(profile), ADAPTER_WEIGHTS) == str(work / "checkpoint-2")
    assert sorted(p.name for p in work.glob("checkpoint-*")) == ["checkpoint-2"]


def test_checkpoints_of_another_config_are_not_resumed(tmp_path):
    profile = smoke(tmp_path)
    work = experts.work_dir(profile, TASK)
    (work / "checkpoint-2").mkdir(parents=True)
    (work / "config_hash.txt").write_text("another-config")
    assert prepare_work_dir(work, experts.expert_hash(profile), ADAPTER_WEIGHTS) is None
    assert not (work / "checkpoint-2").exists()


@pytest.mark.slow
def test_align_under_torchrun_trains_once_with_both_ranks(tmp_path):
    """Two CPU processes (gloo DDP): one artifact, written by rank 0, trained with world size 2."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29577",
        "-m",
        "h3fusion.cli",
        "align",
        "--profile",
        "smoke",
        "--task",
        TASK,
        "--set",
        f"runs_dir={tmp_path}",
    ]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert res.returncode == 0, res.stderr[-3000:]
    profile = load_profile("smoke", {"runs_dir": str(tmp_path)})
    manifest = read_manifest(experts.expert_dir(profile, TASK))
    assert manifest["world_size"] == 2 and manifest["global_step"] == profile.experts.train.max_steps
    assert not experts.work_dir(profile, TASK).exists()
