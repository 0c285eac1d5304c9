"""Training loops: the teacher (cached on disk), the student alone, the student with a distiller.

Every run of one seed sees the same batches in the same order (`data.batch_order`),
starts from the same student weights (the student is built right after
``torch.manual_seed(seed)``) and follows the same schedule: AdamW, linear warm-up, then
cosine decay to zero at the last iteration, gradients clipped to a norm of 10. The only
difference between the rows of the main table is the distillation term.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..integrations.torchvision import DetectorOutputs, StudentTaps, teacher_outputs
from .data import DataConfig, DetectionSplit, batch_order
from .methods import Distiller
from .models import DetectorConfig, build_detector

# Part of the teacher cache key: bump it when a change to the demo's code (not its configs)
# changes what a teacher config trains, so that stale teachers are not loaded.
CACHE_VERSION = 1

__all__ = [
    "CACHE_VERSION",
    "TrainConfig",
    "TrainResult",
    "train",
    "probe_batch",
    "config_hash",
    "load_or_train_teacher",
]


@dataclass(frozen=True)
class TrainConfig:
    iterations: int
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    clip_norm: float = 10.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    iterations: int
    wall_s: float
    det_loss: list[float] = field(default_factory=list)  # per iteration
    kd_loss: list[float] = field(default_factory=list)  # per iteration (empty without a distiller)
    kd_terms: dict[str, list[float]] = field(default_factory=dict)
    step_s: list[float] = field(default_factory=list)  # wall time of each iteration
    # (iteration, metrics) at each evaluation point of `train(..., eval_every=, evaluator=)`
    eval_curve: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    eval_s: float = 0.0  # time spent in those evaluations (not in wall_s)

    @property
    def s_per_iter(self) -> float:
        return self.wall_s / max(1, self.iterations)

    @property
    def median_step_s(self) -> float:
        """Median iteration time: what a step costs, robust to a slow spell of a shared machine."""
        return statistics.median(self.step_s) if self.step_s else self.s_per_iter

    def summary(self) -> dict:
        return {
            "iterations": self.iterations,
            "wall_s": self.wall_s,
            "s_per_iter": self.s_per_iter,
            "median_step_s": self.median_step_s,
        }


def _schedule(cfg: TrainConfig, iterations: int) -> Callable[[int], float]:
    warmup = min(cfg.warmup, max(1, iterations // 5))

    def factor(step: int) -> float:
        if step < warmup:
            return 0.1 + 0.9 * step / warmup
        progress = (step - warmup) / max(1, iterations - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def probe_batch(
    student: nn.Module, teacher: nn.Module, split: DetectionSplit, cfg: TrainConfig, device: str
) -> Callable[[], tuple[DetectorOutputs, DetectorOutputs, Tensor]]:
    """``probe()`` for `methods.build_distiller`: the student's and teacher's outputs and the
    detection loss on the first training batch. The student's state (BatchNorm running statistics
    included) is restored afterwards, so probing leaves it exactly as built."""

    def probe() -> tuple[DetectorOutputs, DetectorOutputs, Tensor]:
        idx = batch_order(len(split), cfg.batch_size, 1, cfg.seed)[0]
        images, targets = split.batch(idx, device)
        state = copy.deepcopy(student.state_dict())
        student.train()
        with torch.no_grad():
            t_out = teacher_outputs(teacher, images, targets)
            with StudentTaps(student) as taps:
                det = sum(student(images, targets).values())
            s_out = taps.outputs()
        student.load_state_dict(state)
        return s_out, t_out, det

    return probe


def train(
    model: nn.Module,
    split: DetectionSplit,
    cfg: TrainConfig,
    *,
    iterations: int | None = None,
    teacher: nn.Module | None = None,
    distiller: Distiller | None = None,
    device: str = "cpu",
    desc: str = "train",
    progress: bool = True,
    eval_every: int = 0,
    evaluator: Callable[[nn.Module], dict[str, float]] | None = None,
    teacher_cache: Callable[[Sequence[int]], DetectorOutputs] | None = None,
    kd_decay: bool = False,
) -> TrainResult:
    """Train ``model`` (and the distiller's layers) in place for ``iterations`` (default ``cfg.iterations``).

    The schedule spans exactly ``iterations``; the batches are the first ``iterations`` of the
    seed's order, so a longer run sees the same batches first. With ``eval_every > 0``,
    ``evaluator(model)`` runs after every ``eval_every``-th iteration and after the last one
    (its time is kept out of ``wall_s``), and its results go to ``eval_curve``.
    ``teacher_cache(idx)``, if given, returns the teacher's outputs of the canvases ``idx``
    instead of running the teacher (the teacher is fixed and the data have no augmentation).
    ``kd_decay`` multiplies the distillation term by ``(1 + cos(pi * it / iterations)) / 2``: from
    its calibrated weight at the start to zero at the end, like the learning rate.
    """
    from tqdm.auto import tqdm

    n_iter = cfg.iterations if iterations is None else iterations
    if distiller is not None and teacher is None:
        raise ValueError("a distiller needs a teacher")
    params = list(model.parameters()) + ([] if distiller is None else list(distiller.loss.parameters()))
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, n_iter))
    order = batch_order(len(split), cfg.batch_size, n_iter, cfg.seed)
    result = TrainResult(iterations=n_iter, wall_s=0.0)
    model.train()
    if distiller is not None:
        distiller.loss.train()
        result.kd_terms = {name: [] for name in distiller.spec.terms}
    start = time.perf_counter()
    bar = tqdm(order, desc=desc, disable=not progress, leave=False, dynamic_ncols=True, mininterval=1.0)
    tick = start
    for it, idx in enumerate(bar):
        images, targets = split.batch(idx, device)
        if distiller is None:
            det = sum(model(images, targets).values())
            loss = det
        else:
            t_out = teacher_outputs(teacher, images, targets) if teacher_cache is None else teacher_cache(idx)
            with StudentTaps(model) as taps:
                det = sum(model(images, targets).values())
            kd, terms = distiller(taps.outputs(), t_out)
            if kd_decay:
                kd = kd * (0.5 * (1.0 + math.cos(math.pi * it / n_iter)))
            loss = det + kd
            result.kd_loss.append(float(kd.detach()))
            for name, value in terms.items():
                result.kd_terms[name].append(value)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: the loss is {float(loss)} at iteration {it}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
        optimizer.step()
        scheduler.step()
        result.det_loss.append(float(det.detach()))
        now = time.perf_counter()
        result.step_s.append(now - tick)
        tick = now
        if evaluator is not None and eval_every > 0 and ((it + 1) % eval_every == 0 or it + 1 == n_iter):
            t_eval = time.perf_counter()
            result.eval_curve.append((it + 1, evaluator(model)))
            model.train()
            tick = time.perf_counter()
            result.eval_s += tick - t_eval
            bar.write(
                f"  {desc}: iteration {it + 1}, "
                + ", ".join(f"{k} {v:.1f}" for k, v in result.eval_curve[-1][1].items() if k in ("AP", "AP50"))
            )
        if it % 20 == 0:
            post = {"det": f"{result.det_loss[-1]:.3f}"}
            if result.kd_loss:
                post["kd"] = f"{result.kd_loss[-1]:.3f}"
            bar.set_postfix(post, refresh=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    result.wall_s = time.perf_counter() - start - result.eval_s
    bar.close()
    return result


def config_hash(*parts: dict) -> str:
    """A short, stable hash of JSON-serialisable configs (keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def load_or_train_teacher(
    det_cfg: DetectorConfig,
    data_cfg: DataConfig,
    train_cfg: TrainConfig,
    split: DetectionSplit,
    cache_dir: Path,
    *,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
    eval_every: int = 0,
    evaluator: Callable[[nn.Module], dict[str, float]] | None = None,
) -> tuple[nn.Module, dict]:
    """The teacher of these configs: loaded from ``cache_dir/teacher-<hash>.pt`` if there, else trained
    and saved. Returns the model (eval mode) and a record (hash, path, cached or not, training time,
    and the ``eval_curve`` of `train` when ``eval_every`` and ``evaluator`` are given; evaluation
    does not enter the cache key)."""
    key = config_hash(
        {
            "version": CACHE_VERSION,
            "detector": det_cfg.to_dict(),
            "data": data_cfg.to_dict(),
            "train": train_cfg.to_dict(),
            "device": device.split(":")[0],
        }
    )
    path = Path(cache_dir) / f"teacher-{det_cfg.kind}-{key}.pt"
    torch.manual_seed(train_cfg.seed)
    model = build_detector(det_cfg).to(device)
    if path.exists():
        blob = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(blob["state_dict"])
        log(f"teacher: loaded from cache {path} (trained in {blob['train']['wall_s']:.0f} s)")
        train_summary = {"median_step_s": blob["train"]["s_per_iter"], **blob["train"]}  # older caches: no median
        record = {
            "hash": key,
            "path": str(path),
            "cached": True,
            "train": train_summary,
            "det_loss": blob["loss"],
            "eval_curve": blob.get("eval_curve", []),
        }
    else:
        log(f"teacher: training {train_cfg.iterations} iterations (cache key {key})")
        result = train(
            model,
            split,
            train_cfg,
            device=device,
            desc="teacher",
            progress=progress,
            eval_every=eval_every,
            evaluator=evaluator,
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        blob = {
            "state_dict": model.state_dict(),
            "train": result.summary(),
            "loss": result.det_loss,
            "eval_curve": result.eval_curve,
        }
        torch.save(blob, tmp)
        tmp.replace(path)
        record = {
            "hash": key,
            "path": str(path),
            "cached": False,
            "train": result.summary(),
            "det_loss": result.det_loss,
            "eval_curve": result.eval_curve,
        }
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, record
