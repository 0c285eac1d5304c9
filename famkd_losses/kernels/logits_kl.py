"""Fused per-position KL and logit guidance of the masked logits loss (Triton).

One read of the student and teacher logits gives both

- ``kl`` (N, P) float32 = `famkd_losses.functional.position_kl` (KL summed over anchors
  and classes, no ``T^2`` factor), differentiable w.r.t. the student logits, and
- ``d`` (N, P) float32 = `famkd_losses.functional.position_prob_diff` (``mean_{a,k} |p - q|``),
  non-differentiable,

and the backward writes ``d s = dkl[n, p] * (q - p) / T`` in one pass that recomputes ``p`` and
``q`` from the saved logits. ``p = sigmoid(t / T)``, ``q = sigmoid(s / T)`` per class for the
sigmoid head; the softmax of ``t / T``, ``s / T`` over the K classes of each anchor for the softmax
head. No gradient flows to the teacher: the losses always detach it.

Layouts as the reference: dense ``(N, A*K, H, W)`` (channel ``a*K + k``, P = H*W) or flattened
``(N, P, K)`` (A = 1), any strides (channels_last, permuted or sliced views are read in place);
float32, float16 or bfloat16 logits, loaded and computed in float32. The gradient has the
student's dtype and, for a dense-and-non-overlapping student, its strides.

Grid: (blocks of positions, splits, images); each program owns its outputs (no atomics). The
sigmoid head loops over its split's share of the A*K channels in ``BLOCK_C`` chunks of a
``[BLOCK_P, BLOCK_C]`` tile; the softmax head loops over its split's anchors with a
``[BLOCK_P, BLOCK_K]`` tile, ``BLOCK_K = next_power_of_2(K)`` (K up to `MAX_SOFTMAX_CLASSES`).
The splits fill the GPU on small levels and batches; the forward adds their partial sums in
a fixed order. Tiles are oriented along whichever of
positions (NCHW) or channels (channels_last, flattened) is contiguous in the student.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..functional.logits import HEADS
from . import HAS_TRITON, can_run, on_device
from ._common import KERNEL_DTYPES, has_kernel_dtype

__all__ = [
    "MAX_SOFTMAX_CLASSES",
    "SUPPORTED_DTYPES",
    "PositionKL",
    "position_kl_and_guidance",
    "supported",
]

SUPPORTED_DTYPES = KERNEL_DTYPES
MAX_SOFTMAX_CLASSES = 16384  # one anchor's K classes live in one tile
_TILE = 2048  # elements of one [BLOCK_P, BLOCK_C | BLOCK_K] tile (more only when one anchor needs it)
_MAX_BLOCK_P = 128
# The channel (sigmoid) or anchor (softmax) loop is split over grid axis 1 until the launch has
# about _WAVES programs per SM: at batch 2, P4 of a COCO FPN gives only 66 position blocks for
# 132 SMs otherwise. The forward's partial sums are added in a fixed order (no atomics).
_WAVES = 4
_INTERPRETER_SMS = 2  # a small stand-in, so that tests in the interpreter exercise the split
# The split forward adds its partial sums with two more (tiny) launches: worth it only where
# reading the level takes longer than a launch (4 MB of bf16 logits per tensor, P4 of a COCO
# RetinaNet head at batch 2; not P5-P7). The backward splits at no extra launch.
_MIN_SPLIT_ELEMENTS = 1 << 21

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import spatial_offsets

    @triton.jit
    def _position_block(P, BLOCK_P: tl.constexpr):
        """This program's image ``n`` (grid axis 2, int64) and positions ``offs_p`` [BLOCK_P]
        (block ``program_id(0)``), with their in-range mask."""
        n = tl.program_id(2).to(tl.int64)
        offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        return n, offs_p, offs_p < P

    @triton.jit
    def _rows(ptr, n, offs_p, width, stride_n, stride_h, stride_w, SPLIT_HW: tl.constexpr):
        """Pointers [BLOCK_P, 1] to channel 0 of positions ``offs_p`` (``p = h*width + w``) of
        image ``n``; without SPLIT_HW the positions have the one stride ``stride_w``."""
        return ptr + n * stride_n + spatial_offsets(offs_p, width, stride_h, stride_w, SPLIT_HW)[:, None]

    @triton.jit
    def _log1p(u):
        """``log(1 + u)`` for u in [0, 1], accurate for tiny u (``(1+u)-1`` undoes the rounding of ``1+u``)."""
        w = 1.0 + u
        den = tl.where(w == 1.0, 1.0, w - 1.0)
        return tl.where(w == 1.0, u, tl.log(w) * (u / den))

    @triton.jit
    def _sigmoids(a, b):
        """``p = sigmoid(a)``, ``q = sigmoid(b)`` and the pieces the binary KL reuses."""
        ea = tl.exp(-tl.abs(a))
        eb = tl.exp(-tl.abs(b))
        ra = 1.0 / (1.0 + ea)
        rb = 1.0 / (1.0 + eb)
        p = tl.where(a >= 0, ra, ea * ra)
        q = tl.where(b >= 0, rb, eb * rb)
        return p, q, ea, eb, ra

    @triton.jit
    def _binary_kl(a, b, ea, eb, ra):
        """KL(Bern(sigmoid(a)) || Bern(sigmoid(b))) elementwise.

        The reference's ``p*(a - b) + softplus(b) - softplus(a)``, evaluated after the reflection
        ``(a, b) -> (-a, -b)`` (which leaves the KL unchanged) that makes the teacher logit
        ``x = -|a| <= 0``: then ``softplus(x) = log1p(e^-|a|)`` and no two terms of size ``|a|``
        cancel when both logits are large.
        """
        y = tl.where(a >= 0, -b, b)
        x = -tl.abs(a)
        m = ea * ra  # sigmoid(x)
        return m * (x - y) + tl.maximum(y, 0.0) + _log1p(eb) - _log1p(ea)

    @triton.jit
    def _softmaxes(a, b, mask_k):
        """Row softmaxes of ``a``, ``b`` [BLOCK_P, BLOCK_K] over the valid classes ``mask_k`` [BLOCK_K].

        Masked entries hold finite values (loaded as 0), so no ``inf - inf`` arises; they get
        ``p = q = 0``. Returns ``p``, ``q`` and ``log p - log q``.
        """
        mk = mask_k[None, :]
        ma = tl.max(tl.where(mk, a, float("-inf")), axis=1)
        mb = tl.max(tl.where(mk, b, float("-inf")), axis=1)
        sa = a - ma[:, None]
        sb = b - mb[:, None]
        ea = tl.where(mk, tl.exp(sa), 0.0)
        eb = tl.where(mk, tl.exp(sb), 0.0)
        za = tl.sum(ea, axis=1)
        zb = tl.sum(eb, axis=1)
        p = ea * (1.0 / za)[:, None]
        q = eb * (1.0 / zb)[:, None]
        log_ratio = (sa - tl.log(za)[:, None]) - (sb - tl.log(zb)[:, None])
        return p, q, log_ratio

    @triton.jit
    def _sigmoid_fwd_kernel(
        s_ptr,  # [N, C, P] student logits (strides below), f32/f16/bf16
        t_ptr,  # [N, C, P] teacher logits
        kl_ptr,  # [N, S, P] float32, contiguous (out): partial sums over each split's channels
        d_ptr,  # [N, S, P] float32, contiguous (out)
        C,  # channels A*K
        SPAN,  # channels per split (a multiple of BLOCK_C); S = cdiv(C, SPAN) splits on grid axis 1
        P,  # positions
        width,  # W: p = h*W + w (used when SPLIT_HW)
        s_sn,  # student strides (elements): image
        s_sc,  # channel
        s_sh,  # row (SPLIT_HW only)
        s_sw,  # column, or the one stride of the positions
        t_sn,  # teacher strides: image
        t_sc,  # channel
        t_sh,  # row (SPLIT_HW only)
        t_sw,  # column, or the one stride of the positions
        inv_t,  # 1 / T
        inv_c,  # 1 / C
        SPLIT_HW: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        pid_s = tl.program_id(1)
        n, offs_p, mask_p = _position_block(P, BLOCK_P)
        s_rows = _rows(s_ptr, n, offs_p, width, s_sn, s_sh, s_sw, SPLIT_HW)
        t_rows = _rows(t_ptr, n, offs_p, width, t_sn, t_sh, t_sw, SPLIT_HW)
        kl_acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        d_acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        c_begin = pid_s * SPAN
        for c0 in range(c_begin, tl.minimum(C, c_begin + SPAN), BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = mask_p[:, None] & (offs_c < C)[None, :]
            s = tl.load(s_rows + offs_c[None, :] * s_sc, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_rows + offs_c[None, :] * t_sc, mask=mask, other=0.0).to(tl.float32)
            a = t * inv_t
            b = s * inv_t
            p, q, ea, eb, ra = _sigmoids(a, b)
            kl_acc += tl.where(mask, _binary_kl(a, b, ea, eb, ra), 0.0)
            d_acc += tl.where(mask, tl.abs(p - q), 0.0)
        out = (n * tl.num_programs(1) + pid_s) * P + offs_p
        tl.store(kl_ptr + out, tl.sum(kl_acc, axis=1), mask=mask_p)
        tl.store(d_ptr + out, tl.sum(d_acc, axis=1) * inv_c, mask=mask_p)

    @triton.jit
    def _softmax_fwd_kernel(
        s_ptr,  # [N, A*K, P] student logits (strides below), f32/f16/bf16
        t_ptr,  # [N, A*K, P] teacher logits
        kl_ptr,  # [N, S, P] float32, contiguous (out): partial sums over each split's anchors
        d_ptr,  # [N, S, P] float32, contiguous (out)
        A,  # anchors
        SPAN,  # anchors per split; S = cdiv(A, SPAN) splits on grid axis 1
        K,  # classes per anchor
        P,  # positions
        width,  # W: p = h*W + w (used when SPLIT_HW)
        s_sn,  # student strides (elements): image
        s_sc,  # channel
        s_sh,  # row (SPLIT_HW only)
        s_sw,  # column, or the one stride of the positions
        t_sn,  # teacher strides: image
        t_sc,  # channel
        t_sh,  # row (SPLIT_HW only)
        t_sw,  # column, or the one stride of the positions
        inv_t,  # 1 / T
        inv_c,  # 1 / (A*K)
        SPLIT_HW: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_s = tl.program_id(1)
        n, offs_p, mask_p = _position_block(P, BLOCK_P)
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask = mask_p[:, None] & mask_k[None, :]
        s_rows = _rows(s_ptr, n, offs_p, width, s_sn, s_sh, s_sw, SPLIT_HW)
        t_rows = _rows(t_ptr, n, offs_p, width, t_sn, t_sh, t_sw, SPLIT_HW)
        kl_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        d_acc = tl.zeros([BLOCK_P], dtype=tl.float32)
        a_begin = pid_s * SPAN
        for anchor in range(a_begin, tl.minimum(A, a_begin + SPAN)):
            offs_c = anchor * K + offs_k
            s = tl.load(s_rows + offs_c[None, :] * s_sc, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_rows + offs_c[None, :] * t_sc, mask=mask, other=0.0).to(tl.float32)
            p, q, log_ratio = _softmaxes(t * inv_t, s * inv_t, mask_k)
            kl_acc += tl.sum(tl.where(mask_k[None, :], p * log_ratio, 0.0), axis=1)
            d_acc += tl.sum(tl.abs(p - q), axis=1)
        out = (n * tl.num_programs(1) + pid_s) * P + offs_p
        tl.store(kl_ptr + out, kl_acc, mask=mask_p)
        tl.store(d_ptr + out, d_acc * inv_c, mask=mask_p)

    @triton.jit
    def _sigmoid_bwd_kernel(
        s_ptr,  # [N, C, P] student logits (strides below)
        t_ptr,  # [N, C, P] teacher logits
        g_ptr,  # [N, P] dL/dkl, any float dtype and strides
        gs_ptr,  # [N, C, P] dL/ds (out), student dtype, its own strides
        C,  # channels A*K
        SPAN,  # channels per split (a multiple of BLOCK_C), splits on grid axis 1
        P,  # positions
        width,  # W: p = h*W + w (used when SPLIT_HW)
        s_sn,  # student strides (elements): image
        s_sc,  # channel
        s_sh,  # row (SPLIT_HW only)
        s_sw,  # column, or the one stride of the positions
        t_sn,  # teacher strides: image
        t_sc,  # channel
        t_sh,  # row (SPLIT_HW only)
        t_sw,  # column, or the one stride of the positions
        o_sn,  # gradient strides: image
        o_sc,  # channel
        o_sh,  # row (SPLIT_HW only)
        o_sw,  # column, or the one stride of the positions
        g_sn,  # dL/dkl strides: image
        g_sp,  # position
        inv_t,  # 1 / T
        SPLIT_HW: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        c_begin = tl.program_id(1) * SPAN
        n, offs_p, mask_p = _position_block(P, BLOCK_P)
        g = tl.load(g_ptr + n * g_sn + offs_p * g_sp, mask=mask_p, other=0.0).to(tl.float32)
        g = (g * inv_t)[:, None]
        s_rows = _rows(s_ptr, n, offs_p, width, s_sn, s_sh, s_sw, SPLIT_HW)
        t_rows = _rows(t_ptr, n, offs_p, width, t_sn, t_sh, t_sw, SPLIT_HW)
        o_rows = _rows(gs_ptr, n, offs_p, width, o_sn, o_sh, o_sw, SPLIT_HW)
        for c0 in range(c_begin, tl.minimum(C, c_begin + SPAN), BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = mask_p[:, None] & (offs_c < C)[None, :]
            s = tl.load(s_rows + offs_c[None, :] * s_sc, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_rows + offs_c[None, :] * t_sc, mask=mask, other=0.0).to(tl.float32)
            p, q, _, _, _ = _sigmoids(t * inv_t, s * inv_t)
            grad = g * (q - p)
            tl.store(o_rows + offs_c[None, :] * o_sc, grad.to(gs_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _softmax_bwd_kernel(
        s_ptr,  # [N, A*K, P] student logits (strides below)
        t_ptr,  # [N, A*K, P] teacher logits
        g_ptr,  # [N, P] dL/dkl, any float dtype and strides
        gs_ptr,  # [N, A*K, P] dL/ds (out), student dtype, its own strides
        A,  # anchors
        SPAN,  # anchors per split, splits on grid axis 1
        K,  # classes per anchor
        P,  # positions
        width,  # W: p = h*W + w (used when SPLIT_HW)
        s_sn,  # student strides (elements): image
        s_sc,  # channel
        s_sh,  # row (SPLIT_HW only)
        s_sw,  # column, or the one stride of the positions
        t_sn,  # teacher strides: image
        t_sc,  # channel
        t_sh,  # row (SPLIT_HW only)
        t_sw,  # column, or the one stride of the positions
        o_sn,  # gradient strides: image
        o_sc,  # channel
        o_sh,  # row (SPLIT_HW only)
        o_sw,  # column, or the one stride of the positions
        g_sn,  # dL/dkl strides: image
        g_sp,  # position
        inv_t,  # 1 / T
        SPLIT_HW: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        a_begin = tl.program_id(1) * SPAN
        n, offs_p, mask_p = _position_block(P, BLOCK_P)
        offs_k = tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        mask = mask_p[:, None] & mask_k[None, :]
        g = tl.load(g_ptr + n * g_sn + offs_p * g_sp, mask=mask_p, other=0.0).to(tl.float32)
        g = (g * inv_t)[:, None]
        s_rows = _rows(s_ptr, n, offs_p, width, s_sn, s_sh, s_sw, SPLIT_HW)
        t_rows = _rows(t_ptr, n, offs_p, width, t_sn, t_sh, t_sw, SPLIT_HW)
        o_rows = _rows(gs_ptr, n, offs_p, width, o_sn, o_sh, o_sw, SPLIT_HW)
        for anchor in range(a_begin, tl.minimum(A, a_begin + SPAN)):
            offs_c = anchor * K + offs_k
            s = tl.load(s_rows + offs_c[None, :] * s_sc, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_rows + offs_c[None, :] * t_sc, mask=mask, other=0.0).to(tl.float32)
            p, q, _ = _softmaxes(t * inv_t, s * inv_t, mask_k)
            grad = g * (q - p)
            tl.store(o_rows + offs_c[None, :] * o_sc, grad.to(gs_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Host side
# ------------------------------------------------------------------------------------------------


class _Geometry(NamedTuple):
    """Sizes of dense ``(N, A*K, H, W)`` or flattened ``(N, P, K)`` logits (flattened: A = 1 and
    W = P, one row of positions)."""

    images: int  # N
    channels: int  # A*K
    positions: int  # P = H*W
    anchors: int  # A
    classes: int  # K
    width: int  # W: p = h*W + w


def _geometry(x: Tensor, num_classes: int | None) -> _Geometry:
    """The `_Geometry` of ``x``, with ``num_classes`` classes per anchor (None: one anchor)."""
    if x.dim() == 3:
        n, p, k = x.shape
        return _Geometry(n, k, p, 1, k, p)
    n, c, h, w = x.shape
    k = c if num_classes is None else num_classes
    return _Geometry(n, c, h * w, c // k, k, w)


def _needs_split(x: Tensor) -> bool:
    """Whether the positions of ``x`` have no single stride (e.g. a W-sliced or H/W-transposed view)."""
    if x.dim() == 3:
        return False
    h, w = x.shape[2:]
    return h > 1 and w > 1 and x.stride(2) != w * x.stride(3)


def _strides(x: Tensor, split: bool) -> tuple[int, int, int, int]:
    """``(image, channel, row, column)`` strides as the kernels read them; with ``split=False``
    the last one is the single position stride (and the row stride is unused)."""
    if x.dim() == 3:
        return x.stride(0), x.stride(2), 0, x.stride(1)
    sn, sc, sh, sw = x.stride()
    if split:
        return sn, sc, sh, sw
    return sn, sc, 0, (sw if x.shape[3] > 1 else sh)


def _blocks(head: str, c: int, k: int, p: int, positions_contiguous: bool) -> tuple[int, int, int]:
    """``(BLOCK_P, BLOCK_C or BLOCK_K, num_warps)``: the tile runs along the contiguous axis."""
    np2 = triton.next_power_of_2
    if head == "softmax":
        block_k = np2(k)
        block_p = max(1, min(np2(p), _MAX_BLOCK_P, _TILE // block_k))
    elif positions_contiguous:
        block_p = min(np2(p), _MAX_BLOCK_P)
        block_k = min(np2(c), max(1, _TILE // block_p))
    else:
        block_k = min(np2(c), _MAX_BLOCK_P)
        block_p = min(np2(p), max(1, _TILE // block_k))
    num_warps = min(16, max(4, block_p * block_k // 512))
    return block_p, block_k, num_warps


class _Layout(NamedTuple):
    """How one pass reads its tensors: SPLIT_HW, each tensor's `_strides`, the tile (`_blocks`)
    and the number of position blocks (grid axis 0)."""

    split_hw: bool
    strides: list[tuple[int, int, int, int]]
    block_p: int
    block_k: int
    num_warps: int
    p_blocks: int


def _layout(head: str, geo: _Geometry, *tensors: Tensor) -> _Layout:
    """The `_Layout` of a pass over ``tensors``, the student first (the tile runs along its
    contiguous axis)."""
    split_hw = any(_needs_split(x) for x in tensors)
    strides = [_strides(x, split_hw) for x in tensors]
    block_p, block_k, num_warps = _blocks(
        head, geo.channels, geo.classes, geo.positions, positions_contiguous=strides[0][3] == 1 and not split_hw
    )
    return _Layout(split_hw, strides, block_p, block_k, num_warps, triton.cdiv(geo.positions, block_p))


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(x: Tensor) -> int:
    if x.is_cuda:
        index = x.device.index if x.device.index is not None else torch.cuda.current_device()
        return _WAVES * _sm_count(index)
    return _WAVES * _INTERPRETER_SMS


def _split(units: int, base_programs: int, target_programs: int) -> tuple[int, int]:
    """``(units per split, splits)`` dividing ``units`` loop iterations among programs so that
    ``base_programs * splits`` reaches about ``target_programs`` (splits never left empty)."""
    want = max(1, min(units, -(-target_programs // max(base_programs, 1))))
    per = -(-units // want)
    return per, -(-units // per)


def _span(head: str, c: int, a: int, block_k: int, base_programs: int, x: Tensor) -> tuple[int, int]:
    """``(SPAN, splits)``: channels (sigmoid, a multiple of ``block_k``) or anchors (softmax) per split."""
    target = _target_programs(x)
    if head == "softmax":
        return _split(a, base_programs, target)
    per, splits = _split(triton.cdiv(c, block_k), base_programs, target)
    return per * block_k, splits


def _forward_span(head: str, c: int, a: int, block_k: int, base_programs: int, x: Tensor) -> tuple[int, int]:
    """`_span` for the forward: no split (one launch, no partials to add) on small levels."""
    if x.is_cuda and x.numel() < _MIN_SPLIT_ELEMENTS:
        return (c if head == "sigmoid" else a), 1
    return _span(head, c, a, block_k, base_programs, x)


def _check(s: Tensor, t: Tensor, head: str, temperature: float, num_classes: int | None) -> None:
    if not isinstance(s, Tensor) or not isinstance(t, Tensor):
        raise TypeError(f"logits must be tensors, got {type(s).__name__} and {type(t).__name__}")
    if s.shape != t.shape or s.dim() not in (3, 4):
        raise ValueError(
            f"student and teacher logits must have one shape, (N, A*K, H, W) or (N, P, K); got "
            f"{tuple(s.shape)} and {tuple(t.shape)}"
        )
    if s.device != t.device:
        raise ValueError(f"logits on different devices: student {s.device}, teacher {t.device}")
    for name, x in (("student", s), ("teacher", t)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} logits: dtype {x.dtype} not supported by the Triton kernel {SUPPORTED_DTYPES}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS!r}, got {head!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite positive number, got {temperature}")
    if num_classes is not None and s.dim() == 4 and (num_classes < 1 or s.shape[1] % num_classes != 0):
        raise ValueError(f"dense logits have {s.shape[1]} channels, not a multiple of num_classes={num_classes}")
    if not can_run(s, t):
        raise RuntimeError(
            "the Triton kernel needs triton and CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); "
            "use famkd_losses.functional.position_kl / position_prob_diff instead"
        )


def supported(s_logits: Tensor, t_logits: Tensor, *, head: str = "sigmoid", num_classes: int | None = None) -> bool:
    """Whether `position_kl_and_guidance` can run on these logits (triton and device, dtypes,
    and for the softmax head K <= `MAX_SOFTMAX_CLASSES`). Shapes are not checked."""
    if not can_run(s_logits, t_logits):
        return False
    if not has_kernel_dtype(s_logits, t_logits):
        return False
    if head == "softmax":
        k = s_logits.shape[-1] if s_logits.dim() == 3 else (num_classes or s_logits.shape[1])
        return k <= MAX_SOFTMAX_CLASSES
    return True


def _forward(s: Tensor, t: Tensor, head: str, temperature: float, num_classes: int | None) -> tuple[Tensor, Tensor]:
    """``(kl, d)``, both (N, P) float32: one launch, or one per split plus the sums of the partials."""
    geo = _geometry(s, num_classes)
    n, p = geo.images, geo.positions
    if n * p == 0 or geo.channels == 0:
        kl = torch.zeros((n, p), dtype=torch.float32, device=s.device)  # sums over no classes
        return kl, torch.full_like(kl, float("nan"))  # means over none
    if head == "softmax" and geo.classes > MAX_SOFTMAX_CLASSES:
        raise ValueError(f"softmax head: K={geo.classes} classes exceed the kernel's {MAX_SOFTMAX_CLASSES}")
    lay = _layout(head, geo, s, t)
    span, splits = _forward_span(head, geo.channels, geo.anchors, lay.block_k, lay.p_blocks * n, s)
    kl = torch.empty((n, splits, p), dtype=torch.float32, device=s.device)
    d = torch.empty((n, splits, p), dtype=torch.float32, device=s.device)
    grid = (lay.p_blocks, splits, n)
    ss, ts = lay.strides
    inv_t, inv_c = 1.0 / temperature, 1.0 / geo.channels
    with on_device(s):
        if head == "sigmoid":
            _sigmoid_fwd_kernel[grid](
                s, t, kl, d, geo.channels, span, p, geo.width, *ss, *ts, inv_t, inv_c,
                SPLIT_HW=lay.split_hw, BLOCK_P=lay.block_p, BLOCK_C=lay.block_k, num_warps=lay.num_warps,
            )  # fmt: skip
        else:
            _softmax_fwd_kernel[grid](
                s, t, kl, d, geo.anchors, span, geo.classes, p, geo.width, *ss, *ts, inv_t, inv_c,
                SPLIT_HW=lay.split_hw, BLOCK_P=lay.block_p, BLOCK_K=lay.block_k, num_warps=lay.num_warps,
            )  # fmt: skip
    if splits == 1:
        return kl.view(n, p), d.view(n, p)
    return kl.sum(1), d.sum(1)  # a fixed order: deterministic


def _backward(s: Tensor, t: Tensor, dkl: Tensor, head: str, temperature: float, num_classes: int | None) -> Tensor:
    """dL/ds from dL/dkl ``dkl`` (N, P): in s's dtype and, if s is dense, its strides."""
    geo = _geometry(s, num_classes)
    gs = torch.empty_like(s)  # keeps channels_last and other dense layouts
    if gs.numel() == 0:
        return gs
    lay = _layout(head, geo, s, t, gs)
    span, splits = _span(head, geo.channels, geo.anchors, lay.block_k, lay.p_blocks * geo.images, s)
    grid = (lay.p_blocks, splits, geo.images)
    ss, ts, os_ = lay.strides
    with on_device(s):
        if head == "sigmoid":
            _sigmoid_bwd_kernel[grid](
                s, t, dkl, gs, geo.channels, span, geo.positions, geo.width, *ss, *ts, *os_, *dkl.stride(),
                1.0 / temperature,
                SPLIT_HW=lay.split_hw, BLOCK_P=lay.block_p, BLOCK_C=lay.block_k, num_warps=lay.num_warps,
            )  # fmt: skip
        else:
            _softmax_bwd_kernel[grid](
                s, t, dkl, gs, geo.anchors, span, geo.classes, geo.positions, geo.width, *ss, *ts, *os_,
                *dkl.stride(), 1.0 / temperature,
                SPLIT_HW=lay.split_hw, BLOCK_P=lay.block_p, BLOCK_K=lay.block_k, num_warps=lay.num_warps,
            )  # fmt: skip
    return gs


class PositionKL(torch.autograd.Function):
    """``(s, t, head, temperature, num_classes) -> (kl, d)``, both (N, P) float32.

    Gradient to ``s`` only (``d`` is non-differentiable; the teacher gets none). Saves the two
    input tensors, nothing else.
    """

    @staticmethod
    def forward(ctx, s, t, head, temperature, num_classes):  # type: ignore[override]
        kl, d = _forward(s, t, head, temperature, num_classes)
        ctx.save_for_backward(s, t)
        ctx.mark_non_differentiable(d)
        ctx.set_materialize_grads(False)  # no zeros for the gradient of d, which is never used
        ctx.head, ctx.temperature, ctx.num_classes = head, temperature, num_classes
        return kl, d

    @staticmethod
    def backward(ctx, dkl, _dd):  # type: ignore[override]
        s, t = ctx.saved_tensors
        gs = None
        if ctx.needs_input_grad[0] and dkl is not None:
            gs = _backward(s, t, dkl, ctx.head, ctx.temperature, ctx.num_classes)
        return gs, None, None, None, None


def position_kl_and_guidance(
    s_logits: Tensor,
    t_logits: Tensor,
    *,
    head: str = "sigmoid",
    temperature: float = 1.0,
    num_classes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-position KL and logit guidance from one read of the logits.

    Args:
        s_logits: student logits, dense ``(N, A*K, H, W)`` or flattened ``(N, P, K)``, any
            strides, float32/float16/bfloat16.
        t_logits: teacher logits of the same shape (the dtype may differ from the student's).
        head: ``"sigmoid"`` (per-class binary KL) or ``"softmax"`` (KL over each anchor's K classes).
        temperature: T > 0.
        num_classes: K splitting dense channels into anchors (``None``: one anchor); ignored
            for flattened logits, as in the reference.

    Returns:
        ``kl`` (N, P) float32 as ``functional.position_kl`` (differentiable w.r.t. ``s_logits``
        only) and ``d`` (N, P) float32 as ``functional.position_prob_diff`` (non-differentiable).
    """
    _check(s_logits, t_logits, head, temperature, num_classes)
    return PositionKL.apply(s_logits, t_logits, head, float(temperature), num_classes)
