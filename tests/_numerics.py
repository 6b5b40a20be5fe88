"""Every numerical tolerance of the test suite, with the reason for it.

Golden parity (../shared/golden, produced by the reference in fp32 on CPU with exact kernels):
* LoRA A/B and hypernetwork intermediates: atol 2e-5, rtol 1e-4. Both sides are fp32; our readout
  reorders the attention arithmetic (absorbed K/V, packed segments, different matmul blocking), which
  moves results by a few fp32 ulps of the largest intermediate (|x| ≲ 10 inside the perceiver → ~1e-6);
  measured max differences are ≤ 3e-6. 2e-5 leaves margin for BLAS/thread-count differences while
  still failing on any real mistake (the smallest structural error we could make — a missing scaler,
  a transposed head, the wrong bias order — moves values by ≥ 1e-3).
* Logits: atol 1e-4. The golden README states logits match to about 1e-4 between fp32 implementations;
  max |logit| is 1.66 and a LoRA changes logits by up to 0.9, so 1e-4 is 4 orders below any effect.
* Greedy tokens: exact. Every greedy step in the golden data has a top-1/top-2 margin ≥ 2e-3, far above
  the logit tolerance.
"""

import math

import torch

GOLDEN_LORA = dict(atol=2e-5, rtol=1e-4)
GOLDEN_LOGITS = dict(atol=1e-4, rtol=0)
# Packed vs padded vs one-at-a-time internalisation inside d2l_fast (same kernels, different batching).
BATCHING = dict(atol=2e-5, rtol=1e-4)
# An encoder pass run in token windows (d2l_fast.encoder.encode_in_slices: chunked prefill, keys and values of the
# earlier windows kept) vs the whole row in one pass, fp32: every query attends to the same keys; the windows' matmuls
# and attention run on other shapes (BLAS blocking; masked SDPA blocks instead of one causal call), a few fp32 ulps.
# Measured max differences on the tiny models: 5e-8 (A), 3.3e-7 (B). A wrong window offset, position or key range
# moves features by O(1).
SLICED = dict(atol=2e-5, rtol=1e-4)
# Encoder features of a bf16 model (flex or blocked attention, d2l_fast.flex) vs the same model in fp32, as a relative
# Frobenius error over the packed [n_features, T, H] stack: bf16 rounding (2**-9) of every activation accumulates
# through the layers; measured 0.2 % after the embedding and 0.8-1.0 % after 4 tiny Gemma-2 layers, for both paths.
# Dropping the soft-cap or a document's mask moves the features by > 10 % on that model.
BF16_ENCODER_REL = 2e-2
# d2l_fast adapters exported as PEFT folders and run by real PEFT vs d2l_fast's own forward, both fp32 on the same
# base weights: the same products in a different grouping (PEFT: two nn.Linear calls then ·scaling; d2l_fast: the
# segmented LoRA op, a Triton kernel on GPU) differ by a few ulps of the largest logit (|logit| ≲ 30 with Gemma-2's
# softcap → ~1e-5). The tests also require the adapter to move logits by > 1e-2, 500× this tolerance; a wrong
# transpose, scaling (alpha vs alpha/r), layer or module mapping moves them by about that effect.
PEFT_EXPORT = dict(atol=2e-5, rtol=1e-5)

# ------------------------------------------------------------------------------------------ runtime and training
# Batched generate (left-padded rows, one adapter per row) vs each row alone, fp32: the same arithmetic on other
# shapes (padding changes BLAS blocking); greedy tokens are compared exactly next to it.
BATCHED_LOGITS = dict(atol=1e-4, rtol=0)
# The same on the real SmolLM2-135M (30 layers, |logit| up to ~30): more rounding accumulates through depth.
SMOLLM2_BATCHED_LOGITS = dict(atol=2e-3, rtol=0)
# Hypernetwork gradients of the packed (segmented) vs the padded LoRA path, fp32.
PACKED_VS_PADDED_GRAD = dict(atol=1e-5, rtol=1e-3)
# Trainer student layouts (training.student): per-QA attention / shared question prefixes vs the dense row with
# HF's block mask, fp32. The same attention sums over other padded shapes and the prefix's K/V gradient summed
# inside one product instead of across sequences: a few fp32 ulps, measured ≤ 4e-7 on loss, ≤ 1.1e-6 on hypernetwork
# gradients (real SmolLM2, reading layout). A wrong mask, position id or adapter segment changes them by ≥ 1e-3.
STUDENT_PACKING_LOSS = dict(atol=1e-5, rtol=1e-5)
STUDENT_PACKING_GRAD = dict(atol=1e-5, rtol=1e-3)
# The bf16 CPU student (bf16 weights, fp32 hypernetwork) vs fp32: bf16 rounding (2**-8 relative) of every
# activation through 30 layers moves the CE loss by ~1 % and turns the gradient by a few degrees.
BF16_STUDENT_LOSS = dict(atol=0.0, rtol=3e-2)
BF16_STUDENT_GRAD_COSINE = 0.98
# AdapterBatch.to(a 16-bit dtype) vs the fp32 original: bf16/fp16 rounding of O(1) values.
HALF_ROUNDTRIP = dict(atol=1e-2, rtol=0)
# combine_lora with per-chunk scalers and a bias scaler vs the golden: fp32 products in another order.
GOLDEN_COMBINE_SCALED = dict(atol=1e-7, rtol=1e-6)
# Isolation: rows that do not use a poisoned (NaN/inf) adapter vs the same rows of a clean run. The two runs feed
# different inputs to the same BLAS call (the bad adapter's rows are zeroed in the clean run, or the batch holds
# other documents), and a BLAS build may block the reduction differently for them: measured 6.1e-6 relative on a
# 2-core AMD EPYC in fp32. bf16 outputs: one bf16 ulp (2**-7 relative) of O(1) values. A leak of the poison is
# NaN/inf (checked separately) and a wrong row mapping moves values by O(1), far above both.
ISOLATION = {
    torch.float32: dict(atol=2e-5, rtol=1e-4),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
# Copy head (d2l_fast.hypernet.copy_head): fp32 padded attention vs a float64 loop over slots, and the same fp32
# maths reached through two call paths (zero gate vs no copy head, streamed vs kept features): sums of O(1)
# unit-RMS values in another order.
COPY_HEAD = dict(atol=1e-5, rtol=1e-4)
# Smoke checks of the CPU paths with triton hidden (the exact checks are the kernel tests above).
NO_TRITON_SMOKE = dict(atol=1e-4, rtol=1e-4)
# Losses: fp64 implementations vs fp64 references (same sums, other order); fp32 vs fp64 references; the fp32
# token losses the chunked loss stores; Liger's fused CE (CUDA) vs ours, loss and gradient.
LOSS_F64 = dict(atol=1e-10, rtol=1e-10)
LOSS_F32 = dict(atol=1e-5, rtol=1e-5)
LOSS_STORED_F32 = dict(atol=1e-6, rtol=1e-6)
LIGER_LOSS = dict(atol=1e-4, rtol=1e-4)
LIGER_GRAD = dict(atol=1e-5, rtol=1e-3)

# ------------------------------------------------------------------------------------------ kernels
# Segmented LoRA, fp32 against an fp64 reference: atol = rtol = 2e-6 per unit of sqrt(reduction length) (inputs
# are scaled so every output is O(1); 2e-7 per sqrt(k) is the expected fp32 rounding, ×10 margin).
SEG_FP32_PER_SQRT_K = 2e-7 * 10
# Segmented LoRA, fp16/bf16 against an fp32 reference: within 2x the error of the same computation done by torch
# in that dtype (FlashAttention's rule), plus a small floor.
LOWP_ERR_RATIO = 2.0
LOWP_ERR_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Latent readout against the fp64 reference: fp32 runs on fp32 inputs; fp16/bf16 runs on the same low-precision
# inputs, the error budget being the rounding of the output and of the normalized context (the absorbed form never
# rounds it, the reference does; see d2l_fast/kernels/latent_readout/README.md).
READOUT = {
    torch.float32: dict(atol=2e-5, rtol=2e-4, rms=1e-5),
    torch.float16: dict(atol=4e-3, rtol=1e-2, rms=2e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=5e-2, rms=1.5e-2),
}
READOUT_GRAD = dict(atol=1e-4, rtol=1e-3, rms=1e-5)  # fp32 gradients vs fp64 autograd through the reference
# GPU kernels at the real model shapes against fp64, by precision (tf32/ieee: fp32 inputs with or without TF32
# tensor cores): relative RMS error and largest error relative to the largest reference value.
CUDA_KERNEL = {
    "bf16": dict(rms=1.6e-2, rel_max=6e-2),
    "fp16": dict(rms=2e-3, rel_max=8e-3),
    "tf32": dict(rms=2e-3, rel_max=8e-3),
    "ieee": dict(rms=1e-5, rel_max=1e-4),
}


# Fused gated activation h = act(gate) * up against the fp64 formula rounded to the same dtype: fp32 differs by a few
# ulps of exp / the product (|h| = O(1) here: 1e-6); fp16 by at most one rounding step of h (2**-10 relative, the
# kernel rounds an fp32 value, the reference an fp64 one), so rtol 2**-9 plus an fp16 ulp at 1 as atol.
GATED_H = {torch.float32: dict(atol=1e-6, rtol=1e-6), torch.float16: dict(atol=2**-10, rtol=2**-9)}
# The fused MLP LoRA wired into a patched HF model (torch path, fp32) vs the unfused patched model: the same math
# (HF's activation, one BLAS shrink per run, addmm expand) in another grouping of the shrink; logits are O(1).
FUSED_MLP_LOGITS = dict(atol=2e-5, rtol=1e-5)

# The compiled path (the torch.library ops under torch.compile) vs the eager path of the same public functions:
# the same kernels on both sides (only the summation order of a recomputed backward may differ), fp32.
OPS = dict(atol=1e-5, rtol=1e-5)


def seg_fp32(reduce_dim: int) -> dict:
    """Segmented-LoRA fp32 tolerance for a reduction over ``reduce_dim`` terms (see SEG_FP32_PER_SQRT_K)."""
    tol = SEG_FP32_PER_SQRT_K * math.sqrt(reduce_dim)
    return dict(atol=tol, rtol=tol)


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, *, atol: float | None = None, rtol: float = 0.0,
                 rms: float | None = None, rel_max: float | None = None) -> None:
    """``got`` against ``ref`` in fp64 under every rule given: elementwise ``|got - ref| <= atol + rtol·|ref|``
    (a NaN fails); relative RMS error ``‖got - ref‖ / ‖ref‖ <= rms``; largest error relative to the largest
    reference value ``max|got - ref| / max|ref| <= rel_max``. The AssertionError names the worst element."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != reference shape {tuple(ref.shape)}")
    err = (got - ref).abs()
    ratio = (err.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item() if err.numel() else 0.0
    problems = []
    if atol is not None:
        bound = atol + rtol * ref.abs()
        ok = err <= bound
        if not bool(ok.all()):
            i = int(torch.argmax(torch.where(ok, torch.full_like(err, -1.0), (err - bound).nan_to_num(float("inf")))))
            idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), err.shape))
            problems.append(f"max abs err {err.max().item():.3e} at {idx} (got {got[idx].item():.6g}, ref "
                            f"{ref[idx].item():.6g}; allowed atol={atol:.2e}, rtol={rtol:.2e})")
    if rms is not None and not ratio <= rms:
        problems.append(f"relative RMS error {ratio:.3e} > {rms:.1e}")
    if rel_max is not None:
        rel = (err.max() / ref.abs().max().clamp_min(1e-30)).item() if err.numel() else 0.0
        if not rel <= rel_max:
            problems.append(f"max error relative to max|ref| {rel:.3e} > {rel_max:.1e}")
    if problems:
        raise AssertionError(f"{name}: " + "; ".join(problems) + f" (relative RMS error {ratio:.3e})")
