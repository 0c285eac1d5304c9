"""The feature part of FAMKD: scale-aware, attention-masked feature reconstruction (one FPN level)."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import ops
from .._backend import check_backend
from .._validation import (
    check_channels,
    check_choice,
    check_non_negative,
    check_positive,
    check_ratio,
    check_scales,
    check_weight_list,
)
from ..functional import (
    MASK_MODES,
    active_scales,
    attention_from_saliency,
    mask_from_saliency,
)
from ..functional._dtypes import accumulation_dtype
from ._base import DistillationLoss
from ._common import (
    FeatureGenerator,
    RandomSource,
    align_student,
    make_align,
    register_mask_step,
    to_module_dtype,
)
from ._levels import sum_terms
from .presets import FEATURE_DEFAULTS as DEFAULTS

__all__ = ["ScaleAwareMaskedFeatureLoss", "BRANCHES", "WEIGHTINGS"]

BRANCHES = ("spatial", "channel")
WEIGHTINGS = ("none", "attention")


class ScaleAwareMaskedFeatureLoss(DistillationLoss):
    """Scale-aware adaptive masked feature reconstruction for one FPN level.

    For each scale s the teacher map T and the aligned student map X = align(S) are max-pooled
    over s x s windows; the teacher's attention at that scale picks the positions (spatial
    branch) and channels (channel branch) to hide in X; one generator per branch rebuilds the
    teacher from the masked student; the branches are fused with learnable weights
    ``softmax(theta_s)``; the loss is the squared error summed over C, H, W, divided by N::

        loss = alpha * sum_s scale_weight_s * sum((w0 G_sp(X_s M_sp) + w1 G_ch(X_s M_ch) - T_s)^2) / N

    Args:
        student_channels: Cs of the student map.
        teacher_channels: Ct of the teacher map (the generators' width).
        scales: pooling windows; ``(1,)`` is the single-scale variant. Scales larger than
            ``min(H, W)`` of a level are skipped for that level. (Our reading: ``(1, 2, 4)``.)
        mask_mode: ``"topk"`` hides the most salient entries; ``"topk_nonsalient"`` the least;
            ``"sample"`` draws entries with probability proportional to the attention (without
            replacement, exactly the ratio's count); ``"random"`` a uniform subset (MGD-like).
        ratio_sp: fraction of positions hidden by the spatial branch, in [0, 1).
        ratio_ch: fraction of channels hidden by the channel branch, in [0, 1).
        tau: attention temperature.
        branches: ``("spatial", "channel")`` or one of them alone (then no fusion weights).
        weighting: ``"none"`` or ``"attention"`` (error weighted by ``A_sp * A_ch`` of T_s).
        scale_weights: one non-negative weight per scale; default 1 for every scale.
        alpha: overall weight (MGD's convention: 2e-5 one-stage, 5e-7 two-stage).
        share_generators: one generator per branch shared by all scales (default) or one per
            branch and scale.
        resize_student: resize the student bilinearly to the teacher's size when the spatial
            sizes differ; otherwise that is an error.
        seed: seed of the masks' random draws (``"sample"``/``"random"``); ``None`` uses the
            global generator. Call k draws from a generator seeded from (seed, k) (the seed
            itself for the first call); copies continue the stream, and ``state_dict`` carries
            k as the 0-d int64 buffer ``mask_step`` (EMA-safe), so a resumed run continues it.
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"`` (fused kernels for the
            branch fusion, error, weighting and reduction; inputs the kernels do not take, such
            as float64, run the reference).

    Shapes: student (N, Cs, H, W), teacher (N, Ct, H, W) (detached here). Returns a float32
    scalar (float64 for float64 inputs). After a call, `last_terms` gives ``"total"`` and
    ``"scale{s}"``, the contribution of each scale used.

    Masks and attention carry no gradient; gradients reach the student, the align conv, the
    generators and the fusion weights. Every parameter gets a gradient on every call (a zero one
    for the generators of scales that do not fit the map), so ``DistributedDataParallel`` with
    ``find_unused_parameters=False`` works whatever the level sizes. A NaN/Inf in the teacher propagates into the loss
    (it is never masked out), so a broken teacher gives a non-finite loss, not a silent one.
    """

    inputs = ("features",)

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
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
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.student_channels = check_channels("student_channels", student_channels)
        self.teacher_channels = check_channels("teacher_channels", teacher_channels)
        self.scales = check_scales("scales", scales)
        check_choice("mask_mode", mask_mode, MASK_MODES)
        self.mask_mode = mask_mode
        self.ratio_sp = check_ratio("ratio_sp", ratio_sp)
        self.ratio_ch = check_ratio("ratio_ch", ratio_ch)
        self.tau = check_positive("tau", tau)
        if isinstance(branches, str):
            branches = (branches,)
        if not isinstance(branches, Sequence):
            raise TypeError(f"branches must be a branch name or a sequence of {BRANCHES!r}, got {branches!r}")
        branches = tuple(branches)
        if not branches:
            raise ValueError(f"branches must name at least one of {BRANCHES!r}, got ()")
        for b in branches:
            check_choice("branches", b, BRANCHES)
        if len(set(branches)) != len(branches):
            raise ValueError(f"branches must not repeat a branch, got {branches!r}")
        self.branches = branches
        check_choice("weighting", weighting, WEIGHTINGS)
        self.weighting = weighting
        if scale_weights is None:
            scale_weights = [1.0] * len(self.scales)
        self.scale_weights = check_weight_list(
            "scale_weights", scale_weights, len(self.scales), f"scale of {self.scales}"
        )
        self.alpha = check_non_negative("alpha", alpha)
        self.share_generators = bool(share_generators)
        self.resize_student = bool(resize_student)
        self.backend = check_backend(backend)
        self._random = RandomSource(seed)
        if self.mask_mode in ("sample", "random"):
            register_mask_step(self, self._random)  # the stream's position, in state_dict

        self.align = make_align(self.student_channels, self.teacher_channels)
        per_branch = 1 if self.share_generators else len(self.scales)
        self.generators = nn.ModuleDict(
            {b: nn.ModuleList(FeatureGenerator(self.teacher_channels) for _ in range(per_branch)) for b in branches}
        )
        if len(branches) > 1:
            # theta: one row of branch logits per scale; softmax(0) = equal weights at start.
            self.fusion_logits = nn.Parameter(torch.zeros(len(self.scales), len(branches)))
        else:
            self.register_parameter("fusion_logits", None)

    @property
    def seed(self) -> int | None:
        return self._random.seed

    def extra_repr(self) -> str:
        return (
            f"{self.student_channels}, {self.teacher_channels}, scales={self.scales}, mask_mode={self.mask_mode!r}, "
            f"ratio_sp={self.ratio_sp}, ratio_ch={self.ratio_ch}, tau={self.tau}, branches={self.branches}, "
            f"weighting={self.weighting!r}, alpha={self.alpha}"
        )

    def _generator(self, branch: str, scale_index: int) -> nn.Module:
        gens = self.generators[branch]
        return gens[0] if self.share_generators else gens[scale_index]

    def _masks(self, sp_sal: Tensor, ch_sal: Tensor, generator: torch.Generator | None) -> dict[str, Tensor]:
        """Each branch's mask from the pooled teacher's saliencies (no gradient)."""
        topk = functools.partial(ops.topk_mask, backend=self.backend)
        masks = {}
        for b in self.branches:
            sal, ratio = (sp_sal, self.ratio_sp) if b == "spatial" else (ch_sal, self.ratio_ch)
            masks[b] = mask_from_saliency(sal, ratio, self.mask_mode, self.tau, generator, topk)
        return masks

    def _reconstruction(self, x: Tensor, t_feat: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """The loss from an aligned student ``x`` and the teacher, both (N, Ct, H, W): the scalar
        (float32; float64 for float64 inputs) and each used scale's contribution."""
        t_feat = t_feat.detach()
        h, w = t_feat.shape[-2:]
        used = active_scales(h, w, self.scales)
        random = self.mask_mode in ("sample", "random")
        generator = self._random.next(x.device) if random else None
        terms: dict[int, Tensor] = {}
        backend = self.backend
        teacher = ops.teacher_pyramid(t_feat, used, backend=backend)  # [(t_s, mean_c|t_s|, mean_hw|t_s|)]
        student = [x_s for _, x_s in ops.maxpool_pyramid(x, used, backend=backend)]
        for s, (t_s, sp_sal, ch_sal), x_s in zip(used, teacher, student):
            i = self.scales.index(s)
            masks = self._masks(sp_sal, ch_sal, generator)
            gens = [self._generator(b, i) for b in self.branches]
            # X M_b for every branch from one read of X (a 0/1 mask: casting after it is exact)
            masked = ops.masked_inputs(x_s, [masks[b] for b in self.branches], backend=backend)
            recons = [gen(to_module_dtype(m, gen)) for gen, m in zip(gens, masked)]
            a_sp = a_ch = None
            if self.weighting == "attention":
                a_sp, a_ch = attention_from_saliency(sp_sal, self.tau), attention_from_saliency(ch_sal, self.tau)
            row = None if self.fusion_logits is None else i
            term = ops.reconstruction_error(
                recons, self.fusion_logits, t_s, a_sp, a_ch, scale=self.alpha * self.scale_weights[i], row=row,
                backend=backend,
            )  # fmt: skip
            terms[s] = term
        if not terms:
            warnings.warn(
                f"no scale of {self.scales} fits a {h}x{w} map: this level contributes nothing "
                "(add scale 1 to distil it)",
                UserWarning,
                stacklevel=2,
            )
        parts = list(terms.values())
        if 1 not in terms:
            # The teacher was only seen through max-pooling (which drops a -inf) or not at all
            # (every scale larger than the map): keep NaN/Inf in it visible in the loss, and
            # stay attached to the student's graph.
            dtype = accumulation_dtype(x.dtype)
            parts.append(0.0 * (t_feat.sum(dtype=dtype) + x.sum(dtype=dtype)))
        total = sum_terms(parts)
        for p in self._unused_parameters(used):
            # An exact zero that reads no value (so a NaN in a parameter stays out of the loss),
            # with a zero gradient: every parameter takes part in every step, as DDP requires.
            total = total + p.reshape(-1)[:0].sum().to(total.dtype)
        return total, terms

    def _unused_parameters(self, used: Sequence[int]) -> list[nn.Parameter]:
        """The parameters that the scales ``used`` of this call do not reach: the generators of
        skipped scales (one per scale when not shared), and every generator and the fusion
        weights when no scale fits the map."""
        if self.share_generators:
            skipped = [] if used else [0]
        else:
            skipped = [i for i, s in enumerate(self.scales) if s not in used]
        params = [p for i in skipped for b in self.branches for p in self._generator(b, i).parameters()]
        if not used and self.fusion_logits is not None:
            params.append(self.fusion_logits)
        return params

    def forward(
        self, s_feat: Tensor, t_feat: Tensor, *, level: int | None = None, return_aligned: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """student (N, Cs, H, W), teacher (N, Ct, H, W) -> float32 scalar.

        ``level``: the FPN level these maps are, named in error messages. ``return_aligned``:
        also return the aligned student ``align(S)`` (N, Ct, H, W), detached (FAMKD's feature
        guidance reads it).
        """
        x = align_student(self, s_feat, t_feat, level)
        loss, scale_terms = self._reconstruction(x, t_feat)
        self._record({"total": loss, **{f"scale{s}": v for s, v in scale_terms.items()}})
        return (loss, x.detach()) if return_aligned else loss
