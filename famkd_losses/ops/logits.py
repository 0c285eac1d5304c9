"""Per-position KL between the student's and the teacher's logits, and the logit guidance."""

from __future__ import annotations

from torch import Tensor

from .. import functional as F
from ._dispatch import dispatch

__all__ = ["position_kl_and_prob_diff"]


def _kernels():
    from ..kernels import logits_kl

    return logits_kl


def position_kl_and_prob_diff(
    s_logits: Tensor,
    t_logits: Tensor,
    *,
    head: str = "sigmoid",
    temperature: float = 1.0,
    num_classes: int | None = None,
    prob_diff: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """``(position_kl(s, t), position_prob_diff(s, t))`` of `famkd_losses.functional`: float32
    (N, P) each; the KL is differentiable w.r.t. ``s_logits``, the difference is detached (None
    unless ``prob_diff``). Fused: both from one read of the logits."""

    def kernel(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        kl, d = _kernels().position_kl_and_guidance(s, t, head=head, temperature=temperature, num_classes=num_classes)
        return kl, d if prob_diff else None

    def reference(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        opts = {"head": head, "temperature": temperature, "num_classes": num_classes}
        kl = F.position_kl(s, t, **opts)
        return kl, F.position_prob_diff(s.detach(), t, **opts) if prob_diff else None

    return dispatch(
        "position_kl_and_prob_diff",
        backend,
        kernel,
        reference,
        (s_logits, t_logits),
        accepts=lambda s, t: _kernels().supported(s, t, head=head, num_classes=num_classes),
    )
