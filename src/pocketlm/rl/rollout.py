"""Rollouts: groups of completions sampled from the policy, with the log-probabilities that made them.

A RolloutWorker holds its own copy of the policy (weights set by the scheduler, tagged with the
policy version) and samples `group_size` completions per prompt with the engine (at the config's
temperature, no repair: loops are the repetition reward's business). A share `explore` of each group
has its think/no-think decision forced, half each way, as AdaptThink's importance sampling does; the
behaviour log-probability of that decision is log 1/2 (forced no-think) or log 1/2 + the policy's
log-probability among the other tokens (forced think), so the learner's importance weights correct
for it exactly. Behaviour log-probabilities are those of the tempered policy, computed by the
learner's own function (`next_logprobs`) with the worker's weights, so that for a fresh sample
they equal the learner's up to float rounding (the importance weight is then 1).
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
from .grpo import next_logprobs, pack
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
        sampling = SamplingConfig(temperature=cfg.temperature, seed=seed)
        with torch.inference_mode():
            for final in decode_rows(self.gen, prompts, cfg.max_tokens, sampling, stops=self.stops,
                                      start=rows):
                pass
        completions = [list(r.tokens) + ([r.stop_token] if r.finish == "stop" else []) for r in final]
        behaviour = self.behaviour(prompts, completions, kinds)
        groups = []
        for g, it in enumerate(items):
            samples = []
            for j in range(G):
                row, forced = final[g * G + j], kinds[g * G + j]
                tokens, lps = completions[g * G + j], behaviour[g * G + j]
                comp = Completion(self.choice.text(tokens), tokens, row.finish == "stop", cfg.max_tokens)
                samples.append(Sample(tokens, lps, forced, self.choice.thought(tokens),
                                      score(it["question"], comp, it)))
            groups.append(Group(it, prompts[g * G], samples, self.version))
        return groups

    def behaviour(self, prompts: list[list[int]], completions: list[list[int]], kinds: list[str | None]
                  ) -> list[list[float]]:
        """Each completion's per-token log-probabilities under the tempered policy; a forced decision's
        first token as the module doc says."""
        out = []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        with torch.inference_mode():
            for b0 in range(0, len(prompts), self.cfg.micro_batch):
                ids, attn, target = pack(prompts[b0:b0 + self.cfg.micro_batch],
                                         completions[b0:b0 + self.cfg.micro_batch], pad)
                full = next_logprobs(self.model, ids, attn, self.cfg.temperature)
                lp = full.gather(2, ids[:, 1:, None])[..., 0]
                for b in range(ids.shape[0]):
                    lps = lp[b][target[b]].tolist()
                    forced = kinds[b0 + b]
                    if forced == "fast":
                        lps[0] = HALF
                    elif forced == "slow":  # sampled among the tokens other than the decision
                        first = len(prompts[b0 + b]) - 1
                        lps[0] += HALF - math.log1p(-math.exp(full[b, first, self.choice.decision].item()))
                    out.append(lps)
        return out


def _start(forced: str | None, decision: int) -> Row:
    row = Row()
    if forced == "fast":
        row.queue = [decision]
    elif forced == "slow":
        row.ban, row.ban_left = {decision: float("inf")}, 1
    return row
