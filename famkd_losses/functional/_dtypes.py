"""Accumulation dtype: half and bfloat16 are computed in float32; float32/float64 stay as they are."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "to_accumulation_dtype"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (so gradcheck is exact); every other floating dtype -> float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_accumulation_dtype(x: Tensor) -> Tensor:
    """``x`` in its accumulation dtype (a no-op for float32 and float64)."""
    return x.to(accumulation_dtype(x.dtype))
