"""Check the book as a reader would get it (used by tests/test_book.py and CI).

`check_book()` executes every notebook with the smoke profile into a temporary copy of the book,
builds it with ``jupyter-book build -W -n --keep-going`` (warnings are errors) and checks the
built HTML: every page of the table of contents exists, every image it shows exists, no cell
has an error output, math is typeset by the locally served MathJax, and no page asks an outside
host for anything (a link the reader clicks is fine). Finally it takes a headless Chromium
screenshot of the results page (or the last chapter present).

`check_sources()` checks the source notebooks themselves (`h3fusion.notebook_checks`).

Run it by hand with ``python -m h3fusion.bookcheck [--profile smoke] [--keep DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlparse

from h3fusion.errors import H3FusionError
from h3fusion.notebook_checks import (
    check_sources,
    executed_output_problems,
    notebook_errors,
)
from h3fusion.notebooks import BOOK_DIR, run_notebooks

MATHJAX_FILE = "_static/mathjax/tex-mml-chtml.js"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--virtual-time-budget=5000",
    "--window-size=1280,1700",
)
# Tags whose URL attribute the browser fetches by itself when it renders the page.
_FETCHED = {
    "script": "src",
    "img": "src",
    "iframe": "src",
    "source": "src",
    "video": "src",
    "audio": "src",
    "embed": "src",
    "link": "href",
}
_LINK_RELS_NOT_FETCHED = {"canonical", "alternate", "author", "license", "help", "search", "next", "prev"}


class BookCheckError(H3FusionError):
    """The book does not build or a built page fails a reader's check."""


@dataclass
class BookReport:
    """What the check found; `problems` empty means the book passed."""

    build_dir: Path
    pages: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    screenshot_note: str = ""


# ---------------------------------------------------------------- source notebooks


# ---------------------------------------------------------------- built HTML


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.fetched: list[tuple[str, str]] = []  # (tag, url) the browser loads by itself
        self.images: list[str] = []
        self.scripts: list[str] = []
        self.tracebacks = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        attr = _FETCHED.get(tag)
        if attr and a.get(attr):
            rels = set(a.get("rel", "").lower().split())
            if not (tag == "link" and rels and rels <= _LINK_RELS_NOT_FETCHED):
                self.fetched.append((tag, a[attr]))
        if tag == "img" and a.get("src"):
            self.images.append(a["src"])
        if tag == "script" and a.get("src"):
            self.scripts.append(a["src"])
        if "traceback" in a.get("class", "").split() or "output_error" in a.get("class", "").split():
            self.tracebacks += 1


def _is_outside(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in {"http", "https", "ftp", "ws", "wss"} or url.startswith("//")


def toc_files(book_dir: Path) -> list[str]:
    """Every page named by _toc.yml (root first), without suffix."""
    import yaml

    toc = yaml.safe_load((Path(book_dir) / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                files.append(str(node["file"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk({k: v for k, v in toc.items() if k != "root"})
    return [re.sub(r"\.(md|ipynb)$", "", f) for f in files]


def _css_outside_urls(html_dir: Path) -> list[str]:
    found = []
    for css in html_dir.rglob("*.css"):
        for url in re.findall(r"url\(\s*['\"]?([^'\")]+)", css.read_text(errors="ignore")):
            if _is_outside(url):
                found.append(f"{css.relative_to(html_dir)} loads {url}")
        for url in re.findall(r"@import\s+['\"]([^'\"]+)", css.read_text(errors="ignore")):
            if _is_outside(url):
                found.append(f"{css.relative_to(html_dir)} imports {url}")
    return found


def check_html(book_dir: Path, math_pages: tuple[str, ...] = ("method",)) -> tuple[list[str], list[str]]:
    """Check a built book; returns (pages checked, problems)."""
    html_dir = Path(book_dir) / "_build" / "html"
    pages, problems = toc_files(book_dir), []
    mathjax = html_dir / MATHJAX_FILE
    if not mathjax.exists():
        problems.append(f"the local MathJax {MATHJAX_FILE} is missing from the build (run `make setup`)")
    for page in pages:
        path = html_dir / f"{page}.html"
        if not path.exists():
            problems.append(f"page {page} of the table of contents was not built ({path} missing)")
            continue
        parser = _PageParser()
        parser.feed(path.read_text(errors="ignore"))
        for tag, url in parser.fetched:
            if _is_outside(url):
                problems.append(f"{page}.html: <{tag}> loads {url} from an outside host")
        for src in parser.images:
            if src.startswith("data:") or _is_outside(src):
                continue
            if not (path.parent / urlparse(src).path).exists():
                problems.append(f"{page}.html: image {src} does not exist")
        if parser.tracebacks:
            problems.append(f"{page}.html shows {parser.tracebacks} error output(s)")
        mj = [s for s in parser.scripts if "mathjax" in s.lower() or "tex-mml" in s]
        if page in math_pages:
            local = [s for s in mj if (path.parent / urlparse(s).path).resolve() == mathjax.resolve()]
            if not local:
                problems.append(f"{page}.html does not load the local MathJax ({MATHJAX_FILE}); found {mj}")
            if "\\(" not in path.read_text() and "\\[" not in path.read_text():
                problems.append(f"{page}.html has no math for MathJax to typeset")
    problems += _css_outside_urls(html_dir)
    return pages, problems


# ---------------------------------------------------------------- build, screenshot, the whole check


def jupyter_book_cmd() -> str:
    beside = Path(sys.executable).with_name("jupyter-book")
    found = str(beside) if beside.exists() else shutil.which("jupyter-book")
    if not found:
        raise BookCheckError("jupyter-book is not installed; run `make setup` (extra `book`)")
    return found


def build_book(book_dir: Path, strict: bool = True) -> None:
    """`jupyter-book build`; with `strict`, warnings are errors (-W -n --keep-going)."""
    cmd = [jupyter_book_cmd(), "build", str(book_dir)]
    if strict:
        cmd += ["-W", "-n", "--keep-going"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).strip().splitlines()[-40:])
        raise BookCheckError(f"`{' '.join(cmd)}` failed (exit {res.returncode}):\n{tail}")


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


def page_requests(net_log: Path) -> list[str]:
    """http(s) URLs the page itself asked for, from a Chromium NetLog (the browser's own traffic excluded)."""
    log = json.loads(Path(net_log).read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = []
    for event in log.get("events", []):
        params = event.get("params", {})
        if event.get("type") != start or params.get("initiator") == "not an origin":
            continue  # "not an origin": the browser's own requests (updates, accounts), not the page's
        if _is_outside(params.get("url", "")) and params["url"] not in urls:
            urls.append(params["url"])
    return urls


def screenshot(page: Path, out_png: Path, browser: str | None = None) -> list[str]:
    """Headless Chromium screenshot of a local page, every outside host unreachable.

    Returns the outside URLs the page tried to load (they fail, but they would show a reader's
    browser contacting a third party), read from Chromium's network log.
    """
    browser = browser or chromium_path()
    if not browser:
        raise BookCheckError("chromium is not installed (apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="h3f-chromium-") as tmp:
        net_log = Path(tmp) / "net-log.json"
        cmd = [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={tmp}/profile",
            f"--log-net-log={net_log}",
            f"--screenshot={Path(out_png).resolve()}",
            Path(page).resolve().as_uri(),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if res.returncode != 0 or not Path(out_png).exists() or Path(out_png).stat().st_size < 1000:
            raise BookCheckError(
                f"chromium screenshot of {page} failed (exit {res.returncode}): {res.stderr[-2000:]}"
            )
        return page_requests(net_log) if net_log.exists() else []


def _is_blank(png: Path) -> bool:
    from PIL import Image

    with Image.open(png) as img:
        lo, hi = img.convert("L").getextrema()
    return hi - lo < 10


def _copy_book_sources(dst: Path) -> None:
    """The book's own files (pages, config, local MathJax), without built output or executed notebooks."""
    shutil.copytree(
        BOOK_DIR,
        dst,
        ignore=shutil.ignore_patterns("_build", "*.ipynb", "_wall_times_*.json", ".ipynb_checkpoints"),
    )


def check_book(profile: str = "smoke", workdir: Path | None = None, shot: bool = True) -> BookReport:
    """Execute the notebooks with `profile` into a copy of the book, build it strictly and check it."""
    owned = workdir is None
    root = Path(tempfile.mkdtemp(prefix="h3f-book-")) if owned else Path(workdir)
    book = root / "book"
    if book.exists():
        shutil.rmtree(book)
    _copy_book_sources(book)
    run_notebooks(profile, output_dir=book)
    report = BookReport(build_dir=book / "_build" / "html")
    from h3fusion.config import load_profile

    runs_root = str(
        load_profile(profile).run_dir.parent
    )  # a check's own runs folder may sit outside the project
    report.problems += notebook_errors(book) + executed_output_problems(book, allowed=(runs_root,))
    listed = set(toc_files(book))
    report.problems += [
        f"{nb.stem} is executed but not in book/_toc.yml"
        for nb in book.glob("*.ipynb")
        if nb.stem not in listed
    ]
    build_book(book)
    report.pages, problems = check_html(book)
    report.problems += problems
    if shot:
        _take_screenshot(book, report)
        report.problems += _width_problems(report)
    return report


def _width_problems(report: BookReport) -> list[str]:
    """The page-width rule (`h3fusion.pagewidth`) on the intro and every chapter, where Chromium is installed."""
    from h3fusion.pagewidth import width_problems

    browser = chromium_path()
    if browser is None:
        return (
            ["CI requires the page-width check but chromium is not installed"] if os.environ.get("CI") else []
        )
    pages = [p for p in report.pages if p == "intro" or re.match(r"^\d\d_", p)]
    return width_problems(report.build_dir, pages, browser, CHROMIUM_FLAGS)


def check_committed_book(workdir: Path | None = None) -> BookReport:
    """The committed executed book (no notebook runs): built strictly, machine paths and progress output, and
    the page-width rule in Chromium."""
    root = Path(tempfile.mkdtemp(prefix="h3f-book-")) if workdir is None else Path(workdir)
    book = root / "book"
    if book.exists():
        shutil.rmtree(book)
    shutil.copytree(BOOK_DIR, book, ignore=shutil.ignore_patterns("_build", "_failed", ".ipynb_checkpoints"))
    report = BookReport(build_dir=book / "_build" / "html")
    report.problems += notebook_errors(book) + executed_output_problems(book)
    build_book(book)
    report.pages, problems = check_html(book)
    report.problems += problems + _width_problems(report)
    return report


def _take_screenshot(book: Path, report: BookReport) -> None:
    chapters = [p for p in report.pages if re.match(r"^\d\d_", p)]
    target = next(
        (p for p in chapters if p.endswith("_results")), chapters[-1] if chapters else report.pages[0]
    )
    if chromium_path() is None:
        report.screenshot_note = "chromium not installed: screenshot skipped (CI installs it and requires it)"
        if os.environ.get("CI"):
            report.problems.append("CI requires the screenshot but chromium is not installed")
        return
    png = book / f"screenshot_{target}.png"
    outside = screenshot(report.build_dir / f"{target}.html", png)
    report.problems += [
        f"{target}.html asked an outside host for {url} when opened in Chromium" for url in outside
    ]
    report.screenshot, report.screenshot_note = png, f"screenshot of {target}.html: {png}"
    if _is_blank(png):
        report.problems.append(f"the screenshot of {target}.html is blank")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m h3fusion.bookcheck", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--profile", default="smoke")
    parser.add_argument(
        "--keep", type=Path, help="work in this folder and keep it (default: a temporary one)"
    )
    parser.add_argument("--no-screenshot", action="store_true")
    parser.add_argument(
        "--committed", action="store_true", help="check the committed executed book instead of a smoke run"
    )
    args = parser.parse_args(argv)
    try:
        problems = check_sources()
        if args.committed:
            report = check_committed_book(workdir=args.keep)
        else:
            report = check_book(args.profile, workdir=args.keep, shot=not args.no_screenshot)
    except H3FusionError as err:
        print(f"book check: error: {err}", file=sys.stderr)
        return 1
    problems += report.problems
    print(f"built {len(report.pages)} page(s) into {report.build_dir}; {report.screenshot_note}")
    for p in problems:
        print(f"PROBLEM: {p}", file=sys.stderr)
    print("book check passed" if not problems else f"book check failed: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
