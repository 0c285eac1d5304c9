"""FGD: Focal and Global Knowledge Distillation for detectors (Yang et al., CVPR 2022)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .. import ops
from .._backend import check_backend
from .._validation import check_channels, check_image_size, check_non_negative, check_positive, plural
from ..functional import attention_from_saliency, box_masks, channel_attention, spatial_attention, squared_error_sum
from ._base import DistillationLoss
from ._common import align_student, make_align, to_module_dtype
from ._levels import LevelLosses, channel_pairs, check_one_level, names_levels

__all__ = ["FGDLoss"]


def _context_branch(channels: int) -> nn.Sequential:
    """``W2(ReLU(LayerNorm(W1(ctx))))``: (N, C, 1, 1) -> (N, C, 1, 1)."""
    return nn.Sequential(
        nn.Conv2d(channels, channels // 2, kernel_size=1),
        nn.LayerNorm([channels // 2, 1, 1]),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels // 2, channels, kernel_size=1),
    )


def _all_boxes_valid(boxes: Tensor) -> bool:
    """Whether every box of (M, 4) corners has ``x2 - x1`` and ``y2 - y1`` finite and >= 0.

    A NaN or Inf coordinate makes its extent NaN or infinite, so one test of the two extents
    covers finiteness and order (five launches, as many as a finiteness check alone). False
    also where two finite corners' extent overflows the dtype: the caller looks again then.
    """
    extent = boxes[:, 2:] - boxes[:, :2]
    return bool(((extent >= 0) & (extent < math.inf)).all())


class FGDLoss(DistillationLoss):
    """Focal and Global Distillation, as the official code computes it.

    With ``S = align(S)``, teacher/student attention ``A^t, A^s`` at temperature ``tau``,
    box masks ``M_fg, M_bg`` and ``E = A_sp^t A_ch^t (S - T)^2``::

        L = alpha sum(M_fg E)/N + beta sum(M_bg E)/N
            + gamma (sum|A_ch^s - A_ch^t| + sum|A_sp^s - A_sp^t|)/N
            + lam sum((R_s(S) - R_t(T))^2)/N

    where ``R(F) = F + W2(ReLU(LN(W1(sum_j softmax_j(Wk F)_j F_j))))`` is a GcNet-style global
    context block (separate weights for student and teacher; ``W2`` zero-initialised).

    Published defaults: RetinaNet ``tau=0.5, alpha=1e-3, beta=5e-4, gamma=5e-4, lam=5e-6``;
    two-stage ``5e-5, 2.5e-5, 5e-5, 5e-7``; FCOS ``tau=0.8, 1.6e-3, 8e-4, 8e-4, 8e-6``.

    Args:
        student_channels: Cs, an int for one level, or a sequence (one per level, summed; each
            level's layers in ``levels``).
        teacher_channels: Ct, an int or a sequence like ``student_channels``.
        tau: attention temperature.
        alpha: weight of the foreground term.
        beta: weight of the background term.
        gamma: weight of the attention-imitation term.
        lam: weight of the global-context term.
        resize_student: bilinearly resize the student to the teacher's size if they differ.
        backend: ``"auto"``, ``"torch"``, ``"compile"`` or ``"triton"`` (the teacher statistics
            and the attention-weighted error run fused).

    ``forward(s_feat, t_feat, boxes, image_size)``: student (N, Cs, H, W), teacher
    (N, Ct, H, W); ``boxes`` N tensors (n_i, 4) of x1 y1 x2 y2 in input pixels (n_i may be
    0: an all-background image; a NaN or Inf coordinate is an error); ``image_size`` the
    (H, W) of the padded input batch that the map covers, two real numbers of any type (Python,
    numpy scalars, 0-d tensors) or a 1-D tensor/array of two (the official code uses each image's
    unpadded size; the size the map covers is what its cells mean). Multi-level losses take
    sequences of maps and the same boxes.

    Layers are laid out and named as in the official code (``align``, ``conv_mask_s``,
    ``conv_mask_t``, ``channel_add_conv_s``, ``channel_add_conv_t``), so its checkpoints load.
    """

    inputs = ("features", "boxes")

    def __init__(
        self,
        student_channels: int | Sequence[int],
        teacher_channels: int | Sequence[int],
        *,
        tau: float = 0.5,
        alpha: float = 1e-3,
        beta: float = 5e-4,
        gamma: float = 5e-4,
        lam: float = 5e-6,
        resize_student: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.tau = check_positive("tau", tau)
        self.alpha = check_non_negative("alpha", alpha)
        self.beta = check_non_negative("beta", beta)
        self.gamma = check_non_negative("gamma", gamma)
        self.lam = check_non_negative("lam", lam)
        self.resize_student = bool(resize_student)
        self.backend = check_backend(backend)
        self.multi_level = names_levels(student_channels, teacher_channels)
        if self.multi_level:
            # the levels' parts keep their own names ("level{l}/fg", ...): no "level{l}" total
            self.levels = LevelLosses(
                (
                    FGDLoss(
                        cs,
                        ct,
                        tau=tau,
                        alpha=alpha,
                        beta=beta,
                        gamma=gamma,
                        lam=lam,
                        resize_student=resize_student,
                        backend=backend,
                    )
                    for cs, ct in channel_pairs(student_channels, teacher_channels)
                ),
                level_totals=False,
            )
            return
        self.student_channels = check_channels("student_channels", student_channels)
        ct = self.teacher_channels = check_channels("teacher_channels", teacher_channels)
        if ct < 2:
            raise ValueError(f"teacher_channels must be at least 2 (the context branch halves it), got {ct}")
        self.align = make_align(self.student_channels, ct)
        self.conv_mask_s = nn.Conv2d(ct, 1, kernel_size=1)
        self.conv_mask_t = nn.Conv2d(ct, 1, kernel_size=1)
        self.channel_add_conv_s = _context_branch(ct)
        self.channel_add_conv_t = _context_branch(ct)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: Wk kaiming-normal (fan_in, ReLU gain), bias 0; W2 zero."""
        if self.multi_level:
            for mod in self.levels:
                mod.reset_parameters()
            return
        for conv in (self.conv_mask_s, self.conv_mask_t):
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for branch in (self.channel_add_conv_s, self.channel_add_conv_t):
            nn.init.zeros_(branch[-1].weight)
            nn.init.zeros_(branch[-1].bias)

    @staticmethod
    def _global_context(feat: Tensor, conv_mask: nn.Conv2d, branch: nn.Sequential) -> Tensor:
        """``F + branch(sum_j softmax_j(Wk F)_j F_j)``: (N, C, H, W) -> (N, C, H, W)."""
        n, c, h, w = feat.shape
        logits = conv_mask(feat).reshape(n, 1, h * w)
        attn = torch.softmax(logits, dim=2)  # (N, 1, HW)
        context = torch.einsum("nch,nkh->nc", feat.reshape(n, c, h * w), attn).reshape(n, c, 1, 1)
        return feat + branch(context)

    def _check_boxes(
        self, boxes: Sequence[Tensor], image_size: Sequence[int], n: int, device: torch.device
    ) -> tuple[float, float]:
        if isinstance(boxes, Tensor) or not isinstance(boxes, Sequence):
            raise TypeError(f"boxes must be a list of N tensors (n_i, 4), got {type(boxes).__name__}")
        if len(boxes) != n:
            raise ValueError(
                f"boxes has {plural(len(boxes), 'entry', 'entries')} but the batch has {plural(n, 'image')}"
            )
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor):
                raise TypeError(f"boxes[{i}] must be a tensor (n, 4), got {type(b).__name__}")
            if b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"boxes[{i}] must have shape (n, 4) (x1, y1, x2, y2), got {tuple(b.shape)}")
            if not b.is_floating_point():
                raise TypeError(f"boxes[{i}] must be floating (pixel coordinates), got {b.dtype}")
            if b.device != device:
                raise ValueError(f"boxes[{i}] is on {b.device} but the features are on {device}")
        return check_image_size("image_size", image_size)

    @staticmethod
    def _check_box_values(boxes: Sequence[Tensor]) -> None:
        """Every box finite and ordered (``x1 <= x2``, ``y1 <= y2``): a NaN or Inf corner would become
        an int64 extreme in the box masks, and an inverted box (COCO's ``(x, y, w, h)`` passed as
        corners, say) would cover no position; either gives a finite but meaningless loss. One read
        of all the boxes, so one synchronisation when they are on the GPU; the image and the box
        are looked up only when one is bad."""
        filled = [b for b in boxes if b.numel() > 0 and b.device.type != "meta"]
        if not filled:
            return
        every = torch.cat(filled)
        if _all_boxes_valid(every):
            return
        for i, b in enumerate(boxes):
            nonfinite = (~torch.isfinite(b)).any(dim=1).nonzero()
            if nonfinite.numel() > 0:
                j = int(nonfinite[0, 0])
                raise ValueError(
                    f"boxes[{i}] (image {i}) has a non-finite coordinate: box {j} is {b[j].tolist()} "
                    "(x1, y1, x2, y2 in input pixels); drop or fix such boxes before the loss"
                )
            inverted = ((b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])).nonzero()
            if inverted.numel() > 0:
                j = int(inverted[0, 0])
                raise ValueError(
                    f"boxes[{i}] (image {i}) has an inverted box: box {j} is {b[j].tolist()}, but boxes are "
                    "corners (x1, y1, x2, y2) with x1 <= x2 and y1 <= y2 in input pixels (convert COCO's "
                    "(x, y, w, h) first)"
                )

    def extra_repr(self) -> str:
        channels = "" if self.multi_level else f"{self.student_channels}, {self.teacher_channels}, "
        return f"{channels}tau={self.tau}, alpha={self.alpha}, beta={self.beta}, gamma={self.gamma}, lam={self.lam}"

    def forward(
        self,
        s_feats: Tensor | Sequence[Tensor],
        t_feats: Tensor | Sequence[Tensor],
        boxes: Sequence[Tensor],
        image_size: Sequence[int],
        *,
        level: int | None = None,
    ) -> Tensor:
        """One (N, C, H, W) pair (or sequences of levels), boxes, input size -> float32 scalar.

        ``level``: the FPN level a single-level loss's maps are, named in error messages (the box
        values are read at level 0 only, or in a call without a level: every level has the same boxes).
        """
        if self.multi_level:
            return self._forward_child(self.levels, s_feats, t_feats, boxes, image_size)
        check_one_level("FGDLoss", s_feats, t_feats)
        s = align_student(self, s_feats, t_feats, level)
        t = t_feats.detach()
        n, _, h, w = t.shape
        img_size = self._check_boxes(boxes, image_size, n, t.device)
        if level is None or level == 0:  # the same boxes serve every level: read them once
            self._check_box_values(boxes)
        parts = self._weighted_parts(s, t, boxes, (h, w), img_size)
        loss = parts["fg"] + parts["bg"] + parts["attention"] + parts["global"]
        self._record({"total": loss, **parts})
        return loss

    def _weighted_parts(
        self, s: Tensor, t: Tensor, boxes: Sequence[Tensor], size: tuple[int, int], img_size: tuple[float, float]
    ) -> dict[str, Tensor]:
        """The weighted terms ``fg``, ``bg``, ``attention`` and ``global`` of an aligned student
        and the teacher, both (N, Ct, H, W) with ``size`` = (H, W)."""
        n = t.shape[0]
        ((_, sp_sal, ch_sal),) = ops.teacher_pyramid(t, (1,), backend=self.backend)  # one read of T
        a_sp_t, a_ch_t = attention_from_saliency(sp_sal, self.tau), attention_from_saliency(ch_sal, self.tau)
        a_sp_s, a_ch_s = spatial_attention(s, self.tau), channel_attention(s, self.tau)
        fg, bg = box_masks(boxes, size, img_size)
        # the attention-weighted squared errors sum(M A_sp A_ch (S - T)^2) / N inside and outside the boxes
        fg_loss = ops.reconstruction_error([s], None, t, fg * a_sp_t, a_ch_t, backend=self.backend)
        bg_loss = ops.reconstruction_error([s], None, t, bg * a_sp_t, a_ch_t, backend=self.backend)
        at_loss = ((a_ch_s - a_ch_t).abs().sum() + (a_sp_s - a_sp_t).abs().sum()) / n
        s_ctx = to_module_dtype(s, self.conv_mask_s)
        t_ctx = to_module_dtype(t, self.conv_mask_t)
        global_loss = (
            squared_error_sum(
                self._global_context(s_ctx, self.conv_mask_s, self.channel_add_conv_s),
                self._global_context(t_ctx, self.conv_mask_t, self.channel_add_conv_t),
            )
            / n
        )
        return {
            "fg": self.alpha * fg_loss,
            "bg": self.beta * bg_loss,
            "attention": self.gamma * at_loss,
            "global": self.lam * global_loss,
        }
