"""The two settings of FAMKD's options (`famkd_losses.losses.presets`) and every place that
shows them: the constructors' signatures, what FAMKDLoss builds, FULL_METHOD and the demo."""

from __future__ import annotations

import inspect

import famkd_losses
from famkd_losses import FULL_METHOD, FAMKDLoss, MaskedLogitsLoss, ScaleAwareMaskedFeatureLoss
from famkd_losses.losses import presets


def _defaults(cls: type) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty and name != "backend"
    }


def test_full_method_is_what_it_always_was():
    assert famkd_losses.FULL_METHOD is presets.FULL_METHOD
    assert FULL_METHOD == {
        "scales": (1, 2, 4),
        "mask_mode": "topk",
        "ratio_sp": 0.65,
        "ratio_ch": 0.5,
        "branches": ("spatial", "channel"),
        "weights": "soft",
    }


def test_famkd_defaults_are_the_ablations_choices():
    assert presets.ABLATION_CHOICES == {
        "scales": (1,),
        "mask_mode": "topk_nonsalient",
        "ratio_sp": 0.5,
        "ratio_ch": 0.25,
        "branches": ("channel",),
        "weights": "mask",
    }
    full = {**presets.FEATURE_DEFAULTS, **presets.LOGITS_DEFAULTS}
    assert {k: v for k, v in presets.FAMKD_DEFAULTS.items() if full[k] != v} == presets.ABLATION_CHOICES
    assert set(FULL_METHOD) == set(presets.ABLATION_CHOICES)


def test_signatures_show_the_presets():
    assert _defaults(ScaleAwareMaskedFeatureLoss) == presets.FEATURE_DEFAULTS
    assert _defaults(MaskedLogitsLoss) == presets.LOGITS_DEFAULTS
    assert _defaults(FAMKDLoss) == presets.FAMKD_DEFAULTS
    # every option FAMKDLoss takes is one of its parts' (it has none of its own)
    assert set(presets.FAMKD_DEFAULTS) == set(presets.FEATURE_DEFAULTS) | set(presets.LOGITS_DEFAULTS)


def _options(level: ScaleAwareMaskedFeatureLoss, logits: MaskedLogitsLoss) -> dict:
    """The options a feature part and a logits part were built with."""
    got = {name: getattr(level, name) for name in presets.FEATURE_DEFAULTS}
    got.update({name: getattr(logits, name) for name in presets.LOGITS_DEFAULTS})
    if set(level.scale_weights) == {1.0}:
        got["scale_weights"] = None  # the default: 1 for every scale
    return got


def _famkd_options(famkd: FAMKDLoss) -> dict:
    return _options(famkd.feature_losses[0], famkd.logits_loss)


def test_famkd_builds_its_parts_with_its_options():
    assert _famkd_options(FAMKDLoss([4], [8])) == presets.FAMKD_DEFAULTS
    full = {**presets.FEATURE_DEFAULTS, **presets.LOGITS_DEFAULTS}
    assert _famkd_options(FAMKDLoss([4], [8], **FULL_METHOD)) == _options(
        ScaleAwareMaskedFeatureLoss(4, 8), MaskedLogitsLoss()
    ) == full  # fmt: skip
    changed = {"tau": 0.7, "alpha": 1e-3, "head": "softmax", "tau_w": 0.3, "beta": 2.0, "num_classes": 3}
    assert _famkd_options(FAMKDLoss([4], [8], **changed)) == {**presets.FAMKD_DEFAULTS, **changed}


def test_demo_reads_the_famkd_defaults():
    from famkd_losses.demo.methods import FAMKD_DEFAULTS

    assert FAMKD_DEFAULTS == {name: presets.FAMKD_DEFAULTS[name] for name in FAMKD_DEFAULTS}
    assert set(FAMKD_DEFAULTS) == {"scales", "mask_mode", "ratio_sp", "ratio_ch", "branches", "guidance", "weights"}
