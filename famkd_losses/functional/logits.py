"""Dense-head logits: layouts, per-position KL and per-position probability differences.

Two layouts are accepted for one level:
- dense ``(N, A*K, H, W)`` (RetinaNet/FCOS/GFL heads; channel ``a*K + k``), P = H*W positions;
- flattened ``(N, P, K)`` (one row of K class logits per position or anchor).
Both are brought to ``(N, P, A, K)`` (A = 1 for the flattened layout).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor

from ._dtypes import to_accumulation_dtype
from .kl import binary_kl, softmax_kl

__all__ = ["HEADS", "to_positions", "position_kl", "position_prob_diff", "weighted_kl_sum"]

HEADS = ("sigmoid", "softmax")


def to_positions(logits: Tensor, num_classes: int | None = None) -> Tensor:
    """(N, A*K, H, W) -> (N, H*W, A, K), or (N, P, K) -> (N, P, 1, K).

    ``num_classes`` K splits the dense channels into anchors and classes; ``None`` means
    one anchor (K = channels).
    """
    if logits.dim() == 3:
        return logits.unsqueeze(2)
    k = logits.shape[1] if num_classes is None else num_classes
    return rearrange(logits, "n (a k) h w -> n (h w) a k", k=k)


def _probs(z: Tensor, head: str, temperature: float) -> Tensor:
    z = to_accumulation_dtype(z) / temperature
    return torch.sigmoid(z) if head == "sigmoid" else torch.softmax(z, dim=-1)


def position_kl(
    s_logits: Tensor,
    t_logits: Tensor,
    *,
    head: str = "sigmoid",
    temperature: float = 1.0,
    num_classes: int | None = None,
) -> Tensor:
    """KL per position, summed over anchors and classes: float32 (N, P). No ``T^2`` factor.

    ``head="sigmoid"``: per-class binary KL; ``"softmax"``: Hinton KL over the K classes.
    """
    s = to_positions(s_logits, num_classes)
    t = to_positions(t_logits, num_classes)
    if head == "sigmoid":
        return binary_kl(s, t, temperature).sum(dim=(2, 3))
    return softmax_kl(s, t, temperature, dim=-1).sum(dim=2)


def position_prob_diff(
    s_logits: Tensor,
    t_logits: Tensor,
    *,
    head: str = "sigmoid",
    temperature: float = 1.0,
    num_classes: int | None = None,
) -> Tensor:
    """Logit guidance ``mean_{a,k} |p - q|`` per position: float32 (N, P)."""
    p = _probs(to_positions(t_logits, num_classes), head, temperature)
    q = _probs(to_positions(s_logits, num_classes), head, temperature)
    return (p - q).abs().mean(dim=(2, 3))


def weighted_kl_sum(
    s_logits: Tensor,
    t_logits: Tensor,
    weights: Tensor,
    *,
    head: str = "sigmoid",
    temperature: float = 1.0,
    num_classes: int | None = None,
) -> Tensor:
    """``sum_{n,p} W(n,p) * KL(n,p)``: float32 scalar. ``weights`` (N, P); no ``T^2`` factor."""
    kl = position_kl(s_logits, t_logits, head=head, temperature=temperature, num_classes=num_classes)
    return (to_accumulation_dtype(weights) * kl).sum()
