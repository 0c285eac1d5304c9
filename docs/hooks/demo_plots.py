"""MkDocs hook: show the demo's plots on its results pages.

``famkd-demo`` writes ``results.md`` beside its plots (``*.png``), and each results page of
the site (``docs/demo/**/results.md``) is such a file, copied as the demo wrote it. At build
time every plot of the page's folder that the page does not already show or link is added
at its end, under "Plots", so that no plot is missing from the site and none is shown twice.
Nothing is added when a folder has no plot.
"""

from __future__ import annotations

import re
from pathlib import Path

# the demo's plots, in reading order; any other PNG follows, titled from its name
TITLES = {
    "ap_per_method": "AP per method",
    "training_curves": "Training curves",
    "positives_per_level": "Positive locations per FPN level",
}


def _is_results_page(src_uri: str) -> bool:
    return src_uri.startswith("demo/") and src_uri.rsplit("/", 1)[-1] == "results.md"


def _title(stem: str) -> str:
    if stem in TITLES:
        return TITLES[stem]
    match = re.fullmatch(r"(.*?)_?test(\d+)", stem)
    if match:
        return f"{match.group(1).replace('_', ' ').capitalize()}, test image {match.group(2)}"
    return stem.replace("_", " ").capitalize()


def _order(path: Path) -> tuple[int, str]:
    names = list(TITLES)
    return (names.index(path.stem), "") if path.stem in names else (len(names), path.name)


def on_page_markdown(markdown, page, config, files):
    if not _is_results_page(page.file.src_uri):
        return markdown
    folder = Path(page.file.abs_src_path).parent
    plots = sorted((p for p in folder.glob("*.png") if p.name not in markdown), key=_order)
    if not plots:
        return markdown
    parts = [markdown.rstrip(), "", "## Plots", "", "Written by the same run, beside this page's tables.", ""]
    for path in plots:
        title = _title(path.stem)
        parts += [f"### {title}", "", f"![{title}]({path.name})", ""]
    return "\n".join(parts)
