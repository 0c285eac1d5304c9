"""Reports of benchmark results: summary.md and one PNG per workload, time per provider and case.

    python benchmarks/plot.py RESULTS.json [MORE.json ...] -o FOLDER

merges the rows of several runs (e.g. the stages of run_gpu_suite.sh) into one
results.json / results.csv / summary.md / PNGs. The runs must come from one device; each row
keeps the commit it was measured at.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from _results import write_tables


def write_report(rows: list[dict], env: dict, folder: Path) -> None:
    """summary.md and the PNG plots (JSON/CSV only where matplotlib is missing)."""
    (folder / "summary.md").write_text(summary_markdown(rows, env))
    try:
        plot_results(rows, env, folder)
    except ImportError as e:
        print(f"[benchmarks] no plots ({e})", file=sys.stderr)


def plot_results(rows: list[dict], env: dict, folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = defaultdict(list)
    for r in rows:
        families[r["workload"]].append(r)
    for workload, rs in families.items():
        groups = sorted({(r["case"], r["dtype"], r["pass"]) for r in rs})
        providers = sorted({r["provider"] for r in rs})
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * len(providers) / 2), 4))
        width = 0.8 / max(1, len(providers))
        for j, prov in enumerate(providers):
            xs, ys = [], []
            for i, g in enumerate(groups):
                match = [r for r in rs if (r["case"], r["dtype"], r["pass"]) == g and r["provider"] == prov]
                if match:
                    xs.append(i + j * width)
                    ys.append(match[0]["median_ms"])
            ax.bar(xs, ys, width=width, label=prov)
        ax.set_xticks([i + width * (len(providers) - 1) / 2 for i in range(len(groups))])
        ax.set_xticklabels([f"{c}\n{d} {p}" for c, d, p in groups], fontsize=7)
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{workload} on {env['device']} (torch {env['torch']}, {env['commit']})", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / f"{workload}.png", dpi=110)
        plt.close(fig)


# The project's speed targets: RetinaNet shapes, bf16, forward+backward, on an H100/H200.
TARGET_KEY = ("retinanet_coco_b2", "bfloat16", "fwd_bwd")
TARGETS = [
    # (workload, what, threshold)
    ("famkd_feature_nogen", "triton vs eager", 4.0),
    ("famkd_feature_nogen", "triton vs compile", 1.5),
    ("famkd_feature_nogen", "triton peak memory / eager's", 0.5),
    ("famkd_full", "triton vs eager", 1.5),
]


def _fmt(v, spec=".2f", unit=""):
    return "-" if v is None else f"{v:{spec}}{unit}"


def _target_lines(table: dict) -> list[str]:
    case, dtype, pass_ = TARGET_KEY
    lines = [f"Targets ({case}, {dtype}, {pass_}):", ""]
    for workload, what, threshold in TARGETS:
        cells = table.get((case, workload, dtype, pass_), {})
        tri = cells.get("triton")
        value = None
        if what.startswith("triton vs "):  # a speed-up: higher is better
            other = cells.get(what.split()[-1])
            value = other["median_ms"] / tri["median_ms"] if tri and other else None
            ok = None if value is None else value >= threshold
            shown = _fmt(value, ".2f", "x")
            need = f">= {threshold}x"
        else:  # a memory ratio: lower is better
            eager = cells.get("eager")
            if tri and eager and tri.get("peak_mem_mb") is not None and eager.get("peak_mem_mb"):
                value = tri["peak_mem_mb"] / eager["peak_mem_mb"]
            ok = None if value is None else value <= threshold
            shown = _fmt(value, ".2f")
            need = f"<= {threshold}"
        verdict = "not measured" if ok is None else ("met" if ok else "missed")
        lines.append(f"- {workload}: {what} {shown} (target {need}): {verdict}")
    bw = [
        (w, cells["triton"]["fraction_of_peak_bw"])
        for (c, w, d, p), cells in sorted(table.items())
        if (c, d, p) == TARGET_KEY and cells.get("triton", {}).get("fraction_of_peak_bw") is not None
    ]
    for w, f in bw:
        lines.append(f"- {w}: triton at {100 * f:.0f}% of peak DRAM bandwidth (minimum bytes / time; target >= 70%)")
    return [*lines, ""]


def summary_markdown(rows: list[dict], env: dict) -> str:
    """Markdown: the speed targets (on CUDA), then per case/workload/dtype/pass the median time of each
    provider, its speed-up over eager, triton's over compile, peak memory and bandwidth."""
    table: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        table[(r["case"], r["workload"], r["dtype"], r["pass"])][r["provider"]] = r
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (p != "eager", p))
    others = [p for p in providers if p != "eager"]
    head = (
        "| case | workload | dtype | pass | "
        + " | ".join(f"{p} ms" for p in providers)
        + "".join(f" | {p} vs eager" for p in others)
        + (" | triton vs compile" if {"triton", "compile"} <= set(providers) else "")
        + "".join(f" | {p} peak MB" for p in providers)
        + " | best GB/s (% of peak) |"
    )
    lines = [
        f"Device: {env['device']} ({env['device_type']}), torch {env['torch']}, triton {env['triton']}, "
        f"Python {env['python']}, commit {env['commit']}, {env['cpu_threads']} CPU threads.",
        "",
        *(_target_lines(table) if env.get("device_type") == "cuda" else []),
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for key in sorted(table):
        cells = table[key]
        eager = cells.get("eager", {}).get("median_ms")
        times = [_fmt(cells.get(p, {}).get("median_ms")) for p in providers]
        ratios = [_fmt(eager / cells[p]["median_ms"], ".2f", "x") if p in cells and eager else "-" for p in others]
        if {"triton", "compile"} <= set(providers):
            tc = (
                (cells["compile"]["median_ms"] / cells["triton"]["median_ms"])
                if {"triton", "compile"} <= set(cells)
                else None
            )
            ratios.append(_fmt(tc, ".2f", "x"))
        peaks = [_fmt(cells.get(p, {}).get("peak_mem_mb"), ".1f") for p in providers]
        best = min(cells.values(), key=lambda r: r["median_ms"])
        frac = best.get("fraction_of_peak_bw")
        bw = f"{best['achieved_gbps']:.3g}" + ("" if frac is None else f" ({100 * frac:.0f}%)") + f" {best['provider']}"
        lines.append("| " + " | ".join([*key, *times, *ratios, *peaks, bw]) + " |")
    return "\n".join(lines) + "\n"


def merge(paths: list[Path]) -> tuple[list[dict], dict]:
    """Rows of several results.json of one device (later runs replace earlier rows of the same
    case, workload, provider, dtype and pass) and their environment."""
    rows: dict[tuple, dict] = {}
    envs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        envs.append(data["environment"])
        for r in data["results"]:
            r.setdefault("commit", data["environment"]["commit"])
            rows[(r["case"], r["workload"], r["provider"], r["dtype"], r["pass"])] = r
    devices = {e["device"] for e in envs}
    if len(devices) != 1:
        raise SystemExit(f"results from several devices cannot be merged: {sorted(devices)}")
    env = dict(envs[-1])
    env["commit"] = ", ".join(sorted({e["commit"] for e in envs}))
    return list(rows.values()), env


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="merge benchmark results and write the report")
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args(argv)
    rows, env = merge(args.results)
    write_tables(rows, env, args.out)
    write_report(rows, env, args.out)
    print(f"{len(rows)} rows -> {args.out}")


if __name__ == "__main__":
    main()
