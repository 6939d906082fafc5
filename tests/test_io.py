import json
import shutil

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import pocketlm
from pocketlm.errors import CorruptModelError, ModelNotFoundError, OutputExistsError, UnsupportedModelError
from pocketlm.io import ASSETS, EMBEDDED_MODELS, content_hash, resolve

TINY = ASSETS / "models" / "tiny"
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, vocab_size=8192, max_position_embeddings=256)
FAMILIES = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
}


def copy_model(tmp_path, name="model"):
    dst = tmp_path / name
    shutil.copytree(TINY, dst)
    return dst


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_embedded_names_resolve_and_load(name):
    model, tok = pocketlm.load(name)
    assert model.dtype == torch.float32 and not model.training
    assert model.pocketlm_source.path == (ASSETS / "models" / name)
    assert tok("What is 2+2?")["input_ids"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_loads_each_supported_family(tmp_path, model_type):
    cfg = AutoConfig.for_model(model_type, **COMMON, **FAMILIES[model_type])
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    ref.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(TINY).save_pretrained(tmp_path)
    model, _ = pocketlm.load(tmp_path)
    x = torch.randint(0, 8192, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_dtype_selectable():
    model, _ = pocketlm.load("tiny", dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_save_roundtrip_identical_logits_and_record(tmp_path, tiny):
    model, tok = tiny
    out = pocketlm.save(model, tok, tmp_path / "art", recipe=[{"kind": "noop"}], evaluation={"quality": {"ppl": 1.0}})
    reloaded, tok2 = pocketlm.load(out)
    x = torch.randint(0, 8192, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(x).logits, reloaded(x).logits)
    record = json.loads((out / "pocketlm.json").read_text())
    assert record["pocketlm_version"] == pocketlm.__version__
    assert record["source"]["name"] == "tiny"
    assert record["source"]["hash"] == content_hash(TINY)
    assert record["recipe"] == [{"kind": "noop"}]
    assert record["evaluation"] == {"quality": {"ppl": 1.0}}
    assert reloaded.pocketlm_record == record
    assert tok2.get_vocab() == tok.get_vocab()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary directory left behind"


def test_resave_keeps_original_source(tmp_path, tiny):
    first = pocketlm.save(*tiny, tmp_path / "a", recipe=[{"kind": "one"}])
    model, tok = pocketlm.load(first)
    second = pocketlm.save(model, tok, tmp_path / "b", recipe=[{"kind": "two"}])
    record = json.loads((second / "pocketlm.json").read_text())
    assert record["source"]["name"] == "tiny"
    assert [r["kind"] for r in record["recipe"]] == ["one", "two"]


def test_existing_output_needs_overwrite(tmp_path, tiny):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        pocketlm.save(*tiny, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    pocketlm.save(*tiny, out, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_never_overwrites_input_model(tmp_path):
    src = copy_model(tmp_path)
    before = content_hash(src)
    model, tok = pocketlm.load(src)
    for target in (src, src / "sub", tmp_path):
        with pytest.raises(OutputExistsError, match="input model"):
            pocketlm.save(model, tok, target, overwrite=True)
    assert content_hash(src) == before


def test_failed_save_leaves_nothing(tmp_path, tiny, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(tok, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        pocketlm.save(model, tok, tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_missing_path():
    with pytest.raises(ModelNotFoundError, match="no model directory"):
        resolve("does/not/exist/here")


def test_hub_id_is_never_downloaded_unless_asked(monkeypatch):
    import huggingface_hub
    calls = []

    def fake_download(repo_id, local_files_only=False, **kw):
        calls.append(local_files_only)
        raise OSError("not cached")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.delenv("POCKETLM_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(ModelNotFoundError, match="does not download unless asked.*--allow-download"):
        resolve("someorg/some-model")
    assert calls == [True]  # the local cache was asked, the hub never
    with pytest.raises(ModelNotFoundError, match="could not be downloaded"):
        resolve("someorg/some-model", allow_download=True)
    assert calls == [True, True, False]


def test_truncated_safetensors(tmp_path):
    src = copy_model(tmp_path)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptModelError, match="corrupt or truncated"):
        pocketlm.load(src)


def test_unsupported_architecture(tmp_path):
    src = copy_model(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        pocketlm.load(src)


def test_corrupt_config(tmp_path):
    src = copy_model(tmp_path)
    (src / "config.json").write_text("{not json")
    with pytest.raises(CorruptModelError, match="config.json"):
        pocketlm.load(src)
