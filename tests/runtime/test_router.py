import json
import math

import pytest
import torch

from pocketlm.errors import ConfigError, CorruptModelError, DataError, OutputExistsError
from pocketlm.eval.data import read_tasks
from pocketlm.io import ASSETS
from pocketlm.runtime import Generator
from pocketlm.runtime.dual import DualSystem
from pocketlm.runtime.router import DevRuns, Router, auc, choose_thresholds, fit_logistic, fit_router

TASKS = ASSETS / "data" / "arith_test.jsonl"


def test_logistic_probe_separates_a_separable_set():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 2] - 0.5 * x[:, 0] > 0).float()
    w, b = fit_logistic(x, y, l2=1e-3)
    assert ((x @ w + b > 0).float() == y).float().mean() > 0.97
    assert auc(x @ w + b, y.bool()) > 0.99 and auc(-(x @ w + b), y.bool()) < 0.01


def _runs(n=300, seed=0) -> DevRuns:
    g = torch.Generator().manual_seed(seed)
    fast_ok = torch.rand(n, generator=g) < 0.7
    noise = lambda: 0.3 * torch.rand(n, generator=g)
    confidence = fast_ok.float() * 0.6 + noise()
    probs = torch.full((n, 5), 0.99)  # five answer tokens, the least sure one somewhere among them
    probs[torch.arange(n), torch.randint(0, 5, (n,), generator=g)] = confidence
    return DevRuns(p_fast=fast_ok.float() * 0.5 + noise(), confidence=confidence, fast_ok=fast_ok,
                   fast_tokens=torch.full((n,), 6.0), slow_ok=torch.rand(n, generator=g) < 0.97,
                   slow_tokens=40 + 40 * torch.rand(n, generator=g), fast_probs=probs)


def test_replay_counts_escalation_costs():
    runs = _runs()
    acc, tok = runs.replay(-math.inf, None)  # always fast
    assert acc == pytest.approx(float(runs.fast_ok.float().mean())) and tok == 6.0
    acc, tok = runs.replay(math.inf, None)   # always slow, no fast attempt
    assert tok == pytest.approx(float(runs.slow_tokens.mean()))
    acc, tok = runs.replay(-math.inf, 2.0)   # escalate all: the first token is already unsure
    assert tok == pytest.approx(1.0 + float(runs.slow_tokens.mean()))
    # escalating only below 0.995: the fast answer stops at its least sure token, or is paid in full
    acc, tok = runs.replay(-math.inf, 0.995)
    first = (runs.fast_probs < 0.995).float().argmax(1) + 1
    assert tok == pytest.approx(float((first + runs.slow_tokens).mean()))


@pytest.mark.parametrize("target", [0.9, 0.95])
def test_chosen_thresholds_are_the_cheapest_that_reach_the_target(target):
    runs = _runs()
    chosen = choose_thresholds(runs, target_accuracy=target)
    for policy, t in chosen.items():
        assert t["dev_accuracy"] >= target
        assert (t["dev_accuracy"], t["dev_mean_tokens"]) == pytest.approx(
            runs.replay(-math.inf if t["probe"] is None else t["probe"], t["confidence"]))
    # brute force over every item's score as a confidence threshold finds nothing cheaper
    best = min(tok for c in runs.confidence.tolist() + [2.0]
               for acc, tok in [runs.replay(-math.inf, c)] if acc >= target)
    assert chosen["confidence"]["dev_mean_tokens"] <= best + 1e-6
    assert chosen["both"]["dev_mean_tokens"] <= chosen["confidence"]["dev_mean_tokens"] + 1e-6
    budget = choose_thresholds(runs, token_budget=20.0)
    assert all(t["dev_mean_tokens"] <= 20.0 for t in budget.values())
    with pytest.raises(ConfigError):
        choose_thresholds(runs)


def test_large_calibration_sets_use_a_quantile_grid_close_to_the_exact_one(monkeypatch):
    runs = _runs(n=400)
    exact = choose_thresholds(runs, token_budget=25.0)["confidence"]
    monkeypatch.setattr("pocketlm.runtime.router.CONF_GRID", 100)  # 400 distinct confidences: quantiles
    coarse = choose_thresholds(runs, token_budget=25.0)["confidence"]
    assert coarse["dev_mean_tokens"] <= 25.0
    assert coarse["dev_accuracy"] == pytest.approx(exact["dev_accuracy"], abs=0.01)
    monkeypatch.setattr("pocketlm.runtime.router.CONF_GRID", 3)    # too coarse to find it: the check bites
    assert choose_thresholds(runs, token_budget=25.0)["confidence"]["dev_accuracy"] < exact["dev_accuracy"] - 0.01


@pytest.fixture(scope="module")
def fitted(reasoner, tmp_path_factory):
    dual = DualSystem(Generator(*reasoner), mode="fast")
    items = read_tasks(TASKS, 48)
    router, report = fit_router(dual, items, folds=4, show_progress=False)
    return dual, items, router, report


def test_fit_router_reports_every_policy(fitted):
    dual, items, router, report = fitted
    assert report["items"] == 48 and 0 < report["fast"]["accuracy"] < report["slow"]["accuracy"]
    assert report["oracle"]["mean_tokens"] < report["slow"]["mean_tokens"]
    assert report["confidence_auc"] > 0.7  # the fast answer's confidence tells right from wrong
    for policy in ("probe", "confidence", "both"):
        t = report["policies"][policy]
        assert t["dev_accuracy"] >= report["target_accuracy"] - 1e-9  # always reachable: all slow


def test_router_round_trip_and_model_check(fitted, tmp_path, tiny):
    dual, items, router, _ = fitted
    path = router.save(tmp_path / "router")
    again = Router.load(path)
    capture: list = []
    dual.decode([dual.prompt(it["question"], "fast") for it in items[:4]], "fast", capture)
    torch.testing.assert_close(again.p_fast(capture), router.p_fast(capture))
    assert again.thresholds == json.loads(json.dumps(router.thresholds))
    with pytest.raises(OutputExistsError):
        router.save(path)
    with pytest.raises(ConfigError, match="another model"):
        DualSystem(Generator(*tiny), router=again)
    (path / "router.json").write_text("{not json")
    with pytest.raises(CorruptModelError):
        Router.load(path)
    with pytest.raises(DataError):
        Router.load(tmp_path / "nothing")


def test_auto_with_fitted_router_is_at_least_as_accurate_as_fast(fitted):
    dual, items, router, _ = fitted
    auto = DualSystem(dual.gen, mode="auto", router=router)
    replies = auto.answer([it["question"] for it in items])
    fast = dual.answer([it["question"] for it in items], "fast")
    right = lambda rs: sum(r.answer == it["answer"] for r, it in zip(rs, items))
    assert right(replies) >= right(fast)
    assert {r.mode for r in replies} <= {"fast", "slow"} and any(r.mode == "slow" for r in replies)


def test_too_few_items_is_refused(reasoner):
    with pytest.raises(DataError, match="too few"):
        fit_router(DualSystem(Generator(*reasoner)), read_tasks(TASKS, 5), show_progress=False)
