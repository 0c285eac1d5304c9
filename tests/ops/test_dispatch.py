"""`famkd_losses.ops`: which implementation each backend runs, and ``backend="auto"``'s check of a
kernel on its first (operation, device, dtype), with faulty and raising kernels injected."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch

from famkd_losses import FAMKDLoss, MGDLoss, ops
from famkd_losses.kernels import can_run
from famkd_losses.ops import _dispatch
from famkd_losses.ops._dispatch import dispatch

needs_kernels = pytest.mark.skipif(
    not can_run(torch.zeros(1)) and not torch.cuda.is_available(),
    reason="triton kernels need triton and CUDA, or TRITON_INTERPRET=1 on CPU",
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    """Every test starts with no verdicts and verification on; "auto" treats the interpreter's
    CPU tensors as a device the kernels run on (as it does CUDA tensors)."""
    monkeypatch.delenv(_dispatch.VERIFY_ENV, raising=False)
    monkeypatch.setattr(_dispatch, "_auto_runs_kernels", lambda tensors: can_run(*tensors))
    ops.reset_verification()
    yield
    ops.reset_verification()


def _square(x):
    return x.square()


class _WrongBackward(torch.autograd.Function):
    """x^2 forward, but a gradient of x instead of 2x."""

    @staticmethod
    def forward(ctx, x):
        return x.square()

    @staticmethod
    def backward(ctx, grad):
        return grad


def _run(kernel, backend="auto", x=None):
    x = torch.linspace(-2, 3, 7, device=DEVICE).requires_grad_(True) if x is None else x
    return dispatch("square", backend, kernel, _square, (x,), accepts=lambda x: True), x


@needs_kernels
def test_a_correct_kernel_is_verified_once_and_logged(caplog):
    calls = []

    def kernel(x):
        calls.append(1)
        return x * x

    with caplog.at_level(logging.INFO, logger="famkd_losses"):
        out, x = _run(kernel)
        _run(kernel)
    assert len(calls) == 3  # the check's own call, then the two real ones
    assert ops.verified() == {("square", str(x.device), torch.float32): True}
    lines = [r.getMessage() for r in caplog.records if "verified" in r.getMessage()]
    assert len(lines) == 1 and "'square'" in lines[0]
    torch.testing.assert_close(out, x.detach().square())


@needs_kernels
@pytest.mark.parametrize(
    ("kernel", "message"),
    [
        (lambda x: x.square() + 1e-2, "output 0: max abs difference"),
        (lambda x: _WrongBackward.apply(x), "gradient 0: max abs difference"),
        (lambda x: (_ for _ in ()).throw(RuntimeError("no kernel image for this device")), "raised RuntimeError"),
    ],
    ids=["wrong-forward", "wrong-backward", "raises"],
)
def test_a_faulty_kernel_warns_once_and_the_reference_runs_from_then_on(kernel, message):
    with pytest.warns(RuntimeWarning, match=message) as record:
        out, x = _run(kernel)
    assert "'square'" in str(record[0].message) and "triton" in str(record[0].message)
    torch.testing.assert_close(out, x.detach().square(), rtol=0, atol=0)
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(g, 2 * x.detach(), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        again, _ = _run(kernel)
    torch.testing.assert_close(again, out)
    assert list(ops.verified().values()) == [False]


@needs_kernels
def test_forward_only_verdict_is_completed_when_a_gradient_is_first_needed():
    x = torch.linspace(-1, 1, 5, device=DEVICE)
    with torch.no_grad():
        _run(_WrongBackward.apply, x=x.clone().requires_grad_(True))
    assert list(ops.verified().values()) == ["forward"]
    with pytest.warns(RuntimeWarning, match="gradient"):
        _run(_WrongBackward.apply)
    assert list(ops.verified().values()) == [False]


@needs_kernels
def test_verdicts_are_per_dtype():
    _run(lambda x: x * x)
    with pytest.warns(RuntimeWarning):
        _run(lambda x: x.square() + 1.0, x=torch.ones(3, device=DEVICE, dtype=torch.float16))
    verdicts = {k[2]: v for k, v in ops.verified().items()}
    assert verdicts == {torch.float32: True, torch.float16: False}


@needs_kernels
def test_verification_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FAMKD_LOSSES_VERIFY_KERNELS", "0")
    out, x = _run(lambda x: x.square() + 1.0)  # trusted: its (wrong) result is used
    torch.testing.assert_close(out, x.detach().square() + 1.0)
    assert ops.verified() == {}


@needs_kernels
def test_backend_triton_is_strict_and_torch_never_calls_a_kernel():
    out, x = _run(lambda x: x.square() + 1.0, backend="triton")  # no check
    torch.testing.assert_close(out, x.detach().square() + 1.0)
    with pytest.raises(RuntimeError, match="boom"):
        _run(lambda x: (_ for _ in ()).throw(RuntimeError("boom")), backend="triton")

    def never(x):
        raise AssertionError("backend='torch' must not call a kernel")

    for backend in ("torch", "compile"):
        out, x = _run(never, backend=backend)
        torch.testing.assert_close(out, x.detach().square())
    assert ops.verified() == {}


@needs_kernels
def test_a_reference_error_is_the_users_error_and_no_verdict():
    def reference_raises(x):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        dispatch("op", "auto", _square, reference_raises, (torch.ones(2, device=DEVICE),), accepts=lambda x: True)
    assert ops.verified() == {}


@needs_kernels
def test_the_real_kernels_pass_their_check_inside_famkd():
    g = torch.Generator().manual_seed(0)
    s = [torch.randn(2, 4, h, w, generator=g).to(DEVICE).requires_grad_(True) for h, w in [(6, 5), (3, 3)]]
    t = [torch.randn(2, 6, h, w, generator=g).to(DEVICE) for h, w in [(6, 5), (3, 3)]]
    zs = [torch.randn(2, 3, h, w, generator=g).to(DEVICE).requires_grad_(True) for h, w in [(6, 5), (3, 3)]]
    zt = [torch.randn(2, 3, h, w, generator=g).to(DEVICE) for h, w in [(6, 5), (3, 3)]]
    kw = {"num_classes": 3, "weighting": "attention", "seed": 0}
    ref = FAMKDLoss([4, 4], [6, 6], backend="torch", **kw).to(DEVICE)
    auto = FAMKDLoss([4, 4], [6, 6], backend="auto", **kw).to(DEVICE)
    auto.load_state_dict(ref.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = auto(s, t, zs, zt)
    torch.testing.assert_close(got, ref(s, t, zs, zt), rtol=1e-5, atol=1e-7)
    verdicts = {k[0]: v for k, v in ops.verified().items()}
    assert verdicts.pop("teacher_pyramid") == "forward"  # the teacher needs no gradient
    assert verdicts == {
        "maxpool_pyramid": True,
        "topk_mask": "forward",
        "masked_inputs": True,
        "reconstruction_error": True,
        "position_kl_and_prob_diff": True,
    }


@needs_kernels
def test_a_faulty_kernel_injected_into_a_loss_falls_back_to_the_reference(monkeypatch):
    from famkd_losses.kernels import reconstruction

    real = reconstruction.fused_reconstruction_error
    monkeypatch.setattr(reconstruction, "fused_reconstruction_error", lambda *a, **k: 1.5 * real(*a, **k))
    s = torch.randn(2, 4, 5, 5, device=DEVICE, requires_grad=True)
    t = torch.randn(2, 6, 5, 5, device=DEVICE)
    ref = MGDLoss(4, 6, backend="torch", seed=0).to(DEVICE)
    auto = MGDLoss(4, 6, backend="auto", seed=0).to(DEVICE)
    auto.load_state_dict(ref.state_dict())
    with pytest.warns(RuntimeWarning, match="'reconstruction_error'"):
        got = auto(s, t)
    torch.testing.assert_close(got, ref(s, t), rtol=1e-6, atol=0)
