"""Tables (Markdown) and the AP plot of the YOLO protocol, from the state `famkd_losses.demo.yolo` keeps."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .evaluate import AREA_RANGES, METRICS, mean_std
from .report import _plt, method_color

__all__ = ["ROW_ORDER", "LABELS", "aggregate", "paired", "results_markdown", "plot_ap", "seeds_text"]

ROW_ORDER = ("teacher", "student", "builtin", "famkd", "famkd_feature", "mgd", "cwd", "control")
LABELS = {
    "teacher": "teacher",
    "student": "student alone",
    "builtin": "+ ultralytics built-in distillation",
    "famkd": "+ FAMKD (FAMKDTrainer)",
    "famkd_feature": "+ FAMKD feature part (logits=False)",
    "mgd": "+ MGD",
    "cwd": "+ CWD",
    "control": "student alone, wall time of the slowest distilled run",
}
ULTRA = ("mAP50-95", "mAP50")


def aggregate(runs: Sequence[dict]) -> list[dict]:
    """One row per method in `ROW_ORDER`: mean and sample std over its seeds of every metric."""
    rows = []
    for key in ROW_ORDER:
        group = [r for r in runs if r["key"] == key]
        if not group:
            continue
        row = {"key": key, "label": LABELS[key], "seeds": [r["seed"] for r in group], "mean": {}, "std": {}}
        for m in METRICS:
            row["mean"][m], row["std"][m] = mean_std([r["test"][m] for r in group])
        for m in ULTRA:
            row["mean"][m], row["std"][m] = mean_std([r["ultralytics_test"][m] for r in group])
        row["epochs"] = group[0]["epochs"]
        row["train_s"] = sum(r["train_s"] for r in group) / len(group)
        row["median_epoch_s"] = sum(r["median_epoch_s"] for r in group) / len(group)
        row["median_epoch_cpu_s"] = sum(r["median_epoch_cpu_s"] for r in group) / len(group)
        rows.append(row)
    return rows


def paired(runs: Sequence[dict], a: str, b: str) -> dict | None:
    """Per-seed COCO AP differences ``a - b`` on test, over the seeds both methods ran."""
    by_seed = {r["seed"]: r for r in runs if r["key"] == b}
    diffs = [
        (r["seed"], r["test"]["AP"] - by_seed[r["seed"]]["test"]["AP"])
        for r in runs
        if r["key"] == a and r["seed"] in by_seed
    ]
    if not diffs:
        return None
    mean, std = mean_std([d for _, d in diffs])
    return {"per_seed": diffs, "mean": mean, "std": std}


def seeds_text(seeds: Sequence[int], extra_seeds: int, *, short: bool = False) -> str:
    """Which seeds the runs used: every run all of ``seeds``, or the feature part, MGD and CWD only the first
    ``extra_seeds``."""
    every = ", ".join(map(str, seeds))
    if extra_seeds >= len(seeds):
        return every if short else f"{every} for every student run"
    extra = ", ".join(map(str, seeds[:extra_seeds])) or "none"
    if short:
        return f"{every} (feature part, MGD, CWD: {extra})"
    return f"{every} for alone / built-in / FAMKD; {extra} for the feature part, MGD and CWD"


def _fmt(mean: float, std: float, n: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def _table(rows: Sequence[dict], ref_ap: float | None) -> list[str]:
    head = ["run", "seeds", "epochs", "train s", "s/epoch", "CPU s/epoch", *METRICS, "ultralytics mAP50-95"]
    head.append("ΔAP vs student")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---"] + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows:
        n = len(r["seeds"])
        cells = [r["label"], ", ".join(map(str, r["seeds"])), str(r["epochs"]), f"{r['train_s']:.0f}"]
        cells += [f"{r['median_epoch_s']:.1f}", f"{r['median_epoch_cpu_s']:.1f}"]
        cells += [_fmt(r["mean"][m], r["std"][m], n) for m in METRICS]
        cells.append(_fmt(r["mean"]["mAP50-95"], r["std"]["mAP50-95"], n))
        delta = "" if ref_ap is None or r["key"] in ("teacher", "student") else f"{r['mean']['AP'] - ref_ap:+.1f}"
        cells.append(delta)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _ranges() -> str:
    cuts = [math.sqrt(AREA_RANGES["small"][1]), math.sqrt(AREA_RANGES["large"][0])]
    return f"small < {cuts[0]:.0f}^2, medium {cuts[0]:.0f}^2-{cuts[1]:.0f}^2, large > {cuts[1]:.0f}^2 px^2"


def results_markdown(state: dict) -> str:
    """The protocol's results as Markdown: setup, the equal-epoch table, the equal-wall-time control,
    paired per-seed differences, the distillation weights."""
    cfg = state["config"]
    rows = aggregate(state["runs"] + ([state["teacher_run"]] if state.get("teacher_run") else []))
    by_key = {r["key"]: r for r in rows}
    student = by_key.get("student")
    ref = student["mean"]["AP"] if student else None
    t, s = state["models"]["teacher"], state["models"]["student"]
    lines = ["# famkd-losses YOLO protocol: ultralytics' trainer, its built-in distillation and ours", ""]
    if cfg["quick"]:
        lines += [
            "**This is a `--quick` smoke run: tiny data and one or two epochs. Its numbers are not evidence.**",
            "",
        ]
    lines += [
        f"Machine: {state['machine']}. Versions: {state['versions_text']}.",
        f"Data: {state['data_text']}. Metrics on the **test** split: COCO box AP (pycocotools, IoU 0.50:0.95, "
        f"percent, size ranges for {cfg['data']['canvas']}-px canvases on the box area: {_ranges()}; the "
        f"predictions of the final weights at conf >= {cfg['conf']:g}, at most {cfg['max_det']} per image, "
        "ultralytics' NMS at IoU 0.7), and beside it ultralytics' own mAP50-95 (`YOLO(weights).val(split='test')`, "
        "its defaults: conf 0.001, max_det 300), so the two can be related.",
        "",
        "## Setup",
        "",
        f"- Teacher: {t['name']} ({t['params'] / 1e6:.2f} M parameters; neck channels {t['channels']}), trained "
        f"once for {cfg['teacher_epochs']} epochs with the same settings and cached "
        f"({'loaded from the cache' if state['teacher']['cached'] else 'trained in this run'}, "
        f"{state['teacher']['train_s']:.0f} s).",
        f"- Student: {s['name']} ({s['params'] / 1e6:.2f} M parameters; neck channels {s['channels']}). Both built "
        "from ultralytics' bundled `yolov8.yaml` with these depth / width multiples, nothing downloaded.",
        f"- Every run: `YOLO(student_yaml).train(data=..., epochs={cfg['student_epochs']}, seed=<seed>, ...)` with "
        f"the same settings: {state['train_args_text']}.",
        f"- Built-in row, as ultralytics' documentation tells a user to run it: "
        f"`{state['builtin_call']}` (its default loss, `dis={state['builtin_dis']:g}`, untouched).",
        "- FAMKD, FAMKD feature part, MGD, CWD rows: the same call with `trainer=` a "
        "`famkd_losses.integrations.ultralytics` trainer "
        "(`distillation_trainer(loss)`, a `FAMKDTrainer`), the loss on the neck features the Detect head reads "
        "(FAMKD also on its class logits; its feature part through `distillation_trainer(loss, logits=False)`, "
        "the same `FAMKDLoss` without them); CWD through a 1x1 convolution per level to the teacher's channels.",
        f"- Distillation weights: {state['weights_text']}",
        f"- Seeds: {seeds_text(state['seeds'], cfg['extra_seeds'])}. Mean ± sample std over seeds where there are "
        "several.",
        "",
        "## Equal epochs",
        "",
    ]
    main = [by_key[k] for k in ROW_ORDER if k in by_key and k != "control"]
    lines += [*_table(main, ref), ""]
    if "teacher" in by_key and student:
        lines += [f"Teacher - student gap: {by_key['teacher']['mean']['AP'] - ref:.1f} AP.", ""]
    lines += [
        "## Equal wall time",
        "",
        "A distilled epoch costs more than a plain one (the teacher's forward, the loss and its layers). The "
        "control trains the student alone for the epochs that take the slowest distilled run's time: "
        f"{cfg['student_epochs']} epochs times the ratio of that run's median epoch time to the plain student's "
        "(first seed, both measured in this run), rounded. On CPU the times compared are the process CPU "
        "seconds of the training loop (ultralytics trains with one torch thread on 2 cores and loads the data "
        "in the process, so they are the wall time of an unshared machine, and a busy spell of a shared one "
        "skews neither run); otherwise (a GPU, or data-loading workers) the wall time. `train s` is the whole "
        "`train()` call (set-up and ultralytics' final validations included); `s/epoch` the median epoch's "
        "training loop, wall clock.",
        "",
    ]
    control = by_key.get("control")
    if control:
        m = state["control_match"]
        lines += [
            f"Matched run: {LABELS[m['run']]} ({m['epoch_ratio']:.2f}x the plain student's epoch time).",
            "",
            *_table([r for r in (student, control, by_key.get(m["run"])) if r], ref),
            "",
        ]
    else:
        lines += ["(not run yet)", ""]
    pairs = state.get("paired") or {}
    if any(pairs.values()):
        lines += ["## Paired differences (test COCO AP, same seed)", "", "| difference | per seed | mean ± std |"]
        lines.append("|---|---|---:|")
        for name, p in pairs.items():
            if p:
                per = ", ".join(f"seed {sd}: {d:+.1f}" for sd, d in p["per_seed"])
                lines.append(f"| {name} | {per} | {p['mean']:+.1f} ± {p['std']:.1f} |")
        lines.append("")
    lines += [
        f"## Distillation weights (first batch of the train split, seed {state['seeds'][0]})",
        "",
        "| run | term | measured at weight 1 | detection loss | weight | starts at (x detection loss) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for key in ROW_ORDER:  # the methods with a calibrated loss, in the tables' order
        cal = state["calibration"].get(key)
        if not cal:
            continue
        for term, w in cal["weights"].items():
            v, det = cal["terms_at_weight_1"][term], cal["det_loss"]
            lines.append(f"| {LABELS[key]} | {term} | {v:.4g} | {det:.4g} | {w:.4g} | {w * v / det:.3g} |")
    b = state.get("builtin_probe")
    if b:
        lines.append(
            f"| {LABELS['builtin']} | score-weighted MSE, fresh projector | | {b['det_loss']:.4g} | "
            f"dis = {b['dis']:g} | {b['ratio']:.3g} |"
        )
    lines += [
        "",
        "## Plot",
        "",
        "![COCO AP on the test split per method](ap_per_method.png)",
        "",
        f"Runs so far: {len(state['runs'])}; wall time {state['wall_s'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def plot_ap(state: dict, path: Path, *, title: str) -> None:
    """COCO AP (test) per method, one colour per method (`method_color`); error bars (sample std) only on
    rows with several seeds; ultralytics' mAP50-95 as a marker on each bar."""
    plt = _plt()
    rows = aggregate(state["runs"] + ([state["teacher_run"]] if state.get("teacher_run") else []))
    fig, ax = plt.subplots(figsize=(12, 5.5))
    x = np.arange(len(rows))
    ultra = [r["mean"]["mAP50-95"] for r in rows]
    top = max([r["mean"]["AP"] + r["std"]["AP"] for r in rows] + ultra + [1.0])
    for xi, r, u in zip(x, rows, ultra):
        n = len(r["seeds"])
        label = f"{r['label']} ({n} seed{'s' if n > 1 else ''}, {_epochs(r['epochs'])})"
        spread = r["std"]["AP"] if n > 1 else 0.0
        ax.bar(xi, r["mean"]["AP"], color=method_color(r["key"]), yerr=spread or None, capsize=4, label=label)
        above = max(r["mean"]["AP"] + spread, u) + 0.02 * top
        ax.text(xi, above, f"{r['mean']['AP']:.1f}", ha="center", va="bottom", fontsize=8)
    ax.plot(x, ultra, "kD", ms=5, ls="none", label="ultralytics mAP50-95 on the test split (mean over seeds)")
    ax.set_ylim(0, top * 1.15)
    ax.set_xticks(x, [textwrap.fill(r["label"], 20) for r in rows], fontsize=8)
    ax.set(xlabel="method", ylabel="COCO AP on the test split, %")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
