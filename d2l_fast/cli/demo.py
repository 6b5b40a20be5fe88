"""``d2l-fast demo``: SmolLM2-135M + the bundled hypernetwork on the bundled documents."""

from __future__ import annotations

from ._common import positive_int

NAME = "demo"


def add_parser(sub):
    d = sub.add_parser(NAME, help="SmolLM2-135M + the bundled hypernet (untrained if not shipped): "
                       "batch-internalize needle and fact documents, batched answers beside the base model's and "
                       "the gold ones")
    d.add_argument("--n-docs", type=positive_int, default=8)
    d.add_argument("--max-new-tokens", type=positive_int, default=24)
    d.add_argument("--max-chunk-len", type=positive_int, default=None,
                   help="chat-templated tokens per document chunk (default: a trained checkpoint's model card; "
                   "256 for the untrained hypernetwork)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--init-scale", type=float, default=2.0,
                   help="std of the random scaler_B "
                        "(0 = the reference init: every adapter is zero, i.e. the base model)")
    d.add_argument("--threads", type=int, default=0)
    d.add_argument("--checkpoint", help="pretrained name or checkpoint folder (default: the bundled smollm2-135m "
                   "when this build ships it, else an untrained hypernetwork)")
    d.add_argument("--untrained", action="store_true", help="a seeded untrained hypernetwork on the bundled documents")
    d.set_defaults(fn=run, loads_models=True)
    return d


def run(args) -> int:
    from ..demo import run_demo

    return run_demo(n_docs=args.n_docs, max_new_tokens=args.max_new_tokens, max_chunk_len=args.max_chunk_len,
                    seed=args.seed, init_scale=args.init_scale, threads=args.threads, checkpoint=args.checkpoint,
                    untrained=args.untrained)
