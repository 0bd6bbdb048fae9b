"""Where evaluation writes (``runs/<profile>/eval/<name>/``) and the JSON-lines files it writes there."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from h3fusion.config import Profile

METRICS = "metrics.json"


def write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for row in rows:
            fh.write(json.dumps(row, default=json_default) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def eval_dir(profile: Profile, name: str) -> Path:
    return profile.run_dir / "eval" / name


def metrics_path(profile: Profile, name: str) -> Path:
    """Where `evaluate_model` stores model NAME's metrics."""
    return eval_dir(profile, name) / METRICS
