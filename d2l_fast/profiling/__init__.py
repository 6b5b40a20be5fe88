"""Kernel profiling tools that need no GPU: :mod:`.compile_report` compiles every Triton kernel variant ahead of
time for a CUDA architecture and reports shared memory, registers, spills and the MMA instruction."""
