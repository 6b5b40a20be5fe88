# Must run before anything imports a module that defines Triton kernels: the interpreter is chosen
# when @triton.jit runs, i.e. at import time of the kernel module.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED = pathlib.Path(os.environ.get("D2L_SHARED", pathlib.Path(__file__).resolve().parents[2] / "shared"))
GOLDEN = SHARED / "golden" / "tiny-gemma2"


@pytest.fixture(scope="session")
def golden_dir():
    """The reference's golden outputs. Missing data FAILS the golden tests (CI must not pass them silently);
    set D2L_ALLOW_NO_GOLDEN=1 to skip them instead (e.g. a checkout without the shared data)."""
    if not GOLDEN.exists():
        msg = f"golden data not found at {GOLDEN}: set D2L_SHARED to the folder holding golden/"
        if os.environ.get("D2L_ALLOW_NO_GOLDEN", "0") not in ("", "0"):
            pytest.skip(msg + " (skipped: D2L_ALLOW_NO_GOLDEN is set)")
        pytest.fail(msg + ", or set D2L_ALLOW_NO_GOLDEN=1 to skip the golden tests", pytrace=False)
    return GOLDEN


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
