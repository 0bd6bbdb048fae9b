"""The companion's published repository URL, kept in one place: ``book/_config.yml`` (``repository.url``).

The Colab links at the top of every chapter, the Colab setup cells that clone the companion and the
book's repository and launch buttons all derive from it. Until it is set, the chapters say that the
link is not available instead of pointing at a repository name that anyone could register (and whose
code every Colab reader would install). ``h3fusion set-repository https://github.com/OWNER/NAME``
writes the URL there and rewrites the links and setup cells of the source notebooks, their ``.py``
twins and the executed copies in ``book/``.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from h3fusion.config import PROJECT_ROOT
from h3fusion.errors import H3FusionError

CONFIG = Path("book") / "_config.yml"
_URL = re.compile(r"^https://github\.com/[A-Za-z0-9][A-Za-z0-9-]*/[A-Za-z0-9._-]+$")
_HEADER = re.compile(
    r"^(?P<prefix>(# )?)(\[Open in Colab\]\(https://colab\.research\.google\.com/.*\)|\*Open in Colab: .*\*)$"
)
_URL_LINE = re.compile(r"^(?P<prefix>(# )?\s+)url = .*$")
_CONFIG_URL = re.compile(r"^(  url:).*$", re.M)
_CONFIG_BUTTON = re.compile(r"^(  use_repository_button:).*$", re.M)
_CONFIG_COLAB = re.compile(r"^(  colab_url:).*$", re.M)
UNSET_NOTE = "not published yet: `h3fusion set-repository https://github.com/OWNER/NAME` sets it"


def repository_url(root: Path = PROJECT_ROOT) -> str | None:
    """The published repository (``https://github.com/OWNER/NAME``), or None while it is not set."""
    config = yaml.safe_load((root / CONFIG).read_text()) or {}
    return (config.get("repository") or {}).get("url") or None


def colab_header(notebook: str, url: str | None) -> str:
    """The chapter's Colab line: a link once the repository is published, a plain note before."""
    if url is None:
        return (
            "*Open in Colab: not available yet, this copy of the companion names no published repository "
            '(README, "Repository URL").*'
        )
    return f"[Open in Colab](https://colab.research.google.com/github/{url.removeprefix('https://github.com/')}/blob/main/notebooks/{notebook})"


def url_assignment(url: str | None) -> str:
    """The right-hand side of the Colab setup cell's ``url = ...`` (the cell refuses to run on None)."""
    return f"url = {url!r}" if url else f"url = None  # {UNSET_NOTE}"


def rewrite_lines(text: str, notebook: str, url: str | None) -> str:
    """`text` (a notebook cell, or a jupytext ``.py`` file) with its Colab line and setup URL set to `url`."""
    out = []
    for line in text.split("\n"):
        if m := _HEADER.match(line):
            line = m["prefix"] + colab_header(notebook, url)
        elif m := _URL_LINE.match(line):
            line = m["prefix"] + url_assignment(url)
        out.append(line)
    return "\n".join(out)


def set_repository(url: str | None, root: Path = PROJECT_ROOT) -> list[Path]:
    """Publish `url` as the companion's repository everywhere it appears (None: back to "not published");
    returns the files rewritten."""
    import nbformat

    if url is not None:
        url = url.rstrip("/").removesuffix(".git")
        if not _URL.match(url):
            raise H3FusionError(
                f"{url!r} is not a GitHub repository URL; give it as https://github.com/OWNER/NAME"
            )
    config = root / CONFIG
    shown = url or '""'
    text = _CONFIG_URL.sub(rf"\1 {shown}", config.read_text(), count=1)
    text = _CONFIG_BUTTON.sub(rf"\1 {'true' if url else 'false'}", text, count=1)
    colab = '"https://colab.research.google.com"' if url else '""'
    text = _CONFIG_COLAB.sub(rf"\1 {colab}", text, count=1)
    config.write_text(text)
    written = [config]
    for py in sorted((root / "notebooks").glob("*.py")):
        name = "NN_name.ipynb" if py.stem == "_template" else f"{py.stem}.ipynb"
        py.write_text(rewrite_lines(py.read_text(), name, url))
        written.append(py)
    for ipynb in sorted(
        [*(root / "notebooks").glob("[0-9][0-9]_*.ipynb"), *(root / "book").glob("[0-9][0-9]_*.ipynb")]
    ):
        nb = nbformat.read(ipynb, as_version=4)
        for cell in nb.cells:
            cell.source = rewrite_lines(cell.source, ipynb.name, url)
        nbformat.write(nb, ipynb)
        written.append(ipynb)
    return written
