"""Every Triton kernel compiles for sm_90 (H100/H200) down to a cubin without spilling.

The interpreter runs the kernels' Python, which is far more lenient than the compiler (types
in loops, constexpr use, layouts). This test compiles the launch configurations the losses use
for COCO-sized FPN levels and for degenerate maps (1x1, one row or column, where triton turns
arguments equal to 1 into constants), through ``benchmarks/aot_sm90.py``: no GPU is needed. It runs in a
subprocess without ``TRITON_INTERPRET`` (the interpreter replaces the JIT functions).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels are optional")

ROOT = Path(__file__).resolve().parents[2]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
KERNELS = {
    "_pyramid_fwd_kernel",
    "_pyramid_bwd_kernel",
    "_recon_fwd_kernel",
    "_recon_bwd_kernel",
    "_masked_fwd_kernel",
    "_masked_bwd_kernel",
    "_rank_mask_kernel",
    "_dtheta_kernel",
    "_sigmoid_fwd_kernel",
    "_sigmoid_bwd_kernel",
    "_softmax_fwd_kernel",
    "_softmax_bwd_kernel",
}


@pytest.mark.slow
@pytest.mark.skipif(
    not all((TOOLS / t).exists() for t in ("ptxas", "cuobjdump", "nvdisasm")),
    reason="triton's bundled CUDA tools are missing",
)
def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    report = tmp_path / "aot.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "aot_sm90.py"),
        "--cases",
        "retinanet_coco_b2_cs128,degenerate_b1",
        "--dtypes",
        "bfloat16",
        "--workloads",
        "famkd_feature_nogen,famkd_default_nogen,logits,logits_softmax,fgd",
        "--fail-on-spill",
        "--json",
        str(report),
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    data = json.loads(report.read_text())
    assert not data["errors"]
    assert {k["kernel"] for k in data["kernels"]} == KERNELS
    for k in data["kernels"]:
        assert k["spill_stores"] == k["spill_loads"] == 0, k
        assert 0 < k["registers"] <= 255, k
