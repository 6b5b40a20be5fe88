"""Golden parity tests fail (not skip) when the golden data is missing, unless D2L_ALLOW_NO_GOLDEN=1 says so."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_TEST = "tests/cli/test_cli.py::test_info_and_convert"  # uses the golden_dir fixture


def _pytest(tmp_path, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("D2L_ALLOW_NO_GOLDEN", "PYTEST_ADDOPTS")}
    env.update(D2L_SHARED=str(tmp_path / "no-shared"), **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "pytest", GOLDEN_TEST, "-q", "-rs"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_missing_golden_data_fails_unless_allowed(tmp_path):
    r = _pytest(tmp_path)
    assert r.returncode != 0 and "1 error" in r.stdout, r.stdout[-2000:]
    assert "golden data not found at" in r.stdout and "D2L_ALLOW_NO_GOLDEN=1" in r.stdout
    r = _pytest(tmp_path, D2L_ALLOW_NO_GOLDEN="1")
    assert r.returncode == 0 and "1 skipped" in r.stdout and "golden data not found at" in r.stdout, r.stdout[-2000:]
