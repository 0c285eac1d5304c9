"""Argument and input checks shared by every loss.

Every check raises ``ValueError`` (wrong value or shape) or ``TypeError`` (wrong type or
dtype) with a message that names the argument, the level where there is one, what was
expected and what was given. Checks look at metadata only (shapes, dtypes, devices), so
they never synchronise with the GPU and trace cleanly under ``torch.compile``.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "plural",
    "at_level",
    "check_choice",
    "check_positive",
    "check_ratio",
    "check_channels",
    "check_scales",
    "check_tensor",
    "check_same_device",
    "check_pair",
    "warn_if_swapped",
    "as_levels",
    "check_level_device",
    "check_module_device",
    "check_seed",
    "check_weight_list",
    "check_image_size",
]


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """``"1 level"``, ``"3 levels"``: a number and its noun, in messages (``nouns``: an
    irregular plural)."""
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"


def at_level(level: int | None) -> str:
    """The ``" at level l"`` suffix used in messages (empty for single-level calls)."""
    return "" if level is None else f" at level {level}"


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)!r}, got {value!r}")


def check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a non-negative number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return float(value)


def check_ratio(name: str, value: Any, *, upper_inclusive: bool = False) -> float:
    """A ratio: a number in [0, 1), the fraction of entries a mask hides (hiding all would leave
    nothing to reconstruct), or in [0, 1] with ``upper_inclusive`` (a fraction kept: all is fine)."""
    interval = "[0, 1]" if upper_inclusive else "[0, 1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in {interval}, got {type(value).__name__} {value!r}")
    if not (0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def check_channels(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_channel_list(name: str, value: Any) -> list[int]:
    if isinstance(value, (int, Tensor)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints (one per level), got {value!r}")
    if len(value) == 0:
        raise ValueError(f"{name} must name at least one level, got an empty sequence")
    return [check_channels(f"{name}[{i}]", c) for i, c in enumerate(value)]


def check_scales(name: str, value: Any) -> tuple[int, ...]:
    """Pooling scales: a non-empty sequence of distinct positive ints."""
    if isinstance(value, (int, Tensor)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of positive ints, got {value!r}")
    if len(value) == 0:
        raise ValueError(f"{name} must not be empty")
    for s in value:
        if isinstance(s, bool) or not isinstance(s, int) or s <= 0:
            raise ValueError(f"{name} must hold positive ints, got {tuple(value)!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"{name} must not repeat a scale, got {tuple(value)!r}")
    return tuple(value)


def check_tensor(name: str, x: Any, ndim: int | Sequence[int], level: int | None = None) -> Tensor:
    """A floating tensor with the given number of dimensions and a non-empty batch."""
    where = at_level(level)
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}{where} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}{where} must be a floating tensor (float32/float16/bfloat16/float64), got {x.dtype}")
    dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
    if x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name}{where} must be {want}, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}{where} has an empty batch (shape {tuple(x.shape)})")
    if x.numel() == 0:
        raise ValueError(f"{name}{where} is empty (shape {tuple(x.shape)})")
    return x


def check_same_device(named: Sequence[tuple[str, Tensor]], level: int | None = None) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{name}{at_level(level)} is on {t.device} but {first_name} is on {first.device}; "
                "put every input on one device"
            )


_INTERNAL_DIRS = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.__file__)))


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by this function's caller point at the first
    frame outside this package and torch (the user's call of the loss), however deep the call."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_swapped(s_name: str, s: Tensor, t_name: str, t: Tensor) -> None:
    """Warn when the teacher needs grad but the student does not: most likely (teacher, student)
    was passed where (student, teacher) is expected. Metadata only; the warning points at the
    user's call."""
    if t.requires_grad and not s.requires_grad and torch.is_grad_enabled():
        warnings.warn(
            f"the {t_name} requires grad but the {s_name} does not: the argument order is (student, teacher); "
            "compute the teacher under torch.no_grad()",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )


def check_pair(
    s_name: str,
    s: Any,
    t_name: str,
    t: Any,
    *,
    level: int | None = None,
    same_channels: bool = True,
    same_spatial: bool = True,
    channels_hint: str = "",
) -> tuple[Tensor, Tensor]:
    """Check a student/teacher pair of (N, C, H, W) maps against each other."""
    check_tensor(s_name, s, 4, level)
    check_tensor(t_name, t, 4, level)
    check_same_device([(s_name, s), (t_name, t)], level)
    where = at_level(level)
    if s.shape[0] != t.shape[0]:
        raise ValueError(
            f"batch sizes differ{where}: {s_name} has {s.shape[0]} (shape {tuple(s.shape)}), "
            f"{t_name} has {t.shape[0]} (shape {tuple(t.shape)})"
        )
    if same_channels and s.shape[1] != t.shape[1]:
        raise ValueError(f"channels differ{where}: {s_name} has {s.shape[1]}, {t_name} has {t.shape[1]}{channels_hint}")
    if same_spatial and s.shape[-2:] != t.shape[-2:]:
        raise ValueError(
            f"spatial sizes differ{where}: {s_name} is {tuple(s.shape[-2:])}, {t_name} is {tuple(t.shape[-2:])}"
        )
    warn_if_swapped(s_name, s, t_name, t)
    return s, t


def as_levels(s_name: str, s: Any, t_name: str, t: Any) -> tuple[list[Tensor], list[Tensor], bool]:
    """Accept one tensor pair, two sequences of levels of equal length, or two mappings of
    levels with the same keys (in insertion order, as torchvision's FPN returns them).

    Returns the two lists and whether a single tensor pair was given.
    """
    if isinstance(s, Tensor) or isinstance(t, Tensor):
        if not (isinstance(s, Tensor) and isinstance(t, Tensor)):
            raise TypeError(
                f"{s_name} and {t_name} must both be tensors or both be sequences of levels, got "
                f"{type(s).__name__} and {type(t).__name__}"
            )
        return [s], [t], True
    if isinstance(s, Mapping) or isinstance(t, Mapping):
        if not (isinstance(s, Mapping) and isinstance(t, Mapping)):
            raise TypeError(
                f"{s_name} and {t_name} must both be mappings of levels (like torchvision's FPN output) or both "
                f"sequences, got {type(s).__name__} and {type(t).__name__}"
            )
        if list(s.keys()) != list(t.keys()):
            raise ValueError(f"{s_name} and {t_name} name different levels: {list(s.keys())} and {list(t.keys())}")
        s, t = list(s.values()), list(t.values())
    for name, v in ((s_name, s), (t_name, t)):
        if not isinstance(v, Sequence):
            raise TypeError(
                f"{name} must be a tensor, a sequence of tensors (levels) or a mapping of levels, got "
                f"{type(v).__name__}; pass a list of the levels"
            )
    if len(s) != len(t):
        raise ValueError(f"number of levels differs: {s_name} has {len(s)}, {t_name} has {len(t)}")
    if len(s) == 0:
        raise ValueError(f"{s_name} and {t_name} must hold at least one level")
    return list(s), list(t), False


def check_level_device(name: str, x: Any, level: int, ref: Tensor, ref_name: str) -> None:
    """Level ``level`` of a sequence on ``ref``'s device (after that level's own checks, so a
    student/teacher mismatch within a level is reported as such first)."""
    if isinstance(x, Tensor) and x.device != ref.device:
        raise ValueError(
            f"{name} at level {level} is on {x.device} but {ref_name} is on {ref.device}; put every input on one device"
        )


def check_module_device(x: Tensor, name: str, module: Any, level: int | None = None) -> None:
    """An input on the device of the module's parameters (call ``loss.to(device)`` otherwise)."""
    for p in module.parameters():
        if p.device != x.device:
            raise ValueError(
                f"{name}{at_level(level)} is on {x.device} but the loss's parameters are on {p.device}; "
                f"move the loss with .to({str(x.device)!r})"
            )
        return


def check_seed(name: str, value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")
    return value


def check_weight_list(name: str, value: Any, count: int, what: str) -> tuple[float, ...]:
    """A sequence of ``count`` non-negative weights."""
    if isinstance(value, (str, Tensor)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of {count} non-negative numbers ({what}), got {value!r}")
    if len(value) != count:
        raise ValueError(
            f"{name} must give {plural(count, 'weight')}, one per {what}, got {len(value)}: {tuple(value)!r}"
        )
    return tuple(check_non_negative(f"{name}[{i}]", w) for i, w in enumerate(value))


def _real_number(v: Any) -> float | None:
    """``v`` as a float when it is a real number of any type (Python, numpy scalars, 0-d tensors;
    not bools), else None."""
    if isinstance(v, Tensor):
        if v.dim() != 0 or v.dtype == torch.bool or v.is_complex() or v.device.type == "meta":
            return None
        return float(v)
    if isinstance(v, bool) or type(v).__name__ == "bool_" or not isinstance(v, numbers.Real):
        return None
    return float(v)


def _type_names(value: Any) -> str:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return type(value).__name__
    inner = ", ".join(
        f"{type(v).__name__}({v.dtype}, {v.dim()}-D)" if isinstance(v, Tensor) else type(v).__name__ for v in value
    )
    return f"{type(value).__name__} of {inner}"


def check_image_size(name: str, value: Any) -> tuple[float, float]:
    """``(H, W)``: two positive finite real numbers of any type (Python, numpy scalars, 0-d
    tensors), as a sequence or a 1-D tensor/array of two entries. Returns them as floats."""
    items = None
    if isinstance(value, Tensor) or type(value).__name__ == "ndarray":
        if value.ndim == 1:
            items = list(value)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        items = list(value)
    numbers_ = None if items is None or len(items) != 2 else [_real_number(v) for v in items]
    if numbers_ is None or any(v is None or not math.isfinite(v) or v <= 0 for v in numbers_):
        raise ValueError(
            f"{name} must be (H, W) of the input, two positive finite numbers, got {value!r} ({_type_names(value)})"
        )
    return numbers_[0], numbers_[1]
