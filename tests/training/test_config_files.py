"""JSON settings files (``TrainConfig.from_file`` and ``d2l-fast train --config``) are read through safe_io:
missing files, special files, oversized files and non-objects are refused by name, before anything runs."""

from __future__ import annotations

import json
import os

import pytest

from d2l_fast.cli import main
from d2l_fast.training.config import MAX_CONFIG_BYTES, TrainConfig, TrainConfigError


@pytest.mark.parametrize("make, match", [
    (lambda p: None, "config file not found"),
    (lambda p: p.mkdir(), "not a regular file"),
    (lambda p: os.mkfifo(p), "not a regular file"),
    (lambda p: p.write_text(" " * (MAX_CONFIG_BYTES + 1)), "bytes"),
    (lambda p: p.write_text("[1, 2]"), "expected a JSON object of settings, got list"),
    (lambda p: p.write_text("{"), "unreadable JSON config"),
    (lambda p: p.write_bytes(b'{"seed": "\xff"}'), "not utf-8 text"),
    (lambda p: p.write_text("[" * 100_000 + "]" * 100_000), "nested too deeply"),
])
def test_bad_config_files_are_refused_by_name(tmp_path, capsys, make, match):
    path = tmp_path / "cfg.json"
    make(path)
    with pytest.raises(TrainConfigError, match=match) as e:
        TrainConfig.from_file(path)
    assert str(path) in str(e.value)
    assert main(["train", "--config", str(path), "--output-dir", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert str(path) in err
    assert not (tmp_path / "out").exists()


def test_huge_integer_is_refused_by_field(tmp_path):
    path = tmp_path / "cfg.json"
    settings = json.dumps({"data": ["x"], "model_name_or_path": "m", "output_dir": "o"})
    path.write_text(settings[:-1] + ', "seed": ' + "9" * 5000 + "}")
    with pytest.raises(TrainConfigError, match="seed"):
        TrainConfig.from_file(path)
