"""The fused max-pool pyramids against the PyTorch reference (functional.max_pool, spatial/channel_saliency,
torch.nn.functional.max_pool2d's autograd).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET).

Tolerances: pooled maps are exact in every dtype (a max is one of its inputs; NaN where torch has NaN).
Saliencies are float32 for every dtype and differ from the reference only in summation order: rtol 2e-6,
atol 1e-6. Student gradients: float32 rtol/atol 1e-6 (order of the per-scale sums), exact for integer
gradients; float16/bfloat16 against the float64 sum of the same gradients, rounded once, to one unit in
the last place (rtol 1e-3 / 8e-3: the interpreter truncates float32 -> bfloat16).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import famkd_losses.functional as FN
from famkd_losses.kernels import HAS_TRITON, can_run

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not (HAS_TRITON and can_run(torch.empty(1, device=DEVICE))),
    reason="triton is not installed (or neither CUDA nor TRITON_INTERPRET=1)",
)

if HAS_TRITON:
    from famkd_losses.kernels.teacher_stats import max_pool_pyramid_student, teacher_saliency_pyramid

SAL = {"rtol": 2e-6, "atol": 1e-6}
GRAD_RTOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [(1, 1, 1, 1), (1, 3, 5, 7), (2, 17, 9, 11), (1, 3, 3, 2), (2, 1, 8, 8)]
SCALES = [(1,), (1, 2), (1, 2, 4), (2, 4)]
LAYOUTS = ("contiguous", "channels_last", "sliced", "permuted", "transposed")


def _view(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to x (N, C, H, W) with the given memory layout."""
    n, c, h, w = x.shape
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # a window of a larger map, every other channel
        y = x.new_zeros(n, 2 * c, h + 1, w + 2)[:, ::2, 1:, 1 : w + 1]
        return y.copy_(x)
    if layout == "permuted":  # stored (N, H, C, W)
        return x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    if layout == "transposed":  # stored (N, C, W, H)
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x.contiguous()


def _randn(*shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def _ints(*shape, dtype=torch.float32, seed=0, hi=3) -> torch.Tensor:
    """Small integers: many ties in every window."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-hi, hi + 1, shape, generator=g).to(device=DEVICE, dtype=dtype)


def _check_teacher(t: torch.Tensor, scales, **kw) -> None:
    got = teacher_saliency_pyramid(t, scales, **kw)
    want = FN.active_scales(t.shape[-2], t.shape[-1], scales)
    assert [r[0] for r in got] == list(want)
    for s, t_s, sp, ch in got:
        ref = FN.max_pool(t, s)
        assert t_s.dtype == t.dtype and t_s.shape == ref.shape
        torch.testing.assert_close(t_s, ref, rtol=0, atol=0, equal_nan=True)
        assert sp.dtype == ch.dtype == (torch.float64 if t.dtype == torch.float64 else torch.float32)
        assert sp.shape == (t.shape[0], 1, *ref.shape[-2:]) and ch.shape == (*t.shape[:2], 1, 1)
        torch.testing.assert_close(sp, FN.spatial_saliency(ref), equal_nan=True, **SAL)
        torch.testing.assert_close(ch, FN.channel_saliency(ref), equal_nan=True, **SAL)
        if s == 1:
            assert t_s is t


def _student_vs_reference(x: torch.Tensor, scales, grad_kind: str = "randn", **kw):
    """Run both with the same upstream gradients; return (outs, ref_outs, dx, ref_dx_float64)."""
    xk = x.detach().clone().requires_grad_()
    outs = max_pool_pyramid_student(xk, scales, **kw)
    xr = x.detach().clone().requires_grad_()
    refs = FN.maxpool_pyramid(xr, scales)
    assert [s for s, _ in outs] == [s for s, _ in refs]
    make = _ints if grad_kind == "ints" else _randn
    grads = [make(*o.shape, dtype=x.dtype, seed=10 + i) for i, (_, o) in enumerate(refs)]
    if not grads:
        return outs, refs, None, None
    torch.autograd.backward([o for _, o in outs], grads)
    # reference gradient: max_pool2d's backward per scale, summed in float64
    x64 = x.detach().double().requires_grad_()
    torch.autograd.backward([o for _, o in FN.maxpool_pyramid(x64, scales)], [g.double() for g in grads])
    return outs, refs, xk.grad, x64.grad


@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("shape", SHAPES)
def test_teacher_matches_reference(shape, scales):
    _check_teacher(_randn(*shape, seed=sum(shape)), scales)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_teacher_low_precision(dtype):
    _check_teacher(_randn(2, 17, 9, 11, dtype=dtype), (1, 2, 4))
    _check_teacher(_ints(1, 3, 5, 7, dtype=dtype), (2, 4))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_teacher_layouts(layout):
    t = _view(_randn(2, 5, 7, 9, seed=3), layout)
    _check_teacher(t, (1, 2, 4))
    pooled = teacher_saliency_pyramid(t, (2,))[0][1]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert pooled.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize(
    ("shape", "scales", "kw"),
    [
        ((2, 5, 9, 10), (1, 2, 4), {"tile": 4, "block_c": 2}),  # many regions and channel blocks
        ((1, 2, 6, 7), (1, 2, 4), {"tile": 1, "block_c": 1}),  # region = one window of the largest scale
        ((1, 3, 7, 8), (1, 3), {}),  # lcm 3: regions that are not powers of two
        ((1, 3, 7, 8), (2, 3), {"tile": 6}),  # lcm 6
        ((1, 2, 8, 7), (1, 2, 3, 4, 5, 6), {}),  # more scales than one launch holds
        ((1, 2, 5, 7), (5, 4, 1), {}),  # order kept; a window as large as the map
        ((2, 3, 9, 9), (9,), {}),  # a single window
    ],
)
def test_teacher_tiling_and_scale_sets(shape, scales, kw):
    _check_teacher(_randn(*shape, seed=5), scales, **kw)


def test_teacher_nan_inf():
    t = _randn(2, 3, 6, 7, seed=7)
    t[0, 0, 0, 1] = float("nan")
    t[0, 1, 2:4, 2:4] = float("-inf")  # a whole 2x2 window of -inf
    t[0, 2, 5, 6] = float("inf")  # in a partial window
    t[1, 0, 3, 3] = float("-inf")
    t[1, 1, 4, 0] = float("nan")
    t[1, 1, 4, 1] = float("inf")
    for layout in ("contiguous", "channels_last"):
        _check_teacher(_view(t, layout), (1, 2, 4))
    out = teacher_saliency_pyramid(t, (2, 4))
    assert out[0][1][0, 0, 0, 0].isnan() and out[0][2][0, 0, 0, 0].isnan() and out[0][3][0, 0].isnan()
    assert out[0][1][0, 1, 1, 1] == float("-inf") and out[0][2][0, 0, 1, 1] == float("inf")


def test_teacher_no_autograd():
    t = _randn(1, 3, 4, 4).requires_grad_()
    for s, t_s, sp, ch in teacher_saliency_pyramid(t, (1, 2)):
        assert not sp.requires_grad and not ch.requires_grad
        assert (t_s is t) if s == 1 else not t_s.requires_grad


@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("shape", SHAPES)
def test_student_forward_backward(shape, scales):
    x = _ints(*shape, seed=sum(shape))  # ties everywhere: the argmax routing must pick torch's position
    outs, refs, dx, dx64 = _student_vs_reference(x, scales)
    for (_, o), (_, r) in zip(outs, refs):
        assert o.dtype == r.dtype and torch.equal(o, r)
    if dx is not None:
        torch.testing.assert_close(dx, dx64.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_student_exact_with_integer_gradients(layout):
    x = _view(_ints(2, 5, 7, 9, seed=11, hi=2), layout)
    outs, refs, dx, dx64 = _student_vs_reference(x, (1, 2, 4), grad_kind="ints")
    for (_, o), (_, r) in zip(outs, refs):
        assert torch.equal(o, r)
    assert torch.equal(dx, dx64.float())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert outs[1][1].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_student_low_precision(dtype, layout):
    x = _view(_randn(2, 3, 9, 11, dtype=dtype, seed=2), layout)
    x[0, 0, :4, :4] = 1.0  # ties
    outs, refs, dx, dx64 = _student_vs_reference(x, (1, 2, 4))
    for (_, o), (_, r) in zip(outs, refs):
        assert o.dtype == dtype and torch.equal(o, r)
    assert dx.dtype == dtype
    torch.testing.assert_close(dx.float(), dx64.to(dtype).float(), rtol=GRAD_RTOL[dtype], atol=1e-5)


def test_student_non_contiguous_upstream_gradients():
    x = _randn(2, 3, 7, 6, seed=4).requires_grad_()
    outs = max_pool_pyramid_student(x, (1, 2, 3))
    grads = [_randn(*o.shape, seed=20 + i) for i, (_, o) in enumerate(outs)]
    grads = [g.transpose(-1, -2).contiguous().transpose(-1, -2) for g in grads]  # stored (N, C, W, H)
    grads[1] = _randn(*outs[1][1].shape, seed=30).contiguous(memory_format=torch.channels_last)
    torch.autograd.backward([o for _, o in outs], grads)
    x64 = x.detach().double().requires_grad_()
    torch.autograd.backward([o for _, o in FN.maxpool_pyramid(x64, (1, 2, 3))], [g.double() for g in grads])
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("used", [(1,), (4,), (2,), (1, 4), ()])
def test_student_partial_use(used):
    """Only some scales reach the loss: the others get no gradient (None, not zeros)."""
    x = _randn(1, 3, 9, 10, seed=6).requires_grad_()
    outs = dict(max_pool_pyramid_student(x, (1, 2, 4)))
    loss = sum(((k + 1.5) * outs[s]).sum() for k, s in enumerate(used)) + 0.0 * x.sum()
    loss.backward()
    x64 = x.detach().double().requires_grad_()
    ref = dict(FN.maxpool_pyramid(x64, (1, 2, 4)))
    (sum(((k + 1.5) * ref[s]).sum() for k, s in enumerate(used)) + 0.0 * x64.sum()).backward()
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-6, atol=1e-6)


def test_student_many_scales_accumulate():
    """More pooled scales than one backward launch holds (a second launch adds to dX)."""
    x = _ints(1, 2, 8, 7, seed=8)
    scales = (1, 2, 3, 4, 5, 6)
    outs, refs, dx, dx64 = _student_vs_reference(x, scales, grad_kind="ints")
    assert [s for s, _ in outs] == [1, 2, 3, 4, 5, 6]
    for (_, o), (_, r) in zip(outs, refs):
        assert torch.equal(o, r)
    assert torch.equal(dx, dx64.float())


@pytest.mark.parametrize("kw", [{"tile": 4, "block_c": 2}, {"tile": 1, "block_c": 1}])
def test_student_tiling(kw):
    """Many regions / pixel tiles and channel blocks, forward and backward."""
    x = _ints(1, 5, 9, 7, seed=9) if kw["tile"] > 1 else _ints(1, 2, 5, 6, seed=9)
    outs, refs, dx, dx64 = _student_vs_reference(x, (1, 2, 4), grad_kind="ints", **kw)
    for (_, o), (_, r) in zip(outs, refs):
        assert torch.equal(o, r)
    assert torch.equal(dx, dx64.float())


def test_student_nan_inf_routing():
    """NaN: torch's backward routes to the window's last NaN; an all -inf window to its first position."""
    x = _ints(2, 3, 6, 7, seed=12)
    x[0, 0, 0, 1] = float("nan")
    x[0, 0, 1, 0] = float("nan")  # the same 2x2 window: the last NaN gets the gradient
    x[0, 1, 0:4, 0:4] = float("-inf")
    x[0, 2, 5, 6] = float("inf")
    x[1, 0, 2, 2] = float("inf")
    x[1, 0, 2, 3] = float("inf")  # tied +inf
    x[1, 1, 4, 4] = float("nan")
    for layout in ("contiguous", "channels_last"):
        xv = _view(x, layout)
        outs, refs, dx, _ = _student_vs_reference(xv, (1, 2, 4), grad_kind="ints")
        for (_, o), (_, r) in zip(outs, refs):
            torch.testing.assert_close(o, r, rtol=0, atol=0, equal_nan=True)
        # torch's own float32 autograd (not float64: the upcast keeps NaN positions, but compare the real thing)
        xr = xv.detach().clone().requires_grad_()
        refs = FN.maxpool_pyramid(xr, (1, 2, 4))
        grads = [_ints(*r.shape, seed=10 + i) for i, (_, r) in enumerate(refs)]
        torch.autograd.backward([r for _, r in refs], grads)
        assert torch.equal(dx, xr.grad)


def test_student_without_grad_and_identity():
    x = _randn(1, 2, 5, 5)
    out = max_pool_pyramid_student(x, (1, 2, 4))
    assert out[0][1] is x and [s for s, _ in out] == [1, 2, 4]
    for s, o in out[1:]:
        assert torch.equal(o, F.max_pool2d(x, s, s, ceil_mode=True))
    xg = x.clone().requires_grad_()
    assert max_pool_pyramid_student(xg, (1,))[0][1] is xg
    assert max_pool_pyramid_student(xg, (8,)) == []
    with torch.no_grad():
        assert max_pool_pyramid_student(xg, (1, 2))[0][1] is xg
    with_grad = max_pool_pyramid_student(xg, (1, 2))
    assert with_grad[0][1].data_ptr() == xg.data_ptr() and with_grad[0][1].requires_grad


def test_float64_uses_reference():
    x = _randn(1, 2, 5, 5).double().requires_grad_()
    out = max_pool_pyramid_student(x, (1, 2))
    assert torch.equal(out[1][1], F.max_pool2d(x, 2, 2, ceil_mode=True))
    out[1][1].sum().backward()
    _check_teacher(x.detach(), (1, 2))


@settings(max_examples=30)
@given(
    n=st.integers(1, 2),
    c=st.integers(1, 6),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    scales=st.lists(st.integers(1, 5), min_size=1, max_size=3, unique=True).map(tuple),
    layout=st.sampled_from(LAYOUTS),
    ties=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz(n, c, h, w, scales, layout, ties, seed):
    x = _view((_ints if ties else _randn)(n, c, h, w, seed=seed), layout)
    _check_teacher(x, scales)
    outs, refs, dx, dx64 = _student_vs_reference(x, scales)
    for (_, o), (_, r) in zip(outs, refs):
        assert torch.equal(o, r)
    if dx is not None:
        torch.testing.assert_close(dx, dx64.float(), rtol=1e-6, atol=1e-6)
