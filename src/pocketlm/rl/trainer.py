"""`train_rl`: format warm-up, then GRPO on rollouts from the scheduler; checkpoints, resume, metrics."""
from __future__ import annotations

import copy
import json
import os
import random
import time
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ConfigError
from ..io import atomic_write_path, check_output, load, resolve, save
from ..progress import progress_bar
from ..runtime.choice import ModeChoice
from ..runtime.dual import check_thinking_template
from .config import SOURCES, RLConfig
from .grpo import group_advantages, pack, policy_loss, token_logprobs
from .rewards import AdaptiveReward, checker_for
from .rollout import Group
from .scheduler import InProcess, Ray, Scheduler
from .warmup import warmup

CHECKPOINT = "rl_checkpoint.pt"
METRICS = "rl_metrics.jsonl"


def check_tasks(items: Sequence[dict]) -> None:
    """Every item has a checker for its kind (else a DataError naming the kind)."""
    for it in items:
        checker_for(it)


def train_rl(policy: str, items: Sequence[dict], cfg: RLConfig, out: str | os.PathLike, *,
             workdir: str | os.PathLike | None = None, resume: bool = False, overwrite: bool = False,
             ray_address: str | None = None, show_progress: bool = True, on_step=None) -> dict:
    """Train `policy` (a model name or directory) with GRPO on `items`; write the artifact to `out`.

    workdir: where checkpoints and per-step metrics go (with resume: continue from its checkpoint).
    on_step(metrics): called after every step (the CLI prints a line). Returns the run's summary; the
    artifact's pocketlm.json records it under `rl` (with mode_choice: True), and rl_metrics.jsonl in
    the artifact holds every step's metrics."""
    check_tasks(items)
    protect = resolve(policy).inputs
    out_path = check_output(out, overwrite, protect)
    work = Path(workdir) if workdir is not None else None
    ckpt = work / CHECKPOINT if work is not None else None
    if resume and (ckpt is None or not ckpt.is_file()):
        raise ConfigError("--resume needs a checkpoint", "pass the --workdir of an earlier run that saved one")
    model, tok = load(policy, show_progress=show_progress)
    check_thinking_template(tok)
    ModeChoice(tok, cfg.switch)  # refuses a template without a Qwen3-style thinking switch
    torch.manual_seed(cfg.seed)
    state = torch.load(ckpt, weights_only=False) if resume else None
    if state is not None:
        model.load_state_dict(state["model"])
        warm = state["warmup"]
    elif cfg.warmup_items:
        pool = random.Random(cfg.seed).sample(list(items), min(cfg.warmup_items, len(items)))
        warm = warmup(model, tok, pool, cfg, show_progress)
    else:
        warm = None
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
    if ref is not None and state is not None:
        ref.load_state_dict(state["ref"])
    concurrent = cfg.staleness > 0 and cfg.backend == "inprocess"
    threads = torch.get_num_threads()  # restored at the end
    if concurrent:  # learner and rollout threads each get their share of the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 2) - cfg.workers))
    backend = (Ray(policy, tok, cfg, address=ray_address) if cfg.backend == "ray"
               else InProcess(model, tok, cfg, threads=1 if concurrent else None))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    reward = AdaptiveReward(cfg)
    metrics: list[dict] = []
    start = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        reward.load_state(state["reward"])
        metrics, start = state["metrics"], state["step"]
    sched = Scheduler(backend, items, cfg, lambda g: [reward.combine(s.raw) for s in g.samples],
                      start_job=state["job_no"] if state else 0)
    backend.publish(_snapshot(model), start)
    t0 = time.perf_counter() - (metrics[-1]["wall_s"] if metrics else 0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    try:
        for step in progress_bar(range(start, cfg.steps), "RL steps", show=show_progress,
                                 total=cfg.steps - start):
            if cfg.time_limit_s is not None and time.perf_counter() - t0 >= cfg.time_limit_s:
                break
            groups = sched.next_batch(step)
            reward.observe([s.raw for g in groups for s in g.samples])
            for g in groups:  # combined with this step's normalization and weights
                g.rewards = [reward.combine(s.raw) for s in g.samples]
            t_learn = time.perf_counter()
            stats = update(model, ref, opt, groups, cfg, pad)
            t_learn = time.perf_counter() - t_learn
            row = _metrics(step, groups, reward, stats, sched, t_learn, time.perf_counter() - t0)
            reward.adapt([s for g in groups for s in g.samples])
            backend.publish(_snapshot(model), step + 1)
            metrics.append(row)
            if on_step is not None:
                on_step(row)
            if work is not None and ((step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps):
                _checkpoint(ckpt, model, ref, opt, reward, metrics, step + 1, sched.job_no, warm)
    finally:
        sched.close()
        torch.set_num_threads(threads)
    summary = {"config": cfg.to_dict(), "mode_choice": True, "switch": cfg.switch, "steps": len(metrics), "warmup": warm,
               "wall_s": time.perf_counter() - t0, "final": metrics[-1] if metrics else None,
               "dropped_stale": sched.dropped}
    model.eval()
    save(model, tok, out_path, recipe=[cfg.to_dict()], rl=summary, overwrite=overwrite,
         files={METRICS: "".join(json.dumps(m) + "\n" for m in metrics)})
    return {**summary, "metrics": metrics}


def update(model, ref, opt, groups: list[Group], cfg: RLConfig, pad: int) -> dict:
    """One optimizer step (per epoch) on a batch of groups; returns loss statistics."""
    adv = group_advantages(torch.tensor([g.rewards for g in groups], dtype=torch.float32))
    rows = [(g.prompt, s, adv[i, j].item()) for i, g in enumerate(groups) for j, s in enumerate(g.samples)]
    rows.sort(key=lambda r: len(r[0]) + len(r[1].tokens))  # similar lengths share a micro-batch: less padding
    chunks = [rows[i:i + cfg.micro_batch] for i in range(0, len(rows), cfg.micro_batch)]
    n_tokens = sum(len(r[1].tokens) for r in rows)
    packed = []
    for chunk in chunks:
        ids, attn, target = pack([r[0] for r in chunk], [r[1].tokens for r in chunk], pad)
        behaviour = torch.zeros(target.shape)
        for b, r in enumerate(chunk):
            behaviour[b, target[b]] = torch.tensor(r[1].behaviour, dtype=torch.float32)
        with torch.no_grad():
            ref_lp = token_logprobs(ref, ids, attn, cfg.temperature) if ref is not None else None
        packed.append([ids, attn, target, behaviour, torch.tensor([r[2] for r in chunk]), ref_lp, None])
    model.train()
    totals: dict[str, float] = {}
    for _ in range(cfg.epochs):
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for p in packed:
            ids, attn, target, behaviour, a, ref_lp, prox = p
            logp = token_logprobs(model, ids, attn, cfg.temperature)
            if prox is None:  # the policy before this batch's first update
                prox = p[6] = logp.detach()
            loss, st = policy_loss(logp, prox, behaviour, ref_lp, a, target, n_tokens, clip=cfg.clip,
                                   is_cap=cfg.is_cap, kl_coef=cfg.kl_coef)
            loss.backward()
            loss_sum += loss.item()
            for k, v in st.items():
                totals[k] = totals.get(k, 0.0) + v
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
    model.eval()
    per_token = {k: totals[k] / (n_tokens * cfg.epochs) for k in ("clipped", "is_weight", "is_truncated")}
    return {"loss": loss_sum, "pg": totals["pg"] / cfg.epochs, "kl": totals["kl"] / cfg.epochs,
            "grad_norm": grad_norm, **per_token}


def _metrics(step: int, groups: list[Group], reward: AdaptiveReward, stats: dict, sched: Scheduler,
             learn_s: float, wall_s: float) -> dict:
    samples = [s for g in groups for s in g.samples]
    n = len(samples)
    by_source = {}
    for name in SOURCES:
        vals = [s.raw[name] for s in samples if s.raw.get(name) is not None]
        by_source[name] = sum(vals) / len(vals) if vals else None
    return {"step": step, "wall_s": wall_s, "learn_s": learn_s, "rollout_wait_s": sched.wait_s,
            "reward": sum(r for g in groups for r in g.rewards) / n,
            "sources": by_source, "accuracy": by_source["correctness"],
            "tokens": sum(len(s.tokens) for s in samples) / n,
            "think_rate": sum(s.thought for s in samples) / n,
            "think_rate_free": _share([s.thought for s in samples if s.forced is None]),
            "mean_age": sum(step - g.version for g in groups) / len(groups),
            "zero_spread_groups": sum(max(g.rewards) - min(g.rewards) < 1e-9 for g in groups) / len(groups),
            "accuracy_own": _share([s.raw["correctness"] == 1 for s in samples if s.forced is None]),
            "accuracy_think": _share([s.raw["correctness"] == 1 for s in samples if s.forced == "slow"]),
            "dropped_stale": sched.dropped, "w_cost": reward.weights["cost"], "target": reward.target(), **stats}


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _snapshot(model) -> dict:
    """A copy of the weights for the rollout workers (the learner goes on changing its own)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _checkpoint(path: Path, model, ref, opt, reward: AdaptiveReward, metrics: list[dict], step: int,
                job_no: int, warm: dict | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write_path(path) as tmp:
        torch.save({"model": model.state_dict(), "ref": ref.state_dict() if ref is not None else None,
                    "optimizer": opt.state_dict(), "reward": reward.state(), "metrics": metrics,
                    "step": step, "job_no": job_no, "warmup": warm}, tmp)
    with atomic_write_path(path.parent / METRICS) as tmp:
        tmp.write_text("".join(json.dumps(m) + "\n" for m in metrics))
