"""The reference functions against hand computations, their properties, and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

import famkd_losses.functional as FK


def _rand64(*shape, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


# ---------------------------------------------------------------- attention


def test_spatial_attention_hand_computed():
    # one image, 2 channels, 1x2 map: mean_c|T| = [(1+3)/2, (|-2|+0)/2] = [2, 1]
    t = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]], dtype=torch.float64)
    tau = 0.5
    e0, e1 = math.exp(2 / tau), math.exp(1 / tau)
    expected = torch.tensor([[[[2 * e0 / (e0 + e1), 2 * e1 / (e0 + e1)]]]], dtype=torch.float64)
    torch.testing.assert_close(FK.spatial_attention(t, tau), expected)
    # channel: mean_hw|T| = [1.5, 1.5] -> equal weights
    torch.testing.assert_close(FK.channel_attention(t, tau), torch.ones(1, 2, 1, 1, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 5, 7), (3, 17, 1, 9), (2, 64, 13, 21)])
@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_attention_means_are_one(shape, tau):
    t = torch.randn(shape) * 3
    a_sp, a_ch = FK.teacher_attention(t, tau)
    assert a_sp.shape == (shape[0], 1, *shape[2:]) and a_ch.shape == (*shape[:2], 1, 1)
    torch.testing.assert_close(a_sp.mean(dim=(1, 2, 3)), torch.ones(shape[0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(a_ch.mean(dim=(1, 2, 3)), torch.ones(shape[0]), rtol=0, atol=1e-5)
    assert (a_sp > 0).all() and (a_ch > 0).all()


def test_attention_is_float32_for_half_inputs():
    t = torch.randn(2, 4, 3, 3).to(torch.bfloat16)
    a_sp, a_ch = FK.teacher_attention(t, 0.5)
    assert a_sp.dtype == torch.float32 and a_ch.dtype == torch.float32
    ref_sp, ref_ch = FK.teacher_attention(t.float(), 0.5)
    torch.testing.assert_close(a_sp, ref_sp)
    torch.testing.assert_close(a_ch, ref_ch)


def test_attention_gradcheck():
    x = _rand64(2, 3, 4, 5, grad=True)
    assert gradcheck(lambda v: FK.spatial_attention(v, 0.7), (x,))
    assert gradcheck(lambda v: FK.channel_attention(v, 0.7), (x,))


# ---------------------------------------------------------------- masks


@pytest.mark.parametrize(
    ("count", "ratio", "k"), [(10, 0.65, 7), (1, 0.65, 1), (1, 0.4, 0), (4, 0.5, 2), (5, 0.5, 3), (3, 0.0, 0)]
)
def test_num_masked_rounds_half_up(count, ratio, k):
    assert FK.num_masked(count, ratio) == k


def test_topk_mask_ties_break_on_lower_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 2.0, 2.0, 2.0]])
    m = FK.topk_mask(scores, 0.5)
    assert m.tolist() == [[0, 0, 1, 1], [1, 0, 0, 1]]
    m_low = FK.topk_mask(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), 0.5, largest=False)
    assert m_low.tolist() == [[1, 0, 0, 1]]


def test_topk_mask_hides_largest():
    scores = torch.tensor([[0.3, 0.9, 0.1, 0.5, 0.7]])
    assert FK.topk_mask(scores, 0.4).tolist() == [[1, 0, 1, 1, 0]]
    assert FK.topk_mask(scores, 0.4, largest=False).tolist() == [[0, 1, 0, 1, 1]]


@pytest.mark.parametrize("mode", FK.MASK_MODES)
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.65, 0.99])
def test_masks_hide_exact_count(mode, ratio):
    t = torch.randn(3, 7, 5, 9)
    g = torch.Generator().manual_seed(1)
    sp = FK.spatial_mask(t, ratio, mode, 0.5, g)
    ch = FK.channel_mask(t, ratio, mode, 0.5, g)
    assert sp.shape == (3, 1, 5, 9) and ch.shape == (3, 7, 1, 1)
    assert set(sp.unique().tolist()) <= {0.0, 1.0}
    assert ((sp == 0).sum(dim=(1, 2, 3)) == FK.num_masked(45, ratio)).all()
    assert ((ch == 0).sum(dim=(1, 2, 3)) == FK.num_masked(7, ratio)).all()


def test_topk_spatial_mask_hides_most_salient_positions():
    t = torch.zeros(1, 2, 2, 2)
    t[0, :, 1, 0] = 5.0  # most salient
    t[0, :, 0, 1] = -3.0  # second (|.|)
    m = FK.spatial_mask(t, 0.5, "topk")
    assert m[0, 0].tolist() == [[1, 0], [0, 1]]
    m2 = FK.spatial_mask(t, 0.5, "topk_nonsalient")
    assert m2[0, 0].tolist() == [[0, 1], [1, 0]]


def test_sample_mode_follows_attention():
    # two positions whose softmax(score / tau) is 0.75 / 0.25; hide one of them
    tau = 0.5
    scores = torch.tensor([[math.log(3.0) * tau, 0.0]]).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    m = FK.select_mask(scores, 0.5, "sample", tau, g)
    freq_first = (m[:, 0] == 0).float().mean().item()
    assert abs(freq_first - 0.75) < 0.015
    assert ((m == 0).sum(dim=1) == 1).all()


def test_random_modes_are_seeded_and_fresh():
    t = torch.randn(2, 4, 6, 6)
    a = FK.spatial_mask(t, 0.5, "random", generator=torch.Generator().manual_seed(3))
    b = FK.spatial_mask(t, 0.5, "random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(3)
    c1 = FK.spatial_mask(t, 0.5, "random", generator=g)
    c2 = FK.spatial_mask(t, 0.5, "random", generator=g)
    assert not torch.equal(c1, c2)


def test_random_mode_is_uniform():
    scores = torch.zeros(20000, 4)
    m = FK.select_mask(scores, 0.25, "random", generator=torch.Generator().manual_seed(0))
    freq = (m == 0).float().mean(dim=0)
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.015)


def test_bernoulli_mask_probability():
    m = FK.bernoulli_mask((4000, 1, 10, 10), 0.65, torch.Generator().manual_seed(0))
    assert abs((m == 0).float().mean().item() - 0.65) < 0.01


# ---------------------------------------------------------------- pyramid


def test_max_pool_ceil_mode_hand_computed():
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    y = FK.max_pool(x, 2)
    assert y.shape == (1, 1, 3, 3)
    assert y[0, 0].tolist() == [[6, 8, 9], [16, 18, 19], [21, 23, 24]]
    assert FK.max_pool(x, 1) is x


def test_active_scales_and_pyramid():
    assert FK.active_scales(7, 11, (1, 2, 4)) == (1, 2, 4)
    assert FK.active_scales(3, 11, (1, 2, 4)) == (1, 2)
    assert FK.active_scales(1, 1, (1, 2, 4)) == (1,)
    pyr = FK.maxpool_pyramid(torch.randn(2, 3, 9, 5), (1, 2, 4, 8))
    assert [(s, tuple(p.shape)) for s, p in pyr] == [(1, (2, 3, 9, 5)), (2, (2, 3, 5, 3)), (4, (2, 3, 3, 2))]


def test_blockwise_upsample_inverts_grid():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    up = FK.blockwise_upsample(x, 2, (3, 4))
    assert up.tolist() == [[[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4]]]


def test_max_pool_gradcheck():
    x = _rand64(2, 3, 5, 7, grad=True)
    assert gradcheck(lambda v: FK.max_pool(v, 2), (x,))
    assert gradcheck(lambda v: FK.max_pool(v, 4), (x,))


# ---------------------------------------------------------------- reconstruction


def test_fuse_reconstructions_and_error():
    r1, r2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    theta = torch.tensor([0.3, -0.2])
    w = torch.softmax(theta, 0)
    torch.testing.assert_close(FK.fuse_reconstructions([r1, r2], theta), w[0] * r1 + w[1] * r2)
    torch.testing.assert_close(FK.fuse_reconstructions([r1]), r1)
    t = torch.randn(2, 3, 4, 4)
    wt = torch.rand(2, 1, 4, 4)
    torch.testing.assert_close(FK.reconstruction_error(r1, t), ((r1 - t) ** 2).sum() / 2)
    torch.testing.assert_close(FK.reconstruction_error(r1, t, wt), (wt * (r1 - t) ** 2).sum() / 2)
    with pytest.raises(ValueError, match="fusion_logits"):
        FK.fuse_reconstructions([r1, r2], torch.zeros(3))


def test_reconstruction_gradcheck():
    r1, r2 = _rand64(2, 3, 4, 5, grad=True), _rand64(2, 3, 4, 5, grad=True, seed=1)
    theta = _rand64(2, grad=True, seed=2)
    t = _rand64(2, 3, 4, 5, seed=3)
    w = _rand64(2, 1, 4, 5, seed=4).abs()
    assert gradcheck(
        lambda a, b, th: FK.reconstruction_error(FK.fuse_reconstructions([a, b], th), t, w), (r1, r2, theta)
    )


# ---------------------------------------------------------------- KL


def test_binary_kl_matches_definition_and_is_zero_iff_equal():
    s = torch.randn(5, 7, dtype=torch.float64) * 3
    t = torch.randn(5, 7, dtype=torch.float64) * 3
    for temp in (1.0, 2.0):
        p, q = torch.sigmoid(t / temp), torch.sigmoid(s / temp)
        ref = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
        torch.testing.assert_close(FK.binary_kl(s, t, temp), ref)
    assert (FK.binary_kl(s, t) >= 0).all()
    assert torch.equal(FK.binary_kl(t, t), torch.zeros_like(t))
    assert (FK.binary_kl(s, t)[s != t] > 0).all()


def test_binary_kl_is_stable_for_large_logits():
    s = torch.tensor([-100.0, 100.0, 30.0])
    t = torch.tensor([100.0, -100.0, 30.0])
    kl = FK.binary_kl(s, t)
    assert torch.isfinite(kl).all()
    # p = 1, q = e^-100: KL = -log q = 100
    torch.testing.assert_close(kl, torch.tensor([100.0, 100.0, 0.0]))


def test_softmax_kl_matches_kl_div():
    s = torch.randn(6, 11, dtype=torch.float64)
    t = torch.randn(6, 11, dtype=torch.float64)
    for temp in (1.0, 4.0):
        ref = F.kl_div(F.log_softmax(s / temp, -1), F.softmax(t / temp, -1), reduction="none").sum(-1)
        torch.testing.assert_close(FK.softmax_kl(s, t, temp), ref)
    assert (FK.softmax_kl(s, t) > 0).all()
    torch.testing.assert_close(FK.softmax_kl(t, t), torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)
    # shifting the student's logits by a constant is no change of distribution
    torch.testing.assert_close(FK.softmax_kl(t + 5, t), torch.zeros(6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_kl_gradcheck():
    s, t = _rand64(3, 4, 2, grad=True), _rand64(3, 4, 2, seed=1)
    assert gradcheck(lambda v: FK.binary_kl(v, t, 1.5), (s,))
    assert gradcheck(lambda v: FK.softmax_kl(v, t, 1.5, dim=1), (s,))


# ---------------------------------------------------------------- logits layouts and guidance


def test_to_positions_layout():
    n, a, k, h, w = 2, 3, 4, 2, 5
    z = torch.randn(n, a * k, h, w)
    pos = FK.to_positions(z, num_classes=k)
    assert pos.shape == (n, h * w, a, k)
    assert pos[1, 1 * w + 3, 2, 1] == z[1, 2 * k + 1, 1, 3]
    flat = torch.randn(n, 7, k)
    assert FK.to_positions(flat).shape == (n, 7, 1, k)


def test_position_kl_and_prob_diff():
    zs, zt = torch.randn(2, 6, 3, 4, dtype=torch.float64), torch.randn(2, 6, 3, 4, dtype=torch.float64)
    kl = FK.position_kl(zs, zt, head="sigmoid", temperature=2.0)
    ref = FK.binary_kl(zs, zt, 2.0).sum(dim=1).reshape(2, 12)
    torch.testing.assert_close(kl, ref)
    d = FK.position_prob_diff(zs, zt, temperature=2.0)
    torch.testing.assert_close(d, (torch.sigmoid(zt / 2) - torch.sigmoid(zs / 2)).abs().mean(dim=1).reshape(2, 12))
    kls = FK.position_kl(zs, zt, head="softmax", num_classes=3)
    ref_s = FK.softmax_kl(zs.reshape(2, 2, 3, 3, 4), zt.reshape(2, 2, 3, 3, 4), dim=2).sum(dim=1).reshape(2, 12)
    torch.testing.assert_close(kls, ref_s)


def test_weighted_kl_sum_gradcheck():
    zs, zt = _rand64(2, 6, 3, 3, grad=True), _rand64(2, 6, 3, 3, seed=1)
    w = _rand64(2, 9, grad=True, seed=2).abs()
    for head, k in (("sigmoid", None), ("softmax", 3)):
        assert gradcheck(
            lambda a, ww, head=head, k=k: FK.weighted_kl_sum(a, zt, ww, head=head, temperature=1.3, num_classes=k),
            (zs, w),
        )
    flat_s, flat_t = _rand64(2, 5, 4, grad=True), _rand64(2, 5, 4, seed=3)
    assert gradcheck(lambda a: FK.weighted_kl_sum(a, flat_t, w[:, :5], head="softmax"), (flat_s,))


def test_guidance_weights():
    d = torch.tensor([[0.1, 0.4, 0.2, 0.4]])
    soft = FK.soft_weights(d, 0.1)
    torch.testing.assert_close(soft, 4 * torch.softmax(d / 0.1, dim=1))
    torch.testing.assert_close(soft.mean(), torch.tensor(1.0))
    assert FK.mask_weights(d, 0.5).tolist() == [[0, 1, 0, 1]]
    assert FK.mask_weights(d, 0.25).tolist() == [[0, 1, 0, 0]]
    assert FK.guidance_weights(d.requires_grad_(), "soft").requires_grad is False
    with pytest.raises(ValueError, match="weights"):
        FK.guidance_weights(d, "hard")


def test_region_aware_guidance_hand_computed():
    d = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]])
    # scale 1: d; scale 2: windows {0:2,0:2}->1, {0:2,2}->0, {2,0:2}->0, {2,2}->2
    s2 = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 2.0]]])
    torch.testing.assert_close(FK.region_aware_guidance(d, (1, 2)), (d + s2) / 2)
    # scale 4 does not fit a 3x3 map and is skipped
    torch.testing.assert_close(FK.region_aware_guidance(d, (1, 2, 4)), (d + s2) / 2)
    torch.testing.assert_close(FK.region_aware_guidance(d, (4,)), d)


def test_feature_guidance_and_gradcheck():
    s, t = _rand64(2, 5, 3, 4, grad=True), _rand64(2, 5, 3, 4, seed=1)
    torch.testing.assert_close(FK.feature_guidance(s, t), ((t - s) ** 2).mean(dim=1))
    assert gradcheck(lambda v: FK.feature_guidance(v, t), (s,))
    d = _rand64(2, 5, 6, grad=True, seed=2)
    assert gradcheck(lambda v: FK.region_aware_guidance(v, (1, 2, 4)), (d,))
    assert gradcheck(lambda v: FK.soft_weights(v.reshape(2, -1), 0.3), (d,))
    assert gradcheck(lambda v, u: FK.position_prob_diff(v, u, temperature=2.0), (s, _rand64(2, 5, 3, 4, seed=4)))


# ---------------------------------------------------------------- box masks


def test_box_masks_hand_computed():
    # 4x4 map over a 32x32 image: a cell is 8 px.
    boxes = [torch.tensor([[0.0, 0.0, 8.0, 8.0]]), torch.zeros(0, 4)]
    fg, bg = FK.box_masks(boxes, (4, 4), (32, 32))
    # x: floor(0)=0, ceil(1)=1 -> columns 0..1, rows 0..1: area 1/4
    expected = torch.zeros(4, 4)
    expected[0:2, 0:2] = 0.25
    torch.testing.assert_close(fg[0, 0], expected)
    torch.testing.assert_close(bg[0, 0], (expected == 0).float() / 12)
    assert torch.equal(fg[1], torch.zeros(1, 4, 4))
    torch.testing.assert_close(bg[1], torch.full((1, 4, 4), 1 / 16))


def test_box_masks_exact_cell_edges():
    # x2 = 24 * 168 / 1344 = 3 exactly (float32's 24 / 1344 * 168 is 3.0000002, which ceils to 4)
    fg, _ = FK.box_masks([torch.tensor([[0.0, 0.0, 24.0, 8.0]])], (1, 168), (8, 1344))
    assert fg[0, 0, 0, :5].tolist() == [0.125] * 4 + [0.0]  # columns 0..3, rows 0..1 (unclipped): 1/8


# ---------------------------------------------------------------- PKD / CWD pieces


def test_standardize_channels():
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64) * 4 + 2
    y = FK.standardize_channels(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(4, dtype=torch.float64), rtol=1e-5, atol=0)


def test_pkd_cwd_gradcheck():
    s, t = _rand64(2, 3, 4, 5, grad=True), _rand64(2, 3, 4, 5, seed=1)
    assert gradcheck(lambda v: FK.pearson_loss(v, t), (s,))
    assert gradcheck(lambda v: FK.channel_wise_divergence(v, t, 2.0), (s,))
    assert gradcheck(lambda v: FK.standardize_channels(v), (s,))
