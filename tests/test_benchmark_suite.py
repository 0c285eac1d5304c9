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
