"""Teacher attention (FGD, Yang et al., CVPR 2022): where and in which channels a map is active.

All statistics are computed in float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._dtypes import to_accumulation_dtype

__all__ = [
    "attention_from_saliency",
    "spatial_saliency",
    "channel_saliency",
    "saliencies",
    "spatial_attention",
    "channel_attention",
    "teacher_attention",
]


def spatial_saliency(feat: Tensor) -> Tensor:
    """``mean_c |feat|``: (N, C, H, W) -> (N, 1, H, W), float32."""
    return to_accumulation_dtype(feat).abs().mean(dim=1, keepdim=True)


def channel_saliency(feat: Tensor) -> Tensor:
    """``mean_{h,w} |feat|``: (N, C, H, W) -> (N, C, 1, 1), float32."""
    return to_accumulation_dtype(feat).abs().mean(dim=(2, 3), keepdim=True)


def saliencies(feat: Tensor) -> tuple[Tensor, Tensor]:
    """``(spatial_saliency(feat), channel_saliency(feat))`` from one ``|feat|``: (N, 1, H, W), (N, C, 1, 1)."""
    magnitude = to_accumulation_dtype(feat).abs()
    return magnitude.mean(dim=1, keepdim=True), magnitude.mean(dim=(2, 3), keepdim=True)


def attention_from_saliency(saliency: Tensor, tau: float) -> Tensor:
    """``count * softmax(saliency / tau)`` over each image's entries, same shape as ``saliency``.

    (N, 1, H, W) spatial saliency -> spatial attention; (N, C, 1, 1) channel saliency ->
    channel attention. The mean over each image's entries is exactly 1 (up to rounding).
    """
    n = saliency.shape[0]
    flat = saliency.reshape(n, -1)
    return (flat.shape[1] * torch.softmax(flat / tau, dim=1)).reshape(saliency.shape)


def spatial_attention(feat: Tensor, tau: float) -> Tensor:
    """``H*W * softmax_{h,w}(mean_c |feat| / tau)`` per image: (N, C, H, W) -> (N, 1, H, W)."""
    return attention_from_saliency(spatial_saliency(feat), tau)


def channel_attention(feat: Tensor, tau: float) -> Tensor:
    """``C * softmax_c(mean_{h,w} |feat| / tau)`` per image: (N, C, H, W) -> (N, C, 1, 1)."""
    return attention_from_saliency(channel_saliency(feat), tau)


def teacher_attention(feat: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Both attentions of one map: ``(A_sp (N, 1, H, W), A_ch (N, C, 1, 1))``, float32."""
    sp, ch = saliencies(feat)
    return attention_from_saliency(sp, tau), attention_from_saliency(ch, tau)
