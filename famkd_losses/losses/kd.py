"""KD: Hinton's knowledge distillation on class logits (Hinton et al., 2015)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .._backend import check_backend
from .._validation import (
    as_levels,
    at_level,
    check_choice,
    check_level_device,
    check_non_negative,
    check_positive,
    check_same_device,
    check_tensor,
)
from ..functional import binary_kl, softmax_kl

__all__ = ["KDLoss"]

KD_MODES = ("softmax", "sigmoid")


class KDLoss(nn.Module):
    """``loss_weight * tau^2 * KL(teacher || student)`` averaged over samples.

    ``mode="softmax"``: Hinton's KL between ``softmax(z/tau)`` over the class dimension;
    ``"sigmoid"``: the per-class binary KL (method.md section 4), summed over classes. Every
    index other than ``class_dim`` is a sample: (N, K) logits average over N, dense
    (N, K, H, W) logits with ``class_dim=1`` over N*H*W. Sequences of levels are summed.
    """

    def __init__(
        self,
        *,
        tau: float = 1.0,
        mode: str = "softmax",
        loss_weight: float = 1.0,
        class_dim: int = -1,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.tau = check_positive("tau", tau)
        check_choice("mode", mode, KD_MODES)
        self.mode = mode
        self.loss_weight = check_non_negative("loss_weight", loss_weight)
        if isinstance(class_dim, bool) or not isinstance(class_dim, int):
            raise TypeError(f"class_dim must be an int, got {class_dim!r}")
        self.class_dim = class_dim
        self.backend = check_backend(backend)

    def forward(self, s_logits: Tensor | Sequence[Tensor], t_logits: Tensor | Sequence[Tensor]) -> Tensor:
        """float32 scalar."""
        s_list, t_list, single = as_levels("s_logits", s_logits, "t_logits", t_logits)
        total = None
        for i, (s, t) in enumerate(zip(s_list, t_list)):
            level = None if single else i
            check_tensor("student logits", s, (1, 2, 3, 4, 5), level)
            check_tensor("teacher logits", t, (1, 2, 3, 4, 5), level)
            check_same_device([("student logits", s), ("teacher logits", t)], level)
            check_level_device("s_logits", s, i, s_list[0], "s_logits at level 0")
            if s.shape != t.shape:
                raise ValueError(
                    f"logits shapes differ{at_level(level)}: student {tuple(s.shape)}, teacher {tuple(t.shape)}"
                )
            if not -s.dim() <= self.class_dim < s.dim():
                raise ValueError(f"class_dim={self.class_dim} is out of range for logits of shape {tuple(s.shape)}")
            t = t.detach()
            if self.mode == "softmax":
                kl = softmax_kl(s, t, self.tau, dim=self.class_dim)
            else:
                kl = binary_kl(s, t, self.tau).sum(dim=self.class_dim)
            v = kl.mean() * self.tau**2
            total = v if total is None else total + v
        assert total is not None
        return self.loss_weight * total
