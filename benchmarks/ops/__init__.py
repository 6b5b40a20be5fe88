"""Kernel benchmarks: segmented LoRA and the latent readout."""
