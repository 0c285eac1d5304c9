"""Teacher attention (FGD, Yang et al., CVPR 2022): where and in which channels a map is active.

All statistics are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dtypes import acc

__all__ = [
    "spatial_saliency",
    "channel_saliency",
    "spatial_attention",
    "channel_attention",
    "teacher_attention",
]


def spatial_saliency(feat: Tensor) -> Tensor:
    """``mean_c |feat|``: (N, C, H, W) -> (N, 1, H, W), float32."""
    return acc(feat).abs().mean(dim=1, keepdim=True)


def channel_saliency(feat: Tensor) -> Tensor:
    """``mean_{h,w} |feat|``: (N, C, H, W) -> (N, C, 1, 1), float32."""
    return acc(feat).abs().mean(dim=(2, 3), keepdim=True)


def spatial_attention(feat: Tensor, tau: float) -> Tensor:
    """``H*W * softmax_{h,w}(mean_c |feat| / tau)`` per image: (N, C, H, W) -> (N, 1, H, W).

    Its mean over positions is exactly 1 (up to rounding).
    """
    n, _, h, w = feat.shape
    logits = spatial_saliency(feat).reshape(n, h * w) / tau
    return (h * w * torch.softmax(logits, dim=1)).reshape(n, 1, h, w)


def channel_attention(feat: Tensor, tau: float) -> Tensor:
    """``C * softmax_c(mean_{h,w} |feat| / tau)`` per image: (N, C, H, W) -> (N, C, 1, 1).

    Its mean over channels is exactly 1 (up to rounding).
    """
    n, c = feat.shape[:2]
    logits = channel_saliency(feat).reshape(n, c) / tau
    return (c * torch.softmax(logits, dim=1)).reshape(n, c, 1, 1)


def teacher_attention(feat: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Both attentions of one map: ``(A_sp (N, 1, H, W), A_ch (N, C, 1, 1))``, float32."""
    return spatial_attention(feat, tau), channel_attention(feat, tau)
