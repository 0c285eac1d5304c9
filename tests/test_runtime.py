"""Runtime behaviour of the loss modules: autocast, low-precision inputs and modules, memory
layouts, ``torch.compile``, two-process DDP, and copying / pickling / dtype conversion.

Every comparison is against the same computation in plain float32 (or on contiguous copies,
or eagerly, or in one process), with the tolerance stated where it is used.
"""

from __future__ import annotations

import copy
import os
import pickle
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from famkd_losses import FULL_METHOD, CWDLoss, FAMKDLoss, FGDLoss, KDLoss, MaskedLogitsLoss, MGDLoss, PKDLoss

N = 2
S_CH = [8, 16]  # level 0 needs an align conv (8 -> 16), level 1 is the identity
T_CH = [16, 16]
SIZES = [(8, 8), (4, 4)]
LOGIT_CH = 6  # dense logits (N, 6, H, W): one anchor, 6 classes
IMAGE_SIZE = (64, 64)
MASK_SEED = 1234  # the seed of MGD's (and FAMKD "sample"'s) masks: equal seeds give equal draws
PARAM_SEED = 0
BOXES = [
    torch.tensor([[4.0, 4.0, 30.0, 40.0]]),
    torch.tensor([[10.0, 20.0, 60.0, 50.0], [0.0, 0.0, 16.0, 16.0]]),
]

# Low-precision tolerances (stated once, used everywhere below).
LOW_RTOL = 1e-2  # loss (and FAMKD's last_terms()) of a bfloat16/float16 computation vs float32 (observed <= 4e-5)
MIN_COS = 0.99  # cosine similarity of each low-precision gradient with the float32 gradient
NORM_RTOL = 0.1  # and the ratio of their norms, within 1 +- NORM_RTOL
FP16_GRAD_SCALE = 2.0**16  # GradScaler's initial scale: float16 backward needs it (alpha = 2e-5 underflows)


@pytest.fixture(autouse=True)
def _single_thread():
    """One intra-op thread: these tensors are tiny, and with two threads every op waits on an
    OpenMP barrier, which costs 100x when other processes share the two cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# The modules under test, each with its inputs and its call
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple[list[Tensor], list[Tensor]]]  # (student, teacher)
    call: Callable[[nn.Module, list[Tensor], list[Tensor]], Tensor]

    def build(self, seed: int = PARAM_SEED) -> nn.Module:
        """A fresh module: parameters from ``torch.manual_seed(seed)``, mask streams at their start."""
        torch.manual_seed(seed)
        return self.factory()

    def make_inputs(self, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
        return self.inputs(torch.Generator().manual_seed(seed))


def _features(g: torch.Generator, s_ch: list[int] = S_CH) -> tuple[list[Tensor], list[Tensor]]:
    s = [torch.randn(N, c, h, w, generator=g) for c, (h, w) in zip(s_ch, SIZES)]
    t = [torch.randn(N, c, h, w, generator=g) * 1.5 + 0.2 for c, (h, w) in zip(T_CH, SIZES)]
    return s, t


def _dense_logits(g: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
    s = [torch.randn(N, LOGIT_CH, h, w, generator=g) for h, w in SIZES]
    t = [2.0 * torch.randn(N, LOGIT_CH, h, w, generator=g) for h, w in SIZES]
    return s, t


def _famkd_inputs(g: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
    s, t = _features(g)
    sl, tl = _dense_logits(g)
    return s + sl, t + tl


def _flat_logits(g: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
    return [torch.randn(N, 40, 5, generator=g)], [2.0 * torch.randn(N, 40, 5, generator=g)]


def _class_logits(g: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
    return [torch.randn(8, 10, generator=g)], [2.0 * torch.randn(8, 10, generator=g)]


CASES = {
    "famkd": Case(
        "famkd",
        lambda: FAMKDLoss(S_CH, T_CH, **FULL_METHOD),  # mask_mode="topk": deterministic
        _famkd_inputs,
        lambda m, s, t: m(s[:2], t[:2], s[2:], t[2:]),
    ),
    "mgd": Case("mgd", lambda: MGDLoss(S_CH, T_CH, seed=MASK_SEED), _features, lambda m, s, t: m(s, t)),
    "fgd": Case("fgd", lambda: FGDLoss(S_CH, T_CH), _features, lambda m, s, t: m(s, t, BOXES, IMAGE_SIZE)),
    "masked_logits": Case("masked_logits", MaskedLogitsLoss, _dense_logits, lambda m, s, t: m(s, t)),
    "masked_logits_flat": Case("masked_logits_flat", MaskedLogitsLoss, _flat_logits, lambda m, s, t: m(s[0], t[0])),
    "pkd": Case("pkd", PKDLoss, lambda g: _features(g, T_CH), lambda m, s, t: m(s, t)),
    "cwd": Case("cwd", CWDLoss, lambda g: _features(g, T_CH), lambda m, s, t: m(s, t)),
    "kd": Case("kd", KDLoss, _class_logits, lambda m, s, t: m(s[0], t[0])),
    # seeded random mask modes, for the copy / pickle / state_dict tests
    "famkd_sample": Case(
        "famkd_sample",
        lambda: FAMKDLoss(S_CH, T_CH, mask_mode="sample", seed=MASK_SEED),
        _famkd_inputs,
        lambda m, s, t: m(s[:2], t[:2], s[2:], t[2:]),
    ),
    "famkd_random": Case(
        "famkd_random",
        lambda: FAMKDLoss(S_CH, T_CH, mask_mode="random", seed=MASK_SEED),
        _famkd_inputs,
        lambda m, s, t: m(s[:2], t[:2], s[2:], t[2:]),
    ),
}
MAIN_CASES = ["famkd", "mgd", "fgd", "masked_logits", "pkd", "cwd", "kd"]


def _run(
    case: Case,
    module: nn.Module,
    student: list[Tensor],
    teacher: list[Tensor],
    *,
    autocast: torch.dtype | None = None,
    grad_scale: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward and backward; returns the loss and every gradient (student inputs and parameters)."""
    s = [x.detach().clone().requires_grad_() for x in student]
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else nullcontext()
    with ctx:
        loss = case.call(module, s, teacher)
    (loss * grad_scale).backward()
    grads = {f"student[{i}]": x.grad for i, x in enumerate(s)}
    inner = getattr(module, "_orig_mod", module)  # a torch.compile'd module's names lack the prefix
    grads.update({name: p.grad for name, p in inner.named_parameters()})
    missing = [name for name, g in grads.items() if g is None]
    assert not missing, f"{case.name}: no gradient reached {missing}"
    return loss.detach(), {name: g.detach().double() / grad_scale for name, g in grads.items()}


def _assert_terms_close(module: nn.Module, ref_module: nn.Module, rtol: float, what: str) -> None:
    """FAMKDLoss's parts (feature per level and scale, logits per level) agree too: the total is
    dominated by the logits part, so the feature part is checked on its own."""
    if not isinstance(module, FAMKDLoss):
        return
    terms, ref_terms = module.last_terms(), ref_module.last_terms()
    assert terms.keys() == ref_terms.keys() and "feature/level1/scale4" in terms
    for key, v in terms.items():
        assert v.dtype in (torch.float32, torch.float64), f"{what}: {key} is {v.dtype}"
        torch.testing.assert_close(v.double(), ref_terms[key].double(), rtol=rtol, atol=0.0, msg=f"{what}: {key}")


def _assert_grads_aligned(grads: dict[str, Tensor], ref: dict[str, Tensor], what: str) -> None:
    """Each gradient finite, within MIN_COS in direction and NORM_RTOL in norm of its reference."""
    assert grads.keys() == ref.keys()
    scale = max(r.norm().item() for r in ref.values())
    for name, g in grads.items():
        r = ref[name]
        assert g.shape == r.shape, f"{what}: {name} shape {tuple(g.shape)} vs {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{what}: gradient of {name} is not finite"
        rn, gn = r.norm().item(), g.norm().item()
        if rn <= 1e-12 * scale:  # e.g. FGD's W1 while W2 is zero-initialised: exactly zero
            assert gn <= 1e-6 * scale, f"{what}: {name} should have a zero gradient, has norm {gn}"
            continue
        cos = torch.dot(g.flatten(), r.flatten()).item() / (gn * rn + 1e-300)
        assert cos > MIN_COS, f"{what}: gradient of {name} has cosine {cos:.5f} with float32 (want > {MIN_COS})"
        assert abs(gn / rn - 1) < NORM_RTOL, f"{what}: gradient norm of {name} is {gn:.4g}, float32 {rn:.4g}"


def _assert_grads_close(grads: dict[str, Tensor], ref: dict[str, Tensor], rtol: float, what: str) -> None:
    """Elementwise closeness; the absolute floor is rtol times the largest entry of that gradient."""
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        r = ref[name]
        atol = rtol * max(r.abs().max().item(), 1e-30)
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{what}: {n}: {m}")


# --------------------------------------------------------------------------------------------
# 1. Autocast
# --------------------------------------------------------------------------------------------


def _cpu_autocast_supported(dtype: torch.dtype) -> bool:
    try:
        with torch.autocast("cpu", dtype=dtype):
            y = nn.Conv2d(2, 2, 1)(torch.randn(1, 2, 2, 2))
        return y.dtype == dtype
    except (RuntimeError, TypeError, ValueError):
        return False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", MAIN_CASES)
def test_autocast_matches_float32(name: str, dtype: torch.dtype) -> None:
    """Forward + backward under CPU autocast: float32 finite loss within LOW_RTOL of the float32
    loss; every gradient finite and aligned (cosine > MIN_COS) with the float32 gradient.
    float16 backward uses a GradScaler-like loss scale (alpha = 2e-5 makes the generators'
    gradients float16 subnormals otherwise), as float16 training does anyway."""
    if not _cpu_autocast_supported(dtype):
        pytest.skip(f"CPU autocast refuses {dtype} on this build")
    case = CASES[name]
    student, teacher = case.make_inputs()
    ref_module, module = case.build(), case.build()
    ref_loss, ref_grads = _run(case, ref_module, student, teacher)
    scale = FP16_GRAD_SCALE if dtype == torch.float16 else 1.0
    loss, grads = _run(case, module, student, teacher, autocast=dtype, grad_scale=scale)
    assert loss.dtype == torch.float32, f"{name} under {dtype} autocast returned {loss.dtype}"
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref_loss, rtol=LOW_RTOL, atol=0.0)
    _assert_terms_close(module, ref_module, LOW_RTOL, f"{name} autocast {dtype}")
    _assert_grads_aligned(grads, ref_grads, f"{name} autocast {dtype}")


# --------------------------------------------------------------------------------------------
# 2. bfloat16 / float16 inputs without autocast
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module_dtype", ["float32", "low"], ids=["module_fp32", "module_low"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", MAIN_CASES)
def test_low_precision_inputs(name: str, dtype: torch.dtype, module_dtype: str) -> None:
    """Student and teacher in bfloat16/float16, the module in float32 or ``.to(dtype)``.

    The reference is the float32 computation on the same (rounded) inputs and, for a
    low-precision module, on its rounded parameters, so the masks are the same. A float32
    module computes in float32 from those values: the loss agrees to 1e-4. A low-precision
    module runs its convs in that dtype: LOW_RTOL and MIN_COS.
    """
    case = CASES[name]
    student, teacher = case.make_inputs()
    low_s = [x.to(dtype) for x in student]
    low_t = [x.to(dtype) for x in teacher]
    module = case.build()
    ref_module = case.build()
    if module_dtype == "low":
        module = module.to(dtype)
        ref_module = ref_module.to(dtype).float()
        assert all(p.dtype == dtype for p in module.parameters())
    scale = FP16_GRAD_SCALE if (dtype == torch.float16 and module_dtype == "low") else 1.0
    ref_loss, ref_grads = _run(case, ref_module, [x.float() for x in low_s], [x.float() for x in low_t])
    loss, grads = _run(case, module, low_s, low_t, grad_scale=scale)
    assert loss.dtype == torch.float32, f"{name}: {dtype} inputs gave a {loss.dtype} loss"
    assert torch.isfinite(loss)
    for i, x in enumerate(low_s):
        assert grads[f"student[{i}]"].shape == x.shape
    rtol = 1e-4 if module_dtype == "float32" else LOW_RTOL
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0.0)
    _assert_terms_close(module, ref_module, rtol, f"{name} {dtype} inputs, {module_dtype} module")
    _assert_grads_aligned(grads, ref_grads, f"{name} {dtype} inputs, {module_dtype} module")


# --------------------------------------------------------------------------------------------
# 3. Memory layouts
# --------------------------------------------------------------------------------------------


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _strided(x: Tensor) -> Tensor:
    """The same values as a view that skips every other entry of dim 1: ``base[:, ::2]``."""
    base = x.new_full((x.shape[0], 2 * x.shape[1], *x.shape[2:]), float("nan"))
    base[:, ::2] = x
    return base[:, ::2]


def _transposed(x: Tensor) -> Tensor:
    """The same values stored with the last two dims swapped (H/W, or P/K of (N, P, K) logits)."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


LAYOUTS = {"channels_last": _channels_last, "strided": _strided, "transposed": _transposed}
LAYOUT_RTOL = 1e-5


LAYOUT_PARAMS = [
    (name, layout)
    for name in ["famkd", "mgd", "fgd", "pkd", "cwd", "masked_logits", "masked_logits_flat", "kd"]
    for layout in LAYOUTS
    if not (layout == "channels_last" and name in ("masked_logits_flat", "kd"))  # no 4-D tensor
]


@pytest.mark.parametrize(("name", "layout"), LAYOUT_PARAMS)
def test_layouts_match_contiguous(name: str, layout: str) -> None:
    """channels_last and non-contiguous student/teacher tensors (as leaves, so the gradients are
    taken with respect to the non-contiguous tensors themselves) give the loss and every
    gradient of contiguous copies, float32, rtol LAYOUT_RTOL (absolute floor LAYOUT_RTOL times
    the largest entry)."""
    case = CASES[name]
    transform = LAYOUTS[layout]
    student, teacher = case.make_inputs()
    odd_s = [transform(x).detach() for x in student]
    odd_t = [transform(x).detach() for x in teacher]
    assert any(not x.is_contiguous() for x in odd_s + odd_t), "the layout transform changed nothing"
    for a, b in zip(odd_s + odd_t, student + teacher):
        assert torch.equal(a, b)

    ref_loss, ref_grads = _run(case, case.build(), student, teacher)
    # _run clones the student leaves; clone() keeps a dense layout but not a gapped view, so
    # build the leaves here to keep them non-contiguous.
    module = case.build()
    s = [x.requires_grad_() for x in odd_s]
    assert [x.stride() for x in s] == [x.stride() for x in odd_s]
    loss = case.call(module, s, odd_t)
    loss.backward()
    grads = {f"student[{i}]": x.grad.double() for i, x in enumerate(s)}
    grads.update({n: p.grad.double() for n, p in module.named_parameters()})
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=LAYOUT_RTOL, atol=0.0)
    _assert_grads_close(grads, ref_grads, LAYOUT_RTOL, f"{name} {layout}")


# --------------------------------------------------------------------------------------------
# 4. torch.compile
# --------------------------------------------------------------------------------------------

COMPILE_RTOL = 1e-4


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile_inputs(seed: int, levels: int) -> tuple[list[Tensor], list[Tensor]]:
    s, t = CASES["famkd"].make_inputs(seed)
    return s[:levels] + s[2 : 2 + levels], t[:levels] + t[2 : 2 + levels]


def _famkd_call(levels: int) -> Callable[[nn.Module, list[Tensor], list[Tensor]], Tensor]:
    return lambda m, s, t: m(s[:levels], t[:levels], s[levels:], t[levels:])


@pytest.mark.slow
def test_compile_default_matches_eager(fresh_dynamo) -> None:
    """``torch.compile(FAMKDLoss(...), fullgraph=True)`` (inductor), 2 levels with logits, default
    options: loss, ``last_terms()`` and every gradient match eager (rtol COMPILE_RTOL), on two
    calls with different values; the second call must not recompile."""
    case = Case("famkd2", lambda: FAMKDLoss(S_CH, T_CH), _famkd_inputs, _famkd_call(2))
    eager = case.build()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    for call in range(2):
        student, teacher = _compile_inputs(call, 2)
        ref_loss, ref_grads = _run(case, eager, student, teacher)
        ref_terms = eager.last_terms()
        with torch._dynamo.config.patch(error_on_recompile=call > 0):
            loss, grads = _run(case, compiled, student, teacher)
        torch.testing.assert_close(loss, ref_loss, rtol=COMPILE_RTOL, atol=0.0)
        _assert_grads_close(grads, ref_grads, COMPILE_RTOL, f"compiled FAMKD call {call}")
        terms = compiled_module.last_terms()
        assert terms.keys() == ref_terms.keys()
        for key, v in terms.items():
            torch.testing.assert_close(v, ref_terms[key], rtol=COMPILE_RTOL, atol=1e-7 * ref_loss.abs().item())
        for p in list(eager.parameters()) + list(compiled_module.parameters()):
            p.grad = None


@pytest.mark.slow
def test_compile_sample_mode_matches_eager(fresh_dynamo) -> None:
    """``mask_mode="sample"`` with a seed under ``torch.compile(fullgraph=False)`` (inductor):
    the seeded mask draws graph-break (a ``torch.Generator`` is opaque to dynamo) and run
    eagerly, so the random stream is the eager one: five consecutive calls give the losses and
    gradients of an eager module with the same seed and state_dict (rtol COMPILE_RTOL). The
    stream's step (a host counter) runs eagerly too: no frame is compiled again after the
    second call. One level, to keep the many graph fragments cheap to compile."""

    def factory() -> nn.Module:
        return FAMKDLoss(S_CH[:1], T_CH[:1], mask_mode="sample", seed=MASK_SEED)

    case = Case("famkd_sample", factory, _famkd_inputs, _famkd_call(1))
    eager = case.build()
    compiled_module = case.build(seed=PARAM_SEED + 1)
    compiled_module.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_module, fullgraph=False)
    student, teacher = _compile_inputs(0, 1)
    losses = []
    frames = {}
    for call in range(5):
        ref_loss, ref_grads = _run(case, eager, student, teacher)
        loss, grads = _run(case, compiled, student, teacher)
        assert torch.isfinite(loss)
        torch.testing.assert_close(loss, ref_loss, rtol=COMPILE_RTOL, atol=0.0)
        _assert_grads_close(grads, ref_grads, COMPILE_RTOL, f"compiled sample-mode FAMKD call {call}")
        losses.append(loss.item())
        for p in list(eager.parameters()) + list(compiled_module.parameters()):
            p.grad = None
        frames[call] = torch._dynamo.utils.counters["frames"]["ok"]
    assert len(set(losses)) > 1, "the sample-mode masks did not change between calls"
    assert frames[4] == frames[1], f"frames compiled after the second call: {frames}"


# --------------------------------------------------------------------------------------------
# 5. DDP
# --------------------------------------------------------------------------------------------
#
# Why two ranks with half a batch each reproduce one process on the whole batch: every part of
# FAMKDLoss is a sum of per-image terms divided by the batch size N. The masks (top-k of the
# teacher's attention) and the logits weights (softmax over the positions of one image) are
# computed per image, so an image's term does not depend on the other images of its batch;
# the feature loss is sum(...)/N and the logits loss sum(W*KL)/(N*P). So with N = 4 split as
# 2 + 2, L_full = (L_rank0 + L_rank1) / 2, and DDP's gradient all-reduce averages the ranks'
# gradients, which gives exactly d L_full. (A batch statistic such as PKD's would break this.)

DDP_TIMEOUT_S = 120.0
DDP_BATCH = 4
DDP_STEPS = 2  # the second step also proves that every parameter took part (DDP checks it)


# name: (input side, levels, FAMKDLoss options); level l is (side / 2^l) square
DDP_CONFIGS = {
    "default": (8, 2, {}),
    # 4x4, 2x2 and 1x1 levels: the per-scale generators of the scales that a level is too small
    # for take part through a zero term (DDP fails on the second step otherwise)
    "full_unshared_small_levels": (4, 3, {**FULL_METHOD, "share_generators": False}),
}


class _Student(nn.Module):
    """A student conv producing FPN-like levels (each max-pools the last), and a shared 1x1 logits head."""

    def __init__(self, levels: int = 2) -> None:
        super().__init__()
        self.levels = levels
        self.stem = nn.Conv2d(3, S_CH[0], 3, padding=1)
        self.head = nn.Conv2d(S_CH[0], LOGIT_CH, 1)

    def forward(self, img: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        feats = [self.stem(img)]
        for _ in range(self.levels - 1):
            feats.append(F.max_pool2d(feats[-1], 2))
        return feats, [self.head(f) for f in feats]


class _Distiller(nn.Module):
    def __init__(self, config: str = "default") -> None:
        super().__init__()
        _, levels, options = DDP_CONFIGS[config]
        self.student = _Student(levels)
        self.distill = FAMKDLoss([S_CH[0]] * levels, [T_CH[0]] * levels, **options)

    def forward(self, img: Tensor, t_feats: list[Tensor], t_logits: list[Tensor]) -> Tensor:
        s_feats, s_logits = self.student(img)
        return self.distill(s_feats, t_feats, s_logits, t_logits)


def _ddp_data(config: str) -> dict:
    torch.manual_seed(PARAM_SEED)
    model = _Distiller(config).double()
    g = torch.Generator().manual_seed(7)
    side, levels, _ = DDP_CONFIGS[config]
    sizes = [(side >> level, side >> level) for level in range(levels)]
    c = T_CH[0]
    return {
        "config": config,
        "state": model.state_dict(),
        "img": torch.randn(DDP_BATCH, 3, side, side, generator=g, dtype=torch.float64),
        "t_feats": [torch.randn(DDP_BATCH, c, *hw, generator=g, dtype=torch.float64) for hw in sizes],
        "t_logits": [2 * torch.randn(DDP_BATCH, LOGIT_CH, *hw, generator=g, dtype=torch.float64) for hw in sizes],
    }


def _train(model: nn.Module, params_of: nn.Module, data: dict, rows: slice) -> list[dict]:
    """DDP_STEPS SGD steps on ``data[rows]``; each step's loss and parameter gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for _ in range(DDP_STEPS):
        opt.zero_grad()
        loss = model(data["img"][rows], [t[rows] for t in data["t_feats"]], [z[rows] for z in data["t_logits"]])
        loss.backward()
        grads = {}
        for name, p in params_of.named_parameters():
            assert p.grad is not None, f"no gradient for {name}"
            grads[name] = p.grad.detach().clone()
        out.append({"loss": loss.detach().clone(), "grads": grads})
        opt.step()
    return out


def _ddp_worker(rank: int, world_size: int, tmp_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    # keep gloo's sockets on the loopback interface (no hostname lookup, nothing leaves the machine)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    tmp = Path(tmp_dir)
    dist.init_process_group(
        "gloo",
        init_method=(tmp / "rendezvous").as_uri(),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=60),
    )
    try:
        data = torch.load(tmp / "data.pt")
        model = _Distiller(data["config"]).double()
        model.load_state_dict(data["state"])
        ddp = DistributedDataParallel(model, find_unused_parameters=False)  # the default, stated
        per_rank = DDP_BATCH // world_size
        result = _train(ddp, model, data, slice(rank * per_rank, (rank + 1) * per_rank))
        torch.save(result, tmp / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("config", list(DDP_CONFIGS))
def test_ddp_two_ranks_match_single_process(tmp_path: Path, config: str) -> None:
    """Two gloo ranks on CPU, each with half of a batch of 4, float64, ``find_unused_parameters=False``:
    after backward every gradient (student conv and head; align convs, generators and
    fusion_logits of the loss) equals the single-process gradient on the whole batch (rtol
    1e-5), over two SGD steps; the mean of the ranks' losses is the whole-batch loss. Configs:
    the defaults on 8x8 and 4x4 levels, and ``**FULL_METHOD, share_generators=False`` on 4x4,
    2x2 and 1x1 levels (scales 2 and 4 do not fit every level)."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this build")
    if not dist.is_gloo_available():
        pytest.skip("the gloo backend is not available in this build")
    import torch.multiprocessing as mp

    data = _ddp_data(config)
    torch.save(data, tmp_path / "data.pt")
    ctx = mp.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + DDP_TIMEOUT_S
    try:
        while not ctx.join(timeout=2):  # raises ProcessRaisedException with the rank's traceback
            if time.monotonic() > deadline:
                pytest.fail(f"DDP ranks did not finish within {DDP_TIMEOUT_S:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)

    model = _Distiller(config).double()
    model.load_state_dict(data["state"])
    ref = _train(model, model, data, slice(0, DDP_BATCH))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    names = {name for name, _ in model.named_parameters()}
    assert any(n.startswith("distill.") for n in names) and any(n.startswith("student.") for n in names)
    for step in range(DDP_STEPS):
        mean_loss = (ranks[0][step]["loss"] + ranks[1][step]["loss"]) / 2
        torch.testing.assert_close(mean_loss, ref[step]["loss"], rtol=1e-6, atol=0.0)
        for r in range(2):
            got = ranks[r][step]["grads"]
            assert got.keys() == ref[step]["grads"].keys() == names
            for name, g in got.items():
                want = ref[step]["grads"][name]
                torch.testing.assert_close(
                    g,
                    want,
                    rtol=1e-5,
                    atol=1e-8 * want.abs().max().item(),
                    msg=lambda m, n=name, r=r, s=step: f"step {s} rank {r} {n}: {m}",
                )


# Every parameter takes part in every step (what DDP with find_unused_parameters=False needs),
# whatever the configuration and however small the levels: a parameter with no gradient after
# backward is one DDP waits for forever.

_sides = st.sampled_from([1, 2, 3, 4, 5])
_level_sizes = st.lists(st.tuples(_sides, _sides), min_size=1, max_size=3)


def _level_inputs(g: torch.Generator, n: int, s_ch: list[int], t_ch: list[int], sizes: list[tuple[int, int]]):
    s = [torch.randn(n, c, h, w, generator=g).requires_grad_() for c, (h, w) in zip(s_ch, sizes)]
    t = [torch.randn(n, c, h, w, generator=g) for c, (h, w) in zip(t_ch, sizes)]
    return s, t


def _assert_every_parameter_has_a_gradient(module: nn.Module, loss: Tensor, students: list[Tensor]) -> None:
    assert torch.isfinite(loss)
    loss.backward()
    missing = [name for name, p in module.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(x.grad is not None for x in students)


@settings(max_examples=60)
@given(
    sizes=_level_sizes,
    scales=st.sampled_from([(1,), (1, 2, 4), (2, 4), (4,), (1, 3)]),
    share=st.booleans(),
    branches=st.sampled_from([("spatial", "channel"), ("spatial",), ("channel",)]),
    mask_mode=st.sampled_from(["topk", "topk_nonsalient", "sample", "random"]),
    weighting=st.sampled_from(["none", "attention"]),
    logits=st.sampled_from([None, "logit", "feature"]),
    n=st.integers(1, 2),
)
def test_famkd_every_parameter_gets_a_gradient(sizes, scales, share, branches, mask_mode, weighting, logits, n):
    """FAMKDLoss in any configuration, levels from 1x1 to 5x5 (many smaller than some or every
    scale): after backward every parameter (align convs, every generator, fusion weights) has a
    gradient, and the loss is the one without the zero terms that reach the skipped ones."""
    s_ch, t_ch = [3] * len(sizes), [4] * len(sizes)
    torch.manual_seed(0)
    opts = {"scales": scales, "share_generators": share, "branches": branches, "mask_mode": mask_mode}
    loss_mod = FAMKDLoss(s_ch, t_ch, weighting=weighting, guidance=logits or "logit", seed=3, **opts)
    g = torch.Generator().manual_seed(len(sizes))
    s, t = _level_inputs(g, n, s_ch, t_ch, sizes)
    args = []
    if logits is not None:
        args = [[torch.randn(n, 2, h, w, generator=g, requires_grad=True) for h, w in sizes]]
        args.append([2 * torch.randn(n, 2, h, w, generator=g) for h, w in sizes])
    loss = loss_mod(s, t, *args)
    _assert_every_parameter_has_a_gradient(loss_mod, loss, s)
    terms = loss_mod.last_terms()
    want = terms["feature"] + (terms["logits"] if logits is not None else 0.0)
    torch.testing.assert_close(loss.detach(), want, rtol=0.0, atol=0.0)
    parts = sum(v for k, v in terms.items() if k.count("/") == 2)  # feature/level{l}/scale{s}
    torch.testing.assert_close(terms["feature"], torch.as_tensor(parts, dtype=loss.dtype), rtol=1e-6, atol=0.0)


@settings(max_examples=30)
@given(sizes=_level_sizes, mask=st.sampled_from(["spatial", "channel"]), seeded=st.booleans())
def test_mgd_every_parameter_gets_a_gradient(sizes, mask, seeded):
    s_ch, t_ch = [3] * len(sizes), [4] * len(sizes)
    loss_mod = MGDLoss(s_ch, t_ch, mask=mask, seed=5 if seeded else None)
    s, t = _level_inputs(torch.Generator().manual_seed(1), 2, s_ch, t_ch, sizes)
    _assert_every_parameter_has_a_gradient(loss_mod, loss_mod(s, t), s)


@settings(max_examples=30)
@given(sizes=_level_sizes, boxes=st.sampled_from([[0, 0], [1, 0], [2, 3]]))
def test_fgd_every_parameter_gets_a_gradient(sizes, boxes):
    s_ch, t_ch = [3] * len(sizes), [4] * len(sizes)
    loss_mod = FGDLoss(s_ch, t_ch)
    s, t = _level_inputs(torch.Generator().manual_seed(2), 2, s_ch, t_ch, sizes)
    bx = [torch.tensor([[2.0, 3.0, 20.0, 30.0]] * k).reshape(-1, 4) for k in boxes]
    _assert_every_parameter_has_a_gradient(loss_mod, loss_mod(s, t, bx, (32, 32)), s)


def test_losses_without_parameters_have_none():
    """PKD, CWD, KD and MaskedLogitsLoss have no parameters, so they cannot leave one out."""
    for module in (PKDLoss(), CWDLoss(), KDLoss(), MaskedLogitsLoss()):
        assert list(module.parameters()) == [], type(module).__name__


_SMALL_LEVELS = [(4, 4), (2, 2), (1, 1)]
_UNSHARED = {**FULL_METHOD, "share_generators": False}


def _small_levels_case(backend: str, sizes: list[tuple[int, int]] = _SMALL_LEVELS, **options) -> Case:
    levels = len(sizes)

    def inputs(g: torch.Generator) -> tuple[list[Tensor], list[Tensor]]:
        s, t = _level_inputs(g, N, [8] * levels, [16] * levels, sizes)
        s = [x.detach() for x in s]
        logits = [torch.randn(N, LOGIT_CH, h, w, generator=g) for h, w in sizes]
        return s + logits, t + [2 * z for z in logits]

    return Case(
        f"famkd_unshared_{backend}",
        lambda: FAMKDLoss([8] * levels, [16] * levels, backend=backend, **{**_UNSHARED, **options}),
        inputs,
        _famkd_call(levels),
    )


def test_skipped_generators_stay_out_of_the_value_and_of_nans() -> None:
    """The zero terms that reach the skipped scales' generators read no value: the loss equals
    the sum of the used scales' terms exactly, and a NaN in a skipped generator leaves it finite
    (while a NaN in a used one makes it NaN, as before)."""
    case = _small_levels_case("torch")
    student, teacher = case.make_inputs()
    module = case.build()
    ref = _losses(case, module, student, teacher, 1)[0]
    with torch.no_grad():
        module.feature_losses[2].generators["spatial"][2][0].weight.fill_(float("nan"))  # scale 4 of 1x1
        module.feature_losses[1].generators["channel"][2][2].bias.fill_(float("inf"))  # scale 4 of 2x2
    torch.testing.assert_close(_losses(case, module, student, teacher, 1)[0], ref, rtol=0.0, atol=0.0)
    with torch.no_grad():
        module.feature_losses[2].generators["spatial"][0][0].weight.fill_(float("nan"))  # scale 1: used
    assert torch.isnan(_losses(case, module, student, teacher, 1)[0])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_skipped_generators_get_zero_gradients(backend: str) -> None:
    """``**FULL_METHOD, share_generators=False`` on 4x4, 2x2 and 1x1 levels, with the reference
    and with the Triton kernels (interpreter on CPU): the skipped scales' generators get an
    all-zero gradient, the others a non-zero one, and both backends agree."""
    from famkd_losses.kernels import can_run

    if backend == "triton" and not can_run(torch.zeros(1)):
        pytest.skip("the Triton kernels need triton and TRITON_INTERPRET=1 on CPU")
    case = _small_levels_case(backend)
    student, teacher = case.make_inputs()
    loss, grads = _run(case, case.build(), student, teacher)
    for level, (h, w) in enumerate(_SMALL_LEVELS):
        for i, scale in enumerate(FULL_METHOD["scales"]):
            for b in FULL_METHOD["branches"]:
                prefix = f"feature_losses.{level}.generators.{b}.{i}."
                gen = [g for name, g in grads.items() if name.startswith(prefix)]
                assert len(gen) == 4
                if scale > min(h, w):  # skipped: exactly zero
                    assert all(bool((g == 0).all()) for g in gen), f"level {level} scale {scale} {b}"
                else:  # used: the last conv's bias sees the whole error
                    assert grads[prefix + "2.bias"].abs().max() > 0, f"level {level} scale {scale} {b}"
    if backend == "triton":
        ref_loss, ref_grads = _run(case, _small_levels_case("torch").build(), student, teacher)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0.0)
        _assert_grads_close(grads, ref_grads, 1e-4, "triton vs torch, small levels")


@pytest.mark.slow
def test_compile_small_levels_every_parameter_gets_a_gradient(fresh_dynamo) -> None:
    """``torch.compile(fullgraph=True)`` of ``**FULL_METHOD, share_generators=False`` with scales
    (1, 2) on one 1x1 level (small, to keep the compile short): the zero terms trace, every
    parameter gets a gradient, and loss and gradients match eager (rtol COMPILE_RTOL)."""
    case = _small_levels_case("torch", [(1, 1)], scales=(1, 2))
    eager = case.build()
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    student, teacher = case.make_inputs()
    ref_loss, ref_grads = _run(case, eager, student, teacher)
    loss, grads = _run(case, compiled, student, teacher)  # _run asserts that no gradient is missing
    torch.testing.assert_close(loss, ref_loss, rtol=COMPILE_RTOL, atol=0.0)
    _assert_grads_close(grads, ref_grads, COMPILE_RTOL, "compiled FAMKD, small levels")


# --------------------------------------------------------------------------------------------
# 6. deepcopy, pickle, state_dict, .to(dtype) (float64 included)
# --------------------------------------------------------------------------------------------

COPY_CASES = [*MAIN_CASES, "famkd_sample", "famkd_random"]


def _losses(case: Case, module: nn.Module, student: list[Tensor], teacher: list[Tensor], calls: int = 2) -> Tensor:
    with torch.no_grad():
        return torch.stack([case.call(module, student, teacher) for _ in range(calls)])


@pytest.mark.parametrize("name", COPY_CASES)
def test_deepcopy_and_pickle(name: str) -> None:
    """A deepcopy and a pickle round trip of a fresh module (seeded where random) give the same
    losses as the original on two consecutive calls: same parameters, same mask streams."""
    case = CASES[name]
    student, teacher = case.make_inputs()
    module = case.build()
    copied = copy.deepcopy(module)
    unpickled = pickle.loads(pickle.dumps(module))
    want = _losses(case, module, student, teacher)
    assert torch.isfinite(want).all()
    for other, how in ((copied, "deepcopy"), (unpickled, "pickle")):
        assert type(other) is type(module)
        for (n1, p1), (n2, p2) in zip(module.named_parameters(), other.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
        torch.testing.assert_close(_losses(case, other, student, teacher), want, rtol=0.0, atol=0.0, msg=how)


@pytest.mark.parametrize("name", COPY_CASES)
def test_state_dict_round_trip(name: str) -> None:
    """A module built from another parameter seed and given the state_dict computes the same losses."""
    case = CASES[name]
    student, teacher = case.make_inputs()
    module = case.build()
    state = module.state_dict()
    other = case.build(seed=PARAM_SEED + 1)
    if len(state) > 0:  # differently initialised parameters must give another loss first
        assert not torch.equal(_losses(case, other, student, teacher, 1), _losses(case, module, student, teacher, 1))
        module, other = case.build(), case.build(seed=PARAM_SEED + 1)  # fresh mask streams again
    other.load_state_dict(state)
    assert other.state_dict().keys() == state.keys()
    torch.testing.assert_close(
        _losses(case, other, student, teacher), _losses(case, module, student, teacher), rtol=0.0, atol=0.0
    )


# The seeded random mask streams (FAMKD "sample"/"random", MGD): copies and resumed runs
# continue them. The stream is (seed, step); state_dict carries the step as an int64 buffer.
STREAM_CASES = ["mgd", "famkd_sample", "famkd_random"]


def _advance(case: Case, module: nn.Module, student: list[Tensor], teacher: list[Tensor], calls: int) -> None:
    _losses(case, module, student, teacher, calls)


@pytest.mark.parametrize("name", STREAM_CASES)
def test_resume_continues_the_mask_stream(name: str) -> None:
    """Three calls, a checkpoint (state_dict through torch.save/torch.load), three more calls:
    a module built from another parameter seed and given the checkpoint makes exactly the
    uninterrupted run's last three calls (same masks)."""
    import io

    case = CASES[name]
    student, teacher = case.make_inputs()
    run = case.build()
    _advance(case, run, student, teacher, 3)
    buffer = io.BytesIO()
    torch.save(run.state_dict(), buffer)
    want = _losses(case, run, student, teacher, 3)
    resumed = case.build(seed=PARAM_SEED + 1)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(_losses(case, resumed, student, teacher, 3), want, rtol=0.0, atol=0.0)
    fresh = case.build()  # not a replay of the stream's start
    assert not torch.equal(_losses(case, fresh, student, teacher, 3), want)


@pytest.mark.parametrize("name", STREAM_CASES)
def test_copies_continue_the_mask_stream(name: str) -> None:
    """After two calls, a deepcopy and a pickle round trip make the original's next three calls
    (they do not restart from the seed)."""
    case = CASES[name]
    student, teacher = case.make_inputs()
    module = case.build()
    _advance(case, module, student, teacher, 2)
    copies = {"deepcopy": copy.deepcopy(module), "pickle": pickle.loads(pickle.dumps(module))}
    want = _losses(case, module, student, teacher, 3)
    for how, other in copies.items():
        torch.testing.assert_close(_losses(case, other, student, teacher, 3), want, rtol=0.0, atol=0.0, msg=how)


@pytest.mark.parametrize("name", STREAM_CASES)
def test_mask_stream_state_is_ema_safe(name: str) -> None:
    """The stream's state_dict entries are 0-d int64 tensors: their shape never changes,
    ``.half()``/``.to(bfloat16)`` leave them exact, an EMA that averages the floating entries
    (ultralytics) or every entry with a cast back (timm's ModelEmaV2) runs, and the first call of a
    fresh module draws from the seed itself (as before the stream had a step)."""
    from famkd_losses.losses._common import stream_seed

    case = CASES[name]
    student, teacher = case.make_inputs()
    module = case.build()
    steps = {k: v for k, v in module.state_dict().items() if k.endswith("mask_step")}
    levels = 2  # every case has two levels, each with its own stream (seed + level)
    assert len(steps) == levels and all(v.shape == () and v.dtype == torch.int64 for v in steps.values())
    assert all(int(v) == 0 for v in steps.values())
    assert stream_seed(MASK_SEED, 0) == MASK_SEED
    ema = copy.deepcopy(module)
    for _ in range(3):
        _advance(case, module, student, teacher, 1)
        msd = module.state_dict()
        for k, v in ema.state_dict().items():
            assert v.shape == msd[k].shape
            if v.dtype.is_floating_point:  # ultralytics' ModelEMA
                v.mul_(0.9).add_(0.1 * msd[k])
            else:  # timm's ModelEmaV2 averages every entry and casts back
                v.copy_(v * 0.9 + 0.1 * msd[k])
    assert all(int(module.state_dict()[k]) == 3 for k in steps)
    for dtype in (torch.float16, torch.bfloat16):
        low = copy.deepcopy(module).to(dtype).state_dict()
        assert all(low[k].dtype == torch.int64 and int(low[k]) == 3 for k in steps)


def test_mask_stream_state_loads_across_configurations() -> None:
    """The step is not a learned value: a state_dict without it (an unseeded module's, or one
    saved before it existed) loads into a seeded module and keeps its stream where it is, and a
    seeded module's loads into an unseeded one, both strictly."""
    seeded = MGDLoss(S_CH, T_CH, seed=MASK_SEED)
    plain = MGDLoss(S_CH, T_CH)
    assert not any(k.endswith("mask_step") for k in plain.state_dict())
    student, teacher = _features(torch.Generator().manual_seed(0))
    with torch.no_grad():
        seeded(student, teacher)
    seeded.load_state_dict(plain.state_dict())
    assert all(int(v) == 1 for k, v in seeded.state_dict().items() if k.endswith("mask_step"))
    plain.load_state_dict(seeded.state_dict())


_DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}


def _dtype_params() -> list:
    out = []
    for name in MAIN_CASES:
        for m, i in [(m, i) for m in _DTYPES for i in _DTYPES]:
            out.append(pytest.param(name, m, i, id=f"{name}-module_{m}-inputs_{i}"))
    return out


@pytest.mark.parametrize(("name", "module_dtype", "input_dtype"), _dtype_params())
def test_module_and_input_dtypes(name: str, module_dtype: str, input_dtype: str) -> None:
    """``module.to(dtype)`` for float32/float64/bfloat16 against inputs of each of these dtypes:
    inputs are cast to the layers' dtype (README), so every pair works.

    The loss dtype, as the README documents it (half/bfloat16 reduced in float32, float64
    stays float64): float64 where float64 takes part (float64 inputs, or float64 parameters),
    else float32. Observed: exactly that for every module (a float64 module of a loss without
    parameters returns float32 for float32 inputs: nothing in it is float64). The value is the
    float32 computation on the same rounded inputs and parameters within 1e-4, or LOW_RTOL
    when a bfloat16 module runs its layers in bfloat16; parameter gradients come back in the
    parameters' dtype, finite and aligned with float32's.
    """
    case = CASES[name]
    m_dtype, i_dtype = _DTYPES[module_dtype], _DTYPES[input_dtype]
    student, teacher = case.make_inputs()
    s = [x.to(i_dtype) for x in student]
    t = [x.to(i_dtype) for x in teacher]
    module = case.build().to(m_dtype)
    assert all(p.dtype == m_dtype for p in module.parameters())
    ref_loss, ref_grads = _run(case, case.build().to(m_dtype).float(), [x.float() for x in s], [x.float() for x in t])
    loss, grads = _run(case, module, s, t)
    has_f64 = i_dtype == torch.float64 or any(p.dtype == torch.float64 for p in module.parameters())
    expected = torch.float64 if has_f64 else torch.float32
    assert loss.dtype == expected, f"{name}: {module_dtype} module, {input_dtype} inputs -> {loss.dtype}"
    assert torch.isfinite(loss)
    low = m_dtype == torch.bfloat16 and any(True for _ in module.parameters())
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=LOW_RTOL if low else 1e-4, atol=0.0)
    for pname, p in module.named_parameters():
        assert p.grad is not None and p.grad.dtype == m_dtype, pname
    _assert_grads_aligned(grads, ref_grads, f"{name} {module_dtype} module, {input_dtype} inputs")


def test_importing_the_package_loads_neither_dynamo_nor_triton():
    """``import famkd_losses`` stays cheap: torch.compile's machinery and triton load on first use."""
    import subprocess
    import sys

    code = (
        "import sys, torch; import famkd_losses, famkd_losses.ops; "
        "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
