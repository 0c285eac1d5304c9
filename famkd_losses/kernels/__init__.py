"""Fused Triton kernels for the hot paths, each an ``autograd.Function`` with a fused backward
and the same semantics as its reference in `famkd_losses.functional`.

Importing this package never fails: without triton, `HAS_TRITON` is False and the
losses run the reference. Triton kernels run on CUDA tensors, and on CPU tensors only in
Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is how
they are tested without a GPU.
"""

from __future__ import annotations

import contextlib
import os

import torch

try:  # triton is optional
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "interpreter_enabled", "can_run", "on_device"]


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Kernels index within one image with 32-bit offsets and put the batch on a grid axis.
_MAX_OFFSET = 2**31 - 1
_MAX_GRID_YZ = 65535


def _per_image_extent(t: torch.Tensor) -> int:
    """The largest element offset within one image (dims after the first), from the strides."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:]) if size > 0)


def can_run(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on these tensors: triton present, all tensors on one
    CUDA device (or on CPU under the interpreter), per-image offsets within 32 bits and the
    batch within a grid axis. Otherwise the losses use the reference."""
    if not HAS_TRITON or not tensors:
        return False
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return False
    (device,) = devices
    if not (device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())):
        return False
    return all(t.dim() == 0 or (t.shape[0] <= _MAX_GRID_YZ and _per_image_extent(t) <= _MAX_OFFSET) for t in tensors)


def on_device(t: torch.Tensor):
    """Context to launch on ``t``'s GPU (triton launches on the current device and stream)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
