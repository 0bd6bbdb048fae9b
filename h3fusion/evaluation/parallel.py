"""Evaluate several models in worker processes of one thread each (`evaluation.workers`).

Why: on a 2-core machine, torch's two threads in one process use the cores far less well than two one-thread
processes doing independent work (`h3fusion bench`, threads vs processes, measures it), and evaluating one model
is independent of evaluating another. Each worker evaluates whole models with `evaluate_model`, so results are
the same as in one process; every artifact is written atomically, so workers can share the runs folder.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from h3fusion.config import Profile
from h3fusion.environment import temporary_env


def _start_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _evaluate(profile: Profile, name: str) -> dict[str, Any]:
    from h3fusion.evaluation.run import evaluate_model

    return evaluate_model(profile, name)


def evaluate_models(
    profile: Profile, names: Sequence[str], *, judges: Any = None, workers: int | None = None
) -> dict[str, dict[str, Any]]:
    """{name: metrics} of `evaluate_model` for every NAME, in `workers` one-thread processes (default: the
    profile's `evaluation.workers`); with one worker, or one model, in this process with `judges`."""
    from h3fusion.evaluation.run import evaluate_model

    workers = profile.evaluation.workers if workers is None else workers
    if workers <= 1 or len(names) <= 1:
        return {n: evaluate_model(profile, n, judges=judges) for n in names}
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    with (
        temporary_env({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),  # torch reads them at import
        ProcessPoolExecutor(min(workers, len(names)), mp_context=context, initializer=_start_worker) as pool,
    ):
        futures = {n: pool.submit(_evaluate, profile, n) for n in names}
        return {n: f.result() for n, f in futures.items()}
