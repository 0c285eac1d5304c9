"""The losses with backend="triton" (kernels in Triton's interpreter on CPU, or on CUDA) against
backend="torch": values and gradients."""

from __future__ import annotations

import pytest
import torch

from famkd_losses import FULL_METHOD, FAMKDLoss, MaskedLogitsLoss
from famkd_losses.kernels import can_run

pytestmark = pytest.mark.skipif(
    not can_run(torch.zeros(1)) and not torch.cuda.is_available(),
    reason="triton kernels need triton and CUDA, or TRITON_INTERPRET=1 on CPU",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pair(shape, seed, grad=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g).to(DEVICE).requires_grad_(grad)
    t = torch.randn(*shape, generator=g).to(DEVICE)
    return s, t


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"head": "softmax", "num_classes": 3},
        {"weights": "mask", "ratio_l": 0.4},
        {"weights": "mask", "ratio_l": 1.0},
        {"region_scales": (1, 2), "temperature": 2.0},
    ],
)
@pytest.mark.parametrize("layout", ["dense", "flat", "channels_last"])
def test_masked_logits_triton_matches_torch(kw, layout, kernel_calls):
    if layout == "flat" and "region_scales" in kw:
        pytest.skip("region-aware guidance needs the dense layout")
    shapes = [(2, 6, 5, 3), (2, 6, 2, 2)] if layout != "flat" else [(2, 15, 3), (2, 4, 3)]
    pairs = [_pair(sh, i, grad=True) for i, sh in enumerate(shapes)]
    if layout == "channels_last":
        pairs = [(s.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True), t) for s, t in pairs]
    s = [p[0] for p in pairs]
    t = [p[1] for p in pairs]
    ref = MaskedLogitsLoss(backend="torch", **kw)(s, t)
    got = MaskedLogitsLoss(backend="triton", **kw)(s, t)
    assert kernel_calls["logits"] == 2 and kernel_calls["reconstruction"] == 0
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    g_ref = torch.autograd.grad(2.5 * ref, s)
    g_got = torch.autograd.grad(2.5 * got, s)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the fused kernels' launches through the modules, and checks they ran (not a fallback)."""
    from famkd_losses.kernels import logits_kl, masking, reconstruction, teacher_stats

    calls = {"reconstruction": 0, "logits": 0, "teacher": 0, "student": 0, "masking": 0}
    orig_t, orig_s = teacher_stats.teacher_saliency_pyramid, teacher_stats.max_pool_pyramid_student

    def teacher(*args, **kwargs):
        calls["teacher"] += 1
        return orig_t(*args, **kwargs)

    def student(*args, **kwargs):
        calls["student"] += 1
        return orig_s(*args, **kwargs)

    monkeypatch.setattr(teacher_stats, "teacher_saliency_pyramid", teacher)
    monkeypatch.setattr(teacher_stats, "max_pool_pyramid_student", student)
    orig_rec, orig_kl = reconstruction.fused_reconstruction_error, logits_kl.position_kl_and_guidance

    def rec(*args, **kwargs):
        out = orig_rec(*args, **kwargs)
        assert type(out.grad_fn).__name__ == "_FusedReconstructionErrorBackward"
        calls["reconstruction"] += 1
        return out

    def kl(*args, **kwargs):
        out = orig_kl(*args, **kwargs)
        assert type(out[0].grad_fn).__name__ == "PositionKLBackward"
        calls["logits"] += 1
        return out

    orig_mask = masking.masked_branches

    def mask(*args, **kwargs):
        outs = orig_mask(*args, **kwargs)
        assert all(type(o.grad_fn).__name__ == "_MaskedBranchesBackward" for o in outs)
        calls["masking"] += 1
        return outs

    monkeypatch.setattr(masking, "masked_branches", mask)
    monkeypatch.setattr(reconstruction, "fused_reconstruction_error", rec)
    monkeypatch.setattr(logits_kl, "position_kl_and_guidance", kl)
    return calls


def test_famkd_triton_matches_torch(kernel_calls):
    levels = [(6, 5), (3, 3), (1, 2)]
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 4, h, w, generator=g).to(DEVICE).requires_grad_(True) for h, w in levels]
    t = [torch.randn(2, 6, h, w, generator=g).to(DEVICE) for h, w in levels]
    zs = [torch.randn(2, 6, h, w, generator=g).to(DEVICE).requires_grad_(True) for h, w in levels]
    zt = [torch.randn(2, 6, h, w, generator=g).to(DEVICE) for h, w in levels]
    ref_mod = FAMKDLoss([4] * 3, [6] * 3, num_classes=3, weighting="attention", backend="torch", **FULL_METHOD).to(
        DEVICE
    )
    tri_mod = FAMKDLoss([4] * 3, [6] * 3, num_classes=3, weighting="attention", backend="triton", **FULL_METHOD).to(
        DEVICE
    )
    tri_mod.load_state_dict(ref_mod.state_dict())
    with torch.no_grad():
        for fl in (*ref_mod.feature_losses, *tri_mod.feature_losses):
            fl.fusion_logits.copy_(torch.tensor([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2]]))
    ref = ref_mod(s, t, zs, zt)
    got = tri_mod(s, t, zs, zt)
    # 3 levels: scales 1, 2, 4 on 6x5, 1 and 2 on 3x3, 1 on 1x2; one logits call per level
    assert kernel_calls == {"reconstruction": 6, "logits": 3, "teacher": 3, "student": 3, "masking": 6}
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    for key, v in ref_mod.last_terms().items():
        torch.testing.assert_close(tri_mod.last_terms()[key], v, rtol=1e-5, atol=1e-8, msg=key)
    leaves_ref = [*s, *zs, *ref_mod.parameters()]
    leaves_tri = [*s, *zs, *tri_mod.parameters()]
    g_ref = torch.autograd.grad(3.0 * ref, leaves_ref)
    g_tri = torch.autograd.grad(3.0 * got, leaves_tri)
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "kw",
    [
        {"branches": ("channel",), "scales": (2, 4)},
        {"mask_mode": "sample", "seed": 3, "share_generators": False},
        {"mask_mode": "topk_nonsalient", "scale_weights": (1.0, 0.5, 0.25), "resize_student": True},
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_loss_triton_options(kw, dtype, kernel_calls):
    from famkd_losses import ScaleAwareMaskedFeatureLoss

    g = torch.Generator().manual_seed(1)
    hs = (4, 5) if kw.get("resize_student") else (7, 9)
    s = torch.randn(2, 3, *hs, generator=g).to(DEVICE, dtype).contiguous(memory_format=torch.channels_last)
    s.requires_grad_(True)
    t = torch.randn(2, 5, 7, 9, generator=g).to(DEVICE, dtype)
    ref_mod = ScaleAwareMaskedFeatureLoss(3, 5, backend="torch", **kw).to(DEVICE)
    tri_mod = ScaleAwareMaskedFeatureLoss(3, 5, backend="triton", **kw).to(DEVICE)
    tri_mod.load_state_dict(ref_mod.state_dict())
    ref, got = ref_mod(s, t), tri_mod(s, t)
    assert kernel_calls["teacher"] == 1 and kernel_calls["reconstruction"] == len(tri_mod.last_terms()) - 1
    assert kernel_calls["masking"] == kernel_calls["reconstruction"]
    tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-5}
    torch.testing.assert_close(got, ref, **tol)
    params_ref, params_tri = list(ref_mod.parameters()), list(tri_mod.parameters())
    g_ref = torch.autograd.grad(ref, [s, *params_ref])
    g_tri = torch.autograd.grad(got, [s, *params_tri])
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a.float(), b.float(), **tol)


@pytest.mark.parametrize("mask", ["spatial", "channel"])
def test_mgd_triton_matches_torch(mask, kernel_calls):
    from famkd_losses import MGDLoss

    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 3, 5, 7, generator=g).to(DEVICE).requires_grad_(True)
    t = torch.randn(2, 4, 5, 7, generator=g).to(DEVICE)
    ref_mod = MGDLoss(3, 4, mask=mask, seed=5, backend="torch").to(DEVICE)
    tri_mod = MGDLoss(3, 4, mask=mask, seed=5, backend="triton").to(DEVICE)
    tri_mod.load_state_dict(ref_mod.state_dict())
    ref, got = ref_mod(s, t), tri_mod(s, t)
    assert kernel_calls["reconstruction"] == 1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-9)
    g_ref = torch.autograd.grad(2.0 * ref, [s, *ref_mod.parameters()])
    g_tri = torch.autograd.grad(2.0 * got, [s, *tri_mod.parameters()])
    for a, b in zip(g_tri, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_fgd_triton_matches_torch(kernel_calls):
    from famkd_losses import FGDLoss

    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 6, 5, generator=g).to(DEVICE).requires_grad_(True)
    t = torch.randn(2, 4, 6, 5, generator=g).to(DEVICE)
    boxes = [torch.tensor([[2.0, 3.0, 20.0, 30.0]], device=DEVICE), torch.zeros(0, 4, device=DEVICE)]
    torch.manual_seed(0)  # the layers' initialisation: not whatever the tests before left in the global RNG
    ref_mod = FGDLoss(3, 4, alpha=1.0, beta=1.0, gamma=1.0, lam=1.0, backend="torch").to(DEVICE)
    tri_mod = FGDLoss(3, 4, alpha=1.0, beta=1.0, gamma=1.0, lam=1.0, backend="triton").to(DEVICE)
    tri_mod.load_state_dict(ref_mod.state_dict())
    ref, got = ref_mod(s, t, boxes, (48, 40)), tri_mod(s, t, boxes, (48, 40))
    assert kernel_calls["reconstruction"] == 2 and kernel_calls["teacher"] == 1
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-8)
    for key, v in ref_mod.last_terms().items():
        torch.testing.assert_close(tri_mod.last_terms()[key], v, rtol=1e-5, atol=1e-8, msg=key)
    g_ref = torch.autograd.grad(ref, [s, *ref_mod.parameters()], allow_unused=True)
    g_tri = torch.autograd.grad(got, [s, *tri_mod.parameters()], allow_unused=True)
    for a, b in zip(g_tri, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_can_run_limits():
    from famkd_losses.kernels import _MAX_OFFSET, _per_image_extent, can_run

    x = torch.zeros(2, 3, 4, 5)
    assert can_run(x, x)
    assert not can_run(x, torch.zeros(1, device="meta"))  # one device only
    # per-image extent beyond 32-bit offsets (a meta tensor: no memory), and the check itself
    big = torch.empty(2, 3, 2**15, 2**15, device="meta")
    assert _per_image_extent(big) == 2 * 2**30 + (2**15 - 1) * 2**15 + 2**15 - 1 > _MAX_OFFSET
    assert _per_image_extent(x) == 3 * 4 * 5 - 1
    assert not can_run(torch.zeros(65536, 1).expand(65536, 1))  # batch beyond a grid axis


@pytest.mark.parametrize("head", ["sigmoid", "softmax"])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_masked_logits_triton_keeps_nan_visible(head, where, kernel_calls):
    """weights="mask": the kernel path drops the reference's ``0 * sum(D)`` term (its KL already
    carries a NaN wherever D has one); a NaN logit must still make the loss NaN."""
    s, t = _pair((2, 6, 4, 3), 9, grad=True)
    with torch.no_grad():
        (s if where == "student" else t)[1, 2, 3, 1] = float("nan")
    kw = {"head": head, "num_classes": 3, "weights": "mask", "ratio_l": 0.5}
    got = MaskedLogitsLoss(backend="triton", **kw)([s], [t])
    ref = MaskedLogitsLoss(backend="torch", **kw)([s], [t])
    assert kernel_calls["logits"] == 1
    assert torch.isnan(ref) and torch.isnan(got)


def test_logits_level_terms_are_computed_when_read(kernel_calls):
    """Per-level parts are recorded lazily (no launch in the step) and read as the reference's."""
    s, t = zip(*[_pair(sh, i, grad=True) for i, sh in enumerate([(2, 6, 5, 3), (2, 6, 2, 2)])])
    tri = MaskedLogitsLoss(backend="triton", weights="mask")
    ref = MaskedLogitsLoss(backend="torch", weights="mask")
    tri(list(s), list(t))
    ref(list(s), list(t))
    got, want = tri.last_terms(), ref.last_terms()
    assert set(got) == set(want) == {"total", "level0", "level1"}
    for k in want:
        assert isinstance(got[k], torch.Tensor) and not got[k].requires_grad
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(got["level0"] + got["level1"], got["total"], rtol=1e-6, atol=0)
