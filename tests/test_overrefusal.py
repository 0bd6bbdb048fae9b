"""The XSTest track: the stratified prompt sample, rates counted from the classifier's verdicts, caching (a model
evaluated before the track gets only XSTest added), and the main table's XSTest columns."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from h3fusion import evidence, report
from h3fusion.artifacts import read_manifest
from h3fusion.config import load_profile
from h3fusion.data import format_prompt
from h3fusion.data.splits import xstest_eval_items
from h3fusion.errors import DataError
from h3fusion.evaluation import overrefusal, stats, store
from h3fusion.evaluation import run as runmod
from h3fusion.evaluation.judges.refusal import load_prompts

REFUSAL = "I'm sorry, I can't help with that."
VALIDATION = {
    "n": 2250,
    "classifier_accuracy": 90.0,
    "classifier_kappa": 0.8,
    "accuracy_low": 88.0,
    "accuracy_high": 92.0,
    "string_match_accuracy": 85.0,
    "string_match_kappa": 0.7,
    "gpt4_accuracy": 80.0,
    "gpt4_kappa": 0.6,
    "generators": ["a", "b"],
    "max_words": 36,
}


class SorryJudge:
    """A fake refusal classifier: an answer refuses when it starts with "I'm sorry"."""

    name = "fake-sorry"

    def __init__(self) -> None:
        self.validation = dict(VALIDATION)
        self.calls = 0

    def refused(self, answers):
        self.calls += 1
        return np.array([a.startswith("I'm sorry") for a in answers])


class _Judge:
    name = "fake"
    validation: dict = {}

    def win_probability(self, instructions, answers, references):
        return np.full(len(answers), 0.75)

    def harmful_probability(self, prompts, responses):
        return np.full(len(responses), 0.25)

    def judge(self, questions, answers, correct, incorrect):
        return [{"truthful": True, "informative": True} for _ in answers]


class RefusingLM:
    """Refuses the XSTest prompts whose id is even, answers everything else; records what it was asked."""

    def __init__(self, items) -> None:
        self.refuse = {format_prompt(it["prompt"]) for it in items if int(it["id"]) % 2 == 0}
        self.asked: list[str] = []

    def generate(self, prompts, cfg, seed):
        self.asked += prompts
        return [REFUSAL if p in self.refuse else "Sure, here is how." for p in prompts]


@pytest.fixture
def profile(tmp_path):
    # the likelihood track is not what these tests are about: the fake model has no log-likelihoods
    return load_profile(
        "smoke", {"runs_dir": str(tmp_path / "runs"), "evaluation.likelihood.skip_models": ["fake"]}
    )


def _judges():
    return SimpleNamespace(helpful=_Judge(), harmless=_Judge(), honest=_Judge(), refusal=SorryJudge())


def test_the_sample_has_the_same_count_of_every_type_and_is_seeded(tmp_path):
    every = load_prompts(load_profile("smoke"))
    p = load_profile("smoke", {"evaluation.xstest_per_type": 5})
    items = xstest_eval_items(p)
    types = Counter(it["type"] for it in items)
    assert set(types) == {r["type"] for r in every} and len(types) == 18 and set(types.values()) == {5}
    labels = Counter(it["label"] for it in items)
    assert labels == {"safe": 50, "unsafe": 40}  # 10 safe types, 8 unsafe contrast types
    assert all(it["type"].startswith("contrast_") == (it["label"] == "unsafe") for it in items)
    ids = [it["id"] for it in items]
    assert ids == [it["id"] for it in xstest_eval_items(p)]  # seeded
    other = load_profile("smoke", {"evaluation.xstest_per_type": 5, "seed": 7})
    assert ids != [it["id"] for it in xstest_eval_items(other)]
    first = [r["id"] for t in types for r in [r for r in every if r["type"] == t][:5]]
    assert sorted(ids) != sorted(first)  # not the first 5 of each type
    assert len(xstest_eval_items(load_profile("smoke", {"evaluation.xstest_per_type": None}))) == 450
    with pytest.raises(DataError, match="xstest_per_type is 26.*at most 25"):
        xstest_eval_items(load_profile("smoke", {"evaluation.xstest_per_type": 26}))


def test_rates_are_the_classifiers_verdicts_counted(profile):
    items = xstest_eval_items(profile)
    lm, judges = RefusingLM(items), _judges()
    metrics = runmod.evaluate_model(profile, "fake", judges=judges, lm=lm)
    rows = store.read_jsonl(store.eval_dir(profile, "fake") / overrefusal.FILE)
    assert [r["id"] for r in rows] == [it["id"] for it in items]
    assert all(
        r["refused"] == (int(r["id"]) % 2 == 0) and r["prompt"] == it["prompt"]
        for r, it in zip(rows, items, strict=True)
    )
    safe = [int(it["id"]) % 2 == 0 for it in items if it["label"] == "safe"]
    unsafe_answered = [int(it["id"]) % 2 == 1 for it in items if it["label"] == "unsafe"]
    xs = metrics["xstest"]
    assert xs["over-refusal"]["rate %"] == pytest.approx(100 * np.mean(safe))
    assert xs["unsafe compliance"]["rate %"] == pytest.approx(100 * np.mean(unsafe_answered))
    assert xs["over-refusal"]["n"] == 10 and xs["unsafe compliance"]["n"] == 8
    assert xs["over-refusal"]["low"] <= xs["over-refusal"]["rate %"] <= xs["over-refusal"]["high"]
    assert xs["judge"] == {"name": "fake-sorry", "validation": VALIDATION}
    # the same numbers from the per-item file, as the book reads them
    scores = evidence.xstest_scores(profile, {"fake": "fake"})["fake"]
    assert scores.values(overrefusal.SAFE, overrefusal.OVER_REFUSAL).mean() == pytest.approx(
        100 * np.mean(safe)
    )


def _xstest_prompts(asked, items):
    prompts = {format_prompt(it["prompt"]) for it in items}
    return [p for p in asked if p in prompts]


def test_a_model_evaluated_before_the_track_gets_only_xstest_added(profile):
    items = xstest_eval_items(profile)
    lm, judges = RefusingLM(items), _judges()
    before = runmod.evaluate_model(
        profile.model_copy(
            update={"evaluation": profile.evaluation.model_copy(update={"xstest_per_type": 0})}
        ),
        "fake",
        judges=judges,
        lm=lm,
    )
    folder = store.eval_dir(profile, "fake")
    assert "xstest" not in before and not (folder / overrefusal.FILE).exists()
    assert overrefusal.HASHES not in read_manifest(folder)

    lm.asked.clear()
    after = runmod.evaluate_model(profile, "fake", judges=judges, lm=lm)
    assert len(lm.asked) == len(items) == len(_xstest_prompts(lm.asked, items))  # only XSTest generated
    phases = read_manifest(folder)[runmod.PHASE_TIMES]
    assert all(phases[t]["reused_generations"] and phases[t]["reused_judgements"] for t in profile.tasks)
    assert not phases["xstest"]["reused_generations"]
    assert after["scores"] == before["scores"] and "xstest" in after

    # nothing changed: nothing generated or classified, the stored metrics returned
    lm.asked.clear()
    calls = judges.refusal.calls
    assert runmod.evaluate_model(profile, "fake", judges=judges, lm=lm) == after
    assert lm.asked == [] and judges.refusal.calls == calls

    # another classifier: the stored answers are classified again, not regenerated
    judges.refusal.validation = {**VALIDATION, "classifier_accuracy": 91.0}
    again = runmod.evaluate_model(profile, "fake", judges=judges, lm=lm)
    phases = read_manifest(folder)[runmod.PHASE_TIMES]["xstest"]
    assert lm.asked == [] and phases["reused_generations"] and not phases["reused_judgements"]
    assert again["xstest"]["over-refusal"] == after["xstest"]["over-refusal"]
    assert again["xstest"]["judge"]["validation"]["classifier_accuracy"] == 91.0

    # stored answers are re-classified without a model
    assert runmod.score_generations(profile, "fake", judges=judges)["xstest"] == again["xstest"]


def test_the_main_table_gets_the_xstest_columns_with_intervals_outside_the_average(profile):
    items = xstest_eval_items(profile)
    runmod.evaluate_model(profile, "fake", judges=_judges(), lm=RefusingLM(items))
    evaluated = report.collect_metrics(profile)
    long = evidence.estimates(evidence.xstest_scores(profile, evaluated), evidence.XSTEST_COLUMNS)
    assert evidence.AVERAGE not in set(long["column"])
    table = evidence.interval_table(long, list(evidence.XSTEST_COLUMNS.values()))
    assert list(table.columns) == ["XSTest over-refusal % ↓ (n=10)", "XSTest unsafe compliance % ↓ (n=8)"]
    safe_refused = sum(int(it["id"]) % 2 == 0 for it in items if it["label"] == "safe")
    wilson = stats.rate(np.r_[np.full(safe_refused, 100.0), np.zeros(10 - safe_refused)])
    assert table.loc["fake"].iloc[0] == f"{10 * safe_refused:.1f} [{wilson.low:.1f}, {wilson.high:.1f}]"
    note = evidence.xstest_note(profile, evaluated)
    assert "90.0 % [88.0, 92.0] of 2,250" in note and "string-match rule agrees on 85.0 %" in note
    assert profile.model.base in note and "neither enters the three-dimension average" in note
    assert json.loads(store.metrics_path(profile, "fake").read_text())["xstest"]["n_items"] == 18
