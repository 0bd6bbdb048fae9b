"""Artifacts on disk: atomic writes, manifests, and the "skip when complete and unchanged" rule.

An artifact folder is complete only when its ``manifest.json`` exists, and the manifest is the
last thing written, inside a temporary folder that is renamed into place. A killed stage thus
leaves either nothing, a stale ``*.tmp-<host>-<pid>`` folder (removed by the next write once its process is gone),
or a complete artifact. Concurrent writers of one artifact never touch each other's temporary folders; the
final swap is serialised by a lock file, and the last writer wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from h3fusion.config import PROJECT_ROOT, Profile, shown_path
from h3fusion.errors import ArtifactError

MANIFEST = "manifest.json"
PROCESS_KEYS = ("config", "versions", "git_commit", "hardware", "wall_time_s", "finished_at", "resumed_from")
"""Manifest fields that say how, where and when an artifact was made, not what it holds: out of its identity
(`config` holds paths such as `runs_dir`; what of it the artifact depends on is in `config_hash`)."""
_VERSIONED = ("h3fusion", "torch", "transformers", "peft", "accelerate", "numpy", "scikit-learn")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def git_commit() -> str | None:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def is_complete(folder: Path, config_hash: str) -> bool:
    """True when `folder` holds a fully written artifact made with the same config."""
    manifest = read_manifest(folder)
    return manifest is not None and manifest.get("config_hash") == config_hash


def digest(obj: Any) -> str:
    """A short, stable hash of JSON-like content (keys sorted; other values by their `str`): the cache keys of
    artifacts, evaluations and ablations."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def artifact_identity(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest without its `PROCESS_KEYS`: equal for two from-scratch builds of the same artifact,
    different when its config or content (loss log, steps...) differ."""
    return digest({k: v for k, v in manifest.items() if k not in PROCESS_KEYS})


def check_weight_files(folder: Path, rebuild: str) -> None:
    """Refuse a finished artifact whose ``.safetensors`` files are truncated or corrupt, before anything loads them.

    Loaders fail deep inside safetensors with an error that names no file, and the artifact's manifest still says
    complete, so the message names the file and says to delete the folder and rebuild it (`rebuild`: the command).
    Only each file's header is read."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*.safetensors")):
        problem = _safetensors_problem(path)
        if problem:
            raise ArtifactError(
                f"{shown_path(path)} is {problem}: delete the folder {shown_path(folder)} and {rebuild}"
            )


def _safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (8-byte header size, JSON header, data it describes), or None."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        header_size = int.from_bytes(head, "little") if len(head) == 8 else None
        if header_size is None or header_size > size - 8:
            return f"truncated ({size} bytes, shorter than its header)"
        try:
            header = json.loads(fh.read(header_size))
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "corrupt (its header is not a safetensors header)"
    expected = 8 + header_size + max(ends, default=0)
    if size != expected:
        return f"truncated or corrupt ({size} bytes where its header describes {expected})"
    return None


def make_manifest(profile: Profile, config_hash: str, wall_time_s: float, **extra: Any) -> dict[str, Any]:
    return {
        "profile": profile.name,
        "config_hash": config_hash,
        "seed": profile.seed,
        "config": profile.model_dump(mode="json"),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "hardware": hardware(),
        "wall_time_s": round(wall_time_s, 2),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def _writer_tag() -> str:
    """``<host>-<pid>``: names this process's temporary folders (the host: run folders may be shared)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale(final: Path) -> None:
    """Remove temporary siblings of `final` that killed writers on this host left: those of a dead pid, or of
    this process's pid (reused after a kill). A live process's folder, or another host's, is kept."""
    host = socket.gethostname()
    for kind in ("tmp", "old"):
        for folder in final.parent.glob(f"{final.name}.{kind}-{host}-*"):
            pid = folder.name.rpartition("-")[2]
            if pid.isdigit() and (int(pid) == os.getpid() or not _is_alive(int(pid))):
                shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _locked(final: Path) -> Iterator[None]:
    """An exclusive lock on ``.<name>.swap.lock`` next to `final` (not ``.<name>.lock``: callers such as
    `models.cached_folder` hold that one around the whole write), released when the holder exits or is killed."""
    with (final.parent / f".{final.name}.swap.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success replace `final` with it in one rename.

    The caller writes everything, manifest last. On an exception the temporary folder (and any parent
    folder made for it that is still empty) is removed and `final` is left untouched. Another process
    writing the same artifact keeps its own folder.
    """
    final = Path(final)
    created = [p for p in (final.parent, *final.parent.parents) if not p.exists()]
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{_writer_tag()}")
    with _locked(final):
        _remove_stale(final)
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:  # this call made the folder, so its lock file is ours to remove with it
            (final.parent / f".{final.name}.swap.lock").unlink(missing_ok=True)
        for parent in created:  # innermost first; a failed stage leaves no empty folder behind
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    with _locked(final):
        if final.exists():
            old = final.with_name(f"{final.name}.old-{_writer_tag()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)


class Stopwatch:
    """`with Stopwatch() as sw: ...; sw.seconds`."""

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
