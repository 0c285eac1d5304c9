"""Which implementation runs a loss.

``"torch"`` is the reference in :mod:`famkd_losses.functional`; ``"auto"`` picks the
fastest path that can run on the inputs' device. Until fused kernels are registered here,
``"auto"`` resolves to ``"torch"`` everywhere.
"""

from __future__ import annotations

from ._validation import check_choice

BACKENDS = ("auto", "torch")

__all__ = ["BACKENDS", "check_backend"]


def check_backend(backend: str) -> str:
    check_choice("backend", backend, BACKENDS)
    return backend
