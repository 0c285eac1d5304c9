"""benchmarks/launch_counts.py: the device operations one forward+backward issues. Pins the
number of Triton launches per level (a silent fallback to the reference shows up as none) and
that the fused path issues fewer operations than the reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels are optional")
import torch

from famkd_losses.kernels import can_run

if not can_run(torch.zeros(1)):
    pytest.skip("the counts run the kernels in Triton's interpreter", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


@pytest.mark.parametrize(
    ("workload", "per_level"),
    [
        ("logits", 2),  # KL forward, KL backward
        # teacher statistics, top-k mask, masked input and reconstruction forward; the last two backward
        ("famkd_default_nogen", 6),
        ("famkd_feature_nogen", None),  # FULL_METHOD: scales that fit each level vary
    ],
)
def test_fused_path_launches_kernels_and_fewer_ops(workload, per_level):
    from cases import case_by_name
    from launch_counts import count

    case = case_by_name("retinanet_coco_b2").scaled(spatial=8, channels=16)
    eager = count(workload, case, "torch")
    fused = count(workload, case, "triton")
    assert eager["triton_launches"] == 0
    assert fused["triton_launches"] > 0
    if per_level is not None:
        assert fused["triton_launches"] == per_level * len(case.levels)
    assert fused["total"] < eager["total"]
