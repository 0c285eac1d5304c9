"""The fused reconstruction kernel against the PyTorch reference: value, dR_b, dtheta.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET).

Tolerances: float32 value and gradients rtol 1e-5 (only the summation order differs); dtheta
also gets an atol of 1e-5 x sum_b |dL/dR_fused * R_b| (it is a difference of sums). float16 and
bfloat16 are compared with the float32 reference on the same rounded inputs (the reference
promotes them to float32): the value at rtol 1e-5; dR_b, rounded once to the input dtype, to one
unit in the last place (rtol 1e-3 float16, 8e-3 bfloat16: the interpreter truncates float32 ->
bfloat16 where the GPU rounds to nearest).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import famkd_losses.functional as FK
from famkd_losses.kernels import HAS_TRITON, can_run
from famkd_losses.kernels.reconstruction import fused_reconstruction_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernel = pytest.mark.skipif(
    not (HAS_TRITON and can_run(torch.empty(1, device=DEVICE))),
    reason="triton is not installed (or neither CUDA nor TRITON_INTERPRET=1)",
)

WEIGHTINGS = ("none", "both", "sp", "ch")
LAYOUTS = ("contiguous", "channels_last", "strided_w", "sliced", "sliced_cl", "permuted", "mixed")
LOW_RTOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _view(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to x (N, C, H, W) with the given memory layout, as a fresh leaf."""
    n, c, h, w = x.shape
    if layout == "channels_last":
        y = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided_w":  # every other column of a wider map: H and W still merge
        y = x.new_zeros(n, c, h, 2 * w)[..., ::2]
        y.copy_(x)
    elif layout == "sliced":  # a window of a larger map: H and W do not merge
        y = x.new_zeros(n, c, h + 1, w + 2)[:, :, 1:, 1 : w + 1]
        y.copy_(x)
    elif layout == "sliced_cl":  # a window of a larger channels_last map: W stride C, no merge
        y = x.new_zeros(n, c, h + 2, w + 1).contiguous(memory_format=torch.channels_last)[:, :, 1 : h + 1, :w]
        y.copy_(x)
    elif layout == "permuted":  # stored (N, H, C, W)
        y = x.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    else:
        y = x.contiguous()
    return y.detach()


def _case(shape, branches=2, weighting="both", dtype=torch.float32, layout="contiguous", seed=0, theta=True):
    """recons (leaves), theta (leaf or None), target, a_sp, a_ch."""
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    target = torch.randn(shape, generator=gen).to(dtype)
    recons = [(torch.randn(shape, generator=gen) * 0.8 + 0.3 * b).to(dtype) for b in range(branches)]
    logits = torch.randn(branches, generator=gen) if theta else None
    if layout == "mixed":
        layouts = ["channels_last", "sliced", "permuted"]
    else:
        layouts = [layout] * 3
    recons = [_view(r, layouts[i]).to(DEVICE).requires_grad_() for i, r in enumerate(recons)]
    target = _view(target, layouts[2]).to(DEVICE)
    a_sp, a_ch = FK.teacher_attention(target, tau=0.5)
    if layout == "mixed":  # attention maps non-contiguous / broadcast too
        a_sp = a_sp.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
        a_ch = a_ch[:1].expand(n, c, 1, 1)
    a_sp = a_sp if weighting in ("both", "sp") else None
    a_ch = a_ch if weighting in ("both", "ch") else None
    if logits is not None:
        logits = logits.to(DEVICE).requires_grad_()
    return recons, logits, target, a_sp, a_ch


def _reference(recons, theta, target, a_sp, a_ch):
    weight = a_sp if a_ch is None else (a_ch if a_sp is None else a_sp * a_ch)
    return FK.reconstruction_error(FK.fuse_reconstructions(recons, theta), target, weight)


def _run(fn, recons, theta, target, a_sp, a_ch, g):
    """loss and the gradients (dR_0, [dR_1], [dtheta]) for an output gradient g."""
    leaves = [*recons, *([theta] if theta is not None and theta.requires_grad else [])]
    for t in leaves:
        t.grad = None
    loss = fn(recons, theta, target, a_sp, a_ch)
    if fn is fused_reconstruction_error:  # the kernel ran, not the fallback
        assert type(loss.grad_fn).__name__ == "_FusedReconstructionErrorBackward"
    loss.backward(torch.tensor(g, device=loss.device, dtype=loss.dtype))
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    return loss.detach(), grads


def _theta_atol(recons, theta, target, a_sp, a_ch, g) -> float:
    """1e-5 x sum_b |dL/dfused * R_b|: the scale of the sums behind dtheta."""
    with torch.no_grad():
        weight = 1.0
        if a_sp is not None:
            weight = weight * a_sp
        if a_ch is not None:
            weight = weight * a_ch
        d = FK.fuse_reconstructions(recons, theta) - target.float()
        gd = (2 * abs(g) / target.shape[0]) * weight * d
        return 1e-5 * sum(float((gd * r.float()).abs().sum()) for r in recons) + 1e-12


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill its storage span exactly (any dim order)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _check(case, g=1.0, rtol=1e-5):
    recons = case[0]
    loss_k, grads_k = _run(fused_reconstruction_error, *case, g)
    loss_r, grads_r = _run(_reference, *case, g)
    assert loss_k.dtype == torch.float32 and loss_k.shape == ()
    torch.testing.assert_close(loss_k, loss_r, rtol=1e-5, atol=1e-7)
    nr = len(recons)
    for r, gk, gr in zip(recons, grads_k[:nr], grads_r[:nr]):
        assert gk.dtype == r.dtype and gk.shape == r.shape
        if _dense(r):
            assert gk.stride() == r.stride()  # layout kept (channels_last stays channels_last)
        torch.testing.assert_close(gk, gr, rtol=rtol, atol=1e-6)
    if len(grads_k) > nr:
        atol = _theta_atol(*case, g)
        torch.testing.assert_close(grads_k[nr], grads_r[nr], rtol=1e-5, atol=atol)
    return loss_k, grads_k


@needs_kernel
@pytest.mark.parametrize("g", [1.0, -2.5])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("branches", [1, 2])
def test_matches_reference(branches, weighting, g):
    _check(_case((2, 3, 5, 7), branches, weighting, theta=branches == 2), g)


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 3, 1, 9), (2, 17, 7, 1), (1, 65, 17, 19), (3, 5, 1, 1)])
def test_awkward_shapes(shape):
    _check(_case(shape, seed=1), g=0.7)


@needs_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("branches", [1, 2])
def test_layouts(layout, branches):
    _check(_case((2, 6, 5, 3), branches, layout=layout, seed=2, theta=branches == 2), g=1.5)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("branches", [1, 2])
def test_low_precision(dtype, branches):
    case = _case((2, 17, 5, 7), branches, dtype=dtype, layout="channels_last", seed=3, theta=branches == 2)
    _check(case, g=0.3, rtol=LOW_RTOL[dtype])


@needs_kernel
def test_mixed_dtypes():
    """float16 and bfloat16 branches, float32 target: each gradient in its branch's dtype."""
    recons, theta, target, a_sp, a_ch = _case((2, 5, 4, 3), seed=4)
    recons = [recons[0].detach().half().requires_grad_(), recons[1].detach().bfloat16().requires_grad_()]
    _check((recons, theta, target, a_sp, a_ch), g=2.0, rtol=LOW_RTOL[torch.bfloat16])


@needs_kernel
def test_one_branch_with_logits():
    """theta of shape (1,): w = 1, dtheta = 0."""
    recons, _, target, a_sp, a_ch = _case((2, 3, 4, 4), branches=1, seed=5, theta=False)
    theta = torch.randn(1, device=DEVICE, requires_grad=True)
    _, grads = _check((recons, theta, target, a_sp, a_ch), g=3.0)
    assert torch.equal(grads[1], torch.zeros_like(theta))


@needs_kernel
@pytest.mark.parametrize("which", ["theta", "r0", "r1"])
def test_partial_requires_grad(which):
    """Only some inputs need a gradient: the others get none, the rest still match."""
    recons, theta, target, a_sp, a_ch = _case((2, 3, 5, 4), seed=6)
    recons = [r.detach().requires_grad_(which == f"r{i}") for i, r in enumerate(recons)]
    theta = theta.detach().requires_grad_(which == "theta")
    out = {}
    for name, fn in (("kernel", fused_reconstruction_error), ("ref", _reference)):
        loss = fn(recons, theta, target, a_sp, a_ch)
        assert fn is _reference or type(loss.grad_fn).__name__ == "_FusedReconstructionErrorBackward"
        leaf = theta if which == "theta" else recons[int(which[1])]
        (out[name],) = torch.autograd.grad(loss * 1.7, leaf)
    atol = _theta_atol(recons, theta, target, a_sp, a_ch, 1.7) if which == "theta" else 1e-6
    torch.testing.assert_close(out["kernel"], out["ref"], rtol=1e-5, atol=atol)


@needs_kernel
def test_deterministic():
    """Several programs (partial sums): two runs are bitwise equal."""
    from famkd_losses.kernels.reconstruction import _Launcher

    case = _case((2, 65, 17, 19), layout="sliced", seed=7)
    recons, _, target, a_sp, a_ch = case
    assert _Launcher(recons[0], recons[1], target, a_sp, a_ch).programs > 1
    loss1, grads1 = _run(fused_reconstruction_error, *case, 0.9)
    loss2, grads2 = _run(fused_reconstruction_error, *case, 0.9)
    assert torch.equal(loss1, loss2)
    assert all(torch.equal(a, b) for a, b in zip(grads1, grads2))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)  # kernel, fallback
def test_scale_is_folded_in(dtype):
    """``scale=k`` gives k times the loss and its gradients (the kernel applies it to its
    partial sums and to the incoming gradient; the fallback multiplies)."""
    case = _case((2, 7, 5, 6), dtype=dtype, seed=11)

    def scaled(recons, theta, target, a_sp, a_ch, scale=0.3):
        loss = fused_reconstruction_error(recons, theta, target, a_sp, a_ch, scale=scale)
        kernel = type(loss.grad_fn).__name__ == "_FusedReconstructionErrorBackward"
        assert kernel == (dtype == torch.float32)
        return loss

    loss, grads = _run(scaled, *case, -1.7)
    ref, ref_grads = _run(lambda *a: scaled(*a, scale=1.0), *case, -1.7 * 0.3)
    torch.testing.assert_close(loss, 0.3 * ref, rtol=1e-6, atol=0)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


@needs_kernel
@pytest.mark.parametrize("branches", [1, 2])
def test_row_of_a_logit_matrix(branches):
    """``row=i`` reads theta from row i of an (S, B) matrix and returns the matrix's gradient
    (row i filled, zeros elsewhere), as autograd through ``matrix[i]`` does."""
    recons, _, target, a_sp, a_ch = _case((2, 5, 4, 3), branches=branches, seed=12)
    matrix = torch.tensor([[0.3, -0.2], [1.1, 0.4], [-0.5, 0.2]])[:, :branches].to(DEVICE).requires_grad_()
    got = fused_reconstruction_error(recons, matrix, target, a_sp, a_ch, scale=0.7, row=1)
    assert type(got.grad_fn).__name__ == "_FusedReconstructionErrorBackward"
    ref = 0.7 * _reference(recons, matrix[1], target, a_sp, a_ch)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    g_got = torch.autograd.grad(-2.0 * got, [matrix, *recons])
    g_ref = torch.autograd.grad(-2.0 * ref, [matrix, *recons])
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert torch.equal(g_got[0][0], torch.zeros(branches, device=DEVICE))
    with pytest.raises(ValueError, match="row=3"):
        fused_reconstruction_error(recons, matrix, target, a_sp, a_ch, row=3)


@needs_kernel
def test_logits_changed_in_place_before_backward():
    """The backward uses the fusion weights of the forward (saved by the kernel), not the
    parameter, which an optimiser or EMA may change in place before backward runs."""
    recons, _, target, a_sp, a_ch = _case((2, 5, 4, 3), seed=13)
    matrix = torch.tensor([[0.3, -0.2], [1.1, 0.4]]).to(DEVICE).requires_grad_()
    got = fused_reconstruction_error(recons, matrix, target, a_sp, a_ch, row=1)
    frozen = matrix.detach().clone().requires_grad_()
    ref = _reference(recons, frozen[1], target, a_sp, a_ch)
    with torch.no_grad():
        matrix.add_(0.5)
    g_got = torch.autograd.grad(got, [matrix, *recons])
    g_ref = torch.autograd.grad(ref, [frozen, *recons])
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@needs_kernel
def test_no_grad_and_nonfinite():
    recons, theta, target, a_sp, a_ch = _case((1, 3, 4, 5), seed=8)
    with torch.no_grad():
        loss = fused_reconstruction_error(recons, theta, target, a_sp, a_ch)
    torch.testing.assert_close(loss, _reference(recons, theta, target, a_sp, a_ch).detach())
    target = target.clone()
    target[0, 1, 2, 3] = float("nan")
    assert torch.isnan(fused_reconstruction_error(recons, theta, target, a_sp, a_ch))


def test_fallbacks():
    """float64, a target that needs a gradient, 3 branches: the reference, with its gradients."""
    recons, theta, target, a_sp, a_ch = _case((2, 3, 4, 3), seed=9)
    r64 = [r.detach().double().requires_grad_() for r in recons]
    loss = fused_reconstruction_error(r64, theta, target.double(), a_sp.double(), a_ch.double())
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, _reference(r64, theta, target.double(), a_sp.double(), a_ch.double()))
    t_leaf = target.detach().requires_grad_()
    (gt,) = torch.autograd.grad(fused_reconstruction_error(recons, theta, t_leaf, a_sp, a_ch), t_leaf)
    (gt_ref,) = torch.autograd.grad(_reference(recons, theta, t_leaf, a_sp, a_ch), t_leaf)
    torch.testing.assert_close(gt, gt_ref)
    three = [*recons, recons[0].detach() * 0.5]
    theta3 = torch.randn(3, device=DEVICE)
    torch.testing.assert_close(
        fused_reconstruction_error(three, theta3, target), _reference(three, theta3, target, None, None)
    )
    with pytest.raises(ValueError, match="fusion_logits"):
        fused_reconstruction_error(recons, None, target)


def test_import_without_triton():
    """The module imports and computes (through the reference) when triton cannot be imported."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch\n"
        "from famkd_losses.kernels import HAS_TRITON\n"
        "from famkd_losses.kernels.reconstruction import fused_reconstruction_error as f\n"
        "assert not HAS_TRITON\n"
        "r = torch.ones(1, 2, 3, 3)\n"
        "assert float(f([r], None, torch.zeros_like(r))) == 18.0\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@needs_kernel
@settings(max_examples=40)
@given(
    n=st.integers(1, 3),
    c=st.sampled_from([1, 2, 3, 7, 17, 33, 65]),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    branches=st.sampled_from([1, 2]),
    weighting=st.sampled_from(WEIGHTINGS),
    layout=st.sampled_from(LAYOUTS),
    g=st.sampled_from([1.0, 0.25, -3.0]),
    seed=st.integers(0, 2**16),
)
def test_fuzz(n, c, h, w, branches, weighting, layout, g, seed):
    _check(_case((n, c, h, w), branches, weighting, layout=layout, seed=seed, theta=branches == 2), g)
