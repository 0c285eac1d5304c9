"""Tables (stdout, Markdown, JSON) and plots (PNG) of a demo run."""

from __future__ import annotations

import inspect
import json
import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import functional as Fn
from ..integrations.torchvision import teacher_outputs
from ..losses.famkd import FAMKDLoss
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
        *_smoke_note(summary),
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
    lines += plots_markdown(summary.get("plots", []))
    lines += ["", f"Total wall time: {summary['wall_s']:.0f} s ({summary['wall_s'] / 60:.1f} min)."]
    return "\n".join(lines) + "\n"


def _smoke_note(summary: dict) -> list[str]:
    """A ``--quick`` run's warning, at the top of its results.md."""
    if not summary["config"].get("quick"):
        return []
    return [
        f"> **Smoke run (`--quick`), not evidence.** Tiny data and short schedules (teacher "
        f"{summary['config']['teacher_iters']}, students {summary['config']['student_iters']} iterations) check "
        "that the pipeline runs end to end; teacher and students are far from trained, so these numbers say "
        "nothing about any method. Run `famkd-demo` without `--quick` for the comparison.",
        "",
    ]


# The demo's plots in results.md: (alt text, caption); attention_test{i}.png: `plot_attention`.
_PLOT_CAPTIONS = {
    "ap_per_method.png": (
        "AP per run",
        "COCO AP (test) per run, one colour per method; the dashed line is the student alone.",
    ),
    "training_curves.png": (
        "training curves",
        "Detection loss and weighted distillation loss per run (first seed), moving average.",
    ),
    "positives_per_level.png": ("positives per level", "Positive locations and objects per FPN level (train split)."),
}


def plots_markdown(plots: Sequence[str]) -> list[str]:
    """A "Plots" section embedding ``plots`` (file names beside results.md) with relative image links."""
    if not plots:
        return []
    lines = ["", "## Plots", ""]
    for name in plots:
        if name in _PLOT_CAPTIONS:
            alt, caption = _PLOT_CAPTIONS[name]
        elif name.startswith("attention_test"):
            canvas = name[len("attention_test") : -len(".png")]
            alt = f"what FAMKD hides, test canvas {canvas}"
            caption = (
                f"Test canvas {canvas}: what the configured FAMKDLoss hides in the student's FPN maps (channel "
                "branch: the hidden channels per level; spatial branch, where configured: the hidden positions), "
                "from the teacher's attention."
            )
        else:
            alt = caption = name
        lines += [f"![{alt}]({name})", "", f"*{caption}* ([{name}]({name}))", ""]
    return lines[:-1]


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


def _wrap(text: str, width_in: float, fontsize: float = 9, bold: bool = False) -> str:
    """``text`` broken into lines that fit ``width_in`` inches at ``fontsize`` points (DejaVu Sans averages
    about 0.6 em a character, bold about 0.7; the margin covers capitals)."""
    return textwrap.fill(text, max(20, int(0.9 * width_in * 72 / ((0.7 if bold else 0.6) * fontsize))))


def _log_colorbar(fig, mappable, axes, label: str, lo: float, hi: float, **kw):
    """A colour bar of a `LogNorm` with five plain-number ticks from ``lo`` to ``hi``."""
    from matplotlib.ticker import NullLocator

    cbar = fig.colorbar(mappable, ax=axes, **kw)
    cbar.ax.yaxis.set_minor_locator(NullLocator())
    ticks = np.geomspace(lo, hi, 5)
    digits = next((d for d in range(3, 8) if len({f"{v:.{d}g}" for v in ticks}) == len(ticks)), 8)
    cbar.set_ticks(ticks, labels=[f"{v:.{digits}g}" for v in ticks])
    cbar.set_label(label, fontsize=8)
    cbar.ax.tick_params(labelsize=7)
    return cbar


def _curve_rows(rows: Sequence[dict]) -> list[dict]:
    return [r for r in rows if r["runs"] and r["runs"][0].get("curves", {}).get("det_loss")]


def plot_training_curves(rows: Sequence[dict], path: Path) -> None:
    """Detection loss (left) and weighted distillation loss (right) per run (its first seed), moving
    average; one colour per method (`method_color` of the row's ``"key"``)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in _curve_rows(rows):
        c = r["runs"][0]["curves"]
        n = len(c["det_loss"])
        w = max(1, n // 25)
        # the control is the plain student trained longer: dashed, so the student's line shows through
        control = r["kind"] == "control"
        style = {
            "label": r["label"] + (" (dashed)" if control else ""),
            "lw": 1.2,
            "color": method_color(r["key"]),
            "ls": "--" if control else "-",
        }
        axes[0].plot(np.arange(1, n + 1), _smooth(c["det_loss"], w), **style)
        if c.get("kd_loss"):
            axes[1].plot(
                np.arange(1, len(c["kd_loss"]) + 1), _smooth(c["kd_loss"], max(1, len(c["kd_loss"]) // 25)), **style
            )
    axes[0].set(
        title="detection loss (moving average)", xlabel="iteration", ylabel="detection loss (log scale)", yscale="log"
    )
    axes[1].set(
        title="distillation loss at the calibrated weights (moving average)",
        xlabel="iteration",
        ylabel="weighted distillation loss (log scale)",
        yscale="log",
    )
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ap(rows: Sequence[dict], path: Path) -> None:
    """AP (test) per run, one colour per method (`method_color`); error bars (sample std over seeds) only
    on rows with several seeds; the equal-wall-time control hatched; the plain student as a dashed line."""
    from matplotlib.patches import Patch

    plt = _plt()
    fig, ax = plt.subplots(figsize=(10, 5))
    x = np.arange(len(rows))
    tops = []
    for xi, r in zip(x, rows):
        mean, seeds = r["mean"]["AP"], len(r["runs"])
        std = r["std"]["AP"] if seeds > 1 and r["std"]["AP"] is not None else None
        ax.bar(
            xi,
            mean,
            color=method_color(r["key"]),
            yerr=std,
            capsize=4 if std is not None else 0,
            hatch="//" if r["kind"] == "control" else None,
            edgecolor="white" if r["kind"] == "control" else None,
        )
        tops.append(mean + (std or 0.0))
        ax.annotate(
            f"{mean:.1f}",
            (xi, tops[-1]),
            xytext=(0, 2),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    student = next(r for r in rows if r["key"] == "student")["mean"]["AP"]
    line = ax.axhline(student, color=method_color("student"), ls="--", lw=0.9)
    ax.set_ylim(0, max([*tops, 1.0]) * 1.12)
    ax.set_xticks(x, [textwrap.fill(r["label"], 18) for r in rows], fontsize=8)
    seeds = max(len(r["runs"]) for r in rows)
    spread = f"mean ± sample std over {seeds} seeds" if seeds > 1 else "one seed: no error bars"
    ax.set(xlabel="run", ylabel="COCO AP on the test split, %")
    ax.set_title(f"AP per run ({spread})", fontsize=10)
    handles = [
        line,
        Patch(facecolor="0.8", edgecolor="white", hatch="//"),
    ]
    labels = [
        f"student alone ({student:.1f} AP): the reference of ΔAP",
        "hatched: student alone for the wall time of the slowest distilled run (control)",
    ]
    ax.legend(handles, labels, fontsize=8, loc="upper right")
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
    ax.set(yscale="log", xlabel="FPN level", ylabel="count (log scale)", title="train split: positives per FPN level")
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


# What each mask mode hides, in words (see `famkd_losses.functional.selection_keys`).
_HIDES = {
    "topk": "the most salient",
    "topk_nonsalient": "the least salient",
    "sample": "drawn in proportion to the attention",
    "random": "drawn uniformly at random",
}


def _attention_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    sig = inspect.signature(FAMKDLoss.__init__).parameters
    names = ("scales", "mask_mode", "ratio_sp", "ratio_ch", "branches", "tau")
    opts = {n: sig[n].default for n in names}
    opts.update({k: v for k, v in (options or {}).items() if k in names})
    if isinstance(opts["branches"], str):
        opts["branches"] = (opts["branches"],)
    opts["scales"], opts["branches"] = tuple(opts["scales"]), tuple(opts["branches"])
    return opts


def _draw_canvas(ax, img: np.ndarray, boxes: list, canvas: int) -> None:
    from matplotlib.patches import Rectangle

    ax.imshow(img, cmap="gray", vmin=0, vmax=1, extent=(0, canvas, canvas, 0))
    for x1, y1, x2, y2 in boxes:
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="lime", lw=0.8))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlim(0, canvas)
    ax.set_ylim(canvas, 0)


@torch.no_grad()
def _teacher_masks(features: Sequence[Tensor], b: int, opts: dict, seed: int) -> list[dict[int, dict]]:
    """Per level, per scale that fits: the pooled map's size and, per configured branch, the teacher's
    attention and the mask FAMKD applies (0 = hidden), as `ScaleAwareMaskedFeatureLoss` computes them.
    Random modes: one draw, level ``l`` from ``seed + l``."""
    out = []
    for lvl, feat in enumerate(features):
        f = feat[b : b + 1].float()
        h, w = f.shape[-2:]
        gen = torch.Generator(device=f.device).manual_seed(seed + lvl)
        per_scale = {}
        for s in Fn.active_scales(h, w, opts["scales"]):
            f_s = Fn.max_pool(f, s)
            entry: dict[str, Any] = {"size": tuple(f_s.shape[-2:]), "channels": f_s.shape[1]}
            for branch in opts["branches"]:
                if branch == "spatial":
                    att = Fn.spatial_attention(f_s, opts["tau"])[0, 0]
                    mask = Fn.spatial_mask(f_s, opts["ratio_sp"], opts["mask_mode"], opts["tau"], gen)[0, 0]
                else:
                    att = Fn.channel_attention(f_s, opts["tau"])[0, :, 0, 0]
                    mask = Fn.channel_mask(f_s, opts["ratio_ch"], opts["mask_mode"], opts["tau"], gen)[0, :, 0, 0]
                entry[branch] = (att.cpu().numpy(), mask.cpu().numpy())
            per_scale[s] = entry
        out.append(per_scale)
    return out


def _channel_panel(fig, img, boxes, canvas, masks, level_names, opts, title_width) -> None:
    """Per scale, a heatmap of the teacher's channel attention (levels x channels, log colour scale) with,
    under each level, a strip marking the hidden channels in black."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Patch

    scales = opts["scales"]
    vals = [e["channel"][0] for lv in masks for e in lv.values()]
    lo = min(float(v.min()) for v in vals) if vals else 0.1
    hi = max(float(v.max()) for v in vals) if vals else 10.0
    lo, hi = max(lo, 1e-6), max(hi, lo * 1.01)
    norm = LogNorm(lo, hi)
    grid = fig.add_gridspec(len(scales), 2, width_ratios=[1, 3.4])
    ax_img = fig.add_subplot(grid[:, 0])
    _draw_canvas(ax_img, img, boxes, canvas)
    ax_img.set_title("canvas and its boxes", fontsize=8)
    mappable = None
    n_levels = len(masks)
    for k, s in enumerate(scales):
        ax = fig.add_subplot(grid[k, 1])
        channels = next((e["channels"] for lv in masks for t, e in lv.items() if t == s), None)
        ticks, tick_labels = [], []
        for lvl, per_scale in enumerate(masks):
            top = lvl * 1.5
            if s not in per_scale:
                ax.text(
                    (channels or 1) / 2 - 0.5,
                    top + 0.5,
                    f"{level_names[lvl]}: s={s} larger than the map, skipped",
                    ha="center",
                    va="center",
                    fontsize=7,
                )
                ticks.append(top + 0.5)
                tick_labels.append(level_names[lvl])
                continue
            e = per_scale[s]
            att, mask = e["channel"]
            c = len(att)
            mappable = ax.imshow(
                att[None, :],
                cmap="viridis",
                norm=norm,
                aspect="auto",
                interpolation="nearest",
                extent=(-0.5, c - 0.5, top + 0.9, top - 0.1),
            )
            ax.imshow(
                mask[None, :],
                cmap="gray",
                vmin=0,
                vmax=1,
                aspect="auto",
                interpolation="nearest",
                extent=(-0.5, c - 0.5, top + 1.3, top + 0.95),
            )
            ticks.append(top + 0.5)
            tick_labels.append(f"{level_names[lvl]} {e['size'][0]}x{e['size'][1]}")
        c = channels or 1
        ax.set_xlim(-0.5, c - 0.5)
        ax.set_ylim(n_levels * 1.5 - 0.1, -0.2)
        ax.set_yticks(ticks, tick_labels, fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel(f"channel (the teacher's {c}; the student's map is aligned to them)", fontsize=8)
        ax.set_ylabel("FPN level", fontsize=8)
        ax.set_title(f"scale s={s}" + (" (the level itself)" if s == 1 else f" (max-pooled {s}x{s})"), fontsize=8)
    if mappable is not None:
        _log_colorbar(
            fig, mappable, fig.axes[1:], "teacher channel attention A_ch (mean 1; log scale)", lo, hi, shrink=0.9
        )
    c = next((e["channels"] for lv in masks for e in lv.values()), 0)
    hidden = f"{Fn.num_masked(c, opts['ratio_ch'])} of {c} per level and scale: {_HIDES[opts['mask_mode']]}"
    fig.legend(
        [Patch(facecolor="black"), Patch(facecolor="white", edgecolor="0.5")],
        [
            f"hidden channel (mask 0: zeroed in the aligned student's map before the generator; {hidden})",
            "kept channel",
        ],
        loc="outside lower center",
        ncol=2,
        fontsize=7,
        frameon=False,
    )
    fig.suptitle(
        _wrap(
            f"channel branch: per level, the teacher's channel attention A_ch = C softmax_c(mean_hw |T| / tau) "
            f"(tau {opts['tau']:g}); the strip under each level marks the channels FAMKD hides (black)",
            title_width,
            9,
        ),
        fontsize=9,
    )


def _spatial_panel(fig, img, boxes, canvas, masks, level_names, opts, title_width) -> None:
    """Per level (rows) and scale: the teacher's spatial attention over the canvas, and the hidden positions."""
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.patches import Patch

    scales = opts["scales"]
    axes = fig.subplots(len(masks), 1 + 2 * len(scales), squeeze=False)
    extent = (0, canvas, canvas, 0)
    vals = [e["spatial"][0] for lv in masks for e in lv.values()]
    lo = max(min(float(v.min()) for v in vals), 1e-6) if vals else 0.1
    hi = max(max(float(v.max()) for v in vals), lo * 1.01) if vals else 10.0
    norm = LogNorm(lo, hi)
    hidden_color = "gold"
    mappable = None
    for lvl, per_scale in enumerate(masks):
        _draw_canvas(axes[lvl][0], img, boxes, canvas)
        size = next(iter(per_scale.values()))["size"] if per_scale else None
        axes[lvl][0].set_ylabel(level_names[lvl] + (f" {size[0]}x{size[1]}" if size else ""), fontsize=8)
        for k, s in enumerate(scales):
            a_ax, m_ax = axes[lvl][1 + 2 * k], axes[lvl][2 + 2 * k]
            for ax in (a_ax, m_ax):
                _draw_canvas(ax, img, [], canvas)
            if lvl == 0:
                a_ax.set_title(f"A_sp, s={s}", fontsize=8)
                m_ax.set_title(f"hidden, s={s}", fontsize=8)
            if s not in per_scale:
                for ax in (a_ax, m_ax):
                    ax.text(
                        0.5,
                        0.5,
                        f"s={s} > map:\nskipped",
                        ha="center",
                        va="center",
                        fontsize=7,
                        transform=ax.transAxes,
                        bbox={"facecolor": "0.92", "edgecolor": "none"},
                    )
                continue
            att, mask = per_scale[s]["spatial"]
            mappable = a_ax.imshow(att, cmap="inferno", norm=norm, alpha=0.7, extent=extent, interpolation="nearest")
            m_ax.imshow(
                np.ma.masked_where(mask > 0, 1 - mask),
                cmap=ListedColormap([hidden_color]),
                alpha=0.6,
                extent=extent,
                interpolation="nearest",
                vmin=0,
                vmax=1,
            )
    axes[0][0].set_title("canvas and boxes", fontsize=8)
    if mappable is not None:
        _log_colorbar(
            fig,
            mappable,
            axes.ravel().tolist(),
            "teacher spatial attention A_sp (mean 1; log scale)",
            lo,
            hi,
            shrink=0.5,
        )
    fig.legend(
        [Patch(facecolor=hidden_color, alpha=0.6)],
        [
            f"hidden position (mask 0: zeroed in the aligned student's map before the generator; "
            f"{opts['ratio_sp']:g} of the positions of each map: {_HIDES[opts['mask_mode']]})"
        ],
        loc="outside lower center",
        fontsize=7,
        frameon=False,
    )
    fig.suptitle(
        _wrap(
            f"spatial branch: per level and scale, the teacher's spatial attention A_sp = HW softmax_hw(mean_c |T| / "
            f"tau) (tau {opts['tau']:g}) over the canvas, and the positions FAMKD hides",
            title_width,
            9,
        ),
        fontsize=9,
    )


@torch.no_grad()
def plot_attention(
    teacher: nn.Module,
    split: DetectionSplit,
    indices: Sequence[int],
    out_dir: Path,
    *,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> list[Path]:
    """For each canvas, what the configured `FAMKDLoss` hides, from the teacher's attention (via
    `famkd_losses.functional`, as the loss computes it): for the channel branch, per scale, the teacher's
    channel attention per level with the hidden channels marked; for the spatial branch, per level and
    scale, the spatial attention and the hidden positions over the canvas.

    ``options``: the loss's ``scales``, ``mask_mode``, ``ratio_sp``, ``ratio_ch``, ``branches`` and ``tau``
    (missing ones: `FAMKDLoss`'s defaults). The random modes (``"sample"``, ``"random"``) show one draw,
    level ``l`` seeded with ``seed + l``. Writes ``attention_test{index}.png``; returns the paths."""
    plt = _plt()
    opts = _attention_options(options)
    images, targets = split.batch(list(indices), device)
    t = teacher_outputs(teacher, images, targets)
    canvas = images[0].shape[-1]
    names = [LEVEL_NAMES[i] if i < len(LEVEL_NAMES) else f"level {i}" for i in range(len(t.features))]
    n_levels, n_scales = len(t.features), len(opts["scales"])
    parts = [b for b in ("channel", "spatial") if b in opts["branches"]]
    heights = {"channel": 1.0 + max(2.6, 2.2 * n_scales), "spatial": 1.0 + 1.75 * n_levels}
    width = max(11.0, 1.75 * (1 + 2 * n_scales) + 1.0)
    paths = []
    for b, i in enumerate(indices):
        img = images[b][0].cpu().numpy()
        boxes = targets[b]["boxes"].tolist()
        masks = _teacher_masks(t.features, b, opts, seed)
        fig = plt.figure(figsize=(width, 0.6 + sum(heights[p] for p in parts)), layout="constrained")
        subs = fig.subfigures(len(parts), 1, height_ratios=[heights[p] for p in parts], squeeze=False)[:, 0]
        for sub, part in zip(subs, parts):
            draw = _channel_panel if part == "channel" else _spatial_panel
            draw(sub, img, boxes, canvas, masks, names, opts, width)
        random = " (random mode: one draw)" if opts["mask_mode"] in ("sample", "random") else ""
        fig.suptitle(
            _wrap(
                f"test canvas {i}: what FAMKDLoss hides in the student's FPN maps{random}, with "
                f"branches={list(opts['branches'])}, mask_mode={opts['mask_mode']!r}, scales={list(opts['scales'])}"
                + "".join(
                    f", {r}={opts[r]:g}" for p, r in (("channel", "ratio_ch"), ("spatial", "ratio_sp")) if p in parts
                )
                + ("" if "spatial" in parts else " (no spatial branch: no spatial mask)"),
                width,
                10,
                bold=True,
            ),
            fontsize=10,
            fontweight="bold",
        )
        path = Path(out_dir) / f"attention_test{i}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# The students' panels of `plot_val_curves`: (title, the run roles drawn there).
_VAL_PANELS = (
    ("students: the methods (one line per seed)", ("main", "length")),
    ("students: FAMKD's options and the diagnosis", ("ablation", "diagnosis")),
)


def plot_val_curves(
    curves: Sequence[tuple[str, str, Sequence[tuple[int, dict]], str]], path: Path, *, title: str, metric: str = "AP"
) -> None:
    """Val ``metric`` against iteration, one line per run: ``(method key, label, curve, role)``, a curve
    being ``[(iteration, metrics), ...]``. The teacher is drawn on its own axis (left); the methods
    (roles ``"main"`` and ``"length"``) in the middle; FAMKD's options and the diagnosis (roles
    ``"ablation"``, ``"diagnosis"``) on the right when there are any. A method's seeds share its
    colour and its legend entry; every run but the main ones is dashed or dotted, one style per label.
    The students' y axes start just below the lowest score after the first third of the longest run,
    so the plateaus are readable (the early points run off the bottom)."""
    plt = _plt()
    panels = [(t, roles) for t, roles in _VAL_PANELS if any(c[3] in roles and c[2] for c in curves)]
    widths = [1.0] + [2.0] * len(panels)
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(5 + 7 * len(panels), 7), gridspec_kw={"width_ratios": widths})
    ax_t, student_axes = axes[0], list(axes[1:])
    styles = ["--", ":", "-."]
    teacher = next((c[2] for c in curves if c[0] == "teacher" and c[2]), None)
    teacher_final = [] if teacher is None else [teacher[-1][1][metric]]
    for (panel_title, roles), ax in zip(panels, student_axes):
        seen: set[str] = set()
        dashed: dict[str, str] = {}  # one line style per label of the extra runs (its seeds share it)
        late: list[float] = []
        last_it = max(c[2][-1][0] for c in curves if c[2] and c[3] in roles)
        for key, label, curve, role in curves:
            if not curve or role not in roles:
                continue
            late += [p[1][metric] for p in curve if p[0] >= last_it / 3]
            ls = "-" if role == "main" else dashed.setdefault(label, styles[len(dashed) % len(styles)])
            its, vals = [p[0] for p in curve], [p[1][metric] for p in curve]
            legend = None if label in seen else label
            seen.add(label)
            ax.plot(its, vals, ls=ls, marker="o", ms=3, lw=1.3, color=method_color(key), label=legend, alpha=0.9)
        ax.set(title=panel_title, xlabel="iteration", ylabel=f"val {metric} (COCO, %)")
        if late:
            ax.set_ylim(min(late) - 2.0, max(late + teacher_final) + 1.0)
    if teacher is not None:
        ax_t.plot([p[0] for p in teacher], [p[1][metric] for p in teacher], marker="o", ms=3, lw=1.3,
                  color=method_color("teacher"), label="teacher")  # fmt: skip
        (final,) = teacher_final
        for ax in student_axes:
            ax.axhline(final, ls=":", lw=1.2, color=method_color("teacher"), label=f"teacher, final ({final:.1f})")
    ax_t.set(title="teacher", xlabel="iteration", ylabel=f"val {metric} (COCO, %)")
    for ax in axes:
        ax.grid(alpha=0.3)
    if ax_t.get_legend_handles_labels()[0]:
        ax_t.legend(fontsize=8, loc="lower right")
    for ax in student_axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, borderaxespad=0.0)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
