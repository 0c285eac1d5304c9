"""The plateau protocol: does distillation raise the AP a student reaches when trained to its plateau?

The main demo compares methods at a short schedule, where every student is still improving. Here
the teacher and every student are trained on one long schedule whose learning rate decays to zero
(AdamW, warm-up, cosine), with the val split scored at regular points, so that the curves show
where each run levels off:

- the teacher: ``teacher_iters`` iterations; it counts as trained to its plateau when its val AP
  gains less than ``plateau_tol`` AP over the last quarter of the schedule (the report says
  whether it did);
- every student run: ``student_iters`` iterations, the same check on the plain student;
- the student alone, + MGD and + FAMKD over ``seeds`` seeds (mean, std and the paired per-seed
  differences), + FGD over ``fgd_seeds`` seeds; then FAMKD's two main choices (``scales`` and
  ``branches``) re-checked at this schedule on the val split (first seed);
- optionally (``diagnosis``) where FAMKD's gain comes from: its two parts on their own, a decaying
  distillation weight, and a lighter logits term (first seed);
- optionally (``length``) the same runs at ``length_factor`` times the students' schedule over
  ``length_seeds`` seeds (FGD over ``fgd_seeds``): whether the plain student's ceiling is higher
  than the long schedule shows, and whether each method's gain survives a longer schedule.

The teacher is fixed and the canvases are not augmented, so its outputs on the training split
are computed once and reused by every distilled run (`TeacherCache`).

Results are written after every run (``results.md``, ``results.json``, ``val_ap_curves.png``), so a
run stopped part-way leaves what it measured; ``resume`` reuses the finished runs of an earlier
``results.json`` in the same folder (same sizes and schedule) instead of training them again.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import platform
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._validation import plural
from ..integrations.torchvision import DetectorOutputs, teacher_outputs
from .data import DataConfig, DetectionSplit, make_dataset
from .evaluate import METRICS, evaluate, mean_std
from .methods import FAMKD_DEFAULTS, METHODS
from .models import STUDENT, TEACHER, BackboneConfig, num_parameters
from .pipeline import DemoConfig, _Runner, default_cache_dir, tqdm_log
from .report import plot_val_curves, write_json

__all__ = ["PlateauConfig", "TeacherCache", "ABLATION", "DIAGNOSIS", "LENGTH", "MAIN", "plateau_gain", "run_plateau"]

# FAMKD's two main choices, re-checked at the long schedule (val split, first seed).
ABLATION: tuple[dict[str, Any], ...] = (
    {"scales": (1, 2, 4)},
    {"branches": ("spatial",)},
    {"branches": ("spatial", "channel")},
)
# Where FAMKD's gain at the plateau comes from (first seed): (method, kd_decay, term scales). A
# distillation weight calibrated at the start stays fixed while the detection loss falls; decaying it
# with the learning rate tests whether the late, relatively heavier term holds the student back. The
# two parts on their own say which carries the gain; a term scale (its start at that multiple of
# ``kd_fraction`` x the detection loss, the other terms unchanged) says whether a lighter logits term
# still costs accuracy or only too heavy a one does.
DIAGNOSIS: tuple[tuple[str, bool, dict[str, float] | None], ...] = (
    ("famkd", True, None),
    ("famkd_feature", False, None),
    ("famkd_logits", False, None),
    ("famkd_logits", False, {"logits": 0.1}),
    ("famkd", False, {"logits": 0.1}),
)
# The runs repeated at `length_factor` x the students' schedule (first seed); the plain student first.
LENGTH: tuple[str, ...] = ("student", "famkd", "mgd")
# The main part's runs over the seeds (FGD over the first `PlateauConfig.fgd_seeds` only, here and
# in the length part).
MAIN: tuple[str, ...] = ("student", "famkd", "mgd", "fgd")
# What must match for an earlier results.json's runs to be reused (`PlateauConfig.resume`).
_RESUME_KEYS = (
    "quick",
    "device",
    "backend",
    "teacher_iters",
    "student_iters",
    "eval_points",
    "batch_size",
    "warmup",
    "kd_fraction",
    "teacher",
    "student",
    "data",
    "famkd_options",
)


@dataclass
class PlateauConfig:
    """A plateau run; ``preset`` gives the default sizes and the ``--quick`` ones."""

    out: Path = Path("famkd_plateau_out")
    quick: bool = False
    seeds: int = 3
    fgd_seeds: int = 1
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    teacher_iters: int = 4000
    student_iters: int = 3000
    eval_points: int = 10  # val evaluations per run, evenly spaced
    batch_size: int = 16
    warmup: int = 50
    kd_fraction: float = 1.0
    plateau_tol: float = 0.5  # AP gained over the last quarter that still counts as a plateau
    main: bool = True  # `MAIN` (or `methods`) over the seeds, FGD over the first `fgd_seeds`
    methods: tuple[str, ...] | None = None  # the runs of the main and length parts instead of `MAIN`, `LENGTH`
    ablation: bool = True
    ablation_variants: int | None = None  # the first this many of `ABLATION` (None: all)
    ablation_factor: int = 1  # the ablation at this many x `student_iters` (`length_factor`: the length part's)
    diagnosis: bool = False  # the `DIAGNOSIS` runs (first seed)
    length: bool = False  # `LENGTH` (or `methods`) at `length_factor` x `student_iters`, FGD over `fgd_seeds`
    length_factor: int = 2
    length_seeds: int = 1  # the longer runs over the first this many seeds
    resume: bool = False  # reuse the finished runs of ``out/results.json``
    teacher: BackboneConfig = TEACHER
    student: BackboneConfig = STUDENT
    data: DataConfig = field(default_factory=DataConfig)
    cache_dir: Path = field(default_factory=default_cache_dir)
    progress: bool = True
    jobs: int = 1  # student runs trained at once, in forked processes sharing the torch threads

    @classmethod
    def preset(cls, quick: bool = False, **overrides: Any) -> PlateauConfig:
        base = cls()
        if quick:
            base = cls(
                quick=True,
                seeds=2,
                teacher_iters=80,
                student_iters=30,
                eval_points=2,
                batch_size=8,
                warmup=5,
                ablation_variants=1,
                data=DataConfig(num_canvases=(96, 32, 48)),
            )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def demo_config(self) -> DemoConfig:
        """The main demo's config with this run's sizes (what the shared training code reads)."""
        return DemoConfig(
            out=self.out,
            detector="fcos",
            quick=self.quick,
            seeds=self.seeds,
            seed=self.seed,
            device=self.device,
            backend=self.backend,
            kd_fraction=self.kd_fraction,
            teacher_iters=self.teacher_iters,
            student_iters=self.student_iters,
            batch_size=self.batch_size,
            warmup=self.warmup,
            data=self.data,
            cache_dir=self.cache_dir,
            progress=self.progress,
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"], d["cache_dir"] = str(self.out), str(self.cache_dir)
        d["famkd_options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in FAMKD_DEFAULTS.items()}
        return d


class TeacherCache:
    """The teacher's `DetectorOutputs` for every canvas of a split, computed once (eval mode, no graph).

    ``cache(idx)`` returns the outputs of canvases ``idx`` as `teacher_outputs` would give them
    for that batch (up to float rounding of a different batch size).
    """

    def __init__(self, teacher: torch.nn.Module, split: DetectionSplit, device: str, batch_size: int = 50) -> None:
        feats: list[list[Tensor]] = []
        logits: list[list[Tensor]] = []
        self.boxes: list[Tensor] = []
        for start in range(0, len(split), batch_size):
            idx = list(range(start, min(len(split), start + batch_size)))
            images, targets = split.batch(idx, device)
            out = teacher_outputs(teacher, images, targets)
            feats.append(out.features)
            logits.append(out.cls_logits)
            self.boxes += out.boxes
            self.image_size = out.image_size
        self.features = [torch.cat(level) for level in zip(*feats)]
        self.cls_logits = [torch.cat(level) for level in zip(*logits)]

    def __call__(self, idx: Sequence[int]) -> DetectorOutputs:
        rows = torch.as_tensor(list(idx), dtype=torch.long, device=self.features[0].device)
        return DetectorOutputs(
            [f.index_select(0, rows) for f in self.features],
            [c.index_select(0, rows) for c in self.cls_logits],
            self.image_size,
            [self.boxes[i] for i in idx],
        )


class _Planned(NamedTuple):
    """One run of the plan: what decides its result, and the part (``role``) it was planned in."""

    key: str
    seed: int
    role: str
    options: dict | None  # FAMKD options changed from the defaults
    kd_decay: bool
    iterations: int
    fractions: dict[str, float] | None = None  # per-term start fractions (None: ``kd_fraction`` each)


def plateau_gain(curve: Sequence[tuple[int, dict]], metric: str = "AP") -> float | None:
    """``metric`` gained over the last quarter of a run: the last point minus the curve at 3/4 of
    the last point's iteration (linear between the evaluation points around it)."""
    if len(curve) < 2:
        return None
    last_it, last = curve[-1]
    ref_it = 0.75 * last_it
    points = [(float(it), m[metric]) for it, m in curve]
    if ref_it <= points[0][0]:
        return last[metric] - points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= ref_it <= x1:
            return last[metric] - (y0 + (y1 - y0) * (ref_it - x0) / (x1 - x0))
    return None


def _label(
    key: str,
    options: dict | None,
    kd_decay: bool = False,
    iterations: int | None = None,
    fractions: dict[str, float] | None = None,
) -> str:
    """A run's name in tables and legends; ``iterations`` where it differs from the students' schedule,
    ``fractions`` where some term starts at another fraction of the detection loss than the rest."""
    base = "student alone" if key == "student" else METHODS[key].label
    if options:
        base += " (" + ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in options.items()) + ")"
    base += ", distillation weight decayed to 0 (cosine)" if kd_decay else ""
    if fractions:
        base += "".join(f", {name} term at {f:g} x the detection loss" for name, f in fractions.items())
    return base + (f", {iterations} iterations" if iterations else "")


def _term_fractions(key: str, scales: dict[str, float] | None, kd_fraction: float) -> dict[str, float] | None:
    """Every term's start fraction when ``scales`` changes some (None when it changes none)."""
    if not scales:
        return None
    return {name: kd_fraction * scales.get(name, 1.0) for name in METHODS[key].terms}


def _stats(runs: list[dict], split: str) -> dict[str, tuple[float, float]]:
    return {m: mean_std([r[split][m] for r in runs]) for m in METRICS}


def _paired(a: list[dict], b: list[dict]) -> dict | None:
    """Per-seed AP differences a - b on test, over the seeds both have."""
    by_seed = {r["seed"]: r for r in b}
    diffs = [(r["seed"], r["test"]["AP"] - by_seed[r["seed"]]["test"]["AP"]) for r in a if r["seed"] in by_seed]
    if not diffs:
        return None
    mean, std = mean_std([d for _, d in diffs])
    return {"per_seed": diffs, "mean": mean, "std": std}


def _aggregate(runs: list[dict], role: str) -> tuple[list[dict], dict]:
    """The runs of part ``role`` per method: mean ± std (test and val), plateau checks, and the
    paired differences of every distilled run against the student alone and of each FAMKD run
    against + MGD."""
    groups: dict[str, list[dict]] = {}
    for run in runs:
        if run["role"] == role:
            groups.setdefault(run["key"], []).append(run)
    rows = []
    for key, runs in groups.items():
        rows.append(
            {
                "key": key,
                "label": _label(key, None),
                "seeds": [r["seed"] for r in runs],
                "test": _stats(runs, "test"),
                "val": _stats(runs, "val"),
                "last_quarter_gain_val": [plateau_gain(r["eval_curve"]) for r in runs],
                "s_per_iter": sum(r["median_step_s"] for r in runs) / len(runs),
            }
        )
    paired = {}
    for key in (k for k in groups if k != "student"):
        for other in ("student", "mgd") if key.startswith("famkd") else ("student",):
            if other in groups:
                paired[f"{key} - {other}"] = _paired(groups[key], groups[other])
    return rows, paired


def summarise(cfg: PlateauConfig, state: dict) -> dict:
    """Tables of what has run so far: per method mean ± std (test and val), paired differences and
    plateau checks (main part and length part), the ablation, the diagnosis."""
    rows, paired = _aggregate(state["runs"], "main")
    length_rows, length_paired = _aggregate(state["runs"], "length")
    ablation = [
        {"options": r["options"], "label": r["label"], "val": r["val"], "iterations": r["iterations"]}
        for r in state["runs"]
        if r["role"] == "ablation"
    ]

    def entries(role: str) -> list[dict]:
        return [
            {
                "key": r["key"],
                "label": r["label"],
                "seed": r["seed"],
                "iterations": r["iterations"],
                "val": r["val"],
                "test": r["test"],
                "last_quarter_gain_val": plateau_gain(r.get("eval_curve", [])),
            }
            for r in state["runs"]
            if r["role"] == role
        ]

    # the main runs of the first seed: what the diagnosis and the longer runs are read against
    diagnosis, longer = entries("diagnosis"), entries("length")
    seeds = {e["seed"] for e in longer + diagnosis}
    keys = set(LENGTH) | {e["key"] for e in longer}
    reference = [e for e in entries("main") if e["seed"] in seeds and e["key"] in keys]
    return {
        "rows": rows,
        "paired": paired,
        "length_rows": length_rows,
        "length_paired": length_paired,
        "ablation": ablation,
        "reference": reference,
        "diagnosis": diagnosis,
        "length": longer,
    }


def _fmt(ms: tuple[float, float], n: int) -> str:
    mean, std = ms
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def results_markdown(cfg: PlateauConfig, state: dict, tables: dict) -> str:
    t = state["teacher"]
    lines = [
        "# famkd-losses plateau protocol (FCOS)",
        "",
    ]
    if cfg.quick:
        lines += [
            "**This is a `--quick` smoke run: a few iterations on tiny data. Its numbers are not evidence.**",
            "",
        ]
    lines += [
        f"Machine: {state['device']}; torch {state['versions']['torch']}. Data: {state['data']}.",
        f"Schedule: AdamW (lr 2e-3), {cfg.warmup}-iteration warm-up, cosine decay to zero; batch {cfg.batch_size}. "
        f"Teacher {cfg.teacher_iters} iterations, every student {cfg.student_iters} iterations "
        f"({cfg.student_iters * cfg.batch_size / state['train_canvases']:.1f} epochs). "
        f"Val AP scored {cfg.eval_points} times per run. Distillation weights: each term starts at "
        f"{cfg.kd_fraction:g} x the detection loss (calibrated on the first batch, as in the main demo).",
        "",
        "## Models and their plateaus",
        "",
        f"- Teacher: {t['params'] / 1e6:.2f} M parameters, FPN {cfg.teacher.fpn_channels}; val AP "
        f"{t['val']['AP']:.1f}, test AP {t['test']['AP']:.1f}; val AP gained over the last quarter of its "
        f"schedule: {_gain_text(t['last_quarter_gain_val'], cfg.plateau_tol)}.",
        f"- Student: {state['student_params'] / 1e6:.2f} M parameters, FPN {cfg.student.fpn_channels}.",
        "",
        "Stopping rule: a run counts as at its plateau when its val AP gains less than "
        f"{cfg.plateau_tol} AP over the last quarter of its decaying schedule.",
        "",
    ]
    if tables["length_rows"]:
        n_long = cfg.student_iters * cfg.length_factor
        lines += _aggregate_lines(
            tables["length_rows"],
            tables["length_paired"],
            f"{cfg.length_factor}x the students' schedule ({n_long} iterations)",
            t,
        )
    schedule = f"the students' schedule ({cfg.student_iters} iterations)"
    lines += _aggregate_lines(tables["rows"], tables["paired"], schedule, t)
    for iterations in sorted({a["iterations"] for a in tables["ablation"]}, reverse=True):
        # read against FAMKD with its defaults, same seed and schedule (from the main or the length part)
        famkd = next(
            (
                r
                for r in state["runs"]
                if r["role"] in ("main", "length")
                and r["key"] == "famkd"
                and r["seed"] == cfg.seed
                and r["iterations"] == iterations
            ),
            None,
        )
        lines += [
            f"## FAMKD's main choices at {iterations} iterations (val split, seed {cfg.seed})",
            "",
            "| FAMKD (both) | val AP | val AP50 | val APs | val APm | val APl |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        changed = [a for a in tables["ablation"] if a["iterations"] == iterations]
        for a in ([{"label": "defaults", "val": famkd["val"]}] if famkd else []) + changed:
            m = a["val"]
            lines.append(
                f"| {a['label']} | {m['AP']:.1f} | {m['AP50']:.1f} | {m['APs']:.1f} | {m['APm']:.1f} | {m['APl']:.1f} |"
            )
        lines.append("")
    sections = (
        ("diagnosis", "## Where the gain comes from (per run)"),
        ("length", f"## Every run at {cfg.length_factor}x the students' schedule, per seed"),
    )
    for role, heading in sections:
        runs = tables.get(role)
        if not runs:
            continue
        keys, seeds = {d["key"] for d in runs}, {d["seed"] for d in runs}
        # read against the main runs of the same seeds (for the longer runs: of the same methods)
        refs = [
            d
            for d in tables.get("reference", [])
            if d["seed"] in seeds and d["key"] in (keys if role == "length" else LENGTH)
        ]
        lines += [
            heading,
            "",
            "| run | seed | iterations | val AP | val AP gained over the last quarter | test AP | test AP50 | "
            "test APs | test APm | test APl |",
            "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for d in sorted(refs + runs, key=lambda d: d["seed"]):  # stable: each seed's main runs first
            v, m = d["val"], d["test"]
            lines.append(
                f"| {d['label']} | {d['seed']} | {d['iterations']} | {v['AP']:.1f} | "
                f"{_gain_text(d['last_quarter_gain_val'], cfg.plateau_tol)} | {m['AP']:.1f} | {m['AP50']:.1f} | "
                f"{m['APs']:.1f} | {m['APm']:.1f} | {m['APl']:.1f} |"
            )
        lines.append("")
    lines += [
        "## Val AP against iteration",
        "",
        "![val AP against iteration for every run](val_ap_curves.png)",
        "",
        f"Runs so far: {len(state['runs'])}; wall time {state['wall_s'] / 60:.1f} min.",
    ]
    return "\n".join(lines) + "\n"


def _aggregate_lines(rows: list[dict], paired: dict, schedule: str, teacher: dict) -> list[str]:
    """Markdown of `_aggregate`'s tables for one schedule: per method, then the paired differences."""
    if not rows:
        return []
    lines = [
        f"## Students at {schedule}: test split, mean ± sample std over seeds",
        "",
        "| run | seeds | test AP | AP50 | APs | APm | APl | val AP | val AP gained over the last quarter "
        "(per seed) | median s/it |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        n = len(r["seeds"])
        gains = ", ".join("n/a" if g is None else f"{g:+.1f}" for g in r["last_quarter_gain_val"])
        lines.append(
            f"| {r['label']} | {', '.join(map(str, r['seeds']))} | {_fmt(r['test']['AP'], n)} | "
            f"{_fmt(r['test']['AP50'], n)} | {_fmt(r['test']['APs'], n)} | {_fmt(r['test']['APm'], n)} | "
            f"{_fmt(r['test']['APl'], n)} | {_fmt(r['val']['AP'], n)} | {gains} | {r['s_per_iter']:.3f} |"
        )
    lines.append("")
    student = next((r for r in rows if r["key"] == "student"), None)
    if student is not None:
        gap_test = teacher["test"]["AP"] - student["test"]["AP"][0]
        gap_val = teacher["val"]["AP"] - student["val"]["AP"][0]
        lines += [f"Teacher - student gap at this schedule: {gap_test:.1f} AP on test, {gap_val:.1f} on val.", ""]
    if any(p is not None for p in paired.values()):
        lines += [f"Paired differences at {schedule}, test AP, same seed:", ""]
        lines += ["| difference | per seed | mean ± std |", "|---|---|---:|"]
        for name, p in paired.items():
            if p is None:
                continue
            per = ", ".join(f"seed {s}: {d:+.1f}" for s, d in p["per_seed"])
            spread = f" ± {p['std']:.1f}" if len(p["per_seed"]) > 1 else ""
            lines.append(f"| {name} | {per} | {p['mean']:+.1f}{spread} |")
        lines.append("")
    return lines


def _gain_text(gain: float | None, tol: float) -> str:
    if gain is None:
        return "n/a"
    return f"{gain:+.1f} AP ({'plateau' if gain < tol else 'NOT at its plateau'})"


_FORKED_RUN: Callable[..., dict] | None = None


def _forked_run(*item: Any) -> dict:
    assert _FORKED_RUN is not None, "run in a worker forked by run_plateau"
    return _FORKED_RUN(*item)


def run_plateau(cfg: PlateauConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run the plateau protocol of ``cfg``; write its tables, JSON and plot under ``cfg.out`` as it goes."""
    log = log or tqdm_log

    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = cfg.demo_config()
    runner = _Runner(demo, log, teacher_backbone=cfg.teacher, student_backbone=cfg.student)
    splits = make_dataset(cfg.data)
    canvas = cfg.data.canvas
    log(
        f"famkd-losses plateau protocol on {cfg.device}, {plural(torch.get_num_threads(), 'thread')}, "
        f"{'quick' if cfg.quick else 'default'} sizes -> {out}"
    )
    every = max(1, cfg.teacher_iters // cfg.eval_points)
    teacher, record = runner.load_teacher(
        splits["train"], eval_every=every, evaluator=lambda m: evaluate(m, splits["val"], canvas, cfg.device)
    )
    curve = record.get("eval_curve", [])
    t_val = curve[-1][1] if curve else evaluate(teacher, splits["val"], canvas, cfg.device)
    t_test = evaluate(teacher, splits["test"], canvas, cfg.device)
    state: dict[str, Any] = {
        "config": cfg.to_dict(),
        "device": f"{cfg.device} ({platform.processor() or platform.machine()}, "
        f"{plural(torch.get_num_threads(), 'thread')})",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "data": ", ".join(f"{n} {len(s)} canvases / {s.num_objects()} digits" for n, s in splits.items()),
        "train_canvases": len(splits["train"]),
        "teacher": {
            "params": num_parameters(teacher),
            "val": t_val,
            "test": t_test,
            "eval_curve": record.get("eval_curve", []),
            "last_quarter_gain_val": plateau_gain(record.get("eval_curve", [])),
            "cache": {k: v for k, v in record.items() if k not in ("det_loss", "eval_curve")},
        },
        "student_params": 0,
        "runs": [],
        "wall_s": 0.0,
    }
    log(f"  teacher: val AP {t_val['AP']:.1f}, test AP {t_test['AP']:.1f}")
    cache = TeacherCache(teacher, splits["train"], cfg.device)

    def one(
        key: str,
        seed: int,
        role: str,
        options: dict | None,
        kd_decay: bool,
        iterations: int,
        fractions: dict[str, float] | None = None,
    ) -> dict:
        if cfg.jobs > 1:
            torch.set_num_threads(max(1, threads // cfg.jobs))
        label = _label(key, options, kd_decay, None if iterations == cfg.student_iters else iterations, fractions)
        run = runner.student_run(
            key,
            seed,
            splits,
            teacher,
            iterations=iterations,
            options=options,
            eval_splits=("val", "test"),
            desc=f"{label} (seed {seed})",
            eval_every=max(1, iterations // cfg.eval_points),
            teacher_cache=cache,
            kd_decay=kd_decay,
            fraction=fractions,
        )
        run.pop("curves")
        run["test"] = run.pop("metrics")
        run.update(key=key, role=role, options=options or {}, kd_decay=kd_decay, label=label)
        if fractions:
            run["fractions"] = fractions
        return run

    threads = torch.get_num_threads()
    state["student_params"] = num_parameters(runner.build_student())
    plan = _plan(cfg)
    earlier, earlier_wall = _earlier_runs(cfg, state) if cfg.resume else ([], 0.0)
    done = _reuse(plan, earlier)
    if earlier:
        log(f"  resumed {plural(len(earlier), 'finished run')} from {out / 'results.json'}")
    # the longest runs first: with several jobs, the last to finish is then a short one
    todo = sorted(((i, item) for i, item in enumerate(plan) if i not in done), key=lambda t: -t[1].iterations)

    def record(i: int | None = None, run: dict | None = None) -> dict:
        if i is not None:
            done[i] = run
        state["runs"] = [done[k] for k in sorted(done)]  # in plan order, whatever finished first
        state["wall_s"] = earlier_wall + time.perf_counter() - start
        return _write(cfg, state)

    if cfg.jobs <= 1:
        for i, item in todo:
            record(i, one(*item))
    else:
        # forked workers inherit the data, the teacher and its cache; each trains one run at a time
        global _FORKED_RUN
        _FORKED_RUN = one  # a closure cannot be pickled; forked workers find it here
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_forked_run, *item): i for i, item in todo}
            for fut in as_completed(futures):
                record(futures[fut], fut.result())
    return record()


def _plan(cfg: PlateauConfig) -> list[_Planned]:
    """Every run ``cfg`` asks for, part by part, in report order."""
    n = cfg.student_iters

    def methods(keys: Sequence[str], seed_index: int) -> list[str]:
        return [key for key in keys if key != "fgd" or seed_index < cfg.fgd_seeds]  # FGD: its first seeds only

    plan: list[_Planned] = []
    for i, seed in enumerate(cfg.seed + k for k in range(cfg.seeds) if cfg.main):
        plan += [_Planned(key, seed, "main", None, False, n) for key in methods(cfg.methods or MAIN, i)]
    if cfg.ablation:
        changes = ABLATION[: cfg.ablation_variants]
        n_ablation = n * cfg.ablation_factor
        plan += [_Planned("famkd", cfg.seed, "ablation", change, False, n_ablation) for change in changes]
    if cfg.diagnosis:
        plan += [
            _Planned(key, cfg.seed, "diagnosis", None, decay, n, _term_fractions(key, scales, cfg.kd_fraction))
            for key, decay, scales in DIAGNOSIS
        ]
    if cfg.length:
        for i, seed in enumerate(range(cfg.seed, cfg.seed + cfg.length_seeds)):
            n_long = n * cfg.length_factor
            plan += [_Planned(key, seed, "length", None, False, n_long) for key in methods(cfg.methods or LENGTH, i)]
    return plan


def _plan_item(run: dict) -> _Planned:
    """The plan entry a finished run answers (options as the plan spells them: tuples)."""
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in run["options"].items()} or None
    return _Planned(
        run["key"],
        run["seed"],
        run["role"],
        options,
        run.get("kd_decay", False),
        run["iterations"],
        run.get("fractions"),
    )


def _reuse(plan: list[_Planned], earlier: list[dict]) -> dict[int, dict]:
    """The finished runs by plan slot: an earlier run fills the slot planned for it, or one planned
    for the same run under another part (a copy with that part's role); the earlier runs that no
    slot takes are kept, before the plan (negative slots)."""
    done: dict[int, dict] = {}
    for j, run in enumerate(earlier):
        item = _plan_item(run)
        done[plan.index(item) if item in plan else j - len(earlier)] = run
    for i, item in enumerate(plan):
        same = [r for r in earlier if _identity(_plan_item(r)) == _identity(item)]
        if i not in done and same:
            done[i] = {**same[0], "role": item[2]}
    return done


def _identity(item: _Planned) -> tuple:
    """What decides a run's result: its plan entry without the part (role) it was planned in."""
    return item._replace(role="")


def _earlier_runs(cfg: PlateauConfig, state: dict) -> tuple[list[dict], float]:
    """The runs and wall time of ``cfg.out/results.json`` when its sizes and schedule are this
    run's (an error when they are not; nothing when there is no such file)."""
    path = Path(cfg.out) / "results.json"
    if not path.is_file():
        return [], 0.0
    earlier = json.loads(path.read_text())
    theirs, ours = earlier.get("config", {}), json.loads(json.dumps(state["config"]))
    changed = [k for k in _RESUME_KEYS if theirs.get(k) != ours.get(k)]
    if changed:
        raise ValueError(
            f"resume: {path} was written with other settings ({', '.join(changed)} differ); "
            "use another --out or drop --resume to start afresh"
        )
    return list(earlier.get("runs", [])), float(earlier.get("wall_s", 0.0))


def _write(cfg: PlateauConfig, state: dict) -> dict:
    out = Path(cfg.out)
    tables = summarise(cfg, state)
    summary = {**state, "tables": tables}
    (out / "results.md").write_text(results_markdown(cfg, state, tables))
    write_json(out / "results.json", summary)
    curves = [("teacher", "teacher", state["teacher"]["eval_curve"], "")]
    curves += [(r["key"], r["label"], r["eval_curve"], r["role"]) for r in state["runs"] if r.get("eval_curve")]
    plot_val_curves(curves, out / "val_ap_curves.png", title=_plot_title(cfg, state))
    return summary


def _plot_title(cfg: PlateauConfig, state: dict) -> str:
    quick = " (quick smoke run, not evidence)" if cfg.quick else ""
    schedules = " and ".join(map(str, sorted({r["iterations"] for r in state["runs"]} or {cfg.student_iters})))
    seeds = ", ".join(map(str, sorted({r["seed"] for r in state["runs"]}))) or "-"
    return (
        f"FCOS on digit canvases: val AP during training{quick}\n"
        f"students {schedules} it (seeds {seeds}; the legend names each run's schedule), "
        f"teacher {cfg.teacher_iters} it, cosine to 0; {state['device']}"
    )
