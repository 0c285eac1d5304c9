"""Shared test settings: small CPU threads, a deterministic hypothesis profile."""

from __future__ import annotations

import os

import torch
from hypothesis import HealthCheck, settings

# Triton kernels are tested on CPU tensors in Triton's interpreter where there is no GPU; the
# variable must be set before anything imports triton (torch.compile does; importing torch
# does not).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests run tiny ops: one intra-op thread avoids thread-barrier stalls on a busy 2-core machine.
torch.set_num_threads(1)

# CI profile: no deadline (the machine has slow spells), derandomized so a red run replays.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
