"""The distillation losses of the YOLO protocol, and their weights.

- ``famkd``: `FAMKDLoss` (the package defaults) on the neck features the ``Detect`` head reads and
  its class logits; two terms, ``feature`` and ``logits``.
- ``famkd_feature``: the same `FAMKDLoss` on the features alone (its feature part); term ``feature``.
- ``mgd``: `MGDLoss` (its defaults: random spatial mask, ratio 0.65) on the same features.
- ``cwd``: `CWDLoss` (tau 1) on the same features, the student's first projected to the teacher's
  channels by a 1x1 convolution per level that trains with the student (`AlignedCWDLoss`; CWD
  itself has no align layer, and this student is narrower than its teacher).

Weights, ``kd_weights="calibrated"`` (the default, the rule of the FCOS demo): each term is
measured with weight 1 on the first training batch (no augmentation) beside the student's
detection loss (ultralytics' own: box + cls + dfl with their gains, per image), and its weight
set so that it starts at ``fraction`` times that loss (`famkd_losses.calibration.calibrate_weights`;
the probe's layers are kept, so the weights do not change their initialisation). The student of
the probe is built with the run's seed but is not the run's (ultralytics builds its own).
``kd_weights="defaults"``: the package's default weights, untouched.

ultralytics' built-in distillation is never re-weighted: its ``dis`` stays at the default.
`builtin_probe` only measures, on the same batch, where its term starts.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .. import CWDLoss, FAMKDLoss, MGDLoss
from ..calibration import calibrate_weights
from ..losses._base import DistillationLoss
from .data import DetectionSplit

__all__ = [
    "FEATURES_ONLY",
    "LOSS_TERMS",
    "KD_WEIGHTS",
    "AlignedCWDLoss",
    "build_loss",
    "probe_batch",
    "head_outputs",
    "calibrated_loss",
    "builtin_probe",
]

LOSS_TERMS: dict[str, tuple[str, ...]] = {
    "famkd": ("feature", "logits"),
    "famkd_feature": ("feature",),
    "mgd": ("feature",),
    "cwd": ("feature",),
}
FEATURES_ONLY = ("famkd_feature",)
"""The methods whose loss is called without the class logits (``logits=False``)."""
KD_WEIGHTS = ("calibrated", "defaults")


class AlignedCWDLoss(DistillationLoss):
    """`CWDLoss` on ``align_l(S_l)``: a 1x1 convolution per level maps the student's channels to the teacher's.

    Args:
        student_channels: the student's channels per level.
        teacher_channels: the teacher's channels per level.
        tau: the softmax temperature of `CWDLoss`.
        loss_weight: the weight of `CWDLoss`.
        backend: the backend of `CWDLoss`.
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        *,
        tau: float = 1.0,
        loss_weight: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if len(student_channels) != len(teacher_channels):
            raise ValueError(
                f"student_channels {list(student_channels)} and teacher_channels {list(teacher_channels)} "
                "must name the same levels"
            )
        self.align = nn.ModuleList(nn.Conv2d(s, t, kernel_size=1) for s, t in zip(student_channels, teacher_channels))
        self.cwd = CWDLoss(tau=tau, loss_weight=loss_weight, backend=backend)

    @property
    def loss_weight(self) -> float:
        return self.cwd.loss_weight

    def forward(self, s_feats: Sequence[Tensor], t_feats: Sequence[Tensor]) -> Tensor:
        """float32 scalar: `CWDLoss` of the aligned student levels against the teacher's."""
        if len(s_feats) != len(self.align):
            raise ValueError(f"expected {len(self.align)} student levels, got {len(s_feats)}")
        aligned = [conv(s.to(conv.weight.dtype)) for conv, s in zip(self.align, s_feats)]
        loss = self.cwd(aligned, list(t_feats))
        self._record(self.cwd._recorded())
        return loss


def build_loss(
    key: str,
    student_channels: Sequence[int],
    teacher_channels: Sequence[int],
    num_classes: int,
    *,
    weights: Mapping[str, float] | None = None,
    seed: int | None = None,
    backend: str = "auto",
) -> nn.Module:
    """The loss module of method ``key``; ``weights`` maps its terms to weights (None: the package defaults)."""
    s_ch, t_ch = list(student_channels), list(teacher_channels)
    w = dict(weights or {})
    if key in ("famkd", "famkd_feature"):  # one loss: famkd_feature is called without the logits
        argument = {"feature": "alpha", "logits": "beta"}
        extra = {argument[term]: w[term] for term in LOSS_TERMS[key]} if weights else {}
        return FAMKDLoss(s_ch, t_ch, num_classes=num_classes, seed=seed, backend=backend, **extra)
    if key == "mgd":
        extra = {"alpha": w["feature"]} if weights else {}
        return MGDLoss(s_ch, t_ch, seed=seed, backend=backend, **extra)
    if key == "cwd":
        extra = {"loss_weight": w["feature"]} if weights else {}
        return AlignedCWDLoss(s_ch, t_ch, backend=backend, **extra)
    raise ValueError(f"unknown method {key!r}; known: {sorted(LOSS_TERMS)}")


def default_weights(key: str, loss: nn.Module) -> dict[str, float]:
    """The term weights a loss module of method ``key`` carries."""
    if key in ("famkd", "famkd_feature"):
        carried = {"feature": float(loss.feature_losses[0].alpha), "logits": float(loss.logits_loss.beta)}
        return {term: carried[term] for term in LOSS_TERMS[key]}
    if key == "mgd":
        return {"feature": float(loss.alpha)}
    return {"feature": float(loss.loss_weight)}


def probe_batch(split: DetectionSplit, size: int) -> dict[str, Tensor]:
    """The first ``size`` canvases of ``split`` as ultralytics' preprocessed training batch (no augmentation).

    ``img`` (N, 3, S, S) float in [0, 1] (the grey canvas in all three channels, as ultralytics
    reads the PNGs), ``cls`` (n, 1), ``bboxes`` (n, 4) normalised xywh, ``batch_idx`` (n,).
    """
    n = min(size, len(split))
    side = float(split.images.shape[-1])
    img = split.images[:n].float().div(255.0).expand(-1, 3, -1, -1).contiguous()
    cls, boxes, idx = [], [], []
    for i in range(n):
        b = split.boxes[i]
        xywh = torch.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], 1)
        boxes.append(xywh / side)
        cls.append(split.labels[i].float().reshape(-1, 1))
        idx.append(torch.full((len(b),), float(i)))
    return {"img": img, "cls": torch.cat(cls), "bboxes": torch.cat(boxes), "batch_idx": torch.cat(idx)}


def _to(batch: Mapping[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def head_outputs(student: nn.Module, teacher: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Any, Any, float]:
    """`DetectorOutputs` of the student (train mode) and the teacher on ``batch``, and the student's
    detection loss per image (ultralytics' box + cls + dfl, with their gains). No graph is kept."""
    from ..integrations.ultralytics import yolo_outputs

    image = batch["img"]
    size = tuple(image.shape[-2:])
    was_training = student.training
    student.train()
    try:
        with torch.no_grad():
            s_raw = student(image)
            _, items = student.loss(dict(batch), s_raw)
            t_raw = teacher(image)
    finally:
        student.train(was_training)
    det = float(sum(float(v.sum()) for v in items.values()))
    s_out = yolo_outputs(s_raw, image_size=size)
    t_out = yolo_outputs(t_raw, image_size=size, batch=batch)
    return s_out, t_out, det


def calibrated_loss(
    key: str,
    student: nn.Module,
    teacher: nn.Module,
    batch: Mapping[str, Tensor],
    *,
    kd_weights: str = "calibrated",
    fraction: float = 1.0,
    seed: int | None = None,
    backend: str = "auto",
) -> tuple[nn.Module, dict]:
    """The loss module of method ``key`` for this teacher and student, weighted by ``kd_weights``.

    Returns the module (on the student's device) and a record: the weights, each term measured
    at weight 1 (it starts at weight times that: every term is linear in its weight), the
    detection loss of the probe batch and the channels read.
    """
    from ..integrations._outputs import distillation_loss

    if kd_weights not in KD_WEIGHTS:
        raise ValueError(f"kd_weights must be one of {KD_WEIGHTS}, got {kd_weights!r}")
    device = next(student.parameters()).device
    s_out, t_out, det = head_outputs(student, teacher, _to(batch, device))
    terms = LOSS_TERMS[key]
    s_ch, t_ch = [f.shape[1] for f in s_out.features], [f.shape[1] for f in t_out.features]
    nc = s_out.cls_logits[0].shape[1]
    torch.manual_seed(0 if seed is None else seed)
    unit = dict.fromkeys(terms, 1.0)
    probe = build_loss(key, s_ch, t_ch, nc, weights=unit, seed=seed, backend=backend).to(device)
    # the layers, and the position of a seeded mask stream (MGD), from before the probe's call:
    # the loss's first call then draws the probe's masks
    state = copy.deepcopy(probe.state_dict())

    def measure(loss: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            value = distillation_loss(loss, s_out, t_out, logits=key not in FEATURES_ONLY)
        if len(terms) == 1:
            return {terms[0]: float(value)}
        parts = loss.last_terms(as_float=True)
        return {name: parts[name] for name in terms}

    at_one = measure(probe)
    if kd_weights == "calibrated":
        weights = calibrate_weights(at_one, det, fraction, base_weights=unit)
        loss = build_loss(key, s_ch, t_ch, nc, weights=weights, seed=seed, backend=backend).to(device)
    else:
        loss = build_loss(key, s_ch, t_ch, nc, seed=seed, backend=backend).to(device)
        weights = default_weights(key, loss)
    loss.load_state_dict(state)
    record = {
        "weights": weights,
        "terms_at_weight_1": at_one,
        "det_loss": det,
        "student_channels": s_ch,
        "teacher_channels": t_ch,
    }
    return loss, record


def builtin_probe(student: nn.Module, teacher_weights: str, batch: Mapping[str, Tensor]) -> dict:
    """Where ultralytics' built-in distillation term (its default ``dis``, a fresh projector) starts on
    ``batch``, per image, beside the student's detection loss: a measurement only."""
    from ultralytics.nn.distill_model import DistillationModel

    device = next(student.parameters()).device
    model = DistillationModel(teacher_weights, student)
    model.train()
    with torch.no_grad():
        _, items = model.loss(_to(batch, device))
    model._remove_feature_hooks()
    kd = float(items.pop("dis_loss").sum())
    det = float(sum(float(v.sum()) for v in items.values()))
    return {"dis": float(model.dis), "term_at_start": kd, "det_loss": det, "ratio": kd / det if det > 0 else None}
