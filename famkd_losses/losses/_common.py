"""Layers and helpers the loss modules share: align convs, generators, dtype and RNG handling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._eager import run_eagerly
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
    "stream_seed",
    "MASK_STEP",
    "register_mask_step",
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


_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit ints that spreads nearby inputs apart."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_seed(seed: int, step: int) -> int:
    """The seed of call ``step`` (0, 1, ...) of a mask stream seeded with ``seed``.

    Call 0 uses ``seed`` itself; later calls a SplitMix64 hash of (seed, step), so the streams
    of nearby seeds (level l of a multi-level loss uses ``seed + l``) share no draws.
    """
    if step == 0:
        return seed
    return _mix64((_mix64(seed & _MASK64) + step * 0x9E3779B97F4A7C15) & _MASK64)


class RandomSource:
    """Seeded random draws: call k of `next` draws from a ``torch.Generator`` seeded with
    ``stream_seed(seed, k)`` (one generator object per device, re-seeded on every call).

    The whole stream is (seed, step): copies (deepcopy, pickle) continue it, and a module keeps
    ``step`` in its ``state_dict`` as the int64 buffer ``mask_step`` (see `register_mask_step`),
    so a resumed run continues it too. With ``seed=None`` draws come from PyTorch's global
    generator (``torch.manual_seed``) and there is no step.
    """

    def __init__(self, seed: int | None, step: int = 0) -> None:
        self.seed = check_seed("seed", seed)
        self.step = step
        self._generators: dict[torch.device, torch.Generator] = {}

    @run_eagerly
    def next(self, device: torch.device) -> torch.Generator | None:
        """The generator of this call's draws on ``device`` (``None``: the global one), seeded from
        (seed, step); advances the step."""
        if self.seed is None:
            return None
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(stream_seed(self.seed, self.step))
        self.step += 1
        return gen

    def __deepcopy__(self, memo: dict) -> RandomSource:
        return RandomSource(self.seed, self.step)

    def __getstate__(self) -> dict:
        return {"seed": self.seed, "step": self.step}

    def __setstate__(self, state: dict) -> None:
        self.seed = state["seed"]
        self.step = state.get("step", 0)
        self._generators = {}


MASK_STEP = "mask_step"


def register_mask_step(module: nn.Module, source: RandomSource) -> None:
    """Give a module with a seeded `RandomSource` the buffer ``mask_step``: the number of calls
    drawn so far, a 0-d int64 tensor, so ``state_dict`` carries the mask stream. Fixed shape and
    an integer dtype: ultralytics' ModelEMA (and timm's ModelEmaV3) average floating entries
    only and leave it as it is, timm's ModelEmaV2 averages it and casts back without error,
    ``.half()``/``.to(dtype)`` leave it exact, and ``load_state_dict`` restores the stream.
    The count itself lives on the host (no launch per call); `DistillationLoss` writes it into
    the buffer when ``state_dict`` is taken and reads it back on load. A module without a seed
    has no such buffer."""
    if source.seed is not None:
        module.register_buffer(MASK_STEP, torch.zeros((), dtype=torch.int64))


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
            swapped = (s_feat.shape[1], t_feat.shape[1]) == (loss.teacher_channels, loss.student_channels)
            hint = (
                "; the arguments look swapped: pass the student's features first, the teacher's second"
                if swapped
                else ""
            )
            raise ValueError(
                f"{name} feature{where} has {plural(x.shape[1], 'channel')} but this loss was built for "
                f"{name}_channels={built} (shape {tuple(x.shape)}){hint}"
            )
    check_module_device(s_feat, "student feature", loss, level)
    s_feat = resize_to(s_feat, t_feat.shape[-2:], loss.resize_student, "student feature", "teacher feature", level)
    return loss.align(to_module_dtype(s_feat, loss.align))
