"""The auto-mode router ("metacognition"): when may a chat model answer fast?

Two signals of the model itself, each usable alone or combined:
- a probe: logistic regression on the hidden states (every layer, last position) at the end of the
  fast-mode prompt, fit to predict whether the fast answer will be right; low → think (slow mode);
- confidence escalation: answer fast; if a token of the answer (its stop token included) has a
  probability under a threshold, answer again in slow mode. The fast answer stops at that token, so
  an escalation costs the tokens up to it.
Thresholds are chosen on a labelled dev set for a target accuracy (or a token budget), from the probe's
out-of-fold scores, so the dev items the probe was fit on do not flatter it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from ..errors import ConfigError, CorruptModelError, DataError
from ..eval.quality import extract_answer
from ..io import atomic_dir
from ..progress import progress_bar

POLICIES = ("probe", "confidence", "both")
L2_GRID = (1e-2, 1e-1, 1.0, 10.0)
CONF_GRID = 1000  # most confidence thresholds tried (see choose_thresholds)
ROUTER_FILE, WEIGHTS_FILE = "router.json", "probe.safetensors"


class Router:
    """A fitted probe and, per policy, the thresholds that auto mode applies."""

    def __init__(self, weight: torch.Tensor, bias: float, mean: torch.Tensor, std: torch.Tensor,
                 thresholds: dict[str, dict], model_hash: str | None = None, info: dict | None = None):
        self.weight, self.bias, self.mean, self.std = weight, bias, mean, std  # (layers·hidden,) each
        self.thresholds, self.model_hash, self.info = thresholds, model_hash, info or {}
        self.dev_runs: DevRuns | None = None

    def with_thresholds(self, thresholds: dict[str, dict]) -> "Router":
        """The same probe with other thresholds (e.g. from `choose_thresholds` for a token budget)."""
        other = Router(self.weight, self.bias, self.mean, self.std, thresholds, self.model_hash, self.info)
        other.dev_runs = self.dev_runs
        return other

    def p_fast(self, capture: list[torch.Tensor]) -> torch.Tensor:
        """Probability (B,) that the fast answer is right, from the captured per-layer states."""
        x = features(capture)
        if x.shape[1] != self.weight.numel():
            raise ConfigError(f"the router expects {self.weight.numel()} hidden features, the model gives "
                              f"{x.shape[1]}", "fit the router for this model with `pocketlm router fit`")
        return torch.sigmoid(((x - self.mean) / self.std) @ self.weight + self.bias)

    def probe_threshold(self, policy: str) -> float:
        """p_fast below this goes straight to slow mode (−inf: the policy does not use the probe)."""
        t = self.thresholds[policy].get("probe")
        return -math.inf if t is None else t

    def confidence_threshold(self, policy: str) -> float | None:
        return self.thresholds[policy].get("confidence")

    def check_model(self, model) -> None:
        """Refuse a router fit for another model (its weights' hash is stored with it)."""
        source = getattr(model, "pocketlm_source", None)
        mine = _model_hash(model)
        if self.model_hash and mine and mine != self.model_hash:
            name = getattr(source, "name", "this model")
            raise ConfigError(f"the router was fit for another model than {name}",
                              "fit one for this model with `pocketlm router fit`")

    def save(self, out: str | os.PathLike, *, overwrite: bool = False, protect: tuple[Path, ...] = ()) -> Path:
        """Write router.json and probe.safetensors into the directory `out` (atomically; `protect`:
        inputs, such as the model, that `out` must not be or contain)."""
        with atomic_dir(out, overwrite, protect) as tmp:
            save_file({"weight": self.weight.contiguous(), "mean": self.mean.contiguous(),
                       "std": self.std.contiguous()}, str(tmp / WEIGHTS_FILE))
            record = {"bias": self.bias, "thresholds": self.thresholds, "model_hash": self.model_hash, **self.info}
            (tmp / ROUTER_FILE).write_text(json.dumps(record, indent=1))
        return Path(out)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Router":
        path = Path(path)
        if not (path / ROUTER_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise DataError(f"'{path}' is not a router directory (no {ROUTER_FILE} and {WEIGHTS_FILE})",
                            "pass the output of `pocketlm router fit`")
        try:
            record = json.loads((path / ROUTER_FILE).read_text())
            tensors = load_file(str(path / WEIGHTS_FILE))
            thresholds = {p: record["thresholds"][p] for p in POLICIES}
            return cls(tensors["weight"], float(record["bias"]), tensors["mean"], tensors["std"], thresholds,
                       record.get("model_hash"), {k: v for k, v in record.items()
                                                  if k not in ("bias", "thresholds", "model_hash")})
        except (ValueError, KeyError, OSError) as e:
            raise CorruptModelError(f"router '{path}' cannot be read ({type(e).__name__}: {e})",
                                    "fit it again with `pocketlm router fit`") from None


def features(capture: list[torch.Tensor]) -> torch.Tensor:
    """Captured per-layer states (list of (B, hidden)) → (B, layers·hidden) float."""
    return torch.cat([c.float() for c in capture], dim=1)


def _model_hash(model) -> str | None:
    source = getattr(model, "pocketlm_source", None)
    if source is None:
        return None
    from ..io import content_hash
    return content_hash(source.path)


# ---- fitting ---------------------------------------------------------------------------------------

def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, steps: int = 200) -> tuple[torch.Tensor, float]:
    """L2-regularized logistic regression on standardized x (N, D), y (N,) in {0, 1}: (weight (D,), bias)."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y) + l2 * (w @ w) / 2
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), float(b.detach())


def out_of_fold(x: torch.Tensor, y: torch.Tensor, folds: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Probe scores of every item from a probe not fit on it, at the L2 strength with the best
    out-of-fold log-loss; returns (scores (N,), l2)."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    parts = order.chunk(folds)
    best = None
    for l2 in L2_GRID:
        scores = torch.empty(len(y))
        for part in parts:
            train = torch.ones(len(y), dtype=torch.bool)
            train[part] = False
            mean, std = _standardizer(x[train])
            w, b = fit_logistic((x[train] - mean) / std, y[train], l2)
            scores[part] = torch.sigmoid(((x[part] - mean) / std) @ w + b)
        loss = float(torch.nn.functional.binary_cross_entropy(scores.clamp(1e-6, 1 - 1e-6), y))
        if best is None or loss < best[0]:
            best = (loss, scores, l2)
    return best[1], best[2]


def _standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.std(0).clamp(min=1e-4)


@dataclasses.dataclass
class DevRuns:
    """Per dev item: the probe score and both modes' outcomes, enough to replay any policy offline."""

    p_fast: torch.Tensor       # (N,) out-of-fold probe scores
    confidence: torch.Tensor   # (N,) fast answer's min token probability, stop token included
    fast_ok: torch.Tensor      # (N,) bool
    fast_tokens: torch.Tensor  # (N,) float
    slow_ok: torch.Tensor
    slow_tokens: torch.Tensor
    fast_probs: torch.Tensor   # (N, L) each fast answer token's probability (stop excluded), padded with inf

    def replay(self, t_probe: float, t_conf: float | None) -> tuple[float, float]:
        """(accuracy, mean generated tokens) of auto with these thresholds (t_probe −inf: no probe;
        t_conf None: no escalation)."""
        acc, tokens = self.replay_many(t_probe, torch.tensor([-math.inf if t_conf is None else t_conf]))
        return float(acc[0]), float(tokens[0])

    def replay_many(self, t_probe: float, t_conf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """replay for K confidence thresholds at once: (accuracy (K,), mean tokens (K,)).

        An escalated fast answer costs the tokens up to its first one under t_conf (auto stops there),
        or all of them when only the stop token was unsure."""
        to_slow = self.p_fast < t_probe                                     # (N,)
        t = t_conf[:, None]                                                 # (K, 1)
        escalate = ~to_slow & (self.confidence < t)                         # (K, N)
        below = self.fast_probs[None] < t[..., None]                        # (K, N, L)
        fast_cost = torch.where(below.any(2), below.to(torch.uint8).argmax(2) + 1.0, self.fast_tokens)
        ok = torch.where(to_slow | escalate, self.slow_ok, self.fast_ok).double()  # float64: exact shares
        tokens = torch.where(to_slow, self.slow_tokens, fast_cost + torch.where(escalate, self.slow_tokens, 0.0))
        return ok.mean(1), tokens.double().mean(1)


def token_probs(logprobs: Sequence[Sequence[float]]) -> torch.Tensor:
    """Per-answer token log-probabilities → (N, L) probabilities padded with inf."""
    width = max((len(lp) for lp in logprobs), default=0)
    out = torch.full((len(logprobs), max(width, 1)), math.inf)
    for i, lp in enumerate(logprobs):
        out[i, :len(lp)] = torch.tensor(lp, dtype=torch.float).exp()
    return out


def choose_thresholds(runs: DevRuns, *, target_accuracy: float | None = None,
                      token_budget: float | None = None) -> dict[str, dict]:
    """Per policy, the thresholds with the fewest tokens at ≥ target_accuracy (or, with token_budget, the
    most accuracy within the budget). When no setting reaches the target, the most accurate one wins.

    Confidence thresholds are tried at every item's value and just above it (exact up to CONF_GRID
    distinct values; at that many quantiles beyond, so that large calibration sets stay fast); probe
    thresholds at every item's value for the probe alone and at percentiles when combined with confidence."""
    if (target_accuracy is None) == (token_budget is None):
        raise ConfigError("give either a target accuracy or a token budget", "pass one of the two")
    conf = runs.confidence.unique()
    if len(conf) > CONF_GRID:
        conf = torch.quantile(runs.confidence.double(), torch.linspace(0, 1, CONF_GRID, dtype=torch.double))
        conf = conf.float().unique()
    conf_grid = torch.cat([torch.tensor([-math.inf]), conf, torch.nextafter(conf, torch.tensor(math.inf))])
    edges = [-math.inf, math.inf]
    every_p = edges + runs.p_fast.unique().tolist()
    some_p = edges + torch.quantile(runs.p_fast, torch.linspace(0, 1, 101)).unique().tolist()
    grids = {"probe": (every_p, torch.tensor([-math.inf])), "confidence": ([-math.inf], conf_grid),
             "both": (some_p, conf_grid)}
    chosen = {}
    for policy, (probe_grid, conf_grid_) in grids.items():
        best = None
        for t in probe_grid:
            acc, tok = runs.replay_many(t, conf_grid_)
            if token_budget is not None:
                key = torch.where(tok <= token_budget, acc, acc - 2.0) * 1e6 - tok  # within budget first
            else:
                key = torch.where(acc >= target_accuracy - 1e-9, -tok, acc - 1e6)  # reach the target first
            k = int(key.argmax())
            if best is None or float(key[k]) > best[0]:
                best = (float(key[k]), t, float(conf_grid_[k]), float(acc[k]), float(tok[k]))
        _, t, c, acc, tok = best
        chosen[policy] = {"probe": None if t == -math.inf else t, "confidence": None if c == -math.inf else c,
                          "dev_accuracy": acc, "dev_mean_tokens": tok}
    return chosen


def fit_router(dual, items: Sequence[dict], *, max_drop: float = 0.5, token_budget: float | None = None,
               folds: int = 5, show_progress: bool = True) -> tuple[Router, dict]:
    """Fit the probe and choose thresholds on labelled question/answer items.

    dual: a DualSystem (its generator, prompts and limits are used). max_drop: accuracy points below the
    dev set's slow-mode accuracy that auto may lose (0.5); token_budget: instead, most mean tokens.
    Returns the Router and a report (dev accuracy and tokens of fast, slow, oracle and every policy).
    """
    if len(items) < 2 * folds:
        raise DataError(f"{len(items)} labelled items are too few to fit a router", f"give at least {2 * folds}")
    feats, fast, slow, logprobs = [], [], [], []
    chunks = [list(items[i:i + dual.batch_size]) for i in range(0, len(items), dual.batch_size)]
    for chunk in progress_bar(chunks, "router: fast and slow answers", show=show_progress):
        qs = [it["question"] for it in chunk]
        capture: list = []
        rows = dual.decode([dual.prompt(q, "fast") for q in qs], "fast", capture)
        feats.append(features(capture))
        fast += [dual._reply(q, "fast", "", r) for q, r in zip(qs, rows)]
        logprobs += [r.logprobs for r in rows]
        slow += dual.answer(qs, "slow")
    x = torch.cat(feats)
    answers = [it["answer"] for it in items]
    fast_ok = torch.tensor([extract_answer(r.answer) == a for r, a in zip(fast, answers)])
    slow_ok = torch.tensor([extract_answer(r.answer) == a for r, a in zip(slow, answers)])
    if bool(fast_ok.all()) or not bool(fast_ok.any()):
        raise DataError("fast mode is right on all or none of the items, so there is nothing to learn",
                        "use a dev set with both easy and hard items")
    y = fast_ok.float()
    scores, l2 = out_of_fold(x, y, folds)
    runs = DevRuns(scores, torch.tensor([r.confidence for r in fast]), fast_ok,
                   torch.tensor([float(r.tokens) for r in fast]), slow_ok,
                   torch.tensor([float(r.tokens) for r in slow]), token_probs(logprobs))
    slow_acc = float(slow_ok.float().mean())
    target = None if token_budget is not None else slow_acc - max_drop / 100
    thresholds = choose_thresholds(runs, target_accuracy=target, token_budget=token_budget)
    mean, std = _standardizer(x)
    w, b = fit_logistic((x - mean) / std, y, l2)
    oracle_tokens = float(torch.where(fast_ok, runs.fast_tokens, runs.slow_tokens).mean())
    report = {"items": len(items), "l2": l2, "target_accuracy": target, "token_budget": token_budget,
              "fast": {"accuracy": float(y.mean()), "mean_tokens": float(runs.fast_tokens.mean())},
              "slow": {"accuracy": slow_acc, "mean_tokens": float(runs.slow_tokens.mean())},
              "oracle": {"accuracy": float((fast_ok | slow_ok).float().mean()), "mean_tokens": oracle_tokens},
              "probe_auc": auc(scores, fast_ok), "confidence_auc": auc(runs.confidence, fast_ok),
              "policies": thresholds}
    router = Router(w, b, mean, std, thresholds, _model_hash(dual.gen.model), {"dev": report})
    router.dev_runs = runs  # in memory only: lets a caller choose thresholds for another target
    return router, report


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: the chance that a positive item scores above a negative one."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()
    return float(greater.mean())
