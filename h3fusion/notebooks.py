"""Batch execution of the book's notebooks with papermill (`h3fusion run-notebooks`).

The source notebooks (``notebooks/NN_name.ipynb``, no outputs) take one papermill parameter,
``profile``, and load the profile themselves, so a notebook run by hand, on Colab or in batch
sees the same configuration. Executed copies go to ``book/`` (or ``output_dir``), where Jupyter
Book renders them with execution off. A notebook executes into a temporary file that replaces the
committed copy only when every cell succeeded: a failed run leaves the book as it was and keeps the
partly executed notebook in ``<output>/_failed/`` for its traceback. Every notebook runs with the project root as its working
directory, whatever the output folder, so relative paths mean the same thing everywhere.
The wall time of each notebook is recorded in ``<output>/_wall_times_<profile>.json`` for the
reproducibility page.

Editing: each notebook's source of truth is its jupytext twin ``notebooks/NN_name.py``
(percent format, readable diffs); ``make notebooks`` regenerates the ``.ipynb`` files and
``h3fusion.bookcheck.check_sources`` fails when the two disagree.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import time
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from h3fusion.artifacts import MANIFEST, atomic_write_text, git_commit
from h3fusion.config import PROJECT_ROOT, Profile, load_profile, shown_path
from h3fusion.environment import temporary_env
from h3fusion.errors import H3FusionError

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
BOOK_DIR = PROJECT_ROOT / "book"
KERNEL = "python3"
_NOTEBOOK_NAME = re.compile(r"^(\d\d)_[A-Za-z0-9_]+\.ipynb$")


class NotebookError(H3FusionError):
    """A notebook that could not be found or that failed while executing."""


def source_notebooks(folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The book's notebooks in execution order: `NN_name.ipynb`, sorted by NN."""
    found = sorted(p for p in Path(folder).glob("*.ipynb") if _NOTEBOOK_NAME.match(p.name))
    if not found:
        raise NotebookError(
            f"no notebooks named NN_name.ipynb in {folder}; run `make notebooks` to generate them"
        )
    return found


def select_notebooks(notebooks: list[Path], only: Iterable[str] | None) -> list[Path]:
    """Keep the notebooks whose number (`02`, `2`) or stem (`02_fusion`) is in `only`."""
    if not only:
        return notebooks
    wanted = [str(o).strip() for o in only]
    chosen, unknown = [], []
    for w in wanted:
        hits = [p for p in notebooks if w in (p.stem, p.stem[:2], p.stem[:2].lstrip("0") or "0")]
        if hits:
            chosen.extend(hits)
        else:
            unknown.append(w)
    if unknown:
        names = ", ".join(p.stem for p in notebooks)
        raise NotebookError(f"no notebook matches --only {unknown}; available: {names}")
    return [p for p in notebooks if p in chosen]


def wall_times_path(output_dir: Path, profile: str) -> Path:
    return Path(output_dir) / f"_wall_times_{Path(profile).stem}.json"


FROM_SCRATCH = "from_scratch"
"""Key of the wall-times file that keeps the last batch that started from an empty runs folder (the book's
budget): later, resumed batches replace the per-notebook times but never this record."""


def _record_wall_time(output_dir: Path, profile: str, notebook: str, seconds: float, batch: dict[str, Any]) -> None:
    """Merge one notebook's wall time into the JSON the reproducibility page reads, with the batch it ran in
    (`batch`: its start, commit and whether the runs folder was empty at its start; dropping the file's
    hand-written "note", which described the times it replaces)."""
    path = wall_times_path(output_dir, profile)
    with _folder_lock(path.parent):  # two batches side by side (`--only 03` and `--only 04`) keep both entries
        _merge_wall_time(path, profile, notebook, seconds, batch)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder itself (no lock file left in the book), released when the holder exits
    or is killed."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _merge_wall_time(path: Path, profile: str, notebook: str, seconds: float, batch: dict[str, Any]) -> None:
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
    data.pop("note", None)
    data.update(
        profile=Path(profile).stem,
        machine={
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
        },
    )
    entry = {"wall_s": round(seconds, 1), "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "batch": batch["started"], "commit": batch["commit"]}
    data.setdefault("notebooks", {})[notebook] = entry
    data["notebooks"] = dict(sorted(data["notebooks"].items()))
    data["total_wall_s"] = round(sum(v["wall_s"] for v in data["notebooks"].values()), 1)
    if batch["from_scratch"]:
        record = data.get(FROM_SCRATCH, {})
        if record.get("started") != batch["started"]:
            record = {"started": batch["started"], "commit": batch["commit"], "notebooks": {}}
        record["notebooks"][notebook] = round(seconds, 1)
        record["total_wall_s"] = round(sum(record["notebooks"].values()), 1)
        data[FROM_SCRATCH] = record
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


FAILED_DIR = "_failed"
"""Subfolder of the output folder that keeps a failed notebook's partial execution (git-ignored)."""


def _failure_message(nb: Path, kept: Path, err: Any) -> str:
    source = (err.source or "").strip().splitlines()
    first = source[0] if source else ""
    return (
        f"notebook {nb.name} failed at cell {err.cell_index} (In [{err.exec_count}], starting `{first}`): "
        f"{err.ename}: {err.evalue}\nthe book's copy is unchanged; the partly executed notebook, with the "
        f"traceback, is {shown_path(kept)}; fix the cause and re-run with --only {nb.stem[:2]}"
    )


OUTPUT_ENV = "H3FUSION_BOOK_OUTPUT"
"""Tells an executing notebook where its executed siblings and their wall times are written."""


def batch_output_dir() -> Path:
    """The folder the running batch writes executed notebooks to (the book when run by hand)."""
    return Path(os.environ.get(OUTPUT_ENV) or BOOK_DIR)


QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
"""tqdm bars off in the kernel (it inherits this environment; unless the user set them): in an executed notebook
they are hundreds of carriage-return lines, not progress. Papermill's own per-cell bar still shows progress."""


def execute_notebook(
    nb: Path, out: Path, profile: str, overrides: dict[str, Any] | None = None, cwd: Path = PROJECT_ROOT
) -> float:
    """Execute one notebook with papermill into `out`, atomically; returns its wall time in seconds.

    The notebook runs into a temporary sibling of `out`, which replaces `out` only on success; on a
    failure it moves to ``<out folder>/_failed/`` and `out` keeps its previous content.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}.ipynb")  # papermill wants the suffix
    start = time.perf_counter()
    try:
        with temporary_env(QUIET_ENV, keep_set=True), temporary_env({OUTPUT_ENV: str(out.parent.resolve())}):
            papermill.execute_notebook(
                str(nb),
                str(tmp),
                parameters={"profile": profile, "overrides": dict(overrides or {})},
                kernel_name=KERNEL,
                cwd=str(cwd),
                progress_bar=True,
            )
    except PapermillExecutionError as err:
        kept = out.parent / FAILED_DIR / out.name
        kept.parent.mkdir(exist_ok=True)
        os.replace(tmp, kept)
        raise NotebookError(_failure_message(nb, kept, err)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finish_executed(tmp, nb, out, load_profile(profile, overrides))
    os.replace(tmp, out)
    return time.perf_counter() - start


PLUMBING_BANNER = (
    "```{{warning}}\nThis page was executed with the `{name}` profile: a tiny **random** model on a few "
    "examples. Its numbers only show that the code runs end to end; they are not results. "
    "`make book` (the `cpu` profile, SmolLM2-135M) replaces it with real numbers.\n```"
)


def add_profile_banner(path: Path, p: Profile) -> None:
    """Put a warning under the title of a chapter executed with a random-weights profile (smoke), so a
    reader never mistakes plumbing numbers for results."""
    import nbformat

    if p.model.base != "tiny-random":
        return
    nb = nbformat.read(path, as_version=4)
    text = PLUMBING_BANNER.format(name=p.name)
    if any(c.cell_type == "markdown" and c.source == text for c in nb.cells):
        return
    titles = [
        i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.lstrip().startswith("# ")
    ]
    nb.cells.insert(titles[0] + 1 if titles else 0, nbformat.v4.new_markdown_cell(text))
    nbformat.write(nb, path)


def finish_executed(path: Path, source: Path, out: Path, p: Profile) -> None:
    """What an executed notebook needs before the book shows it: parameters hidden, the random-model
    banner, and papermill's record of its paths without this machine's folders."""
    import nbformat

    hide_parameter_cells(path)
    add_profile_banner(path, p)
    nb = nbformat.read(path, as_version=4)
    record = nb.metadata.get("papermill", {})
    record.update(input_path=shown_path(source), output_path=out.name)
    nbformat.write(nb, path)


def hide_parameter_cells(path: Path) -> None:
    """Tag the parameters cells `remove-cell`: the book opens with the chapter's title, not with
    defaults that papermill overrode (the setup cell prints the profile that was used)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if {"parameters", "injected-parameters"} & set(tags) and "remove-cell" not in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
    nbformat.write(nb, path)


def run_notebooks(
    profile: str,
    only: Iterable[str] | None = None,
    output_dir: str | os.PathLike[str] | None = None,
    source_dir: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Execute the notebooks in order with `profile` (and `overrides`, the `--set` keys); stop at the first
    failure, naming the cell.

    Returns the wall time in seconds per notebook stem; they are also merged into
    ``<output_dir>/_wall_times_<profile>.json``.
    """
    run_dir = load_profile(profile, overrides).run_dir  # fail fast on a bad profile or key, before any kernel
    batch = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "from_scratch": not any(run_dir.rglob(MANIFEST)),  # nothing built yet: this batch measures the budget
    }
    out_dir = Path(output_dir) if output_dir else BOOK_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    notebooks = select_notebooks(source_notebooks(Path(source_dir) if source_dir else NOTEBOOKS_DIR), only)
    times: dict[str, float] = {}
    for i, nb in enumerate(notebooks, 1):
        print(f"[{i}/{len(notebooks)}] {nb.stem} (profile {profile}) -> {out_dir / nb.name}", flush=True)
        seconds = execute_notebook(nb, out_dir / nb.name, profile, overrides)
        times[nb.stem] = seconds
        _record_wall_time(out_dir, profile, nb.stem, seconds, batch)
        print(f"[{i}/{len(notebooks)}] {nb.stem} done in {seconds:.1f} s", flush=True)
    print(f"{len(notebooks)} notebook(s) executed in {sum(times.values()):.1f} s into {out_dir}")
    return times
