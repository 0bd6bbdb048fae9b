"""`h3fusion bench`: runs end to end (--quick), reports every ratio; exact parameter counts. No timings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import LlamaConfig

from h3fusion import bench, bench_common, bench_ffn
from h3fusion.cli import main
from h3fusion.config import load_profile
from h3fusion.moe import PROJECTIONS


@pytest.mark.slow
def test_quick_bench_writes_every_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("H3FUSION_RUNS_DIR", str(tmp_path / "runs"))  # no pipeline run: book "not run yet"
    monkeypatch.setattr(bench, "PROJECT_ROOT", tmp_path)  # nor a book build
    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    ratios = results["ratios"]
    expected = {
        f"ffn.{shape}.{storage}.{mode}"
        for shape in bench_common.LAYER_SHAPES
        for storage in ("delta", "materialised")
        for mode in ("fwd", "fwd_bwd")
    } | {f"params.{m}.{s}" for m in ("smollm2", "llama2_7b") for s in ("delta", "materialised")}
    expected |= set(bench.TARGETS) | {"generation.materialised_vs_dense"}
    assert expected <= set(ratios)
    for key, r in ratios.items():
        if key == "book.total_min":
            assert r["value"] is None and r["holds"] is None
            continue
        assert r["value"] > 0 and math.isfinite(r["value"]), key
        assert (r["holds"] is None) == (key not in bench.TARGETS), key
        _assert_holds_is_value_against_target(key, r)
    assert {"likelihood.dense.scorer_vs_plain_forward", "likelihood.moe.scorer_vs_plain_forward"} <= set(
        bench.TARGETS
    )
    assert "likelihood.threads.two_processes_vs_two_threads" in ratios
    lik = results["likelihood"]
    assert lik["tokens"] > 0 and lik["pairs"] > 0
    for model in ("dense", "moe"):
        assert lik[model]["ratio"] == pytest.approx(lik[model]["scorer_tok_s"] / lik[model]["plain_tok_s"])
    for row in results["ffn"]:
        assert (row["hidden"], row["ffn"]) == bench_common.LAYER_SHAPES[row["shape"]]
    ens = results["ensemble"]  # both regimes, and the compute floor at the evaluation's batch
    assert {"ensemble.one_pass_vs_same_rows", "ensemble.batch1.one_pass_vs_one_model"} <= set(ratios)
    assert ens["one_pass_vs_same_rows"] == pytest.approx(ens["one_pass_s_per_step"] / ens["same_rows_s_per_step"])
    for regime in (ens, ens["batch1"]):
        assert regime["one_pass_vs_one_model"] == pytest.approx(
            regime["one_pass_s_per_step"] / regime["one_model_s_per_step"]
        )
        assert regime["same_rows_vs_one_model"] == pytest.approx(
            regime["same_rows_s_per_step"] / regime["one_model_s_per_step"]
        )
    assert results["book"]["stages_s"] == {}


def test_parameter_bytes_are_exact() -> None:
    """delta storage adds E rank-r factor pairs per projection and a router per layer; materialised E-1 FFNs."""
    profile = load_profile("smoke")
    cfg = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, vocab_size=50
    )
    rows = {r["storage"]: r for r in bench_ffn.bench_params(profile, {"m": cfg})}
    e, r, d, f, layers = len(profile.tasks), profile.experts.lora.r, 32, 48, 3
    extra_delta = layers * (e * len(PROJECTIONS) * r * (d + f) + e * d) * 4
    extra_mat = layers * ((e - 1) * len(PROJECTIONS) * d * f + e * d) * 4
    dense = rows["delta"]["dense_gb"] * 1e9
    assert rows["delta"]["fused_gb"] * 1e9 - dense == pytest.approx(extra_delta)
    assert rows["materialised"]["fused_gb"] * 1e9 - dense == pytest.approx(extra_mat)


def test_book_times_from_manifests(tmp_path: Path) -> None:
    profile = load_profile("cpu", {"runs_dir": str(tmp_path / "runs")})
    for stage, seconds in (("experts/helpful", 120.0), ("fusion/raw", 30.0)):
        (profile.run_dir / stage).mkdir(parents=True)
        (profile.run_dir / stage / "manifest.json").write_text(json.dumps({"wall_time_s": seconds}))
    phases = {  # reused phases keep the time they took when computed; wall_time_s is the last call's judging
        "helpful": {"generate_s": 200.0, "reused_generations": True, "likelihood_s": 100.0, "judge_s": 1.5},
        "load_model": {"load_s": 0.5},
        "xstest": {"generate_s": 50.0, "judge_s": 2.0},
    }
    (profile.run_dir / "eval" / "base").mkdir(parents=True)
    (profile.run_dir / "eval" / "base" / "manifest.json").write_text(
        json.dumps({"wall_time_s": 0.04, "phase_times": phases})
    )
    (profile.run_dir / "fusion" / "raw.tmp-1").mkdir()  # an unfinished folder is ignored
    (profile.run_dir / "fusion" / "raw.tmp-1" / "manifest.json").write_text("{}")
    book = tmp_path / "book"
    book.mkdir()
    expected = sorted(p.stem for p in (bench.PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    resumed = {n: {"wall_s": 600.0} for n in expected}  # a resumed batch alone measures no budget
    (book / "_wall_times_cpu.json").write_text(json.dumps({"notebooks": resumed, "total_wall_s": 9.0}))
    assert not bench.book_times(profile, book)["complete"]
    scratch = {"commit": "abc", "notebooks": {"01_experts": 600.0}, "total_wall_s": 600.0}
    (book / "_wall_times_cpu.json").write_text(json.dumps({"notebooks": resumed, "from_scratch": scratch}))
    partial = bench.book_times(profile, book)
    assert partial["complete"] is (expected == ["01_experts"])
    scratch = {"commit": "abc", "notebooks": dict.fromkeys(expected, 600.0), "total_wall_s": 6000.0}
    (book / "_wall_times_cpu.json").write_text(json.dumps({"notebooks": resumed, "from_scratch": scratch}))
    times = bench.book_times(profile, book)
    assert times["complete"] and times["commit"] == "abc"
    assert times["stages_s"] == {"eval/base": 350.54, "experts/helpful": 120.0, "fusion/raw": 30.0}
    assert times["notebooks_s"] == dict.fromkeys(expected, 600.0)
    ratios = bench.ratios(
        {
            "ffn": [],
            "params": [],
            "train_step": {"ratio": 1.1},
            "generation": {"delta_ratio": 0.7, "materialised_ratio": 0.5},
            "book": times,
        }
    )
    assert ratios["book.total_min"] == {"value": 100.0, "target": "<= 90.0", "holds": False}
    assert ratios["train_step.fusion_vs_dense_lora"]["holds"] is True
    assert ratios["generation.delta_vs_dense"]["holds"] is False  # a ">=" target
    assert ratios["generation.materialised_vs_dense"]["holds"] is None


def test_interleaved_medians_runs_each_candidate_warmup_plus_repeats() -> None:
    calls: list[str] = []
    med = bench_common.interleaved_medians({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 1, 3)
    assert set(med) == {"a", "b"} and calls.count("a") == calls.count("b") == 4
    assert calls[2:4] == ["a", "b"] and calls[4:6] == ["b", "a"]  # the order rotates


def test_bench_json_to_a_folder_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def _assert_holds_is_value_against_target(key: str, r: dict) -> None:
    """`holds` is a bool exactly when there is a target and a value, and says whether value meets target."""
    if r["target"] is None or r["value"] is None:
        assert r["holds"] is None, key
        return
    op, target = r["target"].split()
    assert r["target"] == f"{bench.TARGETS[key][0]} {bench.TARGETS[key][1]}", key
    assert isinstance(r["holds"], bool), key
    assert r["holds"] == (r["value"] <= float(target) if op == "<=" else r["value"] >= float(target)), key


def test_ratios_of_every_section_carry_targets_and_consistent_holds() -> None:
    """Hand-made results (no timing): every targeted ratio is reported with its target, JSON round-trips."""
    results = {
        "ffn": [{"shape": "smollm2", "storage": "delta", "mode": "fwd_bwd", "ratio": 1.7}],
        "params": [{"model": "smollm2", "storage": "delta", "ratio": 1.01}],
        "train_step": {"ratio": 1.2},
        "generation": {"delta_ratio": 0.8, "materialised_ratio": 0.5},
        "book": {"total_s": None, "complete": False},
        "likelihood": {"dense": {"ratio": 0.95}, "moe": {"ratio": 0.5}, "threads": {"ratio": 1.1}},
    }
    ratios = json.loads(json.dumps(bench.ratios(results)))
    assert ratios["likelihood.dense.scorer_vs_plain_forward"] == {
        "value": 0.95,
        "target": ">= 0.8",
        "holds": True,
    }
    assert ratios["likelihood.moe.scorer_vs_plain_forward"]["holds"] is False
    assert ratios["likelihood.threads.two_processes_vs_two_threads"] == {
        "value": 1.1,
        "target": None,
        "holds": None,
    }
    assert ratios["ffn.smollm2.delta.fwd_bwd"]["holds"] is False
    assert ratios["book.total_min"]["holds"] is None
    for key, r in ratios.items():
        _assert_holds_is_value_against_target(key, r)
    without = {k: v for k, v in results.items() if k != "likelihood"}  # results written before section 6
    assert not any(k.startswith("likelihood.") for k in bench.ratios(without))
