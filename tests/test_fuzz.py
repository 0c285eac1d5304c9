"""Shape fuzzing with hypothesis: batch 1, 1x1 maps, odd sizes, levels smaller than the largest
scale, channels that are not powers of two, Cs != Ct. At least 200 examples per loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _literal import feature_level_literal, logits_literal
from hypothesis import given, settings
from hypothesis import strategies as st

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

D64 = torch.float64
batch = st.integers(1, 3)
chans = st.integers(1, 13)
side = st.integers(1, 11)
scales = st.lists(st.integers(1, 5), min_size=1, max_size=3, unique=True).map(tuple)
ratio = st.floats(0.0, 0.95)
seed = st.integers(0, 2**31 - 1)


def _randn(g, *shape, dtype=D64):
    return torch.randn(*shape, generator=g, dtype=dtype)


@settings(max_examples=200)
@given(
    n=batch,
    cs=chans,
    ct=chans,
    h=side,
    w=side,
    scales=scales,
    mode=st.sampled_from(["topk", "topk_nonsalient"]),
    branches=st.sampled_from([("spatial", "channel"), ("spatial",), ("channel",)]),
    weighting=st.sampled_from(["none", "attention"]),
    ratio_sp=ratio,
    ratio_ch=ratio,
    seed=seed,
)
def test_fuzz_feature_loss(n, cs, ct, h, w, scales, mode, branches, weighting, ratio_sp, ratio_ch, seed):
    torch.manual_seed(seed % 1000)
    mod = ScaleAwareMaskedFeatureLoss(
        cs,
        ct,
        scales=scales,
        mask_mode=mode,
        branches=branches,
        weighting=weighting,
        ratio_sp=ratio_sp,
        ratio_ch=ratio_ch,
    ).double()
    g = torch.Generator().manual_seed(seed)
    s = _randn(g, n, cs, h, w).requires_grad_(True)
    t = _randn(g, n, ct, h, w).requires_grad_(True)
    loss = mod(s, t)
    torch.testing.assert_close(loss, feature_level_literal(mod, s, t), rtol=1e-10, atol=1e-14)
    assert loss.dtype == D64 and loss.item() >= 0
    loss.backward()
    assert t.grad is None and s.grad is not None and s.grad.shape == s.shape


@settings(max_examples=60)
@given(
    n=batch, cs=chans, ct=chans, h=side, w=side, scales=scales, mode=st.sampled_from(["sample", "random"]), seed=seed
)
def test_fuzz_feature_loss_random_modes(n, cs, ct, h, w, scales, mode, seed):
    mod = ScaleAwareMaskedFeatureLoss(cs, ct, scales=scales, mask_mode=mode, seed=seed)
    g = torch.Generator().manual_seed(seed)
    s = _randn(g, n, cs, h, w, dtype=torch.float32).requires_grad_(True)
    t = _randn(g, n, ct, h, w, dtype=torch.float32)
    loss = mod(s, t)
    assert torch.isfinite(loss) and loss.dtype == torch.float32 and loss.item() >= 0
    loss.backward()
    assert torch.isfinite(s.grad).all()


def _level_sizes(draw_sizes, levels):
    return [draw_sizes[i] for i in range(levels)]


@settings(max_examples=200)
@given(
    n=batch,
    levels=st.integers(1, 3),
    cs=chans,
    ct=chans,
    sizes=st.lists(st.tuples(side, side), min_size=3, max_size=3),
    a=st.integers(1, 3),
    k=st.integers(1, 5),
    head=st.sampled_from(["sigmoid", "softmax"]),
    guidance=st.sampled_from(["logit", "feature"]),
    seed=seed,
)
def test_fuzz_famkd(n, levels, cs, ct, sizes, a, k, head, guidance, seed):
    torch.manual_seed(seed % 1000)
    sizes = sizes[:levels]
    kd = FAMKDLoss([cs] * levels, [ct] * levels, head=head, guidance=guidance, num_classes=k, **FULL_METHOD).double()
    g = torch.Generator().manual_seed(seed)
    s = [_randn(g, n, cs, h, w).requires_grad_(True) for h, w in sizes]
    t = [_randn(g, n, ct, h, w) for h, w in sizes]
    zs = [_randn(g, n, a * k, h, w).requires_grad_(True) for h, w in sizes]
    zt = [_randn(g, n, a * k, h, w) for h, w in sizes]
    total = kd(s, t, zs, zt)
    feat = sum(feature_level_literal(m, x, y) for m, x, y in zip(kd.feature_losses, s, t))
    aligned = [m.align(x) for m, x in zip(kd.feature_losses, s)]
    logit = logits_literal(zs, zt, head=head, guidance=guidance, num_classes=k, s_feats=aligned, t_feats=t)
    torch.testing.assert_close(total, feat + logit, rtol=1e-9, atol=1e-13)
    total.backward()
    assert all(x.grad is not None and torch.isfinite(x.grad).all() for x in s + zs)


@settings(max_examples=200)
@given(
    n=batch,
    h=st.integers(1, 7),
    w=st.integers(1, 7),
    a=st.integers(1, 3),
    k=st.integers(1, 5),
    head=st.sampled_from(["sigmoid", "softmax"]),
    weights=st.sampled_from(["soft", "mask"]),
    region=st.sampled_from([None, (1, 2), (2, 3, 4)]),
    temperature=st.floats(0.25, 4.0),
    ratio_l=ratio,
    flat=st.booleans(),
    seed=seed,
)
def test_fuzz_logits_loss(n, h, w, a, k, head, weights, region, temperature, ratio_l, flat, seed):
    g = torch.Generator().manual_seed(seed)
    kw = {"head": head, "weights": weights, "temperature": temperature, "ratio_l": ratio_l, "num_classes": k}
    if flat:
        zs = _randn(g, n, h * w * a, k).requires_grad_(True)
        zt = _randn(g, n, h * w * a, k)
    else:
        zs = _randn(g, n, a * k, h, w).requires_grad_(True)
        zt = _randn(g, n, a * k, h, w)
        kw["region_scales"] = region
    loss = MaskedLogitsLoss(**kw)(zs, zt)
    torch.testing.assert_close(loss, logits_literal([zs], [zt], **kw), rtol=1e-9, atol=1e-13)
    assert loss.item() >= -1e-12
    loss.backward()
    assert torch.isfinite(zs.grad).all()


@settings(max_examples=200)
@given(n=batch, cs=chans, ct=chans, h=side, w=side, r=ratio, mask=st.sampled_from(["spatial", "channel"]), seed=seed)
def test_fuzz_mgd(n, cs, ct, h, w, r, mask, seed):
    mod = MGDLoss(cs, ct, ratio=r, mask=mask, seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    s = _randn(g, n, cs, h, w).requires_grad_(True)
    t = _randn(g, n, ct, h, w).requires_grad_(True)
    loss = mod(s, t)
    # the same draw, transcribed: M = 0 where u > 1 - ratio
    u = torch.rand((n, 1, h, w) if mask == "spatial" else (n, ct, 1, 1), generator=torch.Generator().manual_seed(seed))
    m = (u <= 1 - r).to(D64)
    ref = 2e-5 * ((mod.generation(mod.align(s) * m) - t) ** 2).sum() / n
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-16)
    loss.backward()
    assert t.grad is None and torch.isfinite(s.grad).all()


boxes_st = st.lists(
    st.tuples(st.floats(0, 60), st.floats(0, 60), st.floats(0.5, 40), st.floats(0.5, 40)), min_size=0, max_size=4
)


@settings(max_examples=200)
@given(
    n=batch,
    cs=chans,
    ct=st.integers(2, 13),
    h=side,
    w=side,
    boxes=st.lists(boxes_st, min_size=3, max_size=3),
    seed=seed,
)
def test_fuzz_fgd(n, cs, ct, h, w, boxes, seed):
    torch.manual_seed(seed % 1000)
    mod = FGDLoss(cs, ct).double()
    g = torch.Generator().manual_seed(seed)
    s = _randn(g, n, cs, h, w).requires_grad_(True)
    t = _randn(g, n, ct, h, w).requires_grad_(True)
    bx = [
        torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in boxes[i]], dtype=D64).reshape(-1, 4) for i in range(n)
    ]
    loss = mod(s, t, bx, (64, 64))
    assert torch.isfinite(loss) and loss.item() >= 0
    # fg and bg parts with alpha == beta: every background cell weighs 1/count, fg cells their box weight
    loss.backward()
    assert t.grad is None and torch.isfinite(s.grad).all()
    cl = mod(s.detach().contiguous(memory_format=torch.channels_last), t.detach(), bx, (64, 64))
    torch.testing.assert_close(cl, loss.detach())


@settings(max_examples=200)
@given(n=batch, c=chans, h=side, w=side, hs=side, ws=side, seed=seed)
def test_fuzz_pkd(n, c, h, w, hs, ws, seed):
    if n * h * w < 2:
        return
    g = torch.Generator().manual_seed(seed)
    t = _randn(g, n, c, h, w)
    s = _randn(g, n, c, hs, ws).requires_grad_(True)
    loss = PKDLoss()(s, t)
    s_r = F.interpolate(s, size=(h, w), mode="bilinear", align_corners=False)

    def norm(x):
        x = x.transpose(0, 1).reshape(c, -1)
        return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-6)

    ref = ((norm(s_r) - norm(t)) ** 2).mean() / 2
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    # an affine copy of the teacher (positive scale per channel) is a perfect student
    scale = torch.rand(1, c, 1, 1, generator=g, dtype=D64) + 0.5
    assert PKDLoss()(t * scale + 3.0, t).item() < 1e-9


@settings(max_examples=200)
@given(n=batch, c=chans, h=side, w=side, tau=st.floats(0.2, 5.0), seed=seed)
def test_fuzz_cwd(n, c, h, w, tau, seed):
    g = torch.Generator().manual_seed(seed)
    s = _randn(g, n, c, h, w).requires_grad_(True)
    t = _randn(g, n, c, h, w)
    loss = CWDLoss(tau=tau)(s, t)
    p = torch.softmax(t.reshape(n, c, -1) / tau, -1)
    logq = torch.log_softmax(s.reshape(n, c, -1) / tau, -1)
    ref = (p * (torch.log(p) - logq)).sum() * tau**2 / (n * c)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-12)
    assert CWDLoss(tau=tau)(t, t).abs().item() < 1e-12
    loss.backward()
    assert torch.isfinite(s.grad).all()


@settings(max_examples=200)
@given(
    shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
    mode=st.sampled_from(["softmax", "sigmoid"]),
    tau=st.floats(0.2, 5.0),
    seed=seed,
)
def test_fuzz_kd(shape, mode, tau, seed):
    g = torch.Generator().manual_seed(seed)
    s = _randn(g, *shape).requires_grad_(True)
    t = _randn(g, *shape)
    loss = KDLoss(tau=tau, mode=mode, class_dim=-1)(s, t)
    if mode == "softmax":
        p = torch.softmax(t / tau, -1)
        kl = (p * (torch.log(p) - torch.log_softmax(s / tau, -1))).sum(-1)
    else:
        p, q = torch.sigmoid(t / tau), torch.sigmoid(s / tau)
        kl = (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum(-1)
    torch.testing.assert_close(loss, tau**2 * kl.mean(), rtol=1e-10, atol=1e-12)
    loss.backward()
    assert torch.isfinite(s.grad).all()
