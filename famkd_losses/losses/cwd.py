"""CWD: Channel-wise Knowledge Distillation for Dense Prediction (Shu et al., ICCV 2021)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .._backend import check_backend
from .._validation import check_non_negative, check_pair, check_positive
from ..functional import channel_wise_divergence
from ._base import DistillationLoss
from ._common import NO_ALIGN_HINT
from ._levels import Levels, level_terms, sum_terms

__all__ = ["CWDLoss"]


class CWDLoss(DistillationLoss):
    """Channel-wise distillation: each channel's map as a distribution over positions.

    ``L = loss_weight * tau^2 / (N*C) * sum_{n,c} KL(softmax_hw(T/tau) || softmax_hw(S/tau))``,
    summed over levels. The detection recipe uses ``tau=1`` and weight 10 per FPN level.

    Inputs: one (N, C, H, W) pair or sequences of levels, student and teacher of equal shape.

    Args:
        tau: softmax temperature over the positions (> 0).
        loss_weight: multiplies the whole loss (>= 0).
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"``.
    """

    inputs = ("features",)

    def __init__(self, *, tau: float = 1.0, loss_weight: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        self.tau = check_positive("tau", tau)
        self.loss_weight = check_non_negative("loss_weight", loss_weight)
        self.backend = check_backend(backend)

    def extra_repr(self) -> str:
        return f"tau={self.tau}, loss_weight={self.loss_weight}"

    def forward(self, s_feats: Tensor | Sequence[Tensor], t_feats: Tensor | Sequence[Tensor]) -> Tensor:
        """float32 scalar."""
        values = Levels.split("s_feats", s_feats, "t_feats", t_feats).map(self._level)
        loss = self.loss_weight * sum_terms(values)
        self._record({"total": loss, **level_terms(self.loss_weight * v for v in values)})
        return loss

    def _level(self, s: Tensor, t: Tensor, *, level: int | None) -> Tensor:
        """One level's ``tau^2 / (N*C) * sum KL`` (before ``loss_weight``)."""
        check_pair("student feature", s, "teacher feature", t, level=level, channels_hint=NO_ALIGN_HINT)
        return channel_wise_divergence(s, t.detach(), self.tau)
