"""Ahead-of-time compile report of every Triton kernel variant, for a CUDA architecture, without a GPU.

``d2l-fast compile-report [--arch sm_90] [--quick] [--json PATH]``

How the configs are found: the real host launchers (``segmented_lora_fwd`` / ``segmented_lora_bwd`` and the
public ``latent_readout``) run on ``meta`` tensors of the real shapes (so no memory is used and no math is
done) while ``fn[grid](...)`` of every Triton kernel is intercepted: instead of launching, the call is turned
into the exact compile signature Triton's own launcher would build (its binder and argument packer, with the
target backend), so the report always follows what ``pick_config`` selects today. Launchers that ask for the
device get a stand-in CUDA device of the target (``--sms`` SMs). Each distinct signature is then compiled
with ``triton.compile`` for the target and read back:

* shared memory (``metadata.shared``; the H100 limit is 227 KB per block),
* registers and spill bytes (``cuobjdump -res-usage``: ``REG``, ``STACK``; local loads/stores ``LDL``/``STL``
  counted in the SASS),
* the instruction the dots lower to (TTGIR ``warp_group_dot`` = wgmma, ``nvidia_mma`` ``versionMajor = 2`` =
  mma.sync, a ``tt.dot`` with neither = FMA; kernels without ``tl.dot`` are marked ``none (no dot)``),
* an analytic count of the global bytes each kernel moves (L2 requests: every tile a program loads or stores,
  masked-off rows and ranks excluded, no credit for cache hits) against the minimum for the op (every operand
  read once, every output written once); the op total over its kernels is checked against 1.5x.

Exit status: 0 when every bf16 / fp16 / tf32 config compiles with no spill, no FMA fallback for ``tl.dot``
and at most 227 KB of shared memory; 1 otherwise (fp32-``ieee`` configs are reported, never failing);
3 when Triton cannot compile for CUDA on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

__all__ = ["MODELS", "RANKS", "READOUT_CONFIGS", "DTYPES", "run_report", "main"]

# published base models: (hidden, intermediate); D2L targets mlp.down_proj: d_in = intermediate, d_out = hidden
MODELS = {
    "gemma-2-2b": (2304, 9216),
    "qwen3-4b": (2560, 9728),
    "mistral-7b": (4096, 14336),
    "smollm2-135m": (576, 1536),
}
# one chunk gives rank (1 + 1) * 8 = 16, 8 is the bare chunk rank, 64 a 7-chunk document, 1032 a ~128-chunk one;
# "mix" gives the 16 prefill documents the ranks 8, 16, 64, 1032 in turn
RANKS = (8, 16, 64, 1032, "mix")
PREFILL_DOCS, PREFILL_LEN = 16, 256
# a small prefill (8 prompts of 32 tokens, 256 tokens in all): the batch size at which pick_config picks "fused"
SMALL_PREFILL_ROWS, SMALL_PREFILL_LEN = 8, 32
DECODE_ROWS = 64
# (name, n_q, H, hd, n_kv, D, segment lengths)
READOUT_CONFIGS = (
    ("main 16x256", 8, 16, 128, 4, 512, (256,) * 16),
    ("main 1x2048", 8, 16, 128, 4, 512, (2048,)),
    ("niah 1x4096", 208, 16, 128, 4, 512, (4096,)),
)
# label -> (torch dtype name, requested fp32 matmul precision)
DTYPES = {"bf16": ("bfloat16", None), "fp16": ("float16", None), "fp32-tf32": ("float32", "tf32"),
          "fp32-ieee": ("float32", "ieee")}
SMEM_LIMIT = 227 * 1024
RATIO_LIMIT = 1.5
EXIT_TOOLCHAIN = 3
_ELEM = {"bf16": 2, "fp16": 2, "fp32": 4, "i32": 4, "i64": 8}


# ----------------------------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    """One host-launcher call: ``op`` in {"prefill-fwd", "prefill-bwd", "decode-fwd", "readout"}."""

    op: str
    model: str
    dtype: str  # a DTYPES label (requested)
    rank: str = ""  # LoRA rank label
    shape: str = ""  # batch label, e.g. "16x256" (segments x tokens)
    seq_lens: tuple = ()
    seg_ranks: tuple = ()
    d_in: int = 0
    d_out: int = 0
    readout: tuple = ()  # (name, n_q, H, hd, n_kv, D, seq_lens)
    mode: str = ""  # readout form forced for this call


def _seg_ranks(rank, n):
    if rank == "mix":
        return tuple((8, 16, 64, 1032)[i % 4] for i in range(n))
    return (int(rank),) * n


def build_scenarios(quick: bool = False) -> list[Scenario]:
    """Every (op, shape, model, dtype, rank) the report covers; ``quick``: Gemma-2-2b, bf16, rank 16, forward only,
    the main readout config in the absorbed form."""
    models = {"gemma-2-2b": MODELS["gemma-2-2b"]} if quick else MODELS
    dtypes = ("bf16",) if quick else tuple(DTYPES)
    ranks = (16,) if quick else RANKS
    out = []
    for dt in dtypes:
        for name, (hidden, inter) in models.items():
            for r in ranks:
                pre = dict(model=name, dtype=dt, rank=str(r), d_in=inter, d_out=hidden)
                big = dict(seq_lens=(PREFILL_LEN,) * PREFILL_DOCS, seg_ranks=_seg_ranks(r, PREFILL_DOCS),
                           shape=f"{PREFILL_DOCS}x{PREFILL_LEN}", **pre)
                out.append(Scenario("prefill-fwd", **big))
                out.append(Scenario("prefill-fwd", seq_lens=(SMALL_PREFILL_LEN,) * SMALL_PREFILL_ROWS,
                                    seg_ranks=_seg_ranks(r, SMALL_PREFILL_ROWS),
                                    shape=f"{SMALL_PREFILL_ROWS}x{SMALL_PREFILL_LEN}", **pre))
                if not quick:
                    out.append(Scenario("prefill-bwd", **big))
                if r != "mix":
                    out.append(Scenario("decode-fwd", seq_lens=(1,) * DECODE_ROWS, seg_ranks=_seg_ranks(r, DECODE_ROWS),
                                        shape=f"{DECODE_ROWS}x1", **pre))
        for cfg in READOUT_CONFIGS[:1] if quick else READOUT_CONFIGS:
            for mode in ("absorbed",) if quick else ("absorbed", "plain"):
                out.append(Scenario("readout", model=cfg[0], dtype=dt, readout=cfg, mode=mode))
    return out


# ----------------------------------------------------------------------------------------------- capture
@dataclass
class Launch:
    """One intercepted ``kernel[grid](...)``: the compile signature Triton's launcher would build."""

    scenario: Scenario
    index: int  # position among the scenario's launches
    kernel: str  # "module:qualname"
    grid: tuple
    signature: dict
    constexprs: dict  # arg name -> value
    attrs: list  # [[arg index, [[attr, value], ...]], ...]
    options: dict  # launch options passed by the launcher (num_warps, num_stages, ...)
    ints: dict  # non-constexpr int / float args by name (for the byte model)
    auto_mode: str = ""

    @property
    def short(self) -> str:
        return self.kernel.rsplit(":", 1)[-1].strip("_").removesuffix("_kernel")

    def compile_key(self) -> str:
        return json.dumps([self.kernel, self.signature, sorted(self.constexprs.items()), self.attrs,
                           sorted(self.options.items())], default=str)

    @property
    def precision(self) -> str:
        """The dtype label the kernel really compiles for (fp32 split by its INPUT_PRECISION)."""
        base = self.scenario.dtype.split("-")[0]
        if base != "fp32":
            return base
        prec = self.constexprs.get("INPUT_PRECISION")
        return f"fp32-{prec}" if prec else "fp32"


def _target(arch: str):
    from triton.backends.compiler import GPUTarget

    m = re.fullmatch(r"sm_?(\d+)a?", arch.strip().lower())
    if not m:
        raise ValueError(f"--arch must look like sm_90 (a CUDA compute capability), got {arch!r}")
    return GPUTarget("cuda", int(m.group(1)), 32)


def _manual_specialization(fn, args, kwargs):
    """Fallback for Triton versions without the binder used below: the launcher's rules, written out."""
    import torch

    names = fn.arg_names
    bound = dict(zip(names, args))
    bound.update({k: v for k, v in kwargs.items() if k in names})
    signature, constexprs, attrs = {}, {}, []
    for i, (p, name) in enumerate(zip(fn.params, names)):
        v = bound.get(name, p.default if p.has_default else None)
        if p.is_constexpr:
            signature[name], constexprs[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                                     torch.int32: "i32", torch.int64: "i64"}[v.dtype]
            attrs.append([i, [["tt.divisibility", 16]] if v.data_ptr() % 16 == 0 else []])
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            if v == 1 and not p.do_not_specialize:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            attrs.append([i, [["tt.divisibility", 16]] if v % 16 == 0 and not p.do_not_specialize else []])
        elif isinstance(v, float):
            signature[name] = "fp32"
        elif v is None:
            signature[name], constexprs[name] = "constexpr", None
        else:
            raise TypeError(f"cannot type argument {name}={v!r} of {fn}")
    return signature, constexprs, attrs


def _specialize(fn, backend, args, kwargs):
    """(signature, constexprs by name, attrs, launch options) exactly as ``JITFunction.run`` would pack them."""
    opts = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    try:
        from triton.runtime.jit import create_function_from_signature

        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound_args, spec, options = binder(*args, **kwargs)
        _, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, spec, options)
    except (ImportError, AttributeError, TypeError):
        signature, constexprs, attrs = _manual_specialization(fn, args, kwargs)
        return signature, constexprs, attrs, opts
    names = fn.arg_names
    constexprs = {names[p[0]]: v for p, v in constexprs.items()}
    attrs = [[p[0], [list(a) for a in v]] for p, v in sorted(attrs.items())]
    return signature, constexprs, attrs, opts


class _FakeProps:
    """What launchers may ask ``torch.cuda.get_device_properties`` about the target (H100 SXM by default)."""

    def __init__(self, arch_major: int, arch_minor: int, n_sm: int):
        self.name = f"compile-report stand-in sm_{arch_major}{arch_minor}"
        self.major, self.minor = arch_major, arch_minor
        self.multi_processor_count = n_sm
        self.total_memory = 80 * 2**30
        self.shared_memory_per_block_optin = SMEM_LIMIT
        self.warp_size = 32
        self.L2_cache_size = 50 * 2**20


def _as_cuda(v):
    import torch

    if isinstance(v, torch.device) and v.type != "cuda":
        return torch.device("cuda", 0)
    return v


def _wrap_device_query(fn):
    def wrapped(*args, **kwargs):
        return fn(*[_as_cuda(a) for a in args], **{k: _as_cuda(v) for k, v in kwargs.items()})

    wrapped.__wrapped__ = fn
    return wrapped


@contextlib.contextmanager
def _patched(obj, name, value):
    had = name in vars(obj)
    old = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def _fp32_precision(prec):
    """Set torch's fp32 matmul precision flags (the launchers read them) to ``prec`` ("tf32" / "ieee")."""
    import torch

    if prec is None:
        yield
        return
    m = torch.backends.cuda.matmul
    old_allow, old_prec = m.allow_tf32, torch.get_float32_matmul_precision()
    try:
        m.allow_tf32 = prec == "tf32"
        torch.set_float32_matmul_precision("high" if prec == "tf32" else "highest")
        yield
    finally:
        m.allow_tf32 = old_allow
        torch.set_float32_matmul_precision(old_prec)


def _kernel_modules():
    from ..kernels.latent_readout import function as rf
    from ..kernels.latent_readout import launch as rl
    from ..kernels.segmented_lora import kernel as sk
    from ..kernels.segmented_lora import launch as sl

    return sl, sk, rl, rf


def _check_compiled_mode():
    """Refuse to capture interpreted kernels: the configs differ and nothing could be compiled."""
    from triton.runtime.jit import JITFunction

    from ..kernels.latent_readout import configs as rc
    from ..kernels.segmented_lora import configs as sc

    sl, sk, rl, rf = _kernel_modules()
    for mod in (sc, rc):
        if mod.interpreting():
            raise RuntimeError("compile-report needs TRITON_INTERPRET unset (pick_config selects GPU configs only "
                               "then); run it in a clean environment")
    kernels = [getattr(m, n) for m in (sk, rl) for n in dir(m) if n.endswith("_kernel")]
    bad = [k for k in kernels if not isinstance(k, JITFunction)]
    if bad:
        raise RuntimeError(f"the kernels were imported under TRITON_INTERPRET ({type(bad[0]).__name__}); "
                           "run compile-report in a fresh process without it")


def capture(scenarios, arch: str = "sm_90", n_sm: int = 132) -> list[Launch]:
    """Run the real launchers for every scenario on meta tensors and record each kernel launch."""
    import torch
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, KernelInterface

    _check_compiled_mode()
    sl, sk, rl, rf = _kernel_modules()
    target = _target(arch)
    backend = make_backend(target)
    launches: list[Launch] = []
    current: dict = {}

    def getitem(self, grid):
        def record(*args, **kwargs):
            if not isinstance(self, JITFunction):
                raise TypeError(f"compile-report can only capture plain @triton.jit kernels, got {type(self)}")
            signature, constexprs, attrs, opts = _specialize(self, backend, args, kwargs)
            bound = dict(zip(self.arg_names, args))
            bound.update(kwargs)
            ints = {k: v for k, v in bound.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            scen = current["scenario"]
            launches.append(Launch(
                scen, current["n"], f"{self.module}:{self.fn.__qualname__}", tuple(int(g) for g in grid),
                signature, constexprs, attrs, opts, ints))  # fmt: skip
            current["n"] += 1

        return record

    major, minor = divmod(target.arch, 10)
    props = _FakeProps(major, minor, n_sm)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(KernelInterface, "__getitem__", getitem))
        stack.enter_context(_patched(torch.cuda, "get_device_properties", lambda *a, **k: props))
        stack.enter_context(_patched(torch.cuda, "get_device_capability", lambda *a, **k: (major, minor)))
        # the readout refuses non-CUDA tensors unless interpreting: let meta tensors through its guards only
        for mod in (rl, rf):
            if hasattr(mod, "interpreting"):
                stack.enter_context(_patched(mod, "interpreting", lambda: True))
        for mod in (sl, rl):
            for name in [n for n in vars(mod) if n.startswith("pick_config")]:
                stack.enter_context(_patched(mod, name, _wrap_device_query(getattr(mod, name))))
        for scen in scenarios:
            current.update(scenario=scen, n=0)
            with _fp32_precision(DTYPES[scen.dtype][1]):
                before = len(launches)
                auto_mode = _run_scenario(scen, sl, rf)
                for lc in launches[before:]:
                    lc.auto_mode = auto_mode
    return launches


def _run_scenario(scen: Scenario, sl, rf) -> str:
    """Call the scenario's launcher on meta tensors; returns the readout form mode="auto" picks (else "")."""
    import torch

    from ..kernels.segmented_lora import SegmentMeta

    dev = torch.device("meta")
    dtype = getattr(torch, DTYPES[scen.dtype][0])
    if scen.op != "readout":
        T = sum(scen.seq_lens)
        offsets = [0]
        for r in scen.seg_ranks:
            offsets.append(offsets[-1] + r)
        meta = SegmentMeta.from_lengths(list(scen.seq_lens), list(range(len(scen.seq_lens))), offsets, device=dev)
        x = torch.empty(T, scen.d_in, dtype=dtype, device=dev)
        A = torch.empty(offsets[-1], scen.d_in, dtype=dtype, device=dev)
        B = torch.empty(offsets[-1], scen.d_out, dtype=dtype, device=dev)
        if scen.op == "prefill-bwd":
            dy = torch.empty(T, scen.d_out, dtype=dtype, device=dev)
            sl.segmented_lora_bwd(dy, x, A, B, meta, 2.0)
        else:
            out = torch.empty(T, scen.d_out, dtype=dtype, device=dev)
            sl.segmented_lora_fwd(out, x, A, B, meta, 2.0)
        return ""
    _, n_q, H, hd, n_kv, D, lens = scen.readout
    T = sum(lens)
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    q = torch.empty(len(lens), n_q, H, hd, dtype=dtype, device=dev)
    ctx = torch.empty(T, D, dtype=dtype, device=dev)
    wk = torch.empty(n_kv * hd, D, dtype=dtype, device=dev)
    wv = torch.empty(n_kv * hd, D, dtype=dtype, device=dev)
    w = torch.empty(D, dtype=dtype, device=dev)
    rstd = torch.empty(T, dtype=torch.float32, device=dev)
    cu_t = torch.tensor(cu, dtype=torch.int32).to(dev)
    rf.latent_readout(q, ctx, cu_t, max(lens), wk, wv, w, n_kv_heads=n_kv, mode=scen.mode, backend="triton",
                      ctx_rstd=rstd)
    return rf.resolve_mode("auto", q, ctx, n_kv)


# ----------------------------------------------------------------------------------------------- compile
def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def compile_one(job: dict) -> dict:
    """Compile one captured signature for the target and read its resources (runs in a worker process)."""
    import importlib

    import triton
    from triton.compiler import ASTSource, make_backend

    t0 = time.perf_counter()
    mod_name, qual = job["kernel"].split(":")
    fn = importlib.import_module(mod_name)
    for part in qual.split("."):
        fn = getattr(fn, part)
    if not hasattr(fn, "arg_names") or type(fn).__name__ != "JITFunction":
        raise RuntimeError(f"{job['kernel']} is {type(fn).__name__}, not a JITFunction (TRITON_INTERPRET set?)")
    target = _target(job["arch"])
    backend = make_backend(target)
    attrs = {(i,): [tuple(a) for a in v] for i, v in job["attrs"]}
    src = ASTSource(fn, dict(job["signature"]), dict(job["constexprs"]), attrs)
    k = triton.compile(src, target=target, options=backend.parse_options(dict(job["options"])).__dict__)
    res = {"shared": int(k.metadata.shared), "num_warps": k.metadata.num_warps,
           "num_stages": k.metadata.num_stages}
    ttgir, ttir = k.asm.get("ttgir", ""), k.asm.get("ttir", "")
    has_dot = "tt.dot" in ttir or "tt.dot_scaled" in ttir
    if "warp_group_dot" in ttgir or "versionMajor = 3" in ttgir:
        res["mma"] = "wgmma"
    elif "versionMajor = 2" in ttgir:
        res["mma"] = "mma.sync"
    else:
        res["mma"] = "FMA" if has_dot else "none (no dot)"
    res["has_dot"] = has_dot
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", usage)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output: {usage[:300]!r}")
    res["regs"], res["stack"], res["local"] = int(m.group(1)), int(m.group(2)), int(m.group(4))
    ops = re.findall(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)
    res["ldl"] = sum(o == "LDL" for o in ops)
    res["stl"] = sum(o == "STL" for o in ops)
    res["ffma"] = sum(o == "FFMA" for o in ops)
    res["hmma"] = sum(o in ("HMMA", "HGMMA") for o in ops)
    res["compile_s"] = round(time.perf_counter() - t0, 2)
    return res


def _compile_safe(job: dict) -> dict:
    try:
        return compile_one(job)
    except Exception as e:  # reported per config; a failed gating config fails the report
        return {"error": f"{type(e).__name__}: {e}"[:500]}


def compile_all(launches, arch: str, jobs: int = 2) -> dict:
    """Compile every distinct signature once; returns {compile_key: result}."""
    uniq = {}
    for lc in launches:
        uniq.setdefault(lc.compile_key(), {"kernel": lc.kernel, "signature": lc.signature,
                                           "constexprs": lc.constexprs, "attrs": lc.attrs, "options": lc.options,
                                           "arch": arch})
    keys = list(uniq)
    if jobs <= 1 or len(keys) <= 1:
        return {k: _compile_safe(uniq[k]) for k in keys}
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
        return dict(zip(keys, ex.map(_compile_safe, [uniq[k] for k in keys])))


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
    lens = s.readout[6]
    if name == "readout_fwd":
        e = _elem(sig["q_ptr"])
        R, d = i.get("n_rows", c.get("n_rows")), i.get("dim", c.get("dim"))
        G = lc.grid[1] // _cdiv(R, c["BLOCK_M"])
        split = i.get("split_len", c.get("split_len"))
        n_tiles = _cdiv(R, c["BLOCK_M"])
        kv = 1 if c.get("SHARED_KV") else 2
        ts = 4 if c.get("HAS_TOK_SCALE") else 0
        total = 0
        for n in lens:
            n_splits = max(1, _cdiv(n, split)) if n else 1
            total += G * n_tiles * n * (kv * d * e + ts)  # keys (and values) once per row tile
            total += G * n_splits * R * (d * e + d * 4 + 4)  # q read, partial output + lse written per split
        return total
    if name == "readout_combine":
        R, d = i.get("n_rows", c.get("n_rows")), i.get("dim", c.get("dim"))
        n_splits = i.get("n_splits", c.get("n_splits"))
        G = lc.grid[1] // _cdiv(R, c["BLOCK_M"])
        return len(lens) * G * (n_splits * R * (d * 4 + 4) * 2 + R * d * 4)  # lse read twice
    return None


def op_min_bytes(s: Scenario, mode: str | None = None) -> int:
    """Every operand read once, every output written once (in-place outputs read and written)."""
    e = 4 if s.dtype.startswith("fp32") else 2
    if s.op != "readout":
        T = sum(s.seq_lens)
        w = sum(r for n, r in zip(s.seq_lens, s.seg_ranks) if n > 0 and r > 0) * (s.d_in + s.d_out) * e
        if s.op == "prefill-bwd":  # read dy, x, A, B; write dx, dA, dB
            return T * (s.d_out + 2 * s.d_in) * e + 2 * w
        return T * s.d_in * e + w + 2 * T * s.d_out * e
    _, n_q, H, hd, n_kv, D, lens = s.readout
    T, n_seg = sum(lens), len(lens)
    if (mode or s.mode) == "absorbed":  # folded queries in, raw context + rstd once, fp32 [n_seg, n_q*H, D] out
        return n_seg * n_q * H * D * e + T * (D * e + 4) + n_seg * n_q * H * D * 4
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
    abbrev = {"gemma-2-2b": "G", "qwen3-4b": "Q", "mistral-7b": "M", "smollm2-135m": "S"}
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
            "*" if r["mode"] == r["auto_mode"] else "")
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
            "*" if o["mode"] == o["auto_mode"] else "")
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


def _toolchain_ok() -> str | None:
    try:
        import triton  # noqa: F401
        from triton.compiler import make_backend

        make_backend(_target("sm_90"))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas) and not os.environ.get("TRITON_PTXAS_PATH"):
        return "triton's bundled ptxas is missing"
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="sm_90", help="CUDA architecture to compile for (default sm_90: H100/H200)")
    p.add_argument("--sms", type=int, default=132, help="SM count launchers see for the target (default 132)")
    p.add_argument("--quick", action="store_true",
                   help="a small subset: Gemma-2-2b, bf16, rank 16, forward only, one readout")
    p.add_argument("--json", metavar="PATH", help="also write every row and op total as JSON")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")


def _needs_clean_process() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    mod = sys.modules.get("d2l_fast.kernels.segmented_lora.kernel")
    return mod is not None and type(getattr(mod, "_lora_fused_fwd_kernel", None)).__name__ != "JITFunction"


def run_cli(args) -> int:
    """Entry point of ``d2l-fast compile-report``: prints the tables, writes JSON, returns the exit status."""
    if args.jobs < 1 or args.sms < 1:
        raise SystemExit(f"--jobs and --sms must be >= 1, got {args.jobs} and {args.sms}")
    _target(args.arch)  # validates --arch before any work
    if _needs_clean_process():
        # the kernels must be imported as compiled (not interpreted) functions: rerun in a clean process
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = [sys.executable, "-m", "d2l_fast.profiling.compile_report", "--arch", args.arch, "--sms", str(args.sms),
                "--jobs", str(args.jobs)] + (["--quick"] if args.quick else []) + (
            ["--json", args.json] if args.json else [])
        print("compile-report: TRITON_INTERPRET is set here; running in a clean subprocess", file=sys.stderr)
        return subprocess.call(argv, env=env)
    problem = _toolchain_ok()
    if problem:
        print(f"compile-report: triton cannot compile for CUDA here ({problem})", file=sys.stderr)
        return EXIT_TOOLCHAIN
    own_cache = "TRITON_CACHE_DIR" not in os.environ
    with tempfile.TemporaryDirectory(prefix="d2l-compile-report-") as cache:
        if own_cache:
            os.environ["TRITON_CACHE_DIR"] = cache
        try:
            rep = run_report(args.arch, args.quick, args.jobs, args.sms)
        finally:
            if own_cache:
                os.environ.pop("TRITON_CACHE_DIR", None)
    print(f"compile report for {rep.arch} (triton {_triton_version()}): {len(rep.rows)} launches, "
          f"{rep.n_compiled} distinct kernels compiled in {rep.seconds} s")
    print("models: G gemma-2-2b, Q qwen3-4b, M mistral-7b, S smollm2-135m (down_proj: d_in = intermediate); "
          f"op shapes are segments x tokens, one adapter per segment (decode: {DECODE_ROWS} distinct adapters); "
          "readout * = the form mode='auto' picks")
    print("bytes/min: global bytes this kernel loads + stores (L2 requests, no credit for cache reuse) / minimum "
          "bytes of its whole op (operands read once, outputs written once)\n")
    print(format_table(rep))
    print("\nop bytes (sum over the op's kernels) / minimum; ! = over 1.5x\n")
    print(format_ops(rep))
    notes = sorted({r["note"] for r in rep.rows if r["note"]})
    for n in notes:
        print(f"note: {n}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dataclasses.asdict(rep) | {"triton": _triton_version()}, f, indent=1, default=str)
    if rep.failures:
        print(f"\n{len(rep.failures)} gating (bf16 / fp16 / tf32) launches FAIL:")
        for msg in sorted(set(rep.failures)):
            print(f"  {msg}")
        return 1
    print("\nall bf16 / fp16 / tf32 configs: no spills, tensor-core MMA for every tl.dot, shared memory <= 227 KB")
    return 0


def _triton_version() -> str:
    import triton

    return triton.__version__


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="d2l-fast compile-report", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_cli(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
