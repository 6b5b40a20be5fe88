"""PEFT export: folders written by d2l_fast.export load in real PEFT and reproduce d2l_fast's outputs."""

import dataclasses
import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from d2l_fast import D2LModel, spec_for_model
from d2l_fast.cli import main
from d2l_fast.export import export_peft

from ._numerics import PEFT_EXPORT
from ._tiny import tiny_model, tiny_tokenizer

peft = pytest.importorskip("peft")

DOCS = [("The keeper of the old mill wrote every storm into a blue ledger, and the river rose twice that spring "
         "while the fox watched the boats from under the bridge near the bakery."),
        "The council met on the first Monday.",
        "Bread rose in the warm kitchen."]
NAMES = ["mill notes.txt", "council.txt", "bread.txt"]
PROMPT = "Where did the fox live?"
KW = dict(latent_size=32, num_blocks=1, n_heads=4, head_dim=16, n_kv_heads=2)

# gemma2: two modules on a subset of layers, in non-sorted order (layers_to_transform, attention + MLP paths);
# qwen3: tied embeddings, every layer, MLP only
SETUPS = {"gemma2": dict(target_modules=("down_proj", "o_proj"), encoder_type="early_exit", layer_indices=(3, 1)),
          "qwen3": dict(target_modules=("down_proj",))}


def build(arch, seed=0):
    base, tok = tiny_model(arch), tiny_tokenizer(arch)
    cfg = dict(SETUPS[arch])
    layers = cfg.pop("layer_indices", None)
    spec = spec_for_model(base, **cfg, **KW)
    if layers is not None:
        spec = dataclasses.replace(spec, layer_indices=layers, num_layers=len(layers))
    return D2LModel.from_base(base, tok, seed=seed, init_scaler_B=6.0, spec=spec, max_chunk_len=24)


@pytest.fixture(scope="module", params=sorted(SETUPS))
def setup(request):
    model = build(request.param)
    ad = model.internalize(DOCS, names=NAMES)
    r = model.spec.lora_r
    assert ad.ranks[0] >= 3 * r and len(set(ad.ranks)) > 1  # a chunked document; ranks differ per document
    ids, mask = model.encode_prompts([PROMPT])
    return request.param, model, ad, ids, mask


def load_peft(arch, folder):
    pm = peft.PeftModel.from_pretrained(tiny_model(arch), str(folder))  # a fresh copy of the same base weights
    return pm.eval()


def d2l_logits(model, ids, mask, adapters, k):
    with torch.no_grad():
        return model(ids, mask, adapters=adapters, adapter_index=[k]).logits


def peft_logits(pm, ids, mask):
    with torch.no_grad():
        return pm(input_ids=ids, attention_mask=mask).logits


def check_keys(pm, folder):
    """Every tensor in the file is a LoRA weight of the PEFT model and every LoRA weight of the model is in the file."""
    from peft.utils import get_peft_model_state_dict

    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
    assert file_keys == set(get_peft_model_state_dict(pm))


def assert_same_folder(a, b):
    """Same config bytes, same tensors and metadata (safetensors does not fix the metadata's order in the header)."""
    from safetensors.torch import load_file

    assert (a / "adapter_config.json").read_bytes() == (b / "adapter_config.json").read_bytes()
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) and ta[k].dtype == tb[k].dtype for k in ta)
    with safe_open(str(a / "adapter_model.safetensors"), "pt") as fa, safe_open(str(b / "adapter_model.safetensors"),
                                                                                "pt") as fb:
        assert fa.metadata() == fb.metadata()


def snapshot(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def test_each_document_matches_peft(setup, tmp_path):
    arch, model, ad, ids, mask = setup
    folders = export_peft(model, ad, [0, 1, 2], tmp_path / "out")
    assert [f.name for f in folders] == ["mill_notes.txt", "council.txt", "bread.txt"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(f.name for f in folders)  # no temp left
    with torch.no_grad():
        base = model(ids, mask).logits
    spec = model.spec
    for k, folder in enumerate(folders):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["r"] == ad.ranks[k] and cfg["lora_alpha"] / cfg["r"] == pytest.approx(ad.alpha, rel=1e-12)
        assert cfg["target_modules"] == list(spec.target_modules)
        full = set(spec.layer_indices) == set(range(model.base_model.config.num_hidden_layers))
        assert cfg["layers_to_transform"] == (None if full else sorted(spec.layer_indices))
        pm = load_peft(arch, folder)
        check_keys(pm, folder)
        n_lora = sum(1 for _, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
        assert n_lora == spec.num_layers * len(spec.target_modules)
        got, want = peft_logits(pm, ids, mask), d2l_logits(model, ids, mask, ad, k)
        torch.testing.assert_close(got, want, **PEFT_EXPORT)
        assert (want - base).abs().max() > 1e-2  # the adapter visibly changes the output
        other = d2l_logits(model, ids, mask, ad, (k + 1) % len(ad))
        assert (got - other).abs().max() > 1e-2  # and it is this document's adapter, not another's
        gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=model.tokenizer.pad_token_id)
        with torch.no_grad():
            t_peft = pm.generate(input_ids=ids, attention_mask=mask, **gen)
        t_d2l = model.generate(ids, mask, adapters=ad, adapter_index=[k], **gen)
        assert torch.equal(t_peft, t_d2l)


def test_composed_export_matches(setup, tmp_path):
    arch, model, ad, ids, mask = setup
    (folder,) = export_peft(model, ad, [0, 2], tmp_path / "both", compose=True, weights=[1.0, 0.5])
    assert folder == tmp_path / "both"
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == ad.ranks[0] + ad.ranks[2]
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["d2l_fast.documents"]) == [NAMES[0], NAMES[2]]
    pm = load_peft(arch, folder)
    composed = ad.compose([0, 2], [1.0, 0.5])
    want = d2l_logits(model, ids, mask, composed, 0)
    torch.testing.assert_close(peft_logits(pm, ids, mask), want, **PEFT_EXPORT)
    assert (want - d2l_logits(model, ids, mask, ad, 0)).abs().max() > 1e-2  # not just document 0


def test_single_folder_bfloat16(setup, tmp_path):
    arch, model, ad, ids, mask = setup
    (folder,) = export_peft(model, ad, -1, tmp_path / "one", dtype=torch.bfloat16)
    assert folder == tmp_path / "one"
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    # PEFT copies the bf16 weights into the fp32 base's LoRA layers: equal to d2l_fast with bf16-rounded adapters
    rounded = ad.to(dtype=torch.bfloat16).to(dtype=torch.float32)
    pm = load_peft(arch, folder)
    torch.testing.assert_close(peft_logits(pm, ids, mask), d2l_logits(model, ids, mask, rounded, 2), **PEFT_EXPORT)


def test_paths_from_checkpoint_and_config_only(setup, tmp_path):
    """A checkpoint or spec + a base folder's config (meta device, no weights) gives the same files as the model."""
    _, model, ad, _, _ = setup
    base_dir = tmp_path / "base"
    model.base_model.config.save_pretrained(base_dir)  # config.json only: no weights
    (a,) = export_peft(model, ad, [1], tmp_path / "a")
    (b,) = export_peft(model.state_dict_for_checkpoint(), ad, [1], tmp_path / "b", base_model=base_dir)
    (c,) = export_peft(model.spec, ad, [1], tmp_path / "c", base_model=base_dir)
    for other in (b, c):
        assert_same_folder(a, other)
    with pytest.raises(ValueError, match="cannot read the base model config"):
        export_peft(model.spec, ad, [1], tmp_path / "d", base_model=tmp_path / "missing")
    assert not (tmp_path / "d").exists()


def test_refusals(setup, tmp_path):
    arch, model, ad, _, _ = setup
    (folder,) = export_peft(model, ad, 0, tmp_path / "doc")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="already exists"):
        export_peft(model, ad, 1, tmp_path / "doc")
    with pytest.raises(FileExistsError, match="already exists"):  # a list export checks every folder first
        export_peft(model, ad, [1, 0], tmp_path, names=["new", "doc"])
    with pytest.raises(ValueError, match=r"rank \d+, above max_rank=8"):
        export_peft(model, ad, [1, 0], tmp_path / "capped", max_rank=8)
    with pytest.raises(IndexError, match="out of range: the adapters hold 3 documents"):
        export_peft(model, ad, [0, 3], tmp_path / "x")
    for bad in (True, "1", 1.0):
        with pytest.raises(TypeError, match="must be ints"):
            export_peft(model, ad, [bad], tmp_path / "x")
    with pytest.raises(ValueError, match="no document index"):
        export_peft(model, ad, [], tmp_path / "x")
    with pytest.raises(ValueError, match="not allowed"):
        export_peft(model, ad, [0], tmp_path / "x", names=["../escape"])
    with pytest.raises(ValueError, match="same folder"):
        export_peft(model, ad, [0, 1], tmp_path / "x", names=["same", "same"])
    with pytest.raises(ValueError, match="only applies with compose"):
        export_peft(model, ad, [0, 1], tmp_path / "x", weights=[1, 1])
    with pytest.raises(ValueError, match="dtype must be one of"):
        export_peft(model, ad, 0, tmp_path / "x", dtype=torch.float64)
    other_model = build(arch, seed=1)  # another hypernetwork on the same base architecture
    other = other_model.internalize(DOCS[:1])
    with pytest.raises(ValueError, match="made by another model"):
        export_peft(model, other, 0, tmp_path / "x")
    foreign = build("qwen3" if arch == "gemma2" else "gemma2").internalize(DOCS[:1])
    with pytest.raises(ValueError, match="made for base model|modules/layers"):
        export_peft(model.spec, foreign, 0, tmp_path / "x", base_model=model.base_model)
    assert snapshot(tmp_path) == before  # nothing written, nothing lost, no temp folders left
    # overwrite replaces a PEFT folder, never an unrelated non-empty directory
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a PEFT adapter folder"):
        export_peft(model, ad, 0, tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    export_peft(model, ad, 1, folder, overwrite=True)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == ad.ranks[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc", "mine"]


def test_adapter_batch_to_peft(setup, tmp_path):
    """AdapterBatch.to_peft: the folder export_peft writes; PEFT reproduces a chunked and a composed document."""
    arch, model, ad, ids, mask = setup
    folder = ad.to_peft(tmp_path / "chunked", 0, model=model)  # document 0 has several chunks (see setup)
    assert folder == tmp_path / "chunked"
    assert_same_folder(folder, export_peft(model, ad, 0, tmp_path / "lib")[0])
    want = d2l_logits(model, ids, mask, ad, 0)
    torch.testing.assert_close(peft_logits(load_peft(arch, folder), ids, mask), want, **PEFT_EXPORT)
    with torch.no_grad():
        assert (want - model(ids, mask).logits).abs().max() > 1e-2
    composed = ad.compose([0, 2], [1.0, 0.5])  # spec + base model instead of the D2LModel: the same files
    both = composed.to_peft(tmp_path / "both", 0, spec=model.spec, base_model=model.base_model)
    assert_same_folder(both, export_peft(model, composed, 0, tmp_path / "lib2")[0])
    want = d2l_logits(model, ids, mask, composed, 0)
    torch.testing.assert_close(peft_logits(load_peft(arch, both), ids, mask), want, **PEFT_EXPORT)
    assert (want - d2l_logits(model, ids, mask, ad, 0)).abs().max() > 1e-2  # not just document 0
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="already exists; pass overwrite=True"):
        ad.to_peft(folder, 1, model=model)
    with pytest.raises(IndexError, match="out of range: the adapters hold 3 documents"):
        ad.to_peft(tmp_path / "x", 3, model=model)
    for bad in ([0], [0, 1], 1.0, "0", True, None):
        with pytest.raises(TypeError, match="index must be one int"):
            ad.to_peft(tmp_path / "x", bad, model=model)
    with pytest.raises(TypeError, match="exactly one of model= .* or spec="):
        ad.to_peft(tmp_path / "x", 0)
    with pytest.raises(TypeError, match="exactly one of model= .* or spec="):
        ad.to_peft(tmp_path / "x", 0, model=model, spec=model.spec)
    with pytest.raises(TypeError, match="goes in spec="):
        ad.to_peft(tmp_path / "x", 0, model=model.spec)
    with pytest.raises(TypeError, match="spec must be a D2LSpec"):
        ad.to_peft(tmp_path / "x", 0, spec=model)
    with pytest.raises(ValueError, match="made by another model"):
        build(arch, seed=1).internalize(DOCS[:1]).to_peft(tmp_path / "x", 0, model=model)
    assert snapshot(tmp_path) == before  # nothing written, nothing replaced
    assert ad.to_peft(folder, 1, model=model, overwrite=True, dtype=torch.bfloat16) == folder
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == ad.ranks[1]


def test_cli_export_peft(setup, tmp_path):
    arch, model, ad, _, _ = setup
    model.save_pretrained(tmp_path / "ck")
    model.base_model.config.save_pretrained(tmp_path / "base")
    ad.save(tmp_path / "ad.safetensors")
    args = ["export-peft", "--checkpoint", str(tmp_path / "ck"), "--adapters", str(tmp_path / "ad.safetensors"),
            "--base-model", str(tmp_path / "base")]
    assert main([*args, "--out", str(tmp_path / "cli"), "--index", "2", "0", "--max-rank", "512"]) == 0
    ref = export_peft(model, ad, [2, 0], tmp_path / "lib")
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(f.name for f in ref)
    for f in ref:
        assert_same_folder(tmp_path / "cli" / f.name, f)
    assert main([*args, "--out", str(tmp_path / "comp"), "--compose", "--index", "0", "1"]) == 0
    assert json.loads((tmp_path / "comp" / "adapter_config.json").read_text())["r"] == ad.ranks[0] + ad.ranks[1]
    # adapters of another hypernetwork are refused: the checkpoint identifies the model
    build(arch, seed=1).internalize(DOCS[:1]).save(tmp_path / "other.safetensors")
    bad = ["export-peft", "--checkpoint", str(tmp_path / "ck"), "--adapters", str(tmp_path / "other.safetensors"),
           "--base-model", str(tmp_path / "base"), "--out", str(tmp_path / "refused")]
    try:
        rc = main(bad)
    except ValueError as e:
        assert "made by another model" in str(e)
        rc = None
    assert rc != 0 and not (tmp_path / "refused").exists()


def test_module_name_outside_decoder_layers(tmp_path):
    """A base whose target name also occurs outside the decoder (like a multimodal projector) gets exact paths."""
    def with_projector():
        base = tiny_model("llama")
        base.model.down_proj = torch.nn.Linear(64, 64)  # not in any decoder layer, unused by the forward
        return base

    base = with_projector()
    model = D2LModel.from_base(base, tiny_tokenizer("llama"), seed=0, init_scaler_B=6.0, max_chunk_len=24, **KW)
    ad = model.internalize(DOCS[1:])
    (folder,) = export_peft(model, ad, 0, tmp_path / "doc")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str) and cfg["layers_to_transform"] is None
    pm = peft.PeftModel.from_pretrained(with_projector(), str(folder)).eval()
    wrapped = [n for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(wrapped) == 2 and all(".layers." in n for n in wrapped)  # llama: 2 layers, projector left alone
    ids, mask = model.encode_prompts([PROMPT])
    want = d2l_logits(model, ids, mask, ad, 0)
    torch.testing.assert_close(peft_logits(pm, ids, mask), want, **PEFT_EXPORT)
    with torch.no_grad():
        assert (want - model(ids, mask).logits).abs().max() > 1e-2


def test_cli_reference_checkpoint(golden_dir, tmp_path):
    """The reference's pytorch_model.bin: `internalize` then `export-peft`; PEFT on the golden base reproduces it."""
    ck, base_dir = str(golden_dir / "pytorch_model.bin"), golden_dir / "tiny-gemma2"
    doc = tmp_path / "fox.txt"
    doc.write_text(DOCS[0])
    assert main(["internalize", ck, str(doc), "-o", str(tmp_path / "ad.safetensors"), "--base-model", str(base_dir),
                 "--max-chunk-len", "24"]) == 0
    assert main(["export-peft", "--checkpoint", ck, "--adapters", str(tmp_path / "ad.safetensors"), "--out",
                 str(tmp_path / "peft"), "--base-model", str(base_dir)]) == 0
    folder = tmp_path / "peft" / "fox.txt"
    model = D2LModel.from_checkpoint(ck, base_model=str(base_dir))
    ad = model.internalize([DOCS[0]], max_chunk_len=24)
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == ad.ranks[0] > 2 * model.spec.lora_r
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    pm = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    ids, mask = model.encode_prompts([PROMPT])
    want = d2l_logits(model, ids, mask, ad, 0)
    torch.testing.assert_close(peft_logits(pm, ids, mask), want, **PEFT_EXPORT)
    with torch.no_grad():
        assert (want - model(ids, mask).logits).abs().max() > 1e-2
