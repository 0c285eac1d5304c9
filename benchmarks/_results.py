"""The results tables of a benchmark run: results.json and results.csv in one folder.

Used by the pytest harness (conftest.py) while it measures, and by plot.py when it merges runs.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


def write_tables(rows: list[dict], env: dict, folder: Path) -> None:
    """results.json and results.csv (rewritten after every row, so a run stopped part-way keeps
    what it measured)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    keys = sorted({k for r in rows for k in r})
    with open(folder / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
