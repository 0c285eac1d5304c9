"""CWD: Channel-wise Knowledge Distillation for Dense Prediction (Shu et al., ICCV 2021)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .._backend import check_backend
from .._validation import as_levels, check_level_device, check_non_negative, check_pair, check_positive
from ..functional import channel_wise_divergence
from ._base import DistillationLoss
from ._common import NO_ALIGN_HINT

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

    def __init__(self, *, tau: float = 1.0, loss_weight: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        self.tau = check_positive("tau", tau)
        self.loss_weight = check_non_negative("loss_weight", loss_weight)
        self.backend = check_backend(backend)

    def forward(self, s_feats: Tensor | Sequence[Tensor], t_feats: Tensor | Sequence[Tensor]) -> Tensor:
        """float32 scalar."""
        s_list, t_list, single = as_levels("s_feats", s_feats, "t_feats", t_feats)
        total = None
        terms: dict[str, Tensor] = {}
        for i, (s, t) in enumerate(zip(s_list, t_list)):
            check_pair(
                "student feature", s, "teacher feature", t, level=None if single else i, channels_hint=NO_ALIGN_HINT
            )
            check_level_device("s_feats", s, i, s_list[0], "s_feats at level 0")
            v = channel_wise_divergence(s, t.detach(), self.tau)
            total = v if total is None else total + v
            terms[f"level{i}"] = self.loss_weight * v
        assert total is not None
        loss = self.loss_weight * total
        self._record({"total": loss, **terms})
        return loss
