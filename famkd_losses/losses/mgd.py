"""MGD: Masked Generative Distillation (Yang et al., ECCV 2022)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import ops
from .._backend import check_backend
from .._validation import check_channels, check_choice, check_non_negative, check_ratio
from ..functional import bernoulli_mask
from ._base import DistillationLoss
from ._common import (
    FeatureGenerator,
    RandomSource,
    align_student,
    make_align,
    register_mask_step,
    to_module_dtype,
)
from ._levels import LevelLosses, channel_pairs, check_one_level, names_levels

__all__ = ["MGDLoss"]

MGD_MASKS = ("spatial", "channel")


class MGDLoss(DistillationLoss):
    """Masked Generative Distillation, as the official code computes it.

    Per level: ``X = align(S)``; a random mask hides each position (``mask="spatial"``,
    (N, 1, H, W), detection) or channel (``"channel"``, (N, C, 1, 1), classification)
    independently with probability ``ratio``, drawn afresh on every call; the generator
    ``Conv3x3 -> ReLU -> Conv3x3`` rebuilds the teacher::

        loss = alpha * sum((G(X * M) - T)^2) / N

    Published defaults: one-stage detectors ``ratio=0.65, alpha=2e-5``; two-stage
    ``ratio=0.45, alpha=5e-7``.

    Args:
        student_channels: Cs, an int for one level, or a sequence (one entry per level; the
            loss is then summed over levels, each level with its own layers in ``levels``).
        teacher_channels: Ct, an int or a sequence like ``student_channels``.
        ratio: masking probability, in [0, 1).
        alpha: loss weight.
        mask: ``"spatial"`` or ``"channel"``.
        generator: a ``torch.Generator`` the masks are drawn from (reproducible runs).
        seed: alternatively, a seed: call k draws from a generator seeded from (seed, k) (the
            seed itself for the first call); copies continue the stream, and ``state_dict``
            carries k as the 0-d int64 buffer ``mask_step``, so a resumed run continues it.
        resize_student: bilinearly resize the student to the teacher's size if they differ.
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"`` (the fused error kernel).

    Layers are named as in the official code (``align``, ``generation``) so its
    checkpoints load. Shapes: student (N, Cs, H, W), teacher (N, Ct, H, W); float32 scalar.
    """

    inputs = ("features",)

    def __init__(
        self,
        student_channels: int | Sequence[int],
        teacher_channels: int | Sequence[int],
        *,
        ratio: float = 0.65,
        alpha: float = 2e-5,
        mask: str = "spatial",
        generator: torch.Generator | None = None,
        seed: int | None = None,
        resize_student: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.ratio = check_ratio("ratio", ratio)
        self.alpha = check_non_negative("alpha", alpha)
        check_choice("mask", mask, MGD_MASKS)
        self.mask = mask
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if generator is not None and seed is not None:
            raise ValueError("pass either generator or seed, not both")
        self.generator = generator
        self._random = RandomSource(seed)
        self.resize_student = bool(resize_student)
        self.backend = check_backend(backend)
        self.multi_level = names_levels(student_channels, teacher_channels)
        if self.multi_level:
            self.levels = LevelLosses(
                MGDLoss(
                    cs,
                    ct,
                    ratio=ratio,
                    alpha=alpha,
                    mask=mask,
                    generator=generator,
                    seed=None if seed is None else seed + i,
                    resize_student=resize_student,
                    backend=backend,
                )
                for i, (cs, ct) in enumerate(channel_pairs(student_channels, teacher_channels))
            )
            return
        self.student_channels = check_channels("student_channels", student_channels)
        self.teacher_channels = check_channels("teacher_channels", teacher_channels)
        self.align = make_align(self.student_channels, self.teacher_channels)
        self.generation = FeatureGenerator(self.teacher_channels)
        register_mask_step(self, self._random)  # the stream's position, in state_dict

    def _draw(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        if self.generator is not None:
            gen = self.generator
        else:
            gen = self._random.next(device)
        return bernoulli_mask(shape, self.ratio, gen, device)

    def extra_repr(self) -> str:
        channels = "" if self.multi_level else f"{self.student_channels}, {self.teacher_channels}, "
        return f"{channels}mask={self.mask!r}, ratio={self.ratio}, alpha={self.alpha}"

    def forward(
        self, s_feats: Tensor | Sequence[Tensor], t_feats: Tensor | Sequence[Tensor], *, level: int | None = None
    ) -> Tensor:
        """One (N, C, H, W) pair, or sequences of levels for a multi-level loss -> float32 scalar.

        ``level``: the FPN level a single-level loss's maps are, named in error messages.
        """
        if self.multi_level:
            return self._forward_child(self.levels, s_feats, t_feats)
        check_one_level("MGDLoss", s_feats, t_feats)
        x = align_student(self, s_feats, t_feats, level)
        t = t_feats.detach()
        n, c, h, w = x.shape
        shape = (n, 1, h, w) if self.mask == "spatial" else (n, c, 1, 1)
        m = self._draw(shape, x.device)
        x = to_module_dtype(x, self.generation)
        recon = self.generation(x * m.to(x.dtype))
        loss = ops.reconstruction_error([recon], None, t, scale=self.alpha, backend=self.backend)
        self._record({"total": loss})
        return loss
