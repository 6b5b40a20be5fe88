"""Tables and a plot of the reading model's evaluation (issue 16): checkpoints side by side, and sample answers.

    # D2L rows of two or more reading_report.json files side by side (first = the reference, e.g. the shipped
    # smollm2-135m; last = the candidate), the in-prompt baselines, and the "beats on every row" verdict:
    python scripts/reading_table.py reports shipped/reading_report.json new/reading_report.json \\
        --labels smollm2-135m,new -o table.md --plot table.png [--json table.json]

    # N sample answers (stratified over facts, numbers, needle, long, no-hijack) of one evaluation folder
    # (samples.jsonl + records.jsonl, as `train_reading.py --eval-only` writes them) as a markdown table:
    python scripts/reading_table.py samples runs/reading/eval_test_checkpoint-900 --n 20 -o samples.md

Exit status of ``reports``: 0 when the last report beats the first on every row, 3 when it does not but would ship
(higher on every headline row, lower on none beyond its 95 % margin), 2 when neither (1: bad input).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def _reports(a) -> int:
    from d2l_fast.training.reading_tables import compare_markdown, compare_reports, plot_comparison

    paths = [pathlib.Path(p) for p in a.reports]
    labels = a.labels.split(",") if a.labels else [p.parent.name or p.stem for p in paths]
    if len(labels) != len(paths):
        print(f"--labels names {len(labels)} reports, {len(paths)} given", file=sys.stderr)
        return 1
    cmp = compare_reports([(lab, json.loads(p.read_text())) for lab, p in zip(labels, paths)], method=a.method)
    text = compare_markdown(cmp)
    print(text)
    if a.out:
        pathlib.Path(a.out).write_text(text + "\n")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(cmp, indent=1) + "\n")
    if a.plot:
        plot_comparison(cmp, a.plot, title=a.title)
    return 0 if cmp["verdict"]["beats_every_row"] else 3 if cmp["verdict"]["ships"] else 2


def _samples(a) -> int:
    from d2l_fast.training.reading_tables import load_eval_dir, pick_samples, samples_markdown

    records, rows = load_eval_dir(a.eval_dir, a.records)
    text = samples_markdown(pick_samples(records, rows, a.n, seed=a.seed), width=a.width)
    print(text)
    if a.out:
        pathlib.Path(a.out).write_text(text + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reports", help="reading_report.json files side by side, with the verdict")
    r.add_argument("reports", nargs="+", help="two or more reading_report.json (first: reference, last: candidate)")
    r.add_argument("--labels", help="comma-separated column names (default: each file's folder name)")
    r.add_argument("--method", default="d2l", help="the method compared across reports")
    r.add_argument("-o", "--out", help="write the markdown table here")
    r.add_argument("--json", help="write the comparison (rows, verdict) as JSON here")
    r.add_argument("--plot", help="write the bar chart (PNG) here")
    r.add_argument("--title", default="reading model: D2L rows side by side")
    r.set_defaults(fn=_reports)
    s = sub.add_parser("samples", help="N sample answers of one evaluation folder as a markdown table")
    s.add_argument("eval_dir")
    s.add_argument("--records", help="the evaluated records JSONL (default: EVAL_DIR/records.jsonl)")
    s.add_argument("--n", type=int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--width", type=int, default=160, help="characters of document snippet")
    s.add_argument("-o", "--out", help="write the markdown table here")
    s.set_defaults(fn=_samples)
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.fn(a)
    except (ValueError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
