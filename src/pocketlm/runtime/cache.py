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
        """Store k, v (B, n_kv, T, hd) at `slots` (T,)."""
        self.keys[layer][:, :, slots] = k  # index_put_: compiled graphs update it in place
        self.values[layer][:, :, slots] = v

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values])
