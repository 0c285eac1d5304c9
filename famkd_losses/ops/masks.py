"""Masks from saliencies, and the masked inputs of the generators."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .. import functional as F
from ._dispatch import dispatch

__all__ = ["topk_mask", "masked_inputs"]


def _kernels():
    from ..kernels import masking

    return masking


def topk_mask(scores: Tensor, ratio: float, *, largest: bool = True, backend: str = "auto") -> Tensor:
    """`famkd_losses.functional.topk_mask`: (N, M) scores -> float32 (N, M), 0 on each row's
    ``num_masked(M, ratio)`` top entries; fused: one launch for rows up to
    `famkd_losses.kernels.masking.MAX_RANK_ENTRIES` long."""
    return dispatch(
        "topk_mask",
        backend,
        lambda s, r, lg: _kernels().topk_mask(s, r, largest=lg),
        lambda s, r, lg: F.topk_mask(s, r, largest=lg),
        (scores, ratio, largest),
        accepts=lambda s, *_: _kernels().topk_supported(s),
    )


def _reference(x: Tensor, masks: Sequence[Tensor]) -> list[Tensor]:
    return [x * m.to(x.dtype) for m in masks]


def masked_inputs(x: Tensor, masks: Sequence[Tensor], *, backend: str = "auto") -> list[Tensor]:
    """``[x * m for m in masks]`` (each 0/1 mask spatial (N, 1, H, W) or channel (N, C, 1, 1), in
    ``x``'s dtype); fused: one read of ``x`` for every mask, one pass backward."""
    return dispatch(
        "masked_inputs",
        backend,
        lambda x, masks: _kernels().masked_branches(x, masks),
        _reference,
        (x, list(masks)),
        accepts=lambda x, masks: _kernels().supported(x, masks),
    )
