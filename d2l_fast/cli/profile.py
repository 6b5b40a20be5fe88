"""``d2l-fast profile``: a torch.profiler breakdown of internalize + batched generate on SmolLM2."""

from __future__ import annotations

from ._common import positive_int

NAME = "profile"


def add_parser(sub):
    pr = sub.add_parser(NAME, help="torch.profiler breakdown of internalize + batched generate on SmolLM2")
    pr.add_argument("--n-docs", type=positive_int, default=8)
    pr.add_argument("--max-new-tokens", type=positive_int, default=8)
    pr.add_argument("--max-chunk-len", type=positive_int, default=256)
    pr.add_argument("--latent-size", type=positive_int, default=512)
    pr.add_argument("--num-blocks", type=positive_int, default=9)
    pr.add_argument("--rows", type=positive_int, default=15)
    pr.add_argument("--threads", type=int, default=0)
    pr.add_argument("--trace", help="also write chrome traces to TRACE.<stage>.json")
    pr.set_defaults(fn=run, loads_models=True)
    return pr


def run(args) -> int:
    from ..demo import run_profile

    return run_profile(n_docs=args.n_docs, max_new_tokens=args.max_new_tokens, max_chunk_len=args.max_chunk_len,
                       latent_size=args.latent_size, num_blocks=args.num_blocks, rows=args.rows,
                       threads=args.threads, trace=args.trace)
