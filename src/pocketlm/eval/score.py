"""Compare evaluation reports: Pareto fronts and one weighted score.

Everything here works on EvalReport dicts (the JSON written by `pocketlm eval --json`), so reports
from different runs and machines can be compared without loading any model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from ..config import BaseConfig, check, register_config
from ..errors import DataError

QUALITY_DEFS = {
    "task_accuracy": "quality = task accuracy (exact match on the task file)",
    "ppl_ratio": "quality = min_ppl / ppl (best perplexity in the set = 1.0)",
}
TERM_DEFS = {
    "t_norm": "t_norm = (1 / decode_tok_s) / max over the set of (1 / decode_tok_s) "
              "(seconds per token at batch 1, slowest = 1.0)",
    "e_norm": "e_norm = joules_per_token / max over the set of joules_per_token (hungriest = 1.0)",
}


def pareto_front(points: Sequence[Sequence[float]], maximize: Sequence[bool]) -> list[int]:
    """Indices of the non-dominated points, in input order.

    A point is dominated when another point is at least as good in every objective and strictly
    better in at least one. Identical points do not dominate each other, so ties are all kept.

    Args:
        points: one tuple of objective values per point, all of the same length.
        maximize: per objective, True if larger is better, False if smaller is better.
    """
    n_obj = len(maximize)
    if any(len(p) != n_obj for p in points):
        raise ValueError(f"every point needs {n_obj} objective values, one per `maximize` entry")
    # Flip minimized objectives so "larger is better" holds everywhere below.
    signed = [tuple(v if up else -v for v, up in zip(p, maximize)) for p in points]

    def dominates(a: tuple, b: tuple) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [i for i, p in enumerate(signed)
            if not any(dominates(q, p) for j, q in enumerate(signed) if j != i)]


@register_config
@dataclass(frozen=True)
class ScoreWeights(BaseConfig):
    """Weights of the single-number score.

    score = quality − w_time·t_norm − w_energy·e_norm, where quality is in (0, 1] (task accuracy if
    every report has one, else min_ppl / ppl), t_norm is seconds per decoded token divided by the
    slowest in the set, and e_norm is joules per token divided by the hungriest in the set.

    Args:
        w_time: weight of the time term (default 0.2).
        w_energy: weight of the energy term (default 0.2).
    """

    kind = "score_weights"

    w_time: float = 0.2
    w_energy: float = 0.2

    def validate(self) -> None:
        for name in ("w_time", "w_energy"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
                  f"score weight {name}={value!r} is not a non-negative number", "use a weight >= 0 (0 ignores the term)")


def _get(report: dict, section: str, key: str) -> Any:
    return (report.get(section) or {}).get(key)


def _label(report: dict, i: int) -> str:
    return str(report.get("label") or _get(report, "model", "name") or f"report {i + 1}")


def _positive(value: Any) -> float | None:
    """A usable measurement: a finite number > 0, else None (missing or --no-speed)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def quality_term(reports: Sequence[dict]) -> tuple[list[float], str]:
    """Per report a quality value in (0, 1] and the metric it came from.

    Task accuracy is used only when every report has one (otherwise the values would not be
    comparable); else the perplexity ratio min_ppl / ppl, so the best model in the set gets 1.0.

    Returns:
        (values in input order, "task_accuracy" or "ppl_ratio").
    """
    if not reports:
        raise DataError("no reports to compare", "pass at least one JSON written by `pocketlm eval --json`")
    accs = [_get(r, "quality", "task_accuracy") for r in reports]
    if all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in accs):
        return [float(a) for a in accs], "task_accuracy"
    ppls = [_positive(_get(r, "quality", "ppl")) for r in reports]
    bad = [_label(r, i) for i, (r, p) in enumerate(zip(reports, ppls)) if p is None]
    if bad:
        raise DataError(f"report(s) {', '.join(bad)} have no usable perplexity (quality.ppl)",
                        "pass JSON written by `pocketlm eval --json`")
    best = min(ppls)
    return [best / p for p in ppls], "ppl_ratio"


def _normalized(values: list[float | None]) -> list[float] | None:
    """values / max(values), or None when any value is missing (the term is then dropped)."""
    if any(v is None for v in values):
        return None
    top = max(values)
    return [v / top for v in values]


def weighted_scores(reports: Sequence[dict], weights: ScoreWeights = ScoreWeights()) -> dict:
    """Score every report with `ScoreWeights`' formula, normalizing within this set of reports.

    A term (time or energy) whose measurement is missing in any report is dropped for all reports,
    so the scores stay comparable; `dropped_terms` and `notes` say which and why.

    Returns:
        {"formula": str, "definitions": [str], "weights": {...}, "quality_metric": str,
         "dropped_terms": ["time" | "energy"], "notes": [str], "energy_kinds": sorted kinds,
         "fronts": {"quality_vs_size": [label], "quality_vs_speed": [label] | None},
         "rows": [{"label", "quality", "t_norm", "e_norm", "score"}]}
        t_norm / e_norm are None in the rows when their term was dropped.
    """
    quality, metric = quality_term(reports)
    labels = [_label(r, i) for i, r in enumerate(reports)]
    dropped, notes = [], []

    tok_s = [_positive(_get(r, "efficiency", "decode_tok_s")) for r in reports]
    t_norm = _normalized([None if v is None else 1.0 / v for v in tok_s])
    if t_norm is None:
        dropped.append("time")
        missing = [lab for lab, v in zip(labels, tok_s) if v is None]
        notes.append(f"time term dropped: no decode tok/s (batch 1) for {', '.join(missing)} "
                     "(evaluated with --no-speed?)")

    jpt = [_positive(_get(r, "energy", "joules_per_token")) for r in reports]
    e_norm = _normalized(jpt)
    kinds = sorted({str(_get(r, "energy", "kind")) for r in reports if _get(r, "energy", "kind")})
    if e_norm is None:
        dropped.append("energy")
        missing = [lab for lab, v in zip(labels, jpt) if v is None]
        notes.append(f"energy term dropped: no joules per token for {', '.join(missing)}")
    elif len(kinds) > 1:
        # Kept so the score still reflects energy, but a measured vs estimated gap is not real.
        notes.append("energy mixes measured and estimated values (" + ", ".join(kinds)
                     + "); e_norm compares numbers of different precision")

    formula = "score = quality"
    if t_norm is not None:
        formula += f" − {weights.w_time:g}·t_norm"
    if e_norm is not None:
        formula += f" − {weights.w_energy:g}·e_norm"
    definitions = [QUALITY_DEFS[metric]]
    definitions += [TERM_DEFS["t_norm"]] if t_norm is not None else []
    definitions += [TERM_DEFS["e_norm"]] if e_norm is not None else []

    rows = []
    for i, label in enumerate(labels):
        t = t_norm[i] if t_norm is not None else None
        e = e_norm[i] if e_norm is not None else None
        score = quality[i] - weights.w_time * (t or 0.0) - weights.w_energy * (e or 0.0)
        rows.append({"label": label, "quality": quality[i], "t_norm": t, "e_norm": e, "score": score})

    front_idx = quality_fronts(reports, quality)
    fronts = {k: None if v is None else [labels[i] for i in v] for k, v in front_idx.items()}
    return {"formula": formula, "definitions": definitions,
            "weights": {"w_time": weights.w_time, "w_energy": weights.w_energy},
            "quality_metric": metric, "dropped_terms": dropped, "notes": notes,
            "energy_kinds": kinds, "fronts": fronts, "rows": rows}


def quality_fronts(reports: Sequence[dict], quality: Sequence[float] | None = None) -> dict[str, list[int] | None]:
    """Pareto fronts the report draws, as indices into `reports`.

    quality_vs_size: quality (max) vs efficiency.weights_mb (min);
    quality_vs_speed: quality (max) vs efficiency.decode_tok_s at batch 1 (max), None when no report
    has a speed. Reports missing the x value are left out of that front.

    Args:
        quality: per report quality values (default: `quality_term(reports)`).
    """
    if quality is None:
        quality = quality_term(reports)[0]
    out: dict[str, list[int] | None] = {}
    for key, field, up in (("quality_vs_size", "weights_mb", False), ("quality_vs_speed", "decode_tok_s", True)):
        have = [i for i, r in enumerate(reports) if _positive(_get(r, "efficiency", field)) is not None]
        if not have:
            out[key] = None
            continue
        pts = [(quality[i], float(_get(reports[i], "efficiency", field))) for i in have]
        out[key] = [have[k] for k in pareto_front(pts, (True, up))]
    return out
