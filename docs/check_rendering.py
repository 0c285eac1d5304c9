"""Check the built documentation site in a real browser: the equations are typeset, offline.

    python docs/check_rendering.py [--site site] [PAGE ...]

1. Every page of the built site loads its scripts, stylesheets and images from the site
   itself (no ``http(s)://`` or protocol-relative ``src``/``href`` on them).
2. Each PAGE (default: ``method/index.html``, the page with the most equations) is opened in
   headless Chromium with every network request sent to a closed port, so that nothing from
   outside can load. After its JavaScript has run (``--dump-dom`` with a virtual-time budget),
   the page must hold one MathJax ``mjx-container`` per ``arithmatex`` element of the built
   HTML, no MathJax error, and no raw TeX delimiter (``\\(``, ``\\[``) in its visible text.

Exits 1 with the reasons when a check fails, 2 when the site or the browser is missing.
Needs a Chromium (Debian's ``chromium`` package) on PATH, or its path in ``$CHROMIUM``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# the tags whose attribute makes the browser load something
ASSET_TAGS = {"script": "src", "img": "src", "link": "href", "source": "src", "iframe": "src"}
REMOTE = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)


class _Assets(HTMLParser):
    """The remote assets a page loads and the number of its arithmatex elements."""

    def __init__(self) -> None:
        super().__init__()
        self.remote: list[str] = []
        self.arithmatex = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "arithmatex" in (attrs.get("class") or "").split():
            self.arithmatex += 1
        name = ASSET_TAGS.get(tag)
        if name is None or not attrs.get(name):
            return
        if tag == "link" and not {"stylesheet", "icon", "preload", "modulepreload"} & set(
            (attrs.get("rel") or "").split()
        ):
            return  # a plain link (rel=canonical, alternate, ...) loads nothing
        if REMOTE.match(attrs[name]):
            self.remote.append(f"<{tag} {name}={attrs[name]!r}>")


class _Rendered(HTMLParser):
    """What the browser made of a page: MathJax containers and errors, and the visible text."""

    SKIP = frozenset({"script", "style", "pre", "code", "mjx-assistive-mml", "svg"})

    def __init__(self) -> None:
        super().__init__()
        self.containers = 0
        self.errors = 0
        self._skip_depth = 0
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "mjx-container":
            self.containers += 1
        if tag == "mjx-merror" or "data-mjx-error" in attrs or "merror" in (attrs.get("data-mml-node") or ""):
            self.errors += 1
        if tag in self.SKIP:
            self._skip_depth += 1

    def handle_endtag(self, tag):
        if tag in self.SKIP and self._skip_depth:
            self._skip_depth -= 1

    def handle_data(self, data):
        if not self._skip_depth:
            self.text.append(data)


def find_browser() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def rendered_dom(browser: str, page: Path, budget_ms: int, timeout_s: float) -> str:
    cmd = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-extensions",
        "--no-first-run",
        # offline: every request that is not a file goes to a closed port
        "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>",
        f"--virtual-time-budget={budget_ms}",
        "--dump-dom",
        page.resolve().as_uri(),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    if result.returncode != 0 or "<html" not in result.stdout:
        raise RuntimeError(f"{browser} failed on {page} (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return result.stdout


def check_assets(site: Path) -> list[str]:
    problems = []
    for html in sorted(site.rglob("*.html")):
        parser = _Assets()
        parser.feed(html.read_text(encoding="utf-8"))
        problems += [f"{html.relative_to(site)}: loads {ref} from outside the site" for ref in parser.remote]
    return problems


def check_page(browser: str, site: Path, rel: str, budget_ms: int, timeout_s: float) -> list[str]:
    page = site / rel
    if not page.is_file():
        return [f"{rel}: not in the built site"]
    source = _Assets()
    source.feed(page.read_text(encoding="utf-8"))
    rendered = _Rendered()
    rendered.feed(rendered_dom(browser, page, budget_ms, timeout_s))
    text = "".join(rendered.text)
    problems = []
    if source.arithmatex == 0:
        problems.append(f"{rel}: no equations (arithmatex elements) to check")
    if rendered.containers < source.arithmatex:
        problems.append(
            f"{rel}: {rendered.containers} of {source.arithmatex} equations typeset (mjx-container elements)"
        )
    if rendered.errors:
        problems.append(f"{rel}: {rendered.errors} MathJax errors in the typeset equations")
    for delimiter in ("\\(", "\\["):
        if delimiter in text:
            where = text.index(delimiter)
            problems.append(f"{rel}: raw TeX left in the page: ...{text[max(where - 40, 0) : where + 60]!r}...")
    print(f"{rel}: {rendered.containers} equations typeset of {source.arithmatex}, {rendered.errors} errors")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", default=["method/index.html"], help="pages, relative to the site")
    parser.add_argument("--site", type=Path, default=Path("site"), help="the built site (mkdocs build -d SITE)")
    parser.add_argument("--budget-ms", type=int, default=5000, help="virtual time the page's scripts get")
    parser.add_argument("--timeout-s", type=float, default=120.0, help="wall-clock limit per page")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    if not (args.site / "index.html").is_file():
        print(f"no built site at {args.site} (run: mkdocs build -d {args.site})", file=sys.stderr)
        return 2
    browser = find_browser()
    if browser is None:
        print(f"no browser found ({', '.join(BROWSERS)}; or set $CHROMIUM)", file=sys.stderr)
        return 2
    problems = check_assets(args.site)
    for rel in args.pages:
        problems += check_page(browser, args.site, rel, args.budget_ms, args.timeout_s)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    verdict = "failed" if problems else "passed"
    print(f"docs rendering check {verdict} in {time.perf_counter() - start:.1f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
