"""Masks in Triton: the top-k mask of a row of scores in one launch, and the masked inputs of the
reconstruction branches (one read of the student map gives every branch's masked copy, and one
backward pass gives its gradient).

`topk_mask` is `famkd_losses.functional.topk_mask` (``ones``, a stable ``sort`` and a
``scatter``: three launches) in one launch, for rows of up to `MAX_RANK_ENTRIES` entries: each
entry's rank in the stable order is counted directly (how many entries come before it), and the
first k are hidden. The order is torch's stable sort: descending (``largest``) or ascending
values, NaN before every number when descending and after when ascending, equal values (-0.0
and +0.0 among them, as torch's CPU sort; CUDA's radix sort may put -0.0 first, which the
losses never meet: they rank non-negative saliencies and noise) and NaNs by index. The count
is quadratic in the row length, which is cheap for the channel masks (C entries) and small
spatial maps; longer rows keep the sort.

Reference (as `ScaleAwareMaskedFeatureLoss` builds each branch's generator input)::

    y_b = x * m_b                         # b = 0 (, 1): one or two branches
    dx  = sum_b dy_b * m_b

``x`` is (N, C, H, W), dense (contiguous or channels_last), float32/float16/bfloat16. Each mask
``m_b`` is 0/1 (any float dtype): a spatial mask (N, 1, H, W) or a channel mask (N, C, 1, 1), as
`famkd_losses.functional.mask_from_saliency` returns them. The products are computed in float32
and rounded once to x's dtype: with 0/1 masks every value, NaN and Inf included, is exactly what
``x * m_b.to(x.dtype)`` and autograd's sum of the branch gradients give.

Grid: tiles over the rows and columns of x's memory order, (N*C, H*W) for contiguous x and
(N*H*W, C) for channels_last, numbered along one grid axis (either count may pass 65535); each
program stores its own outputs (no atomics). The outputs
are ``empty_like(x)`` (same layout); gradients in another layout are brought to x's first.

Falls back to the reference (plain PyTorch) where the kernels cannot run, for x that is not
dense, masks of another shape, and for float64.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import HAS_TRITON, can_run, on_device
from ._common import has_kernel_dtype

__all__ = ["MAX_RANK_ENTRIES", "masked_branches", "supported", "topk_mask"]

_TILE = 2048  # elements per program
_NUM_WARPS = 8
MAX_RANK_ENTRIES = 2048  # longest row `topk_mask` ranks by counting (M^2 comparisons per row)
_RANK_BLOCK = 64

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _mask_offsets(rows, cols, C, HW, CHANNELS_LAST: tl.constexpr, SPATIAL: tl.constexpr):
        """Offsets into a contiguous (N, HW) spatial or (N, C) channel mask of the tile
        ``rows`` [BR] x ``cols`` [BC] (int64) of x's memory order."""
        if CHANNELS_LAST:  # rows: n*HW + hw, cols: c
            if SPATIAL:
                off = rows[:, None] + cols[None, :] * 0
            else:
                off = (rows // HW)[:, None] * C + cols[None, :]
        else:  # rows: n*C + c, cols: hw
            if SPATIAL:
                off = (rows // C)[:, None] * HW + cols[None, :]
            else:
                off = rows[:, None] + cols[None, :] * 0
        return off

    @triton.jit
    def _tile(ROWS, COLS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's tile of the (ROWS, COLS) memory order: row and column indices (int64),
        the in-bounds mask and the element offsets. Tiles are numbered along grid axis 0 alone,
        since the row and column tile counts may each exceed 65535."""
        pid = tl.program_id(0).to(tl.int64)
        col_tiles = tl.cdiv(COLS, BLOCK_C)
        rows = (pid // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (pid % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
        valid = (rows < ROWS)[:, None] & (cols < COLS)[None, :]
        return rows, cols, valid, rows[:, None] * COLS + cols[None, :]

    @triton.jit
    def _masked_fwd_kernel(
        x_ptr,  # [ROWS, COLS] x in its memory order (dense)
        m0_ptr,  # branch 0 mask: contiguous (N, HW) if SPATIAL0 else (N, C)
        m1_ptr,  # branch 1 mask (TWO only)
        y0_ptr,  # [ROWS, COLS] out, x's dtype and layout
        y1_ptr,  # [ROWS, COLS] out (TWO only)
        ROWS,
        COLS,
        C,
        HW,
        CHANNELS_LAST: tl.constexpr,
        SPATIAL0: tl.constexpr,
        SPATIAL1: tl.constexpr,
        TWO: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows, cols, valid, off = _tile(ROWS, COLS, BLOCK_R, BLOCK_C)
        x = tl.load(x_ptr + off, mask=valid, other=0.0).to(tl.float32)
        m0 = tl.load(m0_ptr + _mask_offsets(rows, cols, C, HW, CHANNELS_LAST, SPATIAL0), mask=valid, other=0.0)
        tl.store(y0_ptr + off, (x * m0.to(tl.float32)).to(y0_ptr.dtype.element_ty), mask=valid)
        if TWO:
            m1 = tl.load(m1_ptr + _mask_offsets(rows, cols, C, HW, CHANNELS_LAST, SPATIAL1), mask=valid, other=0.0)
            tl.store(y1_ptr + off, (x * m1.to(tl.float32)).to(y1_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _masked_bwd_kernel(
        g0_ptr,  # [ROWS, COLS] dL/dy0 in x's layout (HAS_G0)
        g1_ptr,  # [ROWS, COLS] dL/dy1 (HAS_G1)
        m0_ptr,
        m1_ptr,
        dx_ptr,  # [ROWS, COLS] out, x's dtype and layout
        ROWS,
        COLS,
        C,
        HW,
        CHANNELS_LAST: tl.constexpr,
        SPATIAL0: tl.constexpr,
        SPATIAL1: tl.constexpr,
        HAS_G0: tl.constexpr,
        HAS_G1: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        rows, cols, valid, off = _tile(ROWS, COLS, BLOCK_R, BLOCK_C)
        dx = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        if HAS_G0:
            g0 = tl.load(g0_ptr + off, mask=valid, other=0.0).to(tl.float32)
            m0 = tl.load(m0_ptr + _mask_offsets(rows, cols, C, HW, CHANNELS_LAST, SPATIAL0), mask=valid, other=0.0)
            dx += g0 * m0.to(tl.float32)
        if HAS_G1:
            g1 = tl.load(g1_ptr + off, mask=valid, other=0.0).to(tl.float32)
            m1 = tl.load(m1_ptr + _mask_offsets(rows, cols, C, HW, CHANNELS_LAST, SPATIAL1), mask=valid, other=0.0)
            dx += g1 * m1.to(tl.float32)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=valid)


if HAS_TRITON:

    @triton.jit
    def _rank_mask_kernel(
        keys_ptr,  # (N, M) scores, row stride below, float32/float16/bfloat16
        out_ptr,  # (N, M) float32 contiguous (out): 0 on the k entries that come first
        M,
        K,  # entries hidden per row
        stride_row,
        LARGEST: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(1).to(tl.int64)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok_i = i < M
        base = keys_ptr + row * stride_row
        ki = tl.load(base + i, mask=ok_i, other=0.0).to(tl.float32)
        nan_i = ki != ki
        rank = tl.zeros([BLOCK], dtype=tl.int32)
        for j0 in range(0, M, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            ok_j = j < M
            kj = tl.load(base + j, mask=ok_j, other=0.0).to(tl.float32)
            nan_j = kj != kj
            a = kj[None, :]  # the other entry, [BLOCK_i, BLOCK_j]
            b = ki[:, None]
            if LARGEST:  # descending; NaN first
                ahead = (a > b) | (nan_j[None, :] & ~nan_i[:, None])
            else:  # ascending; NaN last
                ahead = (a < b) | (~nan_j[None, :] & nan_i[:, None])
            tie = (a == b) | (nan_j[None, :] & nan_i[:, None])
            before = (ahead | (tie & (j[None, :] < i[:, None]))) & ok_j[None, :]
            rank += tl.sum(before.to(tl.int32), axis=1)
        tl.store(out_ptr + row * M + i, tl.where(rank < K, 0.0, 1.0), mask=ok_i)


def topk_mask(scores: Tensor, ratio: float, *, largest: bool = True) -> Tensor:
    """`famkd_losses.functional.topk_mask` in one launch: (N, M) scores -> float32 (N, M) mask,
    0 on the ``num_masked(M, ratio)`` first entries of each row in torch's stable sort order.
    Runs the reference for rows longer than `MAX_RANK_ENTRIES`, other dtypes, or tensors the
    kernels cannot run on."""
    from ..functional.masks import num_masked
    from ..functional.masks import topk_mask as reference

    n, m = scores.shape
    if not topk_supported(scores):
        return reference(scores, ratio, largest=largest)
    if m > 1 and scores.stride(1) != 1:
        scores = scores.contiguous()
    out = torch.empty((n, m), dtype=torch.float32, device=scores.device)
    with on_device(scores):
        _rank_mask_kernel[(triton.cdiv(m, _RANK_BLOCK), n)](
            # one entry per row (m == 1): the rank is always 0, any row stride reads it
            scores, out, m, num_masked(m, ratio), scores.stride(0) if m > 1 else 0, LARGEST=largest,
            BLOCK=_RANK_BLOCK, num_warps=8,
        )  # fmt: skip
    return out


def _memory_format(x: Tensor) -> torch.memory_format | None:
    """contiguous_format or channels_last if x is dense in that order (channels_last preferred
    when both hold, as for C == 1 or H == W == 1), else None."""
    if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1:
        return torch.channels_last
    if x.is_contiguous():
        return torch.contiguous_format
    return None


def _mask_kind(m: Tensor, x: Tensor) -> bool | None:
    """True for a spatial mask (N, 1, H, W), False for a channel mask (N, C, 1, 1), None otherwise."""
    n, c, h, w = x.shape
    if m.dim() != 4 or not m.is_floating_point() or m.device != x.device:
        return None
    if tuple(m.shape) == (n, 1, h, w) and (c > 1 or (h, w) != (1, 1)):
        return True
    if tuple(m.shape) == (n, c, 1, 1):
        return False
    return None


def supported(x: Tensor, masks: Sequence[Tensor]) -> bool:
    """Whether `masked_branches` runs the kernels (else it runs the reference)."""
    return (
        HAS_TRITON
        and x.dim() == 4
        and has_kernel_dtype(x)
        and x.numel() > 0
        and 1 <= len(masks) <= 2
        and _memory_format(x) is not None
        and all(_mask_kind(m, x) is not None for m in masks)
        and can_run(x, *masks)
    )


class _Tiling(NamedTuple):
    """x's memory order as a (rows, cols) matrix, (N*C, H*W) or (N*H*W, C) for channels_last,
    cut into [block_r, block_c] tiles."""

    rows: int
    cols: int
    channels: int  # C
    spatial: int  # H*W
    block_r: int
    block_c: int

    @property
    def grid(self) -> tuple[int]:
        """One program per tile, along grid axis 0."""
        return (triton.cdiv(self.rows, self.block_r) * triton.cdiv(self.cols, self.block_c),)


def _tiling(shape: torch.Size, channels_last: bool) -> _Tiling:
    """The tiling of an (N, C, H, W) map, contiguous or channels_last."""
    n, c, h, w = shape
    rows, cols = (n * h * w, c) if channels_last else (n * c, h * w)
    block_c = min(triton.next_power_of_2(cols), 256 if channels_last else 512)
    block_r = max(1, min(triton.next_power_of_2(rows), _TILE // block_c))
    return _Tiling(rows, cols, c, h * w, block_r, block_c)


class _MaskedBranches(torch.autograd.Function):
    """``(x, m0[, m1]) -> (x * m0[, x * m1])``; gradient to x only (masks are constants)."""

    @staticmethod
    def forward(ctx, x: Tensor, *masks: Tensor):  # type: ignore[override]
        fmt = _memory_format(x)
        channels_last = fmt == torch.channels_last
        kinds = [_mask_kind(m, x) for m in masks]
        flat = [m.reshape(x.shape[0], -1).contiguous() for m in masks]  # (N, HW) or (N, C)
        outs = [torch.empty_like(x, memory_format=fmt) for _ in masks]
        tiles = _tiling(x.shape, channels_last)
        with on_device(x):
            _masked_fwd_kernel[tiles.grid](
                x, flat[0], flat[-1], outs[0], outs[-1], tiles.rows, tiles.cols, tiles.channels, tiles.spatial,
                CHANNELS_LAST=channels_last, SPATIAL0=kinds[0], SPATIAL1=kinds[-1], TWO=len(masks) == 2,
                BLOCK_R=tiles.block_r, BLOCK_C=tiles.block_c, num_warps=_NUM_WARPS,
            )  # fmt: skip
        ctx.save_for_backward(*flat)
        ctx.kinds, ctx.fmt, ctx.meta = kinds, fmt, (x.shape, x.dtype, x.device)
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor | None):
        flat = ctx.saved_tensors
        shape, dtype, device = ctx.meta
        none = (None,) * len(flat)
        if not ctx.needs_input_grad[0] or all(g is None for g in grads):
            return (None, *none)
        channels_last = ctx.fmt == torch.channels_last
        gs = [None if g is None else g.contiguous(memory_format=ctx.fmt) for g in grads]
        dx = torch.empty(shape, dtype=dtype, device=device, memory_format=ctx.fmt)
        tiles = _tiling(shape, channels_last)
        dummy = next(g for g in gs if g is not None)
        with on_device(dx):
            _masked_bwd_kernel[tiles.grid](
                gs[0] if gs[0] is not None else dummy, gs[-1] if gs[-1] is not None else dummy,
                flat[0], flat[-1], dx, tiles.rows, tiles.cols, tiles.channels, tiles.spatial,
                CHANNELS_LAST=channels_last, SPATIAL0=ctx.kinds[0], SPATIAL1=ctx.kinds[-1],
                HAS_G0=gs[0] is not None, HAS_G1=len(gs) == 2 and gs[1] is not None,
                BLOCK_R=tiles.block_r, BLOCK_C=tiles.block_c, num_warps=_NUM_WARPS,
            )  # fmt: skip
        return (dx, *none)


def masked_branches(x: Tensor, masks: Sequence[Tensor]) -> list[Tensor]:
    """``[x * m for m in masks]`` for one or two 0/1 masks, from one read of ``x``.

    Args:
        x: (N, C, H, W) student map (the pooled, aligned student of one scale), float32/float16/
            bfloat16, contiguous or channels_last.
        masks: one or two masks, each spatial (N, 1, H, W) or channel (N, C, 1, 1), values 0 or 1
            (no gradient flows to them).

    Returns:
        One (N, C, H, W) tensor per mask, in x's dtype and layout. The backward writes
        ``dx = sum_b dy_b * m_b`` in one pass. Runs the reference ``x * m.to(x.dtype)`` where
        `supported` is False.
    """
    if not supported(x, masks):
        return [x * m.to(x.dtype) for m in masks]
    masks = [m.detach() for m in masks]
    return list(_MaskedBranches.apply(x, *masks))


def topk_supported(scores: Tensor) -> bool:
    """Whether `topk_mask` ranks ``scores`` (N, M) in one launch (M up to `MAX_RANK_ENTRIES`)."""
    return (
        HAS_TRITON
        and scores.dim() == 2
        and scores.shape[0] > 0
        and 0 < scores.shape[1] <= MAX_RANK_ENTRIES
        and has_kernel_dtype(scores)
        and can_run(scores)
    )
