"""The logits part of FAMKD: KL distillation weighted where teacher and student disagree."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import ops
from .._backend import check_backend
from .._validation import (
    as_levels,
    at_level,
    caller_stacklevel,
    check_channels,
    check_choice,
    check_non_negative,
    check_pair,
    check_positive,
    check_ratio,
    check_same_device,
    check_scales,
    check_tensor,
    plural,
    warn_if_swapped,
)
from ..functional import (
    HEADS,
    WEIGHT_MODES,
    feature_guidance,
    guidance_weights,
    num_masked,
    region_aware_guidance,
)
from ._base import DistillationLoss
from ._levels import Levels, level_terms, sum_terms
from .presets import LOGITS_DEFAULTS as DEFAULTS

__all__ = ["MaskedLogitsLoss", "GUIDANCES"]

GUIDANCES = ("logit", "feature")


class MaskedLogitsLoss(DistillationLoss):
    """Masked logits distillation.

    Per level, a guidance map D says where teacher and student disagree; a detached weight
    map W made from it says where, and how strongly, the temperature KL is distilled::

        loss = beta * t^2 * sum_l sum_{n,p} W_l(n,p) KL_l(n,p) / (N * sum_l P_l)

    with ``KL`` summed over anchors and classes at each position p.

    Args:
        head: ``"sigmoid"`` (per-class binary KL, dense detectors) or ``"softmax"`` (Hinton
            KL over the K classes, e.g. an RoI classifier's (P, K+1) logits).
        temperature: KD temperature t (> 0).
        guidance: ``"logit"``: ``D = mean_{a,k} |p - q|`` (default, the paper's original
            version); ``"feature"``: ``D = mean_c (T - S)^2`` of features passed to ``forward``
            (the revision; both must have the same channels: FAMKDLoss passes its aligned
            student).
        region_scales: if given, the region-aware guidance ``mean_s upsample(maxpool(D, s))``
            over these scales (needs a spatial layout: dense logits, or feature guidance).
        weights: ``"soft"``: ``W = P * softmax_p(D / tau_w)`` (mean 1); ``"mask"``: 1 on the
            top ``ratio_l`` positions by D, 0 elsewhere.
        tau_w: temperature of the soft weights (our reading: 0.1, since ``|p - q|`` is in [0, 1]).
        ratio_l: fraction of positions kept by the mask weights, in [0, 1] (1: every position;
            0 keeps none, and the logits part is then 0; a level where ``ratio_l * P`` rounds
            to 0 keeps none either, with a warning).
        beta: overall weight.
        num_classes: K, to split dense channels ``A*K`` into anchors and classes. Required by
            the softmax head on dense logits; the sigmoid head sums over anchors and classes
            alike, so it only checks that the channels are a multiple of K.
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"`` (the fused KL kernel of
            `famkd_losses.kernels.logits_kl`; float64 logits fall back to the reference).

    Inputs: one level or a sequence (or mapping) of levels, each dense ``(N, A*K, H, W)`` or
    flattened ``(N, P, K)``; student and teacher of the same shape. In the dense layout a
    position is a grid cell (its KL sums the A anchors, P = H*W); in the flattened layout a
    position is a row (P rows), so flattening a head with A anchors per cell into
    ``(N, H*W*A, K)`` weighs and normalises per anchor and gives about ``1/A`` of the dense
    value: scale ``beta`` by A to carry a dense setting over. With feature guidance, features
    ``(N, C, H_f, W_f)`` per level: ``(H_f, W_f)`` equal to the dense logits' ``(H, W)``, or
    ``P`` a multiple ``A`` of ``H_f * W_f`` for flattened logits ordered (h, w, a) as
    torchvision and mmdetection flatten them.

    The teacher is detached. A NaN/Inf in the teacher propagates into the loss.
    """

    inputs = ("logits",)

    def __init__(
        self,
        *,
        head: str = DEFAULTS["head"],
        temperature: float = DEFAULTS["temperature"],
        guidance: str = DEFAULTS["guidance"],
        region_scales: Sequence[int] | None = DEFAULTS["region_scales"],
        weights: str = DEFAULTS["weights"],
        tau_w: float = DEFAULTS["tau_w"],
        ratio_l: float = DEFAULTS["ratio_l"],
        beta: float = DEFAULTS["beta"],
        num_classes: int | None = DEFAULTS["num_classes"],
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_choice("head", head, HEADS)
        check_choice("guidance", guidance, GUIDANCES)
        check_choice("weights", weights, WEIGHT_MODES)
        self.head = head
        self.temperature = check_positive("temperature", temperature)
        self.guidance = guidance
        self.region_scales = None if region_scales is None else check_scales("region_scales", region_scales)
        self.weights = weights
        self.tau_w = check_positive("tau_w", tau_w)
        self.ratio_l = check_ratio("ratio_l", ratio_l, upper_inclusive=True)
        self.beta = check_non_negative("beta", beta)
        self.num_classes = None if num_classes is None else check_channels("num_classes", num_classes)
        self.backend = check_backend(backend)

    def extra_repr(self) -> str:
        return (
            f"head={self.head!r}, temperature={self.temperature}, guidance={self.guidance!r}, "
            f"region_scales={self.region_scales}, weights={self.weights!r}, tau_w={self.tau_w}, "
            f"ratio_l={self.ratio_l}, beta={self.beta}"
        )

    def _check_logits(self, s: Tensor, t: Tensor, level: int | None) -> None:
        where = at_level(level)
        check_tensor("student logits", s, (3, 4), level)
        check_tensor("teacher logits", t, (3, 4), level)
        check_same_device([("student logits", s), ("teacher logits", t)], level)
        if s.shape != t.shape:
            raise ValueError(f"logits shapes differ{where}: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
        warn_if_swapped("student logits", s, "teacher logits", t)
        if s.dim() == 4 and self.head == "softmax" and self.num_classes is None:
            raise ValueError(
                f"head='softmax' with dense logits{where} {tuple(s.shape)} needs num_classes=K to split the "
                f"{plural(s.shape[1], 'channel')} into anchors and classes (num_classes={s.shape[1]} if there is "
                "one anchor)"
            )
        if s.dim() == 4 and self.num_classes is not None and s.shape[1] % self.num_classes != 0:
            raise ValueError(
                f"dense logits{where} have {plural(s.shape[1], 'channel')}, not a multiple of "
                f"num_classes={self.num_classes}"
            )
        if s.dim() == 3 and self.num_classes is not None and s.shape[2] != self.num_classes:
            raise ValueError(
                f"flattened logits{where} have {plural(s.shape[2], 'class', 'classes')} but "
                f"num_classes={self.num_classes}"
            )

    def _guide(
        self,
        s: Tensor,
        t: Tensor,
        s_feat: Tensor | None,
        t_feat: Tensor | None,
        level: int | None,
        logit_guide: Tensor | None = None,
    ) -> Tensor:
        """Guidance D of one level, (N, P) float32, detached. ``logit_guide``: the logit guidance
        ``position_prob_diff`` (needed when ``guidance="logit"``)."""
        where = at_level(level)
        n = s.shape[0]
        if self.guidance == "logit":
            assert logit_guide is not None
            d = logit_guide
            if self.region_scales is not None:
                if s.dim() != 4:
                    raise ValueError(
                        f"region_scales needs a spatial layout{where}: dense (N, A*K, H, W) logits or "
                        f"guidance='feature'; got flattened logits {tuple(s.shape)}"
                    )
                h, w = s.shape[-2:]
                d = region_aware_guidance(d.reshape(n, h, w), self.region_scales).reshape(n, h * w)
            return d
        assert s_feat is not None and t_feat is not None
        check_pair("student feature", s_feat, "teacher feature", t_feat, level=level)
        if s_feat.shape[1] != t_feat.shape[1]:
            raise ValueError(
                f"guidance='feature' needs features of equal channels{where}: student has {s_feat.shape[1]}, "
                f"teacher {t_feat.shape[1]}; align the student first (FAMKDLoss does)"
            )
        if s_feat.shape[0] != n:
            raise ValueError(f"features{where} have batch {s_feat.shape[0]} but logits have batch {n}")
        check_same_device([("student logits", s), ("student feature", s_feat)], level)
        hf, wf = s_feat.shape[-2:]
        d = feature_guidance(s_feat.detach(), t_feat.detach())
        if self.region_scales is not None:
            d = region_aware_guidance(d, self.region_scales)
        d = d.reshape(n, hf * wf)
        if s.dim() == 4:
            if tuple(s.shape[-2:]) != (hf, wf):
                raise ValueError(
                    f"features{where} are {(hf, wf)} but the dense logits are {tuple(s.shape[-2:])}; "
                    "feature guidance needs the same grid"
                )
            return d
        p = s.shape[1]
        if p % (hf * wf) != 0:
            raise ValueError(
                f"flattened logits{where} have {plural(p, 'position')}, not a multiple of the features' "
                f"{hf}x{wf} = {plural(hf * wf, 'position')}"
            )
        return d.repeat_interleave(p // (hf * wf), dim=1)

    def forward(
        self,
        s_logits: Tensor | Sequence[Tensor],
        t_logits: Tensor | Sequence[Tensor],
        s_feats: Tensor | Sequence[Tensor] | None = None,
        t_feats: Tensor | Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Logits of one level or a sequence of levels -> float32 scalar."""
        levels = Levels.split("s_logits", s_logits, "t_logits", t_logits)
        per_level = levels.map(self._level, *self._guiding_features(s_feats, t_feats, len(levels)), same_batch=True)
        terms = [term for term, _ in per_level]
        positions = sum(p for _, p in per_level)
        scale = self.beta * self.temperature**2 / (levels.student[0].shape[0] * positions)
        loss = scale * sum_terms(terms)
        # the per-level parts are computed only if read: no launch per level in the training step
        self._record(
            {"total": loss, **level_terms(functools.partial(torch.mul, term.detach(), scale) for term in terms)}
        )
        return loss

    def _guiding_features(
        self, s_feats: Tensor | Sequence[Tensor] | None, t_feats: Tensor | Sequence[Tensor] | None, num_levels: int
    ) -> tuple[list[Tensor | None], list[Tensor | None]]:
        """The student and teacher features of each logits level that ``guidance="feature"`` reads
        (``None`` per level with logit guidance)."""
        if self.guidance != "feature":
            if s_feats is not None or t_feats is not None:
                raise ValueError(
                    "guidance='logit' reads no features, but s_feats or t_feats was passed: features guide "
                    "the mask only with guidance='feature' (drop them, or build the loss with guidance='feature')"
                )
            return [None] * num_levels, [None] * num_levels
        if s_feats is None or t_feats is None:
            raise ValueError("guidance='feature' needs s_feats and t_feats in forward()")
        sf, tf, _ = as_levels("s_feats", s_feats, "t_feats", t_feats)
        if len(sf) != num_levels:
            raise ValueError(
                f"guidance='feature' needs one feature level per logits level: got "
                f"{plural(len(sf), 'feature level')} and {plural(num_levels, 'logits level')}"
            )
        return list(sf), list(tf)

    def _level(
        self, s: Tensor, t: Tensor, s_feat: Tensor | None, t_feat: Tensor | None, *, level: int | None
    ) -> tuple[Tensor, int]:
        """One level's weighted KL ``sum_p W(p) KL(p)`` (before the scale) and its positions P."""
        self._check_logits(s, t, level)
        t = t.detach()
        kl, logit_guide = ops.position_kl_and_prob_diff(
            s,
            t,
            head=self.head,
            temperature=self.temperature,
            num_classes=self.num_classes,
            prob_diff=self.guidance == "logit",
            backend=self.backend,
        )
        d = self._guide(s, t, s_feat, t_feat, level, logit_guide)
        if self.weights == "mask" and self.ratio_l > 0 and num_masked(d.shape[1], self.ratio_l) == 0:
            warnings.warn(
                f"ratio_l={self.ratio_l:g} keeps none of the {plural(d.shape[1], 'position')}{at_level(level)} "
                f"(round(ratio_l * P) = 0), so that level adds 0 to the loss; ratio_l >= {0.5 / d.shape[1]:.3g} "
                "keeps one",
                stacklevel=caller_stacklevel(),
            )
        w = guidance_weights(d, self.weights, tau_w=self.tau_w, ratio=self.ratio_l)
        term = (w * kl).sum()
        if self.weights == "mask" and self.guidance != "logit":
            # A 0/1 mask only ranks D: keep a NaN/Inf in the feature guidance visible in the loss.
            # (A NaN in the logit guidance comes from a NaN logit, whose position's KL the sum
            # reads whatever its weight.)
            term = term + 0.0 * d.sum()
        return term, d.shape[1]
