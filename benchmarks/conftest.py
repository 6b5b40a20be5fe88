"""Benchmark session setup: fixed thread count, environment info for extra_info.

Benchmarks run on CPU too (only the Triton provider needs CUDA). Interpreter timings are meaningless, so
TRITON_INTERPRET is never set here."""

from __future__ import annotations

import os
import platform

import pytest
import torch

BENCH_THREADS = int(os.environ.get("D2L_BENCH_THREADS", "2"))
torch.set_num_threads(BENCH_THREADS)


@pytest.fixture(scope="session")
def env_info() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
    else:
        dev = f"cpu:{platform.processor() or platform.machine()}"
    return {
        "device": dev,
        "torch": torch.__version__,
        "triton": triton_version,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # other processes compete for the 2 cores on the dev box; record the load seen at session start
        "loadavg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
