"""Compile every Triton kernel launch of the losses ahead of time for a GPU that is not here.

No GPU is needed: a stand-in triton driver reports the target (sm_90 = H100/H200 by default),
every ``kernel[grid](...)`` the host code makes is compiled (``warmup``) instead of launched,
and ``cuobjdump`` (shipped with triton) reads each cubin's registers, stack and spills. The
host wrappers run on CPU tensors of the benchmark shapes, so the launch configurations are
exactly those the losses would use on the GPU (block sizes, warps, specialisations); their
outputs are meaningless (nothing ran) and are never read for a result.

    python benchmarks/aot_sm90.py                       # every case of benchmarks/cases.py, fp32+bf16
    python benchmarks/aot_sm90.py --cases retinanet_coco_b2 --dtypes bfloat16 --json out.json

Prints one row per distinct compiled kernel: registers per thread, warps, spill stores/loads
and the stack frame, and exits non-zero when a kernel fails to compile or spills (with
``--fail-on-spill``). ``tests/kernels/test_aot_sm90.py`` runs it on a small selection.
Must run without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("aot_sm90.py compiles real kernels: unset TRITON_INTERPRET")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as triton_driver
from triton.runtime.jit import JITFunction

sys.path.insert(0, str(Path(__file__).parent))

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _StandInDriver:
    """Just enough of a triton driver to compile for ``target`` on a machine without its GPU."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self) -> bool:
        return True


class LaunchRecorder:
    """Turns every JIT launch into a compile and keeps the compiled kernels (one per specialisation)."""

    def __init__(self) -> None:
        self.kernels: dict[tuple, dict] = {}
        self.errors: list[str] = []
        self.context = ""
        self._orig_run = JITFunction.run

    def __enter__(self) -> LaunchRecorder:
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            t0 = time.perf_counter()
            try:
                compiled = recorder._orig_run(fn, *args, grid=grid, warmup=True, **kwargs)
            except Exception as e:  # a compile error is the finding: record it and go on
                recorder.errors.append(f"{fn.fn.__name__} [{recorder.context}]: {type(e).__name__}: {e}")
                return None
            constexprs = {k: v for k, v in kwargs.items() if k != "num_warps"}
            key = (fn.fn.__name__, compiled.hash)
            if key not in recorder.kernels:
                recorder.kernels[key] = {
                    "kernel": fn.fn.__name__,
                    "constexprs": constexprs,
                    "num_warps": compiled.metadata.num_warps,
                    "num_stages": compiled.metadata.num_stages,
                    "shared_bytes": compiled.metadata.shared,
                    "compile_s": round(time.perf_counter() - t0, 2),
                    "first_seen": recorder.context,
                    "grid": _grid_tuple(grid),
                    "_cubin": compiled.asm["cubin"],
                }
            return compiled

        JITFunction.run = run
        return self

    def __exit__(self, *exc) -> None:
        JITFunction.run = self._orig_run


def _grid_tuple(grid) -> list[int] | None:
    return [int(g) for g in grid] if isinstance(grid, tuple) else None


_RESOURCE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _resource_usage(cubin: bytes) -> dict:
    """Registers, stack and local memory of a cubin, from ``cuobjdump --dump-resource-usage``."""
    from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401  (the bundled toolchain)

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True)
    m = _RESOURCE.search(out.stdout)
    if m is None:
        return {"registers": None, "stack_bytes": None, "local_bytes": None}
    return {"registers": int(m[1]), "stack_bytes": int(m[2]), "local_bytes": int(m[4])}


def _spills(cubin: bytes) -> tuple[int, int]:
    """(spill stores, spill loads) counted in the SASS: STL/LDL instructions."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True)
    return len(re.findall(r"\bSTL(?:\.\d+)?\b", out.stdout)), len(re.findall(r"\bLDL(?:\.\d+)?\b", out.stdout))


# ---------------------------------------------------------------------------------------------
# The launches: the benchmark's workloads, forward and backward, driven through the losses.
# ---------------------------------------------------------------------------------------------


def _enable_cpu_launches() -> None:
    """Let the host wrappers accept CPU tensors (they check for CUDA or the interpreter)."""
    import famkd_losses.kernels as kernels

    kernels.interpreter_enabled = lambda: True  # can_run reads it at call time


# Not a benchmark case: maps of 1 pixel, a row, a column, channels and classes of 1. Triton
# specialises integer arguments equal to 1 as constants, which the interpreter never does.
DEGENERATE = "degenerate_b1"


def _case(name: str):
    from cases import Case, case_by_name

    if name == DEGENERATE:
        return Case(DEGENERATE, 1, 3, 5, [(1, 1), (1, 2), (3, 1), (2, 2), (5, 7)], logit_channels=3, num_classes=1)
    return case_by_name(name)


def drive(case_names: list[str], dtype_names: list[str], recorder: LaunchRecorder, workloads: list[str]) -> None:
    from test_bench_losses import _build, _call, _inputs, uses_logits

    import famkd_losses

    for case_name in case_names:
        case = _case(case_name)
        for dtype_name in dtype_names:
            dtype = DTYPES[dtype_name]
            for workload in workloads:
                recorder.context = f"{workload}/{case_name}/{dtype_name}"
                mod = _build(workload, case, "triton")
                logits = uses_logits(workload)
                # the kernels read half inputs as they come; autocast on CPU would not give them
                s, t, zs, zt = _inputs(case, torch.device("cpu"), dtype, True, logits)
                mod = mod.to(dtype=dtype) if dtype != torch.float32 else mod
                with torch.no_grad():
                    for p in mod.parameters():
                        p.normal_(0, 0.02)
                try:
                    loss = _call(workload, mod, s, t, zs, zt, case)
                    loss.backward()
                except Exception as e:  # host-side failure after fake launches: report it
                    recorder.errors.append(f"host [{recorder.context}]: {type(e).__name__}: {e}")
    del famkd_losses


def main(argv: list[str] | None = None) -> int:
    from cases import CASES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--cases", default=",".join([*(c.name for c in CASES), DEGENERATE]))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument(
        "--workloads",
        default="famkd_feature_nogen,famkd_default_nogen,logits,logits_softmax,mgd,fgd",
        help="benchmark workloads to drive (see benchmarks/test_bench_losses.py)",
    )
    ap.add_argument("--json", default=None, help="write the table as JSON here")
    ap.add_argument("--fail-on-spill", action="store_true")
    args = ap.parse_args(argv)

    triton_driver.set_active(_StandInDriver(GPUTarget("cuda", args.arch, 32)))
    _enable_cpu_launches()
    t0 = time.perf_counter()
    with LaunchRecorder() as rec:
        drive(args.cases.split(","), args.dtypes.split(","), rec, args.workloads.split(","))
    rows = []
    for info in rec.kernels.values():
        cubin = info.pop("_cubin")
        info.update(_resource_usage(cubin))
        info["spill_stores"], info["spill_loads"] = _spills(cubin)
        rows.append(info)
    rows.sort(key=lambda r: (r["kernel"], str(r["constexprs"])))
    print(
        f"sm_{args.arch}, triton {triton.__version__}: {len(rows)} kernels compiled in {time.perf_counter() - t0:.0f} s"
    )
    groups: dict[tuple, list[dict]] = {}
    for r in rows:  # variants differing only in integer specialisations (alignment, == 1) together
        groups.setdefault((r["kernel"], r["num_warps"], str(r["constexprs"])), []).append(r)
    print(f"{'kernel':22s} {'n':>3s} {'regs':>7s} {'warps':>5s} {'spills':>6s} {'stack':>5s}  constexprs")
    for (kernel, warps, _), rs in groups.items():
        regs = sorted(r["registers"] or 0 for r in rs)
        spills = sum(r["spill_stores"] + r["spill_loads"] for r in rs)
        stack = max(r["stack_bytes"] or 0 for r in rs)
        ce = ", ".join(f"{k}={v}" for k, v in rs[0]["constexprs"].items() if v not in (False, None))
        reg = f"{regs[0]}-{regs[-1]}" if regs[0] != regs[-1] else str(regs[0])
        print(f"{kernel:22s} {len(rs):>3d} {reg:>7s} {warps:>5d} {spills:>6d} {stack:>5d}  {ce}")
    for e in rec.errors:
        print("ERROR", e)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"arch": args.arch, "triton": triton.__version__, "kernels": rows, "errors": rec.errors}, indent=1
            )
        )
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    if rec.errors or (args.fail_on_spill and spilled):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
