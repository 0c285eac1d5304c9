"""Speed, memory and achieved bandwidth of the losses, per provider:

- ``eager``: the PyTorch reference (``backend="torch"``);
- ``compile``: ``torch.compile`` of the same module;
- ``triton``: the fused kernels (``backend="triton"``), where they can run;
- ``compile_triton``: ``torch.compile`` of the module on the kernels (skipped, with the
  reason, where dynamo cannot trace them);
- ``liger``: liger-kernel's fused KL on the same logits (``logits_softmax`` only, CUDA, where
  liger-kernel is importable): the peer for the logits part.

Workloads: ``famkd_feature_nogen`` (the feature part with its generator convs replaced by
identities: masks, pyramid, fusion, error and reduction, the memory-bound part) and
``famkd_full`` (everything, logits included), both with ``FULL_METHOD``; the same two with
`FAMKDLoss`'s own defaults (``famkd_default_nogen``, ``famkd_default_full``); ``logits``
(MaskedLogitsLoss, sigmoid head) and ``logits_softmax`` (softmax head); ``mgd``; ``fgd``.
"""

from __future__ import annotations

import pytest
import torch
from cases import case_by_name
from torch import nn

from famkd_losses import FULL_METHOD, FAMKDLoss, FGDLoss, MaskedLogitsLoss, MGDLoss
from famkd_losses.kernels import HAS_TRITON

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Peak DRAM bandwidth (bytes/s) of the devices we run on, for the achieved fraction.
PEAK_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12}


def _peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BANDWIDTH.items() if k in name), None)


def _inputs(case, device, dtype, grad: bool, logits: bool, same_channels: bool = False):
    g = torch.Generator().manual_seed(0)
    cs = case.teacher_channels if same_channels else case.student_channels

    def mk(c, h, w, req):
        return torch.randn(case.batch, c, h, w, generator=g).to(device=device, dtype=dtype).requires_grad_(req)

    s = [mk(cs, h, w, grad) for h, w in case.levels]
    t = [mk(case.teacher_channels, h, w, False) for h, w in case.levels]
    zs = [mk(case.logit_channels, h, w, grad) for h, w in case.levels] if logits else None
    zt = [mk(case.logit_channels, h, w, False) for h, w in case.levels] if logits else None
    return s, t, zs, zt


def _bytes(tensors, grads) -> int:
    read = sum(x.numel() * x.element_size() for x in tensors if x is not None)
    written = sum(x.numel() * x.element_size() for x in grads if x is not None)
    return read, written


def _strip_generators(kd: FAMKDLoss) -> FAMKDLoss:
    for fl in kd.feature_losses:
        for name in list(fl.generators):
            fl.generators[name] = nn.ModuleList(nn.Identity() for _ in fl.generators[name])
    return kd


def _famkd(case, backend: str, logits: bool, config: dict) -> FAMKDLoss:
    return FAMKDLoss(
        [case.student_channels] * len(case.levels),
        [case.teacher_channels] * len(case.levels),
        num_classes=case.num_classes if logits else None,
        backend=backend,
        **config,
    )


def _build(workload: str, case, backend: str) -> nn.Module:
    """The loss module of ``workload`` on ``backend`` ("torch" or "triton")."""
    s_ch = [case.student_channels] * len(case.levels)
    t_ch = [case.teacher_channels] * len(case.levels)
    if workload == "famkd_feature_nogen":  # the multi-scale, dual-branch path (the heaviest, what the kernels fuse)
        return _strip_generators(_famkd(case, backend, False, FULL_METHOD))
    if workload == "famkd_full":
        return _famkd(case, backend, True, FULL_METHOD)
    if workload == "famkd_default_nogen":  # FAMKDLoss's own defaults (one scale, channel branch)
        return _strip_generators(_famkd(case, backend, False, {}))
    if workload == "famkd_default_full":
        return _famkd(case, backend, True, {})
    if workload == "logits":
        return MaskedLogitsLoss(num_classes=case.num_classes, backend=backend)
    if workload == "logits_softmax":
        return MaskedLogitsLoss(num_classes=case.num_classes, head="softmax", backend=backend)
    if workload == "mgd":
        return MGDLoss(s_ch, t_ch, seed=0, backend=backend)
    if workload == "fgd":
        return FGDLoss(s_ch, t_ch, backend=backend)
    raise ValueError(workload)


class LigerSoftmaxKL(nn.Module):
    """Peer for the logits part: liger-kernel's fused KL on the same dense logits, per anchor
    over its K classes with temperature T (``T^2 * sum KL / (N*P)``), unmasked and unweighted.
    What a user would pick today for a fused KD-KL; the log-softmaxes are torch ops, as liger's
    KL takes log-probabilities."""

    def __init__(self, num_classes: int, temperature: float = 1.0):
        super().__init__()
        from liger_kernel.transformers import LigerKLDIVLoss

        self.kl = LigerKLDIVLoss(reduction="sum", log_target=True)
        self.k, self.t = num_classes, temperature

    def forward(self, s_logits, t_logits):
        loss = 0.0
        for s, t in zip(s_logits, t_logits):
            n, _, h, w = s.shape
            rows_s = s.permute(0, 2, 3, 1).reshape(-1, self.k)  # (N*H*W*A, K)
            rows_t = t.permute(0, 2, 3, 1).reshape(-1, self.k)
            log_q = torch.log_softmax(rows_s.float() / self.t, dim=1)
            log_p = torch.log_softmax(rows_t.float() / self.t, dim=1)
            loss = loss + self.kl(log_q, log_p) * self.t**2 / (n * h * w)
        return loss


def _has_liger() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:
        return False
    return True


def _call(workload, mod, s, t, zs, zt, case):
    if workload.startswith("logits"):
        return mod(zs, zt)
    if workload.endswith("_full"):
        return mod(s, t, zs, zt)
    if workload == "fgd":
        h, w = case.levels[0]
        # one box over the central half of an input 8x the first level's size (ordered on every case)
        boxes = [torch.tensor([[2.0 * w, 2.0 * h, 6.0 * w, 6.0 * h]], device=s[0].device)] * case.batch
        return mod(s, t, boxes, (8 * h, 8 * w))
    return mod(s, t)


def uses_logits(workload: str) -> bool:
    return workload.startswith("logits") or workload.endswith("_full")


# compile_triton: torch.compile of the module on the kernels, which may fuse the small torch ops
# around them (mask selection, partial-sum finishes, scalars) that otherwise cost a launch each.
PROVIDERS = ("eager", "compile", "triton", "compile_triton")
WORKLOADS = {
    "famkd_feature_nogen": PROVIDERS,
    "famkd_full": PROVIDERS,
    "famkd_default_nogen": PROVIDERS,
    "famkd_default_full": PROVIDERS,
    "logits": PROVIDERS,
    "logits_softmax": (*PROVIDERS, "liger"),
    "mgd": PROVIDERS,
    "fgd": PROVIDERS,
}
PARAMS = [(w, p) for w, provs in WORKLOADS.items() for p in provs]


def _module(workload: str, case, provider: str, device: torch.device) -> nn.Module:
    if provider == "liger":
        if device.type != "cuda" or not _has_liger():
            pytest.skip("liger-kernel's KL is a CUDA peer and needs liger-kernel installed")
        return LigerSoftmaxKL(case.num_classes)
    if provider in ("triton", "compile_triton") and not (HAS_TRITON and device.type == "cuda"):
        pytest.skip("the Triton kernels are benchmarked on CUDA only (the CPU interpreter is a test tool)")
    return _build(workload, case, "triton" if provider in ("triton", "compile_triton") else "torch")


@pytest.mark.parametrize("pass_", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize(("workload", "provider"), PARAMS, ids=[f"{w}-{p}" for w, p in PARAMS])
def test_loss_speed(benchmark, record, device, case_name, dtype_name, workload, provider, pass_):
    case = case_by_name(case_name)
    if device.type == "cpu":
        case = case.scaled(spatial=4, channels=4)
    dtype = DTYPES[dtype_name]
    mod = _module(workload, case, provider, device).to(device)
    fn = torch.compile(mod) if provider in ("compile", "compile_triton") else mod
    grad = pass_ == "fwd_bwd"
    logits = uses_logits(workload)
    s, t, zs, zt = _inputs(case, device, dtype, grad, logits)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    leaves = [*s, *(zs or []), *mod.parameters()]

    def run():
        for x in leaves:
            x.grad = None
        with autocast:
            loss = _call(workload, fn, s, t, zs, zt, case)
        if grad:
            loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss

    try:
        run()  # warm-up (and compile)
    except Exception as e:
        if provider != "compile_triton":
            raise
        pytest.skip(f"torch.compile of the Triton path failed: {type(e).__name__}: {str(e)[:300]}")
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        peak = torch.cuda.max_memory_allocated(device) - base
    rounds = 20 if device.type == "cuda" else 7
    loss = benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    assert torch.isfinite(loss).all(), f"{workload} ({provider}) gave a non-finite loss"
    if benchmark.disabled:  # --benchmark-disable: run once as a plain test; no timing to record
        return
    median = benchmark.stats.stats.median
    read, written = _bytes([*s, *t, *(zs or []), *(zt or [])], [*s, *(zs or [])] if grad else [])
    moved = read * (2 if grad else 1) + written
    peak_bw = _peak_bandwidth(device)
    record(
        {
            "workload": workload,
            "provider": provider,
            "case": case_name,
            "shapes": str(case.levels),
            "batch": case.batch,
            "channels": f"{case.student_channels}->{case.teacher_channels}",
            "logit_channels": case.logit_channels if logits else None,
            "dtype": dtype_name,
            "pass": pass_,
            "median_ms": median * 1e3,
            "peak_mem_mb": None if peak is None else peak / 2**20,
            "min_bytes_moved_mb": moved / 2**20,
            "achieved_gbps": moved / median / 1e9,
            "fraction_of_peak_bw": None if peak_bw is None else moved / median / peak_bw,
        }
    )
