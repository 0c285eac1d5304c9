"""Distil a YOLO teacher into a YOLO student inside ultralytics' own training loop.

ultralytics (>= 8.4.78) trains with knowledge distillation when ``distill_model=`` names a
teacher: its trainer wraps the student in ``ultralytics.nn.distill_model.DistillationModel``
(freezes the teacher, keeps it out of the EMA and the checkpoints, keeps the student's
detection loss, strips the final weights to the student). `YOLODistillationModel` is that
wrapper with a famkd-losses loss in place of ultralytics' built-in one, and `FAMKDTrainer`
is the detection trainer that builds it (and resumes it)::

    from ultralytics import YOLO
    from famkd_losses.integrations.ultralytics import FAMKDTrainer

    YOLO("yolov8n.yaml").train(data="coco8.yaml", trainer=FAMKDTrainer, distill_model="yolov8s.pt")

    # another loss or other weights: a trainer class bound to a loss factory
    trainer = distillation_trainer(lambda s_ch, t_ch, nc: MGDLoss(s_ch, t_ch, alpha=2e-5))

What is distilled: the features the ``Detect`` head reads (the neck outputs, one per stride)
and its class logits, per level ``(N, nc, H_l, W_l)`` (one anchor per cell). End-to-end heads
(YOLOv10, YOLO26) give two logit branches: ``branch="one2many"`` (default) or ``"one2one"``
(whose features ultralytics detaches: its logits term trains only the one2one class convs).
The distillation term is added to the detection losses as ultralytics adds its own: multiplied
by the batch size in the loss that is back-propagated, reported per image as ``dis_loss``. The
loss's own weights (``alpha``/``beta``) set its scale; ultralytics' ``dis`` argument is not used.

Importing this module imports ultralytics: ``pip install famkd-losses[ultralytics]``.
ultralytics is AGPL-3.0 licensed; this package (and this adapter) does not include its code.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._validation import check_choice
from ..losses import FAMKDLoss
from ._outputs import DetectorOutputs, distillation_loss

try:
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.nn.distill_model import DistillationModel
    from ultralytics.nn.tasks import load_checkpoint
    from ultralytics.utils import LOGGER
    from ultralytics.utils.torch_utils import copy_attr, unwrap_model
except ImportError as err:  # pragma: no cover - exercised only without ultralytics
    raise ImportError(
        "famkd_losses.integrations.ultralytics needs ultralytics >= 8.4.78 (its DistillationModel): "
        "pip install 'famkd-losses[ultralytics]'"
    ) from err

__all__ = [
    "FAMKDTrainer",
    "LossFactory",
    "YOLODistillationModel",
    "default_loss",
    "distillation_trainer",
    "yolo_outputs",
]

LossFactory = Callable[[list[int], list[int], int], nn.Module]
"""``(student_channels, teacher_channels, num_classes) -> loss module``."""

DETECT_HEAD_BRANCHES = ("one2many", "one2one")
"""The two logit branches of an end-to-end YOLO ``Detect`` head, the values of ``branch=``."""


def default_loss(student_channels: list[int], teacher_channels: list[int], num_classes: int) -> nn.Module:
    """`FAMKDLoss` with the package defaults on the neck features and the class logits."""
    return FAMKDLoss(student_channels, teacher_channels, num_classes=num_classes)


def _head_dict(raw: Any, branch: str) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """The Detect head's raw prediction dicts: (the one holding the features, the one of ``branch``)."""
    if isinstance(raw, (tuple, list)) and len(raw) == 2 and isinstance(raw[1], Mapping):
        raw = raw[1]  # eval mode: (decoded predictions, raw dict)
    if not isinstance(raw, Mapping):
        raise TypeError(
            "expected the raw output of a YOLO Detect head (a dict in train mode, (y, dict) in eval mode); got "
            f"{type(raw).__name__}: is the model in export mode, or not a detection model?"
        )
    if branch in raw:  # end-to-end head: two branches on the same features
        # one2one's copy of the features is detached in training: read them from one2many where it is there
        many = raw.get("one2many")
        return (many if isinstance(many, Mapping) and "feats" in many else raw[branch]), raw[branch]
    return raw, raw  # a one-branch head: ``branch`` does not apply


def yolo_outputs(
    raw: Any,
    *,
    branch: str = "one2many",
    image_size: Sequence[int] | None = None,
    batch: Mapping[str, Tensor] | None = None,
) -> DetectorOutputs:
    """Neck features and per-level class logits from a YOLO ``Detect`` head's output.

    Args:
        raw: what a YOLO detection model returns: in train mode the head's dict
            ``{"boxes", "scores": (N, nc, sum_l H_l W_l), "feats": [(N, C_l, H_l, W_l)]}`` (or
            ``{"one2many": ..., "one2one": ...}``), in eval mode ``(y, that dict)``.
        branch: which logits of an end-to-end head: ``"one2many"`` or ``"one2one"``.
        image_size: ``(H, W)`` of the input batch (needed for FGD's boxes).
        batch: ultralytics' batch dict; its ``bboxes`` (normalised xywh) and ``batch_idx``
            become per-image x1y1x2y2 pixel boxes (FGD uses the teacher's).

    Returns:
        `DetectorOutputs` with ``features`` and ``cls_logits`` (N, nc, H_l, W_l) per level.
    """
    check_choice("branch", branch, DETECT_HEAD_BRANCHES)
    feats_dict, logits_dict = _head_dict(raw, branch)
    for key, d in (("feats", feats_dict), ("scores", logits_dict)):
        if key not in d:
            raise TypeError(f"the Detect head's output has no {key!r} entry (keys: {sorted(d)}): unsupported head")
    feats = list(feats_dict["feats"])
    scores = logits_dict["scores"]
    n, nc, cells = scores.shape
    sizes = [f.shape[-2] * f.shape[-1] for f in feats]
    if sum(sizes) != cells:
        raise ValueError(
            f"the head's scores cover {cells} cells but its features {[tuple(f.shape) for f in feats]} "
            f"have {sum(sizes)}"
        )
    logits = [p.reshape(n, nc, f.shape[-2], f.shape[-1]) for p, f in zip(scores.split(sizes, dim=-1), feats)]
    if image_size is None:
        image_size = (0, 0)
    h, w = int(image_size[0]), int(image_size[1])
    return DetectorOutputs(feats, logits, (h, w), _boxes(batch, n, h, w, scores))


def _boxes(batch: Mapping[str, Tensor] | None, n: int, h: int, w: int, like: Tensor) -> list[Tensor]:
    """ultralytics' (normalised xywh, batch_idx) labels -> per image (n_i, 4) x1y1x2y2 pixels."""
    if batch is None or "bboxes" not in batch:
        return [like.new_zeros((0, 4), dtype=torch.float32) for _ in range(n)]
    boxes = batch["bboxes"]
    if boxes.shape[-1] != 4:
        raise ValueError(
            f"batch['bboxes'] must hold axis-aligned normalised xywh boxes (..., 4), got {tuple(boxes.shape)} "
            "(oriented boxes?): FGD's box masks need axis-aligned boxes"
        )
    xywh = boxes.to(device=like.device, dtype=torch.float32).reshape(-1, 4)
    idx = batch["batch_idx"].to(like.device).reshape(-1).long()
    scale = xywh.new_tensor([w, h, w, h])
    xy, wh = xywh[:, :2], xywh[:, 2:]
    xyxy = torch.cat([xy - wh / 2, xy + wh / 2], dim=1) * scale
    return [xyxy[idx == i] for i in range(n)]


class YOLODistillationModel(DistillationModel):
    """ultralytics' ``DistillationModel`` with a famkd-losses loss.

    Holds the frozen teacher (``teacher_model``), the student (``student_model``) and the loss
    module. The loss lives in the ``projector`` attribute, the name ultralytics' trainer saves
    and restores beside the student (its align layers and generators train with the student
    and are synchronised by DDP); `distill_loss` is the same module under a clearer name.

    Args:
        teacher_model: a YOLO detection model, or the path of an ultralytics checkpoint.
        student_model: the YOLO detection model being trained (ultralytics' trainer passes it).
        loss: a loss module of this package, or a `LossFactory` called with the channels of
            the Detect head's inputs and the number of classes (default: `default_loss`).
        branch: the logits of an end-to-end head to distil (``"one2many"`` or ``"one2one"``).
        logits: give the loss the class logits where it can go without them (`FAMKDLoss`);
            ``False`` distils its feature part only.
    """

    def __init__(
        self,
        teacher_model: str | Path | nn.Module,
        student_model: nn.Module,
        loss: nn.Module | LossFactory | None = None,
        *,
        branch: str = "one2many",
        logits: bool = True,
    ) -> None:
        nn.Module.__init__(self)  # ultralytics' __init__ builds its own projector and hooks: not used
        check_choice("branch", branch, DETECT_HEAD_BRANCHES)
        if isinstance(teacher_model, (str, Path)):
            teacher_model = load_checkpoint(teacher_model)[0]
        if not isinstance(teacher_model, nn.Module):
            raise TypeError(
                f"teacher_model must be a YOLO model or a checkpoint path, got {type(teacher_model).__name__}"
            )
        device = next(student_model.parameters()).device
        self.teacher_model = teacher_model.float().to(device)
        self._freeze_teacher()
        self.student_model = student_model
        self.branch = branch
        self.logits = bool(logits)
        # attributes ultralytics' DistillationModel methods read (hooks are not needed: the head
        # returns the features it reads)
        self.feats_idx = self.get_distill_layers(student_model)
        self.teacher_feats_idx = self.get_distill_layers(teacher_model)
        self._teacher_feats: dict[int, Tensor] = {}
        self._student_feats: dict[int, Tensor] = {}
        self._teacher_hooks: list = []
        self._student_hooks: list = []
        self.dis = 1.0

        s_ch, t_ch, nc = self._probe_channels(device)
        s_names, t_names = getattr(student_model, "names", None), getattr(teacher_model, "names", None)
        if s_names and t_names and dict(s_names) != dict(t_names):
            LOGGER.warning(
                f"teacher and student name their classes differently (student {dict(s_names)}, teacher "
                f"{dict(t_names)}): the logits are distilled by index, so the class orders must match"
            )
        copy_attr(self, student_model)
        module = default_loss if loss is None else loss
        if not isinstance(module, nn.Module):
            module = module(s_ch, t_ch, nc)
            if not isinstance(module, nn.Module):
                raise TypeError(f"the loss factory must return an nn.Module, got {type(module).__name__}")
        self.projector = module.to(device)

    def _probe_channels(self, device: torch.device) -> tuple[list[int], list[int], int]:
        """Channels of the Detect head's inputs (student, teacher) and the class count, from a tiny forward."""
        student, teacher = self.student_model, self.teacher_model
        s_stride = [float(s) for s in student.stride]
        t_stride = [float(s) for s in teacher.stride]
        if s_stride != t_stride:
            raise ValueError(
                f"teacher and student heads must read the same strides; student has {s_stride}, teacher {t_stride}"
            )
        ch = student.yaml.get("channels", 3)
        side = int(max(s_stride)) * 2
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad():
                image = torch.zeros(1, ch, side, side, device=device)
                s_out = yolo_outputs(student(image), branch=self.branch)
                t_out = yolo_outputs(teacher(image), branch=self.branch)
        finally:
            student.train(was_training)
        s_nc, t_nc = s_out.cls_logits[0].shape[1], t_out.cls_logits[0].shape[1]
        if s_nc != t_nc:
            raise ValueError(
                f"teacher and student must predict the same classes; student has nc={s_nc}, teacher nc={t_nc}"
            )
        return [f.shape[1] for f in s_out.features], [f.shape[1] for f in t_out.features], s_nc

    @property
    def distill_loss(self) -> nn.Module:
        """The famkd-losses loss module (stored as ``projector`` for ultralytics' trainer)."""
        return self.projector

    def _register_feature_hooks(self) -> None:
        """No hooks: the Detect head's output carries the features it reads (called on unpickling)."""
        self._remove_feature_hooks()

    def loss(self, batch: dict, preds: Any = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Detection losses of the student, with the distillation term appended as ``dis_loss``.

        In eval mode (ultralytics' validation) the distillation term is zero, as in
        ultralytics' own distillation.
        """
        if not self.training:
            return super().loss(batch, preds)
        image = batch["img"]
        with torch.no_grad():
            t_raw = self.teacher_model(image)
        s_raw = self.student_model(image)
        det_loss, items = self.student_model.loss(batch, s_raw)
        size = image.shape[-2:]
        student = yolo_outputs(s_raw, branch=self.branch, image_size=size)
        teacher = yolo_outputs(t_raw, branch=self.branch, image_size=size, batch=batch)  # FGD reads its boxes
        kd = distillation_loss(self.projector, student, teacher, logits=self.logits).reshape(1)
        items["dis_loss"] = kd.detach()  # shape (1,), as ultralytics reports its own
        return torch.cat([det_loss, (kd * image.shape[0]).to(det_loss.dtype)]), items


class FAMKDTrainer(DetectionTrainer):
    """ultralytics' ``DetectionTrainer`` that distils the teacher named by ``distill_model=``.

    The student is wrapped in a `YOLODistillationModel` once ultralytics has attached the
    dataset's classes and the hyper-parameters to it (so its detection loss is ultralytics'
    own); ultralytics then freezes the teacher, builds the optimizer over the student and the
    loss module, and saves only the student. Use `distillation_trainer` for another loss, a
    teacher given as a module, or the one2one branch.
    """

    loss_factory: nn.Module | LossFactory | None = None
    teacher: nn.Module | None = None
    branch: str = "one2many"
    logits: bool = True

    def _teacher(self) -> str | Path | nn.Module:
        teacher = self.teacher if self.teacher is not None else self.args.distill_model
        if teacher is None:
            raise ValueError(
                "FAMKDTrainer needs a teacher: pass distill_model='teacher.pt' to train(), "
                "or distillation_trainer(..., teacher=model)"
            )
        return teacher

    def setup_model(self):
        """As ultralytics', and on resume rebuild the wrapper with the checkpoint's trained loss module."""
        if isinstance(self.model, nn.Module) or not str(self.model).lower().endswith(".pt"):
            return super().setup_model()
        weights, ckpt = load_checkpoint(self.model)
        if not isinstance(weights, YOLODistillationModel):
            return super().setup_model()
        # a checkpoint written during a FAMKDTrainer run (ultralytics keeps the wrapper, less the teacher,
        # until the end): the student and the loss module (EMA weights, as ultralytics resumes) come from it
        student = self.get_model(cfg=weights.yaml, weights=weights.student_model, verbose=False)
        student.args = self.args
        self.model = YOLODistillationModel(
            self._teacher(), student, weights.projector, branch=weights.branch, logits=getattr(weights, "logits", True)
        )
        self.model.criterion = None
        return ckpt

    def set_model_attributes(self) -> None:
        super().set_model_attributes()
        if getattr(self.args, "quantize", None):
            raise ValueError(
                f"FAMKDTrainer does not support quantize={self.args.quantize}: quantisation-aware training would "
                "prepare the wrapper (teacher and loss included) instead of the student"
            )
        model = unwrap_model(self.model)
        if isinstance(model, YOLODistillationModel):
            model.student_model.args = self.args  # resumed: the wrapper was rebuilt in setup_model
            return
        if isinstance(model, DistillationModel):
            raise RuntimeError(
                "the model is ultralytics' own DistillationModel (a checkpoint of a run without FAMKDTrainer?): "
                "FAMKDTrainer resumes only its own runs"
            )
        self.model = YOLODistillationModel(
            self._teacher(), self.model, self.loss_factory, branch=self.branch, logits=self.logits
        )
        if self.args.compile:  # as ultralytics does for its own distillation
            LOGGER.warning("FAMKDTrainer: 'compile' is not supported with distillation and is disabled")
            self.args.compile = False


def distillation_trainer(
    loss: nn.Module | LossFactory | None = None,
    *,
    teacher: nn.Module | None = None,
    branch: str = "one2many",
    logits: bool = True,
) -> type[FAMKDTrainer]:
    """A `FAMKDTrainer` subclass bound to a loss factory (and optionally a teacher module).

    ultralytics builds trainers from a class (``YOLO(...).train(trainer=cls, ...)``), so the
    choices travel as class attributes. ``loss`` is a loss module of this package or a factory
    ``loss(student_channels, teacher_channels, num_classes)`` returning one (the channels are
    then read from the two models); ``teacher``, when given, replaces ``distill_model=``;
    ``logits=False`` distils `FAMKDLoss`'s feature part only (see `YOLODistillationModel`).
    """
    check_choice("branch", branch, DETECT_HEAD_BRANCHES)
    if loss is not None and not callable(loss):
        raise TypeError(
            "loss must be a loss module or a factory (student_channels, teacher_channels, num_classes) -> module, "
            f"got {loss!r}"
        )
    attrs = {
        "loss_factory": staticmethod(loss) if loss is not None else None,
        "teacher": teacher,
        "branch": branch,
        "logits": bool(logits),
    }
    return type("BoundFAMKDTrainer", (FAMKDTrainer,), attrs)
