"""Plot a training run's curve from its ``metrics.jsonl`` (``d2l-fast train`` writes one line per step).

    python scripts/plot_training.py runs/smollm2/run/metrics.jsonl -o benchmarks/results/smollm2_training.png

Draws the answer-token loss (raw and a moving average), the learning rate, and — when given — the uniform-digit
plateau of NIAH (4·ln10/5, four digits uniform + the end-of-turn token learned) as a reference line.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys


def moving_average(xs: list[float], k: int) -> list[float]:
    if k < 1:
        raise ValueError(f"window must be ≥ 1, got {k}")
    out, s = [], 0.0
    for i, x in enumerate(xs):
        s += x
        if i >= k:
            s -= xs[i - k]
        out.append(s / min(i + 1, k))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", nargs="+", help="metrics.jsonl file(s); several are concatenated by step. "
                    "FILE@OFFSET[:LAST] shifts a stage's steps by OFFSET and keeps its steps ≤ LAST (a later stage "
                    "that started from an earlier stage's checkpoint), marking where it starts")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--title", default="SmolLM2-135M hypernetwork, CPU training")
    ap.add_argument("--heldout", help="JSON file of [step, held-out answer loss] pairs to mark on the curve")
    a = ap.parse_args(argv)
    rows, starts = {}, []
    for spec in a.metrics:
        f, offset, last = spec, 0, None
        if "@" in spec:
            f, rest = spec.rsplit("@", 1)
            offset, _, lim = rest.partition(":")
            offset, last = int(offset), (int(lim) if lim else None)
            starts.append(offset)
        for ln in pathlib.Path(f).read_text().splitlines():
            if ln.strip():
                r = json.loads(ln)
                if last is None or int(r["step"]) <= last:
                    rows[int(r["step"]) + offset] = r
    if not rows:
        print("no metrics", file=sys.stderr)
        return 1
    steps = sorted(rows)
    task = [rows[s]["task_loss"] for s in steps]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, task, color="0.8", lw=0.7, label="answer loss per step")
    ax.plot(steps, moving_average(task, a.window), color="C0", lw=2, label=f"moving average ({a.window} steps)")
    if a.heldout:
        pts = json.loads(pathlib.Path(a.heldout).read_text())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C1", label="held-out answer loss")
    for x in starts[1:]:
        ax.axvline(x, color="0.5", ls=":", lw=1)
    ax.axhline(4 * math.log(10) / 5, color="C3", ls="--", lw=1, label="NIAH uniform-digit plateau (4·ln10/5)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per answer token (nats)")
    ax.set_ylim(0, max(3.0, min(6.0, max(task[len(task) // 20:] or task))))
    ax2 = ax.twinx()
    ax2.plot(steps, [rows[s]["lr"] for s in steps], color="C2", lw=1, alpha=0.6, label="learning rate")
    ax2.set_ylabel("learning rate")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    ax.set_title(a.title)
    fig.tight_layout()
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out} ({len(steps)} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
