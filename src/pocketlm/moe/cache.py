"""The expert cache: which experts are resident under a byte budget, loading the rest from the store.

- Eviction: LRU (least recently used) or LFU (least often used, ties by recency), among experts the
  running layer does not still need.
- Prefetch: `prefetch(layer, scores, experts)` loads in a background thread while the caller
  computes (the read releases the GIL), into free room or room taken from the same layer's less
  likely residents; a later `fetch` of an expert still loading waits for it.
- Memory: an evicted expert's buffer (one slab per expert) is kept for the next load of that size,
  so resident + spare buffers never exceed the budget and the allocator never sees the churn (freed
  and re-allocated blocks would otherwise pile up in glibc's arenas: 2.5x the budget when measured).
- Counters: hits (resident when its layer asked), prefetch hits (brought in by a prefetch), misses
  (read on demand), bytes loaded, seconds the decoding thread stalled waiting for loads.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch

from ..errors import ConfigError
from .experts import Expert
from .store import ExpertStore

Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheStats:
    requests: int = 0
    hits: int = 0
    prefetch_hits: int = 0
    misses: int = 0
    loads: int = 0
    prefetched: int = 0
    bytes_loaded: int = 0
    stall_s: float = 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "hit_rate": self.hits / self.requests if self.requests else None,
                "prefetch_accuracy": self.prefetch_hits / self.prefetched if self.prefetched else None}


class ExpertCache:
    """Resident experts of one model under `budget_bytes` (of their in-memory form)."""

    def __init__(self, store: ExpertStore, budget_bytes: int, policy: str = "lfu", prefetch: bool = False):
        if policy not in ("lru", "lfu"):
            raise ConfigError(f"unknown eviction policy '{policy}'", "use lru or lfu")
        self.store, self.budget, self.policy = store, int(budget_bytes), policy
        self.sizes = store.sizes()
        if self.budget < max(self.sizes.values()):
            raise ConfigError(f"expert memory budget of {self.budget / 2**20:.2f} MB holds no expert "
                              f"(the largest needs {max(self.sizes.values()) / 2**20:.2f} MB)",
                              "raise --expert-memory-mb or --resident-experts")
        self.resident: collections.OrderedDict[Key, Expert] = collections.OrderedDict()  # oldest use first
        self.loading: dict[Key, Future] = {}
        self.used = 0  # bytes of resident and loading experts
        self.spare: dict[int, list] = collections.defaultdict(list)  # slab size → evicted slabs to reuse
        self.spare_bytes = 0
        self.uses: collections.Counter[Key] = collections.Counter()
        self.fresh: set[Key] = set()  # prefetched for a layer that has not run since
        self.keep: set[Key] = set()  # the running layer's experts still to compute
        self.stats = CacheStats()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pocketlm-prefetch") if prefetch else None

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    def warm(self) -> None:
        """Load experts in order until the budget is full (all of them when it holds them all)."""
        for key, size in self.sizes.items():
            if self.used + size > self.budget:
                break
            with self._lock:
                if key in self.resident or key in self.loading:
                    continue
                slab = self._reserve(key, strict=True)
            self._landed(key, self.store.read(*key, slab))
        self.stats = CacheStats()

    # ---- the decoding thread ---------------------------------------------------------------------
    def begin(self, layer: int, experts: list[int]) -> None:
        """The layer will compute these experts: count hits and keep them resident until fetched."""
        with self._lock:
            for e in experts:
                key = (layer, e)
                self.stats.requests += 1
                if key in self.resident or key in self.loading:
                    self.stats.hits += 1
                    if key in self.fresh:
                        self.stats.prefetch_hits += 1
                else:
                    self.stats.misses += 1
                self.fresh.discard(key)
                self.uses[key] += 1
                if key in self.resident:
                    self.resident.move_to_end(key)
            self.keep = {(layer, e) for e in experts}
            self.fresh = {k for k in self.fresh if k[0] != layer}  # this layer's guesses are settled

    def ready(self, layer: int, experts: list[int]) -> list[int]:
        """Those of `experts` resident now (compute them first, while the others load)."""
        with self._lock:
            return [e for e in experts if (layer, e) in self.resident]

    def fetch(self, layer: int, expert: int) -> Expert:
        """The expert's weights, loading them now (or waiting for their prefetch) if needed; the layer
        is done with it once it returns, so it may be evicted from then on."""
        key = (layer, expert)
        with self._lock:
            ex = self.resident.get(key)
            pending = self.loading.get(key)
            self.keep.discard(key)
        if ex is not None:
            return ex
        t0 = time.perf_counter()
        if pending is not None:
            ex = pending.result()
        else:
            with self._lock:
                slab = self._reserve(key, strict=True)
            ex = self.store.read(*key, slab)
            self._landed(key, ex)
        self.stats.stall_s += time.perf_counter() - t0
        return ex

    def prefetch(self, layer: int, scores: list[float], experts: list[int]) -> None:
        """Start loading `experts` (the likely ones) of `layer` in the background. `scores` are the
        guessed router probabilities of all the layer's experts. A prefetch uses free room, or replaces
        a resident expert of the same layer that the guess rates lower; it never evicts other layers'
        experts (those are the cache policy's to choose) nor the running layer's."""
        if self._pool is None:
            return
        with self._lock:
            for e in experts:
                key = (layer, e)
                if key in self.resident:
                    self.resident.move_to_end(key)  # about to be used: not the next to go
                    continue
                if key in self.loading:
                    continue
                size = self.sizes[key]
                while self.used + size > self.budget:  # replace the guess's least likely of this layer
                    same = [k for k in self.resident if k[0] == layer and k not in self.keep and
                            scores[k[1]] < scores[e] and k[1] not in experts]
                    if not same:
                        break
                    self._evict(min(same, key=lambda k: scores[k[1]]))
                if self.used + size > self.budget:
                    continue
                slab = self._reserve(key, strict=False)
                self.stats.prefetched += 1
                self.loading[key] = self._pool.submit(self._load_in_background, key, slab)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ---- internals (callers hold the lock unless noted) ------------------------------------------
    def _load_in_background(self, key: Key, slab) -> Expert:  # worker thread, lock not held
        ex = self.store.read(*key, slab)
        self._landed(key, ex, prefetched=True)
        return ex

    def _landed(self, key: Key, ex: Expert, prefetched: bool = False) -> None:  # lock not held
        with self._lock:
            self.stats.loads += 1
            self.stats.bytes_loaded += self.sizes[key]
            self.resident[key] = ex
            self.loading.pop(key, None)
            if prefetched:
                self.fresh.add(key)

    def _reserve(self, key: Key, strict: bool):
        """Make room for `key` and return the slab to read it into (a spare one of its size if any).
        Counts it as used from now on."""
        size = self.sizes[key]
        self._make_room(size, strict)
        self.used += size
        spare = self.spare[size]
        if spare:
            self.spare_bytes -= size
            return spare.pop()
        while self.used + self.spare_bytes > self.budget:  # spare slabs of other sizes go back to the OS
            other = next(s for s, slabs in self.spare.items() if slabs)
            self.spare[other].pop()
            self.spare_bytes -= other
        return torch.empty(size, dtype=torch.uint8)

    def _evict(self, key: Key) -> None:
        ex = self.resident.pop(key)
        size = self.sizes[key]
        self.used -= size
        self.fresh.discard(key)
        if ex.slab is not None:
            self.spare[size].append(ex.slab)
            self.spare_bytes += size

    def _make_room(self, size: int, strict: bool) -> None:
        """Evict until `size` more bytes fit. Experts the running layer still needs go only when an
        on-demand load finds nothing else; prefetches in flight are waited for, not cancelled."""
        while self.used + size > self.budget:
            victim = self._victim(spare_kept=True) or (self._victim(spare_kept=False) if strict else None)
            if victim is not None:
                self._evict(victim)
                continue
            if not self.loading:
                raise RuntimeError("expert cache: no room and nothing to evict")  # budget >= largest expert
            pending = next(iter(self.loading.values()))
            self._lock.release()
            try:
                pending.result()
            finally:
                self._lock.acquire()

    def _victim(self, spare_kept: bool) -> Key | None:
        """By the policy, among resident experts; on the first try sparing the running layer's and
        prefetched ones not used yet (LFU would pick those first: they have no uses)."""
        candidates = (k for k in self.resident if not (spare_kept and (k in self.keep or k in self.fresh)))
        if self.policy == "lru":
            return next(candidates, None)
        best, best_uses = None, None
        for k in candidates:  # oldest first, so ties go to the least recent
            if best_uses is None or self.uses[k] < best_uses:
                best, best_uses = k, self.uses[k]
        return best
