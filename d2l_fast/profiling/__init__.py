"""Kernel profiling tools that need no GPU, and the model shapes the kernels are measured at.

* :mod:`.shapes` — the base models' widths, the readout configs and the segmented-LoRA benchmark batches (one
  definition for the benchmarks, the GPU suite and the compile report);
* :mod:`.compile_report` — ``d2l-fast compile-report``: compiles every Triton kernel variant ahead of time for a
  CUDA architecture and reports shared memory, registers, spills and the MMA instruction, built on
  :mod:`.capture` (scenarios, launch capture, compile) and :mod:`.report` (byte model, checks, tables).
"""
