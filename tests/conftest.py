# Must run before anything imports a module that defines Triton kernels: the interpreter is chosen
# when @triton.jit runs, i.e. at import time of the kernel module. The interpreter is used only when no
# CUDA device exists: on a GPU machine the kernels are compiled and run for real, and the tests marked
# ``interpreter`` (Triton on CPU tensors) are skipped there (tests/kernels/test_cuda_kernels.py covers them).
import os

import torch

_HAS_CUDA = torch.cuda.is_available()
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402  (after the environment set-up above)

import pytest  # noqa: E402

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
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_interp = pytest.mark.skip(reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1 (off on CUDA machines)")
    for item in items:
        if "gpu" in item.keywords and not _HAS_CUDA:
            item.add_marker(skip_gpu)
        if "interpreter" in item.keywords and not interpreted:
            item.add_marker(skip_interp)
