"""End-to-end benchmarks on the real SmolLM2-135M: internalisation and generation."""
