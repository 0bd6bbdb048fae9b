"""The book as a reader gets it: notebooks executed with the smoke profile, a strict build, HTML checks.

The checks themselves are tested on small hand-made inputs first, so a check that can no longer
fail is caught; then the real book is built and checked (h3fusion.bookcheck).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest

from h3fusion import bookcheck, notebook_checks
from h3fusion.cli import main
from h3fusion.config import ConfigError, load_profile
from h3fusion.notebooks import (
    NotebookError,
    run_notebooks,
    select_notebooks,
    source_notebooks,
    wall_times_path,
)

# ---------------------------------------------------------------- source notebooks


def test_source_notebooks_follow_the_conventions() -> None:
    assert bookcheck.check_sources() == []


def _notebook(cells: list, path: Path) -> Path:
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_source_check_flags_each_convention(tmp_path: Path) -> None:
    params = nbformat.v4.new_code_cell("x = 1")  # not tagged, no `profile =`
    header = nbformat.v4.new_markdown_cell("# 09. Elsewhere\n[Open in Colab](https://example.org)")
    setup = nbformat.v4.new_code_cell("import sys")
    plot = nbformat.v4.new_code_cell("import matplotlib\nmatplotlib.use('Agg')")
    plot.outputs = [nbformat.v4.new_output("stream", text="hi")]
    problems = notebook_checks.check_source_notebook(
        _notebook([params, header, setup, plot], tmp_path / "09_x.ipynb")
    )
    text = "\n".join(problems)
    for expected in (
        "tagged `parameters`",
        "Colab line",
        "google.colab",
        "stored with outputs",
        "matplotlib.use",
    ):
        assert expected in text


def test_twin_check_detects_an_ipynb_out_of_sync(tmp_path: Path) -> None:
    src = notebook_checks.NOTEBOOKS_DIR / "00_data_and_judges"
    (tmp_path / "00_data_and_judges.py").write_text(src.with_suffix(".py").read_text())
    nb = nbformat.read(src.with_suffix(".ipynb"), as_version=4)
    nbformat.write(nb, tmp_path / "00_data_and_judges.ipynb")
    assert notebook_checks.check_twin(tmp_path / "00_data_and_judges.ipynb") == []
    nb.cells[-1].source += "\nprint('edited in Jupyter only')"
    nbformat.write(nb, tmp_path / "00_data_and_judges.ipynb")
    assert notebook_checks.check_twin(tmp_path / "00_data_and_judges.ipynb")


# ---------------------------------------------------------------- run_notebooks


def test_select_notebooks_by_number_or_name(tmp_path: Path) -> None:
    nbs = [tmp_path / n for n in ("00_a.ipynb", "01_b.ipynb", "02_c.ipynb")]
    assert select_notebooks(nbs, None) == nbs
    assert select_notebooks(nbs, ["2", "00"]) == [nbs[0], nbs[2]]
    assert select_notebooks(nbs, ["01_b"]) == [nbs[1]]
    with pytest.raises(NotebookError, match="available: 00_a, 01_b, 02_c"):
        select_notebooks(nbs, ["7"])


@pytest.mark.slow
def test_failing_notebook_names_the_cell_and_stops(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    params = nbformat.v4.new_code_cell('profile = "cpu"', metadata={"tags": ["parameters"]})
    _notebook([params, nbformat.v4.new_code_cell("assert profile == 'smoke'")], src / "00_ok.ipynb")
    _notebook([params, nbformat.v4.new_code_cell("1 / 0")], src / "01_broken.ipynb")
    _notebook([params], src / "02_never.ipynb")
    out.mkdir()
    committed = b'{"the committed copy": true}'
    (out / "01_broken.ipynb").write_bytes(committed)
    with pytest.raises(NotebookError) as err:
        run_notebooks("smoke", output_dir=out, source_dir=src)
    message = str(err.value)
    assert "01_broken.ipynb failed at cell 2" in message and "ZeroDivisionError" in message
    assert "the book's copy is unchanged" in message and "_failed/01_broken.ipynb" in message
    assert (out / "01_broken.ipynb").read_bytes() == committed  # the failed run replaced nothing
    failed = nbformat.read(out / "_failed" / "01_broken.ipynb", as_version=4)
    assert any(o.get("ename") == "ZeroDivisionError" for c in failed.cells for o in c.get("outputs", []))
    assert (out / "00_ok.ipynb").exists() and not (out / "02_never.ipynb").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "00_ok.ipynb",
        "01_broken.ipynb",
        "_failed",
        "_wall_times_smoke.json",
    ]
    times = json.loads(wall_times_path(out, "smoke").read_text())
    assert list(times["notebooks"]) == ["00_ok"] and times["profile"] == "smoke"


def test_run_notebooks_passes_set_overrides_to_every_notebook(tmp_path: Path, monkeypatch) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    params = nbformat.v4.new_code_cell('profile = "cpu"\noverrides = {}', metadata={"tags": ["parameters"]})
    _notebook(
        [params, nbformat.v4.new_code_cell("assert overrides == {'fusion.top_k': 1}, overrides")],
        src / "00_a.ipynb",
    )
    run_notebooks("smoke", output_dir=out, source_dir=src, overrides={"fusion.top_k": 1})
    assert (out / "00_a.ipynb").exists()
    seen = {}
    monkeypatch.setattr(
        "h3fusion.notebooks.run_notebooks", lambda profile, **kw: seen.update(kw, profile=profile)
    )
    assert main(["run-notebooks", "-p", "smoke", "--set", "fusion.top_k=1", "--only", "00"]) == 0
    assert seen["overrides"] == {"fusion.top_k": 1} and seen["profile"] == "smoke"
    with pytest.raises(ConfigError, match="top_k"):
        run_notebooks("smoke", output_dir=out, source_dir=src, overrides={"fusion.top_k": "two"})


def test_every_source_notebook_is_in_the_toc() -> None:
    listed = set(bookcheck.toc_files(bookcheck.BOOK_DIR))
    assert [nb.stem for nb in source_notebooks() if nb.stem not in listed] == []


# ---------------------------------------------------------------- HTML checks on a hand-made build


def _fake_book(tmp_path: Path, body: str) -> Path:
    book = tmp_path / "book"
    html = book / "_build" / "html"
    (html / "_static" / "mathjax").mkdir(parents=True)
    (html / bookcheck.MATHJAX_FILE).write_text("// mathjax")
    (html / "fig.png").write_bytes(b"png")
    (book / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nchapters:\n  - file: method\n  - file: 00_x\n"
    )
    head = '<script defer src="_static/mathjax/tex-mml-chtml.js"></script>'
    (html / "intro.html").write_text(f"<html><head>{head}</head><body><p>hi</p></body></html>")
    (html / "method.html").write_text(f"<html><head>{head}</head><body><p>\\(x\\)</p>{body}</body></html>")
    return book


def test_html_check_passes_a_clean_book(tmp_path: Path) -> None:
    body = '<img src="fig.png"><a href="https://colab.research.google.com/x">Open in Colab</a>'
    book = _fake_book(tmp_path, body)
    (book / "_build" / "html" / "00_x.html").write_text("<html><body></body></html>")
    pages, problems = bookcheck.check_html(book)
    assert pages == ["intro", "method", "00_x"]
    assert problems == []


def test_html_check_flags_what_a_reader_would_hit(tmp_path: Path) -> None:
    body = (
        '<script src="https://cdn.example.org/x.js"></script><link rel="stylesheet" href="//fonts.example.org/a.css">'
        '<img src="missing.png"><div class="output traceback">Traceback</div>'
    )
    book = _fake_book(tmp_path, body)
    (book / "_build" / "html" / "_static" / "theme.css").write_text(
        "@import 'https://fonts.example.org/f.css';"
    )
    _, problems = bookcheck.check_html(book)
    text = "\n".join(problems)
    for expected in (
        "page 00_x",
        "cdn.example.org",
        "fonts.example.org/a.css",
        "missing.png",
        "error output",
        "theme.css imports",
    ):
        assert expected in text


def test_page_requests_keeps_the_page_requests_only(tmp_path: Path) -> None:
    log = {
        "constants": {"logEventTypes": {"URL_REQUEST_START_JOB": 7}},
        "events": [
            {"type": 7, "params": {"url": "https://update.example.com/u", "initiator": "not an origin"}},
            {"type": 7, "params": {"url": "https://cdn.example.org/a.js", "initiator": "null"}},
            {"type": 7, "params": {"url": "file:///book/_static/a.js", "initiator": "null"}},
            {"type": 3, "params": {"url": "https://other.example.org/"}},
        ],
    }
    (tmp_path / "net.json").write_text(json.dumps(log))
    assert bookcheck.page_requests(tmp_path / "net.json") == ["https://cdn.example.org/a.js"]


# ---------------------------------------------------------------- the real book


@pytest.mark.slow
def test_book_builds_from_smoke_notebooks_and_passes_the_reader_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not (bookcheck.BOOK_DIR / "_mathjax" / "mathjax" / "tex-mml-chtml.js").exists():
        pytest.fail(
            "the local MathJax is missing: run `make setup` (it copies MathJax 3 into book/_mathjax/)"
        )
    monkeypatch.setenv("H3FUSION_RUNS_DIR", str(tmp_path / "runs"))  # the kernels inherit it
    report = bookcheck.check_book("smoke", workdir=tmp_path)
    assert report.problems == []
    assert len(report.pages) >= 1 + len(source_notebooks())
    if bookcheck.chromium_path() or os.environ.get("CI"):
        assert report.screenshot is not None and report.screenshot.stat().st_size > 10_000
    else:
        assert "skipped" in report.screenshot_note


def test_random_model_chapters_carry_a_warning_once(tmp_path):
    import shutil

    import nbformat

    from h3fusion.notebooks import NOTEBOOKS_DIR, add_profile_banner

    path = tmp_path / "06_results.ipynb"
    shutil.copy(NOTEBOOKS_DIR / "06_results.ipynb", path)
    add_profile_banner(path, load_profile("cpu"))  # a real model: no banner
    assert not any("not results" in c.source for c in nbformat.read(path, 4).cells)
    add_profile_banner(path, load_profile("smoke"))
    add_profile_banner(path, load_profile("smoke"))
    cells = nbformat.read(path, 4).cells
    banners = [i for i, c in enumerate(cells) if "not results" in c.source]
    assert len(banners) == 1 and cells[banners[0] - 1].source.startswith("# 6.")


def test_executed_output_check_flags_machine_paths_and_progress_output(tmp_path: Path) -> None:
    def executed(name: str, text: str, html: str = "", meta: str = "notebooks/x.ipynb") -> None:
        cell = nbformat.v4.new_code_cell("x")
        cell.outputs = [nbformat.v4.new_output("stream", text=text)]
        if html:
            cell.outputs.append(nbformat.v4.new_output("display_data", data={"text/html": html}))
        nb = _notebook([cell], tmp_path / name)
        book_nb = nbformat.read(nb, as_version=4)
        book_nb.metadata["papermill"] = {"input_path": meta, "output_path": name}
        nbformat.write(book_nb, nb)

    executed("00_clean.ipynb", "loaded runs/cpu/experts/helpful and data/offline\n")
    executed("01_path.ipynb", "saved /tmp/fresh/main/runs/cpu/fusion/raw\n")
    executed("02_bar.ipynb", " 40%|####      | 4/10 [00:02<00:03, 2.0it/s]\n")
    executed("03_table.ipynb", "", html="<progress value='30' max='30'></progress><th>Training Loss</th>")
    executed("04_meta.ipynb", "ok\n", meta="/home/someone/h3fusion/notebooks/04_meta.ipynb")
    problems = notebook_checks.executed_output_problems(tmp_path)
    assert not [p for p in problems if p.startswith("00_clean")]
    assert any(p.startswith("01_path.ipynb: cell 0 shows a machine path (/tmp/fresh") for p in problems)
    assert any(p.startswith("02_bar.ipynb: cell 0 shows progress output") for p in problems)
    assert any(p.startswith("03_table.ipynb: cell 0 shows progress output") for p in problems)
    assert any(p.startswith("04_meta.ipynb: the notebook metadata names machine paths") for p in problems)


def test_committed_book_shows_no_machine_paths_or_progress_output() -> None:
    assert notebook_checks.executed_output_problems(bookcheck.BOOK_DIR) == []


def test_executed_output_check_accepts_an_allowed_runs_folder(tmp_path: Path) -> None:
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("stream", text="saved /tmp/check-runs/smoke/fusion/raw\n")]
    _notebook([cell], tmp_path / "00_x.ipynb")
    assert notebook_checks.executed_output_problems(tmp_path, allowed=("/tmp/check-runs",)) == []
    assert notebook_checks.executed_output_problems(tmp_path, allowed=("/tmp/other",))


needs_chromium = pytest.mark.skipif(
    bookcheck.chromium_path() is None and not os.environ.get("CI"), reason="chromium not installed (CI has it)"
)


@needs_chromium
def test_width_rule_flags_output_that_runs_off_the_page_and_passes_wrapped_output(tmp_path: Path) -> None:
    """A long unbroken output line and a wide table: without the book's CSS the page scrolls sideways; with the
    rules of book/_static/h3fusion.css the text wraps and only the table scrolls, inside its own box (allowed on
    a phone, flagged on a desktop)."""
    from h3fusion.pagewidth import width_problems

    css = (bookcheck.BOOK_DIR / "_static" / "h3fusion.css").read_text()
    long_line = "x" * 3000
    table = "<table><tr>" + "".join(f"<td>column{i:03d}_value</td>" for i in range(120)) + "</tr></table>"
    body = f'<article class="bd-article"><div class="cell_output"><pre>{long_line}</pre>{table}</div></article>'
    (tmp_path / "bare.html").write_text(f"<html><body>{body}</body></html>")
    (tmp_path / "styled.html").write_text(f"<html><head><style>{css}</style></head><body>{body}</body></html>")
    browser, flags = bookcheck.chromium_path(), bookcheck.CHROMIUM_FLAGS
    bare = width_problems(tmp_path, ["bare"], browser, flags)
    assert any("scrolls sideways at 1280 px" in p for p in bare)
    assert any("scrolls sideways at 390 px" in p for p in bare)
    styled = width_problems(tmp_path, ["styled"], browser, flags)
    assert not any("scrolls sideways" in p or "<pre>" in p for p in styled)  # the text wraps at both widths
    assert [p for p in styled if "<table>" in p and "1280 px" in p]  # a table wider than the page: flagged
    assert not [p for p in styled if "390 px" in p]  # on a phone a table may scroll inside its box
    assert not list(tmp_path.glob(".h3f-width-*"))  # the probe copies are removed


@pytest.mark.slow
@needs_chromium
def test_committed_book_passes_the_reader_checks_and_the_width_rule(tmp_path: Path) -> None:
    report = bookcheck.check_committed_book(workdir=tmp_path)
    assert report.problems == []
