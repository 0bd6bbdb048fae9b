"""Raw records from a local folder (offline) or the Hugging Face hub, validated field by field.

Every source has a path in the local layout (the layout of the shared data folder, see data/README.md)
and a hub id, so an error can always say where the file was expected and where to get it. Records are
checked once when read: a malformed record raises `DataError` naming the file, the record index and the
field, instead of a `KeyError` deep inside training.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from h3fusion.config import Profile, shown_path
from h3fusion.data import offline
from h3fusion.errors import DataError

log = logging.getLogger(__name__)

Record = dict[str, Any]

LOCAL_HELP = (
    "to work offline, use a local folder laid out like data/README.md: set `data.source: local` and "
    "`data.dir` in the profile (or --set data.dir=FOLDER, or the environment variable $H3FUSION_DATA_DIR)"
)


@dataclass(frozen=True)
class Source:
    """Where one split lives locally and on the hub, and which fields each of its records must have."""

    local_path: str
    hub_id: str
    hub_config: str | None
    hub_split: str
    fields: tuple[tuple[str, type | tuple[type, ...]], ...]
    hub_file: str | None = None
    """A JSON file in the hub repository, read when the repository is a loading script (unsupported by datasets>=4)."""
    check: Callable[[Record, int, str], None] | None = None
    """A check of one record's values beyond the field types (record, index, origin); raises `DataError`."""

    @property
    def hub_name(self) -> str:
        config = f", config {self.hub_config!r}" if self.hub_config else ""
        return f"hub dataset {self.hub_id!r}{config}, split {self.hub_split!r}"


_BEAVER_FIELDS = (("prompt", str), ("response", str), ("is_safe", bool), ("category", dict))
_TQA_MC_FIELDS = (("question", str), ("mc1_targets", dict), ("mc2_targets", dict))


def check_mc_targets(record: Record, index: int, origin: str) -> None:
    """MC targets map answer -> label 0/1 with one true MC1 answer and both kinds in MC2: scoring needs them so,
    and a label such as "yes" would otherwise fail deep inside the evaluation."""
    where = f"malformed record {index} in {origin} (question {record['question']!r})"
    for key in ("mc1_targets", "mc2_targets"):
        for answer, label in record[key].items():
            if type(label) is not int or label not in (0, 1):
                raise DataError(
                    f"{where}: field {key!r} gives the answer {answer!r} the label {label!r}; MC labels must be the "
                    "integers 0 or 1 (1 = a true answer)"
                )
    labels1, labels2 = list(record["mc1_targets"].values()), list(record["mc2_targets"].values())
    if sum(labels1) != 1:
        raise DataError(
            f"{where}: field 'mc1_targets' has {sum(labels1)} answers labelled 1; MC1 needs exactly one"
        )
    if 1 not in labels2 or 0 not in labels2:
        raise DataError(f"{where}: field 'mc2_targets' needs both true (1) and false (0) answers")


SOURCES: dict[str, Source] = {
    "alpaca": Source(
        "alpaca/alpaca_random_9k.json",
        "tatsu-lab/alpaca",
        None,
        "train",
        (("instruction", str), ("input", str), ("output", str)),
    ),
    "alpaca_eval": Source(
        "alpaca_eval/alpaca_eval_text_davinci_003.json",
        "tatsu-lab/alpaca_eval",
        "alpaca_eval",
        "eval",
        (("instruction", str), ("output", str)),
        hub_file="alpaca_eval.json",
    ),
    "beavertails_train": Source(
        "beavertails/beavertails_30k_train.jsonl",
        "PKU-Alignment/BeaverTails",
        None,
        "30k_train",
        _BEAVER_FIELDS,
    ),
    "beavertails_test": Source(
        "beavertails/beavertails_30k_test.jsonl",
        "PKU-Alignment/BeaverTails",
        None,
        "30k_test",
        _BEAVER_FIELDS,
    ),
    "truthfulqa_generation": Source(
        "truthfulqa/truthful_qa_generation_v0.jsonl",
        "truthfulqa/truthful_qa",
        "generation",
        "validation",
        (("question", str), ("best_answer", str), ("correct_answers", list), ("incorrect_answers", list)),
    ),
    "truthfulqa_mc": Source(
        "truthfulqa/v0/mc_task.json",
        "truthfulqa/truthful_qa",
        "multiple_choice",
        "validation",
        _TQA_MC_FIELDS,
        check=check_mc_targets,
    ),
}

ANNOTATIONS_DIR = "alpaca_eval/gpt4_annotations"
ANNOTATIONS_ORIGIN = (
    "GitHub tatsu-lab/alpaca_eval, results/<model>/alpaca_eval_gpt4/annotations.json (one file per model)"
)
ANNOTATION_FIELDS = (("instruction", str), ("output_1", str), ("output_2", str))


def local_file(profile: Profile, name: str) -> Path | None:
    """The split's file in the data folder, plain or xz-compressed (the shipped copies); None if absent."""
    return offline.find(profile.data_dir, SOURCES[name].local_path)


def available(profile: Profile, name: str) -> bool:
    """Whether a split can be read: always on the hub, only if its file exists locally."""
    return profile.data.source == "hub" or local_file(profile, name) is not None


def load_records(profile: Profile, name: str) -> list[Record]:
    """All records of one source split, validated; from `profile.data_dir` or the hub per `data.source`."""
    source = SOURCES[name]
    if profile.data.source == "hub":
        records = list(_from_hub(source))
        origin = source.hub_name
    else:
        path = local_file(profile, name)
        if path is None:
            raise DataError(
                f"missing data file {shown_path(profile.data_dir / source.local_path)} (expected for {name}, "
                f"plain or {offline.COMPRESSED}); get it from the {source.hub_name} (set `data.source: hub`, needs "
                f"internet), restore the shipped copies (`git checkout -- data/offline`) or point `data.dir` / "
                f"$H3FUSION_DATA_DIR at a folder laid out like data/README.md"
            )
        records = list(_read_file(path.resolve(), path.stat().st_mtime_ns))
        origin = shown_path(path)
    validate(records, source.fields, origin, source.check)
    return records


def validate(
    records: list[Any],
    fields: tuple[tuple[str, type | tuple[type, ...]], ...],
    origin: str,
    check: Callable[[Record, int, str], None] | None = None,
) -> None:
    """Raise `DataError` for the first record that is not a mapping, lacks/mistypes a required field or fails
    `check`."""
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(
                f"malformed record {index} in {origin}: expected a JSON object, got {type(record).__name__}"
            )
        for field, kind in fields:
            if field not in record:
                raise DataError(f"malformed record {index} in {origin}: missing field {field!r}")
            if not isinstance(record[field], kind):
                raise DataError(
                    f"malformed record {index} in {origin}: field {field!r} should be {_kind_name(kind)}, "
                    f"got {type(record[field]).__name__}"
                )
        if check is not None:
            check(record, index, origin)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


@lru_cache(maxsize=32)
def _read_file(path: Path, mtime_ns: int) -> tuple[Record, ...]:
    """Parse a JSON list or JSON-lines file (plain or xz) once per (path, modification time)."""
    del mtime_ns  # part of the cache key only
    text = offline.read_bytes(path).decode("utf-8")
    if path.name.removesuffix(offline.COMPRESSED).endswith(".jsonl"):
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}, line {lineno}: not valid JSON ({exc.msg}); each line must be one record"
                ) from None
        return tuple(records)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return tuple(data)


@lru_cache(maxsize=8)
def _from_hub(source: Source) -> tuple[Record, ...]:
    """Download one split with `datasets.load_dataset`; an unreachable hub says how to work offline."""
    import datasets

    try:
        ds = _hub_split(datasets, source)
    except Exception as exc:  # network, auth, missing config: all mean "cannot use the hub for this"
        raise DataError(
            f"could not load the {source.hub_name} from the Hugging Face hub: {type(exc).__name__}: {exc}. "
            f"If you are offline or the hub is unreachable, {LOCAL_HELP}"
        ) from None
    records = [dict(r) for r in ds]
    if source.hub_config == "multiple_choice":
        records = [_mc_from_hub(r) for r in records]
    return tuple(records)


def _hub_split(datasets: Any, source: Source) -> Any:
    try:
        return datasets.load_dataset(source.hub_id, source.hub_config, split=source.hub_split)
    except ConnectionError:
        raise
    except Exception:
        if source.hub_file is None:
            raise
        # script-based repositories (tatsu-lab/alpaca_eval) cannot be loaded by name with datasets>=4
        files = f"hf://datasets/{source.hub_id}/{source.hub_file}"
        return datasets.load_dataset("json", data_files=files, split="train")


def _mc_from_hub(record: Record) -> Record:
    """HF multiple_choice stores {choices: [...], labels: [...]}; the local mc_task.json maps answer -> label."""
    out = dict(record)
    for key in ("mc1_targets", "mc2_targets"):
        targets = record.get(key)
        if isinstance(targets, dict) and "choices" in targets and "labels" in targets:
            out[key] = dict(zip(targets["choices"], (int(x) for x in targets["labels"]), strict=True))
    return out


def load_annotation_files(profile: Profile) -> dict[str, list[Record]]:
    """AlpacaEval GPT-4 pairwise verdicts, one list per evaluated model (file stem), validated."""
    folder = profile.data_dir / ANNOTATIONS_DIR
    files = sorted([*folder.glob("*.json"), *folder.glob(f"*.json{offline.COMPRESSED}")]) if folder.is_dir() else []
    if not files:
        raise DataError(
            f"no AlpacaEval GPT-4 annotation files (*.json or *.json.xz) in {shown_path(folder)}; they are not a "
            f"Hugging Face hub dataset. They ship in data/offline/ (restore with `git checkout -- data/offline`); "
            f"`h3fusion data --download` fetches them again from {ANNOTATIONS_ORIGIN}; or point `data.dir` / "
            f"$H3FUSION_DATA_DIR at a folder laid out like data/README.md"
        )
    out = {}
    for path in files:
        records = list(_read_file(path.resolve(), path.stat().st_mtime_ns))
        validate(records, ANNOTATION_FIELDS, str(path))
        for index, record in enumerate(records):
            if "preference" not in record:
                raise DataError(f"malformed record {index} in {path}: missing field 'preference'")
        out[path.name.split(".")[0]] = records
    return out
