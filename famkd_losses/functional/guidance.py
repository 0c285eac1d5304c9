"""Where to distil logits: guidance maps D and the weight maps W made from them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._dtypes import to_accumulation_dtype
from .masks import topk_mask
from .pyramid import active_scales, blockwise_upsample, max_pool

__all__ = [
    "WEIGHT_MODES",
    "feature_guidance",
    "region_aware_guidance",
    "soft_weights",
    "mask_weights",
    "guidance_weights",
]

WEIGHT_MODES = ("soft", "mask")


def feature_guidance(s_feat: Tensor, t_feat: Tensor) -> Tensor:
    """``mean_c (T - S)^2``: two (N, C, H, W) maps -> float32 (N, H, W)."""
    return (to_accumulation_dtype(t_feat) - to_accumulation_dtype(s_feat)).square().mean(dim=1)


def region_aware_guidance(guide: Tensor, scales: Sequence[int]) -> Tensor:
    """``mean_s blockwise_upsample(max_pool(D, s))`` over the scales that fit: (N, H, W) -> (N, H, W).

    Every position takes, at each scale, the largest guidance of its s x s window, so a
    strong difference spreads over its region. Scales larger than the map are skipped; a
    map smaller than every scale is returned unchanged.
    """
    h, w = guide.shape[-2:]
    d = guide.unsqueeze(1)
    used = active_scales(h, w, scales)
    if not used:
        return guide
    out = blockwise_upsample(max_pool(d, used[0]), used[0], (h, w))
    for s in used[1:]:
        out = out + blockwise_upsample(max_pool(d, s), s, (h, w))
    return (out / len(used)).squeeze(1)


def soft_weights(guide: Tensor, tau_w: float) -> Tensor:
    """``P * softmax_p(D / tau_w)`` per image: (N, P) -> float32 (N, P), mean exactly 1."""
    p = guide.shape[1]
    return p * torch.softmax(to_accumulation_dtype(guide) / tau_w, dim=1)


def mask_weights(guide: Tensor, ratio: float) -> Tensor:
    """1 on the top ``round(ratio * P)`` positions by D, 0 elsewhere: (N, P) -> float32 (N, P).

    Ties: lower index first.
    """
    return 1.0 - topk_mask(guide, ratio, largest=True)


def guidance_weights(guide: Tensor, mode: str, *, tau_w: float = 0.1, ratio: float = 0.5) -> Tensor:
    """W from D (N, P) under ``mode`` "soft" or "mask"; detached, float32 (N, P)."""
    guide = guide.detach()
    if mode == "soft":
        return soft_weights(guide, tau_w)
    if mode == "mask":
        return mask_weights(guide, ratio)
    raise ValueError(f"weights must be one of {WEIGHT_MODES!r}, got {mode!r}")
