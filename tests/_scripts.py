"""Import one of the source tree's ``scripts/*.py`` as a module (skips where the scripts are not shipped)."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(name: str):
    path = ROOT / "scripts" / f"{name}.py"
    if not path.exists():
        pytest.skip("the scripts ship with the source tree only")
    spec = importlib.util.spec_from_file_location(f"script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
