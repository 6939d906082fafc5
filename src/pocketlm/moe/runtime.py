"""offload_experts: move an MoE model's experts into a store on disk and run them through a cache.

    rt = offload_experts(model, resident=0.25)      # or expert_memory_mb=..., bits=plan, routing=...
    Generator(model, tok).generate("...")           # the model runs as before, experts loaded on demand
    rt.stats()                                      # hit rate, bytes loaded, stall time, routing balance
    rt.close()

The model's fused expert tensors are dropped once the store is written, so only the cache's
budget of experts stays in memory.
"""
from __future__ import annotations

import gc
import math
import shutil
import sys
import tempfile
import weakref
from pathlib import Path

import torch

from ..errors import ConfigError, UnsupportedModelError
from .block import MoEBlock, Routing, moe_blocks
from .cache import ExpertCache
from .experts import Expert, quantize_expert
from .routing import routing_report
from .store import ExpertStore

PREFETCH_SWITCH_INTERVAL_S = 2e-4


def fused_experts(block) -> list[dict[str, torch.Tensor]]:
    """Each expert's gate_up (2I, H) and down (H, I) weights, views of the block's fused tensors."""
    ex = block.experts
    return [{"gate_up": ex.gate_up_proj[e].detach(), "down": ex.down_proj[e].detach()}
            for e in range(ex.gate_up_proj.shape[0])]


def require_moe(model) -> list:
    blocks = moe_blocks(model)
    if not blocks:
        raise UnsupportedModelError(f"{type(model).__name__} has no sparse mixture-of-experts layers",
                                    "pass an MoE model (Mixtral, Qwen2/3-MoE), or make one with `pocketlm moefy`")
    return blocks


def budget_bytes(sizes: dict, resident: float | int | None, expert_memory_mb: float | None) -> int:
    """The cache budget from a fraction of all experts (float in (0, 1]), a count (int; N times the mean
    expert) or megabytes."""
    total, n = sum(sizes.values()), len(sizes)
    if (resident is None) == (expert_memory_mb is None):
        raise ConfigError("give exactly one of resident experts and expert memory",
                          "pass --resident-experts N|FRACTION or --expert-memory-mb MB")
    if expert_memory_mb is not None:
        if expert_memory_mb <= 0:
            raise ConfigError(f"expert memory {expert_memory_mb} MB is not positive", "pass a size above 0")
        return int(expert_memory_mb * 2**20)
    if isinstance(resident, float):
        if not 0 < resident <= 1:
            raise ConfigError(f"resident share {resident} is outside (0, 1]", "pass e.g. 0.25, or a count")
        return math.ceil(total * resident)
    if not 1 <= resident <= n:
        raise ConfigError(f"resident experts {resident} is not between 1 and the model's {n}",
                          f"pass a count from 1 to {n}, or a share such as 0.25")
    return math.ceil(total * resident / n)


class MoERuntime:
    """The offloaded model's cache, store and MoE blocks; `close()` removes a temporary store."""

    def __init__(self, model, blocks: list[MoEBlock], cache: ExpertCache, store_dir: Path, temporary: bool):
        self.model, self.blocks, self.cache, self.store_dir = model, blocks, cache, store_dir
        self.config = None  # the MoEDeployConfig, when `moe.deploy.deploy` made it
        # A runtime that nobody closes (e.g. one `load` restored) still removes its temporary store.
        self._remove = weakref.finalize(self, shutil.rmtree, store_dir, True) if temporary else None
        self._switch = None
        if cache._pool is not None:
            # The prefetch thread needs the GIL for a moment after each read. At Python's default 5 ms
            # switch interval it waits for the decoding thread to give it up, which then waits for it
            # (in one test on `moe`: 0.65x of all-resident with prefetch at 5 ms, 0.9x at 0.2 ms).
            self._switch = sys.getswitchinterval()
            sys.setswitchinterval(min(self._switch, PREFETCH_SWITCH_INTERVAL_S))

    def stats(self) -> dict:
        c = self.cache
        return {**c.stats.to_dict(), "budget_bytes": c.budget, "expert_bytes_all": c.total_bytes,
                "resident_share": c.budget / c.total_bytes, "policy": c.policy, "prefetch": c._pool is not None,
                "expert_bytes_on_disk": c.store.stored_bytes(),
                "routing": routing_report([(b.counts.cpu(), b.tokens) for b in self.blocks])}

    def reset_stats(self) -> None:
        self.cache.stats = type(self.cache.stats)()
        for b in self.blocks:
            b.reset_counts()

    def close(self) -> None:
        if self._switch is not None:
            sys.setswitchinterval(self._switch)
            self._switch = None
        self.cache.close()
        self.cache.store.close()
        if self._remove is not None:
            self._remove()


@torch.no_grad()
def offload_experts(model, *, resident: float | int | None = None, expert_memory_mb: float | None = None,
                    policy: str = "lfu", prefetch: bool = False, routing: Routing = Routing(),
                    bits: list[list[int | None]] | None = None, group_size: int = 64,
                    store_dir: str | Path | None = None, page_cache: bool = True, warm: bool = True) -> MoERuntime:
    """Replace every sparse-MoE block of `model` (in place) by a MoEBlock over an expert cache.

    Args:
        resident / expert_memory_mb: the cache budget (see `budget_bytes`); exactly one.
        policy: lfu or lru. prefetch: load layer l+1's likely expert in a background thread while
            layer l computes (off by default: on a CPU whose cores all decode and a store in the page
            cache it cost more than it saved, see the README's MoE results).
        routing: static (the model's top-k) or dynamic top-k.
        bits: per layer, per expert None (float) or 8/4 (see `moe.bits.allocate_bits`), quantized here.
        store_dir: where the store is written (default: a temporary directory removed by `close`).
        page_cache: False makes every expert load a disk read (see ExpertStore).
        warm: load every expert up front when the budget holds them all (else they load on first use).
    """
    blocks = require_moe(model)
    if bits is not None and (len(bits) != len(blocks) or any(len(b) != len(fused_experts(blk))
                                                             for b, (_, _, blk) in zip(bits, blocks))):
        raise ConfigError("the bit-width plan does not match the model's experts",
                          "allocate it for this model with allocate_bits")
    experts = []
    for i, (_, _, block) in enumerate(blocks):
        weights = fused_experts(block)
        experts.append([Expert(w) if bits is None or bits[i][e] is None
                        else quantize_expert(w, bits[i][e], group_size) for e, w in enumerate(weights)])
    budget = budget_bytes({(i, e): ex.nbytes for i, layer in enumerate(experts) for e, ex in enumerate(layer)},
                          resident, expert_memory_mb)
    temporary = store_dir is None
    store_dir = Path(tempfile.mkdtemp(prefix="pocketlm-experts-")) if temporary else Path(store_dir)
    try:
        store = ExpertStore.write(store_dir, experts, page_cache)
        del experts
        cache = ExpertCache(store, budget, policy, prefetch)
    except BaseException:
        if temporary:
            shutil.rmtree(store_dir, ignore_errors=True)
        raise
    new = []
    for i, (layer, attr, block) in enumerate(blocks):
        moe = MoEBlock(block, i, cache, routing)
        setattr(layer, attr, moe)  # the fused experts go with the old block
        new.append(moe)
    if prefetch:
        for a, b in zip(new, new[1:]):
            a.next_router = b.router
    del blocks
    gc.collect()
    if warm and cache.budget >= cache.total_bytes:
        cache.warm()
    return MoERuntime(model, new, cache, store_dir, temporary)
