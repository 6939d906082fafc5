"""Model I/O: resolve a name, directory or hub id; load (model, tokenizer); save an artifact atomically."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from . import __version__
from .errors import (ConfigError, CorruptModelError, ModelNotFoundError, OutputExistsError,
                     UnsupportedModelError)

ASSETS = Path(__file__).parent / "assets"
EMBEDDED_MODELS = ("tiny", "reasoner", "moe")
# HF `model_type`s whose causal-LM classes pocketlm's passes understand (dense and MoE families).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
RECORD_FILE = "pocketlm.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: the name the user gave and the directory it resolved to; for a GGUF
    file, `gguf` describes the file (path, hash, architecture, quantization) and `path` is its
    converted copy in the cache."""

    name: str
    path: Path
    gguf: dict | None = None

    @property
    def inputs(self) -> tuple[Path, ...]:
        """The user's files that no output may overwrite."""
        return (self.path, Path(self.gguf["file"])) if self.gguf else (self.path,)


def resolve(name_or_path: str | os.PathLike, allow_download: bool | None = None) -> ModelSource:
    """Find the model directory for an embedded name, a packaged real model (`smollm2`), a local
    directory, a GGUF file (or a directory holding one), an install directory of `pocketlm install`
    (its active version, verified), or a hub id in the local Hugging Face cache.

    allow_download: fetch a hub id that is not cached (default: no, unless $POCKETLM_ALLOW_DOWNLOAD=1).
    """
    from .gguf_import import PACKAGED_MODELS, converted, find_gguf, packaged_model
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name in PACKAGED_MODELS and not path.exists():
        path = packaged_model(name)
    gguf_file = path if path.is_file() and path.suffix == ".gguf" else (find_gguf(path) if path.is_dir() else None)
    if gguf_file is not None:
        cache, info = converted(gguf_file)
        return ModelSource(name, cache, info)
    if path.is_dir():
        from .fleet.install import is_install_dir, verify_install
        if is_install_dir(path):  # a device install: its active version, after its signature and hashes check
            return ModelSource(name, Path(verify_install(path, tensors=False)["path"]))
        return ModelSource(name, path.resolve())
    if name in EMBEDDED_MODELS:
        return ModelSource(name, ASSETS / "models" / name)
    if path.exists():
        raise ModelNotFoundError(f"'{name}' is a file, not a model directory or a .gguf file",
                                 "pass the directory that holds config.json and the weights, or a GGUF file")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        if allow_download is None:
            allow_download = os.environ.get("POCKETLM_ALLOW_DOWNLOAD", "0") in ("1", "true", "True")
        return ModelSource(name, _from_hub(name, allow_download))
    raise ModelNotFoundError(
        f"no model directory at '{name}'",
        f"pass a directory with config.json and weights, a .gguf file, or one of the models: "
        f"{', '.join([*EMBEDDED_MODELS, *PACKAGED_MODELS])}")


def _from_hub(repo_id: str, allow_download: bool) -> Path:
    # Local cache only, unless the user asked for a download.
    from huggingface_hub import snapshot_download
    with contextlib.suppress(Exception):
        return Path(snapshot_download(repo_id, local_files_only=True))
    if not allow_download:
        raise ModelNotFoundError(f"hub model '{repo_id}' is not in the local Hugging Face cache and pocketlm does "
                                 "not download unless asked",
                                 "pass --allow-download (API: allow_download=True), or pass a local directory")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
    except Exception as e:
        raise ModelNotFoundError(f"hub model '{repo_id}' could not be downloaded ({type(e).__name__})",
                                 f"check the id and the network, or download it elsewhere (`hf download {repo_id} "
                                 "--local-dir DIR`) and pass DIR") from None


def read_config(path: Path) -> dict[str, Any]:
    """config.json as a dict, checked for a supported architecture."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelNotFoundError(f"'{path}' has no config.json",
                                 "pass a Hugging Face model directory (config.json + weights)")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptModelError(f"'{cfg_file}' is not valid JSON ({e.msg if hasattr(e, 'msg') else e})",
                                "restore the file from the original model") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(config.get("architectures") or []) or "no architectures field"
        raise UnsupportedModelError(
            f"unsupported architecture '{model_type}' ({arch}) in '{path}'",
            f"pocketlm supports the model types {', '.join(SUPPORTED_MODEL_TYPES)}")
    return config


def weight_files(path: Path) -> list[Path]:
    """The weight files of a model directory, sorted; raises if there are none."""
    files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
                   and not p.name.startswith("training_args"))
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    files = safetensors or files  # transformers reads safetensors first when both are present
    if not files:
        raise CorruptModelError(f"'{path}' has no weight files (*.safetensors)",
                                "copy the model's weights into the directory")
    return files


def check_weights(path: Path) -> None:
    """Open every safetensors header so a corrupt or truncated file fails here, not mid-run."""
    from safetensors import SafetensorError, safe_open
    for f in weight_files(path):
        if not f.name.endswith(".safetensors"):
            continue
        try:
            with safe_open(str(f), "pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as e:
            raise CorruptModelError(f"'{f}' is corrupt or truncated ({e})",
                                    "re-download or re-copy the weights") from None


def content_hash(path: Path) -> str:
    """sha256 over the weight files and config.json of a model directory, in name order."""
    digest = hashlib.sha256()
    for f in [path / "config.json", *weight_files(path)]:
        digest.update(f.name.encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of one file (calibration or evaluation data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}' asked for, but no CUDA device is available",
                          "use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ConfigError(f"unknown device '{device}'", "use cpu, cuda, cuda:N or auto")
    return device


def pick_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}'", f"use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(name_or_path: str | os.PathLike, dtype: str | torch.dtype = "float32", device: str = "cpu",
         allow_download: bool | None = None, moe: dict | bool | None = None, show_progress: bool = True):
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: an embedded name (tiny, reasoner, moe), `smollm2` (the packaged real model), a
            model directory, a GGUF file (dequantized to `dtype`; converted once, then cached), or a
            hub id already in the local Hugging Face cache.
        dtype: float32 (default, an exact baseline on CPU), bfloat16 or float16.
        device: cpu (default), cuda, cuda:N or auto.
        allow_download: download a hub id that is not cached (default: never, see `resolve`).
        moe: how an MoE model's experts run. None (default): as the artifact's saved MoEDeployConfig
            says (`pocketlm moe deploy`), if it has one; False: as plain modules, all in memory; a
            dict of MoEDeployConfig fields: those changed on the saved config (or the default).
        show_progress: a progress bar for the expert bit plan, when one must be calibrated.

    Returns:
        (model, tokenizer), the model in eval mode. `model.pocketlm_source` is the ModelSource,
        `model.pocketlm_record` the artifact's pocketlm.json (empty for a plain HF model) and, for
        a deployed MoE model, `model.pocketlm_moe` its MoERuntime (cache statistics, `close()`).
    """
    from transformers import AutoModelForCausalLM

    source = resolve(name_or_path, allow_download)
    read_config(source.path)
    check_weights(source.path)
    torch_dtype, device = pick_dtype(dtype), pick_device(device)
    _quiet_transformers()
    record_file = source.path / RECORD_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    with _load_errors(source.path):
        qconfig = _pocketlm_quantization(source.path)
        if record.get("layer_shapes") or qconfig or record.get("moefy"):
            model = _load_rebuilt(source.path, record.get("layer_shapes"), qconfig, torch_dtype, record.get("moefy"))
        else:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch_dtype)
    tok = load_tokenizer(source.path)
    model.to(device).eval()
    model.pocketlm_source = source
    model.pocketlm_record = record
    overrides = {k: v for k, v in (moe if isinstance(moe, dict) else {}).items() if v is not None}
    if moe is not False and (overrides or record.get("moe_deploy")):
        from .moe.deploy import MoEDeployConfig, deploy, plan
        cfg = (MoEDeployConfig.from_record(record) or MoEDeployConfig()).merged(**overrides)
        deploy(model, plan(model, tok, cfg, show_progress))
    return model, tok


def _pocketlm_quantization(path: Path) -> dict | None:
    qconfig = json.loads((path / "config.json").read_text()).get("quantization_config")
    return qconfig if isinstance(qconfig, dict) and qconfig.get("quant_method") == "pocketlm" else None


def _load_rebuilt(path: Path, shapes: list[dict] | None, qconfig: dict | None, dtype: torch.dtype,
                  moefied: dict | None = None):
    """Rebuild a model that a single HF config cannot describe (layers that differ in size after
    structured pruning, FFNs split into experts by moefy) or that holds pocketlm's quantized modules:
    build from config.json, shrink each layer to its recorded shape, swap in the MoEfied FFNs and the
    quantized shells, then load the weights strictly."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .compress.prune.structured import apply_layer_shapes
    from .compress.quant.artifact import finish, install_shells
    config = AutoConfig.from_pretrained(path)
    config.quantization_config = None  # the shells below replace transformers' quantizer
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if shapes:
        apply_layer_shapes(model, shapes)
    if moefied:
        from .moe.moefy import install_moefied
        install_moefied(model, moefied["experts"], moefied["top_k"])
    if qconfig:
        install_shells(model, qconfig, dtype)
    state = {}
    for f in weight_files(path):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise CorruptModelError(f"weights in '{path}' do not match the model's recorded layout "
                                f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})",
                                "re-create the artifact with `pocketlm compress`")
    if qconfig:
        finish(model)
        model.config.quantization_config = qconfig
    else:
        model.tie_weights()
    return model


def load_tokenizer(path: Path):
    """The tokenizer of a model directory, with unreadable files reported as CorruptModelError."""
    from transformers import AutoTokenizer
    with _load_errors(path):
        return AutoTokenizer.from_pretrained(path)


@contextlib.contextmanager
def _load_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CorruptModelError(f"cannot load '{path}': {first}",
                                "check that config.json, the weights and the tokenizer files belong together") from None


def _quiet_transformers() -> None:
    # pocketlm draws its own progress bars; transformers' per-load/save bars would interleave with them.
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def check_output(out: str | os.PathLike, overwrite: bool = False, protect: tuple[Path, ...] = ()) -> Path:
    """The resolved output path, after refusing an existing one (unless `overwrite`) and any that is,
    contains or lies inside a protected input. Writes nothing, so callers can check before long work."""
    out = Path(out).expanduser().resolve()
    for p in protect:
        p = Path(p).resolve()
        if out == p or p.is_relative_to(out) or out.is_relative_to(p):
            raise OutputExistsError(f"output '{out}' would overwrite the input model '{p}'",
                                    "choose an output directory outside the input model")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output '{out}' already exists", "pass --overwrite or choose another path")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False, protect: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; move it into place only if the block succeeds.

    Refuses an existing `out` unless `overwrite`, and any `out` that is or contains a protected input.
    """
    out = check_output(out, overwrite, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it is renamed into place when the block succeeds."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a file through a temporary name in the same directory, then rename it into place."""
    with atomic_write_path(path) as tmp:
        tmp.write_text(text)
    return Path(path).expanduser()


def _own_storage_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict with every tensor owning its storage: the runtime packs q/k/v (and gate/up)
    weights into one buffer and leaves views in the modules; safetensors needs them apart."""
    copies: dict[tuple, torch.Tensor] = {}  # by memory: tied weights stay one tensor

    def own(t: torch.Tensor) -> torch.Tensor:
        whole = t.is_contiguous() and t.storage_offset() == 0 and \
            t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if whole:
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key not in copies:
            copies[key] = t.clone(memory_format=torch.contiguous_format)
        return copies[key]
    return {k: own(t) for k, t in model.state_dict().items()}


def _source_record(source: ModelSource) -> dict:
    if source.gguf:  # the user's file, not the cache's float copy
        return {"name": source.name, "path": source.gguf["file"], "hash": source.gguf["hash"], "format": "gguf",
                "gguf_quantization": source.gguf["quantization"], "gguf_architecture": source.gguf["architecture"]}
    return {"name": source.name, "path": str(source.path), "hash": content_hash(source.path)}


def _moe_deploy_record(saved: dict | None, recipe: list[dict]) -> dict | None:
    """How the experts run (set by `moe deploy`, restored by load). A pass after it changes the weights
    its bit plan was calibrated on, so the plan is dropped (the next load calibrates a new one)."""
    if saved and saved.get("bits") and recipe and recipe[-1].get("kind") != saved["kind"]:
        return {**saved, "bits": None}
    return saved


def save(model, tok, out: str | os.PathLike, *, recipe: list[dict] | None = None,
         calibration_hash: str | None = None, evaluation: dict | None = None,
         overwrite: bool = False, rl: dict | None = None, files: dict[str, str] | None = None) -> Path:
    """Write an artifact: safetensors weights, config.json, tokenizer and pocketlm.json.

    Args:
        model, tok: as returned by `load` (possibly compressed in place since).
        out: the artifact directory; written to a temporary directory and moved into place at the end.
        recipe: the passes applied, as dicts (`config.to_dict()`), in order.
        calibration_hash: `file_hash` of the calibration data, when a pass used one.
        evaluation: an EvalReport dict to store with the artifact.
        overwrite: replace an existing `out` (never the source model).
        rl: the RL stage's summary (`pocketlm rl`), kept by later saves.
        files: extra text files to write into the artifact, name -> content.
    """
    from .compress.quant.artifact import describe
    qconfig = describe(model)
    if qconfig:  # config.json names the quantized modules, so loaders can rebuild them
        model.config.quantization_config = qconfig
    source: ModelSource | None = getattr(model, "pocketlm_source", None)
    protect = source.inputs if source else ()
    prior = getattr(model, "pocketlm_record", {}) or {}
    record = {
        "pocketlm_version": __version__,
        # A re-saved artifact keeps its original source; a plain model is its own source.
        "source": prior.get("source") or (
            _source_record(source) if source else None),
        "recipe": [*prior.get("recipe", []), *(recipe or [])],
        "recipes": prior.get("recipes"),  # the recipes applied, as written (apply_recipe)
        "calibration_hash": calibration_hash or prior.get("calibration_hash"),
        "layer_shapes": prior.get("layer_shapes"),  # set by structured pruning when layers differ
        "moefy": prior.get("moefy"),  # set by moefy: FFNs split into experts with a router
        "evaluation": evaluation,
        "rl": rl or prior.get("rl"),
    }
    record["moe_deploy"] = _moe_deploy_record(prior.get("moe_deploy"), record["recipe"])
    _quiet_transformers()
    with atomic_dir(out, overwrite=overwrite, protect=protect) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=_own_storage_state_dict(model))
        tok.save_pretrained(tmp)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)
