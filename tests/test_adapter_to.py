"""``AdapterBatch.to`` takes its arguments like ``Tensor.to``."""

import pytest
import torch

from d2l_fast import AdapterBatch

from ._numerics import HALF_ROUNDTRIP


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    A = {"q_proj": torch.randn(2, 12, 8, generator=g)}
    B = {"q_proj": torch.randn(2, 12, 6, generator=g)}
    return AdapterBatch(A, B, [0, 4, 12], 2.0, "tiny@0", ["a", "b"])


def _same_values(x: AdapterBatch, y: AdapterBatch):
    assert x.rank_offsets == y.rank_offsets and x.alpha == y.alpha and x.model_id == y.model_id and x.names == y.names
    for m in y.modules:
        torch.testing.assert_close(x.A[m].double(), y.A[m].double(), **HALF_ROUNDTRIP)
        torch.testing.assert_close(x.B[m].double(), y.B[m].double(), **HALF_ROUNDTRIP)


FORMS = [
    (lambda b: b.to(torch.float64), torch.float64),
    (lambda b: b.to(torch.bfloat16), torch.bfloat16),
    (lambda b: b.to("cpu", torch.float16), torch.float16),
    (lambda b: b.to(torch.device("cpu"), dtype=torch.float64), torch.float64),
    (lambda b: b.to(torch.zeros(1, dtype=torch.bfloat16)), torch.bfloat16),
    (lambda b: b.to(device="cpu", dtype=torch.float16), torch.float16),
    (lambda b: b.to(dtype=torch.float64), torch.float64),
    (lambda b: b.to("cpu"), torch.float32),
]


def test_to_like_tensor_to(batch):
    for call, dtype in FORMS:
        out = call(batch)
        assert isinstance(out, AdapterBatch) and out.dtype == dtype and out.device.type == "cpu"
        assert all(t.dtype == dtype for t in [*out.A.values(), *out.B.values()])
        _same_values(out, batch)
        assert batch.dtype == torch.float32  # the original is untouched


def test_to_refuses_non_float_and_bad_arguments(batch):
    with pytest.raises(TypeError, match="floating point.*int64"):
        batch.to(torch.int64)
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        batch.to("not-a-device")
    assert batch.dtype == torch.float32
