"""pytest-benchmark harness: cases, providers, and the results folder (tables by _results.py, report by plot.py).

    pytest benchmarks/                      # CPU: eager vs torch.compile on scaled-down cases
    pytest benchmarks/ --bench-cases all    # every case (the default on CUDA)

Results go to benchmarks/results/<device>/ with the device name, dtype, torch/triton
versions and git commit.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

RESULTS: list[dict] = []
RESULTS_DIR = Path(__file__).parent / "results"


def pytest_addoption(parser):
    group = parser.getgroup("famkd benchmarks")
    group.addoption("--bench-cases", default=None, help="comma-separated case names, or 'all'")
    group.addoption("--bench-dtypes", default=None, help="comma-separated: float32,bfloat16")
    group.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda if available)")
    group.addoption("--bench-out", default=None, help="results folder (default benchmarks/results/<device>)")
    group.addoption(
        "--bench-providers", default=None, help="comma-separated providers to run (eager,compile,triton,liger)"
    )
    group.addoption("--bench-workloads", default=None, help="comma-separated workloads to run (default: all)")


def bench_device(config) -> torch.device:
    dev = config.getoption("--bench-device")
    if dev is None:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(dev)


def pytest_generate_tests(metafunc):
    from cases import CASES

    dev = bench_device(metafunc.config)
    if "case_name" in metafunc.fixturenames:
        opt = metafunc.config.getoption("--bench-cases")
        if opt == "all" or (opt is None and dev.type == "cuda"):
            names = [c.name for c in CASES]
        elif opt is None:
            names = ["small_b8", "retinanet_coco_b2_cs128"]
        else:
            names = opt.split(",")
        metafunc.parametrize("case_name", names)
    if "dtype_name" in metafunc.fixturenames:
        opt = metafunc.config.getoption("--bench-dtypes")
        names = opt.split(",") if opt else (["float32", "bfloat16"] if dev.type == "cuda" else ["float32"])
        metafunc.parametrize("dtype_name", names)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return bench_device(request.config)


def pytest_collection_modifyitems(config, items):
    """--bench-providers / --bench-workloads: deselect the other parametrisations."""
    providers = config.getoption("--bench-providers")
    workloads = config.getoption("--bench-workloads")
    if not (providers or workloads):
        return
    keep, drop = [], []
    for item in items:
        params = getattr(item, "callspec", None)
        params = params.params if params else {}
        ok = (not providers or params.get("provider") in providers.split(",")) and (
            not workloads or params.get("workload") in workloads.split(",")
        )
        (keep if ok else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def results_folder(config, env: dict) -> Path:
    out = config.getoption("--bench-out")
    slug = env["device"].replace(" ", "_").replace("/", "_") if env["device_type"] == "cuda" else "cpu"
    return Path(out) if out else RESULTS_DIR / slug


@pytest.fixture(scope="session")
def record(request):
    env = environment(bench_device(request.config))
    folder = results_folder(request.config, env)

    from _results import write_tables

    def _record(row: dict) -> None:
        RESULTS.append(row)
        write_tables(RESULTS, env, folder)

    return _record


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except Exception:
        return "unknown"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "device": name,
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "commit": _git_commit(),
    }


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS:
        return
    env = environment(bench_device(session.config))
    folder = results_folder(session.config, env)
    from _results import write_tables
    from plot import write_report

    write_tables(RESULTS, env, folder)
    write_report(RESULTS, env, folder)
    print(f"\n[benchmarks] {len(RESULTS)} rows written to {folder}", file=sys.stderr)
