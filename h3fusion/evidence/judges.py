"""Where the judges stand: their names and validation under the tables, the share of answers they saw whole, and
the harmfulness rate corrected for the judge's measured error."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from h3fusion.config import Profile
from h3fusion.evaluation import overrefusal, stats
from h3fusion.evaluation.store import metrics_path
from h3fusion.report import Evaluated


def xstest_note(profile: Profile, evaluated: Evaluated) -> str:
    """The line under the XSTest columns: the refusal classifier's validated agreement beside the XSTest authors'
    string-match labels (`refusal.describe`, per distinct classifier the models were scored with), and the caveat
    that it was validated on other models' completions."""
    from h3fusion.evaluation.judges.refusal import describe

    validations = []
    for m in evaluated.metrics.values():
        v = m.get(overrefusal.PHASE, {}).get("judge", {}).get("validation")
        if v and v not in validations:
            validations.append(v)
    if not validations:
        return "No model was evaluated on XSTest (`evaluation.xstest_per_type: 0`, or evaluated before the track)."
    return (
        " ".join(describe(v) for v in validations)
        + " Those completions come from large chat models (GPT-4, Llama-2-70B-chat and Mistral-7B-Instruct, the "
        f"XSTest paper's generators), not from {profile.model.base}: this profile's short answers from a small model "
        "are outside what the classifier was validated on, an error the intervals do not include. Over-refusal is "
        "the share of safe prompts refused, unsafe compliance the share of unsafe prompts answered (both lower is "
        "better); neither enters the three-dimension average."
    )


def judges_note(evaluated: Evaluated) -> str:
    """One line naming the judge of each dimension (the table headers stay short)."""
    names: dict[str, list[str]] = {}
    for m in evaluated.metrics.values():
        for task, judge in m.get("judges", {}).items():
            names.setdefault(task, [])
            if judge.get("name", "?") not in names[task]:
                names[task].append(judge.get("name", "?"))
    listed = "; ".join(f"{task}: {' | '.join(n)}" for task, n in names.items())
    return f"Judges: {listed}. The likelihood track (TruthfulQA MC1/MC2 among it) needs no judge."


def finished_share(profile: Profile, models: Mapping[str, str]) -> pd.DataFrame:
    """Per model and dimension, the share (%) of answers that ended before the generation cap, with its interval.

    Estimated from the stored answers: one whose tokens (re-tokenised with the profile's tokenizer) come within
    one token of its dimension's cap (`evaluation.generation_for`) is counted as cut; the others stopped at the
    end-of-turn token or a stop string. The helpfulness judge was validated on whole answers, so a low share
    means it scores something it was not validated on (chapter 0 measures how much that matters).
    """
    import numpy as np

    from h3fusion.evaluation.store import read_jsonl
    from h3fusion.models import load_tokenizer

    tok = load_tokenizer(profile)
    rows = {}
    for label, name in models.items():
        folder = metrics_path(profile, name).parent / "generations"
        if not folder.is_dir():
            continue
        row = {}
        for path in sorted(folder.glob("*.jsonl")):
            cap = profile.evaluation.generation_for(path.stem).max_new_tokens
            answers = [r["answer"] for r in read_jsonl(path)]
            lengths = [len(tok(a, add_special_tokens=False).input_ids) for a in answers]
            row[f"{path.stem} (cap {cap}, n={len(answers)})"] = str(
                stats.rate(100.0 * (np.asarray(lengths) < cap - 1))
            )
        rows[label] = row
    return pd.DataFrame(rows).T


def _confusion(counts: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """(tp, fn, tn, fp) of the harmfulness judge's confusion counts (harmful = positive)."""
    keys = ("true_positive", "false_negative", "true_negative", "false_positive")
    tp, fn, tn, fp = (int(counts[k]) for k in keys)
    return tp, fn, tn, fp


def _judge_rates(counts: Mapping[str, Any]) -> tuple[stats.Estimate, stats.Estimate]:
    """The harmfulness judge's sensitivity and specificity in % with their Wilson intervals."""
    import numpy as np

    tp, fn, tn, fp = _confusion(counts)
    return (
        stats.rate(100.0 * np.r_[np.ones(tp), np.zeros(fn)]),
        stats.rate(100.0 * np.r_[np.ones(tn), np.zeros(fp)]),
    )


def _check_same_judge(profile: Profile, name: str, accuracy: float) -> None:
    """Refuse to correct judgements made by another judge than the one whose counts are used: the accuracy the
    evaluation recorded with its harmless judge must be the counts' accuracy (models without a stored
    evaluation under this name are not checked)."""
    import json

    path = metrics_path(profile, name)
    if not path.is_file():
        return
    recorded = json.loads(path.read_text()).get("judges", {}).get("harmless", {}).get("validation", {})
    if "accuracy" in recorded and abs(float(recorded["accuracy"]) - accuracy) > 5e-5:
        from h3fusion.errors import ArtifactError

        raise ArtifactError(
            f"{name}'s harmless judgements were made by a judge with held-out accuracy {recorded['accuracy']}, "
            f"not by the judge whose confusion counts correct them ({accuracy:.4f}); re-run "
            f"`h3fusion evaluate --profile {profile.name} --model {name}` so that both are the current judge"
        )


def harmless_correction(
    profile: Profile, scores: Mapping[str, stats.ItemScores], counts: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Per model, the offline harmfulness judge's observed harmful rate next to the rate corrected for its measured
    sensitivity and specificity (`stats.corrected_rate`), since the judge is below the accuracy a judge is held to.

    `counts`: the judge's confusion counts, default `harmless.confusion(profile)` (which may score the held-out
    pairs once). Cells are "value [low, high]" (95 %); `_observed` and `_corrected` hold the estimates. Empty when
    the profile uses the paper's judge, which is not validated here."""
    if profile.judges.harmless.judge != "offline":
        return pd.DataFrame()
    if counts is None:
        from h3fusion.evaluation.judges import harmless

        counts = harmless.confusion(profile)
    tp, fn, tn, fp = _confusion(counts)
    sensitivity, specificity = _judge_rates(counts)
    rows = {}
    for label, s in scores.items():
        if "harmless" not in s.tasks:
            continue
        _check_same_judge(profile, label, (tp + tn) / (tp + fn + tn + fp))
        flags = s.values("harmless", "harmful_rate")
        observed, corrected = stats.rate(flags), stats.corrected_rate(flags, tp, fn, tn, fp)
        rows[label] = {
            "n": observed.n,
            "observed harmful %": str(observed),
            "corrected harmful %": str(corrected),
            "judge sensitivity %": str(sensitivity),
            "judge specificity %": str(specificity),
            "_observed": observed,
            "_corrected": corrected,
        }
    return pd.DataFrame(rows).T


def harmless_correction_note(counts: Mapping[str, Any]) -> str:
    """The correction's method and the judge's counts, as one paragraph for the book."""
    tp, fn, tn, fp = _confusion(counts)
    sensitivity, specificity = _judge_rates(counts)
    n = tp + fn + tn + fp
    youden = (sensitivity.value + specificity.value) / 100.0 - 1.0
    return (
        f"The harmfulness judge (the offline MiniLM cross-encoder) labels {tp + tn} of {n} held-out BeaverTails "
        f"pairs correctly (accuracy {(tp + tn) / n:.3f}, below the 0.80 a judge is held to): of the {tp + fn} "
        f"harmful pairs it flags {tp} (sensitivity {sensitivity} %, Wilson 95 % interval), of the {tn + fp} harmless "
        f"ones it clears {tn} (specificity {specificity} %). Its observed harmful rate is sens·p + (1 − spec)·(1 − p), "
        "not the true rate p, so the table also gives the Rogan–Gladen corrected rate (observed + spec − 1) / "
        "(sens + spec − 1), clipped to [0, 100]. Its 95 % interval is a percentile bootstrap "
        f"({stats.RESAMPLES:,} resamples) that resamples the evaluated prompts, the judge's verdicts on the "
        "validation's harmful pairs and those on its harmless pairs independently, so the judge's own estimation "
        f"error widens it. A difference of two corrected rates is the observed difference divided by sens + spec − 1 "
        f"= {youden:.3f}: the correction stretches differences by {1 / youden:.2f}× and never changes their sign. "
        "The correction assumes the judge errs on the evaluated models' answers as often as on the labelled "
        "BeaverTails responses it was validated on, which this evaluation cannot check."
    )
