"""Benchmark suites (pytest-benchmark): ``pytest benchmarks --benchmark-only``.

* ``ops/`` — the kernels: segmented LoRA and the latent readout, against their baselines;
* ``e2e/`` — document internalisation and batched generation on the real SmolLM2-135M;
* ``serving/`` — the OpenAI-compatible server under concurrent load, and decode with thousands of resident
  adapters.

Shared measurement helpers are in :mod:`._common`, session setup in ``conftest.py``. Training recipes,
diagnostics, release tooling, plots and the GPU suite are scripts, in ``scripts/``."""
