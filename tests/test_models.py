"""models: tiny random Llama, the conversion cache, helpful errors, and (slow) the real offline SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from h3fusion import models
from h3fusion.config import TinyModelConfig, load_profile
from h3fusion.errors import ModelError


@pytest.fixture(scope="module")
def smoke():
    return load_profile("smoke")


@pytest.fixture(scope="module")
def tiny(smoke):
    return models.load_base(smoke)


def test_tiny_model_runs_forward_with_real_tokenizer(smoke, tiny):
    model, tok = tiny
    cfg = smoke.model.tiny
    assert model.config.hidden_size == cfg.hidden_size
    assert model.config.num_hidden_layers == cfg.num_hidden_layers
    assert model.config.num_key_value_heads == cfg.num_key_value_heads < model.config.num_attention_heads
    assert model.config.vocab_size == len(tok)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied like SmolLM2
    assert {n for n, _ in model.model.layers[0].mlp.named_children()} == {
        "gate_proj",
        "up_proj",
        "down_proj",
        "act_fn",
    }
    assert tok.pad_token is not None and tok.padding_side == "right"
    batch = tok(["What is the capital of France?", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_tiny_model_is_seeded_and_leaves_global_rng_alone():
    cfg = TinyModelConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    a = models.tiny_random_llama(cfg, 100, seed=1)
    after = torch.rand(1)
    b = models.tiny_random_llama(cfg, 100, seed=1)
    c = models.tiny_random_llama(cfg, 100, seed=2)
    assert torch.equal(before, after)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.model.layers[0].mlp.gate_proj.weight, c.model.layers[0].mlp.gate_proj.weight)


def test_tiny_dtype_follows_profile():
    model, _ = models.load_base(load_profile("smoke", {"model.dtype": "bfloat16"}))
    assert model.dtype == torch.bfloat16


def test_cached_folder_builds_once_and_never_accepts_a_killed_build(tmp_path: Path):
    calls = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        (tmp / "weights.bin").write_text("w")

    folder = tmp_path / "converted"
    assert models.cached_folder(folder, "k1", build) == folder
    mtime = (folder / "manifest.json").stat().st_mtime_ns
    models.cached_folder(folder, "k1", build)
    assert len(calls) == 1 and (folder / "manifest.json").stat().st_mtime_ns == mtime

    def killed(tmp: Path) -> None:
        (tmp / "half.bin").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models.cached_folder(tmp_path / "other", "k1", killed)
    assert not (tmp_path / "other").exists()

    models.cached_folder(folder, "k2", build)  # a new conversion format rebuilds
    assert len(calls) == 2 and json.loads((folder / "manifest.json").read_text())["config_hash"] == "k2"


def test_cache_dir_precedence(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("H3FUSION_CACHE", str(tmp_path / "env"))
    assert models.cache_dir(load_profile("smoke")) == tmp_path / "env"
    prof = load_profile("smoke", {"model.cache_dir": str(tmp_path / "cfg")})
    assert models.cache_dir(prof) == tmp_path / "cfg"


@pytest.mark.parametrize("base", ["/no/such/model/folder", "./missing-model", "not a valid id!"])
def test_missing_folder_is_a_model_error(base):
    with pytest.raises(ModelError, match="does not exist"):
        models.load_base(load_profile("smoke", {"model.base": base}))


def test_folder_without_config_is_a_model_error(tmp_path: Path):
    with pytest.raises(ModelError, match="config.json"):
        models.load_base(load_profile("smoke", {"model.base": str(tmp_path)}))


def test_local_folder_loads_as_is(tmp_path: Path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, tok2 = models.load_base(load_profile("smoke", {"model.base": str(tmp_path)}))
    assert len(tok2) == len(tok)
    assert torch.equal(loaded.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight)


def test_unreachable_hub_says_how_to_work_offline(monkeypatch, tmp_path: Path):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelError) as info:
        models.load_base(load_profile("smoke", {"model.base": "no-such-owner/no-such-model-h3fusion"}))
    msg = str(info.value)
    assert "local folder" in msg and "smollm2-offline" in msg


def test_gated_model_error_says_to_set_hf_token(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(models, "hub_token", lambda: None)
    err = OSError("You are trying to access a gated repo. Make sure to have access to it.")
    msg = str(models._hub_error("meta-llama/Llama-2-7b-hf", err))
    assert "HF_TOKEN" in msg and "no token" in msg


@pytest.mark.slow
def test_smollm2_offline_answers_paris_and_reuses_its_conversion(monkeypatch):
    profile = load_profile("cpu")
    model, tok = models.load_base(profile)
    manifest = models.smollm2_model_dir(profile) / "manifest.json"
    mtime = manifest.stat().st_mtime_ns

    def no_reconversion(tmp: Path) -> None:
        raise AssertionError("converted again although the cache was complete")

    monkeypatch.setattr(models, "_build_smollm2_model", no_reconversion)
    models.load_base(profile)
    assert manifest.stat().st_mtime_ns == mtime

    assert tok.pad_token_id == tok.eos_token_id
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
