"""The command line on user errors: one ``error:`` line, exit status 1, no traceback, files checked first."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from d2l_fast import AdapterBatch
from d2l_fast.cli import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def doc(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text("The fox lived under the old mill.", encoding="utf-8")
    return p


def run_main(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, *fragments):
    assert rc == 1, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith("d2l-fast ") and ": error: " in line, err
    for f in fragments:
        assert f in line, line


# the checkpoint and base model below do not exist: an error about them would mean they were loaded first
NO_CKPT = "/nonexistent/d2l/pytorch_model.bin"
NO_BASE = "/nonexistent/d2l/base-model"


def test_missing_document_checked_before_loading(tmp_path, capsys):
    rc, _, err = run_main(["internalize", NO_CKPT, tmp_path / "missing.txt", "-o", tmp_path / "a.safetensors",
                           "--base-model", NO_BASE], capsys)
    assert_user_error(rc, err, "missing.txt", "not found")


def test_document_is_a_folder(tmp_path, capsys):
    rc, _, err = run_main(["internalize", NO_CKPT, tmp_path, "-o", tmp_path / "a.safetensors"], capsys)
    assert_user_error(rc, err, "is not a file")


def test_bad_utf8_document(tmp_path, doc, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    rc, _, err = run_main(["internalize", NO_CKPT, doc, bad, "-o", tmp_path / "a.safetensors",
                           "--base-model", NO_BASE], capsys)
    assert_user_error(rc, err, "latin1.txt", "not UTF-8", "0xe9")


def test_blank_document(tmp_path, doc, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n")
    rc, _, err = run_main(["internalize", NO_CKPT, doc, blank, "-o", tmp_path / "a.safetensors"], capsys)
    assert_user_error(rc, err, "blank.txt", "empty")


def test_missing_output_folder_checked_before_loading(tmp_path, doc, capsys):
    out = tmp_path / "no" / "such" / "folder" / "a.safetensors"
    rc, _, err = run_main(["internalize", NO_CKPT, doc, "-o", out, "--base-model", NO_BASE], capsys)
    assert_user_error(rc, err, "output folder", "does not exist")
    assert not out.parent.exists()


def test_output_is_a_folder(tmp_path, doc, capsys):
    rc, _, err = run_main(["internalize", NO_CKPT, doc, "-o", tmp_path], capsys)
    assert_user_error(rc, err, "is a folder")


def test_missing_checkpoint(tmp_path, doc, capsys):
    rc, _, err = run_main(["info", NO_CKPT], capsys)
    assert_user_error(rc, err, "not found")
    rc, _, err = run_main(["internalize", NO_CKPT, doc, "-o", tmp_path / "a.safetensors"], capsys)
    assert_user_error(rc, err, "not found")


def test_convert_missing_output_folder(golden_dir, tmp_path, capsys):
    out = tmp_path / "no" / "such" / "st"
    rc, _, err = run_main(["convert", golden_dir / "pytorch_model.bin", out], capsys)
    assert_user_error(rc, err, "does not exist")
    assert not out.parent.exists()


def test_bad_numbers_are_usage_errors(tmp_path, doc, capsys):
    with pytest.raises(SystemExit) as e:
        main(["internalize", NO_CKPT, str(doc), "--docs-per-call", "0"])
    assert e.value.code == 2 and "positive integer" in capsys.readouterr().err


def test_relative_base_model_path_that_is_not_a_folder(golden_dir, tmp_path, doc, capsys):
    rc, _, err = run_main(["internalize", golden_dir / "pytorch_model.bin", doc, "-o", tmp_path / "a.safetensors",
                           "--base-model", "./models/tiny-gemma2"], capsys)
    assert_user_error(rc, err, "./models/tiny-gemma2", "not a local folder")
    assert "huggingface.co" not in err


def test_checkpoint_base_name_is_resolved_as_a_local_folder(golden_dir, tmp_path, doc, capsys, monkeypatch):
    """The golden checkpoint names its base model "tiny-gemma2": from a folder without it, it is not a local folder
    and not reachable on the Hub (say so); from the folder that holds tiny-gemma2/, the same name is that folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, _, err = run_main(["internalize", golden_dir / "pytorch_model.bin", doc, "-o", "a.safetensors"], capsys)
    assert_user_error(rc, err, "'tiny-gemma2' is not a local folder", "Hugging Face Hub", "--base-model")
    assert not (tmp_path / "a.safetensors").exists()
    monkeypatch.chdir(golden_dir)
    out = tmp_path / "a.safetensors"
    rc, _, err = run_main(["internalize", "pytorch_model.bin", doc, "-o", out], capsys)
    assert rc == 0, err
    assert len(AdapterBatch.load(out)) == 1


@pytest.fixture
def hf_bars_on():
    """transformers' progress bars enabled (the library default), whatever the environment says."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield hf_logging
    (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_no_transformers_progress_bars_by_default(golden_dir, tmp_path, doc, capsys, hf_bars_on):
    args = ["internalize", golden_dir / "pytorch_model.bin", doc, "-o", tmp_path / "a.safetensors",
            "--base-model", golden_dir / "tiny-gemma2"]
    rc, _, err = run_main(args, capsys)
    assert rc == 0, err
    assert "Loading weights" not in err and "it/s" not in err
    assert hf_bars_on.is_progress_bar_enabled()  # restored for the rest of the process
    rc, _, err = run_main(["--progress", *args], capsys)  # the check above can see a bar when there is one
    assert rc == 0 and "Loading weights" in err


def test_entry_point_prints_no_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "d2l_fast.cli", "internalize", NO_CKPT, str(tmp_path / "nope.txt")],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"d2l-fast internalize: error: document {str(tmp_path / 'nope.txt')!r} not found"


def test_traceback_flag_reraises(tmp_path):
    from d2l_fast.cli import CLIError

    with pytest.raises(CLIError, match="not found"):
        main(["--traceback", "internalize", NO_CKPT, str(tmp_path / "nope.txt")])


def test_bench_passes_pytest_args_from_any_folder(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    rc = main(["bench", "--collect-only", "-q", "-k", "segmented and not e2e"])
    out = capfd.readouterr().out
    assert rc == 0, out[-3000:]
    assert "bench_segmented_lora.py::" in out and "bench_e2e.py::" not in out


def test_bench_help_shows_d2l_fast_usage_first(capfd):
    rc = main(["bench", "--help"])
    out = capfd.readouterr().out
    assert rc == 0, out[-2000:]
    assert out.startswith("usage: d2l-fast bench [pytest args]"), out[:300]
    own, pytest_part = out.index("d2l-fast bench -k"), out.find("pytest's own options")
    assert 0 < own < pytest_part and "--benchmark-only" in out
