"""The distillation methods the demo compares, each built from the package's public losses.

Every method is a set of named terms. Each term's weight comes from
`famkd_losses.calibration.calibrate_weights`, the same way for every method: a probe
copy of the loss is built with known weights, run on the first training batch beside the
detection loss, and the real loss is built with the weights that put each term at
``fraction`` times that detection loss (then it takes over the probe's layers, so the
initialisation does not depend on the weights).

- ``mgd``: `MGDLoss` (random spatial mask, ratio 0.65) on every FPN level; term ``feature``.
- ``fgd``: `FGDLoss` with the published FCOS mix (tau 0.8; alpha : beta : gamma : lam =
  1.6e-3 : 8e-4 : 8e-4 : 8e-6), the whole mix scaled by one calibrated factor; term ``feature``.
- ``famkd_feature``: `FAMKDLoss` without logits (one scale-aware masked feature loss per
  level); term ``feature``.
- ``famkd_logits``: `MaskedLogitsLoss` on the dense class logits; term ``logits``.
- ``famkd``: `FAMKDLoss` with features and logits; terms ``feature`` and ``logits``, each
  calibrated to ``fraction`` of the detection loss.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import FAMKDLoss, FGDLoss, MaskedLogitsLoss, MGDLoss
from ..calibration import calibrate_weights
from ..integrations._outputs import DetectorOutputs, distillation_loss
from ..losses import presets

__all__ = ["METHODS", "FAMKD_DEFAULTS", "MethodSpec", "Distiller", "build_distiller"]

# FAMKDLoss options the demo exposes (the ablation varies them); everything else is the package default.
FAMKD_DEFAULTS: dict[str, Any] = {
    name: presets.FAMKD_DEFAULTS[name]
    for name in ("scales", "mask_mode", "ratio_sp", "ratio_ch", "branches", "guidance", "weights")
}  # the library's defaults, which the ablation set
_FEATURE_KEYS = ("scales", "mask_mode", "ratio_sp", "ratio_ch", "branches")
_LOGITS_KEYS = ("weights",)
FGD_FCOS = {"tau": 0.8, "alpha": 1.6e-3, "beta": 8e-4, "gamma": 8e-4, "lam": 8e-6}


@dataclass(frozen=True)
class MethodSpec:
    """A method: its key, its row label, and the names of its terms (each calibrated on its own)."""

    key: str
    label: str
    terms: tuple[str, ...]


METHODS: dict[str, MethodSpec] = {
    s.key: s
    for s in (
        MethodSpec("mgd", "+ MGD", ("feature",)),
        MethodSpec("fgd", "+ FGD", ("feature",)),
        MethodSpec("famkd_feature", "+ FAMKD feature part", ("feature",)),
        MethodSpec("famkd_logits", "+ FAMKD logits part", ("logits",)),
        MethodSpec("famkd", "+ FAMKD (both)", ("feature", "logits")),
    )
}


def _build(
    key: str,
    weights: Mapping[str, float],
    s_ch: list[int],
    t_ch: list[int],
    k: int,
    seed: int,
    opts: Mapping,
    backend: str,
) -> nn.Module:
    """The loss module of method ``key`` with term weights ``weights``."""
    if key == "mgd":
        return MGDLoss(s_ch, t_ch, ratio=0.65, alpha=weights["feature"], seed=seed, backend=backend)
    if key == "fgd":
        w = weights["feature"]
        return FGDLoss(
            s_ch,
            t_ch,
            tau=FGD_FCOS["tau"],
            backend=backend,
            **{name: FGD_FCOS[name] * w for name in ("alpha", "beta", "gamma", "lam")},
        )
    feature_opts = {n: opts[n] for n in _FEATURE_KEYS}
    logits_opts = {n: opts[n] for n in _LOGITS_KEYS}
    if key == "famkd_feature":
        return FAMKDLoss(s_ch, t_ch, alpha=weights["feature"], seed=seed, backend=backend, **feature_opts)
    if key == "famkd_logits":
        if opts["guidance"] != "logit":
            raise ValueError("the logits part alone has no features to guide it: use guidance='logit'")
        return MaskedLogitsLoss(beta=weights["logits"], num_classes=k, backend=backend, **logits_opts)
    if key == "famkd":
        return FAMKDLoss(
            s_ch,
            t_ch,
            alpha=weights["feature"],
            beta=weights["logits"],
            num_classes=k,
            seed=seed,
            guidance=opts["guidance"],
            backend=backend,
            **feature_opts,
            **logits_opts,
        )
    raise ValueError(f"unknown method {key!r}; known: {sorted(METHODS)}")


@dataclass
class Distiller:
    """A method's loss module with calibrated weights, and how to call it on detector outputs."""

    spec: MethodSpec
    loss: nn.Module
    weights: dict[str, float]
    probe_terms: dict[str, float]
    probe_det_loss: float
    options: dict[str, Any] = field(default_factory=dict)

    def __call__(self, s: DetectorOutputs, t: DetectorOutputs) -> tuple[Tensor, dict[str, float]]:
        """The weighted distillation loss and its terms (floats, for logging)."""
        return _forward(self.spec, self.loss, s, t)


def _forward(spec: MethodSpec, loss: nn.Module, s: DetectorOutputs, t: DetectorOutputs) -> tuple[Tensor, dict]:
    value = distillation_loss(loss, s, t, logits=spec.key != "famkd_feature")
    if len(spec.terms) == 1:
        return value, {spec.terms[0]: float(value.detach())}
    parts = loss.last_terms(as_float=True)
    return value, {name: parts[name] for name in spec.terms}


def build_distiller(
    key: str,
    *,
    student_channels: list[int],
    teacher_channels: list[int],
    num_classes: int,
    probe: Callable[[], tuple[DetectorOutputs, DetectorOutputs, Tensor]],
    fraction: float | Mapping[str, float],
    seed: int,
    options: Mapping[str, Any] | None = None,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> Distiller:
    """Build method ``key`` with weights calibrated on one batch.

    ``probe()`` runs the student (train mode, graph not needed) and the teacher on the first
    training batch and returns ``(student_outputs, teacher_outputs, detection_loss)``.
    ``fraction``: what each term starts at, as a fraction of that detection loss (one for all
    terms, or one per term name). ``backend`` goes to every loss module (``"auto"``: the fused
    Triton kernels on CUDA when triton is importable, the PyTorch reference otherwise).
    """
    spec = METHODS[key]
    opts = {**FAMKD_DEFAULTS, **(options or {})}
    unit = dict.fromkeys(spec.terms, 1.0)
    torch.manual_seed(seed)
    args = (student_channels, teacher_channels, num_classes, seed, opts, backend)
    probe_loss = _build(key, unit, *args).to(device)
    # the layers, and the position of a seeded mask stream, from before the probe's call: the
    # distiller's first call then draws the probe's masks and starts at the calibrated fraction
    state = copy.deepcopy(probe_loss.state_dict())
    s_out, t_out, det_loss = probe()
    with torch.no_grad():
        _, terms = _forward(spec, probe_loss, s_out, t_out)
    weights = calibrate_weights(terms, det_loss, fraction, base_weights=unit)
    loss = _build(key, weights, *args).to(device)
    loss.load_state_dict(state)
    return Distiller(spec, loss, weights, terms, float(det_loss), dict(opts))
