"""The benchmark suite also runs as plain tests (``pytest benchmarks/ --benchmark-disable``, the
usual way to check a benchmark suite in CI): each case runs once, checks its loss, and records
no timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytest_benchmark", reason="the benchmark suite needs pytest-benchmark (the dev extra)")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmarks_run_as_plain_tests_with_benchmark_disable(tmp_path: Path) -> None:
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "benchmarks/",
        "--benchmark-disable",
        "-q",
        "-p",
        "no:cacheprovider",
        "--bench-cases",
        "small_b8",
        "--bench-providers",
        "eager",
        "--bench-workloads",
        "famkd_full,mgd,fgd",
        "--bench-out",
        str(out),
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "6 passed" in run.stdout, run.stdout[-2000:]
    assert not out.exists(), "a --benchmark-disable run wrote timing results"


def test_speed_targets_read_missing_rows_as_not_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from plot import TARGET_KEY, _target_lines

    case, dtype, pass_ = TARGET_KEY
    key = (case, "famkd_feature_nogen", dtype, pass_)
    lines = _target_lines({key: {"eager": {"median_ms": 8.0, "peak_mem_mb": 100.0}}})
    assert "- famkd_feature_nogen: triton vs eager - (target >= 4.0x): not measured" in lines
    assert "- famkd_feature_nogen: triton peak memory / eager's - (target <= 0.5): not measured" in lines
    eager, triton = {"median_ms": 8.0, "peak_mem_mb": 100.0}, {"median_ms": 4.0, "peak_mem_mb": 60.0}
    lines = _target_lines({key: {"eager": eager, "triton": triton}})
    assert "- famkd_feature_nogen: triton vs eager 2.00x (target >= 4.0x): missed" in lines
    assert "- famkd_feature_nogen: triton peak memory / eager's 0.60 (target <= 0.5): missed" in lines
