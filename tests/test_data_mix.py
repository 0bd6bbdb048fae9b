"""The data-mix LoRA baseline on the tiny random Llama: its budget, its data, its folder, reuse, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import TrainerCallback

from h3fusion import report
from h3fusion.artifacts import MANIFEST, read_manifest
from h3fusion.baselines import build_baseline, data_mix, get_baseline
from h3fusion.baselines.runner import baseline_dir, baseline_hash
from h3fusion.config import load_profile
from h3fusion.errors import ArtifactError
from h3fusion.experts import expert_dir
from tests.test_baselines import install_experts, make_adapter

NAME = data_mix.DATA_MIX


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A smoke run folder with random experts installed and the data-mix LoRA built once."""
    from h3fusion.models import load_tokenizer

    root = tmp_path_factory.mktemp("data-mix")
    profile = load_profile("smoke", {"runs_dir": str(root / "runs")})
    tok = load_tokenizer(profile)
    adapters = [
        make_adapter(profile, tok, root / f"expert{i}", seed=i + 1) for i in range(profile.num_experts)
    ]
    install_experts(profile, adapters)
    build_baseline(profile, NAME)
    return profile


def test_steps_are_the_experts_and_fusion_steps_together(built):
    """The Trainer's own step count (manifest and loss log), against the profile's stage lengths."""
    train = built.experts.train
    expected = len(built.tasks) * train.max_steps + built.fusion.train.max_steps
    manifest = read_manifest(baseline_dir(built, NAME))
    assert manifest["global_step"] == expected
    assert manifest["loss_log"][-1]["step"] == expected
    params = json.loads((baseline_dir(built, NAME) / "baseline.json").read_text())["params"]
    assert params["train"]["max_steps"] == expected and f"= {expected} steps" in params["budget"]
    assert params["train"]["batch_size"] == train.batch_size and params["train"]["lr"] == train.lr
    assert params["lora"] == built.experts.lora.model_dump(mode="json")


def test_trains_on_exactly_the_fusions_mixed_data(built, tmp_path):
    from h3fusion.fusion import fusion_trainer
    from h3fusion.training import training_arguments

    trainer, _, _ = data_mix.data_mix_trainer(built, tmp_path / "mix")
    fused, _, _ = fusion_trainer(
        built, training_arguments(built.fusion.train, built.seed, tmp_path / "fusion")
    )
    ours, theirs = trainer.train_dataset, fused.train_dataset
    assert ours.sources == theirs.sources and set(ours.sources) == set(built.tasks)
    for a, b in zip(ours.items, theirs.items, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    manifest = read_manifest(baseline_dir(built, NAME))
    assert manifest["train_examples"] == len(ours)
    assert manifest["sources"] == {t: ours.sources.count(t) for t in built.tasks}


def test_folder_loads_as_a_dense_baseline_with_the_experts_lora_merged(built):
    from h3fusion.evaluation.registry import _builtin_models, known_models
    from h3fusion.models import load_base

    assert _builtin_models(built)[NAME].kind == "baseline"  # a dense folder, loadable without the registry
    entry = known_models(built)[NAME]
    assert entry.kind == "baseline" and entry.description == get_baseline(NAME).description
    lm = entry.load()
    base, _ = load_base(built)
    got, want = dict(lm.model.named_parameters()), dict(base.named_parameters())
    changed = {k for k, p in want.items() if not torch.equal(got[k], p)}
    assert changed and all(k.rsplit(".", 2)[-2] in built.experts.lora.target_modules for k in changed)
    assert NAME in report.model_groups(built)[report.DATA_MIX_GROUP]


def test_second_build_reuses_it_and_a_new_budget_rebuilds(built):
    folder = baseline_dir(built, NAME)
    mtime = (folder / MANIFEST).stat().st_mtime_ns
    build_baseline(built, NAME)
    assert (folder / MANIFEST).stat().st_mtime_ns == mtime
    longer = built.fusion.model_copy(update={"train": built.fusion.train.model_copy(update={"max_steps": 5})})
    assert baseline_hash(built.model_copy(update={"fusion": longer}), NAME) != baseline_hash(built, NAME)


class KillAtFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


def test_killed_build_resumes_from_its_checkpoint(built, tmp_path, monkeypatch):
    profile = built.model_copy(update={"runs_dir": str(tmp_path / "runs")})
    install_experts(profile, [expert_dir(built, t) for t in built.tasks])
    real = data_mix.data_mix_trainer
    monkeypatch.setattr(data_mix, "data_mix_trainer", lambda p, w: real(p, w, callbacks=[KillAtFirstSave()]))
    with pytest.raises(KeyboardInterrupt):
        build_baseline(profile, NAME)
    assert not baseline_dir(profile, NAME).exists()
    monkeypatch.setattr(data_mix, "data_mix_trainer", real)
    build_baseline(profile, NAME)
    manifest = read_manifest(baseline_dir(profile, NAME))
    assert manifest["resumed_from"] == f"checkpoint-{profile.experts.train.save_steps}"
    reference = read_manifest(baseline_dir(built, NAME))
    assert manifest["global_step"] == reference["global_step"]
    assert [e["loss"] for e in manifest["loss_log"]] == pytest.approx(
        [e["loss"] for e in reference["loss_log"]]
    )
    assert not baseline_dir(profile, NAME).with_name(f".work-{NAME}").exists()


def test_without_experts_the_error_names_the_command(tmp_path):
    from h3fusion.baselines import run_baselines

    profile = load_profile("smoke", {"runs_dir": str(tmp_path / "runs")})
    with pytest.raises(ArtifactError, match="h3fusion align --profile smoke"):
        run_baselines(profile, only=NAME)
