"""Squared reconstruction errors with the MGD/FGD reduction: summed over C, H, W, divided by N."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._dtypes import to_accumulation_dtype

__all__ = [
    "fusion_weights",
    "fuse_reconstructions",
    "reconstruction_error",
    "squared_error_sum",
    "branch_reconstruction_error",
]


def fusion_weights(fusion_logits: Tensor) -> Tensor:
    """Adaptive branch weights ``softmax(theta)``: (B,) -> float32 (B,), summing to 1."""
    return torch.softmax(to_accumulation_dtype(fusion_logits), dim=-1)


def fuse_reconstructions(recons: Sequence[Tensor], fusion_logits: Tensor | None = None) -> Tensor:
    """``sum_b softmax(theta)_b * R_b`` of B (N, C, H, W) reconstructions, in float32.

    With one branch (``fusion_logits`` None) the reconstruction itself, in float32.
    """
    if fusion_logits is None:
        if len(recons) != 1:
            raise ValueError(f"fusion_logits are needed to fuse {len(recons)} reconstructions")
        return to_accumulation_dtype(recons[0])
    if fusion_logits.shape != (len(recons),):
        raise ValueError(
            f"fusion_logits must have shape ({len(recons)},) for {len(recons)} reconstructions, "
            f"got {tuple(fusion_logits.shape)}"
        )
    w = fusion_weights(fusion_logits)
    out = w[0] * to_accumulation_dtype(recons[0])
    for i in range(1, len(recons)):
        out = out + w[i] * to_accumulation_dtype(recons[i])
    return out


def squared_error_sum(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """``sum(weight * (pred - target)^2)`` over every element, float32 scalar.

    ``weight`` broadcasts against (N, C, H, W), e.g. an (N, 1, H, W) spatial map times an
    (N, C, 1, 1) channel map.
    """
    err = (to_accumulation_dtype(pred) - to_accumulation_dtype(target)).square()
    if weight is not None:
        err = err * weight
    return err.sum()


def reconstruction_error(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """``sum(weight * (pred - target)^2) / N`` for (N, C, H, W) maps, float32 scalar."""
    return squared_error_sum(pred, target, weight) / pred.shape[0]


def branch_reconstruction_error(
    recons: Sequence[Tensor],
    fusion_logits: Tensor | None,
    target: Tensor,
    a_sp: Tensor | None = None,
    a_ch: Tensor | None = None,
) -> Tensor:
    """``reconstruction_error(fuse_reconstructions(recons, fusion_logits), target, a_sp * a_ch)``:
    float32 scalar; an absent attention map (spatial (N, 1, H, W), channel (N, C, 1, 1)) reads as 1."""
    weight = a_ch if a_sp is None else (a_sp if a_ch is None else a_sp * a_ch)
    return reconstruction_error(fuse_reconstructions(recons, fusion_logits), target, weight)
