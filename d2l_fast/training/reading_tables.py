"""Tables of the reading model's evaluation (issue 16): sample answers side by side, and report rows of several
checkpoints side by side with a "beats on every row" verdict.

* :func:`pick_samples` / :func:`samples_markdown` — N questions stratified over the record kinds (facts, numbers,
  needle, long, no-hijack) of one evaluation: document snippet (around the gold answer), question, gold answer and
  each method's answer (D2L, base, in-prompt, few-shot in-prompt);
* :func:`report_rows` — a :func:`~.reading_run.reading_report` as the rows of the docs' table (fact F1 per
  attribute with the document-blind floor, number exact recall by kind and digit count, NIAH by length bin, long
  documents, no-hijack), in a fixed order;
* :func:`compare_reports` / :func:`compare_markdown` — several reports' D2L rows side by side (e.g. the shipped
  checkpoint vs a new one) with the in-prompt baselines, and the verdicts: does the last report beat the first on
  every row (higher, or both at 1.0); on every headline row (:data:`HEADLINE_ROWS`, the README's table) with no
  row lower by more than its 95 % sampling margin (``ships``: the rule ``scripts/ship_pretrained.py`` applies);
* :func:`plot_comparison` — the same as a bar chart, one panel per section (needs ``matplotlib``).
"""

from __future__ import annotations

import json
import math
import pathlib
import random
import re
from collections.abc import Sequence

#: the record kinds the sample table is stratified over, in table order, with their labels.
SAMPLE_KINDS = {"facts": "facts", "numbers": "numbers", "niah": "needle", "long": "long", "nohijack": "no-hijack"}
#: methods shown in the sample table, in column order, with their column names.
SAMPLE_METHODS = {"d2l": "D2L", "base": "base", "in_context": "in-prompt", "in_context_fewshot": "in-prompt few-shot"}
#: the baseline methods :func:`compare_reports` shows beside the D2L columns.
BASELINES = ("base", "in_context", "in_context_fewshot")
SECTIONS = ("facts", "numbers", "niah", "long", "nohijack")
#: the rows of the README's headline table (``niah/by_bin/`` covers every length bin); every one must be higher for
#: a checkpoint to replace the shipped one (breakdown rows where both are at 0 cannot be, and do not block it)
HEADLINE_ROWS = ("facts/f1/all", "numbers/exact/all", "niah/by_bin/", "long/f1/all", "nohijack/general/accuracy",
                 "nohijack/absent/nohijack")


def _headline(key: str) -> bool:
    return any(key == h or h.endswith("/") and key.startswith(h) for h in HEADLINE_ROWS)


def noise_margin(a: float, b: float, n: int) -> float:
    """The 95 % margin of the difference of two means of ``n`` values in [0, 1] each (accuracies, F1): 1.96 times
    the standard error with the pooled mean p, whose variance p(1 - p) bounds any [0, 1] variable's."""
    p = min(max((a + b) / 2, 0.0), 1.0)
    return 1.96 * math.sqrt(2 * p * (1 - p) / max(int(n), 1))


def _read_jsonl(path) -> list[dict]:
    return [json.loads(ln) for ln in pathlib.Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def load_eval_dir(eval_dir, records=None) -> tuple[list[dict], list[dict]]:
    """``(records, rows)`` of an evaluation folder: ``samples.jsonl`` and the records (``records``, a JSONL path or
    a list; default: the folder's ``records.jsonl``, which ``scripts/train_reading.py`` writes)."""
    d = pathlib.Path(eval_dir)
    if not (d / "samples.jsonl").is_file():
        raise ValueError(f"{d}: expected an evaluation folder holding samples.jsonl, found none")
    if records is None:
        if not (d / "records.jsonl").is_file():
            raise ValueError(f"{d}: holds no records.jsonl; pass the evaluated records (records=...)")
        records = d / "records.jsonl"
    recs = _read_jsonl(records) if isinstance(records, (str, pathlib.Path)) else list(records)
    return recs, _read_jsonl(d / "samples.jsonl")


def pick_samples(records: Sequence[dict], rows: Sequence[dict], n: int = 20, *, seed: int = 0) -> list[dict]:
    """``n`` questions stratified over :data:`SAMPLE_KINDS` (as even as the kinds present allow; within a kind,
    seeded random, no-hijack questions cycling through their ``qa_kind`` s), each ``{"kind", "context",
    "question", "answers", "qa_kind", "predictions": {method: answer}}``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    index = {f"{r['id']}/{j}": (r, qa) for r in records for j, qa in enumerate(r["qas"])}
    preds: dict[str, dict[str, str]] = {}
    for row in rows:
        if row["sample_id"] not in index:
            raise ValueError(f"sample {row['sample_id']!r} is not a question of the given records")
        preds.setdefault(row["sample_id"], {})[row["method"]] = row["prediction"]
    rng = random.Random(seed)
    pools: dict[str, list[str]] = {k: [] for k in SAMPLE_KINDS}
    for sid in sorted(preds):
        kind = index[sid][0].get("meta", {}).get("kind")
        if kind in pools:
            pools[kind].append(sid)
    for kind, ids in pools.items():
        rng.shuffle(ids)
        if kind == "nohijack":  # general, absent, chit-chat in turn
            by: dict[str, list[str]] = {}
            for sid in ids:
                by.setdefault(index[sid][1].get("qa_kind", "?"), []).append(sid)
            turns = [by[k] for k in sorted(by)]
            ids[:] = [t[i] for i in range(max(map(len, turns), default=0)) for t in turns if i < len(t)]
    kinds = [k for k in SAMPLE_KINDS if pools[k]]
    if not kinds:
        raise ValueError(f"no evaluated question of a record kind in {list(SAMPLE_KINDS)}")
    take = {k: 0 for k in kinds}
    while sum(take.values()) < n and any(take[k] < len(pools[k]) for k in kinds):
        for k in kinds:
            if sum(take.values()) < n and take[k] < len(pools[k]):
                take[k] += 1
    out = []
    for k in kinds:
        for sid in pools[k][: take[k]]:
            rec, qa = index[sid]
            out.append({"kind": SAMPLE_KINDS[k], "sample_id": sid, "context": rec["context"],
                        "question": qa["question"], "answers": list(qa["answers"]),
                        "qa_kind": qa.get("qa_kind"), "predictions": preds[sid]})
    return out


def snippet(context: str, answer: str, width: int = 160) -> str:
    """About ``width`` characters of ``context`` around the first occurrence of ``answer`` (else its start), with
    "…" where text was cut; whitespace runs become one space."""
    text = re.sub(r"\s+", " ", context).strip()
    if len(text) <= width:
        return text
    at = text.lower().find(re.sub(r"\s+", " ", answer).strip().lower()) if answer.strip() else -1
    lo = 0 if at < 0 else max(0, min(at - width // 2, len(text) - width))
    return ("…" if lo > 0 else "") + text[lo: lo + width].strip() + ("…" if lo + width < len(text) else "")


def _cell(s: str, limit: int = 90) -> str:
    s = re.sub(r"\s+", " ", str(s)).strip()
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return s.replace("|", "\\|") or "∅"


def samples_markdown(samples: Sequence[dict], *, width: int = 160) -> str:
    """A markdown table of :func:`pick_samples`' samples: kind, document snippet, question, gold, then one column
    per method of :data:`SAMPLE_METHODS` that answered them."""
    methods = [m for m in SAMPLE_METHODS if any(m in s["predictions"] for s in samples)]
    head = ["kind", "document (snippet)", "question", "gold", *[SAMPLE_METHODS[m] for m in methods]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in samples:
        cells = [s["kind"] + (f" ({s['qa_kind']})" if s["kind"] == "no-hijack" and s.get("qa_kind") else ""),
                 _cell(snippet(s["context"], s["answers"][0], width), width + 4), _cell(s["question"]),
                 _cell(s["answers"][0]), *[_cell(s["predictions"].get(m, "")) for m in methods]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- report rows


def _bin_key(label: str) -> tuple[float, ...]:
    return tuple(float(x) for x in re.findall(r"\d+", label)) or (math.inf,)


def report_rows(report: dict, method: str = "d2l") -> list[dict]:
    """The rows of ``report[method]`` in table order: ``{"key", "section", "label", "n", "value", "rate",
    "floor"}`` (``rate``: a share shown in %, else an F1; ``floor``: the fact attribute's document-blind floor)."""
    if not isinstance(report, dict) or method not in report or not isinstance(report[method], dict):
        raise ValueError(f"expected a reading report with a {method!r} entry, got keys "
                         f"{sorted(report) if isinstance(report, dict) else type(report).__name__}")
    data, floors = report[method], report.get("blind_floor_f1", {})
    groups: dict[str, list[tuple]] = {s: [] for s in SECTIONS}
    for key, v in data.items():
        parts = key.split("/")
        sec, what, sub = parts[0], parts[1] if len(parts) > 1 else "", parts[-1]
        if sec not in groups:
            continue
        if sec == "nohijack":
            label = {"general": "general knowledge: accuracy", "chitchat": "chit-chat: F1 vs the base answer"}.get(
                what, f"absent ({sub} docs) → \"does not say\"")
            order, rate = ({"general": 0, "absent": 1, "chitchat": 2}.get(what, 3), sub), what != "chitchat"
        elif what == "by_bin":
            label, order, rate = f"{sub} tokens" + (" (F1 or recall)" if sec == "long" else ""), (1, _bin_key(sub)), \
                sec != "long"
        elif sec == "long" and sub != "all":  # long documents: by bin and overall only (few questions per attribute)
            continue
        elif what == "f1":
            label, order, rate = f"F1: {sub}", (0 if sub == "all" else 2, sub), False
        elif what == "exact":  # needles: the gold number contained in the answer; numbers: the answer is it
            word = "recall" if sec == "niah" else "exact"
            if sub.startswith("digits="):
                label, order = f"{word}: {sub[7:]} digits", (4, int(sub[7:]))
            elif sec == "niah" and sub != "all":  # one number kind
                continue
            else:
                label, order = f"{word}: {sub}", (0 if sub == "all" else 3, sub)
            rate = True
        else:
            continue
        floor = floors.get(sub) if sec == "facts" and what == "f1" else None
        groups[sec].append((order, {"key": key, "section": sec, "label": label, "n": v["n"], "value": v["mean"],
                                    "rate": rate, "floor": floor}))
    return [row for s in SECTIONS for _, row in sorted(groups[s], key=lambda t: t[0])]


def compare_reports(reports: Sequence[tuple[str, dict]], *, method: str = "d2l",
                    baselines: Sequence[str] = BASELINES) -> dict:
    """Several reports' ``method`` rows side by side: ``{"labels", "baselines", "rows": [{"key", "section",
    "label", "n", "rate", "floor", "values": [per report, None where absent], "baselines": {method: value}}],
    "verdict": {"beats_every_row", "compared", "not_better": [labels of rows]}}``. Baseline values come from the
    last report holding that method. The verdict compares the last report with the first on every row both hold:
    a row is beaten when the last is higher, or both are at 1.0."""
    reports = list(reports)
    if len(reports) < 2 or not all(isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], str) for r in reports):
        raise ValueError(f"expected two or more (label, report) pairs, got {len(reports)}")
    per = [{row["key"]: row for row in report_rows(rep, method)} for _, rep in reports]
    keys = list(dict.fromkeys(k for rows in per for k in rows))
    order = {s: i for i, s in enumerate(SECTIONS)}
    keys.sort(key=lambda k: order[next(p[k] for p in per if k in p)["section"]])  # stable: sections in order
    base_of = {b: next((rep for _, rep in reversed(reports) if b in rep), None) for b in baselines}
    base_rows = {b: {r["key"]: r["value"] for r in report_rows(rep, b)} if rep else {} for b, rep in base_of.items()}
    rows, not_better, compared, headline_not_better, worse = [], [], 0, [], []
    for k in keys:
        first = next(p[k] for p in per if k in p)
        vals = [p[k]["value"] if k in p else None for p in per]
        row = {**{f: first[f] for f in ("key", "section", "label", "rate", "floor")},
               "n": max(p[k]["n"] for p in per if k in p), "values": vals,
               "baselines": {b: base_rows[b].get(k) for b in baselines if base_of[b] is not None}}
        rows.append(row)
        if vals[0] is not None and vals[-1] is not None:
            compared += 1
            name = f"{row['section']}: {row['label']}"
            if not (vals[-1] > vals[0] or vals[-1] >= 1.0 - 1e-12 and vals[0] >= 1.0 - 1e-12):
                not_better.append(name)
                if _headline(k):
                    headline_not_better.append(name)
            if vals[0] - vals[-1] > noise_margin(vals[0], vals[-1], row["n"]):
                worse.append(name)
    n_head = sum(_headline(r["key"]) and None not in (r["values"][0], r["values"][-1]) for r in rows)
    return {"labels": [lab for lab, _ in reports], "baselines": [b for b in baselines if base_of[b] is not None],
            "rows": rows, "verdict": {"beats_every_row": compared > 0 and not not_better, "compared": compared,
                                      "not_better": not_better, "headline_rows": n_head,
                                      "headline_not_better": headline_not_better, "worse_beyond_noise": worse,
                                      "ships": n_head > 0 and not headline_not_better and not worse}}


SECTION_TITLES = {"facts": "facts", "numbers": "numbers", "niah": "NIAH", "long": "long docs", "nohijack": "no-hijack"}


def _fmt(v, rate: bool) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.0f} %" if rate else f"{v:.3f}"


def compare_markdown(cmp: dict, *, method_name: str = "D2L") -> str:
    """:func:`compare_reports` as a markdown table (then the verdict line)."""
    names = {"base": "base", "in_context": "in-prompt", "in_context_fewshot": "in-prompt few-shot"}
    head = ["row", "n", *[f"{method_name}: {lab}" for lab in cmp["labels"]],
            *[names.get(b, b) for b in cmp["baselines"]], "blind floor"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in cmp["rows"]:
        cells = [f"{SECTION_TITLES[r['section']]} {r['label']}", str(r["n"]),
                 *[_fmt(v, r["rate"]) for v in r["values"]],
                 *[_fmt(r["baselines"].get(b), r["rate"]) for b in cmp["baselines"]],
                 _fmt(r["floor"], False) if r["floor"] is not None else ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    v = cmp["verdict"]
    first, last = cmp["labels"][0], cmp["labels"][-1]
    if v["beats_every_row"]:
        verdict = f"verdict: {last} beats {first} on every row ({v['compared']} rows)"
    else:
        more = " …" if len(v["not_better"]) > 12 else ""
        verdict = (f"verdict: {last} does NOT beat {first} on every row: not higher on {len(v['not_better'])} of "
                   f"{v['compared']} rows ({'; '.join(v['not_better'][:12])}{more})")
    if "ships" in v:
        if v["ships"]:
            verdict += (f"\n\nheadline: {last} is higher than {first} on all {v['headline_rows']} headline rows and "
                        "lower than it on no row by more than the row's 95 % sampling margin")
        else:
            why = [f"not higher on headline rows: {'; '.join(v['headline_not_better'])}"] \
                if v["headline_not_better"] else []
            why += [f"lower beyond the 95 % margin: {'; '.join(v['worse_beyond_noise'])}"] \
                if v["worse_beyond_noise"] else []
            verdict += f"\n\nheadline: {last} does NOT replace {first}: " + "; ".join(why or ["no headline rows"])
    return "\n".join(lines) + "\n\n" + verdict


def plot_comparison(cmp: dict, path, *, title: str = "reading model: D2L rows side by side") -> None:
    """One panel per section, one horizontal bar per report (its D2L value) on every row, the baselines as
    markers and the fact attributes' blind floors as red ticks; shares and F1 on one 0–1 axis."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    secs = [s for s in SECTIONS if any(r["section"] == s for r in cmp["rows"])]
    if not secs:
        raise ValueError("nothing to plot: the comparison has no rows")
    heights = [max(2, sum(r["section"] == s for r in cmp["rows"])) for s in secs]
    fig, axes = plt.subplots(len(secs), 1, figsize=(9, 1.2 + 0.3 * sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    k = len(cmp["labels"])
    marks = {"base": "x", "in_context": "o", "in_context_fewshot": "^"}
    for ax, s in zip(axes[:, 0], secs):
        rows = [r for r in cmp["rows"] if r["section"] == s]
        ys = range(len(rows))
        for j, lab in enumerate(cmp["labels"]):
            ax.barh([y + (j - (k - 1) / 2) * 0.8 / k for y in ys], [r["values"][j] or 0.0 for r in rows],
                    height=0.8 / k, label=f"D2L {lab}")
        for b in cmp["baselines"]:
            pts = [(r["baselines"][b], y) for y, r in zip(ys, rows) if r["baselines"].get(b) is not None]
            if pts:
                ax.plot(*zip(*pts), linestyle="none", marker=marks.get(b, "s"), color="k", markersize=5,
                        label={"in_context": "in-prompt", "in_context_fewshot": "in-prompt few-shot"}.get(b, b))
        fl = [(r["floor"], y) for y, r in zip(ys, rows) if r["floor"] is not None]
        if fl:
            ax.plot(*zip(*fl), linestyle="none", marker="|", color="r", markersize=12, label="blind floor")
        ax.set_yticks(list(ys), [r["label"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.02)
        ax.set_title(SECTION_TITLES[s], fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("F1 or share")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes[1:, 0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, fontsize=7, loc="upper right", ncol=min(4, len(labels)))
    fig.suptitle(title, x=0.02, ha="left", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["BASELINES", "SAMPLE_KINDS", "SAMPLE_METHODS", "compare_markdown", "compare_reports", "load_eval_dir",
           "pick_samples", "plot_comparison", "report_rows", "samples_markdown", "snippet"]
