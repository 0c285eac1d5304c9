"""FAMKD's feature part, logits part and the combined loss against literal transcriptions of method.md."""

from __future__ import annotations

import pytest
import torch
from _literal import feature_level_literal, logits_literal
from torch.autograd import gradcheck

from famkd_losses import FULL_METHOD, FAMKDLoss, MaskedLogitsLoss, ScaleAwareMaskedFeatureLoss
from famkd_losses.functional import num_masked

D64 = torch.float64


def _feats(n, cs, ct, h, w, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, cs, h, w, generator=g, dtype=dtype)
    t = torch.randn(n, ct, h, w, generator=g, dtype=dtype)
    return s, t


def _perturb_params(mod, seed=0):
    """Non-trivial fusion weights so that the fusion is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in mod.named_parameters():
            if "fusion_logits" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return mod


# ---------------------------------------------------------------- feature part


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"scales": (1,)},
        {"scales": (2, 4)},
        {"mask_mode": "topk_nonsalient"},
        {"branches": ("spatial",)},
        {"branches": "channel"},
        {"branches": ("channel", "spatial")},
        {"weighting": "attention"},
        {"scale_weights": (1.0, 0.5, 0.25)},
        {"share_generators": False},
        {"ratio_sp": 0.0, "ratio_ch": 0.0},
        {"ratio_sp": 0.9, "ratio_ch": 0.75, "tau": 1.3, "alpha": 1e-3},
    ],
)
@pytest.mark.parametrize(("cs", "ct", "h", "w"), [(6, 10, 9, 7), (8, 8, 4, 5), (5, 3, 1, 1), (3, 5, 2, 9)])
def test_feature_loss_matches_literal(kw, cs, ct, h, w):
    torch.manual_seed(0)
    mod = _perturb_params(ScaleAwareMaskedFeatureLoss(cs, ct, **kw).double())
    s, t = _feats(2, cs, ct, h, w)
    s.requires_grad_(True)
    got = mod(s, t)
    ref = feature_level_literal(mod, s, t)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
    if ref.grad_fn is None:  # no scale fits this map: nothing to distil
        assert got.item() == 0.0
        return
    params = [s, *mod.parameters()]
    g_got = torch.autograd.grad(got, params, allow_unused=True)
    g_ref = torch.autograd.grad(feature_level_literal(mod, s, t), params, allow_unused=True)
    for a, b in zip(g_got, g_ref):
        assert a is not None  # every parameter takes part (DDP needs it)
        if b is None:  # the literal does not reach it (a scale that does not fit): an exact zero
            assert (a == 0).all()
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)


def test_feature_loss_scale_terms_and_skipping():
    mod = ScaleAwareMaskedFeatureLoss(4, 4, scales=(1, 2, 4), scale_weights=(1.0, 2.0, 3.0))
    s, t = _feats(2, 4, 4, 3, 5, dtype=torch.float32)
    loss = mod(s, t)
    scale_terms = {int(k[5:]): v for k, v in mod.last_terms().items() if k.startswith("scale")}
    assert set(scale_terms) == {1, 2}  # 4 > min(3, 5): skipped
    torch.testing.assert_close(sum(scale_terms.values()), loss.detach())
    single = {k: ScaleAwareMaskedFeatureLoss(4, 4, scales=(k,)) for k in (1, 2)}
    for k, m in single.items():
        m.load_state_dict({n: p for n, p in mod.state_dict().items() if "fusion" not in n}, strict=False)
        with torch.no_grad():
            m.fusion_logits.copy_(mod.fusion_logits[k - 1 : k])
        torch.testing.assert_close(scale_terms[k], k * m(s, t).detach())


def test_feature_loss_no_scale_fits_is_zero_and_differentiable():
    mod = ScaleAwareMaskedFeatureLoss(3, 3, scales=(2, 4))
    s = torch.randn(2, 3, 1, 1, requires_grad=True)
    loss = mod(s, torch.randn(2, 3, 1, 1))
    assert loss.item() == 0.0 and set(mod.last_terms()) == {"total"}
    loss.backward()
    assert s.grad is not None and torch.equal(s.grad, torch.zeros_like(s))


def test_feature_loss_layers():
    mod = ScaleAwareMaskedFeatureLoss(4, 8)
    assert isinstance(mod.align, torch.nn.Conv2d) and mod.align.kernel_size == (1, 1)
    assert isinstance(ScaleAwareMaskedFeatureLoss(8, 8).align, torch.nn.Identity)
    assert mod.fusion_logits.shape == (3, 2) and torch.equal(mod.fusion_logits, torch.zeros(3, 2))
    assert len(mod.generators["spatial"]) == 1 and len(mod.generators["channel"]) == 1
    per_scale = ScaleAwareMaskedFeatureLoss(4, 8, share_generators=False)
    assert len(per_scale.generators["spatial"]) == 3
    one = ScaleAwareMaskedFeatureLoss(4, 8, branches=("spatial",))
    assert one.fusion_logits is None and list(one.generators) == ["spatial"]
    gen = mod.generators["spatial"][0]
    convs = [m for m in gen if isinstance(m, torch.nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3)] and all(c.in_channels == 8 for c in convs)
    assert isinstance(gen[1], torch.nn.ReLU)


def test_feature_loss_gradients_reach_every_part_but_teacher():
    mod = ScaleAwareMaskedFeatureLoss(4, 6)
    s = torch.randn(2, 4, 8, 8, requires_grad=True)
    t = torch.randn(2, 6, 8, 8, requires_grad=True)
    mod(s, t).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_feature_loss_gradcheck():
    mod = _perturb_params(ScaleAwareMaskedFeatureLoss(3, 4, scales=(1, 2), weighting="attention").double())
    s, t = _feats(2, 3, 4, 5, 3)
    s.requires_grad_(True)
    assert gradcheck(lambda v: mod(v, t), (s,))
    theta = mod.fusion_logits
    assert gradcheck(lambda th: _with_theta(mod, th, s.detach(), t), (theta.detach().clone().requires_grad_(),))


def _with_theta(mod, theta, s, t):
    saved = mod.fusion_logits
    del mod.fusion_logits
    mod.fusion_logits = theta
    try:
        return mod(s, t)
    finally:
        mod.fusion_logits = saved


@pytest.mark.parametrize("mode", ["sample", "random"])
def test_random_feature_masks_are_seeded(mode):
    s, t = _feats(2, 4, 4, 6, 6, dtype=torch.float32)
    a = ScaleAwareMaskedFeatureLoss(4, 4, mask_mode=mode, seed=7)
    b = ScaleAwareMaskedFeatureLoss(4, 4, mask_mode=mode, seed=7)
    b.load_state_dict(a.state_dict())
    first = a(s, t)
    torch.testing.assert_close(first, b(s, t))
    assert not torch.equal(first, a(s, t))  # fresh draw each call


def test_topk_mask_hides_exact_counts_in_module():
    """The generator input has exactly round(ratio * count) zeroed positions per image and scale."""
    mod = ScaleAwareMaskedFeatureLoss(4, 4, branches=("spatial",), scales=(1, 2), ratio_sp=0.65)
    seen = []
    mod.generators["spatial"][0].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach()))
    s = torch.rand(3, 4, 7, 9) + 0.1  # strictly positive: zeros only where masked
    mod(s, torch.randn(3, 4, 7, 9))
    assert len(seen) == 2
    for x in seen:
        zero_positions = (x == 0).all(dim=1).sum(dim=(1, 2))
        assert (zero_positions == num_masked(x.shape[-2] * x.shape[-1], 0.65)).all()


def test_resize_student():
    mod = ScaleAwareMaskedFeatureLoss(4, 6, resize_student=True).double()
    s = torch.randn(2, 4, 5, 5, dtype=D64, requires_grad=True)
    t = torch.randn(2, 6, 10, 10, dtype=D64)
    torch.testing.assert_close(mod(s, t), feature_level_literal(mod, s, t))


# ---------------------------------------------------------------- logits part


def _logits(shapes, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = [scale * torch.randn(*sh, generator=g, dtype=D64) for sh in shapes]
    t = [scale * torch.randn(*sh, generator=g, dtype=D64) for sh in shapes]
    return s, t


LOGIT_CASES = [
    {},
    {"temperature": 2.0, "beta": 0.3},
    {"weights": "mask", "ratio_l": 0.4},
    {"region_scales": (1, 2, 4)},
    {"region_scales": (2,), "weights": "mask"},
    {"head": "softmax", "num_classes": 4},
    {"head": "softmax", "num_classes": 4, "temperature": 3.0, "region_scales": (1, 2)},
    {"tau_w": 0.02},
]


@pytest.mark.parametrize("kw", LOGIT_CASES)
def test_logits_loss_matches_literal_dense(kw):
    s, t = _logits([(2, 8, 6, 5), (2, 8, 3, 3), (2, 8, 1, 2)])
    for z in s:
        z.requires_grad_(True)
    got = MaskedLogitsLoss(**kw)(s, t)
    ref = logits_literal(s, t, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
    g_got = torch.autograd.grad(got, s)
    g_ref = torch.autograd.grad(logits_literal(s, t, **kw), s)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("kw", [{}, {"head": "softmax"}, {"weights": "mask"}, {"temperature": 0.5}])
def test_logits_loss_matches_literal_flat(kw):
    s, t = _logits([(3, 10, 5), (3, 4, 5)])
    got = MaskedLogitsLoss(**kw)(s, t)
    torch.testing.assert_close(got, logits_literal(s, t, **kw), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kw", [{}, {"region_scales": (1, 2)}, {"weights": "mask"}])
def test_logits_loss_feature_guidance(kw):
    s, t = _logits([(2, 6, 4, 5), (2, 6, 2, 2)])
    fs, ft = _logits([(2, 3, 4, 5), (2, 3, 2, 2)], seed=1)
    got = MaskedLogitsLoss(guidance="feature", **kw)(s, t, fs, ft)
    ref = logits_literal(s, t, guidance="feature", s_feats=fs, t_feats=ft, **kw)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
    # flattened (N, H*W*A, K) logits ordered (h, w, a) take the same weights per anchor
    flat_s = [z.reshape(2, 2, 3, *z.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(2, -1, 3) for z in s]
    flat_t = [z.reshape(2, 2, 3, *z.shape[-2:]).permute(0, 3, 4, 1, 2).reshape(2, -1, 3) for z in t]
    got_flat = MaskedLogitsLoss(guidance="feature", **kw)(flat_s, flat_t, fs, ft)
    ref_flat = logits_literal(flat_s, flat_t, guidance="feature", s_feats=fs, t_feats=ft, **kw)
    torch.testing.assert_close(got_flat, ref_flat, rtol=1e-10, atol=1e-14)


def test_logits_loss_single_tensor_equals_one_level_list():
    s, t = _logits([(2, 6, 4, 4)])
    mod = MaskedLogitsLoss()
    torch.testing.assert_close(mod(s[0], t[0]), mod(s, t))


def test_logits_mask_weights_at_ratio_one_keep_every_position():
    """``ratio_l=1`` (a fraction kept) is the loss with every weight 1: ``"soft"`` weights at an
    infinite temperature, i.e. the unweighted mean of the per-position KL."""
    g = torch.Generator().manual_seed(4)
    zs, zt = torch.randn(2, 6, 5, 3, generator=g), torch.randn(2, 6, 5, 3, generator=g)
    every = MaskedLogitsLoss(weights="mask", ratio_l=1.0)(zs, zt)
    flat = MaskedLogitsLoss(weights="soft", tau_w=1e9)(zs, zt)
    torch.testing.assert_close(every, flat, rtol=1e-5, atol=1e-7)
    assert float(MaskedLogitsLoss(weights="mask", ratio_l=0.0)(zs, zt)) == 0.0


def test_logits_loss_zero_when_equal_and_teacher_gets_no_gradient():
    s, t = _logits([(2, 6, 4, 4)])
    mod = MaskedLogitsLoss()
    assert mod(t, t).item() == 0.0
    tt = t[0].clone().requires_grad_(True)
    ss = s[0].clone().requires_grad_(True)
    mod(ss, tt).backward()
    assert tt.grad is None and ss.grad.abs().sum() > 0


def test_logits_gradient_ignores_weight_dependence():
    """W is detached: the gradient is that of sum(W * KL) with W held fixed."""
    s, t = _logits([(2, 6, 3, 3)])
    ss = s[0].clone().requires_grad_(True)
    MaskedLogitsLoss()(ss, t[0]).backward()
    d = (torch.sigmoid(t[0]) - torch.sigmoid(s[0])).abs().mean(dim=1).reshape(2, 9)
    w = 9 * torch.softmax(d / 0.1, dim=1)
    ss2 = s[0].clone().requires_grad_(True)
    p, q = torch.sigmoid(t[0]), torch.sigmoid(ss2)
    kl = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum(dim=1).reshape(2, 9)
    ((w * kl).sum() / (2 * 9)).backward()
    torch.testing.assert_close(ss.grad, ss2.grad)


# ---------------------------------------------------------------- FAMKDLoss


LEVELS = [(8, 8), (4, 4), (2, 2), (1, 1)]


def _famkd_inputs(cs=4, ct=6, a_k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = [torch.randn(2, cs, h, w, generator=g, dtype=D64) for h, w in LEVELS]
    t = [torch.randn(2, ct, h, w, generator=g, dtype=D64) for h, w in LEVELS]
    zs = [torch.randn(2, a_k, h, w, generator=g, dtype=D64) for h, w in LEVELS]
    zt = [torch.randn(2, a_k, h, w, generator=g, dtype=D64) for h, w in LEVELS]
    return s, t, zs, zt


def test_famkd_equals_sum_of_parts():
    s, t, zs, zt = _famkd_inputs()
    kd = _perturb_params(FAMKDLoss([4] * 4, [6] * 4, **FULL_METHOD).double())
    total = kd(s, t, zs, zt)
    feat = sum(feature_level_literal(m, a, b) for m, a, b in zip(kd.feature_losses, s, t))
    logit = MaskedLogitsLoss()(zs, zt)
    torch.testing.assert_close(total, feat + logit, rtol=1e-10, atol=1e-14)
    terms = kd.last_terms()
    torch.testing.assert_close(terms["logits"], logit)
    torch.testing.assert_close(terms["feature"], feat)
    torch.testing.assert_close(terms["total"], total.detach())
    for lvl in range(4):
        per_scale = [v for k, v in terms.items() if k.startswith(f"feature/level{lvl}/scale")]
        torch.testing.assert_close(sum(per_scale), terms[f"feature/level{lvl}"])
    assert "feature/level3/scale2" not in terms and "feature/level0/scale4" in terms
    torch.testing.assert_close(sum(terms[f"logits/level{i}"] for i in range(4)), logit)
    assert all(not v.requires_grad for v in terms.values())


def test_famkd_feature_only():
    s, t, _, _ = _famkd_inputs()
    kd = FAMKDLoss([4] * 4, [6] * 4, **FULL_METHOD).double()
    total = kd(s, t)
    assert "logits" not in kd.last_terms()
    torch.testing.assert_close(total, kd.last_terms()["feature"])


def test_famkd_feature_guidance_uses_aligned_student():
    s, t, zs, zt = _famkd_inputs()
    kd = FAMKDLoss([4] * 4, [6] * 4, guidance="feature", **FULL_METHOD).double()
    total = kd(s, t, zs, zt)
    aligned = [m.align(a) for m, a in zip(kd.feature_losses, s)]
    ref = logits_literal(zs, zt, guidance="feature", s_feats=aligned, t_feats=t)
    torch.testing.assert_close(kd.last_terms()["logits"], ref.detach())
    torch.testing.assert_close(total.detach(), kd.last_terms()["feature"] + ref.detach())


def test_famkd_passes_options_through():
    kd = FAMKDLoss(
        [4, 4],
        [8, 8],
        scales=(1, 2),
        mask_mode="sample",
        ratio_sp=0.3,
        tau=0.7,
        head="softmax",
        num_classes=3,
        beta=2.0,
        tau_w=0.5,
        seed=11,
        branches=("spatial", "channel"),
    )
    f0, f1 = kd.feature_losses
    assert f0.scales == (1, 2) and f0.mask_mode == "sample" and f0.ratio_sp == 0.3 and f0.tau == 0.7
    assert f0.seed == 11 and f1.seed == 12
    assert kd.logits_loss.head == "softmax" and kd.logits_loss.beta == 2.0 and kd.logits_loss.tau_w == 0.5
    assert len(kd.fusion_weights()) == 2 and kd.fusion_weights()[0].shape == (2, 2)


def test_famkd_defaults_are_the_ablations_and_full_method_restores_the_parts():
    kd, full = FAMKDLoss([4], [8]), FAMKDLoss([4], [8], **FULL_METHOD)
    f = kd.feature_losses[0]
    chosen = (f.scales, f.mask_mode, f.ratio_sp, f.ratio_ch, f.branches)
    assert chosen == ((1,), "topk_nonsalient", 0.5, 0.25, ("channel",))
    assert kd.logits_loss.weights == "mask" and kd.logits_loss.guidance == "logit"
    part, logits_part = ScaleAwareMaskedFeatureLoss(4, 8), MaskedLogitsLoss()
    g = full.feature_losses[0]
    for name in ("scales", "mask_mode", "ratio_sp", "ratio_ch", "branches"):
        assert getattr(g, name) == getattr(part, name)
    assert full.logits_loss.weights == logits_part.weights


def test_famkd_gradients():
    s, t, zs, zt = _famkd_inputs()
    s = [x.float().requires_grad_(True) for x in s]
    t = [x.float().requires_grad_(True) for x in t]
    zs = [x.float().requires_grad_(True) for x in zs]
    zt = [x.float().requires_grad_(True) for x in zt]
    kd = FAMKDLoss([4] * 4, [6] * 4, **FULL_METHOD)
    kd(s, t, zs, zt).backward()
    assert all(x.grad is None for x in t + zt)
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in s + zs)
    assert all(p.grad is not None for p in kd.parameters())
