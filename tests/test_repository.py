"""The published repository URL lives in book/_config.yml only; until it is set no link points at a name
anyone could register, and `set-repository` rewrites every Colab link and setup cell from it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from h3fusion import notebook_checks, repository
from h3fusion.cli import main
from h3fusion.config import PROJECT_ROOT
from h3fusion.errors import H3FusionError


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """A copy of the files `set_repository` rewrites."""
    shutil.copytree(PROJECT_ROOT / "notebooks", tmp_path / "notebooks")
    (tmp_path / "book").mkdir()
    for f in [PROJECT_ROOT / repository.CONFIG, *(PROJECT_ROOT / "book").glob("[0-9][0-9]_*.ipynb")]:
        shutil.copy(f, tmp_path / "book" / f.name)
    return tmp_path


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_no_committed_file_points_at_an_unpublished_repository_name():
    hits = subprocess.run(
        ["git", "grep", "-l", "-e", "h3fusion/h3fusion-companion", "--", ".", ":!tests/test_repository.py"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    ).stdout.split()
    assert hits == []
    assert repository.repository_url() is None


def test_set_repository_links_every_chapter_and_unset_restores_the_files(tree):
    before = _files(tree)
    repository.set_repository("https://github.com/someone/h3fusion-companion.git", root=tree)
    assert repository.repository_url(tree) == "https://github.com/someone/h3fusion-companion"
    for nb_path in [*(tree / "notebooks").glob("0*.ipynb"), *(tree / "book").glob("0*.ipynb")]:
        cells = nbformat.read(nb_path, as_version=4).cells
        link = f"https://colab.research.google.com/github/someone/h3fusion-companion/blob/main/notebooks/{nb_path.name}"
        assert link in next(c.source for c in cells if c.cell_type == "markdown"), nb_path
        setup = next(c.source for c in cells if '"google.colab" in sys.modules' in c.source)
        assert "url = 'https://github.com/someone/h3fusion-companion'" in setup
    py = (tree / "notebooks" / "02_fusion.py").read_text()
    assert (
        "# [Open in Colab](https://colab.research.google.com/github/someone/h3fusion-companion/blob/main/notebooks/02_fusion.ipynb)"
        in py
    )
    config = (tree / "book" / "_config.yml").read_text()
    assert (
        "use_repository_button: true" in config and 'colab_url: "https://colab.research.google.com"' in config
    )
    repository.set_repository(None, root=tree)
    assert _files(tree) == before


def test_the_committed_notebooks_follow_the_configured_url():
    for nb in sorted((PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        assert notebook_checks.check_source_notebook(nb) == []


@pytest.mark.parametrize("url", ["http://github.com/a/b", "https://gitlab.com/a/b", "github.com/a", "x"])
def test_set_repository_refuses_what_is_not_a_github_repository(tree, url, capsys):
    before = _files(tree)
    with pytest.raises(H3FusionError, match="https://github.com/OWNER/NAME"):
        repository.set_repository(url, root=tree)
    assert _files(tree) == before
    assert main(["set-repository", url]) == 2
    assert "OWNER/NAME" in capsys.readouterr().err
