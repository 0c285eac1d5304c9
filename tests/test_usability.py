"""What a user meets first: last_terms() on every loss, torchvision-style mappings of levels,
dense head logits in KD, warnings for swapped arguments and levels that no scale fits."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict

import pytest
import torch

from famkd_losses import (
    CWDLoss,
    FAMKDLoss,
    FGDLoss,
    KDLoss,
    MaskedLogitsLoss,
    MGDLoss,
    PKDLoss,
    ScaleAwareMaskedFeatureLoss,
)
from famkd_losses.functional import binary_kl, softmax_kl

SIZES = [(8, 8), (4, 4)]


def _feats(c, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, h, w, generator=g).requires_grad_(grad) for h, w in SIZES]


BOXES = [torch.tensor([[0.0, 0.0, 16.0, 16.0]]), torch.zeros(0, 4)]

CASES = {
    "famkd": (lambda: FAMKDLoss([4, 4], [6, 6]), lambda m, s, t: m(s, t), {"total", "feature", "feature/level1"}),
    "samfl": (lambda: ScaleAwareMaskedFeatureLoss(4, 6), lambda m, s, t: m(s[0], t[0]), {"total", "scale1", "scale4"}),
    "mgd": (lambda: MGDLoss([4, 4], [6, 6], seed=0), lambda m, s, t: m(s, t), {"total", "level0", "level1"}),
    "mgd1": (lambda: MGDLoss(4, 6, seed=0), lambda m, s, t: m(s[0], t[0]), {"total"}),
    "fgd": (
        lambda: FGDLoss([4, 4], [6, 6]),
        lambda m, s, t: m(s, t, BOXES, (32, 32)),
        {"total", "level0/fg", "level0/bg", "level0/attention", "level1/global"},
    ),
    "fgd1": (
        lambda: FGDLoss(4, 6),
        lambda m, s, t: m(s[0], t[0], BOXES, (32, 32)),
        {"total", "fg", "bg", "attention", "global"},
    ),
    "pkd": (lambda: PKDLoss(), lambda m, s, t: m(s, t[:1] + t[1:]), {"total", "level0", "level1"}),
    "cwd": (lambda: CWDLoss(), lambda m, s, t: m(s, t), {"total", "level0", "level1"}),
    "kd": (lambda: KDLoss(), lambda m, s, t: m(s, t), {"total", "level0", "level1"}),
    "logits": (lambda: MaskedLogitsLoss(), lambda m, s, t: m(s, t), {"total", "level0", "level1"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_last_terms_on_every_loss(name):
    make, call, keys = CASES[name]
    mod = make()
    same = name in ("pkd", "cwd", "kd", "logits")
    s, t = _feats(4 if not same else 6, grad=True), _feats(6, seed=1)
    loss = call(mod, s, t)
    terms = mod.last_terms()
    assert keys <= set(terms), sorted(terms)
    torch.testing.assert_close(terms["total"], loss.detach())
    assert all(not v.requires_grad for v in terms.values())
    floats = mod.last_terms(as_float=True)
    assert json.loads(json.dumps(floats)).keys() == terms.keys()
    parts = [v for k, v in terms.items() if k != "total" and "/" not in k] or [
        v for k, v in terms.items() if k != "total" and k.count("/") == 1 and not k.startswith("feature/")
    ]
    if name not in ("famkd",) and parts:
        torch.testing.assert_close(sum(parts), loss.detach(), rtol=1e-6, atol=1e-9)


def test_mapping_levels_like_torchvision_fpn():
    s, t = _feats(4), _feats(6, seed=1)
    kd = FAMKDLoss([4, 4], [6, 6])
    as_list = kd(s, t)
    od_s = OrderedDict((str(i), x) for i, x in enumerate(s))
    od_t = OrderedDict((str(i), x) for i, x in enumerate(t))
    torch.testing.assert_close(kd(od_s, od_t), as_list)
    with pytest.raises(ValueError, match="name different levels"):
        kd(od_s, OrderedDict((k + "x", v) for k, v in od_t.items()))
    with pytest.raises(TypeError, match="both be mappings"):
        kd(od_s, t)
    with pytest.raises(TypeError, match="pass a list of the levels"):
        kd(od_s.values(), od_t.values())


def test_famkd_accepts_int_channels_for_one_level():
    kd = FAMKDLoss(4, 6)
    assert kd.num_levels == 1
    s, t = _feats(4), _feats(6, seed=1)
    torch.testing.assert_close(kd(s[0], t[0]), kd([s[0]], [t[0]]))


def test_kd_dense_head_logits():
    g = torch.Generator().manual_seed(0)
    zs, zt = torch.randn(2, 3 * 4, 5, 6, generator=g), torch.randn(2, 3 * 4, 5, 6, generator=g)
    # num_classes=4: each of 3 anchors at each of 30 positions is a sample over 4 classes
    per = softmax_kl(zs.reshape(2, 3, 4, 5, 6), zt.reshape(2, 3, 4, 5, 6), 2.0, dim=2)
    torch.testing.assert_close(KDLoss(tau=2.0, num_classes=4)(zs, zt), 4.0 * per.mean())
    # no num_classes: the 12 channels are one distribution per position
    per1 = softmax_kl(zs, zt, 1.0, dim=1)
    torch.testing.assert_close(KDLoss()(zs, zt), per1.mean())
    torch.testing.assert_close(KDLoss(class_dim=1)(zs, zt), per1.mean())
    sig = binary_kl(zs, zt).reshape(2, 3, 4, 5, 6).sum(dim=2).mean()
    torch.testing.assert_close(KDLoss(mode="sigmoid", num_classes=4)(zs, zt), sig)
    with pytest.raises(ValueError, match="not a multiple of num_classes=5"):
        KDLoss(num_classes=5)(zs, zt)
    with pytest.raises(ValueError, match="class_dim or num_classes"):
        KDLoss(class_dim=1, num_classes=4)


def test_softmax_head_dense_needs_num_classes():
    z = torch.randn(2, 12, 3, 3)
    with pytest.raises(ValueError, match=r"head='softmax' with dense logits.*needs num_classes"):
        MaskedLogitsLoss(head="softmax")(z, z.clone())
    MaskedLogitsLoss(head="softmax", num_classes=4)(z, z.clone())
    MaskedLogitsLoss(head="softmax")(torch.randn(2, 7, 4), torch.randn(2, 7, 4))  # flattened: K is last


@pytest.mark.parametrize("name", ["famkd", "mgd1", "pkd", "kd", "logits"])
def test_swapped_student_teacher_warns(name):
    make, call, _ = CASES[name]
    same = name in ("pkd", "kd", "logits")
    c_s = 6 if same else 4
    teacher_like = _feats(6, seed=1, grad=True)  # needs grad: what a student looks like
    student_like = _feats(c_s)
    mod = make() if same else (FAMKDLoss([6, 6], [6, 6]) if name == "famkd" else MGDLoss(6, 6, seed=0))
    with pytest.warns(UserWarning, match=r"argument order is \(student, teacher\)") as caught:
        call(mod, student_like if same else _feats(6), teacher_like)
    assert {w.filename for w in caught} == {__file__}  # the user's call of the loss, not the library
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(mod, teacher_like, student_like if same else _feats(6))  # the right order: no warning


def test_level_that_no_scale_fits_warns():
    kd = FAMKDLoss([3, 3], [3, 3], scales=(2, 4))
    with pytest.warns(UserWarning, match=r"no scale of \(2, 4\) fits a 1x1 map"):
        kd([torch.randn(2, 3, 8, 8), torch.randn(2, 3, 1, 1)], [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 1, 1)])


def test_mask_ratio_that_keeps_no_position_of_a_level_warns():
    """ratio_l * P rounding to 0 on a small level drops that level's logits term: said, not silent."""
    zs = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 2, 2)]  # 64 and 4 positions
    zt = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 2, 2)]
    loss = MaskedLogitsLoss(weights="mask", ratio_l=0.1, num_classes=3)  # round(6.4) = 6, round(0.4) = 0
    with pytest.warns(UserWarning, match=r"ratio_l=0.1 keeps none of the 4 positions at level 1") as caught:
        total = loss(zs, zt)
    assert {w.filename for w in caught} == {__file__}
    assert float(loss.last_terms()["level1"]) == 0.0 and float(total) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MaskedLogitsLoss(weights="mask", ratio_l=0.125, num_classes=3)(zs, zt)  # round(0.5) = 1: no warning
        MaskedLogitsLoss(weights="mask", ratio_l=0.0, num_classes=3)(zs, zt)  # none asked for: no warning


@pytest.mark.parametrize("loss", [PKDLoss(), CWDLoss()])
def test_no_align_losses_say_how_to_fix_channels(loss):
    with pytest.raises(ValueError, match=r"channels differ.*no align layer.*1x1 conv"):
        loss(torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5))


@pytest.mark.slow
def test_backend_compile_matches_torch():
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn(2, 6, 5, 4, generator=g).requires_grad_(True), torch.randn(2, 6, 2, 2, generator=g)]
    zt = [torch.randn(2, 6, 5, 4, generator=g), torch.randn(2, 6, 2, 2, generator=g)]
    eager = MaskedLogitsLoss(num_classes=3, head="softmax")
    compiled = MaskedLogitsLoss(num_classes=3, head="softmax", backend="compile")
    for _ in range(2):  # the second call reuses the compiled graph
        a, b = eager(zs, zt), compiled(zs, zt)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(torch.autograd.grad(b, zs[0]), torch.autograd.grad(a, zs[0]), rtol=1e-4, atol=1e-7)
    assert compiled.__dict__.get("_compiled_forward") is not None
    torch.testing.assert_close(compiled.last_terms()["total"], a.detach(), rtol=1e-5, atol=1e-7)


def test_backend_triton_needs_a_device_it_can_run_on(monkeypatch):
    from famkd_losses._backend import use_triton

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend='triton' needs triton and CUDA tensors"):
        use_triton("triton", torch.zeros(1))
    assert use_triton("auto", torch.zeros(1)) is False  # CPU tensors: the reference
    assert use_triton("torch", torch.zeros(1)) is False


@pytest.mark.parametrize("multi_level", [True, False])
def test_swapped_student_teacher_of_other_widths_says_so(multi_level):
    mod = FAMKDLoss([4, 4], [6, 6]) if multi_level else MGDLoss(4, 6)

    def pair(c_s):
        s, t = torch.randn(2, c_s, 5, 5), torch.randn(2, 6, 5, 5)
        return ([s, s], [t, t]) if multi_level else (s, t)

    s, t = pair(4)
    with pytest.raises(ValueError, match=r"built for student_channels=4.*look swapped: pass the student's features"):
        mod(t, s)
    with pytest.raises(ValueError, match=r"built for student_channels=4 \(shape \(2, 5, 5, 5\)\)$"):
        mod(*pair(5))  # wrong, but not the teacher's width: no hint


@pytest.mark.parametrize(
    "mod, shown",
    [
        (MGDLoss(3, 4, ratio=0.5), "3, 4, mask='spatial', ratio=0.5, alpha=2e-05"),
        (MGDLoss([3, 3], [4, 4]), "mask='spatial', ratio=0.65"),
        (FGDLoss(3, 4, tau=0.7), "3, 4, tau=0.7, alpha=0.001"),
        (PKDLoss(loss_weight=2.0), "loss_weight=2.0"),
        (CWDLoss(tau=4.0), "tau=4.0, loss_weight=1.0"),
        (KDLoss(mode="sigmoid", num_classes=3), "mode='sigmoid', tau=1.0, loss_weight=1.0, num_classes=3"),
    ],
)
def test_repr_shows_the_hyperparameters(mod, shown):
    assert shown in "\n".join(repr(mod).splitlines()[:2])  # the module's own line, not a child's
