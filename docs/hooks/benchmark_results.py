"""MkDocs hook: put the recorded benchmark tables into benchmarks.md at build time.

benchmarks.md holds the marker ``<!-- benchmark-results -->``. At build time the marker is
replaced by the contents of every ``benchmarks/results/<device>/summary.md`` that exists in
the checkout (written by ``pytest benchmarks/``), one section per device, or by a sentence
saying that none has been recorded. Nothing is invented and nothing needs the network.
"""

from __future__ import annotations

from pathlib import Path

MARKER = "<!-- benchmark-results -->"


def _results_dir(config) -> Path:
    return Path(config["config_file_path"]).resolve().parent / "benchmarks" / "results"


def on_page_markdown(markdown, page, config, files):
    if MARKER not in markdown:
        return markdown
    results = _results_dir(config)
    summaries = sorted(results.glob("*/summary.md")) if results.is_dir() else []
    if not summaries:
        text = (
            "!!! note \"No results recorded yet\"\n"
            "    This checkout has no `benchmarks/results/<device>/summary.md`, so there are no\n"
            "    measured numbers to show. Run `pytest benchmarks/` (on a GPU machine for the\n"
            "    kernels) and rebuild the site to include them.\n"
        )
        return markdown.replace(MARKER, text)
    parts = []
    for path in summaries:
        device = path.parent.name
        source = f"From `benchmarks/results/{device}/summary.md`:"
        parts.append(f"### `{device}`\n\n{source}\n\n{path.read_text().strip()}\n")
    return markdown.replace(MARKER, "\n".join(parts))
