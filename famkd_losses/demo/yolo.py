"""The YOLO protocol: ultralytics' own trainer, its built-in distillation, and this package's losses in it.

Every run is ``YOLO(student_yaml).train(...)`` on the demo's digit canvases written as a YOLO
dataset (`famkd_losses.demo.yolo_data`), with one set of training settings (`TRAIN_ARGS`), so
that at equal epochs only the distillation differs:

- the student alone;
- ultralytics' built-in distillation exactly as its documentation runs it:
  ``train(..., distill_model=teacher_weights)``, its default loss and ``dis``;
- + FAMKD through `famkd_losses.integrations.ultralytics.FAMKDTrainer`, + MGD and + CWD through
  ``distillation_trainer(loss)`` (`famkd_losses.demo.yolo_losses`);
- the student alone for the epochs that take the slowest distilled run's time (equal wall time).

The teacher (`famkd_losses.demo.yolo_models`) is trained once through the same trainer and cached
under the cache folder, keyed by a hash of everything that shapes it. Each run is scored on the test
split twice: COCO AP with pycocotools exactly as the FCOS demo computes it
(`famkd_losses.demo.evaluate.coco_metrics`, the same size ranges), from the final weights'
predictions; and ultralytics' own mAP50-95 (its validator on the test split). ``results.md``,
``results.json`` and ``ap_per_method.png`` are rewritten after every run, so a stopped run leaves
what it measured. ultralytics' run folders go under the output folder (students) and the cache
folder (the teacher), never the working directory.

Nothing is downloaded: ultralytics runs offline (``YOLO_OFFLINE=1``) with its settings in the
cache folder (unless ``YOLO_CONFIG_DIR`` is set), AMP is off (its check would fetch weights), and
the font its dataset check wants is a local copy of matplotlib's DejaVu Sans.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .data import DataConfig, DetectionSplit, make_dataset
from .evaluate import coco_ground_truth, coco_metrics, finite_metrics
from .pipeline import default_cache_dir, tqdm_log
from .report import write_json
from .train import config_hash
from .yolo_data import image_paths, write_yolo_dataset, yolo_dataset_dir
from .yolo_losses import FEATURES_ONLY, KD_WEIGHTS, LOSS_TERMS, builtin_probe, calibrated_loss, probe_batch
from .yolo_models import YOLO_STUDENT, YOLO_TEACHER, YoloModelSpec, write_model_yaml
from .yolo_report import LABELS, _epochs, paired, plot_ap, results_markdown, seeds_text

__all__ = ["TRAIN_ARGS", "YoloConfig", "run_yolo", "evaluate_weights"]

CACHE_VERSION = 1

# ultralytics' defaults except these, the same for every run (teacher included). For a schedule this
# short its optimizer="auto" picks AdamW at lr 7.1e-4 with a gradient step every 64 images (nbs) and
# warms up for min(3, epochs - 1) epochs: a 2-epoch student would take 94 steps, half of them in
# warm-up. Here: AdamW at 2e-3 (the FCOS demo's rate), a step per batch (nbs = batch: 376 steps in
# 2 epochs), half an epoch of warm-up with the bias lr rising from 0 (as "auto" sets it), then
# ultralytics' linear decay to lrf = 0.01. Digits are not mirror symmetric: no horizontal flips.
# Mosaic: ultralytics' close_mosaic=10 turns it off for runs of at most 10 epochs (all the default ones).
TRAIN_ARGS: dict[str, Any] = {
    "optimizer": "AdamW",
    "lr0": 0.002,
    "warmup_epochs": 0.5,
    "warmup_bias_lr": 0.0,
    "fliplr": 0.0,
}
# How the runs execute (no effect on what is learned beyond determinism): CPU-friendly and offline.
_RUN_ARGS: dict[str, Any] = {"amp": False, "plots": False, "val": False, "cache": False, "verbose": False}


@dataclass
class YoloConfig:
    """A YOLO protocol run; ``preset`` gives the default sizes and the ``--quick`` ones (a smoke run, under
    2 minutes).

    Default sizes. Epoch times on 2 CPU cores (one torch thread, 3,000 training canvases) differ about 2x
    between machines: the teacher's 40 to 69 s, the student alone 22 to 42, + built-in 33 to 61, + FAMKD
    41 to 71, + MGD 38 to 68, + CWD 31 to 65. The whole protocol (the teacher's 10 epochs once, 3 seeds x
    6 student runs x 2 epochs, the control, the evaluations) took 31 minutes on the faster machine (the
    teacher 7 of them), so about an hour on the slower.
    """

    out: Path = Path("famkd_yolo_out")
    quick: bool = False
    seeds: int = 3  # student alone, + built-in, + FAMKD
    extra_seeds: int = 3  # + FAMKD feature part, + MGD, + CWD (the first this many seeds)
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"
    teacher_epochs: int = 10
    student_epochs: int = 2
    batch_size: int = 16
    kd_weights: str = "calibrated"  # or "defaults": the package's default weights
    kd_fraction: float = 1.0
    control: bool = True
    conf: float = 0.001
    max_det: int = 100
    workers: int = 0
    teacher: YoloModelSpec = YOLO_TEACHER
    student: YoloModelSpec = YOLO_STUDENT
    data: DataConfig = field(default_factory=DataConfig)
    cache_dir: Path = field(default_factory=default_cache_dir)
    progress: bool = True

    @classmethod
    def preset(cls, quick: bool = False, **overrides: Any) -> YoloConfig:
        base = cls()
        if quick:
            base = cls(
                quick=True,
                seeds=2,
                extra_seeds=1,
                teacher_epochs=2,
                student_epochs=1,
                batch_size=8,
                data=DataConfig(num_canvases=(64, 16, 32)),
            )
        cfg = replace(base, **{k: v for k, v in overrides.items() if v is not None})
        if cfg.kd_weights not in KD_WEIGHTS:
            raise ValueError(f"kd_weights must be one of {KD_WEIGHTS}, got {cfg.kd_weights!r}")
        for name in ("seeds", "teacher_epochs", "student_epochs", "batch_size"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
        return cfg

    def train_args(self) -> dict[str, Any]:
        """The ultralytics ``train()`` arguments every run shares."""
        return {
            **TRAIN_ARGS,
            "imgsz": self.data.canvas,
            "batch": self.batch_size,
            "nbs": self.batch_size,
            "workers": self.workers,
            "device": self.device,
        }

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"], d["cache_dir"] = str(self.out), str(self.cache_dir)
        return d


def _offline(cfg: YoloConfig) -> None:
    """ultralytics offline, its settings in the cache folder; set before ultralytics is first imported."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(cfg.cache_dir) / "ultralytics-settings"))
    if not cfg.progress:
        os.environ.setdefault("YOLO_VERBOSE", "False")


def _local_font() -> None:
    """ultralytics' dataset check wants Arial.ttf in its settings folder and downloads it otherwise."""
    from matplotlib import font_manager
    from ultralytics.utils import USER_CONFIG_DIR

    target = Path(USER_CONFIG_DIR) / "Arial.ttf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(font_manager.findfont("DejaVu Sans"), target)


class _EpochTimer:
    """Wall and process CPU seconds of each epoch's training loop (ultralytics callbacks)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def start(self, _trainer: Any) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def end(self, _trainer: Any) -> None:
        self.wall.append(time.perf_counter() - self._start[0])
        self.cpu.append(time.process_time() - self._start[1])


def _train(
    cfg: YoloConfig,
    model_yaml: Path,
    data_yaml: Path,
    *,
    epochs: int,
    seed: int,
    project: Path,
    name: str,
    **extra: Any,
) -> dict:
    """One ``YOLO(model_yaml).train(...)``; returns the final weights' path and the timings."""
    from ultralytics import YOLO

    yolo = YOLO(str(model_yaml))
    timer = _EpochTimer()
    yolo.add_callback("on_train_epoch_start", timer.start)
    yolo.add_callback("on_train_epoch_end", timer.end)
    t0 = time.perf_counter()
    yolo.train(
        data=str(data_yaml),
        epochs=epochs,
        seed=seed,
        project=str(project),
        name=name,
        exist_ok=True,
        **cfg.train_args(),
        **_RUN_ARGS,
        **extra,
    )
    trainer = yolo.trainer
    return {
        "weights": str(trainer.last),
        "epochs": epochs,
        "train_s": time.perf_counter() - t0,
        "epoch_s": timer.wall,
        "epoch_cpu_s": timer.cpu,
        "median_epoch_s": statistics.median(timer.wall),
        "median_epoch_cpu_s": statistics.median(timer.cpu),
        "final_train_losses": {k: float(v.sum()) for k, v in (trainer.tloss or {}).items()},
        "torch_threads": torch.get_num_threads(),
    }


def evaluate_weights(
    weights: str | Path,
    split: DetectionSplit,
    files: list[Path],
    data_yaml: Path,
    cfg: YoloConfig,
    *,
    project: Path,
    name: str,
) -> tuple[dict[str, float], dict[str, float]]:
    """COCO metrics of ``weights`` on ``split`` (its canvases ``files``) and ultralytics' val of the test split.

    The COCO side: ultralytics' predictions (conf >= ``cfg.conf``, at most ``cfg.max_det`` per image)
    as COCO detections (category = class + 1, xywh boxes in canvas pixels), scored by `coco_metrics`
    against `coco_ground_truth`, as the FCOS demo does. The ultralytics side: ``mAP50-95`` and
    ``mAP50`` in percent from ``YOLO(weights).val(split="test")`` with its defaults.
    """
    from ultralytics import YOLO

    side = cfg.data.canvas
    model = YOLO(str(weights))
    detections: list[dict] = []
    chunk = 64
    for start in range(0, len(files), chunk):
        batch = [str(p) for p in files[start : start + chunk]]
        results = model.predict(
            batch, imgsz=side, conf=cfg.conf, max_det=cfg.max_det, device=cfg.device, batch=len(batch), verbose=False
        )
        for i, res in enumerate(results, start=start):
            boxes = res.boxes
            for (x1, y1, x2, y2), score, cls in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist()):
                detections.append(
                    {"image_id": i, "category_id": int(cls) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
                )
    gt = coco_ground_truth(split.boxes, split.labels, side)
    coco = coco_metrics(gt, detections)
    val = YOLO(str(weights)).val(
        data=str(data_yaml),
        split="test",
        imgsz=side,
        batch=cfg.batch_size,
        device=cfg.device,
        plots=False,
        verbose=False,
        project=str(project),
        name=name,
        exist_ok=True,
    )
    ultra = {"mAP50-95": 100.0 * float(val.box.map), "mAP50": 100.0 * float(val.box.map50)}
    return coco, ultra


def _teacher(cfg: YoloConfig, model_yaml: Path, data_yaml: Path, log: Callable[[str], None]) -> tuple[Path, dict]:
    """The cached teacher weights of ``cfg`` (trained now if not cached) and their training record."""
    import ultralytics

    key = config_hash(
        {
            "version": CACHE_VERSION,
            "ultralytics": ultralytics.__version__,
            "data": cfg.data.to_dict(),
            "model": cfg.teacher.to_dict(),
            "epochs": cfg.teacher_epochs,
            "seed": cfg.seed,
            "train_args": {k: v for k, v in cfg.train_args().items() if k != "workers"},
            "device": cfg.device.split(":")[0],
        }
    )
    path = Path(cfg.cache_dir) / f"yolo-teacher-{key}.pt"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        record = json.loads(meta.read_text())
        log(f"teacher: loaded from cache {path} (trained in {record['train_s']:.0f} s)")
        return path, {**record, "cached": True, "hash": key, "path": str(path)}
    log(f"teacher: training {cfg.teacher.name} for {cfg.teacher_epochs} epochs (cache key {key})")
    record = _train(
        cfg,
        model_yaml,
        data_yaml,
        epochs=cfg.teacher_epochs,
        seed=cfg.seed,
        project=Path(cfg.cache_dir) / "yolo-runs",
        name=f"teacher-{key}",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    shutil.copy(record["weights"], tmp)
    tmp.replace(path)
    meta.write_text(json.dumps(record, indent=2))
    return path, {**record, "cached": False, "hash": key, "path": str(path)}


def _student_probe(cfg: YoloConfig, model_yaml: Path, seed: int) -> torch.nn.Module:
    """A fresh student with ultralytics' hyper-parameters attached (what its detection loss reads)."""
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = DetectionModel(str(model_yaml), nc=cfg.student.nc, verbose=False).to(cfg.device)
    model.args = get_cfg(overrides={**TRAIN_ARGS, "imgsz": cfg.data.canvas, "batch": cfg.batch_size})
    return model


def _num_parameters(weights: Path) -> int:
    from ultralytics.nn.tasks import load_checkpoint

    return sum(p.numel() for p in load_checkpoint(weights)[0].parameters())


def _versions() -> dict[str, str]:
    import ultralytics

    from .. import __version__

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ultralytics": ultralytics.__version__,
        "famkd-losses": __version__,
    }


def run_yolo(cfg: YoloConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run the YOLO protocol of ``cfg``; write results.md, results.json and ap_per_method.png under
    ``cfg.out`` after every run; return the final state."""
    log = log or tqdm_log

    _offline(cfg)
    start = time.perf_counter()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = out / "runs"
    log(f"famkd-losses YOLO protocol on {cfg.device}, {'quick' if cfg.quick else 'default'} sizes -> {out}")

    from ultralytics.nn.tasks import load_checkpoint

    from ..integrations.ultralytics import distillation_trainer

    _local_font()
    splits = make_dataset(cfg.data)
    data_yaml = write_yolo_dataset(splits, cfg.data, cfg.cache_dir)
    root = yolo_dataset_dir(cfg.data, cfg.cache_dir)
    test_files = image_paths(root, "test", len(splits["test"]))
    models_dir = Path(cfg.cache_dir) / "yolo-models"
    teacher_yaml = write_model_yaml(cfg.teacher, models_dir)
    student_yaml = write_model_yaml(cfg.student, models_dir)
    log(f"data: {data_yaml}")

    teacher_pt, teacher_record = _teacher(cfg, teacher_yaml, data_yaml, log)
    t_coco, t_ultra = evaluate_weights(
        teacher_pt, splits["test"], test_files, data_yaml, cfg, project=runs_dir, name="teacher-test"
    )
    log(f"  teacher: test AP {t_coco['AP']:.1f} (ultralytics mAP50-95 {t_ultra['mAP50-95']:.1f})")

    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    probe = probe_batch(splits["train"], cfg.batch_size)
    teacher_model = load_checkpoint(teacher_pt)[0].to(cfg.device).eval()
    student0 = _student_probe(cfg, student_yaml, cfg.seed)
    s_channels = [int(m.shape[1]) for m in _neck(student0, probe, cfg.device)]
    t_channels = [int(m.shape[1]) for m in _neck(teacher_model, probe, cfg.device)]
    builtin_call = f"YOLO(student_yaml).train(data=..., epochs={cfg.student_epochs}, distill_model='{teacher_pt.name}')"
    state: dict[str, Any] = {
        "config": cfg.to_dict(),
        "train_args": cfg.train_args(),
        "train_args_text": ", ".join(f"{k}={v}" for k, v in cfg.train_args().items())
        + "; "
        + ", ".join(f"{k}={v}" for k, v in _RUN_ARGS.items())
        + "; everything else ultralytics' default",
        "machine": f"{cfg.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)",
        "versions": _versions(),
        "data_text": ", ".join(f"{n} {len(s)} canvases / {s.num_objects()} digits" for n, s in splits.items()),
        "data_yaml": str(data_yaml),
        "models": {
            "teacher": {"name": cfg.teacher.name, "params": _num_parameters(teacher_pt), "channels": t_channels},
            "student": {
                "name": cfg.student.name,
                "params": sum(p.numel() for p in student0.parameters()),
                "channels": s_channels,
            },
        },
        "teacher": teacher_record,
        "teacher_run": {
            "key": "teacher",
            "seed": cfg.seed,
            "epochs": cfg.teacher_epochs,
            "train_s": teacher_record["train_s"],
            "median_epoch_s": teacher_record["median_epoch_s"],
            "median_epoch_cpu_s": teacher_record["median_epoch_cpu_s"],
            "test": t_coco,
            "ultralytics_test": t_ultra,
        },
        "seeds": seeds,
        "builtin_call": builtin_call,
        "builtin_dis": None,
        "builtin_probe": None,
        "calibration": {},
        "weights_text": _weights_text(cfg),
        "runs": [],
        "paired": {},
        "control_match": None,
        "wall_s": 0.0,
    }
    state["versions_text"] = ", ".join(f"{k} {v}" for k, v in state["versions"].items())
    if cfg.device == "cpu":
        from ultralytics.utils import NUM_THREADS

        state["machine"] += f", ultralytics trains with {NUM_THREADS} torch thread{'s' if NUM_THREADS > 1 else ''}"
    bp = builtin_probe(_student_probe(cfg, student_yaml, cfg.seed), str(teacher_pt), probe)
    state["builtin_probe"], state["builtin_dis"] = bp, bp["dis"]

    def one(key: str, seed: int, epochs: int | None = None) -> dict:
        epochs = epochs or cfg.student_epochs
        name = f"{key}-seed{seed}"
        extra: dict[str, Any] = {}
        if key == "builtin":
            extra["distill_model"] = str(teacher_pt)
        elif key in LOSS_TERMS:
            loss, record = calibrated_loss(
                key,
                _student_probe(cfg, student_yaml, seed),
                teacher_model,
                probe,
                kd_weights=cfg.kd_weights,
                fraction=cfg.kd_fraction,
                seed=seed,
                backend=cfg.backend,
            )
            if seed == seeds[0]:
                state["calibration"][key] = record
            # a FAMKDTrainer subclass bound to this loss module
            trainer = distillation_trainer(loss, logits=key not in FEATURES_ONLY)
            extra.update(trainer=trainer, distill_model=str(teacher_pt))
        log(f"{LABELS[key]} (seed {seed}, {epochs} epochs)")
        run = _train(cfg, student_yaml, data_yaml, epochs=epochs, seed=seed, project=runs_dir, name=name, **extra)
        coco, ultra = evaluate_weights(
            run["weights"], splits["test"], test_files, data_yaml, cfg, project=runs_dir, name=f"{name}-test"
        )
        run.update(key=key, seed=seed, test=coco, ultralytics_test=ultra)
        state["runs"].append(run)
        log(
            f"  {LABELS[key]} (seed {seed}): {run['train_s']:.0f} s, {run['median_epoch_s']:.1f} s/epoch; "
            f"test AP {coco['AP']:.1f}, ultralytics mAP50-95 {ultra['mAP50-95']:.1f}"
        )
        _write(cfg, state, start)
        return run

    for i, seed in enumerate(seeds):
        for key in ("student", "builtin", "famkd"):
            one(key, seed)
        if i < cfg.extra_seeds:
            for key in ("famkd_feature", "mgd", "cwd"):
                one(key, seed)
        if i == 0 and cfg.control:
            first = {r["key"]: r for r in state["runs"] if r["seed"] == seed}
            distilled = [k for k in ("builtin", *LOSS_TERMS) if k in first]
            cost = _epoch_cost(cfg)
            slowest = max(distilled, key=lambda k: first[k][cost])
            ratio = first[slowest][cost] / first["student"][cost]
            epochs = max(cfg.student_epochs, round(cfg.student_epochs * ratio))
            state["control_match"] = {"run": slowest, "epoch_ratio": ratio, "epochs": epochs, "timing": cost}
            one("control", seed, epochs)
    return _write(cfg, state, start)


def _epoch_cost(cfg: YoloConfig) -> str:
    """What the equal-wall-time control matches: on CPU the median epoch's process CPU time (ultralytics trains
    with one torch thread on 2 cores and the data load in the process with ``workers=0``, so it is the wall
    time of an unshared machine, and a busy spell of a shared one does not skew it); elsewhere the wall time."""
    return "median_epoch_cpu_s" if cfg.device == "cpu" and cfg.workers == 0 else "median_epoch_s"


def _neck(model: torch.nn.Module, batch: dict, device: str) -> list[torch.Tensor]:
    """The features the Detect head of ``model`` reads on ``batch``'s images (eval mode)."""
    from ..integrations.ultralytics import yolo_outputs

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return yolo_outputs(model(batch["img"].to(device))).features
    finally:
        model.train(was_training)


def _weights_text(cfg: YoloConfig) -> str:
    if cfg.kd_weights == "calibrated":
        return (
            "calibrated: each term of FAMKD (feature, logits), its feature part alone, MGD and CWD starts at "
            f"{cfg.kd_fraction:g} x the student's detection loss on the first training batch "
            "(`famkd_losses.calibration.calibrate_weights`, the FCOS demo's rule); ultralytics' built-in keeps "
            "its own default `dis` (where it starts on that batch is measured below)."
        )
    return "the package's default weights of FAMKDLoss, MGDLoss and CWDLoss; ultralytics' built-in its default `dis`."


def _write(cfg: YoloConfig, state: dict, start: float) -> dict:
    out = Path(cfg.out)
    state["wall_s"] = time.perf_counter() - start
    state["paired"] = {
        f"{a} - {b}": paired(state["runs"], a, b)
        for a, b in (
            ("famkd", "student"),
            ("famkd", "builtin"),
            ("famkd", "famkd_feature"),
            ("famkd_feature", "student"),
            ("famkd", "mgd"),
            ("famkd", "cwd"),
            ("builtin", "student"),
            ("mgd", "student"),
            ("cwd", "student"),
        )
    }
    runs = [*state["runs"], state["teacher_run"]]
    state["all_finite"] = all(finite_metrics(r["test"]) and finite_metrics(r["ultralytics_test"]) for r in runs)
    (out / "results.md").write_text(results_markdown(state))
    write_json(out / "results.json", state)
    plot_ap(state, out / "ap_per_method.png", title=_plot_title(cfg, state))
    return state


def _plot_title(cfg: YoloConfig, state: dict) -> str:
    quick = " (quick smoke run, not evidence)" if cfg.quick else ""
    return (
        f"YOLOv8 on digit canvases through ultralytics' trainer: COCO AP on the test split{quick}\n"
        f"students {_epochs(cfg.student_epochs)}, teacher {_epochs(cfg.teacher_epochs)}; seeds "
        f"{seeds_text(state['seeds'], cfg.extra_seeds, short=True)}; {state['machine']}"
    )
