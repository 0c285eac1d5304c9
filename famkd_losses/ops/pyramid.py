"""The scale-aware pyramids: the teacher's pooled maps with their saliencies, and the student's pooled maps."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .. import functional as F
from ._dispatch import dispatch

__all__ = ["teacher_pyramid", "maxpool_pyramid"]


def _kernels():
    from ..kernels import teacher_stats

    return teacher_stats


def teacher_pyramid(t: Tensor, scales: Sequence[int], *, backend: str = "auto") -> list[tuple[Tensor, Tensor, Tensor]]:
    """`famkd_losses.functional.teacher_pyramid`: for each of ``scales`` (all fitting the map)
    ``(t_s, spatial_saliency(t_s), channel_saliency(t_s))``; fused: one read of ``t``."""

    def kernel(t: Tensor, scales: tuple[int, ...]) -> list[tuple[Tensor, Tensor, Tensor]]:
        return [stats[1:] for stats in _kernels().teacher_saliency_pyramid(t, scales)]

    return dispatch(
        "teacher_pyramid",
        backend,
        kernel,
        F.teacher_pyramid,
        (t, tuple(scales)),
        accepts=lambda t, _: _kernels().supported(t),
    )


def maxpool_pyramid(x: Tensor, scales: Sequence[int], *, backend: str = "auto") -> list[tuple[int, Tensor]]:
    """`famkd_losses.functional.maxpool_pyramid`: ``[(s, max_pool(x, s))]`` for the scales that
    fit; fused: one read of ``x`` forward and one write of its gradient backward."""
    return dispatch(
        "maxpool_pyramid",
        backend,
        lambda x, scales: _kernels().max_pool_pyramid_student(x, scales),
        F.maxpool_pyramid,
        (x, tuple(scales)),
        accepts=lambda x, _: _kernels().supported(x),
    )
