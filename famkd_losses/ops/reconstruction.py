"""The weighted squared error of fused reconstructions: the loss of FAMKD's feature part, MGD and FGD."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .. import functional as F
from ._dispatch import dispatch

__all__ = ["reconstruction_error"]


def _kernels():
    from ..kernels import reconstruction

    return reconstruction


def _reference(
    recons: list[Tensor],
    fusion_logits: Tensor | None,
    target: Tensor,
    a_sp: Tensor | None,
    a_ch: Tensor | None,
    scale: float,
    row: int | None,
) -> Tensor:
    theta = fusion_logits if row is None or fusion_logits is None else fusion_logits[row]
    loss = F.branch_reconstruction_error(recons, theta, target, a_sp, a_ch)
    return loss if scale == 1.0 else scale * loss


def reconstruction_error(
    recons: Sequence[Tensor],
    fusion_logits: Tensor | None,
    target: Tensor,
    a_sp: Tensor | None = None,
    a_ch: Tensor | None = None,
    *,
    scale: float = 1.0,
    row: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """``scale * reconstruction_error(fuse_reconstructions(recons, theta), target, a_sp * a_ch)``: float32 scalar.

    Args:
        recons: 1 or 2 reconstructions R_b (N, C, H, W).
        fusion_logits: theta (B,), the (S, B) matrix of a multi-scale loss with ``row``, or None
            for one branch.
        target: T (N, C, H, W), no gradient.
        a_sp: spatial weights (N, 1, H, W), or None (read as 1).
        a_ch: channel weights (N, C, 1, 1), or None (read as 1).
        scale: the loss weight (fused: applied to the kernel's partial sums, no extra launch).
        row: which row of ``fusion_logits`` is theta.
    """
    return dispatch(
        "reconstruction_error",
        backend,
        lambda r, f, t, sp, ch, scale, row: _kernels().fused_reconstruction_error(
            r, f, t, sp, ch, scale=scale, row=row
        ),
        _reference,
        (list(recons), fusion_logits, target, a_sp, a_ch, float(scale), row),
        accepts=lambda r, f, t, sp, ch, scale, row: _kernels().supported(
            r, f if row is None or f is None else f[row], t, sp, ch
        ),
    )
