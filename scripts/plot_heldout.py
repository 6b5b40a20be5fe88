"""Plot held-out scores of checkpoints along a multi-stage training lineage.

    python scripts/plot_heldout.py benchmarks/results/smollm2_heldout_points.json \
        -o benchmarks/results/smollm2_heldout.png

The JSON is a list of points ``{"stage": str, "step": int (cumulative optimizer steps of the lineage),
"niah_em": float, "qa_f1": float, "n_niah": int, "n_qa": int}`` (what ``train_smollm2.py --eval-only`` measured
for each checkpoint) plus optional floors ``{"floor": str, "qa_f1": float}`` drawn as dashed lines.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("points")
    ap.add_argument("-o", "--out", required=True)
    ap.add_argument("--title", default="SmolLM2-135M hypernetwork: held-out scores along the training stages (CPU)")
    a = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    items = json.loads(pathlib.Path(a.points).read_text())
    points = [p for p in items if "stage" in p]
    floors = [p for p in items if "floor" in p]
    if not points:
        print("no points", file=sys.stderr)
        return 1
    stages = list(dict.fromkeys(p["stage"] for p in points))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for key, ax, label in (("niah_em", axes[0], "NIAH 32–256 exact recall"), ("qa_f1", axes[1], "fact QA F1")):
        for i, st in enumerate(stages):
            pts = sorted((p["step"], p[key]) for p in points if p["stage"] == st and p.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), "o-", color=f"C{i}", label=st)
        for j, f in enumerate(floors):
            if f.get(key) is not None:
                ax.axhline(f[key], ls="--", color=f"C{len(stages) + j}", lw=1, label=f["floor"])
        ax.set_xlabel("optimizer steps (cumulative along the lineage)")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1 if key == "niah_em" else max(0.4, max(p.get(key) or 0 for p in points) * 1.2))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(a.title, fontsize=10)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
