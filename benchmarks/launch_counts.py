"""How many device operations one forward+backward of each workload issues, per backend.

At batch 2 a loss on FPN levels is made of many small operations besides the few that move
the feature maps (masks from (N, H*W) / (N, C) saliencies, partial-sum finishes, scalars,
autograd's bookkeeping). On a GPU each costs a launch, a few microseconds of CPU time, whatever
its size, so their number bounds how fast a loss can run when the maps are small. This
script counts them with no GPU: every ATen operation dispatched during forward+backward
(except views, allocations and detaches, which launch nothing), and every Triton kernel launch
(counted without running them: nothing on the host depends on their values). Sizes matter a
little: they decide whether a mask is ranked in one launch or sorted (rows of more than 2048
entries), and how many partial sums a kernel leaves; so the case's own sizes are the default.
``--execute`` runs the kernels in Triton's interpreter instead (minutes per workload). On a
GPU the logits forward also adds two small launches on levels of at least 2M logits, where it
splits its loop (P3 and P4 of RetinaNet at batch 2); the counts here are without that split.

    python benchmarks/launch_counts.py                 # every workload, retinanet_coco_b2 sizes
    python benchmarks/launch_counts.py --divisor 8 --trace famkd_default_nogen   # quick, smaller maps
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import argparse
import collections
import dataclasses
import json
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))

# Operations that launch no device work: views, allocations without a fill, autograd detaches.
NO_LAUNCH = {
    "detach", "view", "_unsafe_view", "alias", "as_strided", "slice", "select", "expand", "unsqueeze",
    "squeeze", "permute", "t", "transpose", "empty", "empty_like", "new_empty", "empty_strided", "unbind",
    "split", "split_with_sizes", "chunk", "narrow", "_reshape_alias", "reshape", "lift_fresh", "set_",
}  # fmt: skip


class _Counter(TorchDispatchMode):
    """Counts launching ATen ops outside the Triton interpreter's own tensor handling."""

    def __init__(self, inside_triton: list[int], trace: list[str] | None = None):
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.inside = inside_triton
        self.trace = trace

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.inside[0] and name not in NO_LAUNCH:
            self.ops[name] += 1
            if self.trace is not None:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ""
                self.trace.append(f"{name}{shape}")
        return out


def count(workload: str, case, backend: str, trace: list[str] | None = None, execute: bool = True) -> dict:
    """Launching ATen ops and Triton launches of one forward+backward (after a warm-up call).

    ``execute=False`` counts the Triton launches without running them (their outputs keep
    whatever ``empty`` held): the host code takes the same path, since nothing in it depends
    on the values, and the case's full sizes take seconds instead of the interpreter's minutes.
    """
    from test_bench_losses import _build, _call, _inputs, uses_logits
    from triton.runtime.interpreter import GridExecutor

    inside = [0]
    launches: collections.Counter[str] = collections.Counter()
    original = GridExecutor.__call__

    def launch(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        if trace is not None:
            trace.append(f"TRITON {self.fn.__name__}")
        if not execute:
            return None
        inside[0] += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            inside[0] -= 1

    GridExecutor.__call__ = launch
    from famkd_losses.kernels import logits_kl

    target_programs = logits_kl._target_programs
    logits_kl._target_programs = lambda x: 1  # no split: the GPU's behaviour on small levels
    try:
        mod = _build(workload, case, backend)
        s, t, zs, zt = _inputs(case, torch.device("cpu"), torch.float32, True, uses_logits(workload))
        _call(workload, mod, s, t, zs, zt, case).backward()  # warm-up: lazily built state
        for x in [*s, *(zs or []), *mod.parameters()]:
            x.grad = None
        launches.clear()
        if trace is not None:
            trace.clear()
        with _Counter(inside, trace) as counter:
            loss = _call(workload, mod, s, t, zs, zt, case)
            if trace is not None:
                trace.append("---- backward")
            loss.backward()
    finally:
        GridExecutor.__call__ = original
        logits_kl._target_programs = target_programs
    aten = sum(counter.ops.values())
    return {
        "workload": workload,
        "backend": backend,
        "levels": len(case.levels),
        "aten_ops": aten,
        "triton_launches": sum(launches.values()),
        "total": aten + sum(launches.values()),
        "top_ops": counter.ops.most_common(6),
    }


def main(argv: list[str] | None = None) -> None:
    from cases import case_by_name
    from test_bench_losses import WORKLOADS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="retinanet_coco_b2", help="levels and channel split from this case")
    ap.add_argument("--workloads", default=",".join(w for w in WORKLOADS))
    ap.add_argument("--json", default=None)
    ap.add_argument("--trace", default=None, help="print the op sequence of this workload on one level")
    ap.add_argument("--execute", action="store_true", help="run the kernels (interpreter) while counting")
    ap.add_argument(
        "--divisor",
        type=int,
        default=1,
        help="divide the maps' sizes and channels (1: the case's own; sizes decide how the masks are "
        "selected and how many partial sums a kernel leaves, so only 1 gives the case's counts)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    # the case's own sizes by default: they decide the mask selection (rank kernel or sort), the
    # number of partial sums and the logits split
    case = case_by_name(args.case).scaled(spatial=args.divisor, channels=args.divisor)
    rows = []
    print(f"{'workload':22s} {'torch':>6s} {'triton':>14s}  (launching ATen ops + Triton launches, fwd+bwd)")
    for workload in args.workloads.split(","):
        eager = count(workload, case, "torch")
        fused = count(workload, case, "triton", execute=args.execute)
        rows += [eager, fused]
        print(
            f"{workload:22s} {eager['total']:>6d} {fused['total']:>6d} = {fused['aten_ops']:>3d} + "
            f"{fused['triton_launches']:>2d}   triton's top ops: {fused['top_ops']}"
        )
    if args.json:
        report = {"case": dataclasses.asdict(case), "torch": torch.__version__, "rows": rows}
        Path(args.json).write_text(json.dumps(report, indent=1))
    if args.trace:
        one = dataclasses.replace(case, levels=case.levels[:1])
        seq: list[str] = []
        count(args.trace, one, "triton", trace=seq, execute=args.execute)
        print(f"\n{args.trace}, one level, triton backend, {len(seq) - 1} launches:")
        print("\n".join(seq))


if __name__ == "__main__":
    main()
