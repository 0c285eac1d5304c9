"""What the kernel modules share: the dtypes the kernels take, and the offsets of a flat spatial
index in a map whose (H, W) axes may or may not merge into one."""

from __future__ import annotations

import torch
from torch import Tensor

from . import HAS_TRITON

__all__ = ["KERNEL_DTYPES", "has_kernel_dtype"]

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # loaded, then computed in float32


def has_kernel_dtype(*tensors: Tensor) -> bool:
    """Whether every tensor has a dtype of `KERNEL_DTYPES` (float64 and the rest use the reference)."""
    return all(t.dtype in KERNEL_DTYPES for t in tensors)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def spatial_offsets(hw, width, stride_h, stride_w, SPLIT_HW: tl.constexpr):
        """Element offsets of flat spatial indices ``hw = h * width + w`` [BLOCK]:
        ``h * stride_h + w * stride_w``, or ``hw * stride_w`` when (H, W) merge into one axis
        (then ``stride_w`` is that axis' stride and ``stride_h`` is unused)."""
        if SPLIT_HW:
            off = (hw // width) * stride_h + (hw % width) * stride_w
        else:
            off = hw * stride_w
        return off
