"""Format warm-up before RL: the choosing prompt learns to answer like either switched mode.

A model trained only with `/think` / `/no_think` switches may answer a prompt that ends otherwise
poorly (the reference reasoner, with no switch: 23% on arithmetic, against 98% slow and 76% fast).
Before RL, each warm-up item gets a mode at random (half each) and the model's own greedy answer in
that switched mode; that answer becomes the target for the choosing prompt (self-distillation). With
warmup_correct_only, answers the item's checker rejects are dropped (rejection sampling, as
distillation data is filtered): the model is not taught its own mistakes, and since the mode was drawn
at random the kept targets lean to fast mode only where fast answers are right; *when* to think is
otherwise left to RL. With replay the same answers are trained under their switched prompts too, so
the forced modes do not drift. This is the first of Pangu Embedded's two stages
(distillation, then RL) in its smallest form.
"""
from __future__ import annotations

import random
import time
from typing import Sequence

import torch

from ..errors import DataError
from ..progress import progress_bar
from ..runtime.choice import ModeChoice
from ..runtime.dual import DualSystem
from ..runtime.generate import Generator
from .config import RLConfig
from .grpo import pack, token_logprobs
from .rewards import Completion, correctness


def warmup_targets(model, tok, items: Sequence[dict], cfg: RLConfig, show_progress: bool = True
                   ) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """(prompts, completions, modes): choosing prompts and the model's own switched-mode answers (with
    replay, also those answers under their own switched prompts)."""
    choice = ModeChoice(tok, cfg.switch)
    seed, max_tokens = cfg.seed, cfg.max_tokens
    dual = DualSystem(Generator(model, tok), mode="fast", fast_tokens=max_tokens, slow_tokens=max_tokens)
    rng = random.Random(seed)
    modes = [rng.choice(("fast", "slow")) for _ in items]
    prompts, comps, kept = [], [], []
    for mode in ("fast", "slow"):
        idx = [i for i, m in enumerate(modes) if m == mode]
        for start in progress_bar(range(0, len(idx), 64), f"warm-up {mode} answers", show=show_progress):
            part = idx[start:start + 64]
            rows = dual.decode([dual.prompt(items[i]["question"], mode) for i in part], mode)
            for i, row in zip(part, rows):
                toks = list(row.tokens) + ([row.stop_token] if row.finish == "stop" else [])
                if cfg.warmup_correct_only and not _correct(tok, toks, items[i]):
                    continue
                if cfg.replay:
                    prompts.append(dual.prompt(items[i]["question"], mode))
                    comps.append(list(toks))
                    kept.append("replay")
                if mode == "fast":
                    toks = choice.fast_rest + toks
                elif toks[:len(choice.prefix)] == choice.prefix:
                    toks = toks[len(choice.prefix):]
                else:  # the slow answer did not open its think block as expected: not a usable target
                    continue
                prompts.append(choice.prompt(items[i]["question"]))
                comps.append(toks)
                kept.append(mode)
    return prompts, comps, kept


def _correct(tok, toks: list[int], item: dict) -> bool:
    """The reward's own correctness source on a warm-up answer."""
    return correctness("", Completion(tok.decode(toks, skip_special_tokens=False), toks, True, len(toks)), item) == 1.0


def warmup(model, tok, items: Sequence[dict], cfg: RLConfig, show_progress: bool = True) -> dict:
    """Teach the unswitched prompt (see the module doc); the model is trained in place. Returns stats."""
    t0 = time.perf_counter()
    model.eval()
    prompts, comps, modes = warmup_targets(model, tok, items, cfg, show_progress)
    if not prompts:
        raise DataError(f"the warm-up kept none of {len(items)} answers: the model answers none right",
                        "turn warmup_correct_only off (--warmup-all), use more warm-up items, "
                        "or start from a model that solves some")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr, weight_decay=0.0)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    rng = random.Random(cfg.seed + 1)
    batches = []
    for _ in range(cfg.warmup_epochs):  # each epoch in its own shuffled order
        order = rng.sample(range(len(prompts)), len(prompts))
        batches += [order[i:i + cfg.micro_batch] for i in range(0, len(order), cfg.micro_batch)]
    total = len(batches)
    model.train()
    losses = []
    for n, batch in enumerate(progress_bar(batches, "warm-up training", show=show_progress)):
        ids, attn, target = pack([prompts[i] for i in batch], [comps[i] for i in batch], pad)
        lr = cfg.warmup_lr * min(1.0, (n + 1) / max(1, total // 10)) * (1 - n / total) ** 0.5
        for g in opt.param_groups:
            g["lr"] = lr
        loss = -(token_logprobs(model, ids, attn) * target).sum() / target.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    own = [m for m in modes if m != "replay"]
    return {"items": len(items), "kept": len(own), "correct_only": cfg.warmup_correct_only,
            "sequences": len(prompts), "replay": cfg.replay,
            "think_share": sum(m == "slow" for m in own) / max(1, len(own)),
            "epochs": cfg.warmup_epochs, "steps": total, "final_loss": sum(tail) / len(tail),
            "wall_s": time.perf_counter() - t0}
