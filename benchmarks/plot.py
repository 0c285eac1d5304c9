"""Plots of benchmark results: one PNG per workload family, time per provider and case."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


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


def summary_markdown(rows: list[dict], env: dict) -> str:
    """A Markdown table: median time per provider and the speed-up over eager."""
    from collections import defaultdict

    table: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        table[(r["case"], r["workload"], r["dtype"], r["pass"])][r["provider"]] = r
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (p != "eager", p))
    head = "| case | workload | dtype | pass | " + " | ".join(f"{p} ms" for p in providers)
    head += " | " + " | ".join(f"{p} vs eager" for p in providers if p != "eager") + " | peak MB (eager) |"
    lines = [
        f"Device: {env['device']} ({env['device_type']}), torch {env['torch']}, triton {env['triton']}, "
        f"Python {env['python']}, commit {env['commit']}, {env['cpu_threads']} CPU threads.",
        "",
        head,
        "|" + "---|" * (head.count("|") - 1),
    ]
    for key in sorted(table):
        cells = table[key]
        eager = cells.get("eager", {}).get("median_ms")
        times = [f"{cells[p]['median_ms']:.2f}" if p in cells else "-" for p in providers]
        ratios = [
            f"{eager / cells[p]['median_ms']:.2f}x" if p in cells and eager else "-" for p in providers if p != "eager"
        ]
        peak = cells.get("eager", {}).get("peak_mem_mb")
        lines.append("| " + " | ".join([*key, *times, *ratios, "-" if peak is None else f"{peak:.1f}"]) + " |")
    return "\n".join(lines) + "\n"
