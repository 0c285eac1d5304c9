"""Layers and helpers the loss modules share: align convs, generators, dtype and RNG handling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import at_level, check_module_device, check_pair, check_seed, plural

# appended to channel-mismatch errors of the losses that compare raw channels
NO_ALIGN_HINT = (
    "; this loss has no align layer: project the student with your own 1x1 conv (and optimise it), or use "
    "MGDLoss, FGDLoss or FAMKDLoss, which align"
)

__all__ = [
    "NO_ALIGN_HINT",
    "make_align",
    "FeatureGenerator",
    "to_module_dtype",
    "RandomSource",
    "resize_to",
    "align_student",
]


def make_align(student_channels: int, teacher_channels: int) -> nn.Module:
    """``Conv2d(Cs, Ct, 1)`` when the widths differ, identity otherwise (MGD/FGD convention)."""
    if student_channels == teacher_channels:
        return nn.Identity()
    return nn.Conv2d(student_channels, teacher_channels, kernel_size=1, stride=1, padding=0)


class FeatureGenerator(nn.Sequential):
    """MGD's generator ``Conv3x3(C, C) -> ReLU -> Conv3x3(C, C)``: (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )


def to_module_dtype(x: Tensor, module: nn.Module) -> Tensor:
    """Bring ``x`` to the dtype of ``module``'s parameters, unless autocast decides it.

    A float16 feature meeting float32 convs (or the reverse) outside autocast would fail in
    ``conv2d``; inside autocast the conv picks its own dtype.
    """
    if torch.is_autocast_enabled(x.device.type):
        return x
    for p in module.parameters():
        return x if x.dtype == p.dtype else x.to(p.dtype)
    return x


def resize_to(x: Tensor, size: tuple[int, int], resize: bool, name: str, ref_name: str, level: int | None) -> Tensor:
    """Bilinearly resize ``x`` to ``size`` when asked, else insist that the sizes agree."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if not resize:
        raise ValueError(
            f"spatial sizes differ{at_level(level)}: {name} is {tuple(x.shape[-2:])}, {ref_name} is "
            f"{tuple(size)}; pass resize_student=True to resize the student bilinearly"
        )
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class RandomSource:
    """Seeded random draws that advance on every call, one ``torch.Generator`` per device.

    With ``seed=None`` draws come from PyTorch's global generator (``torch.manual_seed``).
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = check_seed("seed", seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def get(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def __deepcopy__(self, memo: dict) -> RandomSource:
        return RandomSource(self.seed)

    def __getstate__(self) -> dict:
        return {"seed": self.seed}

    def __setstate__(self, state: dict) -> None:
        self.seed = state["seed"]
        self._generators = {}


def align_student(loss: nn.Module, s_feat: Tensor, t_feat: Tensor, level: int | None = None) -> Tensor:
    """Validate one level's pair against a per-level loss and return ``align(S)``: (N, Ct, H, W).

    ``loss`` has ``student_channels``, ``teacher_channels``, ``resize_student`` and ``align``.
    The student is resized bilinearly to the teacher's size when ``resize_student`` is set.
    """
    where = at_level(level)
    check_pair(
        "student feature", s_feat, "teacher feature", t_feat, level=level, same_channels=False, same_spatial=False
    )
    for name, x, built in (
        ("student", s_feat, loss.student_channels),
        ("teacher", t_feat, loss.teacher_channels),
    ):
        if x.shape[1] != built:
            raise ValueError(
                f"{name} feature{where} has {plural(x.shape[1], 'channel')} but this loss was built for "
                f"{name}_channels={built} (shape {tuple(x.shape)})"
            )
    check_module_device(s_feat, "student feature", loss, level)
    s_feat = resize_to(s_feat, t_feat.shape[-2:], loss.resize_student, "student feature", "teacher feature", level)
    return loss.align(to_module_dtype(s_feat, loss.align))
