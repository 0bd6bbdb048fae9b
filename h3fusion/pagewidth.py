"""The book's page-width rule, checked in headless Chromium: no page scrolls sideways, at a desktop width (1280
px) nothing in a chapter needs sideways scrolling at all, and at a phone's width (390 px) only tables may scroll
inside their own box.

How: a copy of each built page, in the same folder (so its styles and scripts load), gets a script that measures
the laid-out page after load and writes the result into the DOM, which Chromium's `--dump-dom` prints.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path

WIDTHS = (1280, 390)
"""Desktop and phone widths (CSS px) at which the book is checked."""
ATTEMPTS = 3


class MeasureError(RuntimeError):
    """Chromium did not report a page's layout."""

_PROBE = """
<script>
window.addEventListener("load", function () {
  setTimeout(function () {
    var vw = window.innerWidth, article = document.querySelector("article") || document.body, boxes = [], cut = [];
    function scrolls(el) {
      for (var p = el.parentElement; p && p !== article.parentElement; p = p.parentElement) {
        var o = getComputedStyle(p).overflowX;
        if (o === "auto" || o === "scroll" || o === "hidden") return true;
      }
      return false;
    }
    article.querySelectorAll("*").forEach(function (el) {
      var o = getComputedStyle(el).overflowX, text = (el.textContent || "").trim().slice(0, 60);
      if ((o === "auto" || o === "scroll") && el.scrollWidth > el.clientWidth + 1) {
        boxes.push({tag: el.tagName.toLowerCase(), table: el.tagName === "TABLE" || !!el.querySelector("table"),
                    width: el.scrollWidth, text: text});
      }
      var r = el.getBoundingClientRect();
      if (r.width > 0 && r.right > vw + 1 && !scrolls(el)) cut.push({tag: el.tagName.toLowerCase(), text: text});
    });
    var out = document.createElement("pre");
    out.id = "h3f-width";
    out.textContent = JSON.stringify({page: document.documentElement.scrollWidth, viewport: vw, boxes: boxes,
                                      cut: cut.slice(0, 5)});
    document.body.appendChild(out);
  }, 300);
});
</script>
"""


def measure(page: Path, width: int, browser: str, flags: tuple[str, ...]) -> dict:
    """The page's layout at WIDTH: its scroll width, the viewport, boxes that scroll sideways, content cut off."""
    probe = page.with_name(f".h3f-width-{page.name}")
    html = page.read_text(errors="ignore")
    probe.write_text(html.replace("</body>", _PROBE + "</body>", 1) if "</body>" in html else html + _PROBE)
    window = [f for f in flags if not f.startswith(("--window-size", "--virtual-time-budget"))]
    found, res = None, None
    try:
        for _ in range(ATTEMPTS):  # a page that has not finished loading within the virtual time is tried again
            with tempfile.TemporaryDirectory(prefix="h3f-chromium-") as tmp:
                cmd = [browser, *window, f"--window-size={width},900", "--virtual-time-budget=30000",
                       f"--user-data-dir={tmp}/profile", "--dump-dom", probe.resolve().as_uri()]
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            found = re.search(r'<pre id="h3f-width">(.*?)</pre>', res.stdout, re.S)
            if found is not None:
                break
    finally:
        probe.unlink(missing_ok=True)
    if found is None:
        raise MeasureError(f"chromium gave no width measurement of {page.name} at {width} px "
                           f"({ATTEMPTS} attempts, last exit {res.returncode if res else '-'})")
    text = found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return json.loads(text)


def width_problems(html_dir: Path, pages: list[str], browser: str, flags: tuple[str, ...]) -> list[str]:
    """The page-width rule's violations over PAGES (names without .html) at every width of `WIDTHS`."""
    problems = []
    for name in pages:
        page = Path(html_dir) / f"{name}.html"
        if not page.exists():
            continue
        for width in WIDTHS:
            try:
                m = measure(page, width, browser, flags)
            except MeasureError as err:
                problems.append(str(err))
                continue
            if m["page"] > m["viewport"] + 1:
                problems.append(f"{name}.html scrolls sideways at {width} px (content {m['page']} px wide)")
            for cut in m["cut"]:
                problems.append(f"{name}.html cuts off a <{cut['tag']}> at {width} px: {cut['text']!r}")
            boxes = m["boxes"] if width >= 1000 else [b for b in m["boxes"] if not b["table"]]
            for box in boxes[:5]:
                problems.append(
                    f"{name}.html: a <{box['tag']}> needs sideways scrolling at {width} px ({box['width']} px "
                    f"wide): {box['text']!r}"
                )
    return problems
