"""Repository hygiene that CI enforces: the ruff config passes, and pytest refuses unknown markers."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    pytest.importorskip("ruff", reason="ruff is in requirements-dev.txt")
    from ruff.__main__ import find_ruff_bin

    r = subprocess.run([find_ruff_bin(), "check", "--no-cache", str(ROOT)], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_unknown_marker_is_an_error(tmp_path):
    test = tmp_path / "test_marker.py"
    test.write_text(textwrap.dedent(
        """
        import pytest

        @pytest.mark.gpuu  # a typo of a registered marker
        def test_x():
            pass
        """))
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
                        str(test), "-q"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode != 0 and "'gpuu' not found in `markers`" in r.stdout + r.stderr, r.stdout[-2000:]


def _package_imports(rel_path: str) -> set[str]:
    """Dotted names of the d2l_fast modules a package file imports anywhere (module level or inside functions)."""
    import ast

    path = ROOT / "d2l_fast" / rel_path
    pkg = ["d2l_fast", *Path(rel_path).parent.parts]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n for n in names if n == "d2l_fast" or n.startswith("d2l_fast."))
    return out


def test_imports_point_down():
    # the spec depends on nothing in the package; the Hugging Face helpers only on the spec (and its error type)
    assert _package_imports("config.py") == set()
    assert _package_imports("hf.py") <= {"d2l_fast.config", "d2l_fast.checkpoint"}
    assert not _package_imports("checkpoint.py") & {"d2l_fast.hf", "d2l_fast.encoder", "d2l_fast.patching",
                                                    "d2l_fast.model"}
    # patching and the encoder are siblings over hf: neither imports the other, nor anything above them
    above = {"d2l_fast.model", "d2l_fast.compat", "d2l_fast.config"}
    assert not _package_imports("patching.py") & (above | {"d2l_fast.encoder"})
    assert not _package_imports("encoder.py") & (above | {"d2l_fast.patching"})
