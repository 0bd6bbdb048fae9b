"""h3fusion.report (chapters 03, 05, 06): stored evaluations -> tables, headline vs the paper, verdict, distances."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from h3fusion import embeddings, evidence, report, reproducibility
from h3fusion.config import load_profile
from h3fusion.errors import H3FusionError


@pytest.fixture
def profile(tmp_path):
    return load_profile("smoke", {"runs_dir": str(tmp_path / "runs")})


N_ITEMS = 100


def _write(profile, name, win, harmful, tri, judge="offline judge", validation=None):
    """metrics.json and per-item judgements of N_ITEMS items per dimension with exactly these rates (%)."""
    folder = profile.run_dir / "eval" / name
    (folder / "judgements").mkdir(parents=True)

    def rows(task, rate, make):
        return "".join(
            json.dumps({"id": i, "item_id": f"{task}-{i}", **make(i < round(rate * N_ITEMS / 100))}) + "\n"
            for i in range(N_ITEMS)
        )

    (folder / "judgements" / "helpful.jsonl").write_text(
        rows("helpful", win, lambda y: {"win_probability": float(y)})
    )
    (folder / "judgements" / "harmless.jsonl").write_text(
        rows("harmless", harmful, lambda y: {"harmful_probability": float(y)})
    )
    (folder / "judgements" / "honest.jsonl").write_text(
        rows("honest", tri, lambda y: {"truthful": y, "informative": True})
    )
    judges = {
        t: {"name": judge, "validation": validation or {"accuracy": 0.8, "n_heldout": {"pairs": 10}}}
        for t in profile.tasks
    }
    scores = {
        "helpful": {"win_rate": win},
        "harmless": {"harmful_rate": harmful},
        "honest": {"truthful_x_informative": tri, "truthful": tri, "informative": 100.0},
    }
    (folder / "metrics.json").write_text(json.dumps({"model": name, "scores": scores, "judges": judges}))


def _avg(win, harmful, tri):
    return (win + 100 - harmful + tri) / 3


def test_missing_models_are_listed_and_extra_ones_kept(profile):
    _write(profile, "base", 10, 40, 20)
    _write(profile, "my-extra-run", 10, 40, 20)
    ev = report.collect_metrics(profile)
    assert list(ev.metrics) == ["base", "my-extra-run"]
    assert "helpful" in ev.missing and report.fused_variant(profile) in ev.missing
    assert "merge-ties" in ev.missing and "base" not in ev.missing
    groups = report.group_column(ev)
    assert groups["my-extra-run"] == "other" and groups["base"] == "base"


def test_nothing_evaluated_is_a_clear_error_and_an_honest_verdict(profile):
    ev = report.collect_metrics(profile)
    assert not ev.metrics and report.fused_variant(profile) in ev.missing
    comparisons = evidence.headline_comparisons(profile, ev, evidence.item_scores(profile, ev))
    assert set(comparisons["verdict"]) == {"not compared"}
    assert "Nothing can be compared" in evidence.verdict(comparisons)


def test_headline_verdicts_come_from_intervals_not_signs(profile):
    """Clearly better than every expert -> 'better'; a little worse than the merge -> 'within noise', although
    its point estimate is negative; far worse than the ensemble -> 'worse'."""
    fused = report.fused_variant(profile)
    _write(profile, "base", 10, 50, 10)
    for i, task in enumerate(profile.tasks):
        _write(profile, task, 20 + i, 40, 20)
    _write(profile, fused, 60, 20, 50)
    _write(profile, "merge-ties", 62, 20, 50)  # 0.7 points better on average: within noise at n=100
    _write(profile, "ensemble-uniform", 95, 5, 90)
    _write(profile, "lora-data-mix", 20, 60, 10)  # far worse; its row has no paper claim
    ev = report.collect_metrics(profile)
    scores = evidence.item_scores(profile, ev)
    comp = evidence.headline_comparisons(profile, ev, scores)
    best_expert = _avg(20 + len(profile.tasks) - 1, 40, 20)
    experts = comp.loc["vs the experts"]
    assert experts["best member (point estimate)"] == profile.tasks[-1]
    assert experts["_points"].value == pytest.approx(_avg(60, 20, 50) - best_expert)
    assert experts["_relative"].value == pytest.approx(100 * (_avg(60, 20, 50) - best_expert) / best_expert)
    assert experts["_points"].low > 0 and experts["verdict"] == "better"
    merges = comp.loc["vs the merges"]
    assert merges["_points"].value < 0 and merges["verdict"] == "within noise at this sample size"
    assert comp.loc["vs the ensembles", "verdict"] == "worse"
    assert comp[report.PAPER_COL].tolist() == [11.37, 13.77, 6.18, None]
    data_mix = comp.loc["vs the data-mix LoRA"]
    assert data_mix["best member (point estimate)"] == "lora-data-mix" and data_mix["verdict"] == "better"
    assert data_mix["_points"].value == pytest.approx(_avg(60, 20, 50) - _avg(20, 60, 10))
    text = evidence.verdict(comp, "tiny scale")
    assert "against the data-mix LoRA, H3Fusion-MoE is better" in text
    assert "not compared in the paper" in text and "the paper claims +6.18 %" in text
    assert text.startswith("At tiny scale, against the best of the experts, H3Fusion-MoE is better")
    assert "against the merges, H3Fusion-MoE is within noise at this sample size" in text  # one member: no "best of"
    members = evidence.member_differences(profile, ev, scores)
    assert list(members.loc["experts"].index) == list(profile.tasks)
    assert set(members.loc["experts", "verdict"]) == {"better"}


def test_interval_table_shows_every_cell_with_its_interval_and_n(profile):
    _write(profile, "base", 10, 50, 10)
    ev = report.collect_metrics(profile)
    long = evidence.estimates(evidence.item_scores(profile, ev))
    table = evidence.interval_table(long, [*evidence.HEADLINE_COLUMNS, evidence.AVERAGE])
    assert list(table.columns) == [
        f"{c} (n={N_ITEMS})" for c in [*evidence.HEADLINE_COLUMNS, evidence.AVERAGE]
    ]
    assert table.loc["base"].iloc[0] == "10.0 [5.5, 17.4]"  # Wilson, 10 of 100
    assert table.loc["base"].iloc[3].startswith(f"{_avg(10, 50, 10):.1f} [")


def test_judge_validation_names_every_judge_with_flattened_figures(profile):
    _write(profile, "base", 10, 50, 10, judge="judge A")
    _write(profile, "helpful", 10, 50, 10, judge="judge B", validation={"kappa": 0.4})
    frame = report.judge_validation(report.collect_metrics(profile))
    assert set(frame.index.get_level_values("judge")) == {"judge A", "judge B"}
    assert frame.loc[("harmless", "judge A", "n_heldout.pairs"), "value"] == 10
    assert frame.loc[("honest", "judge B", "kappa"), "value"] == 0.4
    assert frame.loc[("helpful", "judge A", "models scored"), "value"] == 1


def test_embedding_prompts_split_evenly_and_capped(profile):
    prompts, tasks = embeddings.embedding_prompts(profile, 7)
    assert len(prompts) == 7 and [tasks.count(t) for t in profile.tasks] == [3, 2, 2]
    available = sum(profile.data.eval_examples[t] for t in profile.tasks)
    prompts, tasks = embeddings.embedding_prompts(profile, 100)
    assert len(prompts) == available  # smoke has fewer eval items than 100: all of them
    with pytest.raises(H3FusionError, match="at least 1"):
        embeddings.embedding_prompts(profile, 0)


def test_distance_table_is_zero_on_the_diagonal_and_symmetric():
    rng = np.random.default_rng(0)
    emb = {n: rng.normal(size=(5, 4)) for n in ("base", "a", "b")}
    table = embeddings.distance_table(emb, ["base", "a", "b"])
    assert np.allclose(np.diag(table.to_numpy()), 0)
    assert np.allclose(table.to_numpy(), table.to_numpy().T)
    assert table.loc["a", "to base"] == pytest.approx(np.linalg.norm(emb["a"] - emb["base"], axis=1).mean())


def test_reproducibility_tables_read_manifests_and_wall_times(profile, tmp_path, monkeypatch):
    from h3fusion.artifacts import MANIFEST, atomic_write_json, make_manifest
    from h3fusion.evaluation.run import PHASE_TIMES
    from h3fusion.notebooks import OUTPUT_ENV, _record_wall_time

    assert reproducibility.artifact_table(profile).empty
    folder = profile.run_dir / "experts" / "helpful"
    folder.mkdir(parents=True)
    atomic_write_json(folder / MANIFEST, make_manifest(profile, "abc123", 12.5, stage="experts"))
    table = reproducibility.artifact_table(profile)
    assert list(table.index) == ["experts/helpful"]
    assert table.loc["experts/helpful", "wall s"] == 12.5
    assert table.loc["experts/helpful", "config hash"] == "abc123"
    # an evaluation's manifest times its judging (wall_time_s) and, per phase, its loading and generation
    evaluated = profile.run_dir / "eval" / "base"
    evaluated.mkdir(parents=True)
    phases = {"load_model": {"load_s": 2.0}, "helpful": {"generate_s": 3.0, "mc_s": 1.0, "judge_s": 0.5}}
    atomic_write_json(evaluated / MANIFEST, make_manifest(profile, "def456", 0.5, **{PHASE_TIMES: phases}))
    assert reproducibility.artifact_table(profile).loc["eval/base", "wall s"] == 6.5
    times = reproducibility.wall_times(profile, ["base"]).loc["base"]
    assert (times["model load s"], times["generation s"], times["likelihood track s"]) == (2.0, 3.0, 1.0)
    assert times["judging + writing s"] == 0.5
    # a reused generation recorded as 0 s by an older resumed run: its time is unknown, not zero
    lost = {"helpful": {"generate_s": 0.0, "reused_generations": True, "likelihood_s": 1.0}}
    atomic_write_json(evaluated / MANIFEST, make_manifest(profile, "def456", 0.5, **{PHASE_TIMES: lost}))
    times = reproducibility.wall_times(profile, ["base"]).loc["base"]
    assert math.isnan(times["generation s"]) and times["likelihood track s"] == 1.0

    monkeypatch.setenv(OUTPUT_ENV, str(tmp_path))
    assert reproducibility.notebook_wall_times(profile).empty
    fresh = {"started": "2026-01-01T00:00:00+00:00", "commit": "c1", "from_scratch": True}
    _record_wall_time(tmp_path, "smoke", "00_data_and_judges", 3.5, fresh)
    times = reproducibility.notebook_wall_times(profile)
    assert times.loc["00_data_and_judges", "wall s"] == 3.5
    assert times.loc["00_data_and_judges", "commit"] == "c1"
    path = tmp_path / "_wall_times_smoke.json"  # a hand-written note describes the times it came with
    path.write_text(json.dumps({**json.loads(path.read_text()), "note": "re-run from cache"}))
    assert reproducibility.notebook_wall_times(profile).attrs["note"] == "re-run from cache"
    resumed = {"started": "2026-01-02T00:00:00+00:00", "commit": "c2", "from_scratch": False}
    _record_wall_time(tmp_path, "smoke", "01_expert_alignment", 4.0, resumed)
    _record_wall_time(tmp_path, "smoke", "00_data_and_judges", 0.5, resumed)
    data = json.loads(path.read_text())
    assert "note" not in data
    # the resumed batch replaced the latest times, not the from-scratch record (the budget)
    assert data["notebooks"]["00_data_and_judges"]["wall_s"] == 0.5
    assert data["from_scratch"] == {"started": fresh["started"], "commit": "c1",
                                    "notebooks": {"00_data_and_judges": 3.5}, "total_wall_s": 3.5}
    assert reproducibility.from_scratch_run(profile)["total_wall_s"] == 3.5
    assert not reproducibility.environment_table().empty
