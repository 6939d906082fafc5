"""Does `reasoner` hold a better routing signal than the router's two? (the reasoning issue's 40% target)

The router (runtime/router.py) reads (a) a probe on the prompt's hidden states and (b) the fast answer's
lowest token probability. reason.py shows that with them auto mode loses about 1.6 points against slow
mode at 40% of slow's tokens. This script asks whether other signals of the same model do better:

- the hidden states (every layer) at the fast answer's last token, i.e. after the model has answered;
- the answer's token log-probabilities together (lowest, mean, stop token's, length), logistic;
- combinations of those with the prompt states;
- cost-aware escalation: P(fast wrong) ÷ the thinking length predicted from the prompt states (ridge
  regression on log tokens), which prefers cheap-to-think items when the budget is tight.

Labels: fast and slow answers, greedy, on 5,000 items: the first 4,000 of arith_train.jsonl (fit: probes,
L2 strength by out-of-fold log-loss, thresholds on out-of-fold scores) and arith_dev.jsonl (evaluation).
Every fast-first policy pays the whole fast answer before escalating (the runtime's (b) stops at the
first unsure token, slightly cheaper); the prompt probe alone skips fast mode for the items it routes.
Per signal: AUC on dev for "fast is right", and the accuracy lost against slow mode at 36/40/45% of slow's
tokens, with thresholds chosen on the fit items and, as a ceiling, the best threshold on dev itself.

    python benchmarks/router_signals.py [--threads 2] [--fit-items 4000]
"""
from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

import pocketlm
from pocketlm.eval.data import read_tasks
from pocketlm.eval.quality import extract_answer
from pocketlm.progress import progress_bar
from pocketlm.runtime import Generator
from pocketlm.runtime.dual import DualSystem
from pocketlm.runtime.router import _standardizer, auc, features, fit_logistic, out_of_fold
from common import SHARED, write_result

TASKS = SHARED / "tasks"
SHARES = (0.36, 0.40, 0.45)


def collect(dual: DualSystem, items: list[dict], show: bool = True) -> dict:
    """Per item: prompt-end and answer-end hidden states, the fast answer's token log-probabilities (stop
    token included), and both modes' correctness and tokens."""
    model = dual.gen.model
    out = {k: [] for k in ("prompt", "answer", "logprobs", "fast_ok", "fast_tokens", "slow_ok", "slow_tokens")}
    chunks = [items[i:i + dual.batch_size] for i in range(0, len(items), dual.batch_size)]
    for chunk in progress_bar(chunks, "fast and slow answers", show=show):
        qs = [it["question"] for it in chunk]
        prompts = [dual.prompt(q, "fast") for q in qs]
        capture: list = []
        rows = dual.decode(prompts, "fast", capture)  # the engine's capture, as `router fit` reads it
        out["prompt"].append(features(capture))
        slow = dual.answer(qs, "slow")
        for it, ids, row, s in zip(chunk, prompts, rows, slow):
            with torch.no_grad():  # the states that produced the stop token: free while decoding
                hidden = model(torch.tensor([ids + row.tokens]), output_hidden_states=True).hidden_states[1:]
            out["answer"].append(torch.cat([h[0, -1].float() for h in hidden]))
            fast = dual._reply(it["question"], "fast", "", row)
            out["logprobs"].append(row.logprobs + ([row.stop_logprob] if row.stop_logprob is not None else []))
            out["fast_ok"].append(extract_answer(fast.answer) == it["answer"])
            out["fast_tokens"].append(fast.tokens)
            out["slow_ok"].append(extract_answer(s.answer) == it["answer"])
            out["slow_tokens"].append(s.tokens)
    return {"prompt": torch.cat(out["prompt"]), "answer": torch.stack(out["answer"]), "logprobs": out["logprobs"],
            **{k: torch.tensor(out[k]) for k in ("fast_ok", "slow_ok")},
            **{k: torch.tensor(out[k], dtype=torch.float) for k in ("fast_tokens", "slow_tokens")}}


def token_features(logprobs: list[list[float]], lengths: torch.Tensor) -> torch.Tensor:
    """(N, 5): lowest log-probability, its log-magnitude, mean, the stop token's, answer length."""
    low = torch.tensor([min(lp) for lp in logprobs])
    return torch.stack([low, torch.log(-low.clamp(max=-1e-7)), torch.tensor([sum(lp) / len(lp) for lp in logprobs]),
                        torch.tensor([lp[-1] for lp in logprobs]), lengths], 1)


def logistic_scores(x: torch.Tensor, y: torch.Tensor, fit: torch.Tensor) -> torch.Tensor:
    """P(fast right): out-of-fold on the fit items, from a probe fit on all of them elsewhere."""
    scores = torch.empty(len(y))
    scores[fit], l2 = out_of_fold(x[fit], y[fit].float(), folds=5)
    mean, std = _standardizer(x[fit])
    w, b = fit_logistic((x[fit] - mean) / std, y[fit].float(), l2)
    scores[~fit] = torch.sigmoid(((x[~fit] - mean) / std) @ w + b)
    return scores


def ridge_predict(x: torch.Tensor, target: torch.Tensor, fit: torch.Tensor, l2: float = 0.01) -> torch.Tensor:
    """Ridge regression fit on the fit items (5-fold out-of-fold there), predicted for every item."""
    def solve(rows):
        mean, std = _standardizer(x[rows])
        z = (x[rows] - mean) / std
        w = torch.linalg.solve(z.T @ z + l2 * len(z) * torch.eye(z.shape[1]), z.T @ (target[rows] - target[rows].mean()))
        return lambda xs: ((xs - mean) / std) @ w + target[rows].mean()
    pred = torch.empty(len(target))
    idx = torch.nonzero(fit)[:, 0]
    for part in idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))].chunk(5):
        rows = fit.clone()
        rows[part] = False
        pred[part] = solve(rows)(x[part])
    pred[~fit] = solve(fit)(x[~fit])
    return pred


def replay(d: dict, escalate: torch.Tensor, rows: torch.Tensor, fast_first: bool) -> tuple[float, float]:
    """(accuracy, mean tokens) over `rows` when the `escalate`d items are answered slow."""
    e, fast_cost = escalate[rows], d["fast_tokens"][rows] if fast_first else 0.0
    ok = torch.where(e, d["slow_ok"][rows], d["fast_ok"][rows]).double().mean()
    tokens = torch.where(e, d["slow_tokens"][rows] + fast_cost, d["fast_tokens"][rows]).double().mean()
    return float(ok), float(tokens)


def best_within(d: dict, risk: torch.Tensor, rows: torch.Tensor, budget: float, fast_first: bool) -> tuple:
    """(threshold, accuracy, tokens) of the most accurate 'escalate where risk > threshold' within budget."""
    best = None
    for t in torch.quantile(risk[rows].double(), torch.linspace(0, 1, 1001, dtype=torch.double)).unique().tolist():
        acc, tokens = replay(d, risk > t, rows, fast_first)
        if tokens <= budget and (best is None or acc > best[1]):
            best = (t, acc, tokens)
    return best or (float("inf"), *replay(d, risk > float("inf"), rows, fast_first))


def evaluate(d: dict, risk: torch.Tensor, fit: torch.Tensor, fast_first: bool) -> dict:
    ev = ~fit
    slow_acc = float(d["slow_ok"][ev].double().mean())
    slow_fit, slow_ev = float(d["slow_tokens"][fit].mean()), float(d["slow_tokens"][ev].mean())
    points = []
    for share in SHARES:
        t, _, _ = best_within(d, risk, fit, share * slow_fit, fast_first)
        acc, tokens = replay(d, risk > t, ev, fast_first)
        _, best_acc, best_tokens = best_within(d, risk, ev, share * slow_ev, fast_first)
        points.append({"token_share": share, "drop": slow_acc - acc, "tokens_share": tokens / slow_ev,
                       "best_on_dev_drop": slow_acc - best_acc, "best_on_dev_tokens_share": best_tokens / slow_ev})
    return {"auc": auc(-risk[ev], d["fast_ok"][ev]), "fast_first": fast_first, "points": points}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SHARED / "models" / "reasoner"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fit-items", type=int, default=4000, help="arith_train items the probes are fit on")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=160)
    model, tok = pocketlm.load(args.model)
    dual = DualSystem(Generator(model, tok), mode="fast")
    train, dev = read_tasks(TASKS / "arith_train.jsonl", args.fit_items), read_tasks(TASKS / "arith_dev.jsonl")
    t0 = time.perf_counter()
    d = collect(dual, train + dev)
    collect_s = time.perf_counter() - t0
    fit = torch.arange(len(train) + len(dev)) < len(train)
    ok = d["fast_ok"]
    tokens = token_features(d["logprobs"], d["fast_tokens"])
    p_tokens = logistic_scores(tokens, ok, fit)
    thinking = ridge_predict(d["prompt"], d["slow_tokens"].log(), fit).exp()
    signals = {  # name → (risk score: higher escalates first; whether the fast answer is paid first)
        "(a) prompt probe": (1 - logistic_scores(d["prompt"], ok, fit), False),
        "(b) lowest token probability": (-tokens[:, 0].exp(), True),
        "answer tokens' log-probabilities (5 features)": (1 - p_tokens, True),
        "answer-end hidden states": (1 - logistic_scores(d["answer"], ok, fit), True),
        "answer-end states + token features": (1 - logistic_scores(torch.cat([d["answer"], tokens], 1), ok, fit), True),
        "prompt + answer-end states + token features":
            (1 - logistic_scores(torch.cat([d["prompt"], d["answer"], tokens], 1), ok, fit), True),
        "token features ÷ predicted thinking length": ((1 - p_tokens) / thinking, True),
    }
    results = {name: evaluate(d, risk, fit, fast_first) for name, (risk, fast_first) in signals.items()}
    ev = ~fit
    wrong = ~ok[ev]
    confident_wrong = float((tokens[ev][wrong, 0].exp() >= 0.5).double().mean())
    slow_acc = float(d["slow_ok"][ev].double().mean())
    table = Table(title=f"routing signals of reasoner: fit on {len(train)} arith_train items, evaluated on "
                        f"{len(dev)} dev items (slow {slow_acc:.1%}, fast {float(ok[ev].double().mean()):.1%}): "
                        "points lost vs slow [best threshold on dev]")
    table.add_column("signal")
    table.add_column("AUC", justify="right")
    for share in SHARES:
        table.add_column(f"{share:.0%} of slow's tokens", justify="right")
    for name, r in results.items():
        table.add_row(name, f"{r['auc']:.3f}", *[f"{100 * p['drop']:.2f} at {p['tokens_share']:.0%} "
                                                  f"[{100 * p['best_on_dev_drop']:.2f}]" for p in r["points"]])
    console.print(table)
    console.print(f"fast answers that are wrong with every token at probability ≥ 0.5: {confident_wrong:.0%} "
                  f"of fast mode's errors on dev · collected in {collect_s / 60:.1f} min")
    path = write_result("router_signals_reasoner", {
        "device": "cpu", "fit_items": len(train), "eval_items": len(dev), "collect_s": collect_s,
        "slow_accuracy": slow_acc, "fast_accuracy": float(ok[ev].double().mean()),
        "slow_mean_tokens": float(d["slow_tokens"][ev].mean()), "thinking_length_log_corr":
            float(torch.corrcoef(torch.stack([thinking[ev].log(), d["slow_tokens"][ev].log()]))[0, 1]),
        "confident_wrong_share": confident_wrong, "signals": results})
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
