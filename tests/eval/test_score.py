"""Pareto fronts and the weighted score on hand-made numbers."""
import pytest

from pocketlm.errors import ConfigError, DataError
from pocketlm.eval.score import ScoreWeights, pareto_front, quality_fronts, quality_term, weighted_scores


def rep(label, ppl, tok_s=None, jpt=None, kind="measured", weights_mb=10.0, acc=None):
    return {"label": label,
            "quality": {"ppl": ppl, "task_accuracy": acc},
            "efficiency": {"weights_mb": weights_mb, "decode_tok_s": tok_s},
            "energy": None if jpt is None else {"joules_per_token": jpt, "kind": kind}}


def test_pareto_drops_dominated_point():
    # maximize both: (1, 1) is beaten by (2, 2) in every objective.
    assert pareto_front([(1, 1), (2, 2), (3, 0)], (True, True)) == [1, 2]


def test_pareto_keeps_identical_points_and_input_order():
    pts = [(5, 1), (2, 2), (2, 2), (1, 1)]
    assert pareto_front(pts, (True, True)) == [0, 1, 2]


def test_pareto_weakly_dominated_point_is_dropped():
    # Equal in one objective, worse in the other -> dominated.
    assert pareto_front([(1, 2), (1, 3)], (True, True)) == [1]


def test_pareto_mixed_directions():
    # quality up, size down: (0.9, 10) dominates (0.8, 12); (0.7, 5) is smallest; (0.95, 20) is best.
    pts = [(0.8, 12), (0.9, 10), (0.7, 5), (0.95, 20), (0.6, 6)]
    assert pareto_front(pts, (True, False)) == [1, 2, 3]
    # Flip the size direction and the answer changes: now larger size is "better".
    assert pareto_front(pts, (True, True)) == [3]


def test_pareto_rejects_wrong_arity():
    with pytest.raises(ValueError):
        pareto_front([(1, 2, 3)], (True, True))


def test_negative_or_nan_weight_is_config_error():
    with pytest.raises(ConfigError):
        ScoreWeights(w_time=-0.1)
    with pytest.raises(ConfigError):
        ScoreWeights(w_energy=float("nan"))
    assert ScoreWeights(0, 0).w_time == 0


def test_quality_ppl_ratio_and_task_accuracy():
    q, metric = quality_term([rep("a", 20.0), rep("b", 25.0)])
    assert metric == "ppl_ratio" and q == pytest.approx([1.0, 0.8])
    q, metric = quality_term([rep("a", 20.0, acc=0.7), rep("b", 25.0, acc=0.5)])
    assert metric == "task_accuracy" and q == pytest.approx([0.7, 0.5])
    # Accuracy in only some reports is not comparable: fall back to perplexity.
    assert quality_term([rep("a", 20.0, acc=0.7), rep("b", 25.0)])[1] == "ppl_ratio"
    with pytest.raises(DataError):
        quality_term([])
    with pytest.raises(DataError, match="b"):
        quality_term([rep("a", 20.0), rep("b", None)])


def test_faster_model_with_same_quality_scores_higher():
    s = weighted_scores([rep("slow", 20.0, tok_s=100.0, jpt=0.1), rep("fast", 20.0, tok_s=200.0, jpt=0.1)])
    slow, fast = s["rows"]
    assert fast["score"] > slow["score"]
    assert s["dropped_terms"] == []


def test_score_matches_formula_by_hand():
    reports = [rep("a", 20.0, tok_s=100.0, jpt=0.2), rep("b", 25.0, tok_s=400.0, jpt=0.05)]
    s = weighted_scores(reports, ScoreWeights(w_time=0.5, w_energy=0.25))
    a, b = s["rows"]
    # a: quality 1, s/token 0.01 is the slowest -> t 1, J 0.2 is the max -> e 1
    assert (a["quality"], a["t_norm"], a["e_norm"]) == pytest.approx((1.0, 1.0, 1.0))
    assert a["score"] == pytest.approx(1.0 - 0.5 - 0.25)
    # b: quality 20/25 = 0.8, t = 0.0025/0.01 = 0.25, e = 0.05/0.2 = 0.25
    assert (b["quality"], b["t_norm"], b["e_norm"]) == pytest.approx((0.8, 0.25, 0.25))
    assert b["score"] == pytest.approx(0.8 - 0.5 * 0.25 - 0.25 * 0.25)
    assert s["formula"] == "score = quality − 0.5·t_norm − 0.25·e_norm"
    assert s["weights"] == {"w_time": 0.5, "w_energy": 0.25}
    assert s["quality_metric"] == "ppl_ratio"


def test_missing_speed_drops_time_term_for_all():
    reports = [rep("a", 20.0, tok_s=100.0, jpt=0.2), rep("b", 25.0, tok_s=None, jpt=0.1)]
    s = weighted_scores(reports, ScoreWeights(w_time=0.5, w_energy=0.2))
    assert s["dropped_terms"] == ["time"]
    assert "t_norm" not in s["formula"] and "e_norm" in s["formula"]
    assert any("time" in n and "b" in n for n in s["notes"])
    assert all(row["t_norm"] is None for row in s["rows"])
    assert s["rows"][0]["score"] == pytest.approx(1.0 - 0.2 * 1.0)
    assert s["rows"][1]["score"] == pytest.approx(0.8 - 0.2 * 0.5)


def test_missing_energy_drops_energy_term():
    s = weighted_scores([rep("a", 20.0, tok_s=100.0), rep("b", 20.0, tok_s=50.0)])
    assert s["dropped_terms"] == ["energy"]
    assert s["rows"][0]["score"] == pytest.approx(1.0 - 0.2 * 0.5)
    assert s["energy_kinds"] == []


def test_mixed_energy_kinds_kept_and_flagged():
    s = weighted_scores([rep("a", 20.0, tok_s=100.0, jpt=0.2, kind="measured"),
                         rep("b", 20.0, tok_s=100.0, jpt=0.1, kind="estimated")])
    assert "energy" not in s["dropped_terms"]
    assert s["energy_kinds"] == ["estimated", "measured"]
    assert any("measured and estimated" in n for n in s["notes"])


def test_quality_fronts_size_and_speed():
    reports = [rep("big", 20.0, tok_s=100.0, weights_mb=40.0),
               rep("small", 22.0, tok_s=300.0, weights_mb=10.0),
               rep("worse", 30.0, tok_s=200.0, weights_mb=20.0)]
    fronts = quality_fronts(reports)
    assert fronts == {"quality_vs_size": [0, 1], "quality_vs_speed": [0, 1]}
    assert weighted_scores(reports)["fronts"]["quality_vs_size"] == ["big", "small"]
    no_speed = [rep("a", 20.0), rep("b", 21.0)]
    assert quality_fronts(no_speed)["quality_vs_speed"] is None
