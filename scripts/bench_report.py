"""Markdown table of a pytest-benchmark JSON: mean time per provider and ratio vs the ``base`` provider.

    python scripts/bench_report.py /tmp/seglora.json [--stat mean|median|min]
    python scripts/bench_report.py benchmarks/results/gpu_suite_h100_run2.json     # a gpu_suite.py run

Generic: rows are grouped by ``extra_info["case"]``, columns by ``extra_info["provider"]``; a provider
named ``base`` (if present) is the denominator of the ratios.

Benchmarks whose extra_info names a per-case ``baseline`` provider or a throughput unit (``work_items`` +
``work_unit``, e.g. the end-to-end suite) get a long table instead, one row per (case, provider): time,
× the case's baseline, throughput (work_items / time, e.g. docs/s or tokens/s) and its ratio, peak RSS
and its ratio, CPU used by other processes; then the case's ``goal`` line. ``--wide`` also prints the
wide table for such files.
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


def _is_long(data: dict) -> bool:
    return any("baseline" in b.get("extra_info", {}) or "work_unit" in b.get("extra_info", {})
               for b in data.get("benchmarks", []))


def _ratio(x, y) -> str:
    return f"{x / y:.2f}×" if x is not None and y else "–"


def build_long_table(data: dict, stat: str = "mean") -> str:
    cases: "OrderedDict[str, list[dict]]" = OrderedDict()
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        cases.setdefault(info.get("case", b.get("group") or b["name"]), []).append(b)
    out = []
    for case, rows in cases.items():
        by_prov = {r.get("extra_info", {}).get("provider", r["name"]): r for r in rows}
        base_name = rows[0].get("extra_info", {}).get("baseline") or ("base" if "base" in by_prov else None)
        base = by_prov.get(base_name)
        base_case = rows[0].get("extra_info", {}).get("baseline_case")
        if base is None and base_case in cases:  # the baseline provider was measured in another case
            base = {r.get("extra_info", {}).get("provider", r["name"]): r for r in cases[base_case]}.get(base_name)
        unit = rows[0].get("extra_info", {}).get("work_unit")
        tp_head = f"{unit}/s" if unit else "throughput"
        head = ["provider", f"time ({stat})", f"× {base_name or 'baseline'} time", tp_head,
                f"× {base_name or 'baseline'} {tp_head}", "peak RSS MB", "× baseline peak", "other-proc cores",
                "rounds"]
        lines = [f"**{case}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base_t = base["stats"][stat] if base else None
        base_info = base.get("extra_info", {}) if base else {}
        base_tp = base_info["work_items"] / base_t if base and "work_items" in base_info else None
        base_mem = base_info.get("peak_rss_mb")
        for prov, r in by_prov.items():
            info = r.get("extra_info", {})
            t = r["stats"][stat]
            tp = info["work_items"] / t if "work_items" in info else None
            mem = info.get("peak_rss_mb")
            mem_s = "–" if mem is None else f"{mem:.0f}"
            if info.get("peak_rss_mb_subprocess") is not None:
                mem_s += f" (fresh proc {info['peak_rss_mb_subprocess']:.0f})"
            cells = [prov, _fmt_time(t), _ratio(t, base_t), "–" if tp is None else f"{tp:.3g}", _ratio(tp, base_tp),
                     mem_s, _ratio(mem, base_mem), str(info.get("other_cores", "–")),
                     str(r["stats"].get("rounds", "–"))]
            lines.append("| " + " | ".join(cells) + " |")
        goal = rows[0].get("extra_info", {}).get("goal")
        if goal:
            lines += ["", goal]
        if base_case and base is not None and base_name not in by_prov:
            lines += ["", f"(× ratios against {base_name} of case {base_case})"]
        out.append("\n".join(lines))
    return "\n\n".join(out)


def _n(v, fmt="{:.1f}"):
    return "–" if v is None else fmt.format(v)


def _cells(*cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |"


def _head(*cols) -> list[str]:
    return ["", _cells(*cols), "|" + "---|" * len(cols)]


def _kv(r: dict, skip=("section",)) -> str:
    return ", ".join(f"{k} {_n(v, '{:.4g}') if isinstance(v, float) else v}" for k, v in r.items() if k not in skip)


def _env_lines(data: dict) -> list[str]:
    env = data.get("env", {})
    out = [f"Card: **{env.get('device')}** ({env.get('sms')} SMs), torch {env.get('torch')}, "
           f"triton {env.get('triton')}; measured ceilings: copy {_n(env.get('copy_GBps'), '{:.0f}')} GB/s "
           f"(read + write), bf16 matmul {_n(env.get('bf16_matmul_TFLOPs'), '{:.0f}')} TFLOP/s"]
    sections = data.get("sections") or {}
    if sections:
        out += _head("section", "status", "seconds")
        out += [_cells(name, s.get("status", "–"), _n(s.get("seconds"))) for name, s in sections.items()]
        out.append(f"\nTotal {_n(data.get('total_s'))} s; sections with errors: {len(data.get('errors') or [])}")
    for name, t in (data.get("tests") or {}).items():
        out.append(f"- tests `{name}`: rc {t['rc']}, {' '.join(t.get('summary') or [])}")
    return out


def _lora_table(rows: list, env: dict) -> list[str]:
    lora = [r for r in rows if r.get("section") == "lora"]
    if not lora:
        return []
    out = _head("case", "base µs", "d2l_fast µs (overhead)", "LoRA alone: events µs / graph µs / host µs",
                "LoRA GB/s (graph, % of copy)", "per-adapter cuBLAS µs", "PEFT µs", "config")
    bw = env.get("copy_GBps")
    for case in dict.fromkeys(r["case"] for r in lora):
        by = {r["provider"]: r for r in lora if r["case"] == case}
        base, d2l, lo = by.get("base", {}), by.get("d2l_fast", {}), by.get("lora_only", {})
        gbps = None
        if lo.get("graph_us") and lo.get("GBps") and lo.get("us"):
            gbps = lo["GBps"] * lo["us"] / lo["graph_us"]
        ovh = (d2l["us"] / base["us"] - 1) * 100 if base.get("us") and d2l.get("us") else None
        out.append(_cells(case, _n(base.get("us")), f"{_n(d2l.get('us'))} ({_n(ovh, '{:+.0f}')} %)",
                          f"{_n(lo.get('us'))} / {_n(lo.get('graph_us'))} / {_n(lo.get('host_us'))}",
                          f"{_n(gbps, '{:.0f}')} ({_n(gbps / bw * 100 if gbps and bw else None, '{:.0f}')} %)",
                          _n(by.get("cublas_loop", {}).get("us")), _n(by.get("peft", {}).get("us")),
                          lo.get("config", "")))
    return out


def _mlp_table(rows: list, env: dict) -> list[str]:
    mlp = [r for r in rows if r.get("section") == "mlp_summary"]
    if not mlp:
        return []
    out = _head("gated MLP + down_proj LoRA (16x256, ranks 8-72)", "bare µs", "fused µs (x bare)",
                "unfused µs (x bare)", "fused kernel / act alone", "target <= 1.10x")
    for r in mlp:
        by = {x["provider"]: x for x in rows if x.get("section") == "mlp" and x["case"] == r["case"]}
        out.append(_cells(r["case"], _n(by.get("base", {}).get("us")),
                          f"{_n(by.get('fused', {}).get('us'))} ({_n(r.get('fused_vs_bare'), '{:.3f}')})",
                          f"{_n(by.get('unfused', {}).get('us'))} ({_n(r.get('unfused_vs_bare'), '{:.3f}')})",
                          _n(r.get("gated_shrink_vs_act"), "{:.2f}"), "met" if r.get("target_met") else "not met"))
    return out


def _readout_table(rows: list, env: dict) -> list[str]:
    ro = [r for r in rows if r.get("section") == "readout"]
    if not ro:
        return []
    # old JSON (before the issue-18 rewrite) has useful_TFLOPs; new rows give the executed form's rates and bound
    out = _head("readout case", "provider", "µs (graph)", "TFLOP/s", "% of bf16 peak", "GB/s", "% of copy BW",
                "% of bound", "rel. error")
    for r in ro:
        pct = r.get("pct_of_bound")
        out.append(_cells(r["case"], r["provider"], f"{_n(r['us'])} ({_n(r.get('graph_us'))})",
                          _n(r.get("TFLOPs", r.get("useful_TFLOPs"))), _n((r.get("frac_peak") or 0) * 100),
                          _n(r.get("GBps")), _n((r.get("frac_copy_bw") or 0) * 100),
                          f"{_n(pct)}{' (' + r['bound'] + ')' if pct is not None and r.get('bound') else ''}",
                          _n(r.get("rel_err"), "{:.1e}")))
    for r in (x for x in rows if x.get("section") == "readout_summary"):
        out.append(_cells(f"**{r['case']}** ({r['mode']})", "new vs old",
                          f"{_n(r['new_us'])} vs {_n(r['old_us'])}: **{_n(r['speedup'], '{:.2f}')}×**", "", "", "",
                          "", _n(r.get("pct_of_bound")), ""))
    return out


def _internalize_tables(rows: list, env: dict) -> list[str]:
    out = []
    isum = [r for r in rows if r.get("section") == "internalize_summary"]
    if isum:
        out += _head("internalize (Gemma-2-2b-shaped, bf16)", "tokens", "today / bare", "flex / bare",
                     "flex encode / bare", "flex speed-up", "projection FLOPs / bare", "≤ 1.5×")
        out += [_cells(r["case"], r["n_tokens"], _n(r["today_vs_bare"], "{:.2f}"), _n(r["flex_vs_bare"], "{:.2f}"),
                       _n(r["flex_encode_vs_bare"], "{:.2f}"), _n(r["flex_speedup"], "{:.2f}"),
                       _n(r["projection_vs_bare"], "{:.2f}"), "met" if r["target_met"] else "not met") for r in isum]
    steps = [r for r in rows if r.get("section") == "internalize" and "attention" in r]
    if steps:
        out += _head("internalize case", "attention", "bare ms", "encode ms", "internalize ms",
                     "internalize tokens/s")
        for key in dict.fromkeys((r["case"], r["attention"]) for r in steps):
            by = {r["step"]: r for r in steps if (r["case"], r["attention"]) == key}
            out.append(_cells(*key, *(_n(by.get(s, {}).get("ms"), "{:.2f}") for s in ("bare", "encode",
                                                                                        "internalize")),
                              _n(by.get("internalize", {}).get("tokens_per_s"), "{:.0f}")))
    out += [f"- internalize {r.get('case') or r.get('step')}: {_kv(r, ('section', 'case'))}" for r in rows
            if r.get("section") == "internalize" and "attention" not in r]
    return out


def _e2e_table(rows: list, env: dict) -> list[str]:
    e2e = [r for r in rows if r.get("section") == "e2e"]
    if not e2e:
        return []
    out = _head("end to end (random Gemma-2-2b-shaped model, bf16)", "result")
    return out + [_cells(r["step"], _kv(r, ("section", "step"))) for r in e2e]


def _profile_table(rows: list, env: dict, top: int = 8) -> list[str]:
    prof = [r for r in rows if r.get("section") == "profile"]
    if not prof:
        return []
    out = _head("profile (top CUDA kernels by self time)", "kernel", "calls", "CUDA µs", "% of the call")
    for case in dict.fromkeys(r["case"] for r in prof):
        mine = [r for r in prof if r["case"] == case]
        total = next((r for r in mine if "total_cuda_us" in r), {})
        out.append(_cells(f"**{case}**", f"all ({total.get('n_kernels', '–')} kernels)", "",
                          _n(total.get("total_cuda_us"), "{:.0f}"), "100"))
        out += [_cells(case, r["kernel"], r.get("calls", "–"), _n(r.get("cuda_us"), "{:.0f}"),
                       _n((r.get("frac") or 0) * 100)) for r in [x for x in mine if "kernel" in x][:top]]
    return out


def _decode_table(rows: list, env: dict) -> list[str]:
    dec = [r for r in rows if r.get("section") == "decode"]
    if not dec:
        return []
    out = _head("decode (serving engine)", "tokens/s", "step ms", "host ms", "CUDA ms", "CPU ms",
                "same tokens as dynamic", "graph captures")
    for r in dec:
        if "status" in r:
            out.append(_cells(r["mode"], r["status"], "", "", "", "", "", ""))
        elif "tokens_per_s" in r:
            out.append(_cells(r["mode"], _n(r["tokens_per_s"], "{:.0f}"), _n(r.get("step_ms"), "{:.2f}"),
                              _n(r.get("host_ms"), "{:.2f}"), _n(r.get("cuda_ms"), "{:.2f}"),
                              _n(r.get("cpu_ms"), "{:.2f}"), _n(r.get("same_tokens_as_dynamic"), "{:.2f}"),
                              r.get("captures", "–")))
    ratios = [r for r in dec if "speedup_vs_dynamic" in r]
    if ratios:
        out += _head("decode mode", "× dynamic tokens/s", "× its no-adapter run", "targets (static graphs)")
        for r in ratios:
            goal = "–"
            if r["mode"] == "static_graphs":
                met = r["speedup_vs_dynamic"] >= 3 and r["vs_noadapter"] >= 0.9
                goal = f"≥ 3× dynamic and ≥ 0.9× no-adapter: {'met' if met else 'not met'}"
            out.append(_cells(r["mode"], _n(r["speedup_vs_dynamic"], "{:.2f}"), _n(r["vs_noadapter"], "{:.2f}"),
                              goal))
    return out


def _train_table(rows: list, env: dict) -> list[str]:
    tr = [r for r in rows if r.get("section") == "train"]
    if not tr:
        return []
    out = _head("train step (Trainer._step)", "objective / average", "tokens: context + QA (contexts)",
                "step ms (first)", "tokens/s", "peak GiB (before the step)", "loss path",
                "reference per-token copies (spec §1.8): R, GiB per layer / all layers",
                "reference peak est. GiB", "loss (grad norm)", "param. update norm")
    notes = []
    for r in tr:
        if "status" in r:
            out.append(_cells(r["variant"], r["status"], *[""] * 9))
            continue
        out.append(_cells(
            r["variant"], f"{r['objective']} / {r['average']}",
            f"{r['ctx_tokens']} + {r['qa_tokens']} ({r['contexts']})",
            f"{_n(r['step_ms'])} ({_n(r.get('first_step_ms'), '{:.0f}')})", _n(r["tokens_per_s"], "{:.0f}"),
            f"{_n(r.get('peak_mem_GiB'), '{:.2f}')} ({_n(r.get('mem_before_GiB'), '{:.2f}')})", r["loss_path"],
            f"{r['ref_R']}: {_n(r['ref_copy_GiB_per_layer'], '{:.3g}')} / {_n(r['ref_copy_GiB'], '{:.3g}')}",
            _n(r.get("ref_peak_est_GiB")), f"{_n(r['loss'], '{:.4g}')} ({_n(r.get('grad_norm'), '{:.3g}')})",
            _n(r.get("param_change"), "{:.3g}")))
        if r.get("liger_reason"):
            notes.append(f"- `{r['variant']}`: no Liger: {r['liger_reason']}")
    first = next((r for r in tr if "status" not in r), None)
    if first:
        out.append(f"\nModel: {first['base_layers']} base layers, {first['dtype']}, hypernetwork "
                   f"{_n(first['hypernet_params_M'])} M parameters, student packing {first['student_packing']}, "
                   f"{first['device']}")
    out += notes
    for r in (x for x in rows if x.get("section") == "train_summary"):
        out.append(f"- {r['case']}: torch chunked / Liger step time {_n(r['step_torch_vs_liger'], '{:.2f}')}×, "
                   f"peak {_n(r.get('peak_torch_minus_liger_GiB'), '{:+.2f}')} GiB, loss rel. difference "
                   f"{_n(r.get('loss_rel_diff'), '{:.1e}')} (Liger ran: {r['liger_ran']})")
    return out


#: row sections each renderer above shows; rows of any other section get a generic table
RENDERED = {"lora", "lora_summary", "mlp", "mlp_summary", "readout", "readout_summary", "internalize",
            "internalize_summary", "e2e", "profile", "decode", "train", "train_summary"}


def build_gpu_suite_tables(data: dict) -> str:
    """Markdown tables of a ``scripts/gpu_suite.py`` JSON: card, ceilings, section statuses, tests, then one table per
    section (lora, mlp, readout, internalize, e2e, profile, decode, train; any other section as key-value rows)."""
    if not isinstance(data, dict) or not isinstance(data.get("rows", []), list):
        raise ValueError(f"expected a gpu_suite.py JSON object with a 'rows' list, got {type(data).__name__}")
    env, rows = data.get("env", {}), data.get("rows", [])
    out = _env_lines(data)
    for render in (_lora_table, _mlp_table, _readout_table, _internalize_tables, _e2e_table, _profile_table,
                   _decode_table, _train_table):
        out += render(rows, env)
    for section in dict.fromkeys(r.get("section") for r in rows if r.get("section") not in RENDERED):
        out += _head(f"{section}", "result")
        out += [_cells(i, _kv(r)) for i, r in enumerate(x for x in rows if x.get("section") == section)]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json_path")
    ap.add_argument("--stat", default="mean", choices=["mean", "median", "min", "max"])
    ap.add_argument("--wide", action="store_true", help="also print the wide table for files with per-case baselines")
    args = ap.parse_args(argv)
    with open(args.json_path) as f:
        data = json.load(f)
    if "sections" in data and "rows" in data:  # scripts/gpu_suite.py
        print(build_gpu_suite_tables(data))
        return
    mi = data.get("machine_info", {})
    print(f"<!-- {mi.get('cpu', {}).get('brand_raw', mi.get('processor', ''))}; {data.get('datetime', '')} -->")
    if _is_long(data):
        if args.wide:
            print(build_table(data, args.stat) + "\n")
        print(build_long_table(data, args.stat))
    else:
        print(build_table(data, args.stat))


if __name__ == "__main__":
    main()
