"""The masked-branches kernel (every branch's masked input from one read of x, and the summed
gradient in one pass) against ``x * m`` with autograd.

Masks are 0/1, so every product is exact: values match the reference bit for bit in every
dtype, NaN and Inf included, and so do float32 gradients. A half-precision gradient of two
branches is a sum rounded once to the dtype: on a GPU that is torch's rounding, but the
interpreter truncates float32 -> float16/bfloat16, so there it may differ by one unit in the
last place (rtol = the dtype's eps).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from famkd_losses.kernels import HAS_TRITON, can_run
from famkd_losses.kernels.masking import masked_branches, supported

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not (HAS_TRITON and can_run(torch.empty(1, device=DEVICE))),
    reason="triton is not installed (or neither CUDA nor TRITON_INTERPRET=1)",
)
# (2, 3, 30, 40): several row and column tiles in both layouts
SHAPES = [
    (2, 5, 3, 4),
    (1, 1, 1, 1),
    (1, 3, 1, 1),
    (2, 17, 7, 9),
    (3, 65, 1, 5),
    (1, 2, 9, 1),
    (1, 1, 4, 6),
    (2, 3, 30, 40),
]
MASK_SETS = [("sp",), ("ch",), ("sp", "ch"), ("ch", "sp"), ("sp", "sp")]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _mask(kind: str, shape, gen: torch.Generator) -> torch.Tensor:
    n, c, h, w = shape
    size = (n, 1, h, w) if kind == "sp" else (n, c, 1, 1)
    return (torch.rand(size, generator=gen) > 0.4).float().to(DEVICE)


def _case(shape, kinds, dtype=torch.float32, layout="contiguous", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype).to(DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    masks = [_mask(k, shape, gen) for k in kinds]
    grads = [(torch.randn(shape, generator=gen)).to(dtype).to(DEVICE) for _ in kinds]
    return x.requires_grad_(), masks, grads


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Dense in the same memory order (strides of size-1 dims may differ)."""
    return all(a.is_contiguous(memory_format=f) == b.is_contiguous(memory_format=f) for f in FORMATS)


FORMATS = (torch.contiguous_format, torch.channels_last)


def _check(x, masks, grads):
    assert supported(x, masks)
    ys = masked_branches(x, masks)
    ref = [x * m.to(x.dtype) for m in masks]
    for y, r in zip(ys, ref):
        assert y.dtype == x.dtype and y.shape == x.shape and _same_layout(y, x)
        assert torch.equal(y.detach(), r.detach())  # NaN-free inputs here: exact
    (dx,) = torch.autograd.grad(ys, x, grads)
    (dr,) = torch.autograd.grad(ref, x, grads)
    assert dx.dtype == x.dtype and _same_layout(dx, x)
    if x.dtype == torch.float32 or len(masks) == 1 or DEVICE == "cuda":
        assert torch.equal(dx, dr)
    else:
        torch.testing.assert_close(dx, dr, rtol=torch.finfo(x.dtype).eps, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kinds", MASK_SETS, ids="-".join)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, kinds, layout):
    _check(*_case(shape, kinds, layout=layout, seed=sum(shape)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_half_dtypes(dtype, layout):
    _check(*_case((2, 33, 5, 6), ("sp", "ch"), dtype=dtype, layout=layout, seed=3))


def test_one_output_unused_gets_no_gradient_from_it():
    x, masks, grads = _case((2, 6, 4, 5), ("sp", "ch"), seed=1)
    ys = masked_branches(x, masks)
    (dx,) = torch.autograd.grad(0.7 * (ys[1] * grads[1]).sum(), x)
    torch.testing.assert_close(dx, 0.7 * grads[1] * masks[1], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # numpy, interpreter
def test_nan_and_inf_propagate_as_in_the_reference():
    x, masks, _ = _case((1, 4, 3, 3), ("sp", "ch"), seed=2)
    with torch.no_grad():
        x[0, 0, 0, 0] = float("nan")
        x[0, 1, 1, 1] = float("inf")
        x[0, 2, 2, 2] = float("-inf")
    ys = masked_branches(x, masks)
    for y, m in zip(ys, masks):
        torch.testing.assert_close(y, x * m, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["sliced", "float64", "three_masks", "wrong_mask_shape"])
def test_falls_back_to_the_reference(case):
    x, masks, grads = _case((2, 4, 5, 6), ("sp", "ch"), seed=4)
    if case == "sliced":
        x = x.detach()[..., 1:].requires_grad_()
        masks = [m[..., 1:] if m.shape[-1] > 1 else m for m in masks]
        grads = [g[..., 1:] for g in grads]
    elif case == "float64":
        x = x.detach().double().requires_grad_()
        grads = [g.double() for g in grads]
    elif case == "three_masks":
        masks = [*masks, masks[0]]
        grads = [*grads, grads[0]]
    else:
        masks = [masks[0][:, :, :1]]
        grads = grads[:1]
    assert not supported(x, masks)
    ys = masked_branches(x, masks)
    ref = [x * m.to(x.dtype) for m in masks]
    for y, r in zip(ys, ref):
        assert torch.equal(y, r)


@settings(max_examples=60)
@given(
    n=st.integers(1, 3),
    c=st.sampled_from([1, 2, 3, 7, 16, 33]),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    kinds=st.sampled_from(MASK_SETS),
    layout=st.sampled_from(["contiguous", "channels_last"]),
    seed=st.integers(0, 2**16),
)
def test_fuzz(n, c, h, w, kinds, layout, seed):
    _check(*_case((n, c, h, w), kinds, layout=layout, seed=seed))


# ---------------------------------------------------------------------------------------------
# topk_mask: the rank-counting kernel against functional.topk_mask (stable sort, ones, scatter)
# ---------------------------------------------------------------------------------------------


def _scores(n, m, kind, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: ties everywhere
        x = torch.randint(0, 4, (n, m), generator=gen).float()
    elif kind == "special":  # NaN, +-inf, -0.0 and +0.0 among ties
        x = torch.randint(-2, 3, (n, m), generator=gen).float()
        pick = torch.randint(0, 6, (n, m), generator=gen)
        x[pick == 0] = float("nan")
        x[pick == 1] = float("inf")
        x[pick == 2] = float("-inf")
        # -0.0 ties with +0.0 (torch's CPU sort); CUDA's radix sort may put it first. The
        # losses rank non-negative saliencies, which have no -0.0.
        x[pick == 3] = -0.0 if DEVICE == "cpu" else 0.0
    else:
        x = torch.randn(n, m, generator=gen)
    return x.to(dtype).to(DEVICE)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("kind", ["random", "ties", "special"])
@pytest.mark.parametrize("m", [1, 2, 63, 64, 65, 257])
def test_topk_mask_matches_the_stable_sort(m, kind, largest):
    from famkd_losses.functional.masks import topk_mask as reference
    from famkd_losses.kernels.masking import topk_mask

    scores = _scores(3, m, kind, seed=m)
    for ratio in (0.0, 0.25, 0.5, 0.65, 1.0):
        got = topk_mask(scores, ratio, largest=largest)
        assert got.dtype == torch.float32
        assert torch.equal(got, reference(scores, ratio, largest=largest)), (ratio, scores)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_topk_mask_half_scores(dtype):
    from famkd_losses.functional.masks import topk_mask as reference
    from famkd_losses.kernels.masking import topk_mask

    scores = _scores(2, 100, "special", dtype=dtype, seed=5)
    for largest in (True, False):
        assert torch.equal(topk_mask(scores, 0.4, largest=largest), reference(scores, 0.4, largest=largest))


def test_topk_mask_strided_rows_and_long_rows():
    from famkd_losses.functional.masks import topk_mask as reference
    from famkd_losses.kernels.masking import MAX_RANK_ENTRIES, topk_mask

    scores = _scores(5, 70, "ties", seed=6).t()  # (70, 5), columns of a wider tensor: row stride 1
    assert torch.equal(topk_mask(scores, 0.4), reference(scores, 0.4))
    long = _scores(1, MAX_RANK_ENTRIES + 1, "ties", seed=7)  # longer rows keep the sort
    assert torch.equal(topk_mask(long, 0.5), reference(long, 0.5))


@settings(max_examples=60)
@given(
    n=st.integers(1, 3),
    m=st.integers(1, 200),
    kind=st.sampled_from(["random", "ties", "special"]),
    ratio=st.floats(0.0, 1.0),
    largest=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_topk_mask_fuzz(n, m, kind, ratio, largest, seed):
    from famkd_losses.functional.masks import topk_mask as reference
    from famkd_losses.kernels.masking import topk_mask

    scores = _scores(n, m, kind, seed=seed)
    assert torch.equal(topk_mask(scores, ratio, largest=largest), reference(scores, ratio, largest=largest))
