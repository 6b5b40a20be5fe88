"""Peak memory of the training loss over a pack: full-logit reference vs d2l_fast's chunked lm_head loss.

Each variant runs in a fresh subprocess (forward + backward to the hidden states; the lm_head is frozen as in D2L
training) and reports the growth of peak memory over the inputs: peak RSS on CPU, ``max_memory_allocated`` on CUDA.

    python scripts/loss_memory.py --tokens 8192 --vocab 49152 --hidden 576     # SmolLM2-135M, 8k answer tokens
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _run(variant: str, n: int, v: int, h: int, k: int, device: str) -> dict:
    import torch

    from d2l_fast.training import distillation_loss, per_token_weights
    from d2l_fast.training.reference import distillation_token_loss_ref

    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=device).requires_grad_()
    weight = torch.randn(v, h, device=device) / h**0.5
    lp = torch.log_softmax(torch.randn(n, k, device=device), -1)
    idx = torch.randint(0, v, (n, k), device=device)
    tw = per_token_weights(n, n, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if variant == "reference":
        loss = (distillation_token_loss_ref(hidden, weight, lp, idx) * tw).sum()
    else:
        loss = distillation_loss(hidden, weight, lp, idx, tw).loss
    (g,) = torch.autograd.grad(loss, hidden)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "device": device, "tokens": n, "vocab": v, "hidden": h, "loss": float(loss),
            "grad_norm": float(g.norm()), "peak_extra_MiB": round((peak - base) / 2**20, 1),
            "full_fp32_logits_MiB": round(n * v * 4 / 2**20, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variant", choices=["reference", "chunked"])
    a = p.parse_args(argv)
    if a.variant:
        print(json.dumps(_run(a.variant, a.tokens, a.vocab, a.hidden, a.topk, a.device)))
        return
    for variant in ("chunked", "reference"):
        cmd = [sys.executable, __file__, "--variant", variant, "--tokens", str(a.tokens), "--vocab", str(a.vocab),
               "--hidden", str(a.hidden), "--topk", str(a.topk), "--device", a.device]
        print(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
