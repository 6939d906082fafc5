"""Rollouts: groups of completions sampled from the policy, with the log-probabilities that made them.

A RolloutWorker holds its own copy of the policy (weights set by the scheduler, tagged with the
policy version) and samples `group_size` completions per prompt with the engine (temperature 1, no
repair: loops are the repetition reward's business). A share `explore` of each group has its
think/no-think decision forced, half each way, as AdaptThink's importance sampling does; the
behaviour log-probability of that decision is log 1/2 (forced no-think) or log 1/2 + the model's
log-probability among the other tokens (forced think), so the learner's importance weights correct
for it exactly.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from ..eval.quality import stop_token_ids
from ..runtime.choice import ModeChoice
from ..runtime.generate import Generator
from ..runtime.rows import Row, decode_rows
from ..runtime.sampling import SamplingConfig
from .config import RLConfig
from .rewards import Completion, score

HALF = math.log(0.5)


@dataclasses.dataclass
class Sample:
    tokens: list[int]          # generated ids (stop token included when it came)
    behaviour: list[float]     # log-probability of each token under the behaviour policy
    forced: str | None         # 'fast' / 'slow' when the decision was forced, else None
    thought: bool
    raw: dict                  # each reward source's raw value


@dataclasses.dataclass
class Group:
    item: dict
    prompt: list[int]
    samples: list[Sample]
    version: int               # policy version that sampled it
    rewards: list[float] | None = None  # combined rewards, set by the learner's reward


class RolloutWorker:
    """Samples groups for a list of items with its own copy of the policy."""

    def __init__(self, model, tok, cfg: RLConfig, threads: int | None = None):
        self.model, self.tok, self.cfg, self.threads = model, tok, cfg, threads
        self.gen = Generator(model, tok)
        self.choice = ModeChoice(tok, cfg.switch)
        self.stops = set(stop_token_ids(tok)) | self.gen.stop_tokens  # end of turn, too
        self.version = -1

    def set_weights(self, state: dict, version: int) -> None:
        if version != self.version:
            self.model.load_state_dict(state, strict=False)
            self.version = version

    def run(self, state, version: int, items: Sequence[dict], seed: int) -> list[Group]:
        """Set the weights (when newer) and roll out `items` (the scheduler's one call per job)."""
        if self.threads is not None:  # torch's thread count is per calling thread
            torch.set_num_threads(self.threads)
        self.set_weights(state, version)
        return self.rollout(items, seed)

    def rollout(self, items: Sequence[dict], seed: int) -> list[Group]:
        cfg, G = self.cfg, self.cfg.group_size
        forced_n = 2 * round(cfg.explore * G / 2)
        plan = ["fast"] * (forced_n // 2) + ["slow"] * (forced_n // 2) + [None] * (G - forced_n)
        prompts, rows, kinds = [], [], []
        for it in items:
            ids = self.choice.prompt(it["question"])
            for forced in plan:
                prompts.append(ids)
                kinds.append(forced)
                rows.append(_start(forced, self.choice.decision))
        final = None
        sampling = SamplingConfig(temperature=1.0, seed=seed)
        with torch.inference_mode():
            for final in decode_rows(self.gen, prompts, cfg.max_tokens, sampling, stops=self.stops,
                                      start=rows):
                pass
        groups = []
        for g, it in enumerate(items):
            samples = []
            for j in range(G):
                row, forced = final[g * G + j], kinds[g * G + j]
                tokens, lps = list(row.tokens), list(row.logprobs)
                if row.finish == "stop":
                    tokens.append(row.stop_token)
                    lps.append(row.stop_logprob)
                if forced == "fast":
                    lps[0] = HALF
                elif forced == "slow":
                    lps[0] += HALF
                comp = Completion(self.choice.text(tokens), tokens, row.finish == "stop", cfg.max_tokens)
                samples.append(Sample(tokens, lps, forced, self.choice.thought(tokens),
                                      score(it["question"], comp, it)))
            groups.append(Group(it, prompts[g * G], samples, self.version))
        return groups


def _start(forced: str | None, decision: int) -> Row:
    row = Row()
    if forced == "fast":
        row.queue = [decision]
    elif forced == "slow":
        row.ban, row.ban_left = {decision: float("inf")}, 1
    return row
