"""Temperature-scaled KL divergences between teacher and student logits (float32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dtypes import to_accumulation_dtype

__all__ = ["binary_kl", "softmax_kl"]


def binary_kl(s_logits: Tensor, t_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-class binary KL ``KL(Bern(p) || Bern(q))``, ``p = sigmoid(t/T)``, ``q = sigmoid(s/T)``.

    Elementwise, any shape, float32. Evaluated in the stable closed form
    ``p * (a - b) + softplus(b) - softplus(a)`` with ``a = t/T``, ``b = s/T`` (both negated
    where ``a > 0``, which leaves the KL unchanged and avoids cancellation for large logits); it
    equals ``p log(p/q) + (1-p) log((1-p)/(1-q))`` and is exactly 0 where the logits are equal.
    Not multiplied by ``T^2``.
    """
    a = to_accumulation_dtype(t_logits) / temperature
    b = to_accumulation_dtype(s_logits) / temperature
    # KL(Bern(p) || Bern(q)) is unchanged when both logits change sign; with the teacher's
    # logit <= 0 the terms below are small and do not cancel (large, nearly equal logits).
    flip = torch.where(a > 0, -1.0, 1.0).to(a.dtype)
    a, b = a * flip, b * flip
    p = torch.sigmoid(a)
    return p * (a - b) + F.softplus(b) - F.softplus(a)


def softmax_kl(s_logits: Tensor, t_logits: Tensor, temperature: float = 1.0, dim: int = -1) -> Tensor:
    """Hinton's ``KL(softmax(t/T) || softmax(s/T))`` over ``dim``, float32, ``dim`` reduced.

    Not multiplied by ``T^2``.
    """
    log_p = torch.log_softmax(to_accumulation_dtype(t_logits) / temperature, dim=dim)
    log_q = torch.log_softmax(to_accumulation_dtype(s_logits) / temperature, dim=dim)
    return (log_p.exp() * (log_p - log_q)).sum(dim=dim)
