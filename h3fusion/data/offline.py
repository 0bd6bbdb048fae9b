"""The offline copies of every data source, shipped in ``data/offline/`` (xz-compressed, checksummed).

A fresh clone needs nothing beside it: the profiles' ``data.source: local`` reads this folder by
default. Each file is stored as ``<path>.xz``; ``SHA256SUMS`` holds the SHA-256 of the
*uncompressed* bytes, so a check means the same thing for a shipped copy and for a plain folder.

`refresh` rebuilds the folder from the files' origins (pinned GitHub commits, the Hugging Face hub)
or from a local folder laid out the same way, and replaces a file only when its checksum is the
recorded one: a changed upstream is reported, never silently shipped. Provenance and licences are
in each subfolder's README (copied with the data).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import lzma
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from h3fusion.artifacts import atomic_write_bytes
from h3fusion.config import PROJECT_ROOT, shown_path
from h3fusion.errors import DataError

OFFLINE_DIR = PROJECT_ROOT / "data" / "offline"
CHECKSUMS = "SHA256SUMS"
COMPRESSED = ".xz"
_GITHUB = "https://raw.githubusercontent.com"
_ALPACA_EVAL = f"{_GITHUB}/tatsu-lab/alpaca_eval/cd543a149df89434d8a54582c0151c0b945c3d20/results"
_TRUTHFULQA = (
    f"{_GITHUB}/newBlanco/Modified_truthX/39e91d49c5b26bdef976da70be6c12829739e83e/TruthfulQA/data/v0"
)
_XSTEST = f"{_GITHUB}/paul-rottger/exaggerated-safety"
_XSTEST_COMMIT = "a3bb396ddc1939c6f264f17b7cf5b7a5d82833de"
_XSTEST_MODELS = ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")
_ANNOTATED_MODELS = (
    "alpaca-7b",
    "falcon-7b-instruct",
    "gpt4",
    "guanaco-65b",
    "llama-2-7b-chat-hf",
    "phi-2",
    "text_davinci_001",
    "vicuna-13b",
)


def _as_is(data: bytes) -> bytes:
    return data


def beavertails_jsonl(data: bytes) -> bytes:
    """BeaverTails rows as one JSON object a line in the hub's field order (the hub ships them gzipped)."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    fields = ("prompt", "response", "category", "is_safe")
    lines = []
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            lines.append(json.dumps({k: row[k] for k in fields}, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode("utf-8")


def truthfulqa_generation_jsonl(data: bytes) -> bytes:
    """TruthfulQA's v0 CSV in the hub's `generation` schema (what the hub's loading script does)."""
    rows = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
    lines = [
        json.dumps(
            {
                "type": r["Type"],
                "category": r["Category"],
                "question": r["Question"],
                "best_answer": r["Best Answer"],
                "correct_answers": [a.strip() for a in r["Correct Answers"].split(";")],
                "incorrect_answers": [a.strip() for a in r["Incorrect Answers"].split(";")],
                "source": r["Source"],
            },
            ensure_ascii=False,
        )
        for r in rows
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


@dataclass(frozen=True)
class OfflineFile:
    """One shipped file: its path in the data layout, where it comes from, and how it is derived."""

    path: str
    url: str
    convert: Callable[[bytes], bytes] = _as_is
    local_origin: str | None = None
    """What `refresh(from_dir=...)` reads instead of `path` (the file `convert` turns into `path`)."""


FILES: tuple[OfflineFile, ...] = (
    OfflineFile(
        "alpaca/alpaca_random_9k.json",
        f"{_GITHUB}/gpt4life/alpagasus/95ad3e52510df8c0a2f0dd6cbe50b501acde83a1/data/random/random_9k.json",
    ),
    OfflineFile(
        "alpaca_eval/alpaca_eval_text_davinci_003.json", f"{_ALPACA_EVAL}/text_davinci_003/model_outputs.json"
    ),
    *(
        OfflineFile(
            f"alpaca_eval/gpt4_annotations/{m}.json", f"{_ALPACA_EVAL}/{m}/alpaca_eval_gpt4/annotations.json"
        )
        for m in _ANNOTATED_MODELS
    ),
    OfflineFile(
        "beavertails/beavertails_30k_test.jsonl",
        "https://huggingface.co/datasets/PKU-Alignment/BeaverTails/resolve/main/round0/30k/test.jsonl.gz",
        beavertails_jsonl,
    ),
    OfflineFile("truthfulqa/v0/mc_task.json", f"{_TRUTHFULQA}/mc_task.json"),
    OfflineFile("truthfulqa/v0/TruthfulQA.csv", f"{_TRUTHFULQA}/TruthfulQA.csv"),
    OfflineFile(
        "truthfulqa/truthful_qa_generation_v0.jsonl",
        f"{_TRUTHFULQA}/TruthfulQA.csv",
        truthfulqa_generation_jsonl,
        local_origin="truthfulqa/v0/TruthfulQA.csv",
    ),
    OfflineFile(
        "xstest/xstest_prompts.csv",
        f"{_XSTEST}/475f10bf0a3d6a9dfb174b6de1a38afbfdff98a5/xstest_prompts.csv",
    ),
    *(
        OfflineFile(
            f"xstest/model_completions/xstest_v2_completions_{m}.csv",
            f"{_XSTEST}/{_XSTEST_COMMIT}/model_completions/xstest_v2_completions_{m}.csv",
        )
        for m in _XSTEST_MODELS
    ),
    *(
        OfflineFile(
            f"xstest/automated_evaluation_labels/xstest_v2_completions_{m}_{kind}.csv",
            f"{_XSTEST}/{_XSTEST_COMMIT}/evaluation/automated_evaluation_labels/xstest_v2_completions_{m}_{kind}.csv",
        )
        for m in _XSTEST_MODELS
        for kind in ("gpteval", "streval")
    ),
)
DOCS = ("README.md", "LICENSE")
"""Provenance files copied beside the data of each folder."""


def find(folder: Path, path: str) -> Path | None:
    """The file `path` of a data folder, plain or xz-compressed; None when it is absent."""
    plain = Path(folder) / path
    if plain.is_file():
        return plain
    packed = plain.with_name(plain.name + COMPRESSED)
    return packed if packed.is_file() else None


def read_bytes(file: Path) -> bytes:
    """The uncompressed content of a plain or ``.xz`` file; a damaged archive names itself."""
    if file.suffix != COMPRESSED:
        return file.read_bytes()
    try:
        return lzma.decompress(file.read_bytes())
    except lzma.LZMAError as exc:
        raise DataError(
            f"{shown_path(file)} is damaged ({exc}); restore it with `git checkout -- {shown_path(file)}` "
            f"or rebuild the folder with `h3fusion data --download`"
        ) from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def recorded_checksums(folder: Path = OFFLINE_DIR) -> dict[str, str]:
    """`SHA256SUMS` as {path: sha256 of the uncompressed bytes}."""
    path = Path(folder) / CHECKSUMS
    if not path.is_file():
        raise DataError(f"no {CHECKSUMS} in {shown_path(folder)}; rebuild it with `h3fusion data --download`")
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            out[name.strip()] = digest
    return out


def verify(folder: Path = OFFLINE_DIR) -> list[str]:
    """Problems of a data folder (missing or changed files); empty when every checksum holds."""
    problems = []
    for name, digest in recorded_checksums(folder).items():
        file = find(folder, name)
        if file is None:
            problems.append(f"{name}: missing")
            continue
        try:
            data = read_bytes(file)
        except DataError:
            problems.append(f"{name}: damaged ({shown_path(file)})")
            continue
        if (actual := sha256(data)) != digest:
            problems.append(f"{name}: checksum {actual[:12]}... differs from the recorded {digest[:12]}...")
    return problems


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except OSError as exc:
        raise DataError(
            f"could not download {url}: {exc}. The shipped copies in data/offline/ need no download; "
            f"`--download` is only for refreshing them with internet access"
        ) from None


def refresh(
    folder: Path = OFFLINE_DIR,
    from_dir: Path | None = None,
    fetch: Callable[[str], bytes] = _download,
    checksums: dict[str, str] | None = None,
) -> list[str]:
    """Rebuild `folder` from the origins (or from `from_dir`, a plain folder laid out the same way).

    Every file is fetched and checked first; only when all match the recorded checksums
    (`checksums`, default: the folder's own ``SHA256SUMS``) are they written, each atomically. A
    mismatch raises `DataError` listing the files and writes nothing. Returns the paths written.
    """
    folder = Path(folder)
    expected = recorded_checksums(folder) if checksums is None else checksums
    contents: dict[str, bytes] = {}
    for spec in FILES:
        if from_dir is None:
            raw = fetch(spec.url)
        else:
            origin = find(from_dir, spec.local_origin or spec.path)
            if origin is None:
                raise DataError(f"{spec.local_origin or spec.path} is not in {shown_path(from_dir)}")
            raw = read_bytes(origin)
        contents[spec.path] = spec.convert(raw)
    changed = [
        f"{path} (sha256 {sha256(data)[:12]}..., recorded {expected.get(path, 'none')[:12]}...)"
        for path, data in contents.items()
        if expected.get(path) != sha256(data)
    ]
    if changed:
        raise DataError(
            "these files differ from the recorded checksums, so nothing was written: "
            + "; ".join(changed)
            + f". Check the origin; if the change is intended, update {CHECKSUMS} and the folder's README"
        )
    for path, data in contents.items():
        atomic_write_bytes(folder / (path + COMPRESSED), lzma.compress(data, preset=9))
    if from_dir is not None:
        _copy_docs(Path(from_dir), folder)
    atomic_write_bytes(
        folder / CHECKSUMS, "".join(f"{sha256(d)}  {p}\n" for p, d in contents.items()).encode()
    )
    return list(contents)


def _copy_docs(src: Path, dest: Path) -> None:
    for sub in sorted({Path(spec.path).parent for spec in FILES}):
        for doc in DOCS:
            if (src / sub / doc).is_file():
                atomic_write_bytes(dest / sub / doc, (src / sub / doc).read_bytes())
