"""What a detector gives the losses, and calling any loss of the package with it.

Every integration turns its codebase's tensors into a `DetectorOutputs` for the student and
one for the teacher; `distillation_loss` then calls whichever loss module the user chose with
the inputs that loss declares it takes, so switching FAMKD for MGD, FGD, PKD, CWD or KD is one line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from ..losses._base import INPUT_KINDS

__all__ = ["ARGUMENTS", "DetectorOutputs", "distillation_loss"]


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


# each kind of input (`INPUT_KINDS`) as the arguments a loss's forward takes for it
ARGUMENTS: dict[str, Callable[[DetectorOutputs, DetectorOutputs], tuple]] = {
    "features": lambda student, teacher: (student.features, teacher.features),
    "logits": lambda student, teacher: (student.cls_logits, teacher.cls_logits),
    "boxes": lambda student, teacher: (teacher.boxes, teacher.image_size),
}


def distillation_loss(
    loss: nn.Module, student: DetectorOutputs, teacher: DetectorOutputs, *, logits: bool = True
) -> Tensor:
    """Call ``loss`` with the inputs its class declares it takes: its ``inputs``, kinds of
    `INPUT_KINDS` in the order of its ``forward`` (the logits left out when ``logits=False`` and
    they are among its ``optional_inputs``).

    - `FAMKDLoss`: features, and the class logits unless ``logits=False`` (feature part only);
    - `MaskedLogitsLoss`, `KDLoss`: the class logits;
    - `FGDLoss`: features, the teacher's boxes and the input size;
    - `MGDLoss`, `PKDLoss`, `CWDLoss`: the features.

    Returns the loss's float32 scalar (already multiplied by its own weights).
    """
    kinds = getattr(loss, "inputs", None)
    if kinds is None:
        raise TypeError(
            "loss must be one of famkd_losses' loss modules (FAMKDLoss, MGDLoss, FGDLoss, ...), or a module whose "
            f"class declares the inputs its forward takes (inputs = ('features',), ...); got {type(loss).__name__}"
        )
    unknown = [k for k in kinds if k not in ARGUMENTS]
    if unknown:
        raise ValueError(f"{type(loss).__name__}.inputs names {unknown}; the kinds are {INPUT_KINDS}")
    if not logits:
        kinds = [k for k in kinds if not (k == "logits" and k in getattr(loss, "optional_inputs", ()))]
    return loss(*(arg for kind in kinds for arg in ARGUMENTS[kind](student, teacher)))
