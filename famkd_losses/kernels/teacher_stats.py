"""Fused max-pool pyramids of one FPN level: the teacher's statistics and the student's pooling.

Both read the (N, C, H, W) map once for every active scale (`~famkd_losses.functional.active_scales`):
one program owns ``(n, a spatial region, a block of channels)`` and pools that region at every scale.
The region is a multiple of the least common multiple of the scales, so each pooling window lies in one
region (scales are packed into launches of at most four whose lcm is at most 32).

- `teacher_saliency_pyramid`: per scale ``t_s = max_pool(t, s)`` and its saliencies
  ``mean_c |t_s|`` / ``mean_{h,w} |t_s|`` (float32), no autograd.
- `max_pool_pyramid_student`: per scale ``max_pool(x, s)`` as an ``autograd.Function`` whose backward
  routes every scale's gradient to its window's argmax and writes ``dX`` once.

Semantics are those of ``torch.nn.functional.max_pool2d(x, s, s, ceil_mode=True)``: partial last windows,
a NaN in a window gives NaN (and the argmax is the window's *last* NaN, as torch), otherwise the argmax is
the *first* maximum in row-major window order (an all ``-inf`` window picks its first position).

Arithmetic is float32 (half/bfloat16 are converted after loading); reductions are deterministic: no
atomics, the partial sums of each program are added by ``torch.sum`` in a fixed order. Inputs may have
any strides. float64 inputs, tensors the kernels cannot run on (see `can_run`) and empty tensors
use the PyTorch reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..functional import active_scales, channel_saliency, max_pool, maxpool_pyramid, spatial_saliency
from . import HAS_TRITON, can_run, on_device
from ._common import has_kernel_dtype

__all__ = ["teacher_saliency_pyramid", "max_pool_pyramid_student"]

_SLOTS = 4  # scales fused in one launch
_MAX_LCM = 32  # largest region unit (lcm of the scales of one launch)
_BLOCK_ELEMS = 4096  # channels x region pixels held by one program

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pool_slot(
        x_base,  # pointer to x[n]
        sxc,
        sxh,
        sxw,  # strides of x (elements)
        n,  # int64 batch index
        C,
        H,
        W,
        cs,  # (BC,) channel indices
        cmask,  # (BC,) channel in range
        tile_h,
        tile_w,
        tile_id,
        cb,
        n_cb,
        n_tiles,
        out_ptr,  # (N, C, hs, ws) pooled map, x's dtype; NCHW or channels_last (OUT_CL)
        idx_ptr,  # (N, C, hs, ws) contiguous, argmax offset di * S + dj in its window
        sp_ptr,  # (N, n_cb, hs, ws) float32: this channel block's sum of |t_s|, divided by C
        ch_ptr,  # (N, n_tiles, C) float32: this region's sum of |t_s|, divided by hs * ws
        inv_c,  # 1 / C (float32, from the host: no division in the kernel)
        inv_hw,  # 1 / (hs * ws) of this slot
        S: tl.constexpr,  # scale (window and stride)
        BH: tl.constexpr,
        BW: tl.constexpr,  # pow2 >= RH // S, RW // S
        RH: tl.constexpr,
        RW: tl.constexpr,  # region in pixels (multiples of S)
        BC: tl.constexpr,
        OUT_CL: tl.constexpr,
        STATS: tl.constexpr,
        ARGMAX: tl.constexpr,
    ):
        hs = (H + S - 1) // S
        ws = (W + S - 1) // S
        rh = tl.arange(0, BH)
        rw = tl.arange(0, BW)
        oh = tile_h * (RH // S) + rh  # (BH,)
        ow = tile_w * (RW // S) + rw  # (BW,)
        pos_ok = ((rh < RH // S) & (oh < hs))[:, None] & ((rw < RW // S) & (ow < ws))[None, :]  # (BH, BW)
        ok = cmask[:, None, None] & pos_ok[None, :, :]  # (BC, BH, BW)
        c3 = cs[:, None, None]
        m = tl.full((BC, BH, BW), float("-inf"), tl.float32)
        arg = tl.zeros((BC, BH, BW), dtype=tl.int32)
        for di in range(S):
            ih = oh * S + di
            for dj in range(S):
                iw = ow * S + dj
                tap_ok = ok & (ih < H)[None, :, None] & (iw < W)[None, None, :]
                ptrs = x_base + c3 * sxc + ih[None, :, None] * sxh + iw[None, None, :] * sxw
                v = tl.load(ptrs, mask=tap_ok, other=float("-inf")).to(tl.float32)
                # torch's rule: a larger value, or any NaN (so the last NaN wins), replaces the max
                take = tap_ok & ((v > m) | (v != v))
                m = tl.where(take, v, m)
                if ARGMAX:
                    arg = tl.where(take, di * S + dj, arg)
        o_nchw = ((n * C + c3) * hs + oh[None, :, None]) * ws + ow[None, None, :]
        if S > 1:
            if OUT_CL:
                o_off = ((n * hs + oh[None, :, None]) * ws + ow[None, None, :]) * C + c3
            else:
                o_off = o_nchw
            tl.store(out_ptr + o_off, m.to(out_ptr.dtype.element_ty), mask=ok)
        if ARGMAX:
            tl.store(idx_ptr + o_nchw, arg.to(idx_ptr.dtype.element_ty), mask=ok)
        if STATS:
            a = tl.where(ok, tl.abs(m), 0.0)
            # partial means, by reciprocals from the host: one block or region needs no finishing
            # launch (a division in the kernel made some variants spill at sm_90)
            sp = tl.sum(a, axis=0) * inv_c  # (BH, BW)
            sp_off = ((n * n_cb + cb) * hs + oh[:, None]) * ws + ow[None, :]
            tl.store(sp_ptr + sp_off, sp, mask=pos_ok)
            ch = tl.sum(tl.sum(a, axis=2), axis=1) * inv_hw  # (BC,)
            tl.store(ch_ptr + (n * n_tiles + tile_id) * C + cs, ch, mask=cmask)

    @triton.jit
    def _pyramid_fwd_kernel(
        x_ptr,  # (N, C, H, W) any strides, float32/float16/bfloat16
        sxn,
        sxc,
        sxh,
        sxw,
        C,
        H,
        W,
        n_tiles_w,
        out0,
        out1,
        out2,
        out3,  # per slot: (N, C, hs, ws) pooled map (unused when S == 1)
        idx0,
        idx1,
        idx2,
        idx3,  # per slot: (N, C, hs, ws) argmax offsets (ARGMAX)
        sp0,
        sp1,
        sp2,
        sp3,  # per slot: (N, n_cb, hs, ws) float32 (STATS)
        ch0,
        ch1,
        ch2,
        ch3,  # per slot: (N, n_tiles, C) float32 (STATS)
        inv_c,  # 1 / C
        inv_hw0,
        inv_hw1,
        inv_hw2,
        inv_hw3,  # per slot: 1 / (hs * ws)
        S0: tl.constexpr,
        S1: tl.constexpr,
        S2: tl.constexpr,
        S3: tl.constexpr,  # scales; 0 = empty slot
        BH0: tl.constexpr,
        BW0: tl.constexpr,
        BH1: tl.constexpr,
        BW1: tl.constexpr,
        BH2: tl.constexpr,
        BW2: tl.constexpr,
        BH3: tl.constexpr,
        BW3: tl.constexpr,
        RH: tl.constexpr,
        RW: tl.constexpr,
        BC: tl.constexpr,
        OUT_CL: tl.constexpr,
        STATS: tl.constexpr,
        ARGMAX: tl.constexpr,
    ):
        # grid: (region tiles, channel blocks, N)
        tile_id = tl.program_id(0)
        cb = tl.program_id(1)
        n = tl.program_id(2).to(tl.int64)
        n_cb = tl.num_programs(1)
        n_tiles = tl.num_programs(0)
        tile_h = tile_id // n_tiles_w
        tile_w = tile_id % n_tiles_w
        cs = cb * BC + tl.arange(0, BC)
        cmask = cs < C
        x_base = x_ptr + n * sxn
        # fmt: off
        if S0 > 0:
            _pool_slot(x_base, sxc, sxh, sxw, n, C, H, W, cs, cmask, tile_h, tile_w, tile_id, cb, n_cb, n_tiles,
                       out0, idx0, sp0, ch0, inv_c, inv_hw0, S0, BH0, BW0, RH, RW, BC, OUT_CL, STATS,
                       ARGMAX)
        if S1 > 0:
            _pool_slot(x_base, sxc, sxh, sxw, n, C, H, W, cs, cmask, tile_h, tile_w, tile_id, cb, n_cb, n_tiles,
                       out1, idx1, sp1, ch1, inv_c, inv_hw1, S1, BH1, BW1, RH, RW, BC, OUT_CL, STATS,
                       ARGMAX)
        if S2 > 0:
            _pool_slot(x_base, sxc, sxh, sxw, n, C, H, W, cs, cmask, tile_h, tile_w, tile_id, cb, n_cb, n_tiles,
                       out2, idx2, sp2, ch2, inv_c, inv_hw2, S2, BH2, BW2, RH, RW, BC, OUT_CL, STATS,
                       ARGMAX)
        if S3 > 0:
            _pool_slot(x_base, sxc, sxh, sxw, n, C, H, W, cs, cmask, tile_h, tile_w, tile_id, cb, n_cb, n_tiles,
                       out3, idx3, sp3, ch3, inv_c, inv_hw3, S3, BH3, BW3, RH, RW, BC, OUT_CL, STATS,
                       ARGMAX)
        # fmt: on

    @triton.jit
    def _route_slot(
        acc,  # (BC, BH, BW) float32 running dX
        idx_ptr,  # (N, C, hs, ws) contiguous argmax offsets
        g_ptr,  # (N, C, hs, ws) gradient of the pooled map, any strides
        sgn,
        sgc,
        sgh,
        sgw,
        n,
        C,
        H,
        W,
        c3,  # (BC, 1, 1) channels
        h3,  # (1, BH, 1) rows
        w3,  # (1, 1, BW) columns
        ok,  # (BC, BH, BW) in range
        S: tl.constexpr,
    ):
        hs = (H + S - 1) // S
        ws = (W + S - 1) // S
        oh = h3 // S
        ow = w3 // S
        here = (h3 - oh * S) * S + (w3 - ow * S)  # this position's offset in its window
        arg = tl.load(idx_ptr + ((n * C + c3) * hs + oh) * ws + ow, mask=ok, other=-1).to(tl.int32)
        hit = ok & (arg == here)
        g = tl.load(g_ptr + n * sgn + c3 * sgc + oh * sgh + ow * sgw, mask=hit, other=0.0).to(tl.float32)
        return acc + g

    @triton.jit
    def _pyramid_bwd_kernel(
        dx_ptr,  # (N, C, H, W) output gradient of x, any strides
        sdn,
        sdc,
        sdh,
        sdw,
        g1_ptr,  # (N, C, H, W) gradient of the s = 1 output (HAS_G1)
        s1n,
        s1c,
        s1h,
        s1w,
        C,
        H,
        W,
        n_tiles_w,
        idx0,
        idx1,
        idx2,
        idx3,  # per slot: (N, C, hs, ws) argmax offsets
        g0,
        g0n,
        g0c,
        g0h,
        g0w,
        g1,
        g1n,
        g1c,
        g1h,
        g1w,
        g2,
        g2n,
        g2c,
        g2h,
        g2w,
        g3,
        g3n,
        g3c,
        g3h,
        g3w,  # per slot: (N, C, hs, ws) gradient of the pooled map and its strides
        S0: tl.constexpr,
        S1: tl.constexpr,
        S2: tl.constexpr,
        S3: tl.constexpr,  # scales; 0 = empty slot
        BH: tl.constexpr,
        BW: tl.constexpr,
        BC: tl.constexpr,
        HAS_G1: tl.constexpr,
        ACCUMULATE: tl.constexpr,  # add to dX (a launch after the first)
    ):
        # grid: (pixel tiles, channel blocks, N)
        tile_id = tl.program_id(0)
        n = tl.program_id(2).to(tl.int64)
        h = (tile_id // n_tiles_w) * BH + tl.arange(0, BH)
        w = (tile_id % n_tiles_w) * BW + tl.arange(0, BW)
        cs = tl.program_id(1) * BC + tl.arange(0, BC)
        c3 = cs[:, None, None]
        h3 = h[None, :, None]
        w3 = w[None, None, :]
        ok = (c3 < C) & (h3 < H) & (w3 < W)
        dx_ptrs = dx_ptr + n * sdn + c3 * sdc + h3 * sdh + w3 * sdw
        if ACCUMULATE:
            acc = tl.load(dx_ptrs, mask=ok, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros((BC, BH, BW), dtype=tl.float32)
        if HAS_G1:
            acc += tl.load(g1_ptr + n * s1n + c3 * s1c + h3 * s1h + w3 * s1w, mask=ok, other=0.0).to(tl.float32)
        if S0 > 0:
            acc = _route_slot(acc, idx0, g0, g0n, g0c, g0h, g0w, n, C, H, W, c3, h3, w3, ok, S0)
        if S1 > 0:
            acc = _route_slot(acc, idx1, g1, g1n, g1c, g1h, g1w, n, C, H, W, c3, h3, w3, ok, S1)
        if S2 > 0:
            acc = _route_slot(acc, idx2, g2, g2n, g2c, g2h, g2w, n, C, H, W, c3, h3, w3, ok, S2)
        if S3 > 0:
            acc = _route_slot(acc, idx3, g3, g3n, g3c, g3h, g3w, n, C, H, W, c3, h3, w3, ok, S3)
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=ok)


def _is_channels_last(x: Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _groups(scales: Sequence[int]) -> list[tuple[int, ...]]:
    """Pack scales, in order, into launches of at most ``_SLOTS`` whose lcm stays <= ``_MAX_LCM``."""
    groups: list[list[int]] = []
    for s in scales:
        if groups and len(groups[-1]) < _SLOTS and math.lcm(*groups[-1], s) <= _MAX_LCM:
            groups[-1].append(s)
        else:
            groups.append([s])
    return [tuple(g) for g in groups]


def supported(x: Tensor) -> bool:
    """Whether the pyramid kernels take ``x`` (float32/float16/bfloat16, not empty, a device triton runs on)."""
    return has_kernel_dtype(x) and x.numel() > 0 and can_run(x)


def _pool_launch(
    x: Tensor, group: tuple[int, ...], *, stats: bool, argmax: bool, tile: int | None, block_c: int | None
) -> list[tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]]:
    """One fused launch over the scales of ``group``: per scale ``(pooled, argmax, sp_partial, ch_partial)``.

    pooled (N, C, hs, ws) in x's dtype (None for s = 1); argmax (N, C, hs, ws) int8/int32 offsets (or None);
    sp_partial (N, n_cb, hs, ws) and ch_partial (N, n_tiles, C) float32 (or None).
    """
    np2 = triton.next_power_of_2
    n, c, h, w = x.shape
    unit = math.lcm(*group)
    cl = _is_channels_last(x)
    side = tile if tile is not None else (8 if cl else 16)
    cells_h = min(np2(max(1, side // unit)), np2(-(-h // unit)))
    cells_w = min(np2(max(1, side // unit)), np2(-(-w // unit)))
    rh, rw = cells_h * unit, cells_w * unit
    if block_c is None:
        block_c = max(1, _BLOCK_ELEMS // (np2(rh) * np2(rw)))
    bc = min(np2(max(1, block_c)), np2(c))
    n_tiles_w = -(-w // rw)
    n_tiles = -(-h // rh) * n_tiles_w
    n_cb = -(-c // bc)
    fmt = torch.channels_last if cl else torch.contiguous_format
    dummy = torch.empty(1, device=x.device, dtype=torch.float32)
    results = []
    ptrs: list[list[Tensor]] = [[], [], [], []]
    inv_hw = [1.0] * _SLOTS  # per slot: 1 / (hs * ws), for the partial means
    consts: dict[str, int] = {}
    for i in range(_SLOTS):
        s = group[i] if i < len(group) else 0
        consts[f"S{i}"] = s
        if s == 0:
            for p in ptrs:
                p.append(dummy)
            consts[f"BH{i}"] = consts[f"BW{i}"] = 1
            continue
        hs, ws = -(-h // s), -(-w // s)
        inv_hw[i] = 1.0 / (hs * ws)
        consts[f"BH{i}"], consts[f"BW{i}"] = np2(rh // s), np2(rw // s)
        out = torch.empty((n, c, hs, ws), device=x.device, dtype=x.dtype, memory_format=fmt) if s > 1 else None
        idx_dtype = torch.int8 if s * s <= 127 else torch.int32
        idx = torch.empty((n, c, hs, ws), device=x.device, dtype=idx_dtype) if argmax else None
        sp = torch.empty((n, n_cb, hs, ws), device=x.device, dtype=torch.float32) if stats else None
        ch = torch.empty((n, n_tiles, c), device=x.device, dtype=torch.float32) if stats else None
        for p, t in zip(ptrs, (out, idx, sp, ch)):
            p.append(dummy if t is None else t)
        results.append((out, idx, sp, ch))
    with on_device(x):
        _pyramid_fwd_kernel[(n_tiles, n_cb, n)](
            x,
            *x.stride(),
            c,
            h,
            w,
            n_tiles_w,
            *ptrs[0],
            *ptrs[1],
            *ptrs[2],
            *ptrs[3],
            1.0 / c,
            *inv_hw,
            **consts,
            RH=rh,
            RW=rw,
            BC=bc,
            OUT_CL=cl,
            STATS=stats,
            ARGMAX=argmax,
        )
    return results


def _finish_mean(part: Tensor, dim: int) -> Tensor:
    """The mean from partial means (each already divided by the whole count): their sum along
    ``dim`` (keepdim) in a fixed order; ``part`` itself when ``dim`` has one entry (no launch)."""
    if part.shape[dim] == 1:
        return part
    return part.sum(dim=dim, keepdim=True)


def teacher_saliency_pyramid(
    t: Tensor, scales: Sequence[int], *, tile: int | None = None, block_c: int | None = None
) -> list[tuple[int, Tensor, Tensor, Tensor]]:
    """The teacher's pooled maps and saliencies at every active scale, from one read of ``t``.

    t: (N, C, H, W) teacher map, float32/float16/bfloat16, any strides. Returns, for each scale of
    ``active_scales(H, W, scales)`` in order, ``(s, t_s, sp_sal, ch_sal)``:

    - ``t_s = max_pool(t, s)``: (N, C, ceil(H/s), ceil(W/s)) in t's dtype (channels_last if t is);
      for ``s == 1`` it is ``t`` itself (no copy);
    - ``sp_sal = spatial_saliency(t_s)``: (N, 1, ceil(H/s), ceil(W/s)) float32;
    - ``ch_sal = channel_saliency(t_s)``: (N, C, 1, 1) float32.

    (The float64 fallback gives float64 saliencies, as the reference.)

    The teacher carries no gradient: everything is computed without autograd (pass a detached teacher;
    the ``s == 1`` entry is returned as given). ``tile`` (region side in pixels) and ``block_c`` (channels
    per program) are tuning knobs. Falls back to the PyTorch reference where the kernels cannot run.
    """
    h, w = t.shape[-2:]
    act = active_scales(h, w, scales)
    if not supported(t):
        with torch.no_grad():
            out = []
            for s in act:
                t_s = max_pool(t, s) if s > 1 else t
                out.append((s, t_s, spatial_saliency(t_s), channel_saliency(t_s)))
            return out
    c = t.shape[1]
    found: dict[int, tuple[Tensor, Tensor, Tensor]] = {}
    with torch.no_grad():
        for group in _groups(act):
            for s, (pooled, _, sp, ch) in zip(
                group, _pool_launch(t, group, stats=True, argmax=False, tile=tile, block_c=block_c)
            ):
                sp_sal = _finish_mean(sp, 1)  # (N, 1, ceil(H/s), ceil(W/s))
                ch_sal = _finish_mean(ch, 1).reshape(t.shape[0], c, 1, 1)
                found[s] = (t if s == 1 else pooled, sp_sal, ch_sal)
    return [(s, *found[s]) for s in act]


def _pool_backward(
    shape: torch.Size,
    dtype: torch.dtype,
    device: torch.device,
    channels_last: bool,
    g_one: Tensor | None,
    slots: list[tuple[int, Tensor, Tensor]],
    tile: int | None,
    block_c: int | None,
) -> Tensor:
    """dX = g_one + sum over slots (s, argmax, g_s) of g_s routed to its windows' argmax: (N, C, H, W)."""
    np2 = triton.next_power_of_2
    n, c, h, w = shape
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dx = torch.empty(shape, device=device, dtype=dtype, memory_format=fmt)
    side = np2(max(1, tile if tile is not None else (8 if channels_last else 16)))
    bh, bw = min(side, np2(h)), min(side, np2(w))
    if block_c is None:
        block_c = max(1, _BLOCK_ELEMS // (bh * bw))
    bc = min(np2(max(1, block_c)), np2(c))
    n_tiles_w = -(-w // bw)
    grid = (-(-h // bh) * n_tiles_w, -(-c // bc), n)
    dummy = torch.empty(1, device=device, dtype=torch.float32)
    chunks = [slots[i : i + _SLOTS] for i in range(0, len(slots), _SLOTS)] or [[]]
    for k, chunk in enumerate(chunks):
        idx_args: list[Tensor] = []
        g_args: list[object] = []
        consts: dict[str, int] = {}
        for i in range(_SLOTS):
            if i < len(chunk):
                s, idx, g = chunk[i]
                idx_args.append(idx)
                g_args += [g, *g.stride()]
            else:
                s = 0
                idx_args.append(dummy)
                g_args += [dummy, 0, 0, 0, 0]
            consts[f"S{i}"] = s
        g1 = g_one if (k == 0 and g_one is not None) else None
        g1_args = [dummy, 0, 0, 0, 0] if g1 is None else [g1, *g1.stride()]
        with on_device(dx):
            _pyramid_bwd_kernel[grid](
                dx,
                *dx.stride(),
                *g1_args,
                c,
                h,
                w,
                n_tiles_w,
                *idx_args,
                *g_args,
                **consts,
                BH=bh,
                BW=bw,
                BC=bc,
                HAS_G1=g1 is not None,
                ACCUMULATE=k > 0,
                num_warps=8,  # 4 warps need ~250 registers/thread on sm_90 (AOT-compiled, triton 3.8)
            )
    return dx


class _MaxPoolPyramid(torch.autograd.Function):
    """x (N, C, H, W) -> ([x,] max_pool(x, s) for s in scales); backward writes dX in one pass."""

    @staticmethod
    def forward(ctx, x: Tensor, scales: tuple[int, ...], with_one: bool, tile: int | None, block_c: int | None):
        pooled: list[Tensor] = []
        idxs: list[Tensor] = []
        for group in _groups(scales):
            for out, idx, _, _ in _pool_launch(x, group, stats=False, argmax=True, tile=tile, block_c=block_c):
                pooled.append(out)
                idxs.append(idx)
        ctx.save_for_backward(*idxs)
        ctx.scales = scales
        ctx.with_one = with_one
        ctx.meta = (x.shape, x.dtype, x.device, _is_channels_last(x))
        ctx.knobs = (tile, block_c)
        ctx.set_materialize_grads(False)
        return ((x,) if with_one else ()) + tuple(pooled)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor | None):
        g_one = grads[0] if ctx.with_one else None
        g_pooled = grads[1:] if ctx.with_one else grads
        slots = [(s, idx, g) for s, idx, g in zip(ctx.scales, ctx.saved_tensors, g_pooled) if g is not None]
        if not slots:
            return g_one, None, None, None, None
        return _pool_backward(*ctx.meta, g_one, slots, *ctx.knobs), None, None, None, None


def max_pool_pyramid_student(
    x: Tensor, scales: Sequence[int], *, tile: int | None = None, block_c: int | None = None
) -> list[tuple[int, Tensor]]:
    """``[(s, max_pool(x, s)) for s in active_scales(H, W, scales)]`` from one read of ``x``, with autograd.

    x: (N, C, H, W) aligned student map, float32/float16/bfloat16, any strides. Each pooled map is
    (N, C, ceil(H/s), ceil(W/s)) in x's dtype (channels_last if x is). The backward routes each scale's
    gradient to the argmax of its window (ties: the first maximum in row-major window order; NaN: the last
    NaN, as ``torch.nn.functional.max_pool2d``), adds the ``s == 1`` gradient, and writes dX once.

    The ``s == 1`` entry is ``x`` itself when no gradient is recorded; when one is, it is an alias (view) of
    ``x`` produced by the same ``autograd.Function`` so that its gradient joins the fused backward (autograd
    refuses in-place changes to it). ``tile`` (region side in pixels) and ``block_c`` (channels per program)
    are tuning knobs of both passes. Falls back to the PyTorch reference where the kernels cannot run.
    """
    h, w = x.shape[-2:]
    act = active_scales(h, w, scales)
    if not supported(x):
        return maxpool_pyramid(x, scales)
    pooled_scales = tuple(s for s in act if s > 1)
    if not pooled_scales:
        return [(s, x) for s in act]
    with_one = 1 in act
    if torch.is_grad_enabled() and x.requires_grad:
        outs = _MaxPoolPyramid.apply(x, pooled_scales, with_one, tile, block_c)
        by_scale = dict(zip(((1,) if with_one else ()) + pooled_scales, outs))
    else:
        by_scale = {1: x} if with_one else {}
        for group in _groups(pooled_scales):
            launch = _pool_launch(x, group, stats=False, argmax=False, tile=tile, block_c=block_c)
            by_scale.update((s, out) for s, (out, _, _, _) in zip(group, launch))
    return [(s, by_scale[s]) for s in act]
