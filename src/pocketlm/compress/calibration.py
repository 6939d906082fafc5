"""Calibration data and the layer-by-layer walk that passes share.

The walk holds the model plus one decoder layer's inputs for the calibration set, never every
layer's activations: the inputs of layer l+1 are the outputs of layer l (after it was compressed,
so later layers see the errors of earlier ones, as GPTQ and SparseGPT prescribe).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..errors import DataError, UnsupportedModelError
from ..io import ASSETS, file_hash

DEFAULT_CALIB = ASSETS / "data" / "calib.txt"  # a slice of the reference corpus' train split


class _Stop(Exception):
    """Raised by the hook on the first layer once its inputs are captured."""


def calibration_tokens(tok, source: str | Path | torch.Tensor | None = None, *, samples: int = 128,
                       seq_len: int = 512, seed: int = 0) -> tuple[torch.Tensor, str]:
    """`samples` sequences of `seq_len` tokens from random offsets of a text, and the data's hash.

    Args:
        source: a text file (default: the embedded calibration text), or a (N, L) tensor of token ids.
    """
    if isinstance(source, torch.Tensor):
        if source.ndim != 2 or source.numel() == 0:
            raise DataError("calibration tokens must be a non-empty (samples, length) tensor",
                            "pass token ids of shape (N, L) or a text file")
        return source.long(), "tensor:" + str(tuple(source.shape))
    path = Path(source).expanduser() if source else DEFAULT_CALIB
    if not path.is_file():
        raise DataError(f"calibration text '{path}' does not exist", "pass an existing text file with --calib")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"calibration text '{path}' is empty", "pass a file with text from the model's domain")
    ids = _token_ids(tok, text)
    if ids.numel() < seq_len + 1:
        raise DataError(f"calibration text '{path}' has {ids.numel()} tokens, fewer than one sequence of {seq_len}",
                        "pass a longer text or a smaller --calib-len")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()]), file_hash(path)


def _token_ids(tok, text: str, chunk_chars: int = 1 << 16) -> torch.Tensor:
    """Token ids of `text`, tokenized in chunks cut after a newline: a fast tokenizer's encoding of a
    whole file (offsets, token strings) takes ~150 bytes per character at its peak."""
    parts, start = [], 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        parts.append(torch.tensor(tok(text[start:end], add_special_tokens=False, verbose=False)["input_ids"],
                                  dtype=torch.long))
        start = end
    return torch.cat(parts)


def decoder_layers(model) -> nn.ModuleList:
    """The model's stack of decoder layers (`model.model.layers` in the supported families)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(f"{type(model).__name__} has no model.layers stack",
                                    "use a Llama/Qwen/Mistral/Mixtral-family causal LM")
    return layers


def linear_layers(module: nn.Module) -> dict[str, nn.Linear]:
    """The nn.Linear modules inside a decoder layer, by their name relative to it (router gates excluded)."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, nn.Linear) and not name.endswith("mlp.gate")}


@torch.no_grad()
def first_layer_inputs(model, tokens: torch.Tensor, batch_size: int = 8,
                       store_dtype: torch.dtype | None = None) -> tuple[list[torch.Tensor], dict]:
    """Run the model up to its first decoder layer for every batch.

    Returns the hidden states per batch (each (B, L, hidden), on the model's device, in `store_dtype`
    (default: the model's)) and the keyword arguments the layer was called with (rotary embeddings,
    masks), shared by all batches of one shape. The batches are views of one buffer, allocated once:
    thousands of separate batch-sized tensors fragment the heap, which cost ~25 MB of peak RSS on
    the reference `small`.
    """
    layers = decoder_layers(model)
    dev = next(model.parameters()).device
    # Only whole batches, so the captured kwargs fit every one (a smaller set is one batch).
    batches = list(tokens.split(batch_size))
    batches = batches[: max(len(tokens) // batch_size, 1)]
    hiddens: list[torch.Tensor] = []
    kwargs: dict = {}

    def catch(_module, args, kw):
        h = args[0] if args else kw.pop("hidden_states")
        if not hiddens:
            buffer = h.new_empty((len(batches) * len(h), *h.shape[1:]), dtype=store_dtype or h.dtype)
            hiddens.extend(buffer.split(len(h)))
        hiddens[catch.seen].copy_(h)
        catch.seen += 1
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    catch.seen = 0
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(dev), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    return hiddens, kwargs


def copy_inputs(hiddens: list[torch.Tensor]) -> list[torch.Tensor]:
    """An independent copy of held batches, again as views of one buffer."""
    return list(torch.cat(hiddens).split(len(hiddens[0])))


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc only; elsewhere a no-op). A walk frees and allocates
    multi-MB activations per batch; glibc keeps the freed ones in fragmented arenas, which doubled the
    peak RSS of GPTQ calibration on the reference model."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_MMAP_THRESHOLD_MAX = 32 << 20  # where glibc's own sliding threshold ends up once large blocks were freed


@contextlib.contextmanager
def large_blocks_returned(threshold: int = 256 << 10) -> Iterator[None]:
    """While active, every heap block of `threshold` bytes or more is its own mapping, handed back to
    the OS when freed (glibc only; elsewhere nothing changes). Between malloc_trim calls glibc
    otherwise keeps freed activations, and how much of them depends on thread timing: the peak RSS of
    GPTQ calibration on the reference `small` varied from 107 to 122 MB over the loaded model, and is
    94 MB with this. It costs ~20% more time (page faults on each new block). On exit the threshold is
    set where glibc's sliding one settles, so later prefills keep reusing heap blocks."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)


def _layer_dtype(layer: nn.Module) -> torch.dtype:
    return next((p.dtype for p in layer.parameters() if p.is_floating_point()), torch.float32)


@torch.no_grad()
def run_layer(layer: nn.Module, hiddens: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    """The layer's outputs for every held batch (in the dtype the batches are held in)."""
    dtype = _layer_dtype(layer)
    outs = []
    for h in hiddens:
        out = layer(h.to(dtype), **kwargs)
        outs.append((out[0] if isinstance(out, tuple) else out).to(h.dtype))
        del out
        release_freed_memory()
    return outs


@torch.no_grad()
def advance_(layer: nn.Module, hiddens: list[torch.Tensor], kwargs: dict) -> None:
    """Overwrite each held batch, in place, with the layer's output for it, one batch at a time, so
    that a layer's inputs and outputs are never held whole at once."""
    dtype = _layer_dtype(layer)
    for h in hiddens:
        out = layer(h.to(dtype), **kwargs)
        h.copy_(out[0] if isinstance(out, tuple) else out)
        del out
        release_freed_memory()


def walk_layers(model, tokens: torch.Tensor, batch_size: int = 8,
                store_dtype: torch.dtype | None = None) -> Iterator[tuple[int, nn.Module, list, dict]]:
    """Yield (index, layer, inputs, kwargs) layer by layer; after the caller's work on a layer the
    walk replaces the inputs with that layer's outputs, the next layer's inputs.

    store_dtype: hold the inputs in this dtype (e.g. bf16 halves the largest buffer of calibration);
    each batch is computed in the layer's dtype.
    """
    with large_blocks_returned():
        hiddens, kwargs = first_layer_inputs(model, tokens, batch_size, store_dtype)
        for i, layer in enumerate(decoder_layers(model)):
            yield i, layer, hiddens, kwargs
            advance_(layer, hiddens, kwargs)
