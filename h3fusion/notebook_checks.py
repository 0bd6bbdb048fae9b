"""Checks of the notebooks themselves, before and after execution (used by `h3fusion.bookcheck` and the tests).

Source notebooks (`check_sources`): no outputs, a `parameters` cell first, an "Open in Colab" line naming the
notebook's own file, a Colab-only setup cell, no ``matplotlib.use`` and an ``.ipynb`` in sync with its jupytext
``.py`` source. Executed notebooks: no error output (`notebook_errors`), and nothing a reader should not see
(`executed_output_problems`: one machine's folders, progress bars, the Trainer's step tables)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from h3fusion import repository
from h3fusion.notebooks import NOTEBOOKS_DIR, source_notebooks


def _cell_text(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def check_source_notebook(path: Path) -> list[str]:
    """Problems of one source notebook (empty list when it follows the conventions)."""
    nb = json.loads(Path(path).read_text())
    cells = nb.get("cells", [])
    name = Path(path).name
    problems = []
    if len(cells) < 3:
        return [
            f"{name}: expected a parameters cell, a header cell and a setup cell, found {len(cells)} cells"
        ]
    first, header = cells[0], cells[1]
    if first["cell_type"] != "code" or "parameters" not in first.get("metadata", {}).get("tags", []):
        problems.append(f"{name}: the first cell must be a code cell tagged `parameters`")
    elif not re.search(r"^profile\s*=", _cell_text(first), re.M):
        problems.append(f"{name}: the parameters cell must set `profile = ...`")
    url = repository.repository_url()
    colab = repository.colab_header(name, url)
    if header["cell_type"] != "markdown" or colab not in _cell_text(header):
        problems.append(f"{name}: the second cell must be markdown with the Colab line {colab}")
    setup = [
        c for c in cells[2:4] if c["cell_type"] == "code" and '"google.colab" in sys.modules' in _cell_text(c)
    ]
    if not setup:
        problems.append(
            f'{name}: a setup cell with `if "google.colab" in sys.modules:` must follow the header'
        )
    elif repository.url_assignment(url) not in _cell_text(setup[0]):
        problems.append(
            f"{name}: the Colab setup cell must clone the repository of book/_config.yml "
            f"(`{repository.url_assignment(url)}`); run `h3fusion set-repository URL`"
        )
    for i, c in enumerate(cells):
        if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None):
            problems.append(f"{name}: cell {i} is stored with outputs; regenerate it with `make notebooks`")
        if c["cell_type"] == "code" and "matplotlib.use(" in _cell_text(c):
            problems.append(f"{name}: cell {i} calls matplotlib.use(), which suppresses inline figures")
    return problems


def check_twin(ipynb: Path) -> list[str]:
    """The .ipynb must hold the same cells as its jupytext .py source (edit the .py, run `make notebooks`)."""
    import jupytext

    py = ipynb.with_suffix(".py")
    if not py.exists():
        return [f"{ipynb.name}: its jupytext source {py.name} is missing"]
    want = [
        (c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", []))) for c in jupytext.read(py).cells
    ]
    have = [
        (c.cell_type, c.source.strip(), sorted(c.metadata.get("tags", [])))
        for c in jupytext.read(ipynb).cells
    ]
    if want != have:
        return [f"{ipynb.name} differs from {py.name}: run `make notebooks` after editing the .py"]
    return []


def check_sources(folder: Path = NOTEBOOKS_DIR) -> list[str]:
    problems = []
    for nb in source_notebooks(folder):
        problems += check_source_notebook(nb) + check_twin(nb)
    return problems


def notebook_errors(folder: Path) -> list[str]:
    """Error outputs stored in executed notebooks (a cell that raised but was allowed to)."""
    problems = []
    for nb in sorted(Path(folder).glob("*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text()).get("cells", [])):
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error":
                    problems.append(f"{nb.name}: cell {i} has an error output ({out.get('ename')})")
    return problems


MACHINE_PATH = re.compile(
    r"(?<![\w.~-])/(?:tmp|work|home|root|Users|mnt|private|var/folders|content)/[^\s'\"<>)]*"
)
PROGRESS_OUTPUT = re.compile(r"\d+%\||\d+/\d+ \[\d+:\d+|it/s\]|s/it\]|<progress|Training Loss")


def executed_output_problems(folder: Path, allowed: tuple[str, ...] = ()) -> list[str]:
    """What an executed notebook must not show a reader: one machine's folders (in outputs or in the
    papermill metadata) and progress bars or the Trainer's step tables (the chapters plot the curves).

    `allowed`: path prefixes that are expected (a check's own temporary runs folder)."""

    def machine_paths(text: str) -> list[str]:
        return (
            [h for h in MACHINE_PATH.findall(text) if not h.startswith(allowed)]
            if allowed
            else MACHINE_PATH.findall(text)
        )

    problems = []
    for nb in sorted(Path(folder).glob("*.ipynb")):
        data = json.loads(nb.read_text())
        if hits := machine_paths(json.dumps(data.get("metadata", {}))):
            problems.append(f"{nb.name}: the notebook metadata names machine paths ({hits[0]})")
        for i, cell in enumerate(data.get("cells", [])):
            text = json.dumps(cell.get("outputs", []))
            if hits := machine_paths(text):
                problems.append(f"{nb.name}: cell {i} shows a machine path ({hits[0]})")
            if hit := PROGRESS_OUTPUT.search(text):
                problems.append(f"{nb.name}: cell {i} shows progress output ({hit.group(0)!r})")
    return problems
