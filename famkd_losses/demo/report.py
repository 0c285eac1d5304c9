"""Tables (stdout, Markdown, JSON) and plots (PNG) of a demo run."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import functional as Fn
from ..integrations.torchvision import teacher_outputs
from .data import DetectionSplit
from .evaluate import AREA_RANGES, METRICS
from .models import LEVEL_NAMES

__all__ = [
    "METHOD_COLORS",
    "method_color",
    "plot_val_curves",
    "results_markdown",
    "write_json",
    "plot_training_curves",
    "plot_ap",
    "plot_positives",
    "plot_attention",
    "pick_example_images",
]


# One colour per method in every figure of the demo (matplotlib's tab10 entries).
METHOD_COLORS: dict[str, str] = {
    "teacher": "tab:gray",
    "student": "tab:blue",
    "control": "tab:cyan",
    "mgd": "tab:green",
    "fgd": "tab:purple",
    "cwd": "tab:olive",
    "builtin": "tab:brown",
    "famkd_feature": "tab:pink",
    "famkd_logits": "tab:orange",
    "famkd": "tab:red",
}


def method_color(key: str) -> str:
    """The colour of method ``key`` (see `METHOD_COLORS`); black for an unknown key."""
    return METHOD_COLORS.get(key, "black")


def _fmt(mean: float, std: float | None, seeds: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.1f} ± {std:.1f}" if seeds > 1 else f"{mean:.1f}"


def _row_cells(row: dict, ref_ap: float | None) -> list[str]:
    n = len(row["runs"])
    cells = [row["label"], str(row["iterations"]), f"{row['wall_s']:.0f}", f"{row['median_step_s']:.3f}"]
    cells += [_fmt(row["mean"][m], row["std"][m], n) for m in METRICS]
    if ref_ap is None or row["key"] in ("teacher", "student"):
        cells.append("")
    else:
        cells.append(f"{row['mean']['AP'] - ref_ap:+.1f}")
    return cells


def _table(rows: Sequence[dict], ref_ap: float | None) -> list[str]:
    head = ["run", "iterations", "train s", "median s/it", *METRICS, "ΔAP vs student"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(_row_cells(r, ref_ap)) + " |" for r in rows]
    return lines


def results_markdown(summary: dict) -> str:
    """The results as Markdown: the main table at equal schedule, the wall-clock control beside it."""
    rows = summary["rows"]
    seeds = summary["config"]["seeds"]
    teacher = next(r for r in rows if r["key"] == "teacher")
    student = next(r for r in rows if r["key"] == "student")
    main = [r for r in rows if r["kind"] in ("teacher", "main")]
    control = [r for r in rows if r["kind"] == "control"]
    ref = student["mean"]["AP"]
    distilled = [r for r in main if r["kind"] == "main" and r["key"] != "student"]
    best = max(distilled, key=lambda r: r["mean"]["AP"])
    slowest = max(distilled, key=lambda r: r["median_step_s"])
    cuts = [math.sqrt(AREA_RANGES["small"][1]), math.sqrt(AREA_RANGES["large"][0])]
    ranges = f"small < {cuts[0]:.0f}^2, medium {cuts[0]:.0f}^2-{cuts[1]:.0f}^2, large > {cuts[1]:.0f}^2 px^2"
    lines = [
        f"# famkd-losses detection demo ({summary['config']['detector'].upper()}, {summary['device']}, "
        f"loss backend {summary['config']['backend']})",
        "",
        f"Test split, {summary['data']['test']['canvases']} canvases, {summary['data']['test']['objects']} digits. "
        f"COCO box AP (pycocotools, IoU 0.50:0.95) in percent; size ranges for {summary['config']['canvas']}-px "
        f"canvases on the box area: {ranges}.",
        f"{seeds} seed(s): "
        + ("mean ± sample std over seeds." if seeds > 1 else "one seed, no spread (use --seeds K)."),
        "",
        "## Main comparison: equal schedule",
        "",
        "Every student row has the same seed(s), the same batches in the same order and the same "
        f"schedule ({student['iterations']} iterations, batch {summary['config']['batch_size']}, AdamW, "
        "warm-up + cosine). This is the field's protocol: it isolates what the distillation term adds. "
        f"Each distillation term starts at {summary['config']['kd_fraction']:g} x the detection loss "
        "(`famkd_losses.calibration.calibrate_weights` on the first batch, the same rule for every method; "
        "FAMKD (both) has two terms, a feature and a logits term, so its total starts at twice that).",
        "",
        *_table(main, ref),
        "",
        f"Teacher - student gap: {teacher['mean']['AP'] - ref:.1f} AP "
        f"(teacher {summary['teacher']['params'] / 1e6:.2f} M parameters, FPN {summary['teacher']['fpn_channels']} "
        f"channels; student {summary['student']['params'] / 1e6:.2f} M, FPN {summary['student']['fpn_channels']}).",
        "",
        "## Control: equal wall-clock time",
        "",
        "A distilled step costs more than a plain one (the teacher's forward, the loss and its layers). "
        "The control trains the student alone for the wall-clock time of the slowest distilled run: "
        f"{student['iterations']} iterations times the ratio of that run's median step time to the plain "
        "student's, both measured in this run (medians, so that a slow spell of a shared machine during one "
        "run skews neither). Beside it: the slowest distilled run (whose time it matches) and the best one. "
        "It answers a different question (what the same compute buys without a teacher), not the field's.",
        "",
        *_table([student, *control, slowest, *([best] if best is not slowest else [])], ref),
        "",
    ]
    ctrl = control[0] if control else None
    lines.append("## Reading")
    lines.append("")
    lines.append(
        f"- Best distilled run at equal schedule: {best['label']} ({best['mean']['AP']:.1f} AP, "
        f"{best['mean']['AP'] - ref:+.1f} over the student alone)."
    )
    if ctrl is not None:
        verdict = "beats" if ctrl["mean"]["AP"] > best["mean"]["AP"] else "does not beat"
        lines.append(
            f"- At equal wall-clock time the plain student ({ctrl['iterations']} iterations) reaches "
            f"{ctrl['mean']['AP']:.1f} AP and {verdict} the best distilled run."
        )
    if seeds == 1:
        lines.append(
            "- One seed: the student's initialisation alone moves AP by a few points, so differences of that "
            "size between rows are not established; `--seeds 3` gives the spread."
        )
    pos = summary["positives"]
    lines += [
        "",
        "## Where the objects are: positive locations per FPN level (train split)",
        "",
        "| | " + " | ".join(pos["levels"]) + " |",
        "|---|" + "---:|" * len(pos["levels"]),
        "| positive locations | " + " | ".join(str(v) for v in pos["positive_locations"]) + " |",
        "| objects with a positive there | " + " | ".join(str(v) for v in pos["objects_with_positives"]) + " |",
        "",
        f"{pos['objects_without_positive']} of {pos['objects']} objects "
        f"({100 * pos['objects_without_positive'] / max(1, pos['objects']):.1f}%) have no positive location.",
        "",
        f"## Distillation weights (calibrated on the first batch, seed {summary['config']['seed']})",
        "",
        "A term is measured at weight 1 (FGD: its published FCOS mix of fg, bg, attention and global terms, "
        "scaled as a whole); the weight puts it at the stated fraction of the detection loss on that batch.",
        "",
        "| run | term | measured at weight 1 | detection loss | weight |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        cal = r["runs"][0].get("calibration") if r["runs"] else None
        if not cal:
            continue
        for term, w in cal["weights"].items():
            lines.append(
                f"| {r['label']} | {term} | {cal['probe_terms'][term]:.4g} | {cal['probe_det_loss']:.4g} | {w:.4g} |"
            )
    if summary.get("ablation"):
        lines += ["", *ablation_markdown(summary["ablation"])]
    lines += ["", f"Total wall time: {summary['wall_s']:.0f} s ({summary['wall_s'] / 60:.1f} min)."]
    return "\n".join(lines) + "\n"


def ablation_markdown(ab: dict) -> list[str]:
    lines = [
        "## Ablation of FAMKD options (both parts), selected on the validation split",
        "",
        "One factor at a time around the defaults; each variant trained with the main schedule "
        f"(seed {ab['seed']}) and scored on the VAL split. The test split is used once, for the "
        "configuration the validation picks.",
        "",
        "| factor | value | val AP | val AP50 | val APs | val APm | val APl |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for v in ab["variants"]:
        m = v["val"]
        mark = " (default)" if v["default"] else ""
        lines.append(
            f"| {v['factor']} | {v['value']}{mark} | {m['AP']:.1f} | {m['AP50']:.1f} | {m['APs']:.1f} | "
            f"{m['APm']:.1f} | {m['APl']:.1f} |"
        )
    sel = ab["selected"]
    lines += [
        "",
        f"Selected on val: {sel['options']}.",
        f"Test AP: defaults {ab['default_test']['AP']:.1f}, selected {sel['test']['AP']:.1f} "
        f"(val AP {sel['val']['AP']:.1f}).",
    ]
    return lines


def _clean(obj: Any) -> Any:
    if isinstance(obj, float):
        return None if not math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj: Any) -> None:
    """JSON with NaN/Inf written as null."""
    Path(path).write_text(json.dumps(_clean(obj), indent=2, allow_nan=False) + "\n")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: Sequence[float], window: int) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2 or window <= 1:
        return v
    window = min(window, len(v))
    kernel = np.ones(window) / window
    head = np.cumsum(v[: window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(v, kernel, mode="valid")])


def plot_training_curves(curves: dict[str, dict], path: Path) -> None:
    """Detection loss (left) and weighted distillation loss (right) per run, moving average."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, c in curves.items():
        n = len(c["det_loss"])
        w = max(1, n // 25)
        axes[0].plot(np.arange(1, n + 1), _smooth(c["det_loss"], w), label=label, lw=1.2)
        if c.get("kd_loss"):
            axes[1].plot(np.arange(1, n + 1), _smooth(c["kd_loss"], w), label=label, lw=1.2)
    axes[0].set(title="detection loss (moving average)", xlabel="iteration", ylabel="loss", yscale="log")
    axes[1].set(title="distillation loss, calibrated weights", xlabel="iteration", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ap(rows: Sequence[dict], path: Path) -> None:
    """AP (test) per run with the seeds' spread; teacher and student as reference lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels = [r["label"] for r in rows]
    means = [r["mean"]["AP"] for r in rows]
    stds = [r["std"]["AP"] for r in rows]
    colors = [
        "tab:gray" if r["kind"] == "teacher" else "tab:orange" if r["kind"] == "control" else "tab:blue" for r in rows
    ]
    x = np.arange(len(rows))
    ax.bar(x, means, yerr=stds, color=colors, capsize=4)
    for xi, m in zip(x, means):
        ax.text(xi, m + 0.5, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    student = next(r for r in rows if r["key"] == "student")["mean"]["AP"]
    ax.axhline(student, color="tab:blue", ls="--", lw=0.8)
    ax.set_xticks(x, labels, rotation=25, ha="right", fontsize=8)
    ax.set(ylabel="COCO AP (test), %", title="AP per run (blue: equal schedule, orange: equal wall time)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_positives(pos: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(pos["levels"]))
    ax.bar(x - 0.2, pos["positive_locations"], 0.4, label="positive locations")
    ax.bar(x + 0.2, pos["objects_with_positives"], 0.4, label="objects positive there")
    ax.set_xticks(x, pos["levels"])
    ax.set(yscale="log", title="train split: positives per FPN level")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pick_example_images(split: DetectionSplit, count: int = 3) -> list[int]:
    """The first canvases that hold all three scale bands (or as many as found), then any."""
    picked = [i for i in range(len(split)) if len(set(split.bands[i].tolist())) == 3][:count]
    for i in range(len(split)):
        if len(picked) >= count:
            break
        if i not in picked:
            picked.append(i)
    return picked


@torch.no_grad()
def plot_attention(
    teacher: nn.Module,
    split: DetectionSplit,
    indices: Sequence[int],
    out_dir: Path,
    *,
    scales: Sequence[int] = (1, 2, 4),
    tau: float = 0.5,
    ratio_sp: float = 0.65,
    mask_mode: str = "topk",
    device: str = "cpu",
) -> list[Path]:
    """For each canvas: per FPN level (rows) and scale (columns) the teacher's spatial attention
    ``A_sp`` of the max-pooled map and the spatial mask FAMKD hides there (via
    `famkd_losses.functional`), drawn over the canvas with its boxes."""
    plt = _plt()
    paths = []
    images, targets = split.batch(list(indices), device)
    t = teacher_outputs(teacher, images, targets)
    canvas = images[0].shape[-1]
    for b, i in enumerate(indices):
        img = images[b][0].cpu().numpy()
        ncol = 1 + 2 * len(scales)
        fig, axes = plt.subplots(len(t.features), ncol, figsize=(1.7 * ncol, 1.8 * len(t.features)), squeeze=False)
        for lvl, feat in enumerate(t.features):
            f = feat[b : b + 1]
            h, w = f.shape[-2:]
            active = Fn.active_scales(h, w, scales)
            ax = axes[lvl][0]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1)
            for x1, y1, x2, y2 in targets[b]["boxes"].tolist():
                ax.add_patch(plt.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="lime", lw=0.8))
            ax.set_ylabel(f"{LEVEL_NAMES[lvl]} ({h}x{w})", fontsize=8)
            for k, s in enumerate(scales):
                a_ax, m_ax = axes[lvl][1 + 2 * k], axes[lvl][2 + 2 * k]
                if s not in active:
                    for ax in (a_ax, m_ax):
                        ax.text(0.5, 0.5, f"s={s} > map", ha="center", va="center", fontsize=7, transform=ax.transAxes)
                        ax.set_facecolor("0.92")
                    continue
                f_s = Fn.max_pool(f, s)
                att = Fn.spatial_attention(f_s, tau)[0, 0].cpu().numpy()
                mask = Fn.spatial_mask(f_s, ratio_sp, mask_mode, tau)[0, 0].cpu().numpy()
                extent = (0, canvas, canvas, 0)
                a_ax.imshow(img, cmap="gray", vmin=0, vmax=1)
                a_ax.imshow(att, cmap="inferno", alpha=0.65, extent=extent, interpolation="nearest")
                m_ax.imshow(img, cmap="gray", vmin=0, vmax=1)
                m_ax.imshow(
                    np.ma.masked_where(mask > 0, 1 - mask),
                    cmap="autumn",
                    alpha=0.55,
                    extent=extent,
                    interpolation="nearest",
                    vmin=0,
                    vmax=1,
                )
                if lvl == 0:
                    a_ax.set_title(f"A_sp, s={s}", fontsize=8)
                    m_ax.set_title(f"hidden, s={s}", fontsize=8)
        if len(t.features):
            axes[0][0].set_title(f"test canvas {i}", fontsize=8)
        for row in axes:
            for ax in row:
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_xlim(0, canvas)
                ax.set_ylim(canvas, 0)
        fig.suptitle(
            f"teacher attention (tau {tau}) and the {mask_mode} spatial mask (ratio {ratio_sp}) per level and scale",
            fontsize=9,
        )
        fig.tight_layout()
        path = Path(out_dir) / f"attention_test{i}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_val_curves(
    curves: Sequence[tuple[str, str, Sequence[tuple[int, dict]], str]], path: Path, *, title: str, metric: str = "AP"
) -> None:
    """Val ``metric`` against iteration, one line per run: ``(method key, label, curve, role)``, a curve
    being ``[(iteration, metrics), ...]``. A method's seeds share its colour and its legend entry;
    runs of role ``"ablation"`` are dashed; the teacher is drawn on its own iteration axis (left)."""
    plt = _plt()
    fig, (ax_t, ax) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 2.2]})
    seen: set[str] = set()
    styles = ["--", ":", "-."]
    ablations = 0
    for key, label, curve, role in curves:
        if not curve:
            continue
        its = [p[0] for p in curve]
        vals = [p[1][metric] for p in curve]
        target = ax_t if key == "teacher" else ax
        if role == "ablation":
            ls, legend = styles[ablations % len(styles)], label
            ablations += 1
        else:
            ls, legend = "-", None if label in seen else label
        seen.add(label)
        target.plot(its, vals, ls=ls, marker="o", ms=3, lw=1.3, color=method_color(key), label=legend, alpha=0.9)
    ax_t.set(title="teacher", xlabel="iteration", ylabel=f"val {metric} (COCO, %)")
    ax.set(title="students (one line per seed)", xlabel="iteration", ylabel=f"val {metric} (COCO, %)")
    for a in (ax_t, ax):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
