"""FAMKD: fine-grained adaptive feature masking distillation, features and logits together."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._backend import check_backend
from .._validation import as_levels, check_channel_list, check_level_device, check_seed, plural
from ..functional import fusion_weights
from ._base import DistillationLoss
from .feature import ScaleAwareMaskedFeatureLoss
from .logits import MaskedLogitsLoss

__all__ = ["FULL_METHOD", "FAMKDLoss"]

# The method's full reading (method.md): the defaults of the part modules
# (`ScaleAwareMaskedFeatureLoss`, `MaskedLogitsLoss`). FAMKDLoss's own defaults differ where the
# demo's ablation (validation split) chose otherwise: ``FAMKDLoss(..., **FULL_METHOD)`` restores these.
FULL_METHOD: dict[str, object] = {
    "scales": (1, 2, 4),
    "mask_mode": "topk",
    "ratio_sp": 0.65,
    "ratio_ch": 0.5,
    "branches": ("spatial", "channel"),
    "weights": "soft",
}


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
    and soft logits weights.

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
        ratio_l: fraction of positions kept by the mask weights, in [0, 1).
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

    def __init__(
        self,
        student_channels: Sequence[int] | int,
        teacher_channels: Sequence[int] | int,
        *,
        scales: Sequence[int] = (1,),
        mask_mode: str = "topk_nonsalient",
        ratio_sp: float = 0.5,
        ratio_ch: float = 0.25,
        tau: float = 0.5,
        branches: Sequence[str] | str = ("channel",),
        weighting: str = "none",
        scale_weights: Sequence[float] | None = None,
        alpha: float = 2e-5,
        share_generators: bool = True,
        resize_student: bool = False,
        seed: int | None = None,
        head: str = "sigmoid",
        temperature: float = 1.0,
        guidance: str = "logit",
        region_scales: Sequence[int] | None = None,
        weights: str = "mask",
        tau_w: float = 0.1,
        ratio_l: float = 0.5,
        beta: float = 1.0,
        num_classes: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(student_channels, int) and isinstance(teacher_channels, int):
            student_channels, teacher_channels = [student_channels], [teacher_channels]  # one level
        s_ch = check_channel_list("student_channels", student_channels)
        t_ch = check_channel_list("teacher_channels", teacher_channels)
        if len(s_ch) != len(t_ch):
            raise ValueError(
                f"student_channels and teacher_channels must name the same number of levels, got "
                f"{len(s_ch)} ({s_ch}) and {len(t_ch)} ({t_ch})"
            )
        self.backend = check_backend(backend)
        check_seed("seed", seed)
        self.feature_losses = nn.ModuleList(
            ScaleAwareMaskedFeatureLoss(
                cs,
                ct,
                scales=scales,
                mask_mode=mask_mode,
                ratio_sp=ratio_sp,
                ratio_ch=ratio_ch,
                tau=tau,
                branches=branches,
                weighting=weighting,
                scale_weights=scale_weights,
                alpha=alpha,
                share_generators=share_generators,
                resize_student=resize_student,
                seed=None if seed is None else seed + level,
                backend=backend,
            )
            for level, (cs, ct) in enumerate(zip(s_ch, t_ch))
        )
        self.logits_loss = MaskedLogitsLoss(
            head=head,
            temperature=temperature,
            guidance=guidance,
            region_scales=region_scales,
            weights=weights,
            tau_w=tau_w,
            ratio_l=ratio_l,
            beta=beta,
            num_classes=num_classes,
            backend=backend,
        )

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
        s_list, t_list, _ = as_levels("s_feats", s_feats, "t_feats", t_feats)
        if len(s_list) != self.num_levels:
            raise ValueError(
                f"s_feats has {plural(len(s_list), 'level')} but this loss was built for {self.num_levels} "
                f"(student_channels has {plural(self.num_levels, 'entry', 'entries')})"
            )
        if (s_logits is None) != (t_logits is None):
            raise ValueError(
                "pass both s_logits and t_logits, or neither (feature-only distillation); got "
                f"s_logits={'None' if s_logits is None else 'a value'}, "
                f"t_logits={'None' if t_logits is None else 'a value'}"
            )
        terms: dict[str, Tensor] = {}
        aligned = []
        feature_total = None
        n0 = None
        for level, (loss_l, s, t) in enumerate(zip(self.feature_losses, s_list, t_list)):
            x = loss_l.aligned_student(s, t, level)
            check_level_device("s_feats", s, level, s_list[0], "s_feats at level 0")
            if n0 is None:
                n0 = x.shape[0]
            elif x.shape[0] != n0:
                raise ValueError(f"batch size at level {level} is {x.shape[0]} but level 0 has {n0}")
            value, scale_terms = loss_l.reconstruction_loss(x, t)
            loss_l._record({"total": value, **{f"scale{k}": v for k, v in scale_terms.items()}})
            aligned.append(x)
            for s_, v in scale_terms.items():
                terms[f"feature/level{level}/scale{s_}"] = v.detach()
            terms[f"feature/level{level}"] = value.detach()
            feature_total = value if feature_total is None else feature_total + value
        assert feature_total is not None
        total = feature_total
        terms["feature"] = feature_total.detach()
        if s_logits is not None and t_logits is not None:
            self._check_logits_match_features(s_logits, t_logits, t_list, n0)
            # the student's logits on the features' device (the logits loss compares the rest)
            for i, z in enumerate([s_logits] if isinstance(s_logits, Tensor) else s_logits):
                check_level_device("s_logits", z, i, s_list[0], "s_feats at level 0")
            if self.logits_loss.guidance == "feature":
                logits_value = self.logits_loss(s_logits, t_logits, [a.detach() for a in aligned], t_list)
            else:
                logits_value = self.logits_loss(s_logits, t_logits)
            for key, v in self.logits_loss._recorded().items():  # lazy parts stay lazy
                if key != "total":
                    terms[f"logits/{key}"] = v
            terms["logits"] = logits_value.detach()
            total = total + logits_value
        terms["total"] = total
        self._record(terms)
        return total

    def _check_logits_match_features(self, s_logits: object, t_logits: object, t_list: list[Tensor], n: int) -> None:
        """Logits that can belong to these features: one logits level per feature level, each on
        that level's grid (dense ``(N, A*K, H_l, W_l)``, or flattened ``(N, A*H_l*W_l, K)``) and
        batch. Metadata only; what is not a non-empty 3-D/4-D tensor is left to the logits loss's
        checks."""
        zs, _, _ = as_levels("s_logits", s_logits, "t_logits", t_logits)
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

    @torch.no_grad()
    def fusion_weights(self) -> list[Tensor]:
        """The adaptive branch weights ``softmax(theta)`` per level: (num_scales, num_branches) each."""
        return [
            fusion_weights(fl.fusion_logits) if fl.fusion_logits is not None else torch.ones(len(fl.scales), 1)
            for fl in self.feature_losses
        ]
