"""FAMKD: fine-grained adaptive feature masking distillation, features and logits together."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._backend import check_backend
from .._validation import as_levels, check_level_device, check_seed, plural
from ..functional import fusion_weights
from ._base import DistillationLoss, prefixed_terms
from ._levels import LevelLosses, channel_pairs, names_levels
from .feature import ScaleAwareMaskedFeatureLoss
from .logits import MaskedLogitsLoss
from .presets import FAMKD_DEFAULTS as DEFAULTS
from .presets import FEATURE_DEFAULTS, FULL_METHOD, LOGITS_DEFAULTS

__all__ = ["FULL_METHOD", "FAMKDLoss"]


class FAMKDLoss(DistillationLoss):
    """The whole method: one scale-aware masked feature loss per FPN level plus the masked logits loss.

    ``loss = sum_l ScaleAwareMaskedFeatureLoss_l(S_l, T_l) + MaskedLogitsLoss(Z_S, Z_T)``

    The feature options (``scales`` to ``resize_student``, and ``seed``) are passed to every
    `ScaleAwareMaskedFeatureLoss`, the logits options (``head`` to ``num_classes``) to
    `MaskedLogitsLoss`. The defaults are those of the part modules, the method's first reading,
    except where the demo's ablation on its validation split chose otherwise: ``scales=(1,)``,
    ``mask_mode="topk_nonsalient"``, ``ratio_sp=0.5``, ``ratio_ch=0.25``,
    ``branches=("channel",)`` and ``weights="mask"``. ``FAMKDLoss(..., **FULL_METHOD)``
    restores the first reading: the multi-scale, dual-branch method with salient top-k masks
    and soft logits weights. (Both settings are written once, in `famkd_losses.losses.presets`.)

    Args:
        student_channels: Cs per level, e.g. ``[128] * 5`` (an int: one level). A 1x1 align
            conv maps a level to the teacher's width where Cs != Ct.
        teacher_channels: Ct per level, e.g. ``[256] * 5`` (an int: one level), the width of
            the generators; as many levels as ``student_channels``.
        scales: max-pool windows of the scale-aware pyramid (kernel = stride = s,
            ``ceil_mode``); ``(1,)`` is the level itself. A scale larger than ``min(H, W)`` of
            a level is skipped on that level. ``FULL_METHOD``: ``(1, 2, 4)``.
        mask_mode: which entries the masks hide, ranked by the teacher's saliency at each
            scale: ``"topk_nonsalient"`` the least salient, ``"topk"`` the most salient
            (``FULL_METHOD``), ``"sample"`` a draw in proportion to the attention (Gumbel-top-k,
            exactly the ratio's count), ``"random"`` a uniform subset (MGD-like).
        ratio_sp: fraction of positions hidden by the spatial branch, in [0, 1):
            ``round(ratio_sp * H * W)`` per image, rounding half up. ``FULL_METHOD``: 0.65
            (MGD's).
        ratio_ch: fraction of channels hidden by the channel branch, in [0, 1).
            ``FULL_METHOD``: 0.5.
        tau: temperature of the teacher attention (FGD's).
        branches: ``"channel"`` or ``"spatial"`` alone (no fusion weights), or
            ``("spatial", "channel")`` fused per scale with learnable weights
            ``softmax(theta_s)`` (``FULL_METHOD``).
        weighting: ``"none"``, or ``"attention"``: the squared error is weighted by
            ``A_sp * A_ch`` of the teacher (FGD-style).
        scale_weights: one non-negative weight per scale; ``None`` gives 1 to every scale.
        alpha: weight of the feature part, in MGD's convention (squared error summed over C,
            H, W and divided by N, hence tiny): 2e-5 for one-stage, 5e-7 for two-stage
            detectors.
        share_generators: one generator per branch and level, shared by all scales, or
            (``False``) one per branch, level and scale.
        resize_student: resize the student bilinearly to the teacher's size where the spatial
            sizes differ; if ``False``, a mismatch is an error.
        seed: seed of the random mask modes (``"sample"``, ``"random"``); level l uses
            ``seed + l``. ``None`` draws from the global generator. The stream continues
            through copies and ``state_dict`` (see `ScaleAwareMaskedFeatureLoss`).
        head: ``"sigmoid"``: the per-class binary KL (dense detectors); ``"softmax"``:
            Hinton's KL over the K classes of each anchor (e.g. an RoI classifier's (P, K+1)
            logits).
        temperature: KD temperature t (> 0); the logits part carries a ``t^2`` factor.
        guidance: the map D of where teacher and student disagree: ``"logit"``,
            ``D = mean_{a,k} |p - q|`` (the paper's original version), or ``"feature"``,
            ``D = mean_c (T_l - align(S_l))^2`` (the revision).
        region_scales: if given, region-aware guidance: D averaged over max-pooled and
            upsampled copies of itself at these scales (needs dense logits or feature
            guidance).
        weights: the detached weight map W of the logits KL: ``"mask"``, 1 on the top
            ``ratio_l`` positions by D and 0 elsewhere, or ``"soft"``,
            ``W = P * softmax_p(D / tau_w)`` with mean 1 (``FULL_METHOD``).
        tau_w: temperature of the soft weights (``|p - q|`` lies in [0, 1]).
        ratio_l: fraction of positions kept by the mask weights, in [0, 1] (1: every position;
            0 keeps none, and the logits part is then 0; a level where ``ratio_l * P`` rounds
            to 0 keeps none either, with a warning).
        beta: weight of the logits part.
        num_classes: K, to split the channels ``A*K`` of dense logits into anchors and
            classes. Required by the softmax head on dense logits; with the sigmoid head it
            only checks that the channels are a multiple of K.
        backend: ``"auto"``: the fused Triton kernels on CUDA tensors when triton is
            importable, the PyTorch reference otherwise; ``"torch"``: the reference;
            ``"compile"``: ``torch.compile`` of the reference; ``"triton"``: the kernels, or
            an error where they cannot run.

    ``forward(s_feats, t_feats, s_logits=None, t_logits=None)``: features as sequences (or
    mappings, such as torchvision's FPN output) of (N, C_l, H_l, W_l) maps; logits optional
    (feature-only distillation when both are ``None``), one map per feature level on that
    level's grid: dense (N, A*K, H_l, W_l) or flattened (N, A*H_l*W_l, K) (logits whose level
    count, grid or batch disagrees with the features are an error). Returns a float32 scalar (float64 for float64
    inputs). `last_terms` gives its parts: ``"total"``, ``"feature"``, ``"feature/level{l}"``,
    ``"feature/level{l}/scale{s}"`` (the contribution of each scale used) and, with logits,
    ``"logits"`` and ``"logits/level{l}"``.
    """

    inputs = ("features", "logits")
    optional_inputs = ("logits",)

    def __init__(
        self,
        student_channels: Sequence[int] | int,
        teacher_channels: Sequence[int] | int,
        *,
        scales: Sequence[int] = DEFAULTS["scales"],
        mask_mode: str = DEFAULTS["mask_mode"],
        ratio_sp: float = DEFAULTS["ratio_sp"],
        ratio_ch: float = DEFAULTS["ratio_ch"],
        tau: float = DEFAULTS["tau"],
        branches: Sequence[str] | str = DEFAULTS["branches"],
        weighting: str = DEFAULTS["weighting"],
        scale_weights: Sequence[float] | None = DEFAULTS["scale_weights"],
        alpha: float = DEFAULTS["alpha"],
        share_generators: bool = DEFAULTS["share_generators"],
        resize_student: bool = DEFAULTS["resize_student"],
        seed: int | None = DEFAULTS["seed"],
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
        options = {name: value for name, value in locals().items() if name in DEFAULTS}  # the options as given
        super().__init__()
        if not names_levels(student_channels, teacher_channels) and isinstance(teacher_channels, int):
            student_channels, teacher_channels = [student_channels], [teacher_channels]  # one level
        channels = channel_pairs(student_channels, teacher_channels)
        self.backend = check_backend(backend)
        check_seed("seed", seed)
        feature_options = {name: options[name] for name in FEATURE_DEFAULTS if name != "seed"}
        self.feature_losses = LevelLosses(
            (
                ScaleAwareMaskedFeatureLoss(
                    cs, ct, **feature_options, seed=None if seed is None else seed + level, backend=backend
                )
                for level, (cs, ct) in enumerate(channels)
            ),
            same_batch=True,
        )
        self.logits_loss = MaskedLogitsLoss(**{name: options[name] for name in LOGITS_DEFAULTS}, backend=backend)

    @property
    def num_levels(self) -> int:
        return len(self.feature_losses)

    def forward(
        self,
        s_feats: Sequence[Tensor],
        t_feats: Sequence[Tensor],
        s_logits: Tensor | Sequence[Tensor] | None = None,
        t_logits: Tensor | Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Features (and optionally logits) of every level -> float32 scalar."""
        if (s_logits is None) != (t_logits is None):
            raise ValueError(
                "pass both s_logits and t_logits, or neither (feature-only distillation); got "
                f"s_logits={'None' if s_logits is None else 'a value'}, "
                f"t_logits={'None' if t_logits is None else 'a value'}"
            )
        s_list, t_list, _ = as_levels("s_feats", s_feats, "t_feats", t_feats)
        feature, aligned = self.feature_losses(s_list, t_list, return_aligned=True)
        terms = prefixed_terms("feature", self.feature_losses)
        total = feature
        if s_logits is not None and t_logits is not None:
            self._check_logits_match_features(s_logits, t_logits, s_list, t_list)
            if self.logits_loss.guidance == "feature":  # D from T_l and align(S_l), detached
                logits = self.logits_loss(s_logits, t_logits, aligned, t_list)
            else:
                logits = self.logits_loss(s_logits, t_logits)
            terms.update(prefixed_terms("logits", self.logits_loss))
            total = feature + logits
        self._record({**terms, "total": total})
        return total

    def _check_logits_match_features(
        self, s_logits: object, t_logits: object, s_list: list[Tensor], t_list: list[Tensor]
    ) -> None:
        """Logits that can belong to these features: one logits level per feature level, each on
        that level's grid (dense ``(N, A*K, H_l, W_l)``, or flattened ``(N, A*H_l*W_l, K)``),
        batch and device. Metadata only; what is not a non-empty 3-D/4-D tensor is left to the
        logits loss's checks."""
        zs, _, _ = as_levels("s_logits", s_logits, "t_logits", t_logits)
        n = s_list[0].shape[0]
        if len(zs) != self.num_levels:
            raise ValueError(
                f"s_logits has {plural(len(zs), 'level')} but the features have {plural(self.num_levels, 'level')}; "
                "FAMKDLoss distils logits level l beside feature level l, so pass one logits tensor per feature level"
            )
        for level, (z, t) in enumerate(zip(zs, t_list)):
            if not isinstance(z, Tensor) or z.dim() not in (3, 4) or z.numel() == 0:
                continue  # the logits loss says what is wrong with it
            hw = tuple(t.shape[-2:])
            if z.shape[0] != n:
                raise ValueError(
                    f"s_logits at level {level} have batch {z.shape[0]} but the features have batch {n} "
                    f"(logits {tuple(z.shape)})"
                )
            if z.dim() == 4 and tuple(z.shape[-2:]) != hw:
                raise ValueError(
                    f"s_logits at level {level} are {tuple(z.shape[-2:])} but the features at level {level} are "
                    f"{hw} (logits {tuple(z.shape)}, teacher feature {tuple(t.shape)}); the dense logits of a level "
                    "must be on its feature grid"
                )
            if z.dim() == 3 and z.shape[1] % (hw[0] * hw[1]) != 0:
                raise ValueError(
                    f"flattened s_logits at level {level} have {plural(z.shape[1], 'position')}, not a multiple of "
                    f"the {hw[0]}x{hw[1]} = {plural(hw[0] * hw[1], 'position')} of the features at level {level} "
                    f"(logits {tuple(z.shape)}); flattened logits hold A anchors per feature cell"
                )
        for level, z in enumerate(zs):  # the student's logits on the features' device
            check_level_device("s_logits", z, level, s_list[0], "s_feats at level 0")

    @torch.no_grad()
    def fusion_weights(self) -> list[Tensor]:
        """The adaptive branch weights ``softmax(theta)`` per level: (num_scales, num_branches) each."""
        return [
            fusion_weights(fl.fusion_logits) if fl.fusion_logits is not None else torch.ones(len(fl.scales), 1)
            for fl in self.feature_losses
        ]
