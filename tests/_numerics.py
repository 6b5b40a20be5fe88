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

GOLDEN_LORA = dict(atol=2e-5, rtol=1e-4)
GOLDEN_LOGITS = dict(atol=1e-4, rtol=0)
# Packed vs padded vs one-at-a-time internalisation inside d2l_fast (same kernels, different batching).
BATCHING = dict(atol=2e-5, rtol=1e-4)
# d2l_fast adapters exported as PEFT folders and run by real PEFT vs d2l_fast's own forward, both fp32 on the same
# base weights: the same products in a different grouping (PEFT: two nn.Linear calls then ·scaling; d2l_fast: the
# segmented LoRA op, a Triton kernel on GPU) differ by a few ulps of the largest logit (|logit| ≲ 30 with Gemma-2's
# softcap → ~1e-5). The tests also require the adapter to move logits by > 1e-2, 500× this tolerance; a wrong
# transpose, scaling (alpha vs alpha/r), layer or module mapping moves them by about that effect.
PEFT_EXPORT = dict(atol=2e-5, rtol=1e-5)
