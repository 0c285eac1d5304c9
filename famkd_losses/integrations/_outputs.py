"""What a detector gives the losses, and calling any loss of the package with it.

Every integration turns its codebase's tensors into a `DetectorOutputs` for the student and
one for the teacher; `distillation_loss` then calls whichever loss module the user chose with
the arguments that loss takes, so switching FAMKD for MGD, FGD, PKD, CWD or KD is one line.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..losses import FAMKDLoss, FGDLoss, KDLoss, MaskedLogitsLoss
from ..losses._base import DistillationLoss

__all__ = ["DetectorOutputs", "distillation_loss"]


@dataclass
class DetectorOutputs:
    """What one forward of a dense detector gives the distillation losses.

    Attributes:
        features: FPN levels in the backbone's order, each ``(N, C, H_l, W_l)``.
        cls_logits: dense class logits per level, ``(N, A*K, H_l, W_l)``; channel ``a*K + k`` is
            anchor ``a``, class ``k`` (A = 1 for FCOS and YOLO, 9 for a default RetinaNet).
        image_size: ``(H, W)`` of the padded batch that the maps cover.
        boxes: per image, ``(n_i, 4)`` x1y1x2y2 boxes in that padded input's pixels; ``(0, 4)``
            entries when no targets were given.
    """

    features: list[Tensor]
    cls_logits: list[Tensor]
    image_size: tuple[int, int]
    boxes: list[Tensor]


def distillation_loss(
    loss: nn.Module, student: DetectorOutputs, teacher: DetectorOutputs, *, logits: bool = True
) -> Tensor:
    """Call ``loss`` (any loss module of this package) with the inputs it takes.

    - `FAMKDLoss`: features, and the class logits unless ``logits=False`` (feature part only);
    - `MaskedLogitsLoss`, `KDLoss`: the class logits;
    - `FGDLoss`: features, the teacher's boxes and the input size;
    - every other loss (`MGDLoss`, `PKDLoss`, `CWDLoss`, ...): the features.

    Returns the loss's float32 scalar (already multiplied by its own weights).
    """
    if isinstance(loss, FAMKDLoss):
        if logits:
            return loss(student.features, teacher.features, student.cls_logits, teacher.cls_logits)
        return loss(student.features, teacher.features)
    if isinstance(loss, (MaskedLogitsLoss, KDLoss)):
        return loss(student.cls_logits, teacher.cls_logits)
    if isinstance(loss, FGDLoss):
        return loss(student.features, teacher.features, teacher.boxes, teacher.image_size)
    if isinstance(loss, DistillationLoss):
        return loss(student.features, teacher.features)
    raise TypeError(
        f"loss must be one of famkd_losses' loss modules (FAMKDLoss, MGDLoss, FGDLoss, ...); got {type(loss).__name__}"
    )
