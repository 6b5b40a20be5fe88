"""Compile report, part 1: the scenarios and the capture of each kernel launch's compile signature, and the
compile of each distinct signature for the target (see :mod:`.compile_report` for how this works).

The shapes come from :mod:`.shapes` (the same definition the benchmarks use).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from . import shapes as _shapes

# published base models: (hidden, intermediate); D2L targets mlp.down_proj: d_in = intermediate, d_out = hidden
MODELS = {m.name: (m.hidden, m.intermediate) for m in _shapes.MODEL_SHAPES.values()}
# one chunk gives rank (1 + 1) * 8 = 16, 8 is the bare chunk rank, 64 a 7-chunk document, 1032 a ~128-chunk one;
# "mix" gives the 16 prefill documents the ranks 8, 16, 64, 1032 in turn
RANKS = (8, 16, 64, _shapes.LONG_DOC_RANK, "mix")
PREFILL_DOCS, PREFILL_LEN = _shapes.PREFILL_DOCS, _shapes.PREFILL_TOKENS
# a small prefill (8 prompts of 32 tokens, 256 tokens in all): the batch size at which pick_config picks "fused"
SMALL_PREFILL_ROWS, SMALL_PREFILL_LEN = 8, 32
DECODE_ROWS = _shapes.DECODE_ROWS


def _readout_config(name: str, r: _shapes.ReadoutShape, lens: tuple) -> tuple:
    return (name, r.n_q, r.n_heads, r.head_dim, r.n_kv_heads, r.d_model, lens)


# (name, n_q, H, hd, n_kv, D, segment lengths)
READOUT_CONFIGS = (
    _readout_config("main 16x256", _shapes.READOUT_MAIN, (256,) * 16),
    _readout_config("main 1x2048", _shapes.READOUT_MAIN, (2048,)),
    _readout_config("main 26x2000", _shapes.READOUT_MAIN, (2000,) * 26),  # the GPU suite's Gemma-2-2b case
    _readout_config("niah 1x4096", _shapes.READOUT_NIAH, (4096,)),
)
# label -> (torch dtype name, requested fp32 matmul precision)
DTYPES = {"bf16": ("bfloat16", None), "fp16": ("float16", None), "fp32-tf32": ("float32", "tf32"),
          "fp32-ieee": ("float32", "ieee")}
SMEM_LIMIT = 227 * 1024
# Scenario.shape of a readout called without ctx_rstd (absorbed: rstd inside the kernel; plain: one extra pass)
RSTD_ON_DEVICE = "rstd on device"


# ----------------------------------------------------------------------------------------------- scenarios
@dataclass(frozen=True)
class Scenario:
    """One host-launcher call: ``op`` in {"prefill-fwd", "prefill-bwd", "decode-fwd", "mlp-prefill", "readout"}
    ("mlp-prefill": the fused gated activation + down_proj LoRA shrink, then the expand into y)."""

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
            ranks8_72 = _shapes.mlp_seg_ranks(PREFILL_DOCS)
            out.append(Scenario("mlp-prefill", model=name, dtype=dt, rank="8-72", d_in=inter, d_out=hidden,
                                seq_lens=(PREFILL_LEN,) * PREFILL_DOCS, seg_ranks=ranks8_72,
                                shape=f"{PREFILL_DOCS}x{PREFILL_LEN}"))  # fmt: skip
        for cfg in READOUT_CONFIGS[:1] if quick else READOUT_CONFIGS:
            for mode in ("absorbed",) if quick else ("absorbed", "plain"):
                out.append(Scenario("readout", model=cfg[0], dtype=dt, readout=cfg, mode=mode))
                if not quick and cfg[0] == "main 26x2000":  # without ctx_rstd: the statistic computed on the device
                    out.append(Scenario("readout", model=cfg[0], dtype=dt, readout=cfg, mode=mode,
                                        shape=RSTD_ON_DEVICE))
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
    from ..kernels.gated_lora import launch as gl  # noqa: F401  (imported so its kernel module is checked below)
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
    from ..kernels.gated_lora import kernel as gk

    kernels = [getattr(m, n) for m in (sk, rl, gk) for n in dir(m) if n.endswith("_kernel")]
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
    if scen.op == "mlp-prefill":
        _run_mlp(scen, dtype, dev)
        return ""
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
                      ctx_rstd=None if scen.shape == RSTD_ON_DEVICE else rstd)
    return rf.resolve_mode("auto", q, ctx, n_kv)


def _run_mlp(scen: Scenario, dtype, dev) -> None:
    """The fused MLP LoRA's two launches (gated activation + shrink, expand) on meta tensors."""
    import torch

    from ..kernels.gated_lora.launch import gated_lora_expand_fwd, gated_lora_shrink_fwd
    from ..kernels.segmented_lora import SegmentMeta

    T = sum(scen.seq_lens)
    offsets = [0]
    for r in scen.seg_ranks:
        offsets.append(offsets[-1] + r)
    meta = SegmentMeta.from_lengths(list(scen.seq_lens), list(range(len(scen.seq_lens))), offsets, device=dev)
    gate = torch.empty(T, scen.d_in, dtype=dtype, device=dev)
    A = torch.empty(offsets[-1], scen.d_in, dtype=dtype, device=dev)
    B = torch.empty(offsets[-1], scen.d_out, dtype=dtype, device=dev)
    y = torch.empty(T, scen.d_out, dtype=dtype, device=dev)
    _, s = gated_lora_shrink_fwd(gate, torch.empty_like(gate), A, meta, 2.0, _shapes.mlp_activation(scen.model))
    gated_lora_expand_fwd(y, s, B, meta)


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


__all__ = ["DECODE_ROWS", "DTYPES", "Launch", "MODELS", "PREFILL_DOCS", "PREFILL_LEN", "RANKS", "READOUT_CONFIGS",
           "RSTD_ON_DEVICE",
           "SMALL_PREFILL_LEN", "SMALL_PREFILL_ROWS", "SMEM_LIMIT", "Scenario", "build_scenarios", "capture",
           "compile_all", "compile_one"]
