"""PKD: General Distillation Framework for Object Detectors via Pearson Correlation Coefficient
(Cao et al., NeurIPS 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from .._backend import check_backend
from .._validation import at_level, check_non_negative, check_pair
from ..functional import pearson_loss
from ._base import DistillationLoss
from ._common import NO_ALIGN_HINT
from ._levels import Levels, level_terms, sum_terms

__all__ = ["PKDLoss"]


class PKDLoss(DistillationLoss):
    """Pearson-correlation feature distillation, as the official code computes it.

    Each channel of S and T is standardised over the batch and positions together
    (``(x - mean) / (std + 1e-6)``, unbiased std), then ``mean((S' - T')^2) / 2`` (one minus
    the Pearson correlation, in expectation), summed over levels, times ``loss_weight``.
    No align layer: student and teacher need the same channels.

    Args:
        loss_weight: overall weight (published detection configs use 1 to 6).
        resize_student: when spatial sizes differ, resize the student bilinearly to the
            teacher (default, as the official code), else the teacher to the student.
        backend: ``"auto"``, ``"torch"`` or ``"compile"`` (``"triton"`` runs the reference: PKD
            has no kernel).

    Inputs: one (N, C, H, W) pair or sequences of levels; N*H*W >= 2 per level.
    """

    inputs = ("features",)

    def __init__(self, *, loss_weight: float = 1.0, resize_student: bool = True, backend: str = "auto") -> None:
        super().__init__()
        self.loss_weight = check_non_negative("loss_weight", loss_weight)
        self.resize_student = bool(resize_student)
        self.backend = check_backend(backend)

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}"

    def forward(self, s_feats: Tensor | Sequence[Tensor], t_feats: Tensor | Sequence[Tensor]) -> Tensor:
        """float32 scalar."""
        values = Levels.split("s_feats", s_feats, "t_feats", t_feats).map(self._level)
        loss = self.loss_weight * sum_terms(values)
        self._record({"total": loss, **level_terms(self.loss_weight * v for v in values)})
        return loss

    def _level(self, s: Tensor, t: Tensor, *, level: int | None) -> Tensor:
        """One level's ``mean((S' - T')^2) / 2`` (before ``loss_weight``)."""
        check_pair(
            "student feature", s, "teacher feature", t, level=level, same_spatial=False, channels_hint=NO_ALIGN_HINT
        )
        t = t.detach()
        if s.shape[-2:] != t.shape[-2:]:
            if self.resize_student:
                s = F.interpolate(s, size=tuple(t.shape[-2:]), mode="bilinear", align_corners=False)
            else:
                t = F.interpolate(t, size=tuple(s.shape[-2:]), mode="bilinear", align_corners=False)
        n, _, h, w = s.shape
        if n * h * w < 2:
            raise ValueError(
                f"PKD standardises each channel over N*H*W values{at_level(level)}, which needs at least 2; "
                f"got shape {tuple(s.shape)}"
            )
        return pearson_loss(s, t)
