"""What the results chapter hands its readers beyond the tables: real answers side by side, the main table as
CSV and every per-item judgement as JSONL (downloadable from the book), all read from the stored evaluations.

Why: a reader deciding whether to trust a verdict wants to see what the models actually said, and to
recompute the numbers with their own statistics; both need the per-item records, not only the summaries.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from h3fusion.artifacts import atomic_write_text
from h3fusion.config import Profile
from h3fusion.data import split_prompt
from h3fusion.evaluation.store import eval_dir, read_jsonl


def _request(row: Mapping[str, Any]) -> str:
    """The request as the model was asked it (the instruction and input inside the Alpaca prompt)."""
    return split_prompt(str(row.get("prompt", "")))


def _rows(profile: Profile, name: str, task: str, kind: str) -> list[dict[str, Any]]:
    path = eval_dir(profile, name) / kind / f"{task}.jsonl"
    return read_jsonl(path) if path.is_file() else []


def judgement_rows(profile: Profile, models: Mapping[str, str]) -> Iterator[dict[str, Any]]:
    """One record per model, dimension and item: the request, the model's answer and the judge's output; then
    the model's XSTest answers with the refusal classifier's verdict (dimension ``xstest``), when it has them."""
    from h3fusion.evaluation import overrefusal

    for label, name in models.items():
        for task in profile.tasks:
            judged = {str(r["id"]): r for r in _rows(profile, name, task, "judgements")}
            for gen in _rows(profile, name, task, "generations"):
                verdict = {k: v for k, v in judged.get(str(gen["id"]), {}).items() if k not in ("id", "item_id")}
                yield {
                    "model": label,
                    "dimension": task,
                    "item_id": gen.get("item_id"),
                    "request": _request(gen),
                    "answer": gen.get("answer", ""),
                    **verdict,
                }
        xstest = eval_dir(profile, name) / overrefusal.FILE
        for row in read_jsonl(xstest) if xstest.is_file() else []:
            yield {
                "model": label,
                "dimension": overrefusal.PHASE,
                "item_id": row["id"],
                "request": row["prompt"],
                "answer": row["answer"],
                "prompt_type": row["type"],
                "prompt_label": row["label"],
                "refused": row["refused"],
            }


def sample_outputs(
    profile: Profile, models: Mapping[str, str], per_dimension: int = 1, seed: int | None = None
) -> pd.DataFrame:
    """Real answers of MODELS ({label: name}) to `per_dimension` evaluation requests of each dimension, drawn
    with a seeded generator (not the first items), one column per model."""
    rng = random.Random(profile.seed if seed is None else seed)
    records: list[dict[str, Any]] = []
    for task in profile.tasks:
        answers = {label: _rows(profile, name, task, "generations") for label, name in models.items()}
        first = next((rows for rows in answers.values() if rows), [])
        for i in sorted(rng.sample(range(len(first)), min(per_dimension, len(first)))):
            record = {"dimension": task, "request": _request(first[i])}
            for label, rows in answers.items():
                record[label] = rows[i]["answer"] if i < len(rows) else "(not evaluated)"
            records.append(record)
    return pd.DataFrame.from_records(records)


def write_downloads(
    profile: Profile, models: Mapping[str, str], main_table: pd.DataFrame, folder: Path
) -> dict[str, Path]:
    """`main_table.csv` (the cells as shown, value and 95 % interval) and `judgements.jsonl` (every per-item
    record of `judgement_rows`) in FOLDER, written atomically; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"main_table": folder / "main_table.csv", "judgements": folder / "judgements.jsonl"}
    atomic_write_text(paths["main_table"], main_table.to_csv())
    lines = (json.dumps(r, ensure_ascii=False, default=str) for r in judgement_rows(profile, models))
    atomic_write_text(paths["judgements"], "".join(f"{line}\n" for line in lines))
    return paths
