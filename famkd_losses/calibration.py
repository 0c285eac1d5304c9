"""Loss-weight calibration: start every distillation term at a stated fraction of the detection loss.

Published weights (MGD's ``alpha = 2e-5``, FGD's ``alpha, beta, gamma, lam``) were tuned for
COCO-sized maps, 256 channels and ResNet backbones. A feature loss is a squared error summed
over C, H and W, so on another detector its value, and the weight it needs, can be off by
orders of magnitude. A fair comparison of methods needs a rule that sets every method's
weight the same way. This is the rule: measure each term with a known weight on one batch
(or a few), then rescale the weight so the term starts at ``fraction`` times the detection
loss::

    from famkd_losses import FAMKDLoss
    from famkd_losses.calibration import calibrate_weights

    probe = FAMKDLoss(s_ch, t_ch, alpha=1.0, beta=1.0)          # weights you measure with
    det_loss = sum(student(images, targets).values())
    probe(s_feats, t_feats, s_logits, t_logits)
    parts = probe.last_terms()
    w = calibrate_weights({"feature": parts["feature"], "logits": parts["logits"]}, det_loss,
                          fraction=0.5, base_weights={"feature": 1.0, "logits": 1.0})
    kd = FAMKDLoss(s_ch, t_ch, alpha=w["feature"], beta=w["logits"])
    kd.load_state_dict(probe.state_dict())                         # same layers, new weights

The weight is set once, from the start of training; it does not follow the losses later on
(that would be a different method, a loss balancer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["calibrate_weights", "measured_value"]

Measurement = Tensor | float | int | Sequence[Tensor | float | int]


def measured_value(name: str, value: Measurement) -> float:
    """A measurement as a Python float: a number, a one-element tensor (detached), or a sequence of
    those (several batches), which is averaged. Raises ``ValueError`` on a non-finite value."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (one-element) tensor, got shape {tuple(value.shape)}")
        out = float(value.detach().to("cpu", torch.float64).reshape(()))
    elif isinstance(value, bool):
        raise TypeError(f"{name} must be a number, a scalar tensor or a sequence of them, got a bool")
    elif isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) == 0:
            raise ValueError(f"{name} is an empty sequence: measure it on at least one batch")
        values = [measured_value(f"{name}[{i}]", v) for i, v in enumerate(value)]
        out = math.fsum(values) / len(values)
    else:
        raise TypeError(f"{name} must be a number, a scalar tensor or a sequence of them, got {type(value).__name__}")
    if not math.isfinite(out):
        raise ValueError(f"{name} is not finite ({out}): it cannot be calibrated")
    return out


def calibrate_weights(
    terms: Mapping[str, Measurement],
    det_loss: Measurement,
    fraction: float | Mapping[str, float] = 1.0,
    *,
    base_weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The weight of each distillation term so that it starts at ``fraction`` of the detection loss.

    For each term ``k``, measured as ``v_k`` while its weight was ``b_k`` (``base_weights``,
    default 1, i.e. the term measured unweighted), the weight returned is::

        w_k = b_k * fraction_k * det_loss / v_k

    so that with weight ``w_k`` the term would have been ``fraction_k * det_loss`` on the
    measured batch(es). The weight is linear in the term (every loss of this package is a
    weight times a sum), so rescaling it rescales the term exactly.

    Args:
        terms: name -> measured value of each distillation term: a float, a one-element tensor
            (detached here), or a sequence of them (several batches: the mean is used).
        det_loss: the detection loss measured on the same batch(es), in the same forms.
        fraction: target ratio of each term to the detection loss (> 0), one for all terms or
            a mapping with an entry for every term.
        base_weights: the weight each term carried when measured (> 0); missing names default
            to 1. Pass the loss's current ``alpha``/``beta`` to get the new ``alpha``/``beta``
            directly.

    Returns:
        ``{name: weight}`` as Python floats, in the order of ``terms``.

    Raises:
        ValueError: a measurement is not finite, the detection loss is not positive, a term is
            not positive (a zero term cannot be scaled to anything; a negative one is not a
            distillation loss), a fraction or base weight is not positive and finite, or a
            ``fraction``/``base_weights`` mapping names a term that is not in ``terms`` (or, for
            ``fraction``, misses one).
    """
    if not isinstance(terms, Mapping) or not terms:
        raise ValueError("terms must be a non-empty mapping of name -> measured value")
    det = measured_value("det_loss", det_loss)
    if det <= 0:
        raise ValueError(f"det_loss must be positive, got {det}")
    names = list(terms)
    if isinstance(fraction, Mapping):
        unknown = sorted(set(fraction) - set(names))
        missing = [n for n in names if n not in fraction]
        if unknown or missing:
            raise ValueError(f"fraction must name exactly the terms {names}; unknown: {unknown}, missing: {missing}")
        fractions = {n: float(fraction[n]) for n in names}
    else:
        fractions = dict.fromkeys(names, float(fraction))
    base = dict(base_weights or {})
    unknown = sorted(set(base) - set(names))
    if unknown:
        raise ValueError(f"base_weights names terms that are not in terms: {unknown} (terms: {names})")
    weights = {}
    for name in names:
        f = fractions[name]
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"fraction for {name!r} must be positive and finite, got {f}")
        b = float(base.get(name, 1.0))
        if not (math.isfinite(b) and b > 0):
            raise ValueError(f"base weight of {name!r} must be positive and finite, got {b}")
        v = measured_value(f"terms[{name!r}]", terms[name])
        if v <= 0:
            raise ValueError(
                f"term {name!r} measured {v}: a term that is not positive cannot be scaled to a fraction of the "
                "detection loss (is the loss connected, or its weight zero?)"
            )
        weights[name] = b * f * det / v
    return weights
