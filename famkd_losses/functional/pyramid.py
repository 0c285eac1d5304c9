"""The scale-aware pyramid: max-pooled copies of a map over s x s windows."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from .attention import saliencies

__all__ = ["active_scales", "max_pool", "maxpool_pyramid", "teacher_pyramid", "blockwise_upsample"]


def active_scales(height: int, width: int, scales: Sequence[int]) -> tuple[int, ...]:
    """The scales that fit a ``height x width`` map: ``s <= min(height, width)``.

    Larger windows would pool a tiny map (P6/P7) to a single cell and are skipped.
    """
    return tuple(s for s in scales if s <= min(height, width))


def max_pool(x: Tensor, scale: int) -> Tensor:
    """``max_pool2d(x, kernel=scale, stride=scale, ceil_mode=True)``; ``scale == 1`` is ``x``.

    (N, C, H, W) -> (N, C, ceil(H/s), ceil(W/s)); the last row/column windows may be partial.
    """
    if scale == 1:
        return x
    return F.max_pool2d(x, kernel_size=scale, stride=scale, ceil_mode=True)


def maxpool_pyramid(x: Tensor, scales: Sequence[int]) -> list[tuple[int, Tensor]]:
    """``[(s, max_pool(x, s)) for each active scale s]`` of an (N, C, H, W) map."""
    return [(s, max_pool(x, s)) for s in active_scales(x.shape[-2], x.shape[-1], scales)]


def teacher_pyramid(t: Tensor, scales: Sequence[int]) -> list[tuple[Tensor, Tensor, Tensor]]:
    """The teacher's statistics at each of ``scales`` (all must fit the map): for each scale
    ``(t_s, spatial_saliency(t_s), channel_saliency(t_s))`` with ``t_s = max_pool(t, s)``:
    (N, C, h, w), float32 (N, 1, h, w), float32 (N, C, 1, 1)."""
    out = []
    for s in scales:
        t_s = max_pool(t, s)
        out.append((t_s, *saliencies(t_s)))
    return out


def blockwise_upsample(x: Tensor, scale: int, size: tuple[int, int]) -> Tensor:
    """Undo `max_pool` on the grid: every cell repeated ``scale x scale``, cropped to ``size``.

    (..., h, w) -> (..., H, W); each position receives the value of the window that pooled it.
    """
    if scale == 1:
        return x
    up = x.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return up[..., : size[0], : size[1]]
