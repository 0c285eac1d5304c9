"""KD: Hinton's knowledge distillation on class logits (Hinton et al., 2015)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .._backend import check_backend
from .._validation import (
    at_level,
    check_channels,
    check_choice,
    check_non_negative,
    check_positive,
    check_same_device,
    check_tensor,
    plural,
    warn_if_swapped,
)
from ..functional import binary_kl, softmax_kl, to_positions
from ._base import DistillationLoss
from ._levels import Levels, level_terms, sum_terms

__all__ = ["KDLoss"]

KD_MODES = ("softmax", "sigmoid")


class KDLoss(DistillationLoss):
    """``loss_weight * tau^2 * KL(teacher || student)`` averaged over samples.

    ``mode="softmax"``: Hinton's KL between ``softmax(z/tau)`` over the classes; ``"sigmoid"``:
    the per-class binary KL (as in `MaskedLogitsLoss`), summed over classes. Every
    index other than the class one is a sample, and the KL is averaged over samples.

    Layouts: (N, K) or (N, P, K) logits have the classes last. Dense (N, A*K, H, W) head
    logits (4-D) have the classes in the channels: with ``num_classes=K`` each of the A
    anchors at each position is a sample over K classes, without it the C channels are one
    distribution per position (A = 1). ``class_dim`` overrides this and names the class
    dimension explicitly. Sequences (or mappings) of levels are summed.

    Args:
        tau: temperature (> 0); the loss is scaled by ``tau^2``.
        mode: ``"softmax"`` or ``"sigmoid"``.
        loss_weight: multiplies the whole loss (>= 0).
        class_dim: the class dimension, when it is not the one the layout implies.
        num_classes: K of dense (N, A*K, H, W) logits (several anchors per position).
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"``.
    """

    inputs = ("logits",)

    def __init__(
        self,
        *,
        tau: float = 1.0,
        mode: str = "softmax",
        loss_weight: float = 1.0,
        class_dim: int | None = None,
        num_classes: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.tau = check_positive("tau", tau)
        check_choice("mode", mode, KD_MODES)
        self.mode = mode
        self.loss_weight = check_non_negative("loss_weight", loss_weight)
        if class_dim is not None and (isinstance(class_dim, bool) or not isinstance(class_dim, int)):
            raise TypeError(f"class_dim must be an int or None, got {class_dim!r}")
        if class_dim is not None and num_classes is not None:
            raise ValueError("pass class_dim or num_classes, not both (num_classes splits dense A*K channels)")
        self.class_dim = class_dim
        self.num_classes = None if num_classes is None else check_channels("num_classes", num_classes)
        self.backend = check_backend(backend)

    def _classes_last(self, s: Tensor, t: Tensor, level: int | None) -> tuple[Tensor, Tensor]:
        """Both logits with the class dimension last."""
        where = at_level(level)
        if self.class_dim is not None:
            if not -s.dim() <= self.class_dim < s.dim():
                raise ValueError(f"class_dim={self.class_dim} is out of range for logits of shape {tuple(s.shape)}")
            return s.movedim(self.class_dim, -1), t.movedim(self.class_dim, -1)
        if s.dim() == 4:
            if self.num_classes is not None and s.shape[1] % self.num_classes != 0:
                raise ValueError(
                    f"dense logits{where} have {plural(s.shape[1], 'channel')}, not a multiple of "
                    f"num_classes={self.num_classes}"
                )
            return to_positions(s, self.num_classes), to_positions(t, self.num_classes)
        if self.num_classes is not None and s.shape[-1] != self.num_classes:
            raise ValueError(
                f"logits{where} have {plural(s.shape[-1], 'class', 'classes')} in the last dimension but "
                f"num_classes={self.num_classes}"
            )
        return s, t

    def extra_repr(self) -> str:
        split = f", num_classes={self.num_classes}" if self.num_classes else f", class_dim={self.class_dim}"
        return f"mode={self.mode!r}, tau={self.tau}, loss_weight={self.loss_weight}{split}"

    def forward(self, s_logits: Tensor | Sequence[Tensor], t_logits: Tensor | Sequence[Tensor]) -> Tensor:
        """float32 scalar."""
        values = Levels.split("s_logits", s_logits, "t_logits", t_logits).map(self._level)
        loss = self.loss_weight * sum_terms(values)
        self._record({"total": loss, **level_terms(self.loss_weight * v for v in values)})
        return loss

    def _level(self, s: Tensor, t: Tensor, *, level: int | None) -> Tensor:
        """One level's ``tau^2 * mean KL`` (before ``loss_weight``)."""
        check_tensor("student logits", s, (1, 2, 3, 4, 5), level)
        check_tensor("teacher logits", t, (1, 2, 3, 4, 5), level)
        check_same_device([("student logits", s), ("teacher logits", t)], level)
        if s.shape != t.shape:
            raise ValueError(
                f"logits shapes differ{at_level(level)}: student {tuple(s.shape)}, teacher {tuple(t.shape)}"
            )
        warn_if_swapped("student logits", s, "teacher logits", t)
        s, t = self._classes_last(s, t.detach(), level)
        if self.mode == "softmax":
            kl = softmax_kl(s, t, self.tau, dim=-1)
        else:
            kl = binary_kl(s, t, self.tau).sum(dim=-1)
        return kl.mean() * self.tau**2
