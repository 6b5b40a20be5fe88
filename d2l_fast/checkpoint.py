"""Checkpoints: the reference's ``pytorch_model.bin`` (safely), a pickle-free format, and the hub layout.

Reference format (spec §3): a torch zip pickle of an OrderedDict with the hypernetwork's fp32 tensors
plus ``base_model_name_or_path`` (str), ``hypernet_config`` and ``ctx_encoder_args`` (pickled
dataclasses of ``ctx_to_lora`` / ``peft``). We read it with ``torch.load(weights_only=True)`` and an
allowlist that maps exactly those dotted class names onto d2l_fast's own config classes, so neither
``ctx_to_lora`` nor ``peft`` is needed and no arbitrary pickle code can run: any other global is
refused by torch's restricted unpickler.

Pickle-free format: a folder with ``d2l_config.json`` (the :class:`~d2l_fast.config.D2LSpec`) and
``hypernet.safetensors`` (same tensor names as the reference).

Every file is checked before anything is allocated from it: it must be a regular file (a device, FIFO, socket
or folder, also behind a symbolic link, is refused before it is opened, see :mod:`d2l_fast.safe_io`), the zip
holds only stored (uncompressed) entries whose CRC-32 matches, its pickle is at most ``MAX_PICKLE_OPCODES``
opcodes (counted by a streaming scan before unpickling, so a pickle bomb costs O(file size) and little memory),
no tensor is sparse, nested, quantized or on the ``meta`` device, no tensor claims more elements than its storage
holds (zero strides / overlaps), the config's sizes are bounded and consistent, and the tensors' names and shapes
are exactly those the config implies (compared on the ``meta`` device). Any failure is a :class:`CheckpointError`
naming the file and the offending field.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass

import torch

from .config import D2LSpec
from .reference_format import (
    AggregatorConfig,
    CtxEncoderArguments,
    HypernetConfig,
    LoraConfig,
    LoraRuntimeConfig,
    PeftType,
    TaskType,
    spec_from_reference,
    spec_to_reference,
)
from .safe_io import check_regular_file, open_regular, read_json

logger = logging.getLogger(__name__)

META_KEYS = ("base_model_name_or_path", "hypernet_config", "ctx_encoder_args")
CONFIG_NAME = "d2l_config.json"
WEIGHTS_NAME = "hypernet.safetensors"
REFERENCE_WEIGHTS_NAME = "pytorch_model.bin"
FORMAT_VERSION = 1

# Every dotted name the reference's checkpoints are known to pickle, mapped onto our classes.
_REFERENCE_GLOBALS = {
    "ctx_to_lora.modeling.hypernet.HypernetConfig": HypernetConfig,
    "ctx_to_lora.modeling_utils.HypernetConfig": HypernetConfig,
    "ctx_to_lora.modeling.aggregator.AggregatorConfig": AggregatorConfig,
    "ctx_to_lora.modeling_utils.AggregatorConfig": AggregatorConfig,
    "ctx_to_lora.configs.CtxEncoderArguments": CtxEncoderArguments,
    "ctx_to_lora.modeling_utils.CtxEncoderArguments": CtxEncoderArguments,
    "peft.tuners.lora.config.LoraConfig": LoraConfig,
    "peft.tuners.lora.LoraConfig": LoraConfig,
    "peft.tuners.lora.config.LoraRuntimeConfig": LoraRuntimeConfig,
    "peft.utils.peft_types.PeftType": PeftType,
    "peft.utils.peft_types.TaskType": TaskType,
    "builtins.set": set,
}
# What d2l_fast itself pickles: ``save_reference_checkpoint`` and ``torch.save(ModulatedPretrainedModel.state_dict())``
# write the classes of d2l_fast.reference_format; files written before they moved there name d2l_fast.config.
_OWN_CLASSES = (HypernetConfig, AggregatorConfig, CtxEncoderArguments, LoraConfig, LoraRuntimeConfig, PeftType,
                TaskType)
for _module in ("d2l_fast.reference_format", "d2l_fast.config"):
    _REFERENCE_GLOBALS.update({f"{_module}.{c.__name__}": c for c in _OWN_CLASSES})
del _module

MAX_CONFIG_BYTES = 1 << 20  # d2l_config.json
_MAX_WALK = 100_000  # objects visited when checking the tensors nested in a loaded pickle
# Opcodes of one pickle in a reference checkpoint (the tiny golden file has ~3,100; a released one some 10^4).
# Checked by a streaming scan before unpickling: the most a 250k-opcode pickle can build is well under 256 MB.
MAX_PICKLE_OPCODES = 250_000


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, unsafe, or does not match the model."""


@dataclass
class LoadedCheckpoint:
    """A parsed Doc-to-LoRA checkpoint: the normalised spec and the hypernetwork tensors (fp32, CPU)."""

    spec: D2LSpec
    state_dict: dict[str, torch.Tensor]
    source: str = ""
    hypernet_config: object = None
    ctx_encoder_args: object = None

    @property
    def base_model_name_or_path(self) -> str:
        return self.spec.base_model_name_or_path

    def validate(self) -> "LoadedCheckpoint":
        """Check the config and that the tensors are exactly the hypernetwork's (names, shapes, float dtypes)."""
        src = self.source or "<checkpoint>"
        try:
            self.spec.validate()
        except ValueError as e:
            raise CheckpointError(f"{src}: invalid config: {e}") from e
        check_tensors(self.spec, self.state_dict, src)
        return self

    def to_reference_state_dict(self) -> dict:
        """The dict shape the reference's ``from_state_dict`` expects (tensors + the three metadata keys)."""
        hc, ce = (self.hypernet_config, self.ctx_encoder_args)
        if hc is None or ce is None:
            hc, ce = spec_to_reference(self.spec)
        sd = dict(self.state_dict)
        sd["base_model_name_or_path"] = self.spec.base_model_name_or_path
        sd["hypernet_config"] = hc
        sd["ctx_encoder_args"] = ce
        return sd


def _safe_globals():
    return [(obj, name) for name, obj in _REFERENCE_GLOBALS.items()]


def _scan_pickle(f, path, name: str) -> None:
    """Count the opcodes of the pickle ``name`` with a streaming scan (nothing is built); refuse it past
    :data:`MAX_PICKLE_OPCODES`. Costs O(its size) time and constant memory."""
    n = 0
    for _ in pickletools.genops(f):
        n += 1
        if n > MAX_PICKLE_OPCODES:
            raise CheckpointError(f"{path}: zip entry {name!r}: the pickle holds more than {MAX_PICKLE_OPCODES} "
                                  "opcodes (a checkpoint holds a few thousand); refusing it")


def _check_zip(path: pathlib.Path, fh) -> None:
    """Refuse compressed, encrypted, duplicated or oversized entries, verify every CRC-32 (one read) and scan the
    pickles' opcodes. ``fh``: the checkpoint, open (a regular file)."""
    size = os.fstat(fh.fileno()).st_size
    try:
        with zipfile.ZipFile(fh) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise CheckpointError(f"{path}: the zip archive holds duplicated entry names; refusing it")
            for i in infos:
                if i.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(f"{path}: zip entry {i.filename!r} is compressed (method {i.compress_type}); "
                                          "torch checkpoints store entries uncompressed, refusing it")
                if i.flag_bits & 0x1:
                    raise CheckpointError(f"{path}: zip entry {i.filename!r} is encrypted; refusing it")
            total = sum(i.file_size for i in infos)
            if total > size:
                raise CheckpointError(f"{path}: zip entries claim {total} bytes in a file of {size} bytes")
            for i in infos:
                with zf.open(i) as f:  # zipfile checks the CRC-32 when the entry has been read to its end
                    if i.filename.endswith(".pkl"):
                        _scan_pickle(f, path, i.filename)
                    while f.read(1 << 22):
                        pass
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: corrupt zip archive (truncated file or flipped bytes?): {e}") from e
    except (OSError, EOFError, ValueError, NotImplementedError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: unreadable zip archive: {e}") from e


def _unpickling_reason(e: Exception) -> str:
    """The useful part of torch's weights-only error (not its advice to retry with ``weights_only=False``)."""
    text = str(e)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it references the global {m.group(1)}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln
             and "arbitrary code" not in ln and "torch.serialization" not in ln and "trusted" not in ln]
    return (lines[-1] if lines else type(e).__name__)[:300]


def _check_tensor(t: torch.Tensor, where: str) -> None:
    """A dense CPU tensor that does not claim more bytes than its storage holds (zero strides, overlapping views)."""
    if t.is_nested or t.layout != torch.strided:
        raise CheckpointError(f"{where}: a {'nested' if t.is_nested else str(t.layout).replace('torch.', '')} tensor; "
                              "a checkpoint holds dense (strided) tensors only, refusing it")
    if t.device.type != "cpu" or t.is_quantized:
        raise CheckpointError(f"{where}: a {'quantized' if t.is_quantized else t.device.type} tensor; a checkpoint "
                              "holds dense CPU tensors with data, refusing it")
    nbytes = t.untyped_storage().nbytes()
    need = t.numel() * t.element_size()
    if need > nbytes:
        raise CheckpointError(f"{where}: tensor of shape {tuple(t.shape)} (strides {t.stride()}) claims {need} bytes "
                              f"from a storage of {nbytes} bytes (zero-stride or overlapping layout); refusing it")
    if t.numel() and any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):
        raise CheckpointError(f"{where}: tensor of shape {tuple(t.shape)} has a zero stride; refusing it")


def _check_loaded(obj, path) -> None:
    """Walk the loaded pickle (dicts, lists, config objects) and check every tensor in it."""
    stack, seen, n = [(obj, "")], set(), 0
    while stack:
        o, where = stack.pop()
        n += 1
        if n > _MAX_WALK:
            raise CheckpointError(f"{path}: the pickle holds more than {_MAX_WALK} objects; refusing it")
        if isinstance(o, torch.Tensor):
            _check_tensor(o, f"{path}: entry {where or '<root>'}")
            continue
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, dict):
            stack.extend((v, f"{where}.{k}" if where else str(k)) for k, v in o.items())
        elif isinstance(o, (list, tuple, set, frozenset)):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(o))
        elif hasattr(o, "__dict__") and not isinstance(o, type):
            stack.extend((v, f"{where}.{k}") for k, v in vars(o).items())


def _torch_load_reference(path: pathlib.Path) -> dict:
    with open_regular(path, what="checkpoint", error=CheckpointError) as fh:
        return _torch_load_open(path, fh)


def _torch_load_open(path: pathlib.Path, fh) -> dict:
    if not zipfile.is_zipfile(fh):
        raise CheckpointError(
            f"{path} is not a torch zip checkpoint (expected the reference's pytorch_model.bin); "
            "the file is truncated, corrupt or in another format"
        )
    _check_zip(path, fh)
    fh.seek(0)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            obj = torch.load(fh, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refused to load {path}: {_unpickling_reason(e)}, outside the Doc-to-LoRA allowlist "
            f"({', '.join(sorted(set(_REFERENCE_GLOBALS)))}). Only load files you trust with other tools."
        ) from None
    except RecursionError:
        raise CheckpointError(f"{path}: the pickle nests too deeply; refusing it") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, KeyError, ValueError, TypeError, AttributeError,
            IndexError, OverflowError, MemoryError) as e:
        raise CheckpointError(f"{path} could not be read (truncated or corrupt?): {type(e).__name__}: "
                              f"{str(e)[:300]}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict state_dict at the top level, got {type(obj).__name__}")
    try:
        _check_loaded(obj, path)
    except (RuntimeError, NotImplementedError, TypeError) as e:  # a tensor kind torch cannot describe
        raise CheckpointError(f"{path}: unsupported tensor in the checkpoint: {type(e).__name__}: "
                              f"{str(e)[:300]}") from None
    return obj


def _expected_shapes(spec: D2LSpec) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the hypernetwork's tensors, built on the meta device (no memory is allocated)."""
    from .hypernet import HyperLoRA

    with torch.device("meta"):
        net = HyperLoRA(spec)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def check_tensors(spec: D2LSpec, tensors: dict, source: str = "<checkpoint>") -> None:
    """The tensors must be exactly the hypernetwork's of ``spec``: same names, shapes, floating dtypes."""
    expected = _expected_shapes(spec)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: tensors do not match the hypernetwork its config describes: "
                              f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for k, shape in expected.items():
        t = tensors[k]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{source}: entry {k!r} should be a tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: tensor {k!r} has shape {tuple(t.shape)}, the config implies {shape}")
        if not t.dtype.is_floating_point:
            raise CheckpointError(f"{source}: tensor {k!r} has dtype {t.dtype}, expected a floating dtype")


def split_reference_state_dict(sd: dict, *, source: str = "<dict>", copy: bool = True) -> LoadedCheckpoint:
    """Split a reference state dict into (spec, tensors), validated. Does not mutate ``sd`` unless ``copy=False``."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"{source}: expected a state dict, got {type(sd).__name__}")
    if copy:
        sd = dict(sd)
    missing = [k for k in META_KEYS if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: not a Doc-to-LoRA checkpoint, missing entries {missing}")
    base = sd.pop("base_model_name_or_path")
    hc = sd.pop("hypernet_config")
    ce = sd.pop("ctx_encoder_args")
    tensors = {}
    for k, v in sd.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{source}: state dict keys must be strings, got {type(k).__name__} {k!r:.80}")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{source}: entry {k!r} should be a tensor, got {type(v).__name__}")
        try:
            _check_tensor(v, f"{source}: entry {k!r}")
            tensors[k.replace("_orig_mod.", "")] = v.detach().to("cpu")
        except (RuntimeError, NotImplementedError, TypeError) as e:  # a tensor kind torch cannot describe
            raise CheckpointError(f"{source}: entry {k!r}: unsupported tensor ({type(e).__name__}: "
                                  f"{str(e)[:200]})") from None
    try:
        spec = spec_from_reference(base, hc, ce)
    except RecursionError:
        raise CheckpointError(f"{source}: malformed hypernet_config / ctx_encoder_args (nested too deeply)") from None
    except (ValueError, AttributeError, TypeError, KeyError, IndexError, RuntimeError, OverflowError) as e:
        raise CheckpointError(f"{source}: malformed hypernet_config / ctx_encoder_args: {e}") from None
    ckpt = LoadedCheckpoint(spec=spec, state_dict=tensors, source=source, hypernet_config=hc, ctx_encoder_args=ce)
    return ckpt.validate()


def _resolve_hub(path_or_id: str, subfolder: str | None, revision: str | None) -> pathlib.Path:
    """Download a folder of the hub layout (e.g. ``SakanaAI/doc-to-lora``, ``gemma_demo/checkpoint-80000``)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - hub is an optional extra
        raise CheckpointError(f"{path_or_id!r} is not a local path and huggingface_hub is not installed") from e
    pattern = f"{subfolder.strip('/')}/*" if subfolder else None
    local = snapshot_download(path_or_id, revision=revision, allow_patterns=[pattern] if pattern else None)
    return pathlib.Path(local) / (subfolder or "")


def resolve_checkpoint_path(path_or_id, subfolder: str | None = None, revision: str | None = None) -> pathlib.Path:
    """Local file, local folder (either format), or a hub repo id (+ subfolder)."""
    p = pathlib.Path(path_or_id)
    if p.exists():
        if subfolder:
            p = p / subfolder
    elif isinstance(path_or_id, str) and path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/")):
        p = _resolve_hub(path_or_id, subfolder, revision)
    else:
        raise CheckpointError(f"checkpoint {str(path_or_id)!r} not found (expected a file, a folder or a hub repo id)")
    if p.is_dir():
        for name in (CONFIG_NAME, REFERENCE_WEIGHTS_NAME):
            if (p / name).exists():
                return p / name if name == REFERENCE_WEIGHTS_NAME else p
        raise CheckpointError(f"{p} holds neither {CONFIG_NAME} nor {REFERENCE_WEIGHTS_NAME}")
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} not found")
    return p


def load_checkpoint(path_or_id, subfolder: str | None = None, revision: str | None = None) -> LoadedCheckpoint:
    """Load a Doc-to-LoRA checkpoint without ``ctx_to_lora``, ``peft`` or arbitrary pickle code.

    Accepts the reference's ``pytorch_model.bin`` (CPU- or CUDA-tagged storages), a folder holding it,
    a pickle-free folder written by :func:`save_checkpoint`, or a hub repo id with ``subfolder``
    (e.g. ``load_checkpoint("SakanaAI/doc-to-lora", "gemma_demo/checkpoint-80000")``).
    """
    p = resolve_checkpoint_path(path_or_id, subfolder, revision)
    if p.is_dir():
        return load_safetensors_checkpoint(p)
    sd = _torch_load_reference(p)
    return split_reference_state_dict(sd, source=str(p), copy=False)


def save_checkpoint(ckpt: LoadedCheckpoint | tuple, folder, *, dtype: torch.dtype | None = None) -> pathlib.Path:
    """Write the pickle-free format: ``d2l_config.json`` + ``hypernet.safetensors`` (atomic per file).

    ``dtype``: store the tensors in this floating dtype (e.g. ``torch.float16`` halves the file); ``None`` keeps
    theirs. :func:`load_checkpoint` up-casts 16-bit tensors back to float32.
    """
    from safetensors.torch import save_file

    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be None or a floating torch.dtype such as torch.float16, got {dtype!r}")
    if isinstance(ckpt, tuple):
        ckpt = LoadedCheckpoint(spec=ckpt[0], state_dict=ckpt[1])
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype=dtype or v.dtype).contiguous() for k, v in ckpt.state_dict.items()}
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "d2l_fast", "version": str(FORMAT_VERSION)})
    os.replace(tmp, folder / WEIGHTS_NAME)
    cfg = {"format_version": FORMAT_VERSION, "spec": ckpt.spec.to_dict()}
    tmp = folder / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(cfg, indent=1, sort_keys=True))
    os.replace(tmp, folder / CONFIG_NAME)
    return folder


def _upcast(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def load_safetensors_checkpoint(folder) -> LoadedCheckpoint:
    from safetensors import SafetensorError, safe_open

    folder = pathlib.Path(folder)
    cfg_path = folder / CONFIG_NAME
    cfg = read_json(cfg_path, MAX_CONFIG_BYTES, what="config", error=CheckpointError)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format_version {cfg.get('format_version')!r:.80}, "
                              f"expected {FORMAT_VERSION}")
    if not isinstance(cfg.get("spec"), dict):
        raise CheckpointError(f"{cfg_path}: field 'spec' must be a JSON object, got {type(cfg.get('spec')).__name__}")
    try:
        spec = D2LSpec.from_dict(cfg["spec"])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"{cfg_path}: invalid field in 'spec': {e}") from None
    wpath = folder / WEIGHTS_NAME
    check_regular_file(wpath, what="weights file", error=CheckpointError)
    expected = _expected_shapes(spec)
    try:
        with safe_open(str(wpath), framework="pt", device="cpu") as f:
            keys = set(f.keys())
            missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
            if missing or unexpected:
                raise CheckpointError(f"{wpath}: tensors do not match the hypernetwork {CONFIG_NAME} describes: "
                                      f"missing {missing[:5]}, unexpected {unexpected[:5]}")
            for k in keys:  # shapes are checked before any tensor is read
                shape = tuple(f.get_slice(k).get_shape())
                if shape != expected[k]:
                    raise CheckpointError(f"{wpath}: tensor {k!r} has shape {shape}, {CONFIG_NAME} implies "
                                          f"{expected[k]}")
            # 16-bit files (save_checkpoint(..., dtype=torch.float16)) are up-cast: exact, and LoadedCheckpoint
            # holds float32 tensors whatever the file stores
            tensors = {k: _upcast(f.get_tensor(k)) for k in keys}
    except (OSError, SafetensorError, ValueError, RuntimeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{wpath}: unreadable weights (truncated or corrupt?): {e}") from e
    return LoadedCheckpoint(spec=spec, state_dict=tensors, source=str(folder)).validate()


# Where the reference's own classes live: ``save_reference_checkpoint`` pickles d2l_fast's config objects under
# these names, so the file carries exactly the globals of a checkpoint the reference writes (spec §3.2).
_REFERENCE_WRITE_NAMES = {
    HypernetConfig: ("ctx_to_lora.modeling.hypernet", "HypernetConfig"),
    AggregatorConfig: ("ctx_to_lora.modeling.aggregator", "AggregatorConfig"),
    CtxEncoderArguments: ("ctx_to_lora.configs", "CtxEncoderArguments"),
    LoraConfig: ("peft.tuners.lora.config", "LoraConfig"),
    LoraRuntimeConfig: ("peft.tuners.lora.config", "LoraRuntimeConfig"),
    PeftType: ("peft.utils.peft_types", "PeftType"),
    TaskType: ("peft.utils.peft_types", "TaskType"),
}

# peft 0.15.2's LoraConfig fields, in its order, with the values a default ``get_lora_config`` leaves (the state a
# reference checkpoint pickles); r / lora_alpha / lora_dropout / target_modules / base model come from the spec.
_PEFT_LORA_FIELDS = (
    ("task_type", "CAUSAL_LM"), ("peft_type", PeftType.LORA), ("auto_mapping", None),
    ("base_model_name_or_path", None), ("revision", None), ("inference_mode", False), ("r", 8),
    ("target_modules", None), ("exclude_modules", None), ("lora_alpha", 8), ("lora_dropout", 0.0),
    ("fan_in_fan_out", False), ("bias", "none"), ("use_rslora", False), ("modules_to_save", None),
    ("init_lora_weights", True), ("layers_to_transform", None), ("layers_pattern", None), ("rank_pattern", {}),
    ("alpha_pattern", {}), ("megatron_config", None), ("megatron_core", "megatron.core"),
    ("trainable_token_indices", None), ("loftq_config", {}), ("eva_config", None), ("corda_config", None),
    ("use_dora", False), ("layer_replication", None), ("runtime_config", None), ("lora_bias", False),
    ("_custom_modules", None),
)


class _ReferencePickler(pickle._Pickler):
    """Pure-Python pickler that writes d2l_fast's config classes as the reference's dotted names."""

    def save_global(self, obj, name=None):
        target = _REFERENCE_WRITE_NAMES.get(obj) if isinstance(obj, type) else None
        if target is None:
            return super().save_global(obj, name)
        module, qualname = target
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode("ascii"))
        self.memoize(obj)


def _reference_pickle_module():
    import types

    mod = types.ModuleType("d2l_fast_reference_pickle")
    mod.Pickler = _ReferencePickler
    mod.Unpickler = pickle.Unpickler
    mod.load = pickle.load
    mod.dump = pickle.dump
    return mod


def _full_reference_configs(ckpt: LoadedCheckpoint):
    """``(hypernet_config, ctx_encoder_args)`` with the reference's complete field set: the objects a reference file
    was loaded with, else rebuilt from the spec with peft's LoraConfig fields and ``layer_indices`` as a tensor."""
    if ckpt.hypernet_config is not None and ckpt.ctx_encoder_args is not None:
        return ckpt.hypernet_config, ckpt.ctx_encoder_args
    hc, ce = spec_to_reference(ckpt.spec)
    short = vars(hc.lora_config)
    lc = LoraConfig.__new__(LoraConfig)
    state = {k: (dict(v) if isinstance(v, dict) else v) for k, v in _PEFT_LORA_FIELDS}
    state.update({k: short[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules",
                                        "base_model_name_or_path")})
    state["runtime_config"] = LoraRuntimeConfig(ephemeral_gpu_offload=False)
    lc.__setstate__(state)
    hc.lora_config = lc
    hc.layer_indices = torch.tensor(list(hc.layer_indices), dtype=torch.long)
    return hc, ce


def reference_configs_or_raise(ckpt: LoadedCheckpoint):
    """The reference config objects for ``ckpt``; :class:`CheckpointError` if they cannot describe its spec (the
    reference's configs do not store e.g. the perceiver's attention heads, which its code fixes at 16 × 128 with 4
    KV heads: a hypernetwork with other heads has no reference-layout equivalent; nor has a copy head)."""
    try:
        hc, ce = _full_reference_configs(ckpt)
    except ValueError as e:  # spec_to_reference: a spec the layout cannot hold at all (a copy head)
        raise CheckpointError(str(e)) from None
    back = spec_from_reference(ckpt.spec.base_model_name_or_path, hc, ce)
    if back != ckpt.spec:
        a, b = ckpt.spec.to_dict(), back.to_dict()
        diff = {k: a[k] for k in a if a[k] != b.get(k)}
        raise CheckpointError(f"the reference's pytorch_model.bin layout cannot describe this hypernetwork: {diff} "
                              f"would be read back as {({k: b.get(k) for k in diff})} (the reference fixes them); "
                              "save it with save_checkpoint (pickle-free) instead")
    return hc, ce


def _reference_metadata(spec: D2LSpec) -> dict:
    """The ``_metadata`` a reference ``HyperLoRA.state_dict()`` carries (module prefix → version), in its order:
    d2l_fast's module tree plus the reference's parameter-free ``act_fn`` modules of every gated MLP."""
    with torch.device("meta"):
        from .hypernet import HyperLoRA

        meta = HyperLoRA(spec).state_dict()._metadata
    out = {}
    keys = list(meta)
    for i, k in enumerate(keys):
        out[k] = dict(meta[k])
        nxt = keys[i + 1] if i + 1 < len(keys) else ""
        for owner in [p for p in (k, k.rsplit(".", 1)[0]) if p.endswith(("mlp", "modality_projection"))]:
            if k.startswith(owner + ".") and not nxt.startswith(owner + ".") and owner + ".act_fn" not in out:
                out[owner + ".act_fn"] = {"version": 1}
    for k in [k for k in out if k == "head" or k.startswith("head.")]:  # registered last by the reference
        out[k] = out.pop(k)
    return out


def save_reference_checkpoint(ckpt: LoadedCheckpoint, path) -> pathlib.Path:
    """Write a ``pytorch_model.bin`` in the reference's layout, readable by the reference's own loader.

    The file is what ``torch.save(ModulatedPretrainedModel.state_dict())`` writes (spec §3.1–3.2): a zip archive
    rooted at ``<file stem>/``, pickle protocol 2, an ``OrderedDict`` (with ``_metadata``) of the fp32 tensors in the
    reference's key order, then ``base_model_name_or_path``, ``hypernet_config`` and ``ctx_encoder_args``, the configs
    pickled as ``ctx_to_lora.*`` / ``peft.*`` classes (NEWOBJ + BUILD) — no ``d2l_fast`` global, and neither
    ``ctx_to_lora`` nor ``peft`` is imported. The write is atomic: a temporary file in the same folder, then
    ``os.replace``; a failure leaves any previous file at ``path`` untouched.
    """
    import collections
    import tempfile

    path = pathlib.Path(path)
    if not isinstance(ckpt, LoadedCheckpoint):
        raise TypeError(f"ckpt must be a LoadedCheckpoint, got {type(ckpt).__name__}")
    ckpt.validate()
    hc, ce = reference_configs_or_raise(ckpt)
    keys = [k for k in ckpt.state_dict if not k.startswith("head.")] + \
        [k for k in ckpt.state_dict if k.startswith("head.")]  # the reference registers the head last
    sd = collections.OrderedDict((k, ckpt.state_dict[k].detach().to("cpu", torch.float32).contiguous()) for k in keys)
    sd._metadata = _reference_metadata(ckpt.spec)
    sd["base_model_name_or_path"] = ckpt.spec.base_model_name_or_path
    sd["hypernet_config"] = hc
    sd["ctx_encoder_args"] = ce
    path.parent.mkdir(parents=True, exist_ok=True)
    # the archive's root folder is named after the file, so the temporary file keeps the final name in its own folder
    tmp_dir = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        tmp = tmp_dir / path.name
        torch.save(sd, tmp, pickle_module=_reference_pickle_module(), pickle_protocol=2)
        os.replace(tmp, path)
    finally:
        for f in tmp_dir.iterdir():
            f.unlink()
        tmp_dir.rmdir()
    return path


__all__ = [
    "CheckpointError",
    "LoadedCheckpoint",
    "check_tensors",
    "load_checkpoint",
    "load_safetensors_checkpoint",
    "save_checkpoint",
    "reference_configs_or_raise",
    "save_reference_checkpoint",
    "split_reference_state_dict",
]
