"""Slots for continuous batching: N rows of one static KV cache, each at its own length.

Row r's token at slot s sits at rope position s (no padding), so a request joins by prefilling its own
row, leaves by handing its row to the last running request, and rolls back by lowering its length.
The running rows are always rows 0..active-1, so one decode step is one batched call over a view.
"""
from __future__ import annotations

import torch

from ..runtime.generate import Generator


class SlotBatch:
    """`n_slots` rows of `ctx` tokens each over `gen`'s decoder (eager steps, or `gen`'s native step)."""

    def __init__(self, gen: Generator, n_slots: int, ctx: int):
        self.gen, self.n_slots, self.ctx = gen, n_slots, ctx
        self.cache = gen.decoder.new_cache(n_slots, ctx)
        self.lengths = [0] * n_slots  # tokens in each row's cache
        self.active = 0

    def kv_bytes(self) -> int:
        return self.cache.nbytes()

    @torch.inference_mode()
    def prefill(self, row: int, ids: list[int], capture: list | None = None) -> torch.Tensor:
        """Fill `row` with the prompt `ids` (replacing what it held); the logits (vocab,) of the next token.
        capture: receives each layer's hidden state at the prompt's end (the router's features)."""
        dev, P = self.gen.decoder.device, len(ids)
        view = self.cache.rows(row, row + 1)
        positions = torch.arange(P, device=dev)
        logits = self.gen.decoder(torch.tensor([ids], device=dev), positions[None], positions, view, None, P, capture)
        self.lengths[row] = P
        return logits[0]

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token to each running row (rows 0..active-1); the logits (active, vocab) that follow."""
        A, dev = self.active, self.gen.decoder.device
        lengths = torch.tensor(self.lengths[:A], device=dev)
        ids, rows = torch.tensor(tokens, device=dev)[:, None], self.cache.rows(0, A)
        if self.gen.native is not None:  # each row attends up to its own slot
            logits = self.gen.native(ids, lengths[:, None], lengths[:, None], rows, None)
        else:
            kv_len = int(lengths.max()) + 1
            mask = (torch.arange(kv_len, device=dev)[None] <= lengths[:, None])[:, None, None]  # (A, 1, 1, kv)
            logits = self.gen.decoder(ids, lengths[:, None], lengths[:, None], rows, mask, kv_len)
        for r in range(A):
            self.lengths[r] += 1
        return logits

    def forget(self, row: int, n: int) -> None:
        """Drop the last n tokens of `row` (their slots are written over next)."""
        self.lengths[row] -= n

    def release(self, row: int) -> int | None:
        """Free `row`; the last running row moves into it. Returns the moved row's old index (or None)."""
        last = self.active - 1
        self.active -= 1
        if row == last:
            return None
        self.cache.copy_row(last, row, self.lengths[last])
        self.lengths[row] = self.lengths[last]
        return last
