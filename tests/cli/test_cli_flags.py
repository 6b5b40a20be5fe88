"""The d2l-fast command line as a package: flags generated from settings dataclasses, one module per command,
and one line when the Hugging Face Hub cannot be reached."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

from d2l_fast.cli import CLIError, build_parser, main
from d2l_fast.cli._flags import add_dataclass_flags, flag_name
from d2l_fast.cli.serve import settings_from_args
from d2l_fast.serving import ServerSettings

ROOT = pathlib.Path(__file__).resolve().parents[2]


def subparser(name):
    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "cmd")
    return p, sub.choices[name]


def test_every_server_setting_has_a_flag_with_its_default_and_help():
    _, serve = subparser("serve")
    by_dest = {a.dest: a for a in serve._actions}
    for f in dataclasses.fields(ServerSettings):
        assert f.name in by_dest, f"ServerSettings.{f.name} has no `d2l-fast serve` flag"
        action = by_dest[f.name]
        assert action.default == f.default, (f.name, action.default, f.default)
        assert flag_name(f) in action.option_strings
        assert action.help and f.metadata["help"] in action.help
    # parsing nothing gives the dataclass's defaults exactly
    p, _ = subparser("serve")
    assert settings_from_args(p.parse_args(["serve"])) == ServerSettings()


def test_serve_flags_reach_the_settings(monkeypatch):
    monkeypatch.delenv("D2L_API_KEY", raising=False)
    p, _ = subparser("serve")
    args = p.parse_args(["serve", "--max-batch", "3", "--served-model-name", "m", "--batch-window-ms", "2.5",
                         "--max-documents-per-request", "4", "--default-max-tokens", "7", "--store", "s"])
    s = settings_from_args(args)
    assert (s.max_batch, s.model_name, s.batch_window_ms, s.max_documents_per_request, s.default_max_tokens,
            s.store) == (3, "m", 2.5, 4, 7, "s")
    assert settings_from_args(p.parse_args(["serve", "--max-body-mb", "2"])).max_body_bytes == 2 << 20
    monkeypatch.setenv("D2L_API_KEY", "k")
    assert settings_from_args(p.parse_args(["serve"])).api_key == "k"
    assert settings_from_args(p.parse_args(["serve", "--api-key", "x"])).api_key == "x"
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--max-batch", "0"])  # positive ints stay positive
    assert settings_from_args(p.parse_args(["serve"])).encode_slice_tokens == 256  # uploads sliced by default
    assert settings_from_args(p.parse_args(["serve", "--encode-slice-tokens", "0"])).encode_slice_tokens == 0
    with pytest.raises(SystemExit):
        p.parse_args(["serve", "--encode-slice-tokens", "-1"])
    with pytest.raises(ValueError, match="encode_slice_tokens must be an int >= 0"):
        ServerSettings(encode_slice_tokens=-1)
    with pytest.raises(CLIError, match="--max-body-mb"):
        settings_from_args(p.parse_args(["serve", "--max-body-mb", "-1"]))


def test_flag_generation_refuses_what_it_cannot_express():
    import argparse

    @dataclasses.dataclass
    class NoDefault:
        x: int

    @dataclasses.dataclass
    class Listy:
        x: list = dataclasses.field(default_factory=list)

    @dataclasses.dataclass
    class Fine:
        on: bool = False
        n: int | None = None

    with pytest.raises(TypeError, match="dataclass"):
        add_dataclass_flags(argparse.ArgumentParser(), dict)
    with pytest.raises(TypeError, match="no default"):
        add_dataclass_flags(argparse.ArgumentParser(), NoDefault)
    with pytest.raises(TypeError):
        add_dataclass_flags(argparse.ArgumentParser(), Listy)
    p = argparse.ArgumentParser()
    assert add_dataclass_flags(p, Fine) == ["on", "n"]
    assert vars(p.parse_args([])) == {"on": False, "n": None}
    assert vars(p.parse_args(["--on", "--n", "3"])) == {"on": True, "n": 3}


def test_one_module_per_command():
    import importlib

    sub = next(a for a in build_parser()._actions if a.dest == "cmd")
    for name in sub.choices:
        mod = importlib.import_module("d2l_fast.cli." + name.replace("-", "_"))
        assert mod.NAME == name and callable(mod.run) and callable(mod.add_parser)


def run_cli(args, env, cwd):
    env = dict(env, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "d2l_fast.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)


def test_unreachable_hub_is_one_line_naming_the_way_out(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"))  # nothing listens on port 9
    r = run_cli(["info", "nobody/no-such-ckpt"], env, tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("d2l-fast info: error: checkpoint 'nobody/no-such-ckpt'")
    assert "unreachable" in lines[0] and "http://127.0.0.1:9" in lines[0] and "local" in lines[0]
    env["HF_HUB_OFFLINE"] = "1"
    r = run_cli(["info", "nobody/no-such-ckpt"], env, tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and "HF_HUB_OFFLINE" in lines[0], r.stderr


def test_main_still_dispatches(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "serve" in capsys.readouterr().out
