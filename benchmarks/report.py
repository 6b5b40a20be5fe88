"""Markdown table of a pytest-benchmark JSON: mean time per provider and ratio vs the ``base`` provider.

    python benchmarks/report.py /tmp/seglora.json [--stat mean|median|min]

Generic: rows are grouped by ``extra_info["case"]``, columns by ``extra_info["provider"]``; a provider
named ``base`` (if present) is the denominator of the ratios.
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


def build_table(data: dict, stat: str = "mean") -> str:
    cases: "OrderedDict[str, dict[str, float]]" = OrderedDict()
    providers: list[str] = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        case = info.get("case", b.get("group") or b["name"])
        prov = info.get("provider", b.get("param") or b["name"])
        cases.setdefault(case, {})[prov] = b["stats"][stat]
        if prov not in providers:
            providers.append(prov)
    if "base" in providers:
        providers.remove("base")
        providers.insert(0, "base")
    head = ["case"] + [f"{p} ({stat})" for p in providers]
    if "base" in providers:
        head += [f"{p} / base" for p in providers if p != "base"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, row in cases.items():
        cells = [case] + [_fmt_time(row[p]) if p in row else "–" for p in providers]
        if "base" in providers:
            base = row.get("base")
            for p in providers:
                if p == "base":
                    continue
                cells.append(f"{row[p] / base:.2f}×" if base and p in row else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json_path")
    ap.add_argument("--stat", default="mean", choices=["mean", "median", "min", "max"])
    args = ap.parse_args(argv)
    with open(args.json_path) as f:
        data = json.load(f)
    mi = data.get("machine_info", {})
    print(f"<!-- {mi.get('cpu', {}).get('brand_raw', mi.get('processor', ''))}; {data.get('datetime', '')} -->")
    print(build_table(data, args.stat))


if __name__ == "__main__":
    main()
