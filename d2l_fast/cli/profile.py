"""``d2l-fast profile``: a torch.profiler breakdown of internalize + batched generate on SmolLM2.

:func:`run_profile` is the run behind the command (it prints).
"""

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
    return run_profile(n_docs=args.n_docs, max_new_tokens=args.max_new_tokens, max_chunk_len=args.max_chunk_len,
                       latent_size=args.latent_size, num_blocks=args.num_blocks, rows=args.rows,
                       threads=args.threads, trace=args.trace)


def run_profile(*, n_docs: int = 8, max_new_tokens: int = 8, max_chunk_len: int = 256, latent_size: int = 512,
                num_blocks: int = 9, rows: int = 15, threads: int = 0, trace: str | None = None) -> int:
    """torch.profiler over internalize + batched generate on SmolLM2 with an untrained hypernetwork on the bundled
    :func:`~d2l_fast.demo.demo_docs`; prints the top operators per stage (``rows`` per table) and, with
    ``trace``, writes chrome traces to ``<trace>.<stage>.json``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ..demo import demo_docs, load_smollm2
    from ..model import D2LModel

    if threads:
        torch.set_num_threads(threads)
    docs = demo_docs()[:n_docs]
    base, tok = load_smollm2()
    model = D2LModel.from_base(base, tok, seed=0, init_scaler_B=2.0, max_chunk_len=max_chunk_len,
                               latent_size=latent_size, num_blocks=num_blocks)
    texts = [d["text"] for d in docs]
    model.internalize(texts[:1])  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts, record_shapes=False) as p1:
        adapters = model.internalize(texts)
    ids, mask = model.encode_prompts([d["question"] for d in docs])
    with profile(activities=acts) as p2:
        model.generate(ids, mask, adapters=adapters, max_new_tokens=max_new_tokens, do_sample=False)
    for name, p in (("internalize", p1), ("generate", p2)):
        print(f"\n== {name} ==")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
        if trace:
            path = f"{trace}.{name}.json"
            p.export_chrome_trace(path)
            print(f"chrome trace: {path}")
    return 0
