"""Which implementation runs a loss.

- ``"torch"``: the reference in `famkd_losses.functional` (eager PyTorch);
- ``"compile"``: ``torch.compile`` of the reference, compiled on the first call;
- ``"triton"``: the fused kernels of `famkd_losses.kernels` (CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``); an error where they cannot run;
- ``"auto"`` (default): the kernels on CUDA tensors when triton is importable, else the
  reference.
"""

from __future__ import annotations

from torch import Tensor

from ._validation import check_choice

BACKENDS = ("auto", "torch", "compile", "triton")

__all__ = ["BACKENDS", "check_backend", "use_triton"]


def check_backend(backend: str) -> str:
    check_choice("backend", backend, BACKENDS)
    return backend


def use_triton(backend: str, *tensors: Tensor) -> bool:
    """Whether this call runs the fused kernels, given the loss's backend and its inputs."""
    if backend in ("torch", "compile"):
        return False
    from .kernels import HAS_TRITON, can_run

    if backend == "triton":
        if not can_run(*tensors):
            devices = sorted({str(t.device) for t in tensors})
            raise RuntimeError(
                "backend='triton' needs triton and CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set "
                f"before triton is imported); triton importable: {HAS_TRITON}, tensors on {devices}. "
                "Use backend='auto' to fall back to the PyTorch reference."
            )
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors)
