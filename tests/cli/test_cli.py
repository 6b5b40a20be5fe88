"""The d2l-fast command line on the golden checkpoint."""

import json

from d2l_fast import load_checkpoint
from d2l_fast.cli import main


def test_info_and_convert(golden_dir, tmp_path, capsys):
    assert main(["info", str(golden_dir / "pytorch_model.bin")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["spec"]["lora_r"] == 8 and info["parameters"] == 831488  # the golden README's count
    assert main(["convert", str(golden_dir / "pytorch_model.bin"), str(tmp_path / "st")]) == 0
    assert load_checkpoint(tmp_path / "st").spec.base_model_name_or_path == "tiny-gemma2"


def test_internalize_command(golden_dir, tmp_path):
    from d2l_fast import AdapterBatch

    docs = []
    for i, text in enumerate(["The fox lived under the old mill.", "The council met on the first Monday."]):
        p = tmp_path / f"doc{i}.txt"
        p.write_text(text)
        docs.append(str(p))
    out = tmp_path / "ad.safetensors"
    rc = main(["internalize", str(golden_dir / "pytorch_model.bin"), *docs, "-o", str(out), "--base-model",
               str(golden_dir / "tiny-gemma2")])
    assert rc == 0
    ad = AdapterBatch.load(out)
    assert len(ad) == 2 and ad.names == ["doc0.txt", "doc1.txt"] and ad.ranks == [16, 16]
