"""The latency-tolerant scheduler: rollout workers and the learner run concurrently, within a staleness bound.

Each job (one worker, `prompts_per_step / workers` prompts) samples with the newest published weights
and its groups carry that policy version. Jobs are started while the groups queued or in flight are
fewer than `prompts_per_step * (s + 1)`, so rollouts run at most s learner steps ahead; groups older
than s versions when the learner takes them are dropped. s = 0 is synchronous GRPO: no job runs
while the learner updates. The queue serves the most informative groups first: highest spread of
reward within the group (a group whose completions all score alike has zero advantage), newest first
among equals.

Backends: InProcess (worker threads in this process, each with its own copy of the policy) and Ray
(each worker a Ray actor with one CPU, weights shipped through the object store).
"""
from __future__ import annotations

import concurrent.futures as cf
import copy
import functools
import heapq
import itertools
import random
import statistics
import time
from typing import Callable, Sequence

from .config import RLConfig
from .rollout import Group, RolloutWorker


class InProcess:
    """Rollout workers as threads of this process (their torch ops release the GIL)."""

    def __init__(self, policy, tok, cfg: RLConfig, threads: int | None = None):
        self.workers = [RolloutWorker(copy.deepcopy(policy), tok, cfg, threads) for _ in range(cfg.workers)]
        self.pool = cf.ThreadPoolExecutor(cfg.workers)
        self.weights = None

    def publish(self, state: dict, version: int) -> None:
        self.weights = (state, version)

    def submit(self, w: int, items: list[dict], seed: int) -> cf.Future:
        state, version = self.weights
        return self.pool.submit(self.workers[w].run, state, version, items, seed)

    def wait(self, jobs: Sequence) -> list:
        done, _ = cf.wait(jobs, return_when=cf.FIRST_COMPLETED)
        return list(done)

    def result(self, job) -> list[Group]:
        return job.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class Ray:
    """Rollout workers as Ray actors (one CPU each); connects to a running cluster or starts a local one."""

    def __init__(self, source: str, tok, cfg: RLConfig, address: str | None = None, num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            from ..errors import ConfigError
            raise ConfigError("the ray backend needs Ray", "pip install 'pocketlm[ray]', or use --backend inprocess") \
                from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        actor = ray.remote(num_cpus=1)(_RayWorker)
        self.workers = [actor.remote(source, cfg.to_dict()) for _ in range(cfg.workers)]
        self.ref = None

    def publish(self, state: dict, version: int) -> None:
        self.ref = (self.ray.put(state), version)

    def submit(self, w: int, items: list[dict], seed: int):
        ref, version = self.ref
        return self.workers[w].run.remote(ref, version, items, seed)

    def wait(self, jobs: Sequence) -> list:
        done, _ = self.ray.wait(list(jobs), num_returns=1)
        return done

    def result(self, job) -> list[Group]:
        return self.ray.get(job)

    def close(self) -> None:
        for w in self.workers:
            self.ray.kill(w)


class _RayWorker:
    """A RolloutWorker built inside the actor from the policy's source (weights come with each job)."""

    def __init__(self, source: str, cfg: dict):
        from ..config import config_from_dict
        from ..io import load
        model, tok = load(source, show_progress=False)
        self.worker = RolloutWorker(model, tok, config_from_dict(cfg, RLConfig), threads=1)

    def run(self, state, version: int, items: list[dict], seed: int) -> list[Group]:
        return self.worker.run(state, version, items, seed)


class Scheduler:
    """Feeds the learner batches of `prompts_per_step` groups, keeping workers busy within the bound."""

    def __init__(self, backend, items: Sequence[dict], cfg: RLConfig, reward: Callable[[Group], list[float]],
                 start_job: int = 0):
        self.backend, self.cfg, self.reward = backend, cfg, reward
        self.items = items
        self.job_no = start_job
        self.per_job = cfg.prompts_per_step // cfg.workers
        self.running: dict = {}                 # job handle -> worker index
        self.queue: list = []                   # heap of (-spread, -version, order, group)
        self.order = itertools.count()
        self.dropped = 0
        self.wait_s = 0.0

    def _prompts(self) -> list[dict]:
        """The next prompts, cycling through the items in a seeded order (resumable by job number)."""
        n = len(self.items)
        start = self.job_no * self.per_job
        return [self.items[_perm(k, n, self.cfg.seed)] for k in range(start, start + self.per_job)]

    def _fill(self) -> None:
        bound = self.cfg.prompts_per_step * (self.cfg.staleness + 1)
        busy = set(self.running.values())
        for w in range(self.cfg.workers):
            if w in busy or len(self.queue) + self.per_job * (len(self.running) + 1) > bound:
                continue
            job = self.backend.submit(w, self._prompts(), self.cfg.seed * 1_000_003 + self.job_no)
            self.running[job] = w
            self.job_no += 1

    def _collect(self, jobs) -> None:
        for job in jobs:
            self.running.pop(job)
            for g in self.backend.result(job):
                g.rewards = self.reward(g)
                spread = statistics.pstdev(g.rewards)
                heapq.heappush(self.queue, (-round(spread, 6), -g.version, next(self.order), g))

    def next_batch(self, version: int) -> list[Group]:
        """`prompts_per_step` groups no older than s versions (waits for rollouts as needed)."""
        while True:
            self._drop_stale(version)
            self._fill()
            if len(self.queue) >= self.cfg.prompts_per_step:
                batch = [heapq.heappop(self.queue)[3] for _ in range(self.cfg.prompts_per_step)]
                if self.cfg.staleness:  # the next rollouts start before the learner updates
                    self._fill()
                return batch
            t = time.perf_counter()
            self._collect(self.backend.wait(list(self.running)))
            self.wait_s += time.perf_counter() - t

    def _drop_stale(self, version: int) -> None:
        keep = [e for e in self.queue if version - e[3].version <= self.cfg.staleness]
        self.dropped += len(self.queue) - len(keep)
        if len(keep) != len(self.queue):
            self.queue = keep
            heapq.heapify(self.queue)

    def close(self) -> None:
        if self.running:
            self.backend.wait(list(self.running))
        self.backend.close()


def _perm(k: int, n: int, seed: int) -> int:
    """Item index of the k-th prompt: each pass over the items in its own seeded shuffle."""
    epoch, i = divmod(k, n)
    return _order(n, seed, epoch)[i]


@functools.lru_cache(maxsize=4)
def _order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return order
