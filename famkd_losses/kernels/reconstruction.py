"""Fused reconstruction loss of one scale: branch fusion, attention weighting, squared error and
reduction in one Triton kernel, with a one-pass fused backward.

Reference (`famkd_losses.functional.reconstruction`)::

    w = softmax(theta)                                     # (B,), B = 1 or 2
    loss = sum(a_sp * a_ch * (sum_b w_b R_b - T)^2) / N    # float32 scalar

Forward: every program reads one [BLOCK_C, BLOCK_HW] tile of each (N, C, H, W) input once (the
small attention maps once per tile), accumulates in float32 and writes one partial sum; the
partials are summed in a fixed order by torch, so the result is deterministic (no atomics).

Backward: one pass over the same tiles writes ``dR_b = w_b * 2 * A * (R - T) * g / N`` in each
branch's dtype and strides (``empty_like``, so channels_last stays channels_last) and per-program
partials of ``dL/dw_b = sum(2 * A * (R - T) * R_b) * g / N``; then one program adds them and
writes ``dtheta_j = sum_b dL/dw_b * w_b * (delta_bj - w_j)``.

Strides are passed to the kernel, so channels_last, sliced and expanded inputs are read in place
(no copies); when (H, W) of every map can be addressed as one index (``stride_h == W * stride_w``:
contiguous, channels_last, most slices) the kernel skips the ``hw // W`` split.

Falls back to the reference (autograd through plain PyTorch) for: float64 (or non-floating)
inputs, tensors the kernels cannot run on (see `famkd_losses.kernels.can_run`), more than
two branches, shapes that are not exactly (N, C, H, W) for every reconstruction and the target
(attention maps may broadcast: they are expanded, stride 0), empty tensors, and a target or
attention map that requires grad while grad mode is on (the kernel gives those no gradient; the
loss module detaches them). The kernel path is not twice differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..functional import branch_reconstruction_error
from . import HAS_TRITON, can_run, on_device
from ._common import has_kernel_dtype

__all__ = ["fused_reconstruction_error"]

_TILE = 2048  # elements per program
_NUM_WARPS = 8

if HAS_TRITON:
    import triton
    import triton.language as tl

    from ._common import spatial_offsets

    @triton.jit
    def _fusion_weights(theta_ptr, NUM_BRANCHES: tl.constexpr):
        """``softmax(theta)`` of one or two fusion logits, in float32: (w0, w1), w1 = 0 for one."""
        t0 = tl.load(theta_ptr).to(tl.float32)
        if NUM_BRANCHES == 2:
            t1 = tl.load(theta_ptr + 1).to(tl.float32)
            m = tl.maximum(t0, t1)
            e0 = tl.exp(t0 - m)
            e1 = tl.exp(t1 - m)
            z = e0 + e1
            w0 = e0 / z
            w1 = e1 / z
        else:
            w0 = tl.exp(t0 - t0) / tl.exp(t0 - t0)  # 1, NaN for a non-finite logit (as softmax)
            w1 = 0.0 * w0
        return w0, w1

    @triton.jit
    def _dtheta_kernel(
        part_ptr,  # float32 [P, 2] partials of dL/dw_b from the backward programs
        P,
        w_ptr,  # [2] float32 fusion weights softmax(theta) that the forward used
        out_ptr,  # [ROWS * NUM_BRANCHES] gradient of the whole fusion-logit matrix (out), its dtype
        row,
        TOTAL,  # ROWS * NUM_BRANCHES
        NUM_BRANCHES: tl.constexpr,
        BLOCK: tl.constexpr,
        OUT_BLOCK: tl.constexpr,
    ):
        """One program: dL/dw_b = sum of the partials (fixed order), then the softmax backward
        ``dtheta_j = w_j (dL/dw_j - sum_b w_b dL/dw_b)`` into row ``row``, zeros elsewhere."""
        acc0 = tl.zeros([BLOCK], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
        for p0 in range(0, P, BLOCK):
            idx = p0 + tl.arange(0, BLOCK)
            ok = idx < P
            acc0 += tl.load(part_ptr + 2 * idx, mask=ok, other=0.0)
            if NUM_BRANCHES == 2:
                acc1 += tl.load(part_ptr + 2 * idx + 1, mask=ok, other=0.0)
        d0 = tl.sum(acc0, axis=0)
        d1 = tl.sum(acc1, axis=0)
        w0 = tl.load(w_ptr)
        w1 = tl.load(w_ptr + 1)
        mean = w0 * d0 + w1 * d1
        g0 = w0 * (d0 - mean)
        g1 = w1 * (d1 - mean)
        offs = tl.arange(0, OUT_BLOCK)
        first = row * NUM_BRANCHES
        if NUM_BRANCHES == 2:
            vals = tl.where(offs == first, g0, tl.where(offs == first + 1, g1, 0.0))
        else:
            vals = tl.where(offs == first, g0, 0.0)
        tl.store(out_ptr + offs, vals.to(out_ptr.dtype.element_ty), mask=offs < TOTAL)

    @triton.jit
    def _tile(C, HW, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
        """This program's tile: image ``n`` (int64), channels ``c`` [BLOCK_C] and flat spatial
        indices ``hw`` [BLOCK_HW] (int64), and which of them are in range. Programs run over
        (n, hw block, c block), c block fastest, so neighbours share their tile of a_sp."""
        pid = tl.program_id(0)
        num_c = tl.cdiv(C, BLOCK_C)
        num_hw = tl.cdiv(HW, BLOCK_HW)
        pid_c = pid % num_c
        rest = pid // num_c
        pid_hw = rest % num_hw
        n = (rest // num_hw).to(tl.int64)
        c = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        hw = (pid_hw * BLOCK_HW + tl.arange(0, BLOCK_HW)).to(tl.int64)
        return n, c, hw, c < C, hw < HW

    @triton.jit
    def _map_offsets(n, c, hw, W, sn, sc, sh, sw, SPLIT_HW: tl.constexpr):
        """Offsets [BLOCK_C, BLOCK_HW] of the tile (n, c, hw) in an (N, C, H, W) map of strides
        (sn, sc, sh, sw); without SPLIT_HW, ``sw`` is the stride of the merged H*W axis."""
        return n * sn + c[:, None] * sc + spatial_offsets(hw, W, sh, sw, SPLIT_HW)[None, :]

    @triton.jit
    def _residual_tile(
        r0_ptr,
        r1_ptr,
        t_ptr,
        asp_ptr,
        ach_ptr,
        C,
        HW,
        W,
        s_r0n,
        s_r0c,
        s_r0h,
        s_r0w,
        s_r1n,
        s_r1c,
        s_r1h,
        s_r1w,
        s_tn,
        s_tc,
        s_th,
        s_tw,
        s_spn,
        s_sph,
        s_spw,
        s_chn,
        s_chc,
        n,
        c,
        hw,
        c_ok,
        hw_ok,
        w0,  # fusion weight of branch 0 (float32, or the constant 1 without fusion logits)
        w1,  # fusion weight of branch 1 (NUM_BRANCHES == 2)
        NUM_BRANCHES: tl.constexpr,
        HAS_ASP: tl.constexpr,
        HAS_ACH: tl.constexpr,
        SPLIT_HW: tl.constexpr,
    ):
        """The tile (n, c, hw) of both passes, float32: ``(r0, r1, d, attn)`` with R_0 and R_1
        [BLOCK_C, BLOCK_HW] (r1 is r0 with one branch), ``d = sum_b w_b R_b - T`` (0 outside the
        map) and ``attn = a_sp * a_ch`` broadcastable to the tile (1 where both are absent)."""
        mask = c_ok[:, None] & hw_ok[None, :]
        r0 = tl.load(r0_ptr + _map_offsets(n, c, hw, W, s_r0n, s_r0c, s_r0h, s_r0w, SPLIT_HW), mask=mask, other=0.0)
        r0 = r0.to(tl.float32)
        fused = w0 * r0
        r1 = r0
        if NUM_BRANCHES == 2:
            off_r1 = _map_offsets(n, c, hw, W, s_r1n, s_r1c, s_r1h, s_r1w, SPLIT_HW)
            r1 = tl.load(r1_ptr + off_r1, mask=mask, other=0.0).to(tl.float32)
            fused = fused + w1 * r1
        t = tl.load(t_ptr + _map_offsets(n, c, hw, W, s_tn, s_tc, s_th, s_tw, SPLIT_HW), mask=mask, other=0.0)
        d = fused - t.to(tl.float32)
        if HAS_ASP:
            off_sp = n * s_spn + spatial_offsets(hw, W, s_sph, s_spw, SPLIT_HW)
            a_sp = tl.load(asp_ptr + off_sp, mask=hw_ok, other=0.0).to(tl.float32)  # [BLOCK_HW]
        if HAS_ACH:
            a_ch = tl.load(ach_ptr + n * s_chn + c * s_chc, mask=c_ok, other=0.0).to(tl.float32)  # [BLOCK_C]
        if HAS_ASP and HAS_ACH:
            attn = a_sp[None, :] * a_ch[:, None]
        elif HAS_ASP:
            attn = a_sp[None, :]
        elif HAS_ACH:
            attn = a_ch[:, None]
        else:
            attn = 1.0
        return r0, r1, d, attn

    @triton.jit
    def _recon_fwd_kernel(
        r0_ptr,  # [N, C, H, W] reconstruction of branch 0 (fp32/fp16/bf16)
        r1_ptr,  # [N, C, H, W] reconstruction of branch 1 (NUM_BRANCHES == 2)
        t_ptr,  # [N, C, H, W] target T
        asp_ptr,  # [N, 1, H, W] spatial attention (HAS_ASP)
        ach_ptr,  # [N, C, 1, 1] channel attention (HAS_ACH)
        C,
        HW,
        W,
        s_r0n,
        s_r0c,
        s_r0h,
        s_r0w,
        s_r1n,
        s_r1c,
        s_r1h,
        s_r1w,
        s_tn,
        s_tc,
        s_th,
        s_tw,
        s_spn,
        s_sph,
        s_spw,
        s_chn,
        s_chc,
        theta_ptr,  # [NUM_BRANCHES] fusion logits theta, any float dtype (HAS_THETA)
        weights_ptr,  # [2] float32 (out, HAS_THETA): softmax(theta), for the backward
        part_ptr,  # [P] float32 (out): each program's sum, times scale_n
        scale_n,  # scale / N: the loss is scale * sum(...) / N
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        NUM_BRANCHES: tl.constexpr,
        HAS_THETA: tl.constexpr,
        HAS_ASP: tl.constexpr,
        HAS_ACH: tl.constexpr,
        SPLIT_HW: tl.constexpr,
    ):
        """One program: ``scale_n * sum(A * (sum_b w_b R_b - T)^2)`` over its tile."""
        w0 = 1.0
        w1 = 0.0
        if HAS_THETA:
            w0, w1 = _fusion_weights(theta_ptr, NUM_BRANCHES)
            if tl.program_id(0) == 0:  # saved for the backward: no host softmax, no view of the parameter kept
                tl.store(weights_ptr, w0)
                tl.store(weights_ptr + 1, w1)
        n, c, hw, c_ok, hw_ok = _tile(C, HW, BLOCK_C, BLOCK_HW)
        _, _, d, attn = _residual_tile(
            r0_ptr, r1_ptr, t_ptr, asp_ptr, ach_ptr, C, HW, W,
            s_r0n, s_r0c, s_r0h, s_r0w, s_r1n, s_r1c, s_r1h, s_r1w, s_tn, s_tc, s_th, s_tw,
            s_spn, s_sph, s_spw, s_chn, s_chc,
            n, c, hw, c_ok, hw_ok, w0, w1, NUM_BRANCHES, HAS_ASP, HAS_ACH, SPLIT_HW,
        )  # fmt: skip
        err = (d * d) * attn
        tl.store(part_ptr + tl.program_id(0), tl.sum(tl.sum(err, axis=1), axis=0) * scale_n)

    @triton.jit
    def _recon_bwd_kernel(
        r0_ptr,  # [N, C, H, W] reconstruction of branch 0
        r1_ptr,  # [N, C, H, W] reconstruction of branch 1 (NUM_BRANCHES == 2)
        t_ptr,  # [N, C, H, W] target T
        asp_ptr,  # [N, 1, H, W] spatial attention (HAS_ASP)
        ach_ptr,  # [N, C, 1, 1] channel attention (HAS_ACH)
        C,
        HW,
        W,
        s_r0n,
        s_r0c,
        s_r0h,
        s_r0w,
        s_r1n,
        s_r1c,
        s_r1h,
        s_r1w,
        s_tn,
        s_tc,
        s_th,
        s_tw,
        s_spn,
        s_sph,
        s_spw,
        s_chn,
        s_chc,
        weights_ptr,  # [2] float32 softmax(theta), as the forward wrote it (HAS_WEIGHTS)
        grad_ptr,  # [] float32 incoming gradient of the loss
        dr0_ptr,  # [N, C, H, W] (out, WRITE_DR0): gradient of R_0, R_0's dtype
        s_d0n,
        s_d0c,
        s_d0h,
        s_d0w,
        dr1_ptr,  # [N, C, H, W] (out, WRITE_DR1): gradient of R_1, R_1's dtype
        s_d1n,
        s_d1c,
        s_d1h,
        s_d1w,
        dw_part_ptr,  # [P, 2] float32 (out, NEED_DW): each program's part of dL/dw_b
        scale_n,  # scale / N: the loss is scale * sum(...) / N
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        NUM_BRANCHES: tl.constexpr,
        HAS_WEIGHTS: tl.constexpr,
        HAS_ASP: tl.constexpr,
        HAS_ACH: tl.constexpr,
        SPLIT_HW: tl.constexpr,
        WRITE_DR0: tl.constexpr,
        WRITE_DR1: tl.constexpr,
        NEED_DW: tl.constexpr,
    ):
        """One program, on its tile: ``dR_b = w_b * g * scale_n * 2 * A * d`` and the parts
        ``sum(g * scale_n * 2 * A * d * R_b)`` of dL/dw_b."""
        w0 = 1.0
        w1 = 0.0
        if HAS_WEIGHTS:
            w0 = tl.load(weights_ptr)
            w1 = tl.load(weights_ptr + 1)
        n, c, hw, c_ok, hw_ok = _tile(C, HW, BLOCK_C, BLOCK_HW)
        r0, r1, d, attn = _residual_tile(
            r0_ptr, r1_ptr, t_ptr, asp_ptr, ach_ptr, C, HW, W,
            s_r0n, s_r0c, s_r0h, s_r0w, s_r1n, s_r1c, s_r1h, s_r1w, s_tn, s_tc, s_th, s_tw,
            s_spn, s_sph, s_spw, s_chn, s_chc,
            n, c, hw, c_ok, hw_ok, w0, w1, NUM_BRANCHES, HAS_ASP, HAS_ACH, SPLIT_HW,
        )  # fmt: skip
        gn = tl.load(grad_ptr).to(tl.float32) * scale_n  # dL/d(sum)
        gd = (gn * attn) * (2.0 * d)  # dL/d(fused), float32 [BLOCK_C, BLOCK_HW]
        mask = c_ok[:, None] & hw_ok[None, :]
        if WRITE_DR0:
            off_d0 = _map_offsets(n, c, hw, W, s_d0n, s_d0c, s_d0h, s_d0w, SPLIT_HW)
            tl.store(dr0_ptr + off_d0, (gd * w0).to(dr0_ptr.dtype.element_ty), mask=mask)
        if WRITE_DR1:
            off_d1 = _map_offsets(n, c, hw, W, s_d1n, s_d1c, s_d1h, s_d1w, SPLIT_HW)
            tl.store(dr1_ptr + off_d1, (gd * w1).to(dr1_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            pid = tl.program_id(0)
            tl.store(dw_part_ptr + 2 * pid, tl.sum(tl.sum(gd * r0, axis=1), axis=0))
            if NUM_BRANCHES == 2:
                tl.store(dw_part_ptr + 2 * pid + 1, tl.sum(tl.sum(gd * r1, axis=1), axis=0))


def _blocks(c: int, hw: int, channels_fast: bool) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) of a ~_TILE-element tile, long along the contiguous axis."""
    np2 = triton.next_power_of_2
    if channels_fast:
        bc = min(np2(c), 128)
        return bc, min(np2(hw), max(1, _TILE // bc))
    bhw = min(np2(hw), 256)
    return min(np2(c), max(1, _TILE // bhw)), bhw


def _hw_stride(t: Tensor, h: int, w: int) -> int | None:
    """The stride of the merged (H*W) axis of a 4-D tensor, or None if H, W don't merge."""
    sh, sw = t.stride(2), t.stride(3)
    if h == 1:
        return sw
    if w == 1:
        return sh
    return sw if sh == w * sw else None


def _map_strides(t: Tensor | None, h: int, w: int, split_hw: bool) -> tuple[int, int, int, int]:
    """(sn, sc, sh, sw) of a 4-D map as the kernels take them (zeros for None); without
    ``split_hw``, sw is the stride of the merged H*W axis (and sh is unused)."""
    if t is None:
        return 0, 0, 0, 0
    sn, sc, sh, sw = t.stride()
    if split_hw:
        return sn, sc, sh, sw
    return sn, sc, 0, _hw_stride(t, h, w)


class _Launcher:
    """The tiling of one scale's maps (R_0, R_1, T, a_sp, a_ch; R_1 and the attention maps may be
    None), and the launches of its forward and backward kernels on that tiling."""

    def __init__(self, r0: Tensor, r1: Tensor | None, target: Tensor, a_sp: Tensor | None, a_ch: Tensor | None):
        n, c, h, w = target.shape
        self.maps = (r0, r1, target, a_sp, a_ch)
        self.block_c, self.block_hw = _blocks(c, h * w, channels_fast=c > 1 and r0.stride(1) == 1)
        self.programs = n * triton.cdiv(c, self.block_c) * triton.cdiv(h * w, self.block_hw)

    def _split_hw(self, *outs: Tensor | None) -> bool:
        """Whether (H, W) of some map read or written (``outs``) do not merge into one axis."""
        r0, r1, target, a_sp, _ = self.maps
        h, w = target.shape[2:]
        return any(_hw_stride(t, h, w) is None for t in (r0, r1, target, a_sp, *outs) if t is not None)

    def _map_args(self, split_hw: bool) -> list:
        """The arguments both kernels start with: the maps (R_0 in place of an absent one), C,
        H*W, W and the maps' strides."""
        r0, r1, target, a_sp, a_ch = self.maps
        _, c, h, w = target.shape
        sp = _map_strides(a_sp, h, w, split_hw)
        return [
            r0, r0 if r1 is None else r1, target, r0 if a_sp is None else a_sp, r0 if a_ch is None else a_ch,
            c, h * w, w,
            *_map_strides(r0, h, w, split_hw), *_map_strides(r1, h, w, split_hw),
            *_map_strides(target, h, w, split_hw),
            sp[0], sp[2], sp[3],
            *((0, 0) if a_ch is None else (a_ch.stride(0), a_ch.stride(1))),
        ]  # fmt: skip

    def _flags(self, split_hw: bool) -> dict:
        """The constexprs and launch options both kernels take."""
        _, r1, _, a_sp, a_ch = self.maps
        return {
            "BLOCK_C": self.block_c,
            "BLOCK_HW": self.block_hw,
            "NUM_BRANCHES": 1 if r1 is None else 2,
            "HAS_ASP": a_sp is not None,
            "HAS_ACH": a_ch is not None,
            "SPLIT_HW": split_hw,
            "num_warps": _NUM_WARPS,
        }

    def forward(self, theta: Tensor | None, weights: Tensor | None, part: Tensor, scale_n: float) -> None:
        """Partial sums ``part`` [programs] (times ``scale_n``); with fusion logits ``theta``, also
        ``weights`` [2] = softmax(theta) in float32."""
        split_hw = self._split_hw()
        with on_device(self.maps[0]):  # triton launches on the current device
            _recon_fwd_kernel[(self.programs,)](
                *self._map_args(split_hw), part if theta is None else theta, part if weights is None else weights,
                part, scale_n, HAS_THETA=theta is not None, **self._flags(split_hw),
            )  # fmt: skip

    def backward(
        self,
        weights: Tensor | None,
        grad: Tensor,
        dr0: Tensor | None,
        dr1: Tensor | None,
        dw_part: Tensor | None,
        scale_n: float,
    ) -> None:
        """Writes dR_0, dR_1 (those not None) and, into ``dw_part`` [programs, 2], the parts of
        dL/dw_b, from the forward's fusion ``weights`` and the loss gradient ``grad`` (float32 [])."""
        r0 = self.maps[0]
        _, _, h, w = r0.shape
        split_hw = self._split_hw(dr0, dr1)
        with on_device(r0):
            _recon_bwd_kernel[(self.programs,)](
                *self._map_args(split_hw), grad if weights is None else weights, grad,
                r0 if dr0 is None else dr0, *_map_strides(dr0, h, w, split_hw),
                r0 if dr1 is None else dr1, *_map_strides(dr1, h, w, split_hw),
                grad if dw_part is None else dw_part, scale_n,
                HAS_WEIGHTS=weights is not None, WRITE_DR0=dr0 is not None, WRITE_DR1=dr1 is not None,
                NEED_DW=dw_part is not None, **self._flags(split_hw),
            )  # fmt: skip


class _FusedReconstructionError(torch.autograd.Function):
    """(target, a_sp, a_ch, logits, row, R_0, R_1, scale) -> float32 scalar; gradients to the
    fusion logits (the whole matrix, row ``row`` filled), R_0 and R_1 only."""

    @staticmethod
    def forward(ctx, target, a_sp, a_ch, logits, row, r0, r1, scale):
        theta = None
        if logits is not None:  # this scale's logits, read by the kernels (softmax in-kernel)
            theta = (logits[row] if logits.dim() == 2 else logits).detach()
            theta = theta if theta.stride(-1) == 1 else theta.contiguous()
        scale_n = scale / target.shape[0]
        launch = _Launcher(r0, r1, target, a_sp, a_ch)
        part = torch.empty(launch.programs, device=target.device, dtype=torch.float32)
        # the kernel writes softmax(theta) here for the backward (the logits may change in place)
        weights = None if theta is None else torch.empty(2, device=target.device, dtype=torch.float32)
        launch.forward(theta, weights, part, scale_n)  # partials already times scale / N: one sum finishes the loss
        ctx.save_for_backward(target, a_sp, a_ch, weights, r0, r1)
        ctx.logits_meta = None if logits is None else (logits.shape, logits.dtype, row)
        ctx.scale_n = scale_n
        return part.sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        target, a_sp, a_ch, weights, r0, r1 = ctx.saved_tensors
        need_theta = ctx.needs_input_grad[3]
        need_r0, need_r1 = ctx.needs_input_grad[5:7]
        if not (need_theta or need_r0 or need_r1):
            return (None,) * 8
        dr0 = torch.empty_like(r0) if need_r0 else None
        dr1 = torch.empty_like(r1) if need_r1 else None
        launch = _Launcher(r0, r1, target, a_sp, a_ch)
        # every program writes its row when need_theta (column 1 unread with one branch)
        part = torch.empty(launch.programs, 2, device=target.device, dtype=torch.float32) if need_theta else None
        g = grad.detach().to(torch.float32).reshape(())
        launch.backward(weights, g, dr0, dr1, part, ctx.scale_n)
        dlogits = None
        if need_theta:
            shape, dtype, row = ctx.logits_meta
            dlogits = torch.empty(shape, dtype=dtype, device=target.device)
            branches = shape[-1]
            with on_device(target):
                _dtheta_kernel[(1,)](
                    part, launch.programs, weights, dlogits, row if len(shape) == 2 else 0, dlogits.numel(),
                    NUM_BRANCHES=branches, BLOCK=1024, OUT_BLOCK=triton.next_power_of_2(dlogits.numel()),
                    num_warps=4,
                )  # fmt: skip
        return None, None, None, dlogits, None, dr0, dr1, None


def _scaled(scale: float, loss: Tensor) -> Tensor:
    return loss if scale == 1.0 else scale * loss


def supported(
    recons: Sequence[Tensor], fusion_logits: Tensor | None, target: Tensor, a_sp: Tensor | None, a_ch: Tensor | None
) -> bool:
    """Whether `fused_reconstruction_error` takes these inputs (``fusion_logits``: theta (B,) or None)."""
    if not 1 <= len(recons) <= 2 or target.dim() != 4 or target.numel() == 0:
        return False
    if any(r.shape != target.shape for r in recons):
        return False
    if fusion_logits is None:
        if len(recons) != 1:
            return False  # the reference raises
    elif fusion_logits.shape != (len(recons),):
        return False  # the reference raises
    tensors = [t for t in (*recons, target, a_sp, a_ch, fusion_logits) if t is not None]
    if not can_run(*tensors):
        return False
    if not has_kernel_dtype(*tensors):
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (target, a_sp, a_ch)):
        return False
    return True


def fused_reconstruction_error(
    recons: Sequence[Tensor],
    fusion_logits: Tensor | None,
    target: Tensor,
    a_sp: Tensor | None = None,
    a_ch: Tensor | None = None,
    *,
    scale: float = 1.0,
    row: int | None = None,
) -> Tensor:
    """``scale * sum(a_sp * a_ch * (sum_b softmax(theta)_b R_b - T)^2) / N``: float32 scalar.

    Equal to ``scale * reconstruction_error(fuse_reconstructions(recons, fusion_logits),
    target, a_sp * a_ch)``, with an absent attention map read as 1. ``scale`` (the loss
    weight) is applied to the kernel's partial sums, so no launch is spent on it. With ``row``,
    ``fusion_logits`` is the whole (S, B) matrix of a multi-scale loss and theta is its row
    ``row``: the gradient then reaches the matrix directly (no select and copy per scale).

    Args:
        recons: 1 or 2 reconstructions R_b (N, C, H, W), float32/float16/bfloat16, any strides.
        fusion_logits: theta (B,), or None for one branch (then w_0 = 1).
        target: T (N, C, H, W), no gradient.
        a_sp: spatial attention (N, 1, H, W) or None, no gradient.
        a_ch: channel attention (N, C, 1, 1) or None, no gradient.

    Gradients reach ``recons`` (in their dtype and layout) and ``fusion_logits``. Inputs the
    kernel does not take (float64, no triton/device, see the module docstring) go through the
    PyTorch reference, whose float64 result stays float64.
    """
    recons = list(recons)
    scale = float(scale)
    matrix = fusion_logits
    if row is not None:
        if fusion_logits is None or fusion_logits.dim() != 2 or not 0 <= row < fusion_logits.shape[0]:
            raise ValueError(
                f"row={row} needs fusion_logits of shape (S, B) with S > row, got "
                f"{None if fusion_logits is None else tuple(fusion_logits.shape)}"
            )
        fusion_logits = fusion_logits[row]
    if not supported(recons, fusion_logits, target, a_sp, a_ch):
        return _scaled(scale, branch_reconstruction_error(recons, fusion_logits, target, a_sp, a_ch))
    n, c, h, w = target.shape
    try:
        a_sp_k = None if a_sp is None else a_sp.detach().expand(n, 1, h, w)
        a_ch_k = None if a_ch is None else a_ch.detach().expand(n, c, 1, 1)
    except RuntimeError:  # not broadcastable: let the reference raise its error
        return _scaled(scale, branch_reconstruction_error(recons, fusion_logits, target, a_sp, a_ch))
    r1 = recons[1] if len(recons) == 2 else None
    logits, row = (fusion_logits, 0) if row is None else (matrix, row)
    return _FusedReconstructionError.apply(target.detach(), a_sp_k, a_ch_k, logits, row, recons[0], r1, scale)
