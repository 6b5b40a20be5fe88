"""Issue 19: crafted files (each <= 4 MB, written to a temporary folder) and special files are refused with a
CheckpointError naming the file (and the field), without allocating more than 256 MB or taking more than 10 s
while refusing (see ``_guard``). Classes: 1 special files, 2 pickle bombs, 3 tensor kinds and config values."""

from __future__ import annotations

import json
import os
import struct
import zipfile

import pytest
import torch

from d2l_fast import AdapterBatch, CheckpointError, D2LModel, load_checkpoint, save_checkpoint
from d2l_fast.cli import main as cli_main

from ..test_checkpoint_safety import write_ref
from ._guard import run_guarded

MAX_FILE = 4 << 20


def refused(fn, *args, match: str = "", **kwargs):
    out = run_guarded(fn, *args, **kwargs)
    assert out.is_a(CheckpointError), f"expected a CheckpointError, got {out.raised and out.raised[0]}: " \
                                      f"{out.message[:500]}"
    assert match in out.message, out.message
    return out


@pytest.fixture(scope="module")
def golden_ckpt(golden_dir):
    return load_checkpoint(golden_dir / "pytorch_model.bin")


@pytest.fixture
def folder(golden_ckpt, tmp_path):
    """A valid pickle-free checkpoint folder."""
    return save_checkpoint(golden_ckpt, tmp_path / "ckpt", dtype=torch.float16)


# ------------------------------------------------------------------ 1: special files
@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_device_as_checkpoint(device):
    refused(load_checkpoint, device, match=f"{device}: the checkpoint is a character device")


def test_device_from_checkpoint():
    refused(D2LModel.from_checkpoint, "/dev/zero", match="/dev/zero")


def test_device_cli_info(capsys):
    out = run_guarded(cli_main, ["info", "/dev/zero"])
    assert out.raised is None and out.returned not in (0, None), (out.raised, out.message)


def test_symlink_to_device_as_checkpoint(tmp_path):
    link = tmp_path / "pytorch_model.bin"
    link.symlink_to("/dev/zero")
    refused(load_checkpoint, str(tmp_path), match="character device")


def test_config_symlink_to_device(folder):
    cfg = folder / "d2l_config.json"
    cfg.unlink()
    cfg.symlink_to("/dev/zero")
    refused(load_checkpoint, str(folder), match=f"{cfg}: the config is a character device")


def test_config_fifo(folder):
    cfg = folder / "d2l_config.json"
    cfg.unlink()
    os.mkfifo(cfg)
    refused(load_checkpoint, str(folder), match="FIFO")


def test_weights_fifo(folder):
    w = folder / "hypernet.safetensors"
    w.unlink()
    os.mkfifo(w)
    refused(load_checkpoint, str(folder), match=f"{w}: the weights file is a FIFO")


def test_checkpoint_fifo(tmp_path):
    p = tmp_path / "pytorch_model.bin"
    os.mkfifo(p)
    refused(load_checkpoint, str(p), match="FIFO")


def test_adapter_fifo_and_device(tmp_path):
    p = tmp_path / "a.safetensors"
    os.mkfifo(p)
    refused(AdapterBatch.load, str(p), match="the adapter file is a FIFO")
    refused(AdapterBatch.load, "/dev/zero", match="the adapter file is a character device")


# ------------------------------------------------------------------ 2: pickle bombs
def _bomb(tmp_path, body: bytes, name="bomb"):
    """A torch zip checkpoint whose data.pkl is ``body`` (and one 4-byte float storage ``data/0``)."""
    path = tmp_path / f"{name}.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{name}/data.pkl", body)
        z.writestr(f"{name}/byteorder", "little")
        z.writestr(f"{name}/data/0", struct.pack("<f", 1.0))
        z.writestr(f"{name}/version", "3\n")
    assert path.stat().st_size <= MAX_FILE
    return path


def _list_of(item: bytes, n: int) -> bytes:
    return b"\x80\x04](" + item * n + b"e."  # PROTO 4, EMPTY_LIST, MARK, n items, APPENDS, STOP


@pytest.mark.parametrize("opcode", [b"\x8f", b"}"], ids=["EMPTY_SET", "EMPTY_DICT"])
def test_pickle_bomb_empty_containers(tmp_path, opcode):
    path = _bomb(tmp_path, _list_of(opcode, (MAX_FILE - 4096) // len(opcode)))
    refused(load_checkpoint, str(path), match="opcodes")


def test_pickle_bomb_memoized_reduce(tmp_path):
    """One _rebuild_tensor_v2 call built once and memoized, then REDUCEd again and again (5 bytes each)."""
    storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ"
    args = b"(" + storage + b"K\x00K\x01\x85K\x01\x85\x89ccollections\nOrderedDict\n)Rt"
    first = b"ctorch._utils\n_rebuild_tensor_v2\nq\x00" + args + b"q\x01R"
    again = b"h\x00h\x01R"
    n = (MAX_FILE - 4096) // len(again)
    path = _bomb(tmp_path, b"\x80\x02](" + first + again * n + b"e.")
    refused(load_checkpoint, str(path), match="opcodes")


def test_small_pickle_of_many_tensors_still_loads(tmp_path):
    """The scan's limit is far above what a real checkpoint holds: the same construction, 1,000 times, loads."""
    storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x01tQ"
    args = b"(" + storage + b"K\x00K\x01\x85K\x01\x85\x89ccollections\nOrderedDict\n)Rt"
    path = _bomb(tmp_path, b"\x80\x02](ctorch._utils\n_rebuild_tensor_v2\nq\x00" + args + b"q\x01R"
                 + b"h\x00h\x01R" * 1000 + b"e.")
    # not a Doc-to-LoRA state dict, so refused — but after unpickling, by the top-level check
    refused(load_checkpoint, str(path), match="expected a dict state_dict")


# ------------------------------------------------------------------ 3: tensor kinds and config values
def _with_tensor(golden_ckpt, tmp_path, name, make):
    sd = golden_ckpt.to_reference_state_dict()
    key = next(k for k in sd if isinstance(sd[k], torch.Tensor) and sd[k].dim() == 2)
    sd[key] = make(sd[key])
    return write_ref(tmp_path / f"{name}.bin", sd), key


@pytest.mark.parametrize("kind,make", [
    ("sparse_coo", lambda t: t.to_sparse()),
    ("meta", lambda t: torch.empty(t.shape, device="meta")),
    ("nested", lambda t: torch.nested.nested_tensor([t[0], t[1, :1]])),
])
def test_unsupported_tensor_kinds(golden_ckpt, tmp_path, kind, make):
    path, key = _with_tensor(golden_ckpt, tmp_path, kind, make)
    out = refused(load_checkpoint, str(path), match=str(path))
    assert key in out.message and kind in out.message, out.message


@pytest.mark.parametrize("module", ["forward", "__class__", "keys"])
def test_target_module_colliding_with_module_attributes(folder, module):
    cfg_path = folder / "d2l_config.json"
    cfg = json.loads(cfg_path.read_text())
    old = cfg["spec"]["target_modules"][0]
    cfg["spec"]["target_modules"] = [module]
    for side in ("d_in", "d_out"):
        cfg["spec"][side] = {module: cfg["spec"][side][old]}
    cfg_path.write_text(json.dumps(cfg))
    out = refused(load_checkpoint, str(folder), match=str(cfg_path))
    assert "target_modules" in out.message and module in out.message, out.message


def test_huge_integer_in_config(folder):
    cfg_path = folder / "d2l_config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"latent_size": 32', '"latent_size": ' + "7" * 5000))
    out = refused(load_checkpoint, str(folder), match=str(cfg_path))
    assert "latent_size" in out.message and "5000 digits" in out.message, out.message
