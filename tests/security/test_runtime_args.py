"""Issue 19, class 4: runtime arguments are refused by name (tiny random model, see tests/_tiny.py)."""

from __future__ import annotations

import pytest

from ..test_robustness_runtime import build


@pytest.fixture(scope="module")
def model():
    return build("llama")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_internalize_docs_per_call(model, bad):
    with pytest.raises(ValueError, match=r"docs_per_call must be None or a positive int .*got " + repr(bad)):
        model.internalize(["One short document.", "Another one."], docs_per_call=bad)


def test_adapter_index_without_adapters(model):
    with pytest.raises(ValueError, match=r"adapter_index names adapters \[0, 1, 2\] but no adapters"):
        model.generate_text(["a?", "b?", "c?"], None, adapter_index=[0, 1, 2], max_new_tokens=2)


def test_base_model_rows_still_allowed(model):
    """-1 (or no index) without adapters is the base model, as documented."""
    a = model.generate_text(["a?", "b?"], None, adapter_index=[-1, -1], max_new_tokens=2)
    b = model.generate_text(["a?", "b?"], None, max_new_tokens=2)
    assert a == b
