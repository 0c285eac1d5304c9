"""The whole demo: data, teacher, the students, evaluation, ablation, report."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .._validation import plural
from .data import DataConfig, DetectionSplit, make_dataset
from .evaluate import AREA_RANGES, METRICS, evaluate, finite_metrics, mean_std
from .methods import FAMKD_DEFAULTS, METHODS, build_distiller
from .models import (
    STUDENT,
    TEACHER,
    BackboneConfig,
    DetectorConfig,
    build_detector,
    num_parameters,
    positives_per_level,
)
from .report import (
    pick_example_images,
    plot_ap,
    plot_attention,
    plot_positives,
    plot_training_curves,
    results_markdown,
    write_json,
)
from .train import TrainConfig, load_or_train_teacher, probe_batch, train

__all__ = ["ABLATION_GRID", "ROW_ORDER", "SCHEDULES", "DemoConfig", "default_cache_dir", "run_demo"]

# One factor at a time around FAMKD_DEFAULTS.
ABLATION_GRID: dict[str, list[dict[str, Any]]] = {
    "scales": [{"scales": (1,)}, {"scales": (1, 2)}, {"scales": (1, 2, 4)}],
    "mask_mode": [{"mask_mode": m} for m in ("topk", "topk_nonsalient", "sample", "random")],
    "ratios (sp, ch)": [
        {"ratio_sp": 0.5, "ratio_ch": 0.25},
        {"ratio_sp": 0.65, "ratio_ch": 0.5},
        {"ratio_sp": 0.8, "ratio_ch": 0.75},
    ],
    "branches": [{"branches": ("spatial",)}, {"branches": ("channel",)}, {"branches": ("spatial", "channel")}],
    "guidance": [{"guidance": "logit"}, {"guidance": "feature"}],
    "weights": [{"weights": "soft"}, {"weights": "mask"}],
}
ROW_ORDER = ("teacher", "student", *METHODS, "control")
# Default-size schedules (teacher, student iterations) per detector. RetinaNet's IoU-matched
# anchors give about 2 positives per digit here (FCOS: many locations per object): at FCOS's
# 1000 / 500 its teacher reached 7.5 AP, at 3000 / 1000 33.4 (student 5.8).
SCHEDULES: dict[str, tuple[int, int]] = {"fcos": (1000, 500), "retinanet": (3000, 1000)}


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "famkd-losses" / "demo"


@dataclass
class DemoConfig:
    """A demo run. `preset` gives the default sizes (FCOS: about 12 min on 2 CPU cores, 9.4 once
    the teacher is cached, ``--threads 1`` on a busy machine; RetinaNet trains 3x longer, see
    `SCHEDULES`) and the ``--quick`` ones."""

    out: Path = Path("famkd_demo_out")
    detector: str = "fcos"
    quick: bool = False
    seeds: int = 1
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    ablation: bool = False
    kd_fraction: float = 1.0
    teacher_iters: int = 1000
    student_iters: int = 500
    batch_size: int = 16
    warmup: int = 50
    data: DataConfig = field(default_factory=DataConfig)
    cache_dir: Path = field(default_factory=default_cache_dir)
    progress: bool = True
    attention_images: int = 3

    @classmethod
    def preset(cls, quick: bool = False, **overrides: Any) -> DemoConfig:
        if quick:
            base = cls(
                quick=True,
                teacher_iters=150,
                student_iters=40,
                batch_size=8,
                warmup=10,
                data=DataConfig(num_canvases=(160, 48, 80)),
                attention_images=1,
            )
        else:
            teacher_iters, student_iters = SCHEDULES[overrides.get("detector") or "fcos"]
            base = cls(teacher_iters=teacher_iters, student_iters=student_iters)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return {
            "detector": self.detector,
            "quick": self.quick,
            "seeds": self.seeds,
            "seed": self.seed,
            "device": self.device,
            "backend": self.backend,
            "ablation": self.ablation,
            "kd_fraction": self.kd_fraction,
            "teacher_iters": self.teacher_iters,
            "student_iters": self.student_iters,
            "batch_size": self.batch_size,
            "warmup": self.warmup,
            "canvas": self.data.canvas,
            "data": self.data.to_dict(),
            "cache_dir": str(self.cache_dir),
            "famkd_options": {k: list(v) if isinstance(v, tuple) else v for k, v in FAMKD_DEFAULTS.items()},
        }


def _split_stats(split: DetectionSplit) -> dict:
    bands = torch.cat(split.bands) if split.bands else torch.zeros(0, dtype=torch.long)
    counts = torch.bincount(bands, minlength=3).tolist() if bands.numel() else [0, 0, 0]
    return {
        "canvases": len(split),
        "objects": split.num_objects(),
        "objects_small_medium_large": counts,
        "digit_pool": len(split.digit_ids),
    }


class _Runner:
    def __init__(
        self,
        cfg: DemoConfig,
        log: Callable[[str], None],
        *,
        teacher_backbone: BackboneConfig = TEACHER,
        student_backbone: BackboneConfig = STUDENT,
    ) -> None:
        self.cfg = cfg
        self.log = log
        self.teacher_cfg = DetectorConfig(kind=cfg.detector, canvas=cfg.data.canvas, backbone=teacher_backbone)
        self.student_cfg = DetectorConfig(kind=cfg.detector, canvas=cfg.data.canvas, backbone=student_backbone)

    def build_student(self) -> torch.nn.Module:
        return build_detector(self.student_cfg).to(self.cfg.device)

    def load_teacher(self, split: DetectionSplit, **kwargs: Any) -> tuple[torch.nn.Module, dict]:
        """`load_or_train_teacher` with this run's teacher, data, schedule, cache, device and log."""
        cfg = self.cfg
        return load_or_train_teacher(
            self.teacher_cfg,
            cfg.data,
            self.train_cfg(cfg.teacher_iters, cfg.seed),
            split,
            cfg.cache_dir,
            device=cfg.device,
            progress=cfg.progress,
            log=self.log,
            **kwargs,
        )

    def train_cfg(self, iterations: int, seed: int) -> TrainConfig:
        return TrainConfig(iterations=iterations, batch_size=self.cfg.batch_size, warmup=self.cfg.warmup, seed=seed)

    def student_run(
        self,
        key: str,
        seed: int,
        splits: dict[str, DetectionSplit],
        teacher: torch.nn.Module,
        *,
        iterations: int | None = None,
        options: dict | None = None,
        eval_splits: Sequence[str] = ("test",),
        desc: str | None = None,
        eval_every: int = 0,
        teacher_cache: Callable | None = None,
        kd_decay: bool = False,
        fraction: float | Mapping[str, float] | None = None,
    ) -> dict:
        """Train one student (alone, or with method ``key``) and evaluate it on ``eval_splits``.

        ``eval_every > 0`` also scores it on the val split every ``eval_every`` iterations
        (``run["eval_curve"]``); ``teacher_cache`` and ``kd_decay`` are handed to `train`. ``fraction``:
        what each distillation term starts at, as a fraction of the detection loss (one for all or
        one per term; default ``kd_fraction``)."""
        cfg = self.cfg
        tcfg = self.train_cfg(cfg.student_iters, seed)
        torch.manual_seed(seed)
        student = self.build_student()
        distiller = None
        if key in METHODS:
            ch_s = [self.student_cfg.backbone.fpn_channels] * 5
            ch_t = [self.teacher_cfg.backbone.fpn_channels] * 5
            distiller = build_distiller(
                key,
                student_channels=ch_s,
                teacher_channels=ch_t,
                num_classes=self.student_cfg.num_classes,
                probe=probe_batch(student, teacher, splits["train"], tcfg, cfg.device),
                fraction=cfg.kd_fraction if fraction is None else fraction,
                seed=seed,
                options=options,
                device=cfg.device,
                backend=cfg.backend,
            )
        result = train(
            student,
            splits["train"],
            tcfg,
            iterations=iterations,
            teacher=teacher if distiller else None,
            distiller=distiller,
            device=cfg.device,
            desc=desc or f"{key} (seed {seed})",
            progress=cfg.progress,
            eval_every=eval_every,
            evaluator=(lambda m: evaluate(m, splits["val"], cfg.data.canvas, cfg.device)) if eval_every else None,
            teacher_cache=teacher_cache,
            kd_decay=kd_decay,
        )
        t0 = time.perf_counter()
        # the last point of the val curve is the final model's val score: not evaluated twice
        final_val = {"val": result.eval_curve[-1][1]} if result.eval_curve else {}
        metrics = {
            name: final_val.get(name) or evaluate(student, splits[name], cfg.data.canvas, cfg.device)
            for name in eval_splits
        }
        run = {
            "seed": seed,
            **result.summary(),
            "eval_s": time.perf_counter() - t0,
            "metrics": metrics.get("test"),
            "curves": {"det_loss": result.det_loss, "kd_loss": result.kd_loss, "kd_terms": result.kd_terms},
        }
        if "val" in metrics:
            run["val"] = metrics["val"]
        if result.eval_curve:
            run["eval_curve"] = result.eval_curve
            run["eval_s"] += result.eval_s
        if distiller is not None:
            run["calibration"] = {
                "weights": distiller.weights,
                "probe_terms": distiller.probe_terms,
                "probe_det_loss": distiller.probe_det_loss,
            }
        main = metrics.get("test") or metrics.get("val")
        self.log(
            f"  {desc or key:<28} {result.iterations:5d} it  {result.wall_s:6.1f} s  "
            f"({result.s_per_iter:.3f} s/it)  AP {main['AP']:.1f}  AP50 {main['AP50']:.1f}"
        )
        return run


def _aggregate(key: str, label: str, kind: str, runs: list[dict]) -> dict:
    mean, std = {}, {}
    for m in METRICS:
        mean[m], std[m] = mean_std([r["metrics"][m] for r in runs])
    return {
        "key": key,
        "label": label,
        "kind": kind,
        "iterations": round(sum(r["iterations"] for r in runs) / len(runs)),
        "wall_s": sum(r["wall_s"] for r in runs) / len(runs),
        "s_per_iter": sum(r["s_per_iter"] for r in runs) / len(runs),
        "median_step_s": sum(r["median_step_s"] for r in runs) / len(runs),
        "mean": mean,
        "std": std,
        "runs": runs,
    }


def _options_label(opts: dict) -> str:
    return ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in opts.items())


def _ablation(runner: _Runner, splits, teacher, default_val: dict, default_test: dict) -> dict:
    cfg = runner.cfg
    seed = cfg.seed
    variants = []
    best: dict[str, tuple[float, dict]] = {}
    for factor, values in ABLATION_GRID.items():
        for change in values:
            is_default = all(FAMKD_DEFAULTS[k] == v for k, v in change.items())
            if is_default:
                val = default_val
            else:
                run = runner.student_run(
                    "famkd",
                    seed,
                    splits,
                    teacher,
                    options=change,
                    eval_splits=("val",),
                    desc=f"ablation {_options_label(change)}",
                )
                val = run["val"]
            variants.append(
                {
                    "factor": factor,
                    "value": _options_label(change),
                    "options": change,
                    "default": is_default,
                    "val": val,
                }
            )
            # ties go to the default, then to the earlier value
            if factor not in best or val["AP"] > best[factor][0] or (val["AP"] == best[factor][0] and is_default):
                best[factor] = (val["AP"], change)
    selected = dict(FAMKD_DEFAULTS)
    for _, change in best.values():
        selected.update(change)
    changes = {k: v for k, v in selected.items() if FAMKD_DEFAULTS[k] != v}
    if changes:
        run = runner.student_run(
            "famkd", seed, splits, teacher, options=changes, eval_splits=("val", "test"), desc="ablation: selected"
        )
        sel_val, sel_test = run["val"], run["metrics"]
    else:
        sel_val, sel_test = default_val, default_test
    return {
        "seed": seed,
        "variants": variants,
        "selected": {
            "options": _options_label(changes) if changes else "the defaults",
            "val": sel_val,
            "test": sel_test,
        },
        "default_test": default_test,
    }


def tqdm_log(msg: str) -> None:
    """Print a line without breaking the progress bars (the protocols' default ``log``)."""
    from tqdm.auto import tqdm

    tqdm.write(msg)


def run_demo(cfg: DemoConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run the demo of ``cfg``; write results.md, results.json and the PNGs under ``cfg.out``; return the summary."""
    log = log or tqdm_log

    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = _Runner(cfg, log)
    log(
        f"famkd-losses demo: {cfg.detector.upper()} on {cfg.device} (loss backend {cfg.backend}), "
        f"{plural(torch.get_num_threads(), 'thread')}, "
        f"{'quick' if cfg.quick else 'default'} sizes, {cfg.seeds} seed(s) -> {out}"
    )

    t0 = time.perf_counter()
    splits = make_dataset(cfg.data)
    data_s = time.perf_counter() - t0
    data_stats = {name: _split_stats(s) for name, s in splits.items()}
    sizes = ", ".join(f"{n} {d['canvases']} canvases / {d['objects']} digits" for n, d in data_stats.items())
    log(f"data: {sizes} ({data_s:.1f} s)")

    probe_model = build_detector(runner.student_cfg)
    train_targets = [splits["train"].target(i) for i in range(len(splits["train"]))]
    positives = positives_per_level(probe_model, train_targets, cfg.data.canvas)
    log(
        "positive locations per level (train): "
        + ", ".join(f"{n} {v}" for n, v in zip(positives["levels"], positives["positive_locations"]))
        + f"; {positives['objects_without_positive']}/{positives['objects']} objects without one"
    )

    teacher, teacher_record = runner.load_teacher(splits["train"])
    teacher_eval = ("val", "test") if cfg.ablation else ("test",)
    teacher_metrics = {n: evaluate(teacher, splits[n], cfg.data.canvas, cfg.device) for n in teacher_eval}
    log(f"  teacher: AP {teacher_metrics['test']['AP']:.1f}  AP50 {teacher_metrics['test']['AP50']:.1f}")
    teacher_run = {
        "seed": cfg.seed,
        **teacher_record["train"],
        "metrics": teacher_metrics["test"],
        "curves": {"det_loss": teacher_record.get("det_loss", []), "kd_loss": []},
    }

    runs: dict[str, list[dict]] = {k: [] for k in ROW_ORDER if k != "teacher"}
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    for seed in seeds:
        log(f"seed {seed}:")
        runs["student"].append(runner.student_run("student", seed, splits, teacher, desc="student alone"))
        for key in METHODS:
            # the ablation scores FAMKD's defaults on val from this run
            both = cfg.ablation and seed == cfg.seed and key == "famkd"
            runs[key].append(
                runner.student_run(
                    key,
                    seed,
                    splits,
                    teacher,
                    eval_splits=("val", "test") if both else ("test",),
                    desc=METHODS[key].label,
                )
            )
        # The control's length: the slowest distilled run's step time over the plain student's, from
        # medians of per-iteration times in this run, so a slow spell of a shared machine during one
        # run skews neither.
        slowest_key = max(METHODS, key=lambda k: runs[k][-1]["median_step_s"])
        slowest, plain = runs[slowest_key][-1], runs["student"][-1]
        ratio = slowest["median_step_s"] / plain["median_step_s"]
        iters = max(cfg.student_iters, round(cfg.student_iters * ratio))
        control = runner.student_run(
            "student", seed, splits, teacher, iterations=iters, desc="student alone, equal wall time"
        )
        control["matched"] = {"run": slowest_key, "step_ratio": ratio, "wall_s": slowest["wall_s"]}
        runs["control"].append(control)

    labels = {
        "teacher": "teacher",
        "student": "student alone",
        **{k: m.label for k, m in METHODS.items()},
        "control": "student alone, wall time of slowest distilled",
    }
    rows = [_aggregate("teacher", labels["teacher"], "teacher", [teacher_run])]
    rows += [_aggregate(k, labels[k], "control" if k == "control" else "main", runs[k]) for k in runs]

    ablation = None
    if cfg.ablation:
        famkd0 = runs["famkd"][0]
        ablation = _ablation(runner, splits, teacher, famkd0["val"], famkd0["metrics"])

    t_plot = time.perf_counter()
    plot_training_curves(rows, out / "training_curves.png")
    plot_ap(rows, out / "ap_per_method.png")
    plot_positives(positives, out / "positives_per_level.png")
    attention_pngs = plot_attention(
        teacher,
        splits["test"],
        pick_example_images(splits["test"], cfg.attention_images),
        out,
        options=FAMKD_DEFAULTS,
        seed=cfg.seed,
        device=cfg.device,
    )
    plot_s = time.perf_counter() - t_plot

    teacher_ap = rows[0]["mean"]["AP"]
    student_ap = rows[1]["mean"]["AP"]
    summary = {
        "config": cfg.to_dict(),
        "device": f"{cfg.device} ({platform.processor() or platform.machine()}, "
        f"{plural(torch.get_num_threads(), 'thread')})",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "data": data_stats,
        "data_s": data_s,
        "area_ranges": AREA_RANGES,
        "positives": positives,
        "teacher": {
            "params": num_parameters(teacher),
            "fpn_channels": runner.teacher_cfg.backbone.fpn_channels,
            "cache": {k: v for k, v in teacher_record.items() if k != "det_loss"},
            "val": teacher_metrics.get("val"),
        },
        "student": {"params": num_parameters(probe_model), "fpn_channels": runner.student_cfg.backbone.fpn_channels},
        "teacher_student_gap_ap": teacher_ap - student_ap,
        "rows": rows,
        "ablation": ablation,
        "plots": [
            "training_curves.png",
            "ap_per_method.png",
            "positives_per_level.png",
            *[p.name for p in attention_pngs],
        ],
        "plot_s": plot_s,
    }
    summary["all_finite"] = all(finite_metrics(r["mean"]) for r in rows)
    summary["wall_s"] = time.perf_counter() - start
    markdown = results_markdown(summary)
    (out / "results.md").write_text(markdown)
    # the per-iteration curves go to their own file; results.json stays readable
    write_json(out / "curves.json", {r["key"]: [run.pop("curves") for run in r["runs"]] for r in rows})
    write_json(out / "results.json", summary)
    if teacher_ap - student_ap < 5.0:
        note = " (expected with --quick: too few iterations to train either)" if cfg.quick else ""
        log(f"WARNING: the teacher leads the student by only {teacher_ap - student_ap:.1f} AP (< 5){note}")
    return summary
