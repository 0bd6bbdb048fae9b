"""The XSTest refusal classifier: data join, leave-one-generator-out validation, agreement and refusal rates."""

from __future__ import annotations

import numpy as np
import pytest

from h3fusion.config import load_profile
from h3fusion.errors import DataError
from h3fusion.evaluation.judges import refusal as R


@pytest.fixture(scope="module")
def profile():
    return load_profile("smoke")


def test_prompts_and_labelled_completions_load_and_join(profile):
    prompts = R.load_prompts(profile)
    assert len(prompts) == 450
    assert sum(p["label"] == "safe" for p in prompts) == 250
    rows = R.load_labelled_completions(profile)
    assert len(rows) == 5 * 450 and {r.generator for r in rows} == set(R.GENERATORS)
    # human labels of both kinds; the automated labels are not copies of them
    refused = np.array([r.refused for r in rows])
    assert 0.2 < refused.mean() < 0.8
    assert np.mean([r.strmatch_refused == r.refused for r in rows]) < 1.0


def test_cut_keeps_the_first_words():
    assert R.cut("I  cannot help\nwith that, sorry.", 3) == "I cannot help"
    assert R.cut("", 5) == ""


class WordEncoder:
    """A fake encoder: one feature, +1 when the text starts with 'no', else -1, flipped for texts marked 'X'."""

    def encode(self, texts, desc=""):
        out = []
        for t in texts:
            v = 1.0 if t.lower().startswith("no") else -1.0
            out.append([-v if "X" in t else v, 0.0])
        return np.asarray(out)


def _row(gen: str, text: str, refused: bool) -> R.LabelledCompletion:
    return R.LabelledCompletion(gen, "1", "t", "p", text, refused, refused, refused)


def test_leave_one_generator_out_never_trains_on_the_generator_it_labels():
    rows = []
    for gen in ("a", "b", "c"):
        for i in range(20):
            refused = i % 2 == 0
            text = ("no way" if refused else "sure, here") + (" X" if gen == "c" else "")
            rows.append(_row(gen, text, refused))
    predicted = R.leave_one_generator_out(rows, WordEncoder(), max_words=10)
    human = np.array([r.refused for r in rows])
    gen = np.array([r.generator for r in rows])
    # c's feature is flipped: labelled by a classifier trained on a and b only, every c completion comes out
    # wrong (had c been in its own training data, the fit could not have been all wrong on it)
    assert (predicted[gen == "c"] != human[gen == "c"]).all()
    table = R.agreement_table(rows, predicted)
    assert table.loc[("c", "this classifier"), "accuracy %"] == 0.0
    assert table.loc[("all", "string match (XSTest authors)"), "accuracy %"] == 100.0
    assert table.loc[("all", "this classifier"), "n"] == 60


def test_refusal_rates_with_intervals():
    labels = ["safe"] * 4 + ["unsafe"] * 2
    refused = [True, False, False, False, True, False]
    rates = R.refusal_rates(labels, refused)
    assert rates["over-refusal"]["rate %"] == 25.0 and rates["over-refusal"]["n"] == 4
    assert rates["unsafe compliance"]["rate %"] == 50.0 and rates["unsafe compliance"]["n"] == 2
    assert rates["over-refusal"]["low"] < 25.0 < rates["over-refusal"]["high"]
    with pytest.raises(DataError, match="verdicts"):
        R.refusal_rates(labels, refused[:-1])


def test_one_kind_of_label_is_refused():
    with pytest.raises(DataError, match="both"):
        R.RefusalClassifier(WordEncoder(), 5).fit(["no", "no"], [True, True])


def test_the_stored_classifier_is_built_once_and_restored_with_its_validation(tmp_path):
    from h3fusion.artifacts import read_manifest
    from h3fusion.evaluation.judges.common import judges_dir

    p = load_profile("smoke", {"runs_dir": str(tmp_path)})
    built = R.load_offline(p)
    folder = judges_dir(p) / R.FOLDER
    stamp = read_manifest(folder)["finished_at"]
    again = R.load_offline(p)  # read back from judges/refusal/, not refitted
    assert read_manifest(folder)["finished_at"] == stamp and again.validation == built.validation
    rows = R.training_completions(p)
    assert len(rows) == p.judges.refusal_completions and {r.generator for r in rows} == set(R.GENERATORS)
    refit = R.RefusalClassifier(built.classifier.encoder, R.MAX_WORDS).fit(
        [r.completion for r in rows], [r.refused for r in rows]
    )
    answers = ["I'm sorry, but I can't help with that.", "Sure! Use `kill -9 PID` to stop it."]
    assert (again.refused(answers) == refit.predict(answers)).all()
    # an empty answer complies with nothing: a refusal, whatever the classifier would read into it
    assert again.refused(["", *answers, "  \n"]).tolist() == [True, *refit.predict(answers).tolist(), True]
    assert again.refused(["", " "]).tolist() == [True, True] and again.refused([]).shape == (0,)
    v = built.validation
    assert v["n"] == len(rows) and v["accuracy_low"] <= v["classifier_accuracy"] <= v["accuracy_high"]
    table = R.validation_table(p)  # per generator, from the stored held-out verdicts
    assert table.loc[("all", "this classifier"), "accuracy %"] == pytest.approx(
        v["classifier_accuracy"], abs=0.01
    )
    assert table.loc[("all", "string match (XSTest authors)"), "kappa"] == pytest.approx(
        v["string_match_kappa"], abs=1e-4
    )
    assert set(table.index.get_level_values("generator")) == {*R.GENERATORS, "all"}
    assert "string-match rule agrees on" in R.describe(v)
