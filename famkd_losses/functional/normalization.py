"""Channel statistics losses: PKD's Pearson-correlation loss and CWD's channel-wise divergence."""

from __future__ import annotations

import torch
from torch import Tensor

from ._dtypes import to_accumulation_dtype

__all__ = ["standardize_channels", "pearson_loss", "channel_wise_divergence"]


def standardize_channels(feat: Tensor, eps: float = 1e-6) -> Tensor:
    """PKD's normalisation: each channel over (N, H, W) together, ``(x - mean) / (std + eps)``.

    ``std`` is the unbiased one, so N*H*W must be at least 2. (N, C, H, W) -> float32 same shape.
    """
    x = to_accumulation_dtype(feat)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True)
    return (x - mean) / (std + eps)


def pearson_loss(s_feat: Tensor, t_feat: Tensor) -> Tensor:
    """PKD: ``mean((S' - T')^2) / 2`` of the standardised maps; float32 scalar."""
    return (standardize_channels(s_feat) - standardize_channels(t_feat)).square().mean() / 2


def channel_wise_divergence(s_feat: Tensor, t_feat: Tensor, tau: float = 1.0) -> Tensor:
    """CWD: ``tau^2 / (N*C) * sum_{n,c} KL(softmax_hw(T/tau) || softmax_hw(S/tau))``; float32 scalar."""
    n, c = s_feat.shape[:2]
    s = to_accumulation_dtype(s_feat).reshape(n * c, -1) / tau
    t = to_accumulation_dtype(t_feat).reshape(n * c, -1) / tau
    log_p = torch.log_softmax(t, dim=1)
    log_q = torch.log_softmax(s, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum() * (tau**2) / (n * c)
