"""d2l_fast: fast Doc-to-LoRA."""
