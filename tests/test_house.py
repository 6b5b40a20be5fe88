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
