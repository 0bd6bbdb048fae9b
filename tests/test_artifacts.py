"""Atomic artifact folders with other writers around, and artifact identities without process fields."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

from h3fusion.artifacts import MANIFEST, artifact_identity, atomic_dir, atomic_write_json, read_manifest


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_dir_removes_killed_writers_folders_and_keeps_live_ones(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f"model.tmp-{host}-{_dead_pid()}"
    dead_swap = tmp_path / f"model.old-{host}-{_dead_pid()}"
    mine = tmp_path / f"model.tmp-{host}-{os.getpid()}"  # this pid, reused after a kill
    live = tmp_path / f"model.tmp-{host}-{os.getppid()}"  # another writer, still running
    other_host = tmp_path / f"model.tmp-elsewhere.invalid-{_dead_pid()}"  # its pid means nothing here
    for folder in (dead, dead_swap, mine, live, other_host):
        folder.mkdir()
        (folder / "part.bin").write_text("half")

    with atomic_dir(tmp_path / "model") as tmp:
        atomic_write_json(tmp / MANIFEST, {"ok": True})

    assert read_manifest(tmp_path / "model") == {"ok": True}
    assert not dead.exists() and not dead_swap.exists() and not mine.exists()
    assert (live / "part.bin").is_file() and (other_host / "part.bin").is_file()


def _write_artifact(final: str, barrier, value: str) -> None:  # noqa: ANN001
    with atomic_dir(Path(final)) as tmp:
        barrier.wait(timeout=120)  # both writers hold a temporary folder at once
        (tmp / "value.txt").write_text(value)
        atomic_write_json(tmp / MANIFEST, {"writer": value})


def test_two_processes_writing_one_artifact_both_finish(tmp_path):
    """Two commands writing one artifact (e.g. two `evaluate` runs): neither deletes the other's folder."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    final = tmp_path / "eval" / "base"
    procs = [ctx.Process(target=_write_artifact, args=(str(final), barrier, v)) for v in ("a", "b")]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
    assert [proc.exitcode for proc in procs] == [0, 0]
    writer = read_manifest(final)["writer"]
    assert writer in ("a", "b") and (final / "value.txt").read_text() == writer  # one writer's whole folder
    assert not [p.name for p in final.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_artifact_identity_ignores_how_when_and_where_it_was_built():
    built = {
        "config_hash": "abc",
        "loss_log": [{"step": 1, "loss": 2.5}],
        "config": {"runs_dir": "/a"},
        "wall_time_s": 1.0,
        "finished_at": "2026-01-01T00:00:00+0000",
        "hardware": {"cpu_count": 2},
        "git_commit": "1234",
        "resumed_from": None,
    }
    rebuilt = {
        **built,
        "config": {"runs_dir": "/b"},
        "wall_time_s": 9.0,
        "finished_at": "2026-02-02T00:00:00+0000",
        "hardware": {"cpu_count": 16},
        "git_commit": "5678",
        "resumed_from": "checkpoint-2",
    }
    assert artifact_identity(built) == artifact_identity(rebuilt)
    assert artifact_identity(built) != artifact_identity({**built, "loss_log": [{"step": 1, "loss": 2.4}]})
    assert artifact_identity(built) != artifact_identity({**built, "config_hash": "abd"})


def _evaluate(runs_dir: str, barrier) -> None:  # noqa: ANN001
    """One `evaluate --model base` of the smoke profile, started together with another on one runs folder."""
    import torch

    from h3fusion.config import load_profile
    from h3fusion.evaluation.run import evaluate_model
    from tests.test_baselines import fake_judges

    torch.set_num_threads(1)
    profile = load_profile("smoke", {"runs_dir": runs_dir})
    barrier.wait(timeout=120)
    evaluate_model(profile, "base", judges=fake_judges())


def test_two_concurrent_evaluate_runs_on_one_runs_folder_both_finish_with_the_same_metrics(tmp_path):
    """Two evaluations of one model on one runs folder at once: neither crashes or deletes the other's files, and
    the metrics left behind are byte-identical to a run alone."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    shared = tmp_path / "shared"
    procs = [ctx.Process(target=_evaluate, args=(str(shared), barrier)) for _ in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=600)
    assert [proc.exitcode for proc in procs] == [0, 0]
    alone = tmp_path / "alone"
    proc = ctx.Process(target=_evaluate, args=(str(alone), _NoBarrier()))
    proc.start()
    proc.join(timeout=600)
    assert proc.exitcode == 0
    metrics = "smoke/eval/base/metrics.json"
    assert (shared / metrics).read_bytes() == (alone / metrics).read_bytes()
    leftovers = [
        p.name for p in (shared / "smoke" / "eval").iterdir() if ".tmp-" in p.name or ".old-" in p.name
    ]
    assert leftovers == []


class _NoBarrier:
    def wait(self, timeout: float | None = None) -> None:
        return None
