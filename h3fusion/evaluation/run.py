"""Evaluate one model on the helpful, harmless and honest dimensions: generate, judge, write `eval/<name>/`.

`evaluate_model(profile, name)` resolves NAME through `registry.known_models(profile)` (base, an expert, the raw
MoE, a fused variant, a baseline, or anything another module registers with `register_models`), generates
answers for each dimension's evaluation items (`inputs.dimension_inputs`), judges them, scores the judge-free
likelihood track (`h3fusion.evaluation.likelihood`: TruthfulQA MC1/MC2, reference answers, safe vs unsafe
responses) from the model's log-likelihoods, and writes (`store`) into
``runs/<profile>/eval/<name>/``:

- ``generations/<dimension>.jsonl``: prompt and answer per item,
- ``judgements/<dimension>.jsonl``: the judge's output per item,
- ``likelihood/<dimension>.jsonl``: the likelihood track per item (MC1/MC2 and the choices' log-likelihoods per
  TruthfulQA question; per-token log-likelihood per reference answer; safe-unsafe margin per BeaverTails pair),
- ``xstest.jsonl``: the XSTest track per prompt (`h3fusion.evaluation.overrefusal`: answer and refusal verdict),
- ``metrics.json``: the scores, the judge names and their validation figures, item counts, hashes (the same bytes
  for the same results: wall times stay out of it),
- ``manifest.json`` (last; the folder is written atomically), with the wall time of each phase (`PHASE_TIMES`).

Caching: the generations of a dimension are reused when its *generation hash* is unchanged. That hash covers the
evaluation items, the generation config, the seed, the prompt format and the model's identity (the manifest of
its artifact folder without the build's wall time, date, paths and machine: a model re-trained with another
config or to another loss log is re-generated, one re-built the same is not). The likelihood track of a dimension
is reused while its own hash (items, scored texts, MC prompt, model identity) is unchanged. Judgements are reused when the judge identity
(names and validation figures) is unchanged too; a re-run with nothing changed loads nothing and returns the
stored metrics. The XSTest track is cached the same way under its own hashes. `score_generations` re-judges stored
generations without loading the model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from h3fusion.artifacts import (
    MANIFEST,
    Stopwatch,
    atomic_dir,
    atomic_write_json,
    digest,
    make_manifest,
    read_manifest,
)
from h3fusion.config import GenerationConfig, Profile
from h3fusion.errors import ArtifactError
from h3fusion.evaluation import likelihood, overrefusal
from h3fusion.evaluation.generate import DEFAULT_STOP_STRINGS
from h3fusion.evaluation.generation_cache import profile_generation_cache
from h3fusion.evaluation.inputs import DimensionInputs, profile_inputs
from h3fusion.evaluation.judging import (
    judge_dimension,
    judge_for,
    judge_identity,
    load_profile_judges,
    scores_from_judgements,
)
from h3fusion.evaluation.lm import HFLanguageModel, LanguageModel
from h3fusion.evaluation.logprob_cache import profile_cache
from h3fusion.evaluation.mc import mc_prompt
from h3fusion.evaluation.registry import resolve_model
from h3fusion.evaluation.store import METRICS, eval_dir, read_jsonl, write_jsonl

EVAL_FORMAT = 2
"""Bump when prompts, stop rules, batching or the files' layout change: every cached generation is then redone
(2: batches planned by cost, `generation.generation_batches`; a batch's composition can move a greedy answer at
the rounding level)."""

PHASE_TIMES = "phase_times"
"""Manifest key: {phase or dimension: seconds and whether generations/judgements were reused}."""
LIKELIHOOD_HASHES = "likelihood_hashes"


# ---------------------------------------------------------------------------------------------- hashing and files


def generation_hash(profile: Profile, model_identity: str, task: str, inputs: DimensionInputs) -> str:
    """Changes when anything that could change this dimension's answers changes."""
    return digest(
        {
            "format": EVAL_FORMAT,
            "task": task,
            "model": model_identity,
            "seed": profile.seed,
            "generation": profile.evaluation.generation_for(task).model_dump(mode="json"),
            "prompts": inputs.prompts,
            "stop": DEFAULT_STOP_STRINGS,
        }
    )


# ---------------------------------------------------------------------------------------------- evaluation


@dataclass
class _Previous:
    """What an earlier run of the same model left in eval/<name>/."""

    manifest: dict[str, Any]
    folder: Path

    def generations(self, task: str, gen_hash: str) -> list[dict] | None:
        if self.manifest.get("generation_hashes", {}).get(task) != gen_hash:
            return None
        path = self.folder / "generations" / f"{task}.jsonl"
        return read_jsonl(path) if path.is_file() else None

    def judgements(self, task: str, gen_hash: str, judge_hash: str) -> list[dict] | None:
        if (
            self.generations(task, gen_hash) is None
            or self.manifest.get("judge_hashes", {}).get(task) != judge_hash
        ):
            return None
        path = self.folder / "judgements" / f"{task}.jsonl"
        return read_jsonl(path) if path.is_file() else None

    def likelihood(self, task: str, hash_: str) -> list[dict] | None:
        path = self.folder / likelihood.FOLDER / f"{task}.jsonl"
        if self.manifest.get(LIKELIHOOD_HASHES, {}).get(task) != hash_ or not path.is_file():
            return None
        return read_jsonl(path)


def _earlier(previous: _Previous | None, task: str, key: str) -> float | None:
    """The seconds an earlier run spent on a phase that this run reuses (None when it did not record them), so
    the manifest keeps what producing each part of the evaluation cost."""
    if previous is None:
        return None
    value = previous.manifest.get(PHASE_TIMES, {}).get(task, {}).get(key)
    return None if value is None else float(value)


def _previous(folder: Path) -> _Previous | None:
    manifest = read_manifest(folder)
    return _Previous(manifest, folder) if manifest else None


@dataclass
class _Tracks:
    """What an evaluation has before judging: every dimension's answers and likelihood rows with their hashes,
    the wall times so far, the earlier evaluation (for reuse) and the XSTest track."""

    generations: dict[str, list[dict]]
    gen_hashes: dict[str, str]
    track_rows: dict[str, list[dict]]
    track_hashes: dict[str, str]
    times: dict[str, dict[str, Any]]
    previous: _Previous | None
    xstest: overrefusal.Track | None


def evaluate_model(
    profile: Profile, name: str, *, judges: Any = None, lm: LanguageModel | None = None
) -> dict[str, Any]:
    """Evaluate model NAME on every dimension of the profile; returns (and writes) its metrics.

    `judges` defaults to `h3fusion.evaluation.judges.load_judges(profile)`; `lm` overrides the loader (a model
    already in memory), in which case NAME only names the output folder and the model identity is NAME itself.
    """
    entry = resolve_model(profile, name) if lm is None else None
    identity = entry.identity() if entry is not None else f"in-memory:{name}"
    inputs = profile_inputs(profile)
    judges = judges if judges is not None else load_profile_judges(profile)  # before generating: fail fast
    refusals = overrefusal.classifier(profile, judges)
    folder = eval_dir(profile, name)
    previous = _previous(folder)
    gen_hashes = {t: generation_hash(profile, identity, t, inputs[t]) for t in profile.tasks}
    on_track = name not in profile.evaluation.likelihood.skip_models
    track_inputs = likelihood.likelihood_inputs(profile) if on_track else {}
    track_hashes = {t: li.digest(identity, profile.evaluation.mc_prompt) for t, li in track_inputs.items()}

    model: LanguageModel | None = lm
    times: dict[str, dict[str, float | bool]] = {}

    def get_model() -> LanguageModel:
        nonlocal model
        if model is None:
            assert entry is not None
            print(f"loading {name}: {entry.description}")
            with Stopwatch() as sw:
                model = entry.load()
            if isinstance(model, HFLanguageModel):
                # token ensembles of this model reuse its log-probabilities, output-level ones its answers
                model.store_logprobs(profile_cache(profile.run_dir), identity)
                model.store_generations(profile_generation_cache(profile.run_dir), identity)
            times["load_model"] = {"load_s": round(sw.seconds, 2)}
        return model

    generations: dict[str, list[dict]] = {}
    for task in profile.tasks:
        cached = previous.generations(task, gen_hashes[task]) if previous else None
        reused = cached is not None
        lm_now = None if reused else get_model()  # loading is timed on its own
        with Stopwatch() as sw:
            if lm_now is not None:
                cfg = profile.evaluation.generation_for(task)
                answers = generate_answers(lm_now, inputs[task].prompts, cfg, profile.seed, f"{name}/{task}")
                cached = [
                    {"id": i, **k, "prompt": p, "answer": a}
                    for i, (k, p, a) in enumerate(
                        zip(inputs[task].keys, inputs[task].prompts, answers, strict=True)
                    )
                ]
        seconds = _earlier(previous, task, "generate_s") if reused else round(sw.seconds, 2)
        times[task] = {"generate_s": seconds, "reused_generations": reused}
        generations[task] = cached

    track_rows: dict[str, list[dict]] = {}
    for task, li in track_inputs.items():
        rows = previous.likelihood(task, track_hashes[task]) if previous else None
        lm_now = None if rows is not None else get_model()
        with Stopwatch() as sw:
            if lm_now is not None:
                rows = likelihood.score(lm_now, li, profile.evaluation.mc_prompt)
        seconds = round(sw.seconds, 2) if lm_now is not None else _earlier(previous, task, "likelihood_s")
        times.setdefault(task, {}).update(likelihood_s=seconds, reused_likelihood=lm_now is None)
        track_rows[task] = rows

    xstest = (
        None if refusals is None else overrefusal.run(profile, identity, refusals, previous, get_model, name)
    )
    tracks = _Tracks(generations, gen_hashes, track_rows, track_hashes, times, previous, xstest)
    return _judge_and_write(profile, name, identity, judges, inputs, tracks)


def generate_answers(
    lm: LanguageModel, prompts: list[str], cfg: GenerationConfig, seed: int, desc: str
) -> list[str]:
    """One answer per prompt (a Hugging Face model shows `desc` on its progress bar; an ensemble generates its
    own way)."""
    if isinstance(lm, HFLanguageModel):
        return lm.generate(prompts, cfg, seed, desc=desc)
    return lm.generate(prompts, cfg, seed)


def score_generations(profile: Profile, name: str, *, judges: Any = None) -> dict[str, Any]:
    """Re-judge the stored generations of NAME (no model is loaded); an error when there are none."""
    folder = eval_dir(profile, name)
    previous = _previous(folder)
    missing = [t for t in profile.tasks if not (folder / "generations" / f"{t}.jsonl").is_file()]
    if previous is None or missing:
        raise ArtifactError(
            f"no generations for model {name!r} in {folder} (missing: {', '.join(missing) or 'manifest'}); "
            f"run `h3fusion evaluate --profile {profile.name} --model {name}` first"
        )
    generations = {t: read_jsonl(folder / "generations" / f"{t}.jsonl") for t in profile.tasks}
    inputs = {
        t: DimensionInputs([g["prompt"] for g in rows], [_keys_of(g) for g in rows])
        for t, rows in generations.items()
    }
    gen_hashes = dict(previous.manifest.get("generation_hashes", {}))
    track_hashes = dict(previous.manifest.get(LIKELIHOOD_HASHES, {}))
    track_rows = {t: previous.likelihood(t, h) for t, h in track_hashes.items()}
    track_rows = {t: rows for t, rows in track_rows.items() if rows is not None}
    track_hashes = {t: h for t, h in track_hashes.items() if t in track_rows}
    times = {t: {"generate_s": 0.0, "reused_generations": True} for t in profile.tasks}
    identity = previous.manifest.get("model_identity", f"stored:{name}")
    refusals = overrefusal.classifier(profile, judges)
    xstest = None if refusals is None else overrefusal.run(profile, identity, refusals, previous, None, name)
    tracks = _Tracks(generations, gen_hashes, track_rows, track_hashes, times, previous, xstest)
    return _judge_and_write(profile, name, identity, judges, inputs, tracks)


def _keys_of(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if k not in {"id", "prompt", "answer"}}


def _judge_and_write(
    profile: Profile,
    name: str,
    identity: str,
    judges: Any,
    inputs: dict[str, DimensionInputs],
    tracks: _Tracks,
) -> dict[str, Any]:
    """Judge the answers (reusing stored judgements of the same answers and judge), then write the folder."""
    t0 = time.perf_counter()
    previous, xstest = tracks.previous, tracks.xstest
    judges = judges if judges is not None else load_profile_judges(profile)
    judge_hashes = {t: digest(judge_identity(judge_for(judges, t))) for t in profile.tasks}
    hashed = {
        "generations": tracks.gen_hashes,
        "likelihood": tracks.track_hashes,
        "judges": judge_hashes,
    }
    config_hash = digest(hashed if xstest is None else {**hashed, overrefusal.PHASE: xstest.hashes})
    folder = eval_dir(profile, name)
    stored = (
        (folder / METRICS).is_file()
        and all((folder / likelihood.FOLDER / f"{t}.jsonl").is_file() for t in tracks.track_hashes)
        and (xstest is None or (folder / overrefusal.FILE).is_file())
    )
    if previous and previous.manifest.get("config_hash") == config_hash and stored:
        return json.loads((folder / METRICS).read_text())

    judgements: dict[str, list[dict]] = {}
    scores: dict[str, dict[str, Any]] = {}
    for task in profile.tasks:
        rows = tracks.generations[task]
        cached = previous.judgements(task, tracks.gen_hashes[task], judge_hashes[task]) if previous else None
        reused = cached is not None
        with Stopwatch() as sw:
            if cached is None:
                cached = judge_dimension(task, judges, inputs[task].keys, [r["answer"] for r in rows])
        judgements[task] = cached
        scores[task] = scores_from_judgements(task, cached)
        seconds = _earlier(previous, task, "judge_s") if reused else round(sw.seconds, 2)
        tracks.times[task].update(judge_s=seconds, reused_judgements=reused)

    metrics = {
        "model": name,
        "profile": profile.name,
        "scores": scores,
        "likelihood": likelihood.summary(tracks.track_rows),
        "judges": {t: judge_identity(judge_for(judges, t)) for t in profile.tasks},
        "mc_prompt": mc_prompt(profile.evaluation.mc_prompt).describe(),
        "n_items": {t: len(tracks.generations[t]) for t in profile.tasks},
        **({} if xstest is None else {overrefusal.PHASE: overrefusal.metrics(xstest)}),
        "config_hash": config_hash,
        "model_identity": identity,
    }
    _write(profile, folder, metrics, tracks, judgements, judge_hashes, t0)
    return metrics


def _write(
    profile: Profile,
    folder: Path,
    metrics: dict[str, Any],
    tracks: _Tracks,
    judgements: dict[str, list[dict]],
    judge_hashes: dict[str, str],
    t0: float,
) -> None:
    times, xstest = tracks.times, tracks.xstest
    with atomic_dir(folder) as tmp:
        for task, rows in tracks.generations.items():
            write_jsonl(tmp / "generations" / f"{task}.jsonl", rows)
            write_jsonl(
                tmp / "judgements" / f"{task}.jsonl",
                [
                    {"id": r.get("id", i), "item_id": r.get("item_id"), **j}
                    for i, (r, j) in enumerate(zip(rows, judgements[task], strict=True))
                ],
            )
        for task, rows in tracks.track_rows.items():
            write_jsonl(tmp / likelihood.FOLDER / f"{task}.jsonl", rows)
        if xstest is not None:
            write_jsonl(tmp / overrefusal.FILE, xstest.rows)
            times = {**times, overrefusal.PHASE: xstest.times}
        atomic_write_json(tmp / METRICS, metrics)
        atomic_write_json(
            tmp / MANIFEST,
            make_manifest(
                profile,
                metrics["config_hash"],
                time.perf_counter() - t0,
                model=metrics["model"],
                model_identity=metrics["model_identity"],
                generation_hashes=tracks.gen_hashes,
                judge_hashes=judge_hashes,
                **{LIKELIHOOD_HASHES: tracks.track_hashes},
                **({} if xstest is None else {overrefusal.HASHES: xstest.hashes}),
                **{PHASE_TIMES: times},
            ),
        )
