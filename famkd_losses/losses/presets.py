"""The two settings of FAMKD's options, each written once: the full method and FAMKDLoss's defaults.

- The full method (method.md's reading): `FEATURE_DEFAULTS` and `LOGITS_DEFAULTS`, the defaults
  of the part modules `ScaleAwareMaskedFeatureLoss` and `MaskedLogitsLoss`.
- `FAMKD_DEFAULTS`, the defaults of `FAMKDLoss`: the full method with `ABLATION_CHOICES`, the
  options the demo's ablation (validation split) set otherwise.

`FULL_METHOD` holds the full method's values of those options: ``FAMKDLoss(..., **FULL_METHOD)``
is the full method.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ABLATION_CHOICES", "FAMKD_DEFAULTS", "FEATURE_DEFAULTS", "FULL_METHOD", "LOGITS_DEFAULTS"]

FEATURE_DEFAULTS: dict[str, Any] = {
    "scales": (1, 2, 4),
    "mask_mode": "topk",
    "ratio_sp": 0.65,  # MGD's
    "ratio_ch": 0.5,
    "tau": 0.5,  # FGD's
    "branches": ("spatial", "channel"),
    "weighting": "none",
    "scale_weights": None,
    "alpha": 2e-5,  # MGD's, one-stage detectors
    "share_generators": True,
    "resize_student": False,
    "seed": None,
}
"""`ScaleAwareMaskedFeatureLoss`'s options (after the channels) and their defaults."""

LOGITS_DEFAULTS: dict[str, Any] = {
    "head": "sigmoid",
    "temperature": 1.0,
    "guidance": "logit",
    "region_scales": None,
    "weights": "soft",
    "tau_w": 0.1,
    "ratio_l": 0.5,
    "beta": 1.0,
    "num_classes": None,
}
"""`MaskedLogitsLoss`'s options and their defaults."""

ABLATION_CHOICES: dict[str, Any] = {
    "scales": (1,),
    "mask_mode": "topk_nonsalient",
    "ratio_sp": 0.5,
    "ratio_ch": 0.25,
    "branches": ("channel",),
    "weights": "mask",
}
"""The options where the demo's ablation chose otherwise than the full method, and its choices."""

FAMKD_DEFAULTS: dict[str, Any] = {**FEATURE_DEFAULTS, **LOGITS_DEFAULTS, **ABLATION_CHOICES}
"""`FAMKDLoss`'s options (after the channels, but ``backend``) and their defaults."""

FULL_METHOD: dict[str, object] = {name: {**FEATURE_DEFAULTS, **LOGITS_DEFAULTS}[name] for name in ABLATION_CHOICES}
"""The full method's values of the options `FAMKDLoss`'s defaults set otherwise:
``FAMKDLoss(..., **FULL_METHOD)`` restores the multi-scale, dual-branch method with salient
top-k masks and soft logits weights."""
