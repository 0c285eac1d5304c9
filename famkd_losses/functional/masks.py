"""Masks: which positions or channels a student feature hides before reconstruction.

A mask is 0 where the input is hidden and 1 where it is kept. Selections are made per
image, on the device of the scores, with no host synchronisation. Randomness comes from
an optional ``torch.Generator`` so that runs can be reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._dtypes import to_accumulation_dtype
from .attention import channel_saliency, spatial_saliency

__all__ = [
    "MASK_MODES",
    "num_masked",
    "topk_mask",
    "selection_keys",
    "select_mask",
    "mask_from_saliency",
    "spatial_mask",
    "channel_mask",
    "bernoulli_mask",
    "box_masks",
]

MASK_MODES = ("topk", "topk_nonsalient", "sample", "random")


def num_masked(count: int, ratio: float) -> int:
    """How many of ``count`` entries a ratio hides: ``floor(ratio * count + 0.5)`` (round half up)."""
    return min(count, math.floor(ratio * count + 0.5))


def _uniform(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) noise drawn from ``generator`` (on its own device) and moved to ``device``."""
    if generator is None:
        return torch.rand(tuple(shape), device=device)
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def topk_mask(scores: Tensor, ratio: float, *, largest: bool = True) -> Tensor:
    """Hide the ``num_masked(M, ratio)`` highest (``largest``) or lowest scores of each row.

    scores: (N, M). Returns a float32 (N, M) mask, 0 on the hidden entries. Ties are broken
    deterministically: among equal scores the lower index is hidden first.
    """
    n, m = scores.shape
    k = num_masked(m, ratio)
    mask = torch.ones((n, m), dtype=torch.float32, device=scores.device)
    if k == 0:
        return mask
    order = torch.sort(scores, dim=1, descending=largest, stable=True).indices[:, :k]
    return mask.scatter(1, order, 0.0)


def selection_keys(
    scores: Tensor, mode: str, tau: float, generator: torch.Generator | None = None
) -> tuple[Tensor, bool]:
    """The keys whose top entries a mask mode hides, and whether the top means the largest.

    - ``"topk"``: the scores themselves (the most salient entries are hidden);
    - ``"topk_nonsalient"``: the scores, smallest first (the least salient are hidden);
    - ``"sample"``: ``scores / tau + Gumbel noise``; the top k of these keys are k draws
      without replacement with probability proportional to ``softmax(scores / tau)``, i.e.
      to the attention (Gumbel-top-k);
    - ``"random"``: uniform noise (a uniformly random subset of exactly k entries).
    """
    if mode == "topk":
        return scores, True
    if mode == "topk_nonsalient":
        return scores, False
    if mode == "sample":
        u = _uniform(scores.shape, generator, scores.device).clamp_(min=torch.finfo(torch.float32).tiny)
        return to_accumulation_dtype(scores) / tau - torch.log(-torch.log(u)), True
    if mode == "random":
        return _uniform(scores.shape, generator, scores.device), True
    raise ValueError(f"mask_mode must be one of {MASK_MODES!r}, got {mode!r}")


def select_mask(
    scores: Tensor,
    ratio: float,
    mode: str = "topk",
    tau: float = 0.5,
    generator: torch.Generator | None = None,
    topk: Callable[..., Tensor] = topk_mask,
) -> Tensor:
    """Mask of (N, M) scores under a mask mode (see `selection_keys`); float32 (N, M).
    ``topk``: the implementation of `topk_mask` to use (same signature and result)."""
    keys, largest = selection_keys(scores, mode, tau, generator)
    return topk(keys, ratio, largest=largest)


def mask_from_saliency(
    saliency: Tensor,
    ratio: float,
    mode: str = "topk",
    tau: float = 0.5,
    generator: torch.Generator | None = None,
    topk: Callable[..., Tensor] = topk_mask,
) -> Tensor:
    """Mask ranked on a saliency map, same shape: (N, 1, H, W) hides positions, (N, C, 1, 1)
    hides channels. float32. Softmax is monotonic, so ranking the saliency ranks the attention.
    ``topk`` as in `select_mask`."""
    n = saliency.shape[0]
    return select_mask(saliency.reshape(n, -1), ratio, mode, tau, generator, topk).reshape(saliency.shape)


def spatial_mask(
    feat: Tensor, ratio: float, mode: str = "topk", tau: float = 0.5, generator: torch.Generator | None = None
) -> Tensor:
    """Spatial mask ranked on ``mean_c |feat|``: (N, C, H, W) -> float32 (N, 1, H, W)."""
    return mask_from_saliency(spatial_saliency(feat), ratio, mode, tau, generator)


def channel_mask(
    feat: Tensor, ratio: float, mode: str = "topk", tau: float = 0.5, generator: torch.Generator | None = None
) -> Tensor:
    """Channel mask ranked on ``mean_{h,w} |feat|``: (N, C, H, W) -> float32 (N, C, 1, 1)."""
    return mask_from_saliency(channel_saliency(feat), ratio, mode, tau, generator)


def bernoulli_mask(
    shape: Sequence[int], ratio: float, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """MGD's random mask: each entry hidden independently with probability ``ratio``.

    As the official code: ``u = rand(shape); mask = 0 where u > 1 - ratio else 1``. float32.
    """
    u = _uniform(shape, generator, torch.device(device))
    return (u <= 1.0 - ratio).float()


def box_masks(
    boxes: Sequence[Tensor], feat_size: tuple[int, int], image_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """FGD's foreground and background masks of one FPN level.

    boxes: N tensors (n_i, 4), x1 y1 x2 y2 in input-image pixels (n_i may be 0).
    feat_size: (H, W) of the map; image_size: (H_img, W_img) of the (padded) input that the
    map covers. The official code scales by each image's unpadded size instead; the size the
    map covers is what its cells mean, so that is used here.

    A box maps to the grid as ``x * W / W_img``, then ``floor`` x1/y1 and ``ceil`` x2/y2; it
    covers rows y1..y2 and columns x1..x2 inclusive, clipped to the map, and weighs
    ``1 / ((y2-y1+1) (x2-x1+1))`` (unclipped corners). Overlaps keep the larger weight.
    Background: ``[fg == 0] / count`` per image, all zero when no cell is background.

    The mapping is computed in float64 (float32 on MPS), so a corner that lands exactly on a
    cell edge stays there. The official code computes ``x / W_img * W`` in float32, which can
    round such a corner up and ``ceil`` it one cell further (e.g. x = 24 on a 1344-pixel input
    and a 168-cell map gives 3.0000002 -> 4 instead of 3; about 0.3% of integer corners at
    COCO sizes).

    Returns (M_fg, M_bg), each float32 (N, 1, H, W).
    """
    h, w = feat_size
    img_h, img_w = image_size
    fgs = []
    for b in boxes:
        dev = b.device
        rows = torch.arange(h, device=dev)
        cols = torch.arange(w, device=dev)
        if b.shape[0] == 0:
            fgs.append(torch.zeros((h, w), dtype=torch.float32, device=dev))
            continue
        b = b.to(torch.float32 if dev.type == "mps" else torch.float64)
        x1 = torch.floor(b[:, 0] * w / img_w).long()
        y1 = torch.floor(b[:, 1] * h / img_h).long()
        x2 = torch.ceil(b[:, 2] * w / img_w).long()
        y2 = torch.ceil(b[:, 3] * h / img_h).long()
        weight = 1.0 / ((y2 + 1 - y1) * (x2 + 1 - x1)).float()  # (n,)
        in_rows = (rows[None, :] >= y1[:, None]) & (rows[None, :] <= y2[:, None])  # (n, H)
        in_cols = (cols[None, :] >= x1[:, None]) & (cols[None, :] <= x2[:, None])  # (n, W)
        inside = in_rows[:, :, None] & in_cols[:, None, :]  # (n, H, W)
        fgs.append(torch.where(inside, weight[:, None, None], 0.0).amax(dim=0))
    fg = torch.stack(fgs).unsqueeze(1)
    bg = (fg == 0).float()
    count = bg.sum(dim=(2, 3), keepdim=True)
    bg = torch.where(count > 0, bg / count.clamp(min=1.0), bg)
    return fg, bg
