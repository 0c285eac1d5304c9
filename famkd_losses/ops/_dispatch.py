"""The choice between a fused kernel and its reference, and the check of a kernel on first use.

Every operation in `famkd_losses.ops` calls `dispatch` with its kernel and its reference (two
callables of the same arguments) and whether the kernel takes these inputs:

- ``backend="torch"`` / ``"compile"``: the reference, always;
- ``"triton"``: the kernel where it takes the inputs, else the reference (float64, empty
  maps, ...); an error when triton cannot run on the inputs' device at all;
- ``"auto"``: the kernel on CUDA tensors when triton is importable, but only once it has
  been *verified* for that (operation, device, dtype): on its first call there, kernel and
  reference run on detached copies of that call's inputs, forward and backward, and are
  compared under `TOLERANCES`. On an exception or a mismatch the operation warns once, naming
  the device, its capability, the triton version and the error, and runs the reference for
  that combination from then on. ``FAMKD_LOSSES_VERIFY_KERNELS=0`` in the environment turns
  the check off (for a setup already validated).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

from .._backend import use_triton
from .._eager import run_eagerly

__all__ = ["TOLERANCES", "VERIFY_ENV", "dispatch", "verification_enabled", "reset_verification", "verified"]

log = logging.getLogger("famkd_losses")

VERIFY_ENV = "FAMKD_LOSSES_VERIFY_KERNELS"
# (rtol, atol) per dtype of a compared tensor; atol is relative to the reference's largest magnitude (at least 1).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
}
# (operation, device, dtype) -> True (verified forward and backward), "forward" (forward only so
# far: no input needed a gradient), False (failed: the reference runs).
_VERIFIED: dict[tuple[str, str, torch.dtype], bool | str] = {}


def verification_enabled() -> bool:
    """Whether ``backend="auto"`` checks each kernel on first use (``FAMKD_LOSSES_VERIFY_KERNELS``, default on)."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def reset_verification() -> None:
    """Forget every verdict: each kernel is checked again on its next call."""
    _VERIFIED.clear()


def verified() -> dict[tuple[str, str, torch.dtype], bool | str]:
    """The verdicts so far: ``(operation, device, dtype) -> True | "forward" | False``."""
    return dict(_VERIFIED)


def _tensors(args: Any) -> list[Tensor]:
    return [x for x in tree_flatten(args)[0] if isinstance(x, Tensor)]


def _auto_runs_kernels(tensors: Sequence[Tensor]) -> bool:
    """Whether ``backend="auto"`` would run a kernel on these tensors (triton and CUDA tensors)."""
    return use_triton("auto", *tensors)


def dispatch(
    op: str,
    backend: str,
    kernel: Callable[..., Any],
    reference: Callable[..., Any],
    args: tuple,
    *,
    accepts: Callable[..., bool],
) -> Any:
    """``kernel(*args)`` or ``reference(*args)`` under ``backend`` (see the module docstring).

    ``accepts(*args)``: whether the kernel takes these inputs (dtypes, sizes, layouts); asked
    only once triton can run on the inputs' device.
    """
    if backend in ("torch", "compile"):
        return reference(*args)
    tensors = _tensors(args)
    if backend == "triton":
        use_triton("triton", *tensors)  # raises where triton cannot run at all
        return kernel(*args) if accepts(*args) else reference(*args)
    if not _auto_runs_kernels(tensors) or not accepts(*args):
        return reference(*args)
    if verification_enabled():
        key = (op, str(tensors[0].device), tensors[0].dtype)
        verdict = _VERIFIED.get(key)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        if verdict is None or (verdict == "forward" and needs_grad):
            verdict = _verify(op, key, kernel, reference, args, needs_grad)
        if verdict is None or verdict is False:  # None: the reference raised on these inputs; let it say why
            return reference(*args)
    return kernel(*args)


def _copies(args: tuple) -> tuple:
    """The arguments with every tensor detached (a leaf that needs a gradient where the original did)."""
    return tree_map(lambda x: x.detach().requires_grad_(x.requires_grad) if isinstance(x, Tensor) else x, args)


def _compare(name: str, got: Sequence[Tensor | None], want: Sequence[Tensor | None]) -> str | None:
    """A description of the first mismatch between two lists of tensors, or None."""
    if len(got) != len(want):
        return f"{name}: {len(got)} tensors against the reference's {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a is None or b is None:
            if (a is None) != (b is None):
                return f"{name} {i}: {'missing' if a is None else 'present'} where the reference's is not"
            continue
        if a.shape != b.shape:
            return f"{name} {i}: shape {tuple(a.shape)} against the reference's {tuple(b.shape)}"
        rtol, atol = TOLERANCES.get(b.dtype, TOLERANCES[torch.float32])
        a64, b64 = a.detach().double(), b.detach().double()
        finite = torch.isfinite(b64)
        scale = max(1.0, float(b64[finite].abs().max())) if bool(finite.any()) else 1.0
        if not torch.allclose(a64, b64, rtol=rtol, atol=atol * scale, equal_nan=True):
            err = (a64 - b64).abs().nan_to_num(nan=float("inf")).max()
            return f"{name} {i}: max abs difference {float(err):.3g} (rtol {rtol:g}, atol {atol * scale:.3g})"
    return None


@run_eagerly
def _verify(
    op: str,
    key: tuple[str, str, torch.dtype],
    kernel: Callable[..., Any],
    reference: Callable[..., Any],
    args: tuple,
    needs_grad: bool,
) -> bool | str | None:
    """Run kernel and reference on copies of ``args``, forward (and backward when ``needs_grad``),
    record and return the verdict; None (no verdict) when the reference itself raises."""
    ref_args, ker_args = _copies(args), _copies(args)
    try:
        want = _tensors(reference(*ref_args))
    except Exception:
        return None  # bad input: the reference call that follows raises the user's error
    try:
        got = _tensors(kernel(*ker_args))
        problem = _compare("output", got, want)
        if problem is None and needs_grad:
            problem = _compare_backward(got, want, _tensors(ker_args), _tensors(ref_args))
    except Exception as exc:
        problem = f"raised {type(exc).__name__}: {exc}"
    if problem is not None:
        _VERIFIED[key] = False
        warnings.warn(f"{_where(op, key)} failed its check ({problem}); {_FALLBACK}", RuntimeWarning, stacklevel=4)
        return False
    _VERIFIED[key] = True if needs_grad else "forward"
    log.info("%s verified against the PyTorch reference%s", _where(op, key), "" if needs_grad else " (forward)")
    return _VERIFIED[key]


_FALLBACK = (
    "the PyTorch reference runs this operation on this device and dtype from now on "
    "(backend='triton' would use the kernel regardless; set FAMKD_LOSSES_VERIFY_KERNELS=0 to skip the check)"
)


def _compare_backward(got: list[Tensor], want: list[Tensor], ker_in: list[Tensor], ref_in: list[Tensor]) -> str | None:
    """Backpropagate the same pseudo-random cotangents through both and compare the input gradients."""
    leaves = [i for i, t in enumerate(ref_in) if t.requires_grad]
    outs = [i for i, t in enumerate(want) if t.requires_grad and t.is_floating_point()]
    if not leaves or not outs:
        return None
    gen = torch.Generator().manual_seed(0)
    cot = [torch.randn(want[i].shape, generator=gen, dtype=torch.float64).to(want[i]) for i in outs]

    def grads(outputs: list[Tensor], inputs: list[Tensor]) -> list[Tensor | None]:
        live = [(o, c) for o, c in zip((outputs[i] for i in outs), cot) if o.requires_grad]
        return list(
            torch.autograd.grad(
                [o for o, _ in live], [inputs[i] for i in leaves], [c for _, c in live], allow_unused=True
            )
        )

    return _compare("gradient", grads(got, ker_in), grads(want, ref_in))


def _where(op: str, key: tuple[str, str, torch.dtype]) -> str:
    device = torch.device(key[1])
    name = cap = "?"
    if device.type == "cuda" and torch.cuda.is_available():
        name = torch.cuda.get_device_name(device)
        cap = "sm_{}{}".format(*torch.cuda.get_device_capability(device))
    try:
        import triton

        version = triton.__version__
    except Exception:
        version = "?"
    return f"famkd_losses: the fused kernel of '{op}' on {key[1]} ({name}, {cap}; triton {version}; {key[2]})"
