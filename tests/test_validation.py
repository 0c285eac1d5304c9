"""Bad input: every wrong constructor argument and every wrong forward input raises a
``ValueError``/``TypeError`` that names the argument (and, for multi-level inputs, the level
and the offending shapes or values); a NaN/Inf in a teacher never gives a finite loss (the
chosen policy is to propagate it); a student of another spatial size is an error unless
``resize_student=True`` is asked for.

Tensors on "another device" use the ``meta`` device, so the tests run on a CPU-only machine.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from famkd_losses import (
    FULL_METHOD,
    CWDLoss,
    FAMKDLoss,
    FGDLoss,
    KDLoss,
    MaskedLogitsLoss,
    MGDLoss,
    PKDLoss,
    ScaleAwareMaskedFeatureLoss,
)
from famkd_losses.functional import (
    box_masks,
    channel_mask,
    guidance_weights,
    max_pool,
    position_prob_diff,
    spatial_mask,
)

NAN = float("nan")
INF = float("inf")
MASK_MODES = ("topk", "topk_nonsalient", "sample", "random")

# Shapes used throughout: batch 2, student width 3, teacher width 4 (so an align conv exists),
# three levels whose last one is where the bad input is put ("at level 2").
N, CS, CT = 2, 3, 4
SIZES = ((4, 4), (2, 2), (2, 2))
IMG = (32, 32)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def rnd(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def ints(*shape: int) -> torch.Tensor:
    return torch.randint(0, 5, shape)


def meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def levels(c: int, n: int = N, sizes=SIZES, seed: int = 0) -> list[torch.Tensor]:
    return [rnd(n, c, h, w, seed=seed + i) for i, (h, w) in enumerate(sizes)]


def at(lst: list[Any], i: int, x: Any) -> list[Any]:
    out = list(lst)
    out[i] = x
    return out


def pat(*parts: str) -> str:
    """A regex matching the literal parts in this order."""
    return ".*".join(re.escape(p) for p in parts)


def poison(t: torch.Tensor, idx: tuple[int, ...], value: float) -> torch.Tensor:
    t = t.clone()
    t[idx] = value
    return t


def boxes2() -> list[torch.Tensor]:
    return [torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([[8.0, 8.0, 24.0, 30.0], [1.0, 2.0, 5.0, 6.0]])]


def case(id_: str, thunk: Callable[[], Any], exc: type[Exception], pattern: str, marks=()):
    return pytest.param(thunk, exc, pattern, id=id_, marks=marks)


def assert_not_finite(loss: torch.Tensor) -> None:
    assert loss.dim() == 0
    assert not torch.isfinite(loss).item(), f"a NaN/Inf teacher gave the finite loss {loss.item()}"


# --------------------------------------------------------------------------------------------
# 1. constructor arguments
# --------------------------------------------------------------------------------------------

BUILD: dict[str, Callable[..., Any]] = {
    "SAMFL": lambda **kw: ScaleAwareMaskedFeatureLoss(CS, CT, **kw),
    "FAMKD": lambda **kw: FAMKDLoss([CS, CS], [CT, CT], **{**FULL_METHOD, **kw}),
    "Logits": lambda **kw: MaskedLogitsLoss(**kw),
    "MGD": lambda **kw: MGDLoss(CS, CT, **kw),
    "MGDx": lambda **kw: MGDLoss([CS, CS], [CT, CT], **kw),
    "FGD": lambda **kw: FGDLoss(CS, CT, **kw),
    "FGDx": lambda **kw: FGDLoss([CS, CS], [CT, CT], **kw),
    "PKD": lambda **kw: PKDLoss(**kw),
    "CWD": lambda **kw: CWDLoss(**kw),
    "KD": lambda **kw: KDLoss(**kw),
}


def _kw(cls: str, **kw: Any) -> Callable[[], Any]:
    return lambda: BUILD[cls](**kw)


def _name(arg: str) -> str:
    """The argument's name as a whole word ("tau" must not match "tau_w")."""
    return rf"(?<![\w]){re.escape(arg)}(?![a-zA-Z_])"


def _value_cases() -> list[Any]:
    out = []
    ratio_bad = [(-0.1, ValueError), (1.0, ValueError), (1.5, ValueError), (NAN, ValueError)]
    ratio_bad += [("x", TypeError), (True, TypeError), (None, TypeError)]
    for cls, arg in [
        ("SAMFL", "ratio_sp"),
        ("SAMFL", "ratio_ch"),
        ("FAMKD", "ratio_sp"),
        ("FAMKD", "ratio_ch"),
        ("FAMKD", "ratio_l"),
        ("Logits", "ratio_l"),
        ("MGD", "ratio"),
        ("MGDx", "ratio"),
    ]:
        for v, exc in ratio_bad:
            if arg == "ratio_l" and v == 1.0:
                continue  # a fraction kept: 1 keeps every position (tested below)
            out.append(case(f"{cls}-{arg}={v!r}", _kw(cls, **{arg: v}), exc, _name(arg) + ".*" + re.escape(repr(v))))
    temp_bad = [(0, ValueError), (-1, ValueError), (INF, ValueError), (NAN, ValueError)]
    temp_bad += [("x", TypeError), (True, TypeError)]
    for cls, arg in [
        ("SAMFL", "tau"),
        ("FAMKD", "tau"),
        ("FAMKD", "temperature"),
        ("FAMKD", "tau_w"),
        ("Logits", "temperature"),
        ("Logits", "tau_w"),
        ("FGD", "tau"),
        ("FGDx", "tau"),
        ("CWD", "tau"),
        ("KD", "tau"),
    ]:
        for v, exc in temp_bad:
            out.append(case(f"{cls}-{arg}={v!r}", _kw(cls, **{arg: v}), exc, _name(arg) + ".*" + re.escape(repr(v))))
    weight_bad = [(-1e-3, ValueError), (INF, ValueError), (NAN, ValueError), ("x", TypeError), (True, TypeError)]
    for cls, arg in [
        ("SAMFL", "alpha"),
        ("FAMKD", "alpha"),
        ("FAMKD", "beta"),
        ("Logits", "beta"),
        ("MGD", "alpha"),
        ("MGDx", "alpha"),
        ("FGD", "alpha"),
        ("FGD", "beta"),
        ("FGD", "gamma"),
        ("FGD", "lam"),
        ("PKD", "loss_weight"),
        ("CWD", "loss_weight"),
        ("KD", "loss_weight"),
    ]:
        for v, exc in weight_bad:
            out.append(case(f"{cls}-{arg}={v!r}", _kw(cls, **{arg: v}), exc, _name(arg) + ".*" + re.escape(repr(v))))
    # scales: (value, exception, what the message shows)
    scales_bad = [
        ((), ValueError, "must not be empty"),
        ((1, 1), ValueError, "(1, 1)"),
        ((1, 2, 2), ValueError, "(1, 2, 2)"),
        ((0,), ValueError, "(0,)"),
        ((1, -2), ValueError, "(1, -2)"),
        ((1.5,), ValueError, "(1.5,)"),
        ((True,), ValueError, "(True,)"),
        (2, TypeError, "2"),
        (None, TypeError, "None"),
    ]
    for cls, arg in [("SAMFL", "scales"), ("FAMKD", "scales"), ("Logits", "region_scales"), ("FAMKD", "region_scales")]:
        for v, exc, shown in scales_bad:
            if v is None and arg == "region_scales":
                continue  # None is region_scales' default (no region-aware guidance)
            out.append(case(f"{cls}-{arg}={v!r}", _kw(cls, **{arg: v}), exc, _name(arg) + ".*" + re.escape(shown)))
    return out


def _choice_cases() -> list[Any]:
    out = []
    for cls, arg in [
        ("SAMFL", "mask_mode"),
        ("FAMKD", "mask_mode"),
        ("SAMFL", "weighting"),
        ("FAMKD", "weighting"),
        ("SAMFL", "branches"),
        ("FAMKD", "branches"),
        ("Logits", "head"),
        ("FAMKD", "head"),
        ("Logits", "guidance"),
        ("FAMKD", "guidance"),
        ("Logits", "weights"),
        ("FAMKD", "weights"),
        ("KD", "mode"),
        ("MGD", "mask"),
        ("MGDx", "mask"),
    ] + [(cls, "backend") for cls in BUILD]:
        out.append(case(f"{cls}-{arg}=bogus", _kw(cls, **{arg: "bogus"}), ValueError, _name(arg) + ".*'bogus'"))
    for cls in ("SAMFL", "FAMKD"):
        out += [
            case(f"{cls}-branches-one-bad", _kw(cls, branches=("spatial", "bogus")), ValueError, "branches.*'bogus'"),
            case(
                f"{cls}-branches-repeated",
                _kw(cls, branches=("spatial", "spatial")),
                ValueError,
                pat("branches", "('spatial', 'spatial')"),
            ),
            case(f"{cls}-branches-empty", _kw(cls, branches=()), ValueError, pat("branches", "()")),
            case(
                f"{cls}-branches-int",
                _kw(cls, branches=1),
                TypeError,
                _name("branches") + ".*1",
            ),
            case(
                f"{cls}-branches-None",
                _kw(cls, branches=None),
                TypeError,
                _name("branches") + ".*None",
            ),
        ]
    return out


def _scale_weight_cases() -> list[Any]:
    out = []
    for cls in ("SAMFL", "FAMKD"):
        out += [
            case(
                f"{cls}-scale_weights-short",
                _kw(cls, scale_weights=[1.0, 1.0]),
                ValueError,
                pat("scale_weights", "3", "(1, 2, 4)", "got 2", "(1.0, 1.0)"),
            ),
            case(
                f"{cls}-scale_weights-long",
                _kw(cls, scales=(1,), scale_weights=[1.0, 2.0]),
                ValueError,
                pat("scale_weights", "(1,)", "got 2"),
            ),
            case(f"{cls}-scale_weights-empty", _kw(cls, scale_weights=[]), ValueError, pat("scale_weights", "got 0")),
            case(
                f"{cls}-scale_weights-negative",
                _kw(cls, scale_weights=[1.0, -0.5, 1.0]),
                ValueError,
                pat("scale_weights[1]", "-0.5"),
            ),
            case(
                f"{cls}-scale_weights-nan",
                _kw(cls, scale_weights=[1.0, 1.0, NAN]),
                ValueError,
                pat("scale_weights[2]", "nan"),
            ),
            case(
                f"{cls}-scale_weights-str",
                _kw(cls, scale_weights=[1.0, "x", 1.0]),
                TypeError,
                pat("scale_weights[1]", "'x'"),
            ),
            case(
                f"{cls}-scale_weights-bool",
                _kw(cls, scale_weights=[True, 1.0, 1.0]),
                TypeError,
                pat("scale_weights[0]", "True"),
            ),
            case(
                f"{cls}-scale_weights-scalar",
                _kw(cls, scale_weights=1.0),
                TypeError,
                _name("scale_weights") + ".*1.0",
            ),
        ]
    return out


def _channel_cases() -> list[Any]:
    out = []
    bad = [(0, ValueError), (-1, ValueError), (True, TypeError), (4.0, TypeError), ("4", TypeError), (None, TypeError)]
    for v, exc in bad:
        out.append(
            case(
                f"SAMFL-student_channels={v!r}",
                lambda v=v: ScaleAwareMaskedFeatureLoss(v, CT),
                exc,
                _name("student_channels") + ".*" + re.escape(repr(v)),
            )
        )
        out.append(
            case(
                f"SAMFL-teacher_channels={v!r}",
                lambda v=v: ScaleAwareMaskedFeatureLoss(CS, v),
                exc,
                _name("teacher_channels") + ".*" + re.escape(repr(v)),
            )
        )
        out.append(
            case(
                f"MGD-student_channels={v!r}",
                lambda v=v: MGDLoss(v, CT),
                exc,
                _name("student_channels") + ".*" + re.escape(repr(v) if v != "4" else "'4'"),
            )
        )
        out.append(
            case(
                f"MGD-teacher_channels={v!r}",
                lambda v=v: MGDLoss(CS, v),
                exc,
                _name("teacher_channels") + ".*" + re.escape(repr(v)),
            )
        )
    for name, cls in [("FAMKD", FAMKDLoss), ("MGDx", MGDLoss), ("FGDx", FGDLoss)]:
        out += [
            case(
                f"{name}-channel-lists-differ",
                lambda cls=cls: cls([4, 8], [4]),
                ValueError,
                pat("student_channels and teacher_channels", "same number of levels", "2", "1"),
            ),
            case(
                f"{name}-student-channels-zero",
                lambda cls=cls: cls([4, 0], [4, 4]),
                ValueError,
                pat("student_channels[1]", "0"),
            ),
            case(
                f"{name}-teacher-channels-negative",
                lambda cls=cls: cls([4, 4], [4, -3]),
                ValueError,
                pat("teacher_channels[1]", "-3"),
            ),
            case(
                f"{name}-teacher-channels-bool",
                lambda cls=cls: cls([4, 4], [True, 4]),
                TypeError,
                pat("teacher_channels[0]", "True"),
            ),
            case(
                f"{name}-student-channels-float",
                lambda cls=cls: cls([4.0, 4], [4, 4]),
                TypeError,
                pat("student_channels[0]", "4.0"),
            ),
            case(
                f"{name}-channel-lists-empty",
                lambda cls=cls: cls([], []),
                ValueError,
                pat("student_channels", "at least one level"),
            ),
            case(
                f"{name}-teacher-channels-not-list",
                lambda cls=cls: cls([4, 4], 4),
                TypeError,
                _name("teacher_channels") + ".*4",
            ),
        ]
    out += [
        case("FAMKD-student-channels-int", lambda: FAMKDLoss(4, [4]), TypeError, pat("student_channels", "4")),
        case("FAMKD-student-channels-str", lambda: FAMKDLoss("44", [4, 4]), TypeError, pat("student_channels", "'4'")),
        case("FGD-teacher-channels-1", lambda: FGDLoss(CS, 1), ValueError, pat("teacher_channels", "at least 2", "1")),
        *(
            case(
                f"{cls.__name__}-channels-int-beside-list",
                lambda cls=cls, a=a, b=b: cls(a, b),
                TypeError,
                pat("student_channels and teacher_channels must both be ints (one level) or both sequences", got),
            )
            for cls in (FAMKDLoss, MGDLoss, FGDLoss)
            for a, b, got in ((4, [8], "got int 4 and list [8]"), ((4, 4), 8, "got tuple (4, 4) and int 8"))
        ),
        case("FGDx-teacher-channels-1", lambda: FGDLoss([CS, CS], [CT, 1]), ValueError, pat("teacher_channels", "1")),
        case("FGD-student-channels-0", lambda: FGDLoss(0, CT), ValueError, pat("student_channels", "0")),
        case("FGD-teacher-list-student-int", lambda: FGDLoss(CS, [CT]), TypeError, pat("teacher_channels", "[4]")),
    ]
    for cls in ("Logits", "FAMKD"):
        for v, exc in [(0, ValueError), (-2, ValueError), (True, TypeError), (2.0, TypeError), ("3", TypeError)]:
            out.append(
                case(
                    f"{cls}-num_classes={v!r}",
                    _kw(cls, num_classes=v),
                    exc,
                    _name("num_classes") + ".*" + re.escape(repr(v)),
                )
            )
    return out


def _random_cases() -> list[Any]:
    out = [
        case("MGD-generator-int", _kw("MGD", generator=42), TypeError, pat("generator", "torch.Generator", "int")),
        case("MGD-generator-str", _kw("MGD", generator="cpu"), TypeError, pat("generator", "str")),
        case("MGDx-generator-int", _kw("MGDx", generator=42), TypeError, pat("generator", "int")),
        case(
            "MGD-generator-and-seed",
            lambda: MGDLoss(CS, CT, generator=torch.Generator(), seed=0),
            ValueError,
            r"generator.*seed|seed.*generator",
        ),
        case(
            "MGDx-generator-and-seed",
            lambda: MGDLoss([CS], [CT], generator=torch.Generator(), seed=0),
            ValueError,
            r"generator.*seed|seed.*generator",
        ),
        case("KD-class_dim-str", _kw("KD", class_dim="x"), TypeError, pat("class_dim", "'x'")),
        case("KD-class_dim-bool", _kw("KD", class_dim=True), TypeError, pat("class_dim", "True")),
        case("KD-class_dim-float", _kw("KD", class_dim=1.0), TypeError, pat("class_dim", "1.0")),
    ]
    for cls in ("SAMFL", "MGD", "MGDx", "FAMKD"):
        for v in ("x", 1.5, True):
            out.append(case(f"{cls}-seed={v!r}", _kw(cls, seed=v), TypeError, pat("seed", repr(v))))
    return out


@pytest.mark.parametrize(
    ("build", "exc", "pattern"),
    _value_cases() + _choice_cases() + _scale_weight_cases() + _channel_cases() + _random_cases(),
)
def test_constructor_rejects(build: Callable[[], Any], exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        build()


@pytest.mark.parametrize("cls", sorted(BUILD))
def test_constructor_defaults_are_valid(cls: str) -> None:
    """The negative cases above are meaningful: the same builders work with valid arguments."""
    assert BUILD[cls]() is not None


# --------------------------------------------------------------------------------------------
# 2. forward: bad inputs
# --------------------------------------------------------------------------------------------


def _famkd(**kw: Any) -> FAMKDLoss:
    return FAMKDLoss([CS] * 3, [CT] * 3, **kw)


def _samfl(**kw: Any) -> ScaleAwareMaskedFeatureLoss:
    return ScaleAwareMaskedFeatureLoss(CS, CT, **kw)


def _dense_logits(c: int = 6, n: int = N, sizes=SIZES, seed: int = 100) -> list[torch.Tensor]:
    return levels(c, n=n, sizes=sizes, seed=seed)


S3, T3 = levels(CS), levels(CT, seed=10)
ZS, ZT = _dense_logits(), _dense_logits(seed=200)
# flattened (N, A*H*W, K) logits on the SIZES grids, two anchors and three classes
FLAT_S = [rnd(N, 2 * h * w, 3, seed=300 + i) for i, (h, w) in enumerate(SIZES)]
FLAT_T = [rnd(N, 2 * h * w, 3, seed=400 + i) for i, (h, w) in enumerate(SIZES)]
S1, T1 = rnd(N, CS, 4, 4), rnd(N, CT, 4, 4, seed=1)
SAME_S, SAME_T = levels(CT, seed=20), levels(CT, seed=30)  # equal widths (PKD, CWD)


def _feature_level_cases(prefix: str, call: Callable[[Any, Any], Any], multi: bool) -> list[Any]:
    """The per-level feature checks shared by FAMKD, ScaleAwareMaskedFeatureLoss, MGD and FGD.

    ``call(s, t)`` takes the student and teacher (lists of 3 levels if ``multi`` else tensors);
    the bad input is put at level 2 in the multi-level form.
    """
    lv = " at level 2" if multi else ""
    h, w = SIZES[2] if multi else (4, 4)

    def put(base: Any, x: torch.Tensor) -> Any:
        return at(base, 2, x) if multi else x

    s, t = (S3, T3) if multi else (S1, T1)
    return [
        case(
            f"{prefix}-batch-differs",
            lambda: call(put(s, rnd(3, CS, h, w)), t),
            ValueError,
            pat(f"batch sizes differ{lv}", "student feature has 3", f"(3, {CS}, {h}, {w})", "teacher feature has 2"),
        ),
        case(
            f"{prefix}-student-channels",
            lambda: call(put(s, rnd(N, 5, h, w)), t),
            ValueError,
            re.escape(lv) + rf"(?=.*student)(?=.*\b5\b)(?=.*\b{CS}\b)",
        ),
        case(
            f"{prefix}-teacher-channels",
            lambda: call(s, put(t, rnd(N, 6, h, w))),
            ValueError,
            re.escape(lv) + rf"(?=.*teacher)(?=.*\b6\b)(?=.*\b{CT}\b)",
        ),
        case(
            f"{prefix}-spatial-differs",
            lambda: call(put(s, rnd(N, CS, h + 1, w + 2)), t),
            ValueError,
            pat(f"spatial sizes differ{lv}", f"({h + 1}, {w + 2})", f"({h}, {w})", "resize_student=True"),
        ),
        case(
            f"{prefix}-teacher-int64",
            lambda: call(s, put(t, ints(N, CT, h, w))),
            TypeError,
            pat(f"teacher feature{lv} must be a floating tensor", "torch.int64"),
        ),
        case(
            f"{prefix}-student-int32",
            lambda: call(put(s, ints(N, CS, h, w).int()), t),
            TypeError,
            pat(f"student feature{lv} must be a floating tensor", "torch.int32"),
        ),
        case(
            f"{prefix}-teacher-bool",
            lambda: call(s, put(t, torch.ones(N, CT, h, w, dtype=torch.bool))),
            TypeError,
            pat(f"teacher feature{lv}", "torch.bool"),
        ),
        case(
            f"{prefix}-student-3d",
            lambda: call(put(s, rnd(N, CS, h)), t),
            ValueError,
            pat(f"student feature{lv} must be 4-D", f"({N}, {CS}, {h})"),
        ),
        case(
            f"{prefix}-teacher-5d",
            lambda: call(s, put(t, rnd(N, CT, h, w, 1))),
            ValueError,
            pat(f"teacher feature{lv} must be 4-D", f"({N}, {CT}, {h}, {w}, 1)"),
        ),
        case(
            f"{prefix}-student-not-tensor",
            lambda: call(put(s, rnd(N, CS, h, w).numpy()), t),
            TypeError,
            pat(f"student feature{lv} must be a torch.Tensor", "ndarray"),
        ),
        case(
            f"{prefix}-empty-spatial",
            lambda: call(put(s, rnd(N, CS, 0, w)), put(t, rnd(N, CT, 0, w))),
            ValueError,
            pat(f"student feature{lv} is empty", f"({N}, {CS}, 0, {w})"),
        ),
        case(
            f"{prefix}-teacher-on-meta",
            lambda: call(s, put(t, meta(N, CT, h, w))),
            ValueError,
            pat(f"teacher feature{lv} is on meta", "student feature is on cpu"),
        ),
        case(
            f"{prefix}-student-on-meta",
            lambda: call(put(s, meta(N, CS, h, w)), t),
            ValueError,
            pat(f"teacher feature{lv} is on cpu", "student feature is on meta"),
        ),
    ]


def _empty_batch_cases(prefix: str, call: Callable[[Any, Any], Any], multi: bool) -> list[Any]:
    if multi:
        s0 = [rnd(0, CS, h, w) for h, w in SIZES]
        t0 = [rnd(0, CT, h, w) for h, w in SIZES]
        return [
            case(
                f"{prefix}-empty-batch",
                lambda: call(s0, t0),
                ValueError,
                pat("student feature at level 0 has an empty batch", "(0, 3, 4, 4)"),
            ),
            case(
                f"{prefix}-empty-batch-level-2",
                lambda: call(at(S3, 2, rnd(0, CS, 2, 2)), at(T3, 2, rnd(0, CT, 2, 2))),
                ValueError,
                pat("student feature at level 2 has an empty batch", "(0, 3, 2, 2)"),
            ),
        ]
    return [
        case(
            f"{prefix}-empty-batch",
            lambda: call(rnd(0, CS, 4, 4), rnd(0, CT, 4, 4)),
            ValueError,
            pat("student feature has an empty batch", "(0, 3, 4, 4)"),
        )
    ]


def _level_count_cases(prefix: str, call: Callable[[Any, Any], Any], built_for: int | None) -> list[Any]:
    out = [
        case(
            f"{prefix}-levels-s-vs-t",
            lambda: call(S3[:2], T3),
            ValueError,
            pat("number of levels differs", "s_feats has 2", "t_feats has 3"),
        ),
        case(
            f"{prefix}-levels-empty",
            lambda: call([], []),
            ValueError,
            pat("s_feats and t_feats", "at least one level"),
        ),
        case(
            f"{prefix}-tensor-and-list",
            lambda: call(S3[0], T3),
            TypeError,
            pat("s_feats and t_feats", "Tensor", "list"),
        ),
        case(
            f"{prefix}-not-a-sequence",
            lambda: call(5, 6),
            TypeError,
            pat("s_feats", "int"),
        ),
    ]
    if built_for is not None:
        out.append(
            case(
                f"{prefix}-levels-vs-config",
                lambda: call(S3[:2], T3[:2]),
                ValueError,
                pat("s_feats has 2 levels", f"built for {built_for}"),
            )
        )
    return out


def _famkd_cases() -> list[Any]:
    def call(s: Any, t: Any, **kw: Any) -> Any:
        return _famkd(**kw)(s, t)

    out = _feature_level_cases("FAMKD", call, multi=True)
    out += _empty_batch_cases("FAMKD", call, multi=True)
    out += _level_count_cases("FAMKD", call, built_for=3)
    out += [
        case(
            "FAMKD-student-channels-names-config",
            lambda: call(at(S3, 2, rnd(N, 5, 2, 2)), T3),
            ValueError,
            pat("student feature at level 2 has 5 channels", "student_channels=3", "(2, 5, 2, 2)"),
        ),
        case(
            "FAMKD-teacher-channels-names-config",
            lambda: call(S3, at(T3, 2, rnd(N, 6, 2, 2))),
            ValueError,
            pat("teacher feature at level 2 has 6 channels", "teacher_channels=4", "(2, 6, 2, 2)"),
        ),
        case(
            "FAMKD-batch-differs-across-levels",
            lambda: call(at(S3, 2, rnd(3, CS, 2, 2)), at(T3, 2, rnd(3, CT, 2, 2))),
            ValueError,
            pat("batch size at level 2 is 3", "level 0 has 2"),
        ),
        case(
            "FAMKD-only-s_logits",
            lambda: _famkd()(S3, T3, ZS, None),
            ValueError,
            pat("s_logits and t_logits", "t_logits=None"),
        ),
        case(
            "FAMKD-only-t_logits",
            lambda: _famkd()(S3, T3, None, ZT),
            ValueError,
            pat("s_logits and t_logits", "s_logits=None"),
        ),
        case(
            "FAMKD-logits-shapes-differ",
            lambda: _famkd()(S3, T3, ZS, at(ZT, 1, rnd(N, 5, 2, 2))),
            ValueError,
            pat("logits shapes differ at level 1", "student (2, 6, 2, 2)", "teacher (2, 5, 2, 2)"),
        ),
        case(
            "FAMKD-logits-levels-differ",
            lambda: _famkd()(S3, T3, ZS[:2], ZT),
            ValueError,
            pat("number of levels differs", "s_logits has 2", "t_logits has 3"),
        ),
        case(
            "FAMKD-teacher-logits-int",
            lambda: _famkd()(S3, T3, ZS, at(ZT, 2, ints(N, 6, 2, 2))),
            TypeError,
            pat("teacher logits at level 2 must be a floating tensor", "torch.int64"),
        ),
        case(
            "FAMKD-student-logits-2d",
            lambda: _famkd()(S3, T3, at(ZS, 2, rnd(N, 6)), ZT),
            ValueError,
            pat("student logits at level 2 must be 3-D or 4-D", "(2, 6)"),
        ),
        case(
            "FAMKD-teacher-logits-on-meta",
            lambda: _famkd()(S3, T3, ZS, at(ZT, 2, meta(N, 6, 2, 2))),
            ValueError,
            pat("teacher logits at level 2 is on meta", "student logits is on cpu"),
        ),
        case(
            "FAMKD-logits-empty-batch",
            lambda: _famkd()(S3, T3, _dense_logits(n=0), _dense_logits(n=0)),
            ValueError,
            pat("student logits at level 0 has an empty batch", "(0, 6, 4, 4)"),
        ),
        case(
            "FAMKD-softmax-channels-not-multiple",
            lambda: _famkd(head="softmax", num_classes=4)(S3, T3, ZS, ZT),
            ValueError,
            pat("dense logits at level 0 have 6 channels", "num_classes=4"),
        ),
        case(
            "FAMKD-region-scales-flattened",
            lambda: _famkd(region_scales=(1, 2))(S3, T3, FLAT_S, FLAT_T),
            ValueError,
            pat("region_scales needs a spatial layout at level 0", "flattened logits (2, 32, 3)"),
        ),
        case(
            "FAMKD-feature-guidance-level-count",
            lambda: _famkd(guidance="feature")(S3, T3, ZS[:2], ZT[:2]),
            ValueError,
            pat("s_logits has 2 levels but the features have 3 levels"),
        ),
        # logits that cannot belong to the features (MaskedLogitsLoss alone takes any levels)
        case(
            "FAMKD-two-logits-levels-beside-three",
            lambda: _famkd()(S3, T3, ZS[:2], ZT[:2]),
            ValueError,
            pat("s_logits has 2 levels but the features have 3 levels", "one logits tensor per feature level"),
        ),
        case(
            "FAMKD-one-logits-tensor-beside-three-levels",
            lambda: _famkd()(S3, T3, ZS[0], ZT[0]),
            ValueError,
            pat("s_logits has 1 level but the features have 3 levels"),
        ),
        case(
            "FAMKD-four-logits-levels-beside-three",
            lambda: _famkd()(S3, T3, [*ZS, ZS[2]], [*ZT, ZT[2]]),
            ValueError,
            pat("s_logits has 4 levels but the features have 3 levels"),
        ),
        case(
            "FAMKD-one-level-logits-beside-two-levels",
            lambda: FAMKDLoss([CS] * 2, [CT] * 2)(S3[:2], T3[:2], ZS[0], ZT[0]),
            ValueError,
            pat("s_logits has 1 level but the features have 2 levels"),
        ),
        case(
            "FAMKD-7x7-logits-beside-4x4-features",
            lambda: _famkd()(S3, T3, at(ZS, 0, rnd(N, 6, 7, 7)), at(ZT, 0, rnd(N, 6, 7, 7, seed=1))),
            ValueError,
            pat("s_logits at level 0 are (7, 7) but the features at level 0 are (4, 4)", "(2, 6, 7, 7)"),
        ),
        case(
            "FAMKD-logits-grid-transposed-at-level-2",
            lambda: _famkd()(at(S3, 2, rnd(N, CS, 2, 3)), at(T3, 2, rnd(N, CT, 2, 3)), at(ZS, 2, rnd(N, 6, 3, 2)), ZT),
            ValueError,
            pat("s_logits at level 2 are (3, 2) but the features at level 2 are (2, 3)"),
        ),
        case(
            "FAMKD-flattened-logits-not-on-the-grid",
            lambda: _famkd()(S3, T3, at(FLAT_S, 1, rnd(N, 6, 3)), at(FLAT_T, 1, rnd(N, 6, 3, seed=1))),
            ValueError,
            pat("flattened s_logits at level 1 have 6 positions", "2x2 = 4 positions of the features at level 1"),
        ),
        case(
            "FAMKD-logits-batch-differs-from-features",
            lambda: _famkd()(S3, T3, _dense_logits(n=3), _dense_logits(n=3, seed=200)),
            ValueError,
            pat("s_logits at level 0 have batch 3 but the features have batch 2"),
        ),
        case(
            "FAMKD-feature-guidance-grid",
            lambda: _famkd(guidance="feature")(S3, T3, at(ZS, 2, rnd(N, 6, 3, 3)), at(ZT, 2, rnd(N, 6, 3, 3))),
            ValueError,
            pat("s_logits at level 2 are (3, 3) but the features at level 2 are (2, 2)"),
        ),
        case(
            "FAMKD-logits-on-other-device-than-features",
            lambda: _famkd()(S3, T3, [meta(*z.shape) for z in ZS], [meta(*z.shape) for z in ZT]),
            ValueError,
            pat("s_logits at level 0 is on meta", "s_feats at level 0 is on cpu"),
        ),
        case(
            "FAMKD-level-on-other-device",
            lambda: _famkd()(at(S3, 2, meta(N, CS, 2, 2)), at(T3, 2, meta(N, CT, 2, 2))),
            ValueError,
            pat("level 2", "meta", "cpu"),
        ),
        case(
            "FAMKD-module-on-other-device",
            lambda: _famkd()([meta(*x.shape) for x in S3], [meta(*x.shape) for x in T3]),
            ValueError,
            pat("meta", "cpu"),
        ),
    ]
    return out


def _samfl_cases() -> list[Any]:
    def call(s: Any, t: Any) -> Any:
        return _samfl()(s, t)

    out = _feature_level_cases("SAMFL", call, multi=False)
    out += _empty_batch_cases("SAMFL", call, multi=False)
    out += [
        case(
            "SAMFL-student-channels-names-config",
            lambda: call(rnd(N, 5, 4, 4), T1),
            ValueError,
            pat("student feature has 5 channels", "student_channels=3", "(2, 5, 4, 4)"),
        ),
        case(
            "SAMFL-lists-given",
            lambda: call([S1], [T1]),
            TypeError,
            pat("student feature must be a torch.Tensor", "list"),
        ),
        case(
            "SAMFL-module-on-other-device",
            lambda: call(meta(*S1.shape), meta(*T1.shape)),
            ValueError,
            pat("meta", "cpu"),
        ),
    ]
    return out


def _logits_cases() -> list[Any]:
    m = MaskedLogitsLoss
    sf, tf = rnd(N, CT, 4, 4, seed=3), rnd(N, CT, 4, 4, seed=4)
    z4s, z4t = rnd(N, 6, 4, 4, seed=5), rnd(N, 6, 4, 4, seed=6)
    return [
        case(
            "Logits-levels-differ",
            lambda: m()(ZS[:2], ZT),
            ValueError,
            pat("number of levels differs", "s_logits has 2", "t_logits has 3"),
        ),
        case("Logits-levels-empty", lambda: m()([], []), ValueError, pat("s_logits and t_logits", "at least one")),
        case("Logits-tensor-and-list", lambda: m()(ZS[0], ZT), TypeError, pat("s_logits and t_logits", "list")),
        case(
            "Logits-shapes-differ-level-2",
            lambda: m()(ZS, at(ZT, 2, rnd(N, 6, 3, 3))),
            ValueError,
            pat("logits shapes differ at level 2", "student (2, 6, 2, 2)", "teacher (2, 6, 3, 3)"),
        ),
        case(
            "Logits-shapes-differ-flattened",
            lambda: m()(rnd(N, 16, 3), rnd(N, 16, 4)),
            ValueError,
            pat("logits shapes differ", "student (2, 16, 3)", "teacher (2, 16, 4)"),
        ),
        case(
            "Logits-dense-vs-flattened",
            lambda: m()(rnd(N, 3, 4, 4), rnd(N, 16, 3)),
            ValueError,
            pat("logits shapes differ", "student (2, 3, 4, 4)", "teacher (2, 16, 3)"),
        ),
        case(
            "Logits-batch-differs-across-levels",
            lambda: m()(at(ZS, 2, rnd(3, 6, 2, 2)), at(ZT, 2, rnd(3, 6, 2, 2))),
            ValueError,
            pat("batch size at level 2 is 3", "level 0 has 2"),
        ),
        case(
            "Logits-student-int-level-2",
            lambda: m()(at(ZS, 2, ints(N, 6, 2, 2)), ZT),
            TypeError,
            pat("student logits at level 2 must be a floating tensor", "torch.int64"),
        ),
        case(
            "Logits-teacher-int",
            lambda: m()(z4s, ints(N, 6, 4, 4)),
            TypeError,
            pat("teacher logits must be a floating tensor", "torch.int64"),
        ),
        case(
            "Logits-2d",
            lambda: m()(rnd(N, 6), rnd(N, 6)),
            ValueError,
            pat("student logits must be 3-D or 4-D", "(2, 6)"),
        ),
        case(
            "Logits-empty-batch",
            lambda: m()(rnd(0, 6, 4, 4), rnd(0, 6, 4, 4)),
            ValueError,
            pat("student logits has an empty batch", "(0, 6, 4, 4)"),
        ),
        case(
            "Logits-empty-batch-level-2",
            lambda: m()(at(ZS, 2, rnd(0, 6, 2, 2)), at(ZT, 2, rnd(0, 6, 2, 2))),
            ValueError,
            pat("student logits at level 2 has an empty batch", "(0, 6, 2, 2)"),
        ),
        case(
            "Logits-teacher-on-meta-level-2",
            lambda: m()(ZS, at(ZT, 2, meta(N, 6, 2, 2))),
            ValueError,
            pat("teacher logits at level 2 is on meta", "student logits is on cpu"),
        ),
        case(
            "Logits-softmax-channels-not-multiple",
            lambda: m(head="softmax", num_classes=4)(z4s, z4t),
            ValueError,
            pat("dense logits have 6 channels", "num_classes=4"),
        ),
        case(
            "Logits-sigmoid-channels-not-multiple-level-2",
            lambda: m(num_classes=3)(at(ZS, 2, rnd(N, 7, 2, 2)), at(ZT, 2, rnd(N, 7, 2, 2))),
            ValueError,
            pat("dense logits at level 2 have 7 channels", "num_classes=3"),
        ),
        case(
            "Logits-flattened-classes-differ",
            lambda: m(head="softmax", num_classes=4)(rnd(N, 16, 5), rnd(N, 16, 5)),
            ValueError,
            pat("flattened logits have 5 classes", "num_classes=4"),
        ),
        case(
            "Logits-region-scales-flattened",
            lambda: m(region_scales=(1, 2))(rnd(N, 16, 3), rnd(N, 16, 3, seed=1)),
            ValueError,
            pat("region_scales", "spatial layout", "(2, 16, 3)"),
        ),
        case(
            "Logits-feature-guidance-no-features",
            lambda: m(guidance="feature")(z4s, z4t),
            ValueError,
            pat("guidance='feature'", "s_feats and t_feats"),
        ),
        case(
            "Logits-feature-guidance-only-s_feats",
            lambda: m(guidance="feature")(z4s, z4t, sf, None),
            ValueError,
            pat("guidance='feature'", "t_feats"),
        ),
        case(
            "Logits-logit-guidance-given-features",
            lambda: m()(z4s, z4t, sf, tf),
            ValueError,
            pat("guidance='logit' reads no features", "guidance='feature'"),
        ),
        case(
            "Logits-feature-guidance-grid",
            lambda: m(guidance="feature")(z4s, z4t, sf[..., :2, :2], tf[..., :2, :2]),
            ValueError,
            pat("features are (2, 2)", "dense logits are (4, 4)"),
        ),
        case(
            "Logits-feature-guidance-grid-level-1",
            lambda: m(guidance="feature")([z4s, z4s], [z4t, z4t], [sf, sf[..., :3, :3]], [tf, tf[..., :3, :3]]),
            ValueError,
            pat("features at level 1 are (3, 3)", "dense logits are (4, 4)"),
        ),
        case(
            "Logits-feature-guidance-flattened-positions",
            lambda: m(guidance="feature")(rnd(N, 10, 3), rnd(N, 10, 3), sf[..., :2, :2], tf[..., :2, :2]),
            ValueError,
            pat("flattened logits have 10 positions", "2x2 = 4"),
        ),
        case(
            "Logits-feature-guidance-channels",
            lambda: m(guidance="feature")(z4s, z4t, rnd(N, 3, 4, 4), tf),
            ValueError,
            pat("channels differ", "student feature has 3", "teacher feature has 4"),
        ),
        case(
            "Logits-feature-guidance-feature-batch",
            lambda: m(guidance="feature")(z4s, z4t, rnd(3, CT, 4, 4), rnd(3, CT, 4, 4)),
            ValueError,
            pat("features have batch 3", "logits have batch 2"),
        ),
        case(
            "Logits-feature-guidance-level-count",
            lambda: m(guidance="feature")([z4s] * 3, [z4t] * 3, [sf] * 2, [tf] * 2),
            ValueError,
            pat("2 feature levels", "3 logits levels"),
        ),
        case(
            "Logits-feature-guidance-int-feature",
            lambda: m(guidance="feature")(z4s, z4t, sf, ints(N, CT, 4, 4)),
            TypeError,
            pat("teacher feature must be a floating tensor", "torch.int64"),
        ),
        case(
            "Logits-feature-guidance-teacher-feature-on-meta",
            lambda: m(guidance="feature")(z4s, z4t, sf, meta(N, CT, 4, 4)),
            ValueError,
            pat("teacher feature is on meta", "student feature is on cpu"),
        ),
        case(
            "Logits-feature-guidance-features-on-meta",
            lambda: m(guidance="feature")(z4s, z4t, meta(N, CT, 4, 4), meta(N, CT, 4, 4)),
            ValueError,
            pat("student feature is on meta", "student logits is on cpu"),
        ),
        case(
            "Logits-feature-guidance-spatial-hint",
            lambda: _raise_then_check_hint(
                lambda: m(guidance="feature")(z4s, z4t, sf[..., :3, :3], tf),
                lambda: m(guidance="feature", resize_student=True),
            ),
            ValueError,
            pat("spatial sizes differ", "(3, 3)", "(4, 4)"),
        ),
        case(
            "Logits-level-on-other-device",
            lambda: m()(at(ZS, 2, meta(N, 6, 2, 2)), at(ZT, 2, meta(N, 6, 2, 2))),
            ValueError,
            pat("level 2", "meta", "cpu"),
        ),
    ]


def _raise_then_check_hint(bad: Callable[[], Any], with_hint: Callable[[], Any]) -> None:
    """Run ``bad``; if its error suggests ``resize_student=True``, that argument must exist."""
    try:
        bad()
    except ValueError as e:
        if "resize_student" in str(e):
            with_hint()  # TypeError here if the hint names an argument the class does not take
        raise


def _mgd_cases() -> list[Any]:
    def call(s: Any, t: Any) -> Any:
        return MGDLoss([CS] * 3, [CT] * 3, seed=0)(s, t)

    def call1(s: Any, t: Any) -> Any:
        return MGDLoss(CS, CT, seed=0)(s, t)

    out = _feature_level_cases("MGDx", call, multi=True)
    out += _empty_batch_cases("MGDx", call, multi=True)
    out += _level_count_cases("MGDx", call, built_for=3)
    out += _feature_level_cases("MGD", call1, multi=False)
    out += _empty_batch_cases("MGD", call1, multi=False)
    out += [
        case(
            "MGDx-channels-names-config",
            lambda: call(at(S3, 2, rnd(N, 5, 2, 2)), T3),
            ValueError,
            pat("student feature at level 2 has 5 channels", "student_channels=3", "(2, 5, 2, 2)"),
        ),
        case(
            "MGDx-one-tensor-for-three-levels",
            lambda: call(S3[0], T3[0]),
            ValueError,
            pat("s_feats has 1 level but", "built for 3"),
        ),
        case(
            "MGD-lists-given-to-single-level",
            lambda: call1([S1], [T1]),
            TypeError,
            pat("s_feats", "list"),
        ),
        case(
            "MGD-module-on-other-device",
            lambda: call1(meta(*S1.shape), meta(*T1.shape)),
            ValueError,
            pat("meta", "cpu"),
        ),
    ]
    return out


def _fgd_cases() -> list[Any]:
    def call1(s: Any, t: Any, boxes: Any = None, image_size: Any = IMG) -> Any:
        return FGDLoss(CS, CT)(s, t, boxes2() if boxes is None else boxes, image_size)

    def call(s: Any, t: Any) -> Any:
        return FGDLoss([CS] * 3, [CT] * 3)(s, t, boxes2(), IMG)

    out = _feature_level_cases("FGDx", call, multi=True)
    out += _empty_batch_cases("FGDx", call, multi=True)
    out += _level_count_cases("FGDx", call, built_for=3)
    out += _feature_level_cases("FGD", call1, multi=False)
    out += _empty_batch_cases("FGD", call1, multi=False)
    b = boxes2()
    out += [
        case(
            "FGDx-channels-names-config",
            lambda: call(S3, at(T3, 2, rnd(N, 6, 2, 2))),
            ValueError,
            pat("teacher feature at level 2 has 6 channels", "teacher_channels=4", "(2, 6, 2, 2)"),
        ),
        case(
            "FGD-boxes-tensor",
            lambda: call1(S1, T1, torch.zeros(N, 4)),
            TypeError,
            pat("boxes must be a list", "Tensor"),
        ),
        case("FGD-boxes-int", lambda: call1(S1, T1, 0), TypeError, pat("boxes", "int")),
        case(
            "FGD-boxes-count",
            lambda: call1(S1, T1, b[:1]),
            ValueError,
            pat("boxes has 1 entry but", "batch has 2 images"),
        ),
        case(
            "FGD-boxes-count-too-many",
            lambda: call1(S1, T1, [*b, b[0]]),
            ValueError,
            pat("boxes has 3 entries", "batch has 2 images"),
        ),
        case(
            "FGDx-boxes-count",
            lambda: FGDLoss([CS] * 3, [CT] * 3)(S3, T3, b[:1], IMG),
            ValueError,
            pat("boxes has 1 entry but", "batch has 2 images"),
        ),
        case(
            "FGD-boxes-five-columns",
            lambda: call1(S1, T1, [b[0], torch.zeros(1, 5)]),
            ValueError,
            pat("boxes[1] must have shape (n, 4)", "(1, 5)"),
        ),
        case(
            "FGD-boxes-1d",
            lambda: call1(S1, T1, [torch.zeros(4), b[1]]),
            ValueError,
            pat("boxes[0] must have shape (n, 4)", "(4,)"),
        ),
        case(
            "FGD-boxes-int",
            lambda: call1(S1, T1, [b[0], b[1].long()]),
            TypeError,
            pat("boxes[1] must be floating", "torch.int64"),
        ),
        case(
            "FGD-boxes-entry-not-tensor",
            lambda: call1(S1, T1, [[0.0, 0.0, 8.0, 8.0], b[1]]),
            TypeError,
            pat("boxes[0] must be a tensor", "list"),
        ),
        case(
            "FGD-boxes-on-meta",
            lambda: call1(S1, T1, [b[0], meta(2, 4)]),
            ValueError,
            pat("boxes[1] is on meta", "cpu"),
        ),
        case(
            "FGD-box-nan-coordinate",
            lambda: call1(S1, T1, [b[0], poison(b[1], (1, 1), NAN)]),
            ValueError,
            pat("boxes[1] (image 1) has a non-finite coordinate: box 1 is [1.0, nan, 5.0, 6.0]"),
        ),
        case(
            "FGD-box-all-nan",
            lambda: call1(S1, T1, [torch.full((1, 4), NAN), b[1]]),
            ValueError,
            pat("boxes[0] (image 0)", "box 0 is [nan, nan, nan, nan]"),
        ),
        case(
            "FGD-box-inf-coordinate",
            lambda: call1(S1, T1, [b[0], poison(b[1], (0, 2), INF)]),
            ValueError,
            pat("boxes[1] (image 1)", "box 0 is [8.0, 8.0, inf, 30.0]"),
        ),
        case(
            "FGD-box-minus-inf-float16",
            lambda: call1(S1, T1, [poison(b[0], (0, 0), -INF).half(), b[1]]),
            ValueError,
            pat("boxes[0] (image 0)", "box 0 is [-inf, 0.0, 8.0, 8.0]"),
        ),
        case(
            "FGD-box-inverted",
            lambda: call1(S1, T1, [b[0], torch.tensor([[1.0, 2.0, 5.0, 6.0], [8.0, 8.0, 4.0, 30.0]])]),
            ValueError,
            pat("boxes[1] (image 1) has an inverted box: box 1 is [8.0, 8.0, 4.0, 30.0]", "x1 <= x2 and y1 <= y2"),
        ),
        case(
            "FGD-box-coco-xywh-by-mistake",
            lambda: call1(S1, T1, [torch.tensor([[10.0, 12.0, 6.0, 5.0]]), b[1]]),
            ValueError,
            pat("boxes[0] (image 0) has an inverted box", "(x, y, w, h)"),
        ),
        case(
            "FGDx-box-nan-coordinate",
            lambda: FGDLoss([CS] * 3, [CT] * 3)(S3, T3, [poison(b[0], (0, 3), NAN), b[1]], IMG),
            ValueError,
            pat("boxes[0] (image 0) has a non-finite coordinate", "box 0 is [0.0, 0.0, 8.0, nan]"),
        ),
        case(
            "FGD-lists-given-to-single-level",
            lambda: call1([S1], [T1]),
            TypeError,
            pat("s_feats", "list"),
        ),
        case(
            "FGD-module-on-other-device",
            lambda: call1(meta(*S1.shape), meta(*T1.shape), [meta(0, 4), meta(0, 4)]),
            ValueError,
            pat("meta", "cpu"),
        ),
    ]
    for v in [(0, 32), (32,), (32, -1), (32, 32, 3), "32", (True, 32), None, (32, NAN), ("32", "32"), (32, INF)]:
        out.append(
            case(
                f"FGD-image_size={v!r}",
                lambda v=v: call1(S1, T1, image_size=v),
                ValueError,
                pat("image_size", repr(v)),
            )
        )
    # the message names the types it got
    for v, types in [
        (("32", "32"), "(tuple of str, str)"),
        (None, "(NoneType)"),
        ((np.int64(32), np.bool_(True)), "(tuple of int64, bool)"),
        ([torch.tensor(32), torch.tensor([32])], "(list of Tensor(torch.int64, 0-D), Tensor(torch.int64, 1-D))"),
        ((32, torch.tensor(True)), "(tuple of int, Tensor(torch.bool, 0-D))"),
        ((32, 1j), "(tuple of int, complex)"),
        (torch.zeros(3), "(Tensor)"),
    ]:
        out.append(
            case(
                f"FGD-image_size-types-{types}",
                lambda v=v: call1(S1, T1, image_size=v),
                ValueError,
                pat("image_size must be (H, W)", "two positive finite numbers", types),
            )
        )
    return out


@pytest.mark.parametrize(
    "image_size",
    [
        (np.int64(32), np.int64(32)),
        (np.int32(32), np.float32(32.0)),
        (np.float64(32.0), 32),
        (torch.tensor(32), torch.tensor(32.0)),
        (torch.tensor(32, dtype=torch.int16), np.uint8(32)),
        torch.tensor([32, 32]),
        np.array([32, 32]),
        [32.0, 32],
    ],
    ids=repr,
)
def test_fgd_image_size_takes_any_real_number_type(image_size: Any) -> None:
    """numpy scalars, 0-d tensors of any real dtype and 1-D tensors/arrays of two give the loss of
    the plain ints."""
    s, t = levels(CS), levels(CT, seed=10)
    torch.manual_seed(0)
    loss = FGDLoss([CS] * 3, [CT] * 3)
    want = loss(s, t, boxes2(), (32, 32))
    got = loss(s, t, boxes2(), image_size)
    torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)


def _pkd_cwd_cases() -> list[Any]:
    out = []
    for name, build in [("PKD", PKDLoss), ("CWD", CWDLoss)]:

        def call(s: Any, t: Any, build=build) -> Any:
            return build()(s, t)

        out += [
            case(
                f"{name}-levels-differ",
                lambda call=call: call(SAME_S[:2], SAME_T),
                ValueError,
                pat("number of levels differs", "s_feats has 2", "t_feats has 3"),
            ),
            case(f"{name}-levels-empty", lambda call=call: call([], []), ValueError, pat("at least one level")),
            case(
                f"{name}-batch-differs-level-2",
                lambda call=call: call(at(SAME_S, 2, rnd(3, CT, 2, 2)), SAME_T),
                ValueError,
                pat("batch sizes differ at level 2", "student feature has 3", "teacher feature has 2"),
            ),
            case(
                f"{name}-channels-differ-level-2",
                lambda call=call: call(at(SAME_S, 2, rnd(N, CS, 2, 2)), SAME_T),
                ValueError,
                pat("channels differ at level 2", "student feature has 3", "teacher feature has 4"),
            ),
            case(
                f"{name}-teacher-int-level-2",
                lambda call=call: call(SAME_S, at(SAME_T, 2, ints(N, CT, 2, 2))),
                TypeError,
                pat("teacher feature at level 2 must be a floating tensor", "torch.int64"),
            ),
            case(
                f"{name}-student-3d",
                lambda call=call: call(rnd(N, CT, 4), rnd(N, CT, 4, 4)),
                ValueError,
                pat("student feature must be 4-D", "(2, 4, 4)"),
            ),
            case(
                f"{name}-empty-batch",
                lambda call=call: call(rnd(0, CT, 4, 4), rnd(0, CT, 4, 4)),
                ValueError,
                pat("student feature has an empty batch", "(0, 4, 4, 4)"),
            ),
            case(
                f"{name}-teacher-on-meta-level-2",
                lambda call=call: call(SAME_S, at(SAME_T, 2, meta(N, CT, 2, 2))),
                ValueError,
                pat("teacher feature at level 2 is on meta", "student feature is on cpu"),
            ),
            case(
                f"{name}-level-on-other-device",
                lambda call=call: call(at(SAME_S, 2, meta(N, CT, 2, 2)), at(SAME_T, 2, meta(N, CT, 2, 2))),
                ValueError,
                pat("level 2", "meta", "cpu"),
            ),
        ]
    out += [
        case(
            "PKD-one-value-per-channel",
            lambda: PKDLoss()(rnd(1, CT, 1, 1), rnd(1, CT, 1, 1, seed=1)),
            ValueError,
            pat("N*H*W", "at least 2", "(1, 4, 1, 1)"),
        ),
        case(
            "PKD-one-value-per-channel-level-2",
            lambda: PKDLoss()(
                [rnd(1, CT, 2, 2), rnd(1, CT, 2, 2), rnd(1, CT, 1, 1)],
                [rnd(1, CT, 2, 2), rnd(1, CT, 2, 2), rnd(1, CT, 1, 1)],
            ),
            ValueError,
            pat("at level 2", "at least 2", "(1, 4, 1, 1)"),
        ),
        case(
            "PKD-one-value-after-resize",
            lambda: PKDLoss()(rnd(1, CT, 2, 2), rnd(1, CT, 1, 1)),
            ValueError,
            pat("at least 2", "(1, 4, 1, 1)"),
        ),
        case(
            "CWD-spatial-differs-hint",
            lambda: _raise_then_check_hint(
                lambda: CWDLoss()(at(SAME_S, 2, rnd(N, CT, 3, 3)), SAME_T),
                lambda: CWDLoss(resize_student=True),
            ),
            ValueError,
            pat("spatial sizes differ at level 2", "(3, 3)", "(2, 2)"),
        ),
    ]
    return out


def _kd_cases() -> list[Any]:
    zs, zt = rnd(N, 5), rnd(N, 5, seed=1)
    out = []
    for mode in ("softmax", "sigmoid"):

        def call(s: Any, t: Any, mode=mode, **kw: Any) -> Any:
            return KDLoss(mode=mode, **kw)(s, t)

        out += [
            case(
                f"KD-{mode}-levels-differ",
                lambda call=call: call([zs, zs], [zt, zt, zt]),
                ValueError,
                pat("number of levels differs", "s_logits has 2", "t_logits has 3"),
            ),
            case(
                f"KD-{mode}-shapes-differ-level-2",
                lambda call=call: call([zs, zs, zs], [zt, zt, rnd(N, 6)]),
                ValueError,
                pat("logits shapes differ at level 2", "student (2, 5)", "teacher (2, 6)"),
            ),
            case(
                f"KD-{mode}-shapes-differ",
                lambda call=call: call(zs, rnd(3, 5)),
                ValueError,
                pat("logits shapes differ", "student (2, 5)", "teacher (3, 5)"),
            ),
            case(
                f"KD-{mode}-student-int",
                lambda call=call: call(ints(N, 5), zt),
                TypeError,
                pat("student logits must be a floating tensor", "torch.int64"),
            ),
            case(
                f"KD-{mode}-teacher-int-level-2",
                lambda call=call: call([zs, zs, zs], [zt, zt, ints(N, 5)]),
                TypeError,
                pat("teacher logits at level 2 must be a floating tensor", "torch.int64"),
            ),
            case(
                f"KD-{mode}-teacher-complex",
                lambda call=call: call(zs, zt.to(torch.complex64)),
                TypeError,
                pat("teacher logits", "torch.complex64"),
            ),
            case(
                f"KD-{mode}-empty-batch",
                lambda call=call: call(rnd(0, 5), rnd(0, 5)),
                ValueError,
                pat("student logits has an empty batch", "(0, 5)"),
            ),
            case(
                f"KD-{mode}-0d",
                lambda call=call: call(torch.tensor(1.0), torch.tensor(2.0)),
                ValueError,
                pat("student logits must be", "got shape ()"),
            ),
            case(
                f"KD-{mode}-6d",
                lambda call=call: call(rnd(1, 1, 1, 1, 1, 2), rnd(1, 1, 1, 1, 1, 2)),
                ValueError,
                pat("student logits must be", "(1, 1, 1, 1, 1, 2)"),
            ),
            case(
                f"KD-{mode}-class_dim-out-of-range",
                lambda call=call: call(zs, zt, class_dim=2),
                ValueError,
                pat("class_dim=2", "(2, 5)"),
            ),
            case(
                f"KD-{mode}-teacher-on-meta",
                lambda call=call: call(zs, meta(N, 5)),
                ValueError,
                pat("teacher logits is on meta", "student logits is on cpu"),
            ),
            case(
                f"KD-{mode}-level-on-other-device",
                lambda call=call: call([zs, meta(N, 5)], [zt, meta(N, 5)]),
                ValueError,
                pat("level 1", "meta", "cpu"),
            ),
        ]
    return out


@pytest.mark.parametrize(
    ("thunk", "exc", "pattern"),
    _famkd_cases() + _samfl_cases() + _logits_cases() + _mgd_cases() + _fgd_cases() + _pkd_cwd_cases() + _kd_cases(),
)
def test_forward_rejects(thunk: Callable[[], Any], exc: type[Exception], pattern: str) -> None:
    with pytest.raises(exc, match=pattern):
        thunk()


def test_counts_in_messages_agree_with_their_nouns() -> None:
    """Messages say "1 level", "1 thread", "1 entry" (not "1 levels") and "3 levels"."""
    from famkd_losses._validation import plural

    assert plural(1, "level") == "1 level" and plural(3, "level") == "3 levels"
    assert plural(1, "thread") == "1 thread" and plural(0, "thread") == "0 threads"
    assert plural(1, "entry", "entries") == "1 entry" and plural(2, "entry", "entries") == "2 entries"
    with pytest.raises(ValueError, match=pat("s_feats has 1 level but this loss was built for 3 (student_channels")):
        _famkd()(S3[:1], T3[:1])
    with pytest.raises(ValueError, match=pat("must give 3 weights, one per scale", "got 1")):
        ScaleAwareMaskedFeatureLoss(CS, CT, scales=(1, 2, 4), scale_weights=(1.0,))
    with pytest.raises(ValueError, match=pat("must give 1 weight, one per scale", "got 2")):
        ScaleAwareMaskedFeatureLoss(CS, CT, scales=(1,), scale_weights=(1.0, 2.0))


def test_valid_inputs_pass() -> None:
    """The bases the bad inputs are made from are valid: each loss accepts them."""
    assert torch.isfinite(_famkd()(S3, T3, ZS, ZT))
    assert torch.isfinite(_famkd(guidance="feature")(S3, T3, ZS, ZT))
    assert torch.isfinite(_famkd()(S3, T3, FLAT_S, FLAT_T))
    assert torch.isfinite(_famkd(head="softmax", num_classes=3)(S3, T3, FLAT_S, FLAT_T))
    assert torch.isfinite(_samfl()(S1, T1))
    assert torch.isfinite(MaskedLogitsLoss()(ZS, ZT))
    # alone, the logits loss takes any levels: fewer, one, other grids, flattened of any length
    assert torch.isfinite(MaskedLogitsLoss()(ZS[:2], ZT[:2]))
    assert torch.isfinite(MaskedLogitsLoss()(ZS[0], ZT[0]))
    assert torch.isfinite(MaskedLogitsLoss()(rnd(N, 6, 7, 7), rnd(N, 6, 7, 7, seed=1)))
    assert torch.isfinite(MaskedLogitsLoss()(rnd(N, 6, 3), rnd(N, 6, 3, seed=1)))
    assert torch.isfinite(MGDLoss([CS] * 3, [CT] * 3)(S3, T3))
    assert torch.isfinite(MGDLoss(CS, CT)(S1, T1))
    assert torch.isfinite(FGDLoss([CS] * 3, [CT] * 3)(S3, T3, boxes2(), IMG))
    assert torch.isfinite(FGDLoss(CS, CT)(S1, T1, boxes2(), IMG))
    assert torch.isfinite(PKDLoss()(SAME_S, SAME_T))
    assert torch.isfinite(CWDLoss()(SAME_S, SAME_T))
    assert torch.isfinite(KDLoss()(rnd(N, 5), rnd(N, 5, seed=1)))
    assert torch.isfinite(KDLoss(mode="sigmoid")(rnd(N, 5), rnd(N, 5, seed=1)))


# --------------------------------------------------------------------------------------------
# 3. NaN / Inf in a teacher: the loss is never finite (policy: propagate)
# --------------------------------------------------------------------------------------------

BAD_VALUES = [pytest.param(NAN, id="nan"), pytest.param(INF, id="+inf"), pytest.param(-INF, id="-inf")]


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("weighting", ["none", "attention"])
@pytest.mark.parametrize("mask_mode", MASK_MODES)
def test_nan_famkd_feature(mask_mode: str, weighting: str, value: float) -> None:
    loss_fn = FAMKDLoss([CS, CS], [CT, CT], mask_mode=mask_mode, weighting=weighting, seed=0)
    s, t = levels(CS, sizes=SIZES[:2]), levels(CT, sizes=SIZES[:2], seed=10)
    t[1] = poison(t[1], (1, 2, 0, 1), value)
    assert_not_finite(loss_fn(s, t))


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("mask_mode", MASK_MODES)
def test_nan_scale_aware_feature(mask_mode: str, value: float) -> None:
    loss_fn = ScaleAwareMaskedFeatureLoss(CS, CT, mask_mode=mask_mode, seed=0)
    assert_not_finite(loss_fn(S1, poison(T1, (0, 1, 3, 2), value)))


def _salient_teacher() -> torch.Tensor:
    """(1, C, 4, 4) teacher whose position (0, 0) and channel 0 are by far the most salient."""
    t = rnd(1, CT, 4, 4, seed=7) * 0.1
    t[0, :, 0, 0] = 5.0
    t[0, 0] += 3.0
    return t


TOPK_SCALES = [(1,), (1, 2, 4), (2,), (4,), (2, 4)]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(NAN, id="nan"),
        pytest.param(INF, id="+inf"),
        pytest.param(-INF, id="-inf"),
    ],
)
@pytest.mark.parametrize("scales", TOPK_SCALES, ids=str)
def test_nan_at_topk_hidden_position(scales: tuple[int, ...], value: float) -> None:
    t = _salient_teacher()
    # the setup: at every scale used, the top-k masks hide the window holding (0, 0) and channel 0
    for s in scales:
        t_s = max_pool(t, s)
        assert spatial_mask(t_s, 0.5)[0, 0, 0, 0] == 0
        assert channel_mask(t_s, 0.5)[0, 0, 0, 0] == 0
    loss_fn = ScaleAwareMaskedFeatureLoss(CT, CT, scales=scales, ratio_sp=0.5, ratio_ch=0.5, mask_mode="topk")
    loss = loss_fn(rnd(1, CT, 4, 4, seed=8), poison(t, (0, 0, 0, 0), value))
    assert_not_finite(loss)


@pytest.mark.parametrize("value", [pytest.param(NAN, id="nan"), pytest.param(INF, id="+inf")])
@pytest.mark.parametrize("family", ["SAMFL", "FAMKD"])
def test_nan_in_level_smaller_than_every_scale(family: str, value: float) -> None:
    """A 1x1 level with scales (2, 4): every scale is skipped, yet the NaN teacher must not vanish."""
    t = poison(rnd(N, CT, 1, 1, seed=9), (0, 0, 0, 0), value)
    s = rnd(N, CS, 1, 1, seed=10)
    if family == "SAMFL":
        loss = ScaleAwareMaskedFeatureLoss(CS, CT, scales=(2, 4))(s, t)
    else:
        loss = FAMKDLoss([CS, CS], [CT, CT], scales=(2, 4))([S1, s], [T1, t])
    assert_not_finite(loss)


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("weights", ["soft", "mask"])
@pytest.mark.parametrize("guidance", ["logit", "feature"])
def test_nan_famkd_teacher_logits(guidance: str, weights: str, value: float) -> None:
    loss_fn = FAMKDLoss([CS, CS], [CT, CT], guidance=guidance, weights=weights)
    s, t = levels(CS, sizes=SIZES[:2]), levels(CT, sizes=SIZES[:2], seed=10)
    zs, zt = _dense_logits(sizes=SIZES[:2]), _dense_logits(sizes=SIZES[:2], seed=200)
    zt[0] = poison(zt[0], (1, 3, 2, 2), value)
    assert_not_finite(loss_fn(s, t, zs, zt))


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
def test_nan_logits_at_zero_weight_all_zero(head: str, value: float) -> None:
    """weights="mask", ratio_l=0: every weight is 0, the NaN/Inf teacher logit still shows."""
    zs, zt = rnd(N, 3, 4, 4), poison(rnd(N, 3, 4, 4, seed=1), (0, 1, 2, 3), value)
    d = position_prob_diff(zs, zt, head=head)
    assert guidance_weights(d, "mask", ratio=0.0).abs().sum() == 0
    assert_not_finite(MaskedLogitsLoss(head=head, weights="mask", ratio_l=0.0, num_classes=3)(zs, zt))


@pytest.mark.parametrize("value", [pytest.param(INF, id="+inf"), pytest.param(-INF, id="-inf")])
def test_inf_logits_at_zero_weight_position(value: float) -> None:
    """weights="mask", ratio_l=0.5: the Inf sits where student and teacher agree, so its weight is 0."""
    t = rnd(1, 3, 2, 2, seed=3)
    s = t.clone()
    s[0, :, 0, :] = -10 * t[0, :, 0, :] + 3.0  # row 0 disagrees strongly: the 2 kept positions
    t[0, 0, 1, 1] = value
    s[0, 0, 1, 1] = math.copysign(50.0, value)  # sigmoid(s) ~ sigmoid(t): no disagreement here
    w = guidance_weights(position_prob_diff(s, t), "mask", ratio=0.5).reshape(1, 2, 2)
    assert w[0, 1, 1] == 0 and w[0, 0].sum() == 2
    assert_not_finite(MaskedLogitsLoss(weights="mask", ratio_l=0.5)(s, t))


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("weights", ["soft", "mask"])
def test_nan_logits_feature_guidance_teacher_feature(weights: str, value: float) -> None:
    zs, zt = rnd(N, 3, 4, 4), rnd(N, 3, 4, 4, seed=1)
    sf, tf = rnd(N, CT, 4, 4, seed=2), poison(rnd(N, CT, 4, 4, seed=3), (0, 1, 1, 1), value)
    assert_not_finite(MaskedLogitsLoss(guidance="feature", weights=weights)(zs, zt, sf, tf))


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("region_scales", [None, (1, 2)], ids=["plain", "region"])
@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
def test_nan_logits_soft(head: str, region_scales, value: float) -> None:
    zs, zt = ZS, at(ZT, 2, poison(ZT[2], (1, 0, 1, 0), value))
    loss_fn = MaskedLogitsLoss(head=head, region_scales=region_scales, num_classes=ZS[0].shape[1])
    assert_not_finite(loss_fn(zs, zt))


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("mask", ["spatial", "channel"])
def test_nan_mgd(mask: str, value: float) -> None:
    loss_fn = MGDLoss(CS, CT, mask=mask, seed=0)
    assert_not_finite(loss_fn(S1, poison(T1, (1, 3, 0, 2), value)))


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("where", ["inside", "outside"])
def test_nan_fgd(where: str, value: float) -> None:
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.tensor([[0.0, 0.0, 8.0, 8.0]])]
    pos = (0, 0) if where == "inside" else (3, 3)
    fg, bg = box_masks(boxes, (4, 4), IMG)
    assert (fg[1, 0][pos] > 0) == (where == "inside")
    assert (bg[1, 0][pos] > 0) == (where == "outside")
    loss = FGDLoss(CS, CT)(S1, poison(T1, (1, 2, *pos), value), boxes, IMG)
    assert_not_finite(loss)


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("cls", [PKDLoss, CWDLoss], ids=["PKD", "CWD"])
def test_nan_pkd_cwd(cls, value: float) -> None:
    assert_not_finite(cls()(SAME_S, at(SAME_T, 1, poison(SAME_T[1], (0, 3, 1, 0), value))))


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("dense", [False, True], ids=["NK", "NKHW"])
@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_nan_kd(mode: str, dense: bool, value: float) -> None:
    if dense:
        zs, zt = rnd(N, 5, 2, 2), poison(rnd(N, 5, 2, 2, seed=1), (1, 2, 0, 1), value)
        loss = KDLoss(mode=mode, class_dim=1)(zs, zt)
    else:
        zs, zt = rnd(N, 5), poison(rnd(N, 5, seed=1), (1, 2), value)
        loss = KDLoss(mode=mode)(zs, zt)
    assert_not_finite(loss)


# --------------------------------------------------------------------------------------------
# 4. a student of another spatial size: an error by default, resized when asked
# --------------------------------------------------------------------------------------------

RESIZABLE = {
    "FAMKD": lambda **kw: FAMKDLoss([CS, CS], [CT, CT], **{**FULL_METHOD, **kw}),
    "SAMFL": lambda **kw: ScaleAwareMaskedFeatureLoss(CS, CT, **kw),
    "MGD": lambda **kw: MGDLoss(CS, CT, seed=0, **kw),
    "FGD": lambda **kw: FGDLoss(CS, CT, **kw),
}


def _resize_call(name: str, loss_fn: Any, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if name == "FAMKD":
        return loss_fn([rnd(N, CS, 4, 4, seed=11), s], [rnd(N, CT, 4, 4, seed=12), t])
    if name == "FGD":
        return loss_fn(s, t, boxes2(), IMG)
    return loss_fn(s, t)


@pytest.mark.parametrize("s_size", [(8, 8), (3, 5)], ids=["larger", "smaller"])
@pytest.mark.parametrize("name", sorted(RESIZABLE))
def test_spatial_mismatch_raises_by_default(name: str, s_size: tuple[int, int]) -> None:
    s, t = rnd(N, CS, *s_size), rnd(N, CT, 4, 4, seed=1)
    lv = " at level 1" if name == "FAMKD" else ""
    with pytest.raises(ValueError, match=pat(f"spatial sizes differ{lv}", str(s_size), "(4, 4)", "resize_student")):
        _resize_call(name, RESIZABLE[name](), s, t)


@pytest.mark.parametrize("s_size", [(8, 8), (3, 5)], ids=["larger", "smaller"])
@pytest.mark.parametrize("name", sorted(RESIZABLE))
def test_resize_student_works(name: str, s_size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    loss_fn = RESIZABLE[name](resize_student=True)
    twin = copy.deepcopy(loss_fn)
    s = rnd(N, CS, *s_size).requires_grad_(True)
    t = rnd(N, CT, 4, 4, seed=1)
    loss = _resize_call(name, loss_fn, s, t)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # the same as resizing the student by hand (bilinear, align_corners=False) with an identical twin
    s_manual = F.interpolate(s.detach(), size=(4, 4), mode="bilinear", align_corners=False)
    expected = _resize_call(name, twin, s_manual, t)
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("resize_student", [True, False])
def test_pkd_resizes_either_side(resize_student: bool) -> None:
    s = rnd(N, CT, 8, 8).requires_grad_(True)
    loss = PKDLoss(resize_student=resize_student)(s, rnd(N, CT, 4, 4, seed=1))
    assert torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
