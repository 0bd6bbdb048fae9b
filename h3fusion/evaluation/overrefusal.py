"""The XSTest track of `evaluate_model`: over-refusal and unsafe compliance, judged by the refusal classifier.

Harmlessness bought by refusing safe requests is the known failure of safety tuning, and the harmless dimension
cannot see it (a model that refuses everything is never harmful). Every evaluated model answers a seeded sample of
XSTest's prompts (`h3fusion.data.splits.xstest_eval_items`: the same count of each safe type and of each unsafe
`contrast_*` type) in the Alpaca template, as the harmless dimension's prompts are asked, with the profile's
default generation config (`evaluation.generation`: on the cpu profile 48 tokens, about the 36 words the
classifier is validated at). The refusal classifier (`judges.refusal`) reads each answer; per item, the prompt's
id, type, safe/unsafe label, prompt, answer and verdict go to ``eval/<name>/xstest.jsonl``, and the metrics get
the over-refusal rate (safe prompts refused) and the unsafe-compliance rate (unsafe prompts answered) with their
Wilson intervals, beside the classifier's validation.

Caching, as for the likelihood track: the answers are reused while their hash (model identity, prompts,
generation config, seed, stop rule) is unchanged, the verdicts while the classifier's identity is unchanged too;
both hashes go into the manifest under `HASHES`. `evaluation.xstest_per_type: 0` switches the track off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from h3fusion.artifacts import Stopwatch, digest
from h3fusion.config import Profile
from h3fusion.errors import ArtifactError
from h3fusion.evaluation.generate import DEFAULT_STOP_STRINGS
from h3fusion.evaluation.lm import LanguageModel

FILE = "xstest.jsonl"
PHASE = "xstest"
"""The track's key in the metrics and in the manifest's phase times."""
HASHES = "xstest_hashes"
"""Manifest key: {"answers": hash of what the answers depend on, "verdicts": that and the classifier}."""
FORMAT = 2
"""Bump when the prompts, the batching or the stored rows change: cached XSTest answers are then redone (2: batches
planned by cost, `h3fusion.evaluation.generate.generation_batches`)."""


@dataclass
class Track:
    """One model's XSTest answers and verdicts."""

    rows: list[dict[str, Any]]
    hashes: dict[str, str]
    times: dict[str, Any]
    judge: dict[str, Any]
    """The classifier's name and validation (they travel with the rates)."""


def enabled(profile: Profile) -> bool:
    return profile.evaluation.xstest_per_type != 0


def classifier(profile: Profile, judges: Any) -> Any | None:
    """The refusal classifier of the track: the judges' own (`Judges.refusal`), else the stored offline one
    (built once per profile); None when the profile switches the track off."""
    if not enabled(profile):
        return None
    given = getattr(judges, "refusal", None)
    if given is not None:
        return given
    from h3fusion.evaluation.judges.refusal import load_offline

    return load_offline(profile)


def _answers_hash(profile: Profile, model_identity: str, prompts: Sequence[str]) -> str:
    return digest(
        {
            "format": FORMAT,
            "model": model_identity,
            "seed": profile.seed,
            "generation": profile.evaluation.generation.model_dump(mode="json"),
            "prompts": list(prompts),
            "stop": DEFAULT_STOP_STRINGS,
        }
    )


def hashes(profile: Profile, model_identity: str, prompts: Sequence[str], judge: Any) -> dict[str, str]:
    """{"answers": changes with anything that could change an answer, "verdicts": and with the classifier}."""
    from h3fusion.evaluation.judging import judge_identity

    answers = _answers_hash(profile, model_identity, prompts)
    return {"answers": answers, "verdicts": digest({"answers": answers, "judge": judge_identity(judge)})}


def run(
    profile: Profile,
    model_identity: str,
    judge: Any,
    previous: Any,
    get_model: Callable[[], LanguageModel] | None,
    name: str,
) -> Track:
    """Answer, classify and return model NAME's XSTest rows, reusing what `previous` (its earlier evaluation's
    `_Previous`, or None) stored under the same hashes. `get_model` is None when no model may be loaded
    (`score_generations`): stored answers are then required."""
    from h3fusion.data import format_prompt
    from h3fusion.data.splits import xstest_eval_items
    from h3fusion.evaluation.judging import judge_identity
    from h3fusion.evaluation.run import PHASE_TIMES, generate_answers
    from h3fusion.evaluation.store import read_jsonl

    items = xstest_eval_items(profile)
    prompts = [format_prompt(it["prompt"]) for it in items]
    now = hashes(profile, model_identity, prompts, judge)
    stored = previous.manifest.get(HASHES, {}) if previous else {}
    earlier = previous.manifest.get(PHASE_TIMES, {}).get(PHASE, {}) if previous else {}
    path = previous.folder / FILE if previous else None
    rows = read_jsonl(path) if path and path.is_file() and stored.get("answers") == now["answers"] else None
    times: dict[str, Any] = {"reused_generations": rows is not None, "generate_s": earlier.get("generate_s")}
    if rows is None:
        if get_model is None:
            raise ArtifactError(
                f"no XSTest answers of {name!r} stored for the profile's XSTest settings; run `h3fusion evaluate "
                f"--profile {profile.name} --model {name}` first (or set evaluation.xstest_per_type: 0)"
            )
        lm = get_model()
        with Stopwatch() as sw:
            answers = generate_answers(
                lm, prompts, profile.evaluation.generation, profile.seed, f"{name}/xstest"
            )
        times["generate_s"] = round(sw.seconds, 2)
        rows = [
            {"id": it["id"], "type": it["type"], "label": it["label"], "prompt": it["prompt"], "answer": a}
            for it, a in zip(items, answers, strict=True)
        ]
    reuse_verdicts = times["reused_generations"] and stored.get("verdicts") == now["verdicts"]
    times["reused_judgements"] = reuse_verdicts
    if reuse_verdicts:
        times["judge_s"] = earlier.get("judge_s")
    else:
        with Stopwatch() as sw:
            refused = judge.refused([r["answer"] for r in rows])
        times["judge_s"] = round(sw.seconds, 2)
        rows = [{**r, "refused": bool(v)} for r, v in zip(rows, refused, strict=True)]
    return Track(rows, now, times, judge_identity(judge))


SAFE, UNSAFE = "xstest_safe", "xstest_unsafe"
"""The per-item score sets of the book's tables (`stats.ItemScores` tasks): safe prompts, unsafe prompts."""
OVER_REFUSAL, UNSAFE_COMPLIANCE = "over_refusal", "unsafe_compliance"


def item_values(rows: Sequence[dict[str, Any]]) -> dict[str, tuple[list[str], dict[str, np.ndarray]]]:
    """Per item in % (0 or 100): refused, for the safe prompts; answered, for the unsafe ones (so the two rates
    are their means, as `rates` counts them)."""
    out = {}
    for task, label, metric, counted in (
        (SAFE, "safe", OVER_REFUSAL, True),
        (UNSAFE, "unsafe", UNSAFE_COMPLIANCE, False),
    ):
        kept = [r for r in rows if r["label"] == label]
        values = 100.0 * np.array([bool(r["refused"]) == counted for r in kept], dtype=float)
        out[task] = ([str(r["id"]) for r in kept], {metric: values})
    return out


def rates(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Over-refusal and unsafe compliance in % with Wilson 95 % intervals and n (`refusal.refusal_rates`)."""
    from h3fusion.evaluation.judges.refusal import refusal_rates

    return refusal_rates([r["label"] for r in rows], [r["refused"] for r in rows])


def metrics(track: Track) -> dict[str, Any]:
    """The metrics.json entry: the two rates, the prompts per label and type, and the classifier's validation."""
    types: dict[str, int] = {}
    for r in track.rows:
        types[r["type"]] = types.get(r["type"], 0) + 1
    return {**rates(track.rows), "n_items": len(track.rows), "items_per_type": types, "judge": track.judge}
