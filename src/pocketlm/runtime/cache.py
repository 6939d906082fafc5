"""Static KV cache: one pre-allocated (B, n_kv_heads, max_len, head_dim) pair per layer."""
from __future__ import annotations

import torch


class StaticCache:
    """Keys and values for `batch` rows and `max_len` slots, allocated once.

    Slots are shared by all rows (row r's token at slot s sits at rope position s − pad[r]); `valid`
    marks which slots hold real tokens, so left padding never gets attended to.
    """

    def __init__(self, kv_shapes: list[tuple[int, int]], batch: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        # kv_shapes: per layer (n_kv_heads, head_dim); pruned models may differ per layer
        self.keys = [torch.zeros(batch, h, max_len, d, dtype=dtype, device=device) for h, d in kv_shapes]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.batch, self.max_len = batch, max_len
        self.length = 0  # slots filled so far

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (B, n_kv, T, hd) at `slots`: (T,) shared by all rows, or (B, T) one set per row
        (continuous batching, where every row sits at its own length)."""
        if slots.dim() == 2:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            self.keys[layer][rows, :, slots] = k.transpose(1, 2)  # indexed as (B, T, n_kv, hd)
            self.values[layer][rows, :, slots] = v.transpose(1, 2)
            return
        self.keys[layer][:, :, slots] = k  # index_put_: compiled graphs update it in place
        self.values[layer][:, :, slots] = v

    def rows(self, start: int, stop: int) -> "StaticCache":
        """Rows start..stop-1 as a cache of their own that shares this one's memory (writes go through)."""
        view = object.__new__(StaticCache)
        view.keys = [k[start:stop] for k in self.keys]
        view.values = [v[start:stop] for v in self.values]
        view.valid = self.valid[start:stop]
        view.batch, view.max_len, view.length = stop - start, self.max_len, self.length
        return view

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` slots of row `src` into row `dst`."""
        for t in (*self.keys, *self.values):
            t[dst, :, :length] = t[src, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values])
