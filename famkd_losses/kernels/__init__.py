"""Fused Triton kernels for the hot paths, each an ``autograd.Function`` with a fused backward
and the same semantics as its reference in :mod:`famkd_losses.functional`.

Importing this package never fails: without triton, :data:`HAS_TRITON` is False and the
losses run the reference. Triton kernels run on CUDA tensors, and on CPU tensors only in
Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported), which is how
they are tested without a GPU.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # ImportError, or a broken install
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "interpreter_enabled", "can_run"]


def interpreter_enabled() -> bool:
    """Whether Triton's CPU interpreter is on (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_run(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on these tensors: triton present and the tensors on
    CUDA, or on CPU under the interpreter."""
    if not HAS_TRITON or not tensors:
        return False
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return True
    return devices == {"cpu"} and interpreter_enabled()
