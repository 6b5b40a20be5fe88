"""Bad files are refused cheaply: small (<= 4 MB) crafted checkpoints, pickle-free folders and adapter files must
raise CheckpointError naming the file and the field, before any large allocation."""

import contextlib
import copy
import json
import struct
import zipfile

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from d2l_fast import AdapterBatch, CheckpointError, D2LModel, load_checkpoint, save_checkpoint
from d2l_fast.reference_format import HypernetConfig, spec_to_reference

BIG = 1 << 26  # bytes: no tensor this large may be created while a bad file is being refused


class _NoBigTensors(TorchDispatchMode):
    """Fails on any torch op whose (non-meta) output sits on a storage of more than BIG bytes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().nbytes() > BIG:
                raise AssertionError(f"{func} allocated {t.untyped_storage().nbytes()} bytes")
        return out


@contextlib.contextmanager
def refused(match):
    with _NoBigTensors(), pytest.raises(CheckpointError, match=match) as info:
        yield info
    msg = str(info.value)
    assert "weights_only" not in msg  # not torch's advice to retry unsafely


# ------------------------------------------------------------------ helpers writing reference-layout files
_REF_NAMES = {
    b"HypernetConfig": b"ctx_to_lora.modeling.hypernet",
    b"AggregatorConfig": b"ctx_to_lora.modeling.aggregator",
    b"CtxEncoderArguments": b"ctx_to_lora.configs",
    b"LoraConfig": b"peft.tuners.lora.config",
    b"LoraRuntimeConfig": b"peft.tuners.lora.config",
    b"PeftType": b"peft.utils.peft_types",
    b"TaskType": b"peft.utils.peft_types",
}


OWN_MODULE = b"d2l_fast.reference_format"  # where d2l_fast's stand-ins for the reference's config classes live


def _rewrite_zip(path, fn=lambda name, data: data, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path) as z:
        entries = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in entries:
            z.writestr(name, fn(name, data))


def _as_reference_pickle(name, data):
    """Rename d2l_fast's config classes to the reference's dotted names, as the released files pickle them."""
    if name.endswith("data.pkl"):
        for cls, mod in _REF_NAMES.items():
            data = data.replace(b"c" + OWN_MODULE + b"\n" + cls + b"\n", b"c" + mod + b"\n" + cls + b"\n")
    return data


@pytest.fixture(scope="module")
def ref_sd(golden_dir):
    return load_checkpoint(golden_dir / "pytorch_model.bin").to_reference_state_dict()


def write_ref(path, sd):
    torch.save(sd, path)
    _rewrite_zip(path, _as_reference_pickle)
    assert path.stat().st_size <= 4 << 20
    return path


def mutated(sd, where, field, value):
    sd = dict(sd)
    hc = copy.deepcopy(sd["hypernet_config"])
    obj = {"hc": hc, "ac": hc.aggregator_config, "lc": hc.lora_config}[where]
    setattr(obj, field, value)
    sd["hypernet_config"] = hc
    return sd


def test_reference_names_roundtrip(ref_sd, tmp_path):
    """The helper writes what the released files hold (and it loads): the tests below change one thing each."""
    ck = load_checkpoint(write_ref(tmp_path / "ok.bin", ref_sd))
    assert b"ctx_to_lora.modeling.hypernet" in zipfile.ZipFile(tmp_path / "ok.bin").read("ok/data.pkl")
    assert ck.spec.latent_size == 32


@pytest.mark.parametrize("where,field,value,match", [
    ("hc", "latent_size", 2**18, "latent_size"),
    ("ac", "num_blocks", 20000, "num_blocks"),
    ("ac", "num_blocks", -5, "num_blocks"),
    ("lc", "r", 0, "r"),
    ("hc", "latent_size", "abc", "latent_size must be an integer"),
    ("hc", "latent_size", 64, "latent_q|shape"),  # in bounds, but the file's tensors are [.., 32]
    ("ac", "n_latent_queries", 2**13, "shape"),
    ("ac", "num_layers", 0, "num_layers"),
    ("lc", "lora_alpha", float("nan"), "lora_alpha"),
    ("lc", "target_modules", 5, "target_modules"),
    ("hc", "feature_sizes", "x", "feature_sizes"),
    ("hc", "feature_sizes", ({"up_proj": 3}, {"down_proj": 64}), "feature_sizes"),
    ("hc", "layer_indices", [0, 1, 1, 3], "distinct"),
    ("hc", "layer_indices", [0, 1, 2, -3], "layer_indices"),
    ("hc", "aggregator_config", None, "aggregator_config"),
    ("ac", "shared_weights", "yes", "shared_weights"),
])
def test_bad_config_refused_before_allocation(ref_sd, tmp_path, where, field, value, match):
    path = write_ref(tmp_path / "pytorch_model.bin", mutated(ref_sd, where, field, value))
    with refused(match) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_bad_top_level_objects(ref_sd, tmp_path):
    cases = {
        "list.bin": [1, 2, 3],
        "hc_int.bin": {**ref_sd, "hypernet_config": 5},
        "tensor_entry.bin": {**ref_sd, "bias_A.down_proj": "not a tensor"},
        "int_key.bin": {**ref_sd, 7: torch.zeros(1)},
        "missing.bin": {k: v for k, v in ref_sd.items() if k != "ctx_encoder_args"},
        "extra.bin": {**ref_sd, "head.extra": torch.zeros(2)},
        "int_weight.bin": {**ref_sd, "head.weight": torch.zeros(4, 32, 320, dtype=torch.int32)},
    }
    for name, obj in cases.items():
        path = write_ref(tmp_path / name, obj)
        with refused(r".") as info:
            load_checkpoint(path)
        assert str(path) in str(info.value), name


def test_zero_stride_tensors_refused(ref_sd, tmp_path):
    huge = torch.zeros(1).as_strided((10**6, 10**6), (0, 0))  # 4 bytes of storage, 4 TB logically
    path = write_ref(tmp_path / "zs.bin", {**ref_sd, "head.weight": huge})
    with refused("zero-stride|zero stride"):
        load_checkpoint(path)
    with refused("zero-stride|zero stride"):
        save_checkpoint(load_checkpoint(path), tmp_path / "out")  # `d2l-fast convert` never gets to write
    li = torch.zeros(1, dtype=torch.long).as_strided((3 * 10**8,), (0,))
    path = write_ref(tmp_path / "li.bin", mutated(ref_sd, "hc", "layer_indices", li))
    with refused("hypernet_config.layer_indices"):
        load_checkpoint(path)
    overlap = torch.arange(8.0).as_strided((4, 4), (1, 1))  # 16 elements over a storage of 8
    path = write_ref(tmp_path / "ov.bin", {**ref_sd, "aggregator.perceiver.encoder.latents_q": overlap})
    with refused("claims"):
        load_checkpoint(path)


def test_compressed_zip_refused(ref_sd, tmp_path):
    path = write_ref(tmp_path / "pytorch_model.bin", ref_sd)
    _rewrite_zip(path, compression=zipfile.ZIP_DEFLATED)
    with refused("compressed"):
        load_checkpoint(path)


def test_flipped_tensor_bytes_fail_the_crc(ref_sd, tmp_path):
    path = write_ref(tmp_path / "pytorch_model.bin", ref_sd)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the largest tensor
    n, m = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    raw[info.header_offset + 30 + n + m + info.file_size // 2] ^= 0x40
    path.write_bytes(bytes(raw))
    with refused("CRC|corrupt"):
        load_checkpoint(path)


def test_foreign_global_message_is_short(ref_sd, tmp_path):
    path = tmp_path / "x.bin"
    torch.save({**ref_sd, "evil": zipfile.ZipInfo("a")}, path)
    with refused("zipfile.ZipInfo") as info:
        load_checkpoint(path)
    assert "allowlist" in str(info.value)


# ------------------------------------------------------------------ the pickle-free folder
@pytest.fixture
def folder(golden_dir, tmp_path):
    return save_checkpoint(load_checkpoint(golden_dir / "pytorch_model.bin"), tmp_path / "st")


def _edit_config(folder, fn):
    p = folder / "d2l_config.json"
    cfg = json.loads(p.read_text())
    fn(cfg)
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize("field,value,match", [
    ("n_kv_heads", 0, "n_kv_heads"),
    ("n_heads", 15, "n_heads"),
    ("latent_size", 2**18, "latent_size"),
    ("latent_size", "abc", "latent_size"),
    ("num_blocks", 20000, "num_blocks"),
    ("lora_r", 0, "lora_r"),
    ("lora_r", 16, "shape"),
    ("d_in", {"down_proj": "x"}, "d_in"),
    ("d_in", {}, "d_in"),
    ("layer_indices", 7, "layer_indices"),
    ("rms_norm_eps", -1.0, "rms_norm_eps"),
    ("dropout_rate", 2.0, "dropout_rate"),
    ("use_bias", "no", "use_bias"),
    ("head_dim", 10**9, "head_dim"),
])
def test_bad_folder_config_refused(folder, field, value, match):
    _edit_config(folder, lambda c: c["spec"].__setitem__(field, value))
    with refused(match) as info:
        load_checkpoint(folder)
    assert "d2l_config.json" in str(info.value)


def test_bad_folder_config_structure(folder):
    p = folder / "d2l_config.json"
    for text, match in [("[1, 2]", "JSON object"), ('{"format_version": 1}', "spec"),
                        ('{"format_version": 1, "spec": {"latent_size": 3}}', "missing"),
                        ('{"format_version": 1, "spec": {"bogus": 3}}', "unknown"),
                        ("[" * 100000 + "]" * 100000, "nested|unreadable"), ("{", "unreadable")]:
        p.write_text(text)
        with refused(match):
            load_checkpoint(folder)


# ------------------------------------------------------------------ adapter files
def _adapters(L=4, ranks=(16, 16, 16), d_in=256, d_out=64):
    ro = [0]
    for r in ranks:
        ro.append(ro[-1] + r)
    return AdapterBatch({"down_proj": torch.randn(L, ro[-1], d_in)}, {"down_proj": torch.randn(L, ro[-1], d_out)},
                        ro, 2.0, "m@1")


def _write_adapter(path, tensors, **meta):
    base = {"format": "d2l_fast.adapters", "version": "1", "rank_offsets": "[0, 16, 32, 48]", "alpha": "2.0",
            "model_id": "m@1", "names": "null"}
    base.update({k: v for k, v in meta.items() if v is not None})
    for k in [k for k, v in meta.items() if v is None]:
        base.pop(k)
    save_file(tensors, str(path), metadata=base)
    return path


@pytest.mark.parametrize("tensors,meta,match", [
    (None, {"rank_offsets": "[0, 15.9, 32.2, 48]"}, "rank_offsets.*integers"),
    (None, {"rank_offsets": "[0, 16.0, 32, 48]"}, "rank_offsets.*integers"),
    (None, {"rank_offsets": "[0, 32, 16, 48]"}, "non-decreasing"),
    (None, {"rank_offsets": "[1, 16, 32, 48]"}, "start at 0"),
    (None, {"rank_offsets": "[0, true, 32, 48]"}, "integers"),
    (None, {"rank_offsets": '"abc"'}, "rank_offsets"),
    (None, {"rank_offsets": "[0, 16,"}, "not valid JSON"),
    (None, {"rank_offsets": None}, "lacks field 'rank_offsets'"),
    (None, {"rank_offsets": "[0, 16, 32, 40]"}, "rank"),
    (None, {"alpha": "nan"}, "alpha.*finite"),
    (None, {"alpha": "inf"}, "alpha.*finite"),
    (None, {"alpha": "two"}, "alpha.*number"),
    (None, {"names": '["a"]'}, "names"),
    (None, {"format": "other"}, "not a d2l_fast adapter file"),
    ({"down_proj.A": torch.zeros(4, 48, 256, dtype=torch.int32), "down_proj.B": torch.zeros(4, 48, 64)}, {}, "float"),
    ({"down_proj.A": torch.zeros(4, 48, 256)}, {}, "both"),
    ({"down_proj.A": torch.zeros(4, 48, 256), "down_proj.B": torch.zeros(3, 48, 64)}, {}, "layers, rank"),
    ({"down_proj.A": torch.zeros(48, 256), "down_proj.B": torch.zeros(48, 64)}, {}, "expected \\[layers"),
    ({"down_proj.A": torch.zeros(4, 48, 256), "down_proj.B": torch.zeros(4, 48, 64), "x": torch.zeros(1)}, {},
     "unexpected tensor"),
])
def test_bad_adapter_files(tmp_path, tensors, meta, match):
    ok = {"down_proj.A": torch.zeros(4, 48, 256), "down_proj.B": torch.zeros(4, 48, 64)}
    path = _write_adapter(tmp_path / "ad.safetensors", ok if tensors is None else tensors, **meta)
    with refused(match) as info:
        AdapterBatch.load(path)
    assert str(path) in str(info.value)


def test_truncated_adapter_file(tmp_path):
    path = tmp_path / "ad.safetensors"
    _adapters().save(path)
    assert AdapterBatch.load(path).rank_offsets == [0, 16, 32, 48]
    path.write_bytes(path.read_bytes()[:200])
    with refused("unreadable adapter file"):
        AdapterBatch.load(path)


def test_adapter_shapes_checked_at_load_and_bind(golden_dir, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        (base / f).symlink_to(golden_dir / "tiny-gemma2" / f)
    model = D2LModel.from_checkpoint(golden_dir / "pytorch_model.bin", base_model=base)
    good = model.internalize([[2, 40, 41, 42]])
    path = tmp_path / "good.safetensors"
    good.save(path)
    assert AdapterBatch.load(path, spec=model.spec).rank_offsets == good.rank_offsets
    wrong = _adapters(ranks=(16,), d_in=128)  # down_proj of another model: 128 -> 64
    wrong.model_id = model.model_id
    wrong.save(path)
    with refused("feature sizes 128/64.*256 -> 64"):
        AdapterBatch.load(path, spec=model.spec)
    ids = torch.tensor([[2, 40, 41]])
    with pytest.raises(ValueError, match="feature sizes 128/64"):
        model.generate(ids, adapters=AdapterBatch.load(path), max_new_tokens=1)


def test_hypernet_config_class_is_plain():
    # guards the helper above: the classes d2l_fast pickles are the ones it renames
    assert HypernetConfig.__module__ == OWN_MODULE.decode()


def test_reference_layout_written_before_the_config_classes_moved(golden_dir, tmp_path):
    # files d2l_fast wrote in the reference layout while its stand-in classes lived in d2l_fast.config still load
    ck = load_checkpoint(golden_dir / "pytorch_model.bin")
    # torch.save of a reference-style dict pickles d2l_fast's own stand-in classes (save_reference_checkpoint
    # writes the reference's ctx_to_lora.* names instead)
    ref = ck.to_reference_state_dict()
    ref["hypernet_config"], ref["ctx_encoder_args"] = spec_to_reference(ck.spec)
    path = tmp_path / "pytorch_model.bin"
    torch.save(ref, path)

    def old_names(name, data):
        if not name.endswith("data.pkl"):
            return data
        assert b"c" + OWN_MODULE + b"\nHypernetConfig\n" in data
        return data.replace(b"c" + OWN_MODULE + b"\n", b"cd2l_fast.config\n")

    _rewrite_zip(path, old_names)
    assert b"d2l_fast.config\nHypernetConfig" in zipfile.ZipFile(path).read("pytorch_model/data.pkl")
    again = load_checkpoint(path)
    assert again.spec == ck.spec
    assert all(torch.equal(again.state_dict[k], v) for k, v in ck.state_dict.items())
