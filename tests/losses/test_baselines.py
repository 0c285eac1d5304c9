"""The related losses (MGD, FGD, PKD, CWD, KD) against literal transcriptions of their
published formulas (method.md sections 1, 2, 2b, 2c).

Every reference below is written out in this file with loops or plain torch ops, in float64;
none of them calls ``famkd_losses.functional``. The modules are run in float64 too
(``module.double()``), so values and gradients can be compared with tight tolerances.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from famkd_losses import CWDLoss, FGDLoss, KDLoss, MGDLoss, PKDLoss
from famkd_losses.functional import box_masks

F64 = torch.float64
RTOL = 1e-5


def randn(*shape: int, seed: int, requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64).requires_grad_(requires_grad)


def close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL) -> None:
    """rtol-close, with an absolute floor scaled to the largest expected entry."""
    expected = expected.detach().to(F64)
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual.detach().to(F64), expected, rtol=rtol, atol=rtol * scale + 1e-12)


def randomize_(module: nn.Module, seed: int, std: float = 0.5) -> nn.Module:
    """Every parameter to fresh N(0, std^2) values (zero-initialised layers become live)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def compare_grads(
    loss_mod: torch.Tensor, loss_ref: torch.Tensor, inputs: list[torch.Tensor], vanishing: tuple = ()
) -> None:
    """Gradients of the module's loss and of the transcription agree for every input.

    ``vanishing``: inputs whose gradient is zero in exact arithmetic (a softmax logit bias);
    there both must be zero up to rounding.
    """
    g_mod = torch.autograd.grad(loss_mod, inputs, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad(loss_ref, inputs, retain_graph=True, allow_unused=True)
    for i, (x, a, b) in enumerate(zip(inputs, g_mod, g_ref)):
        assert b is not None, f"reference has no gradient for input {i}"
        assert a is not None, f"module gives no gradient for input {i}"
        if any(x is v for v in vanishing):
            assert a.abs().max() < 1e-9 and b.abs().max() < 1e-9
            continue
        assert b.abs().max() > 0, f"reference gradient of input {i} is all zero; the check would be vacuous"
        close(a, b)


def check_teacher_untouched(loss: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> None:
    """Backward reaches the student and never the teacher (the losses detach it)."""
    assert t.requires_grad
    loss.backward()
    assert s.grad is not None and s.grad.abs().max() > 0
    assert t.grad is None


# --------------------------------------------------------------------------------------
# Literal transcriptions
# --------------------------------------------------------------------------------------


def attention_literal(feat: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """method.md 1: A_sp = H*W softmax_hw(mean_c |F| / tau), A_ch = C softmax_c(mean_hw |F| / tau)."""
    n, c, h, w = feat.shape
    a_sp, a_ch = [], []
    for i in range(n):
        f = feat[i]
        sal_sp = f.abs().sum(dim=0) / c  # (h, w)
        e = torch.exp(sal_sp / tau)
        a_sp.append(h * w * e / e.sum())
        sal_ch = f.abs().sum(dim=(1, 2)) / (h * w)  # (c,)
        e = torch.exp(sal_ch / tau)
        a_ch.append(c * e / e.sum())
    return torch.stack(a_sp).reshape(n, 1, h, w), torch.stack(a_ch).reshape(n, c, 1, 1)


def box_masks_literal(
    boxes: list[torch.Tensor], feat_size: tuple[int, int], image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """method.md 2b box masks with explicit loops over boxes and cells."""
    h, w = feat_size
    img_h, img_w = image_size
    fg = torch.zeros(len(boxes), 1, h, w, dtype=F64)
    bg = torch.zeros(len(boxes), 1, h, w, dtype=F64)
    for i, b in enumerate(boxes):
        for x1f, y1f, x2f, y2f in b.tolist():
            x1 = math.floor(x1f / img_w * w)
            y1 = math.floor(y1f / img_h * h)
            x2 = math.ceil(x2f / img_w * w)
            y2 = math.ceil(y2f / img_h * h)
            weight = 1.0 / ((y2 - y1 + 1) * (x2 - x1 + 1))
            for r in range(max(y1, 0), min(y2, h - 1) + 1):
                for col in range(max(x1, 0), min(x2, w - 1) + 1):
                    fg[i, 0, r, col] = max(fg[i, 0, r, col].item(), weight)
        count = sum(1 for r in range(h) for col in range(w) if fg[i, 0, r, col] == 0)
        for r in range(h):
            for col in range(w):
                if fg[i, 0, r, col] == 0:
                    bg[i, 0, r, col] = 1.0 / count
    return fg, bg


def global_context_literal(feat: torch.Tensor, conv_mask: nn.Conv2d, branch: nn.Sequential) -> torch.Tensor:
    """R(F) = F + W2(ReLU(LayerNorm(W1(ctx(F))))), ctx(F) = sum_j softmax_j(Wk F)_j F_j, from the weights."""
    n, c, h, w = feat.shape
    wk, bk = conv_mask.weight.reshape(c), conv_mask.bias.reshape(())
    w1, b1 = branch[0].weight.reshape(c // 2, c), branch[0].bias
    ln = branch[1]
    assert isinstance(ln, nn.LayerNorm) and tuple(ln.normalized_shape) == (c // 2, 1, 1)
    g_ln, b_ln = ln.weight.reshape(c // 2), ln.bias.reshape(c // 2)
    w2, b2 = branch[3].weight.reshape(c, c // 2), branch[3].bias
    out = []
    for i in range(n):
        f = feat[i].reshape(c, h * w)
        logits = (wk[:, None] * f).sum(dim=0) + bk  # (HW,)
        p = torch.exp(logits - logits.max())
        p = p / p.sum()
        ctx = (f * p[None, :]).sum(dim=1)  # (C,)
        y = w1 @ ctx + b1
        mu = y.mean()
        var = ((y - mu) ** 2).mean()
        y = (y - mu) / torch.sqrt(var + ln.eps) * g_ln + b_ln
        y = torch.relu(y)
        y = w2 @ y + b2  # (C,)
        out.append(feat[i] + y[:, None, None])
    return torch.stack(out)


def fgd_literal(
    mod: FGDLoss, s: torch.Tensor, t: torch.Tensor, boxes: list[torch.Tensor], image_size: tuple[int, int]
) -> torch.Tensor:
    t = t.detach()
    n, _, h, w = t.shape
    x = mod.align(s)
    a_sp_t, a_ch_t = attention_literal(t, mod.tau)
    a_sp_s, a_ch_s = attention_literal(x, mod.tau)
    fg, bg = box_masks_literal(boxes, (h, w), image_size)
    e = a_sp_t * a_ch_t * (x - t) ** 2
    l_fg = (fg * e).sum() / n
    l_bg = (bg * e).sum() / n
    l_at = (a_ch_s - a_ch_t).abs().sum() / n + (a_sp_s - a_sp_t).abs().sum() / n
    r_s = global_context_literal(x, mod.conv_mask_s, mod.channel_add_conv_s)
    r_t = global_context_literal(t, mod.conv_mask_t, mod.channel_add_conv_t)
    l_global = ((r_s - r_t) ** 2).sum() / n
    return mod.alpha * l_fg + mod.beta * l_bg + mod.gamma * l_at + mod.lam * l_global


def mgd_literal(mod: MGDLoss, s: torch.Tensor, t: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """alpha * sum((G(align(S) * M) - T)^2) / N, M = [rand <= 1 - ratio] drawn from ``g``."""
    t = t.detach()
    x = mod.align(s)
    n, c, h, w = x.shape
    shape = (n, 1, h, w) if mod.mask == "spatial" else (n, c, 1, 1)
    u = torch.rand(shape, generator=g) if g is not None else torch.rand(shape)
    m = (u <= 1 - mod.ratio).to(F64)
    return mod.alpha * ((mod.generation(x * m) - t) ** 2).sum() / n


def standardize_literal(x: torch.Tensor) -> torch.Tensor:
    """Each channel over (N, H, W): (x - mean) / (unbiased std + 1e-6)."""
    out = []
    for c in range(x.shape[1]):
        v = x[:, c]
        cnt = v.numel()
        mean = v.sum() / cnt
        std = torch.sqrt(((v - mean) ** 2).sum() / (cnt - 1))
        out.append((v - mean) / (std + 1e-6))
    return torch.stack(out, dim=1)


def pkd_literal(s_list, t_list, loss_weight=1.0, resize_student=True) -> torch.Tensor:
    total = 0.0
    for s, t in zip(s_list, t_list):
        t = t.detach()
        if s.shape[-2:] != t.shape[-2:]:
            if resize_student:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            else:
                t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
        d = standardize_literal(s) - standardize_literal(t)
        total = total + (d**2).sum() / d.numel() / 2
    return loss_weight * total


def cwd_literal(s_list, t_list, tau=1.0, loss_weight=1.0) -> torch.Tensor:
    total = 0.0
    for s, t in zip(s_list, t_list):
        t = t.detach()
        n, c = s.shape[:2]
        acc = 0.0
        for i in range(n):
            for j in range(c):
                zt = t[i, j].flatten() / tau
                zs = s[i, j].flatten() / tau
                p_t = torch.exp(zt) / torch.exp(zt).sum()
                p_s = torch.exp(zs) / torch.exp(zs).sum()
                acc = acc + (p_t * (torch.log(p_t) - torch.log(p_s))).sum()
        total = total + tau**2 / (n * c) * acc
    return loss_weight * total


def binary_kl_literal(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    p = torch.sigmoid(t / tau)
    q = torch.sigmoid(s / tau)
    return p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))


# --------------------------------------------------------------------------------------
# MGD
# --------------------------------------------------------------------------------------

MGD_CASES = [
    # mask, Cs, Ct, N, H, W, ratio
    ("spatial", 5, 8, 2, 7, 9, 0.65),
    ("spatial", 8, 8, 1, 11, 6, 0.45),
    ("channel", 6, 6, 3, 5, 4, 0.5),
    ("channel", 3, 10, 2, 9, 7, 0.65),
]


@pytest.mark.parametrize("mask,cs,ct,n,h,w,ratio", MGD_CASES)
def test_mgd_matches_formula_with_generator(mask, cs, ct, n, h, w, ratio):
    g = torch.Generator().manual_seed(1234 + cs)
    mod = randomize_(MGDLoss(cs, ct, ratio=ratio, alpha=0.37, mask=mask, generator=g).double(), seed=cs)
    s = randn(n, cs, h, w, seed=1, requires_grad=True)
    t = randn(n, ct, h, w, seed=2)
    g_ref = torch.Generator()
    g_ref.set_state(g.get_state())
    loss = mod(s, t)
    ref = mgd_literal(mod, s, t, g_ref)
    close(loss, ref)
    compare_grads(loss, ref, [s, *mod.parameters()])
    # the module advanced the shared generator exactly as one draw of the mask does
    assert torch.equal(g.get_state(), g_ref.get_state())


@pytest.mark.parametrize("mask", ["spatial", "channel"])
def test_mgd_seed_draws_fresh_masks_each_call(mask):
    """Call k draws its mask from a generator seeded with ``stream_seed(seed, k)``: the seed
    itself first, then a hash of (seed, k)."""
    from famkd_losses.losses._common import stream_seed

    mod = randomize_(MGDLoss(4, 6, mask=mask, seed=7, alpha=1.0).double(), seed=3)
    s = randn(2, 4, 6, 5, seed=3)
    t = randn(2, 6, 6, 5, seed=4)
    first, second = mod(s, t), mod(s, t)
    assert stream_seed(7, 0) == 7
    close(first, mgd_literal(mod, s, t, torch.Generator().manual_seed(7)))
    close(second, mgd_literal(mod, s, t, torch.Generator().manual_seed(stream_seed(7, 1))))
    assert not torch.isclose(first, second), "successive calls must draw fresh masks"


def test_mgd_seeded_runs_reproduce():
    a = MGDLoss(5, 7, seed=11, alpha=1.0).double()
    b = MGDLoss(5, 7, seed=11, alpha=1.0).double()
    b.load_state_dict(a.state_dict())
    c = MGDLoss(5, 7, seed=12, alpha=1.0).double()
    c.load_state_dict(a.state_dict())
    s = randn(2, 5, 8, 8, seed=5)
    t = randn(2, 7, 8, 8, seed=6)
    va = [a(s, t) for _ in range(3)]
    vb = [b(s, t) for _ in range(3)]
    vc = [c(s, t) for _ in range(3)]
    for x, y in zip(va, vb):
        assert torch.equal(x, y)
    assert not all(torch.isclose(x, y) for x, y in zip(va, vc)), "another seed must give other masks"


def test_mgd_global_rng_when_no_seed():
    mod = randomize_(MGDLoss(3, 5, mask="spatial").double(), seed=9)
    s = randn(2, 3, 5, 6, seed=7, requires_grad=True)
    t = randn(2, 5, 5, 6, seed=8)
    with torch.random.fork_rng():
        torch.manual_seed(321)
        loss = mod(s, t)
        torch.manual_seed(321)
        ref = mgd_literal(mod, s, t, None)
    close(loss, ref)


@pytest.mark.parametrize("mask,ratio", [("spatial", 0.65), ("spatial", 0.45), ("channel", 0.65)])
def test_mgd_mask_fraction_close_to_ratio(mask, ratio):
    """With G the identity on positive inputs and T = 0, the loss counts the kept entries."""
    c = 4
    mod = MGDLoss(c, c, ratio=ratio, alpha=1.0, mask=mask, seed=0)
    with torch.no_grad():
        for conv in (mod.generation[0], mod.generation[2]):
            conv.weight.zero_()
            conv.bias.zero_()
            for k in range(c):
                conv.weight[k, k, 1, 1] = 1.0  # centre tap: identity
    n, h, w = (1, 128, 128) if mask == "spatial" else (256, 1, 1)
    draws = n * h * w if mask == "spatial" else n * c
    s = torch.ones(n, c, h, w)
    t = torch.zeros(n, c, h, w)
    kept = mod(s, t).item() * n / (n * c * h * w)  # loss * N = sum over (n, c, h, w) of M
    assert abs(kept - (1 - ratio)) < 5 * math.sqrt(ratio * (1 - ratio) / draws) + 1e-3
    # a mask hides a fraction, not nothing and not everything
    assert 0 < kept < 1


def test_mgd_layer_names_and_generator_architecture():
    mod = MGDLoss(5, 8)
    assert list(mod.state_dict().keys()) == [
        "align.weight",
        "align.bias",
        "generation.0.weight",
        "generation.0.bias",
        "generation.2.weight",
        "generation.2.bias",
    ]
    assert isinstance(mod.align, nn.Conv2d)
    assert mod.align.kernel_size == (1, 1) and (mod.align.in_channels, mod.align.out_channels) == (5, 8)
    g0, relu, g2 = mod.generation
    assert isinstance(relu, nn.ReLU)
    for conv in (g0, g2):
        assert isinstance(conv, nn.Conv2d)
        assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
        assert (conv.in_channels, conv.out_channels) == (8, 8)


def test_mgd_identity_align_when_channels_equal():
    mod = MGDLoss(6, 6)
    assert isinstance(mod.align, nn.Identity)
    assert not any(k.startswith("align") for k in mod.state_dict())
    x = randn(1, 6, 3, 3, seed=0)
    assert torch.equal(mod.align(x), x)


def test_mgd_multi_level_is_sum_of_single_levels():
    s_ch, t_ch = [4, 6, 3], [8, 6, 5]
    sizes = [(9, 7), (5, 4), (3, 2)]
    multi = randomize_(MGDLoss(s_ch, t_ch, seed=5, alpha=0.5, ratio=0.5).double(), seed=2)
    singles = []
    for lvl, (cs, ct) in enumerate(zip(s_ch, t_ch)):
        single = MGDLoss(cs, ct, seed=5 + lvl, alpha=0.5, ratio=0.5).double()
        single.load_state_dict(multi.levels[lvl].state_dict())
        singles.append(single)
    s = [randn(2, cs, *hw, seed=10 + i) for i, (cs, hw) in enumerate(zip(s_ch, sizes))]
    t = [randn(2, ct, *hw, seed=20 + i) for i, (ct, hw) in enumerate(zip(t_ch, sizes))]
    for _ in range(2):  # the second call checks that each level's generator advances alone
        got = multi(s, t)
        want = sum(m(si, ti) for m, si, ti in zip(singles, s, t))
        close(got, want)


def test_mgd_resize_student_bilinear():
    g = torch.Generator().manual_seed(3)
    mod = randomize_(MGDLoss(4, 6, generator=g, resize_student=True, alpha=1.0).double(), seed=1)
    s = randn(2, 4, 5, 3, seed=1, requires_grad=True)
    t = randn(2, 6, 9, 7, seed=2)
    g_ref = torch.Generator()
    g_ref.set_state(g.get_state())
    loss = mod(s, t)
    s_up = F.interpolate(s, size=(9, 7), mode="bilinear", align_corners=False)
    ref = mgd_literal(mod, s_up, t, g_ref)
    close(loss, ref)
    compare_grads(loss, ref, [s])
    with pytest.raises(ValueError):
        MGDLoss(4, 6)(s.float(), t.float())


@pytest.mark.parametrize("mask", ["spatial", "channel"])
def test_mgd_gradients_reach_student_and_layers_not_teacher(mask):
    mod = MGDLoss(3, 5, mask=mask, seed=0, ratio=0.5)
    s = torch.randn(2, 3, 6, 6, requires_grad=True)
    t = torch.randn(2, 5, 6, 6, requires_grad=True)
    loss = mod(s, t)
    check_teacher_untouched(loss, s, t)
    for name, p in mod.named_parameters():
        assert p.grad is not None and p.grad.abs().max() > 0, name


def test_mgd_published_defaults():
    params = inspect.signature(MGDLoss).parameters
    assert params["ratio"].default == 0.65
    assert params["alpha"].default == 2e-5
    assert params["mask"].default == "spatial"


# --------------------------------------------------------------------------------------
# FGD
# --------------------------------------------------------------------------------------


def test_box_masks_by_hand():
    # 4x4 map over a 32x32 image: one cell is 8 pixels, so every mapped corner is exact.
    boxes = [
        torch.tensor(
            [
                [0.0, 0.0, 8.0, 8.0],  # rows 0..1, cols 0..1, area 2*2 -> 1/4
                [4.0, 4.0, 20.0, 12.0],  # x 0.5..2.5 -> 0..3, y 0.5..1.5 -> 0..2; area 3*4 -> 1/12
                [20.0, 20.0, 40.0, 44.0],  # x 2..5, y 2..6: clipped to 2..3; area 5*4 = 20 -> 1/20
            ]
        ),
        torch.zeros(0, 4),  # no boxes: all background
        torch.tensor([[-8.0, -4.0, 40.0, 40.0]]),  # x -1..5, y -1..5: whole map, area 7*7
    ]
    fg, bg = box_masks(boxes, (4, 4), (32, 32))
    a, b, c = 1 / 4, 1 / 12, 1 / 20
    fg0 = torch.tensor(
        [
            [a, a, b, b],
            [a, a, b, b],
            [b, b, b, b],
            [0, 0, c, c],
        ],
        dtype=F64,
    )
    bg0 = torch.zeros(4, 4, dtype=F64)
    bg0[3, 0] = bg0[3, 1] = 1 / 2
    zeros = torch.zeros(4, 4, dtype=F64)
    expect_fg = torch.stack([fg0, zeros, torch.full((4, 4), 1 / 49, dtype=F64)]).unsqueeze(1)
    expect_bg = torch.stack([bg0, torch.full((4, 4), 1 / 16, dtype=F64), zeros]).unsqueeze(1)
    assert fg.shape == bg.shape == (3, 1, 4, 4)
    torch.testing.assert_close(fg.double(), expect_fg, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bg.double(), expect_bg, rtol=1e-6, atol=1e-7)
    # and the loop transcription agrees with the hand numbers
    lit_fg, lit_bg = box_masks_literal(boxes, (4, 4), (32, 32))
    torch.testing.assert_close(lit_fg, expect_fg, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lit_bg, expect_bg, rtol=1e-12, atol=1e-12)


def test_box_masks_non_square_axes():
    # 3 x 5 map of a 24 x 80 image: a row is 8 px, a column 16 px.
    boxes = [torch.tensor([[16.0, 0.0, 32.0, 4.0]])]  # cols 1..2, rows 0..1 (y2 = ceil(0.5) = 1)
    fg, bg = box_masks(boxes, (3, 5), (24, 80))
    expect = torch.zeros(1, 1, 3, 5)
    expect[0, 0, 0:2, 1:3] = 1 / 4
    torch.testing.assert_close(fg, expect.to(fg.dtype), rtol=1e-6, atol=1e-7)
    assert torch.isclose(bg.sum(), torch.tensor(1.0, dtype=bg.dtype))
    assert (bg[0, 0, 0:2, 1:3] == 0).all()


def random_boxes(n_img: int, counts: list[int], image_size: tuple[int, int], seed: int) -> list[torch.Tensor]:
    """Random float32 boxes, some reaching off the image (negative or past the far side)."""
    g = torch.Generator().manual_seed(seed)
    img_h, img_w = image_size
    out = []
    for i in range(n_img):
        k = counts[i]
        xy = torch.rand(k, 2, generator=g) * torch.tensor([img_w * 1.1, img_h * 1.1]) - torch.tensor(
            [img_w * 0.1, img_h * 0.1]
        )
        wh = torch.rand(k, 2, generator=g) * torch.tensor([img_w * 0.6, img_h * 0.6]) + 1.0
        out.append(torch.cat([xy, xy + wh], dim=1).float())
    return out


def test_box_masks_match_loops_on_random_boxes():
    image_size = (50, 70)
    boxes = random_boxes(3, [4, 0, 7], image_size, seed=5)
    for feat_size in [(5, 7), (13, 9), (2, 3)]:
        fg, bg = box_masks(boxes, feat_size, image_size)
        lit_fg, lit_bg = box_masks_literal(boxes, feat_size, image_size)
        close(fg, lit_fg, rtol=1e-6)
        close(bg, lit_bg, rtol=1e-6)


FGD_CASES = [
    # Cs, Ct, N, H, W, image_size, box counts
    (5, 8, 2, 7, 9, (56, 72), [3, 1]),
    (6, 6, 3, 5, 4, (40, 33), [2, 0, 5]),
    (4, 10, 1, 9, 11, (71, 88), [6]),
]
FGD_WEIGHTS = [
    (1.0, 0.0, 0.0, 0.0),  # foreground only
    (0.0, 1.0, 0.0, 0.0),  # background only
    (0.0, 0.0, 1.0, 0.0),  # attention only
    (0.0, 0.0, 0.0, 1.0),  # global only
    (1e-3, 5e-4, 5e-4, 5e-6),  # RetinaNet
]


@pytest.mark.parametrize("weights", FGD_WEIGHTS, ids=["fg", "bg", "at", "global", "retinanet"])
@pytest.mark.parametrize("cs,ct,n,h,w,image_size,counts", FGD_CASES)
def test_fgd_matches_formula(cs, ct, n, h, w, image_size, counts, weights):
    alpha, beta, gamma, lam = weights
    mod = FGDLoss(cs, ct, tau=0.7, alpha=alpha, beta=beta, gamma=gamma, lam=lam).double()
    randomize_(mod, seed=cs + ct)
    s = randn(n, cs, h, w, seed=1, requires_grad=True)
    t = randn(n, ct, h, w, seed=2)
    boxes = random_boxes(n, counts, image_size, seed=3)
    loss = mod(s, t, boxes, image_size)
    ref = fgd_literal(mod, s, t, boxes, image_size)
    close(loss, ref)
    # without the global term only the align layer (if any) has a part besides the student
    used = [s, *(mod.align.parameters() if lam == 0 else mod.parameters())]
    # softmax_j(Wk F + b) does not depend on b
    compare_grads(loss, ref, used, vanishing=(mod.conv_mask_s.bias, mod.conv_mask_t.bias))


def test_fgd_init_zero_last_conv_and_global_loss():
    mod = FGDLoss(5, 8, alpha=0.0, beta=0.0, gamma=0.0, lam=1.0).double()
    for branch in (mod.channel_add_conv_s, mod.channel_add_conv_t):
        assert isinstance(branch[-1], nn.Conv2d)
        assert torch.count_nonzero(branch[-1].weight) == 0
        assert torch.count_nonzero(branch[-1].bias) == 0
    s = randn(2, 5, 6, 7, seed=1)
    t = randn(2, 8, 6, 7, seed=2)
    boxes = random_boxes(2, [2, 1], (48, 56), seed=1)
    want = ((mod.align(s) - t) ** 2).sum() / 2
    close(mod(s, t, boxes, (48, 56)), want)


def test_fgd_conv_mask_kaiming_fan_in():
    ct = 1024
    mod = FGDLoss(ct, ct)
    for conv in (mod.conv_mask_s, mod.conv_mask_t):
        assert conv.weight.shape == (1, ct, 1, 1)
        assert torch.count_nonzero(conv.bias) == 0
        std = conv.weight.std().item()
        assert abs(std - math.sqrt(2.0 / ct)) < 0.15 * math.sqrt(2.0 / ct)


def test_fgd_layer_layout_and_state_dict_order():
    mod = FGDLoss(5, 8)
    keys = list(mod.state_dict().keys())
    assert keys == [
        "align.weight",
        "align.bias",
        "conv_mask_s.weight",
        "conv_mask_s.bias",
        "conv_mask_t.weight",
        "conv_mask_t.bias",
        "channel_add_conv_s.0.weight",
        "channel_add_conv_s.0.bias",
        "channel_add_conv_s.1.weight",
        "channel_add_conv_s.1.bias",
        "channel_add_conv_s.3.weight",
        "channel_add_conv_s.3.bias",
        "channel_add_conv_t.0.weight",
        "channel_add_conv_t.0.bias",
        "channel_add_conv_t.1.weight",
        "channel_add_conv_t.1.bias",
        "channel_add_conv_t.3.weight",
        "channel_add_conv_t.3.bias",
    ]
    for branch in (mod.channel_add_conv_s, mod.channel_add_conv_t):
        w1, ln, relu, w2 = branch
        assert (w1.in_channels, w1.out_channels, w1.kernel_size) == (8, 4, (1, 1))
        assert tuple(ln.normalized_shape) == (4, 1, 1)
        assert isinstance(relu, nn.ReLU)
        assert (w2.in_channels, w2.out_channels, w2.kernel_size) == (4, 8, (1, 1))
    same = FGDLoss(6, 6)
    assert isinstance(same.align, nn.Identity)
    assert next(iter(same.state_dict())) == "conv_mask_s.weight"


def test_fgd_published_retinanet_defaults():
    params = inspect.signature(FGDLoss).parameters
    got = {k: params[k].default for k in ("tau", "alpha", "beta", "gamma", "lam")}
    assert got == {"tau": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lam": 5e-6}
    mod = FGDLoss(4, 4)
    assert (mod.tau, mod.alpha, mod.beta, mod.gamma, mod.lam) == (0.5, 1e-3, 5e-4, 5e-4, 5e-6)


def test_fgd_default_module_matches_formula():
    """Fresh (zero-W2) module, default weights, including an image with no boxes."""
    mod = FGDLoss(7, 12).double()
    s = randn(2, 7, 8, 6, seed=4, requires_grad=True)
    t = randn(2, 12, 8, 6, seed=5)
    boxes = [torch.tensor([[3.0, 5.0, 30.0, 44.0], [10.0, 1.0, 17.5, 9.5]]), torch.zeros(0, 4)]
    loss = mod(s, t, boxes, (64, 48))
    ref = fgd_literal(mod, s, t, boxes, (64, 48))
    close(loss, ref)
    compare_grads(loss, ref, [s, *mod.align.parameters()])


def test_fgd_gradients_reach_student_and_all_layers_not_teacher():
    mod = randomize_(FGDLoss(5, 8, alpha=1.0, beta=1.0, gamma=1.0, lam=1.0), seed=0)
    s = torch.randn(2, 5, 6, 7, requires_grad=True)
    t = torch.randn(2, 8, 6, 7, requires_grad=True)
    boxes = random_boxes(2, [2, 3], (48, 56), seed=2)
    loss = mod(s, t, boxes, (48, 56))
    check_teacher_untouched(loss, s, t)
    for name, p in mod.named_parameters():
        assert p.grad is not None, name
        if name not in ("conv_mask_s.bias", "conv_mask_t.bias"):  # shift-invariant softmax: zero
            assert p.grad.abs().max() > 0, name


def test_fgd_resize_student_bilinear():
    mod = randomize_(FGDLoss(4, 6, alpha=1.0, beta=1.0, gamma=1.0, lam=1.0, resize_student=True).double(), seed=8)
    s = randn(2, 4, 5, 4, seed=1, requires_grad=True)
    t = randn(2, 6, 9, 7, seed=2)
    boxes = random_boxes(2, [2, 1], (72, 56), seed=3)
    loss = mod(s, t, boxes, (72, 56))
    s_up = F.interpolate(s, size=(9, 7), mode="bilinear", align_corners=False)
    ref = fgd_literal(mod, s_up, t, boxes, (72, 56))
    close(loss, ref)
    compare_grads(loss, ref, [s])
    with pytest.raises(ValueError):
        FGDLoss(4, 6).double()(s, t, boxes, (72, 56))


def test_fgd_multi_level_is_sum_of_single_levels():
    s_ch, t_ch, sizes = [4, 6], [8, 6], [(8, 10), (4, 5)]
    multi = randomize_(FGDLoss(s_ch, t_ch, alpha=1.0, beta=0.5, gamma=0.25, lam=0.1).double(), seed=4)
    s = [randn(2, c, *hw, seed=30 + i) for i, (c, hw) in enumerate(zip(s_ch, sizes))]
    t = [randn(2, c, *hw, seed=40 + i) for i, (c, hw) in enumerate(zip(t_ch, sizes))]
    boxes = random_boxes(2, [3, 2], (64, 80), seed=6)
    want = sum(fgd_literal(multi.levels[i], s[i], t[i], boxes, (64, 80)) for i in range(2))
    close(multi(s, t, boxes, (64, 80)), want)


# --------------------------------------------------------------------------------------
# PKD
# --------------------------------------------------------------------------------------

PKD_CASES = [
    # student shapes, teacher shapes (levels)
    ([(2, 5, 7, 9)], [(2, 5, 7, 9)]),
    ([(3, 4, 5, 4), (3, 6, 3, 3)], [(3, 4, 5, 4), (3, 6, 3, 3)]),
    ([(2, 3, 4, 5), (1, 8, 6, 6)], [(2, 3, 7, 9), (1, 8, 3, 4)]),  # sizes differ: resize
]


@pytest.mark.parametrize("resize_student", [True, False])
@pytest.mark.parametrize("s_shapes,t_shapes", PKD_CASES)
def test_pkd_matches_formula(s_shapes, t_shapes, resize_student):
    s = [randn(*sh, seed=i, requires_grad=True) for i, sh in enumerate(s_shapes)]
    t = [randn(*sh, seed=50 + i) * 3 + 1 for i, sh in enumerate(t_shapes)]
    mod = PKDLoss(loss_weight=2.5, resize_student=resize_student)
    args = (s[0], t[0]) if len(s) == 1 else (s, t)
    loss = mod(*args)
    ref = pkd_literal(s, t, loss_weight=2.5, resize_student=resize_student)
    close(loss, ref)
    compare_grads(loss, ref, s)


def test_pkd_is_one_minus_pearson_for_correlated_maps():
    n, c, h, w = 2, 4, 16, 16
    rho = 0.6
    t = randn(n, c, h, w, seed=1)
    s = rho * t + math.sqrt(1 - rho**2) * randn(n, c, h, w, seed=2)
    loss = PKDLoss()(s, t).item()
    r = [torch.corrcoef(torch.stack([s[:, k].flatten(), t[:, k].flatten()]))[0, 1].item() for k in range(c)]
    m = n * h * w
    # exactly (M-1)/M * (1 - mean_c r_c) up to the 1e-6 in the denominator
    assert abs(loss - (m - 1) / m * (1 - sum(r) / c)) < 1e-5
    assert abs(loss - (1 - rho)) < 0.06


def test_pkd_zero_for_identical_maps():
    x = randn(2, 5, 6, 7, seed=3)
    assert abs(PKDLoss()(x, x.clone()).item()) < 1e-10


def test_pkd_invariant_to_positive_channel_affine_of_student():
    s = randn(2, 5, 6, 7, seed=3)
    t = randn(2, 5, 6, 7, seed=4) + 0.5 * s
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(1, 5, 1, 1, generator=g, dtype=F64) * 4 + 0.2).expand_as(s)
    b = torch.randn(1, 5, 1, 1, generator=g, dtype=F64) * 5
    base = PKDLoss()(s, t)
    close(PKDLoss()(a * s + b, t), base, rtol=1e-5)
    # a negative scale on one channel is not an invariance (the check can fail)
    flip = torch.ones(1, 5, 1, 1, dtype=F64)
    flip[0, 2] = -1
    assert not torch.isclose(PKDLoss()(flip * s, t), base)


def test_pkd_gradient_reaches_student_not_teacher():
    s = torch.randn(2, 4, 5, 6, requires_grad=True)
    t = torch.randn(2, 4, 5, 6, requires_grad=True)
    check_teacher_untouched(PKDLoss()(s, t), s, t)
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 4, 5, 6, requires_grad=True)
    check_teacher_untouched(PKDLoss(resize_student=False)(s, t), s, t)


# --------------------------------------------------------------------------------------
# CWD
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau,loss_weight", [(1.0, 1.0), (2.5, 10.0), (0.5, 3.0)])
@pytest.mark.parametrize("shapes", [[(2, 3, 5, 7)], [(1, 4, 6, 6), (3, 5, 3, 2)]])
def test_cwd_matches_formula(shapes, tau, loss_weight):
    s = [randn(*sh, seed=i, requires_grad=True) for i, sh in enumerate(shapes)]
    t = [randn(*sh, seed=10 + i) * 2 for i, sh in enumerate(shapes)]
    mod = CWDLoss(tau=tau, loss_weight=loss_weight)
    loss = mod(s[0], t[0]) if len(s) == 1 else mod(s, t)
    ref = cwd_literal(s, t, tau, loss_weight)
    close(loss, ref)
    compare_grads(loss, ref, s)


def test_cwd_zero_for_identical_and_teacher_detached():
    x = randn(2, 3, 4, 5, seed=0)
    assert abs(CWDLoss()(x, x.clone()).item()) < 1e-12
    s = torch.randn(2, 3, 4, 5, requires_grad=True)
    t = torch.randn(2, 3, 4, 5, requires_grad=True)
    check_teacher_untouched(CWDLoss()(s, t), s, t)


# --------------------------------------------------------------------------------------
# KD
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau,loss_weight", [(1.0, 1.0), (4.0, 0.5), (0.7, 2.0)])
def test_kd_softmax_matches_hinton(tau, loss_weight):
    s = randn(5, 7, seed=1, requires_grad=True)
    t = randn(5, 7, seed=2) * 3
    loss = KDLoss(tau=tau, loss_weight=loss_weight)(s, t)
    ref = (
        loss_weight * tau**2 * F.kl_div(F.log_softmax(s / tau, dim=1), F.softmax(t / tau, dim=1), reduction="batchmean")
    )
    close(loss, ref)
    compare_grads(loss, ref, [s])


@pytest.mark.parametrize("tau,loss_weight", [(1.0, 1.0), (2.0, 3.0)])
def test_kd_sigmoid_matches_binary_kl(tau, loss_weight):
    s = randn(4, 6, seed=3, requires_grad=True)
    t = randn(4, 6, seed=4) * 2
    loss = KDLoss(tau=tau, mode="sigmoid", loss_weight=loss_weight)(s, t)
    per_sample = []
    for i in range(4):
        per_sample.append(binary_kl_literal(s[i], t[i], tau).sum())
    ref = loss_weight * tau**2 * torch.stack(per_sample).sum() / 4
    close(loss, ref)
    compare_grads(loss, ref, [s])


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_kd_dense_class_dim_1(mode):
    n, k, h, w, tau = 2, 5, 3, 4, 1.5
    s = randn(n, k, h, w, seed=5, requires_grad=True)
    t = randn(n, k, h, w, seed=6) * 2
    loss = KDLoss(tau=tau, mode=mode, class_dim=1)(s, t)
    total = 0.0
    for i in range(n):
        for r in range(h):
            for col in range(w):
                zs, zt = s[i, :, r, col], t[i, :, r, col]
                if mode == "softmax":
                    p = torch.exp(zt / tau) / torch.exp(zt / tau).sum()
                    q = torch.exp(zs / tau) / torch.exp(zs / tau).sum()
                    total = total + (p * torch.log(p / q)).sum()
                else:
                    total = total + binary_kl_literal(zs, zt, tau).sum()
    ref = tau**2 * total / (n * h * w)
    close(loss, ref)
    compare_grads(loss, ref, [s])


def test_kd_levels_and_flattened_positions():
    tau = 2.0
    s = [randn(2, 6, 4, seed=7, requires_grad=True), randn(3, 4, seed=8, requires_grad=True)]
    t = [randn(2, 6, 4, seed=9), randn(3, 4, seed=10)]
    loss = KDLoss(tau=tau)(s, t)
    ref = 0.0
    for si, ti in zip(s, t):
        zs, zt = si.reshape(-1, si.shape[-1]), ti.reshape(-1, ti.shape[-1])
        ref = ref + tau**2 * F.kl_div(F.log_softmax(zs / tau, -1), F.softmax(zt / tau, -1), reduction="batchmean")
    close(loss, ref)
    compare_grads(loss, ref, s)


@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_kd_zero_for_identical_and_teacher_detached(mode):
    x = randn(3, 5, seed=0)
    assert abs(KDLoss(mode=mode)(x, x.clone()).item()) < 1e-12
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5, requires_grad=True)
    check_teacher_untouched(KDLoss(mode=mode, tau=2.0)(s, t), s, t)


def test_fgd_accepts_zero_area_boxes():
    """A box with x1 == x2 (or y1 == y2) is ordered, so it is not an error (it covers at most a line)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    boxes = [torch.tensor([[4.0, 4.0, 4.0, 20.0]]), torch.tensor([[0.0, 8.0, 16.0, 8.0]])]
    assert torch.isfinite(FGDLoss(3, 4)(s, t, boxes, (32, 32)))


def test_fgd_accepts_finite_boxes_whose_extent_overflows_their_dtype():
    """x2 - x1 of two finite float16 corners can round to Inf; the box is still finite and ordered."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    boxes = [torch.tensor([[-60000.0, 0.0, 60000.0, 16.0]], dtype=torch.float16)]
    assert torch.isinf(boxes[0][:, 2] - boxes[0][:, 0]).all()
    assert torch.isfinite(FGDLoss(3, 4)(s, t, boxes, (32, 32)))
