"""Compile report, part 2: the analytic byte model of each kernel, the per-launch rows and per-op totals with
their pass / fail checks, and the text tables (see :mod:`.compile_report`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .capture import DTYPES, RSTD_ON_DEVICE, SMEM_LIMIT, Launch, Scenario, build_scenarios, capture, compile_all
from .shapes import MODEL_SHAPES

RATIO_LIMIT = 1.5
_ELEM = {"bf16": 2, "fp16": 2, "fp32": 4, "i32": 4, "i64": 8}


# ----------------------------------------------------------------------------------------------- byte counts
def _cdiv(a, b):
    return -(-a // b)


def _elem(sig: str) -> int:
    return _ELEM[sig.lstrip("*")]


def kernel_bytes(lc: Launch) -> int | None:
    """Global bytes one captured launch loads + stores (see module docstring); None for an unknown kernel."""
    s, c, i, sig = lc.scenario, lc.constexprs, lc.ints, lc.signature
    name = lc.short
    if s.op != "readout":
        segs = [(n, r) for n, r in zip(s.seq_lens, s.seg_ranks) if n > 0 and r > 0]
        BM = c.get("BLOCK_M", 1)
        BR = c.get("BLOCK_R")
        if name == "gated_act_shrink":
            # gate + up read and h written once over every row; A once per (row tile, all K slices); fp32 partials
            e, d_ff = _elem(sig["gate_ptr"]), s.d_in
            n_split = lc.grid[1] if len(lc.grid) > 1 else 1
            return sum(3 * n * d_ff * e for n in s.seq_lens) + sum(
                _cdiv(n, BM) * r * d_ff * e + n_split * n * r * 4 for n, r in segs)
        if name == "lora_fused_fwd":
            e, d_in, d_out = _elem(sig["x_ptr"]), s.d_in, s.d_out
            nN = _cdiv(d_out, c["BLOCK_N"])
            return sum(nN * _cdiv(r, BR) * n * d_in * e + nN * _cdiv(n, BM) * r * d_in * e
                       + _cdiv(n, BM) * r * d_out * e + 2 * n * d_out * e for n, r in segs)
        if name == "lora_shrink":
            # split-K: each (tile, rank block) reads x and W once over all K slices, writes one fp32 partial per slice
            e, d = _elem(sig["x_ptr"]), i.get("d_in", c.get("d_in"))
            n_split = lc.grid[2] if len(lc.grid) > 2 else 1
            return sum(_cdiv(r, BR) * n * d * e + _cdiv(n, BM) * r * d * e + n_split * n * r * 4 for n, r in segs)
        if name == "lora_expand":
            e, d = _elem(sig["w_ptr"]), i.get("d_out", c.get("d_out"))
            nN = _cdiv(d, c["BLOCK_N"])
            n_split = i.get("n_splits", c.get("n_splits")) or 1
            return sum(nN * n_split * n * r * 4 + _cdiv(n, BM) * r * d * e + 2 * n * d * e for n, r in segs)
        if name == "lora_decode_shrink":  # one row per tile: A read once per row, x once per rank block
            e, d = _elem(sig["x_ptr"]), i.get("d_in", c.get("d_in"))
            n_split = lc.grid[2] if len(lc.grid) > 2 else 1
            return sum(n * (r * d * e + _cdiv(r, BR) * d * e + n_split * r * 4) for n, r in segs)
        if name == "lora_decode_expand":  # B read once per row; partials re-read per output block
            e, d = _elem(sig["b_ptr"]), i.get("d_out", c.get("d_out"))
            nN = _cdiv(d, c["BLOCK_N"])
            n_split = i.get("n_splits", c.get("n_splits")) or 1
            return sum(n * (r * d * e + nN * n_split * r * 4 + 2 * d * e) for n, r in segs)
        if name == "lora_wgrad":
            e, d = _elem(sig["x_ptr"]), i.get("d", c.get("d"))
            nN = _cdiv(d, c["BLOCK_N"])
            # one adapter per segment in these scenarios
            return sum(nN * n * r * 4 + _cdiv(r, BR) * n * d * e + r * d * e for n, r in segs)
        if name == "lora_decode_fwd":
            e, d_in, d_out = _elem(sig["x_ptr"]), s.d_in, s.d_out
            nN = _cdiv(d_out, c["BLOCK_N"])
            return sum(nN * _cdiv(r, BR) * d_in * e + nN * r * d_in * e + r * d_out * e + 2 * d_out * e
                       for n, r in segs)
        return None
    return _readout_bytes(lc, name, s.readout[6])


def _readout_bytes(lc: Launch, name: str, lens) -> int | None:
    """The readout's kernels: every program reads its keys at full width (and its value columns), its query tile,
    and writes its fp32 output or partial (+ LSE); the merge reads every used partial once (LSE twice)."""
    c, i, sig = lc.constexprs, lc.ints, lc.signature

    def val(k):
        return i.get(k, c.get(k))

    if name == "ctx_rstd":
        return sum(lens) * (val("dim") * _elem(sig["x_ptr"]) + 4)
    if name not in ("readout_split", "readout_merge"):
        return None
    R, G = val("n_rows"), val("n_groups")
    split = val("split_len")
    used = [_cdiv(n, split) for n in lens]
    if name == "readout_merge":
        dv, n_d = val("dim"), val("n_d_blocks")
        return sum(G * (u * R * (dv * 4 + 4 * 2 * n_d) + R * dv * 4) for u in used)
    e, dk, dv = _elem(sig["q_ptr"]), val("dim_k"), val("dim_v")
    n_m = _cdiv(R, c["BLOCK_M"])
    n_dv = lc.grid[0] // n_m
    ts = c.get("TOK_SCALE", 0)
    total = 0
    for n, u in zip(lens, used):
        progs_tok = G * n_m * n_dv * n  # (program, token) pairs
        total += progs_tok * dk * e  # keys at full width
        if not (c.get("SHARED_KV") and n_dv == 1):
            total += G * n_m * n * dv * e  # value columns (a D split re-reads its slice)
        total += progs_tok * (4 if ts == 1 else (dk * e if ts == 2 else 0))  # rstd read / mean-square re-read
        n_out = u if c.get("SPLIT") else 1
        total += G * max(u, 1) * n_dv * R * dk * e  # query tiles
        total += G * n_out * R * (dv * 4 + (4 if c.get("SPLIT") else 0))
    return total


def op_min_bytes(s: Scenario, mode: str | None = None) -> int:
    """Every operand read once, every output written once (in-place outputs read and written)."""
    e = 4 if s.dtype.startswith("fp32") else 2
    if s.op != "readout":
        T = sum(s.seq_lens)
        w = sum(r for n, r in zip(s.seq_lens, s.seg_ranks) if n > 0 and r > 0) * (s.d_in + s.d_out) * e
        if s.op == "prefill-bwd":  # read dy, x, A, B; write dx, dA, dB
            return T * (s.d_out + 2 * s.d_in) * e + 2 * w
        if s.op == "mlp-prefill":  # read gate, up, A, B; write h; read + write y
            return 3 * T * s.d_in * e + w + 2 * T * s.d_out * e
        return T * s.d_in * e + w + 2 * T * s.d_out * e
    _, n_q, H, hd, n_kv, D, lens = s.readout
    T, n_seg = sum(lens), len(lens)
    if (mode or s.mode) == "absorbed":  # folded queries in, raw context + rstd once, fp32 [n_seg, n_q*H, D] out
        return n_seg * n_q * H * D * e + T * (D * e + 4) + n_seg * n_q * H * D * 4
    if s.shape == RSTD_ON_DEVICE:  # the plain form's extra pass: the context is read for its rstd
        return n_seg * n_q * H * hd * e + T * (2 * n_kv * hd * e + D * e + 4) + n_seg * n_q * H * hd * 4
    return n_seg * n_q * H * hd * e + T * 2 * n_kv * hd * e + n_seg * n_q * H * hd * 4


# ----------------------------------------------------------------------------------------------- report
@dataclass
class Report:
    arch: str
    rows: list = field(default_factory=list)  # one per (launch)
    ops: list = field(default_factory=list)  # one per scenario: op bytes vs minimum
    failures: list = field(default_factory=list)
    seconds: float = 0.0
    n_compiled: int = 0


def _gating(precision: str, requested: str) -> bool:
    """bf16 / fp16 kernels, and the kernels of a tf32 run that do not compute in fp32-ieee, gate the exit status."""
    if precision in ("bf16", "fp16", "fp32-tf32"):
        return True
    return requested == "fp32-tf32" and precision == "fp32"  # an fp32 kernel without tl.dot on the tf32 path


def _check(res: dict) -> list[str]:
    if "error" in res:
        return [f"compile failed: {res['error']}"]
    bad = []
    if res["stack"] or res["ldl"] or res["stl"] or res["local"]:
        bad.append(f"spills (STACK {res['stack']} B, {res['ldl']} LDL / {res['stl']} STL)")
    if res["mma"] == "FMA":
        bad.append("tl.dot lowered to FMA")
    if res["shared"] > SMEM_LIMIT:
        bad.append(f"shared memory {res['shared']} B > {SMEM_LIMIT} B")
    return bad


def assemble(launches, results, arch) -> Report:
    rep = Report(arch)
    by_scen: dict = {}
    for lc in launches:
        res = results[lc.compile_key()]
        kb = kernel_bytes(lc)
        mn = op_min_bytes(lc.scenario)
        prec = lc.precision
        problems = _check(res)
        note = ""
        req = DTYPES[lc.scenario.dtype][1]
        if req and prec.startswith("fp32-") and prec != lc.scenario.dtype:
            note = f"{req} requested, launcher chose {prec.split('-')[1]}"
        status = "ok" if not problems else ("FAIL" if _gating(prec, lc.scenario.dtype) else "warn")
        s = lc.scenario
        row = {
            "kernel": lc.short, "op": s.op, "shape": s.shape, "model": s.model, "dtype": prec, "requested": s.dtype,
            "rank": s.rank if s.op != "readout" else "", "mode": s.mode,
            "auto_mode": lc.auto_mode, "grid": list(lc.grid),
            "blocks": {k: v for k, v in lc.constexprs.items() if k.startswith("BLOCK")},
            "constexprs": {k: v for k, v in lc.constexprs.items()},
            "num_warps": res.get("num_warps", lc.options.get("num_warps")),
            "num_stages": res.get("num_stages", lc.options.get("num_stages")),
            "shared": res.get("shared"), "regs": res.get("regs"), "spill": res.get("stack"),
            "ldl": res.get("ldl"), "stl": res.get("stl"), "mma": res.get("mma"), "ffma": res.get("ffma"),
            "hmma": res.get("hmma"), "kernel_bytes": kb, "op_min_bytes": mn,
            "bytes_ratio": round(kb / mn, 2) if kb is not None else None,
            "status": status, "problems": problems, "note": note, "error": res.get("error"),
        }
        rep.rows.append(row)
        if status == "FAIL":
            rep.failures.append(f"{lc.short} {s.op} {s.model} {prec} rank {s.rank or '-'}: " + "; ".join(problems))
        by_scen.setdefault(id(s), (s, []))[1].append(row)
    for s, rows in by_scen.values():
        known = all(r["kernel_bytes"] is not None for r in rows)
        total = sum(r["kernel_bytes"] for r in rows) if known else None
        mn = op_min_bytes(s)
        rep.ops.append({"op": s.op, "shape": s.shape, "model": s.model, "dtype": rows[0]["dtype"], "rank": s.rank,
                        "mode": s.mode,
                        "auto_mode": rows[0]["auto_mode"], "kernels": [r["kernel"] for r in rows], "bytes": total,
                        "min_bytes": mn, "ratio": round(total / mn, 2) if total else None})
    rep.n_compiled = len(results)
    return rep


def _fmt_blocks(b: dict) -> str:
    return "x".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in b.items())


def _group_rows(rows):
    """Rows with the same kernel, op, dtype and compiled config share one table line (models, ranks joined)."""
    groups: dict = {}
    for r in rows:
        key = (r["op"], r["shape"], r["kernel"], r["dtype"], r["mode"],
               json.dumps(r["constexprs"], sort_keys=True, default=str), r["num_warps"], r["num_stages"])
        groups.setdefault(key, []).append(r)
    return list(groups.values())


def format_table(rep: Report) -> str:
    abbrev = {m.name: m.tag for m in MODEL_SHAPES.values()}
    head = ("kernel", "op", "models", "dtype", "rank", "blocks", "w/s", "smem", "regs", "spill", "LDL/STL", "mma",
            "bytes/min", "status")
    lines = []
    for grp in _group_rows(rep.rows):
        r = grp[0]
        models = sorted({abbrev.get(g["model"], g["model"]) for g in grp})
        ranks = []
        for g in grp:
            if g["rank"] and g["rank"] not in ranks:
                ranks.append(g["rank"])
        op = f"{r['op']} {r['shape']}" if r["op"] != "readout" else f"readout {r['mode']}" + (
            "*" if r["mode"] == r["auto_mode"] else "") + (f" ({r['shape']})" if r["shape"] else "")
        ratios = [g["bytes_ratio"] for g in grp if g["bytes_ratio"] is not None]
        ratio = "n/a" if not ratios else (f"{min(ratios):.2f}" if min(ratios) == max(ratios)
                                          else f"{min(ratios):.2f}-{max(ratios):.2f}")
        status = "FAIL" if any(g["status"] == "FAIL" for g in grp) else r["status"]
        if r["error"]:
            cells = (r["kernel"], op, ",".join(models), r["dtype"], ",".join(ranks), _fmt_blocks(r["blocks"]),
                     f"{r['num_warps']}/{r['num_stages']}", "-", "-", "-", "-", "error", ratio, status)
        else:
            cells = (r["kernel"], op, ",".join(models), r["dtype"], ",".join(ranks), _fmt_blocks(r["blocks"]),
                     f"{r['num_warps']}/{r['num_stages']}", f"{r['shared'] / 1024:.0f}K", str(r["regs"]),
                     str(r["spill"]), f"{r['ldl']}/{r['stl']}", r["mma"], ratio, status)
        lines.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)] if lines else [len(h) for h in head]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*cells) for cells in lines]
    return "\n".join(out)


def format_ops(rep: Report) -> str:
    """Op byte totals vs minimum, one line per (op, rank / readout form, dtype class), one column per model."""
    models = []
    for o in rep.ops:
        if o["op"] != "readout" and o["model"] not in models:
            models.append(o["model"])
    cells: dict = {}
    for o in rep.ops:
        col = o["model"] if o["op"] != "readout" else "ratio"
        what = o["rank"] if o["op"] != "readout" else f"{o['model']} {o['mode']}" + (
            "*" if o["mode"] == o["auto_mode"] else "") + (f" ({o['shape']})" if o["shape"] else "")
        width = "fp32" if o["dtype"].startswith("fp32") else "16-bit"
        op = f"{o['op']} {o['shape']}" if o["op"] != "readout" else "readout"
        cells.setdefault((op, what, width), {})[col] = o["ratio"]
    head = ["op", "rank / config", "dtype"] + models + ["ratio"]
    lines = []
    for (op, what, width), row in cells.items():
        vals = [row.get(m) for m in models + ["ratio"]]
        flag = any(v is not None and v > RATIO_LIMIT for v in vals)
        lines.append([op, what, width] + ["" if v is None else f"{v:.2f}" + ("!" if v > RATIO_LIMIT else "")
                                          for v in vals] + (["> 1.5x"] if flag else [""]))
    head.append("")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*ln) for ln in lines])


def run_report(arch: str = "sm_90", quick: bool = False, jobs: int = 2, n_sm: int = 132) -> Report:
    """Capture, compile and assemble (in this process; see :func:`main` for the clean-environment guard)."""
    t0 = time.perf_counter()
    scenarios = build_scenarios(quick)
    launches = capture(scenarios, arch, n_sm)
    results = compile_all(launches, arch, jobs)
    rep = assemble(launches, results, arch)
    rep.seconds = round(time.perf_counter() - t0, 1)
    return rep


__all__ = ["RATIO_LIMIT", "Report", "assemble", "format_ops", "format_table", "kernel_bytes", "op_min_bytes",
           "run_report"]
