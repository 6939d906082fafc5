"""The expert store: every expert of a model in one safetensors file on disk, read one expert at a time.

Loading an expert is a positioned read (`preadv`) of its tensors straight into new tensors: no
memory map stays open, so the process holds only the experts the cache keeps (pages of a mapped
file would count against the process and be dropped by the OS, not by the budget). The file is a
plain safetensors file (any safetensors reader opens it) holding experts exactly as they compute:
float ones in the model's dtype, quantized ones in the CPU kernels' layout. It is a machine-local
cache written from the model (`ExpertStore.write`).
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from ..errors import CorruptModelError
from ..io import atomic_write_path
from .experts import Expert

FILE = "experts.safetensors"
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I8": torch.int8,
           "U8": torch.uint8, "I32": torch.int32}


def _key(layer: int, expert: int, name: str) -> str:
    return f"layers.{layer}.experts.{expert}.{name}"


class ExpertStore:
    """Read side of a store directory. `layout[layer][expert]` = (bits, group_size).

    page_cache False drops each expert's pages from the OS page cache after reading it, so every load
    is a disk read: what a device whose RAM cannot also cache the store sees (and what prefetch hides)."""

    def __init__(self, path: str | os.PathLike, page_cache: bool = True):
        self.path, self.page_cache, self._fd = Path(path), page_cache, -1
        file = self.path / FILE
        try:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > os.fstat(f.fileno()).st_size:
                    raise ValueError("header length past the end of the file")
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError) as e:
            raise CorruptModelError(f"expert store '{file}' cannot be read ({e.__class__.__name__})",
                                    "delete it; the MoE runtime writes a new one from the model") from None
        try:
            meta = json.loads(header.pop("__metadata__")["pocketlm"])
        except (KeyError, TypeError, ValueError):
            raise CorruptModelError(f"'{file}' is not a pocketlm expert store (no layout in its metadata)",
                                    "delete it; the MoE runtime writes a new one from the model") from None
        self.layout: list[list[tuple[int | None, int | None]]] = [[tuple(e) for e in layer] for layer in meta["layout"]]
        base = 8 + n
        self.index = {k: (_DTYPES[v["dtype"]], v["shape"], base + v["data_offsets"][0], base + v["data_offsets"][1])
                      for k, v in header.items()}
        self._parts: dict[tuple[int, int], list[tuple[str, tuple]]] = {}  # (layer, expert) → [(name, index entry)]
        for k, entry in self.index.items():
            _, layer, _, expert, name = k.split(".", 4)
            self._parts.setdefault((int(layer), int(expert)), []).append((name, entry))
        for parts in self._parts.values():  # widest elements first: every view in a slab stays aligned
            parts.sort(key=lambda p: -p[1][0].itemsize)
        self._fd = os.open(file, os.O_RDONLY)

    @staticmethod
    def write(path: str | os.PathLike, experts: list[list[Expert]], page_cache: bool = True) -> "ExpertStore":
        """Write every expert (experts[layer][expert]) to `path`/experts.safetensors, atomically."""
        from safetensors.torch import save_file
        tensors = {_key(i, e, name): t.detach().contiguous()
                   for i, layer in enumerate(experts) for e, ex in enumerate(layer) for name, t in ex.tensors.items()}
        meta = {"layout": [[(ex.bits, ex.group_size) for ex in layer] for layer in experts]}
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with atomic_write_path(path / FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"pocketlm": json.dumps(meta)})
        return ExpertStore(path, page_cache)

    @property
    def n_layers(self) -> int:
        return len(self.layout)

    def read(self, layer: int, expert: int, slab: torch.Tensor | None = None) -> Expert:
        """Load one expert from disk into `slab` (uint8, `loaded_bytes` long; new when None) and return
        it as views of the slab. Reads only, no tensor math: a prefetch thread must not start a second
        pool of compute threads beside the decoding one."""
        bits, group = self.layout[layer][expert]
        slab = torch.empty(self.loaded_bytes(layer, expert), dtype=torch.uint8) if slab is None else slab
        tensors, at = {}, 0
        for name, (dtype, shape, start, end) in self._parts[(layer, expert)]:
            n = end - start
            if os.preadv(self._fd, [slab[at:at + n].numpy()], start) != n:
                raise CorruptModelError(f"expert store '{self.path / FILE}' is truncated",
                                        "delete it; the MoE runtime writes a new one from the model")
            tensors[name] = slab[at:at + n].view(dtype).view(shape)
            at += n
            if not self.page_cache:  # the next read of it goes to the disk, as when RAM cannot hold the store
                os.posix_fadvise(self._fd, start, n, os.POSIX_FADV_DONTNEED)
        return Expert(tensors, bits, group, slab)

    def sizes(self) -> dict[tuple[int, int], int]:
        """(layer, expert) → bytes of its slab."""
        return {key: self.loaded_bytes(*key) for key in self._parts}

    def loaded_bytes(self, layer: int, expert: int) -> int:
        """Bytes of one expert's slab."""
        return sum(end - start for _, (_, _, start, end) in self._parts[(layer, expert)])

    def stored_bytes(self, layer: int | None = None) -> int:
        """Bytes of the experts on disk (of one layer, or all)."""
        prefix = f"layers.{layer}." if layer is not None else "layers."
        return sum(end - start for k, (_, _, start, end) in self.index.items() if k.startswith(prefix))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()
