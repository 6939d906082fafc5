"""Budgeted recipe search: candidates over width pruning × KD recovery × quantization, each measured
with the one evaluation protocol; the Pareto set, and the best weighted score within the budget.

The grid is built as a tree so shared work is done once: each pruning level is pruned and recovered
by KD (from the original) once, then quantized each way. Every candidate is measured in full (no
proxy skips any), so the choice rests on measured size, speed and quality only. Candidates within the
budget are saved as they are measured, under the output's temporary folder, and the chosen one is
moved to best/: memory holds one pruned stage and one quantized copy at a time, not the whole grid.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import ClassVar

from ..config import BaseConfig, check, register_config
from ..errors import ConfigError
from ..eval.protocol import EvalProtocol, evaluate
from ..eval.report import render_report
from ..eval.score import ScoreWeights, weighted_scores
from ..io import atomic_dir, check_output, save
from .api import compress_
from .distill.trainer import KDConfig
from .prune.configs import WidthPruneConfig
from .quant.gptq import GPTQConfig
from .quant.rtn import RTNConfig
from .quant.swap import check_targets

QUANT = {"none": None, "int8": RTNConfig(bits=8, head=True),
         # groups of 32, the finest the int4 kernel takes; a pruned width they do not divide is skipped
         "int4": GPTQConfig(bits=4, group_size=32, head=True)}


@register_config
@dataclasses.dataclass(frozen=True)
class SearchSpace(BaseConfig):
    """prune_ratios: parameter shares removed by width pruning (the unpruned model is always a
    candidate); quant: of none, int8 (RTN, int8 head), int4 (GPTQ groups of 32, int8 head);
    kd: the recovery after each pruning (None: none)."""

    prune_ratios: tuple[float, ...] = (0.25, 0.5)
    quant: tuple[str, ...] = ("none", "int8", "int4")
    kd: KDConfig | None = KDConfig(steps=100, lr=1e-3)

    kind: ClassVar[str] = "search_space"

    def validate(self) -> None:
        object.__setattr__(self, "prune_ratios", tuple(self.prune_ratios))
        object.__setattr__(self, "quant", tuple(self.quant))
        check(all(0 < r < 1 for r in self.prune_ratios), f"prune ratios {self.prune_ratios} must be in (0, 1)",
              "use shares removed, e.g. 0.25,0.5")
        check(bool(self.quant) and set(self.quant) <= set(QUANT), f"quantization choices {self.quant} are not "
              f"among {', '.join(QUANT)}", "use e.g. none,int8,int4")
        check(len(self.quant) * (1 + len(self.prune_ratios)) >= 2, "the search space holds one candidate",
              "give more prune ratios or quantization choices")


@register_config
@dataclasses.dataclass(frozen=True)
class SearchBudget(BaseConfig):
    """max_size_mb: stored weights; max_latency_ms: per decoded token at batch 1 (None: no limit);
    w_time, w_energy: the weighted score's terms (quality − w_time·t_norm − w_energy·e_norm);
    gates: acceptance gates every chosen candidate's EvalReport must pass, the quality floor (e.g.
    "quality.ppl <= 1.05 * incumbent", incumbent = the original model's report; see fleet.gates)."""

    max_size_mb: float = 0.0
    max_latency_ms: float | None = None
    w_time: float = 0.2
    w_energy: float = 0.2
    gates: tuple[str, ...] = ()

    kind: ClassVar[str] = "search_budget"

    def validate(self) -> None:
        check(self.max_size_mb > 0, f"size budget {self.max_size_mb} MB is not positive", "use e.g. --max-size-mb 8")
        check(self.max_latency_ms is None or self.max_latency_ms > 0,
              f"latency budget {self.max_latency_ms} ms is not positive", "use e.g. --max-latency-ms 20")
        ScoreWeights(w_time=self.w_time, w_energy=self.w_energy)  # validates the weights
        self.parsed_gates()

    def parsed_gates(self) -> list:
        from ..fleet.gates import parse_gate
        return [parse_gate(g) for g in self.gates]


def _name(ratio: float, kd: bool, quant: str) -> str:
    prune = "dense" if not ratio else f"width-{ratio:.0%}" + ("+kd" if kd else "")
    return prune if quant == "none" else f"{prune} {quant}"


def _fits(report: dict, budget: SearchBudget) -> bool:
    eff = report["efficiency"]
    if eff["weights_mb"] > budget.max_size_mb:
        return False
    tok_s = eff.get("decode_tok_s")
    return budget.max_latency_ms is None or (bool(tok_s) and 1000.0 / tok_s <= budget.max_latency_ms)


def _gates(report: dict, incumbent: dict | None, budget: SearchBudget) -> list[dict]:
    from ..fleet.gates import check_gates
    _, results = check_gates({"candidate": report, "incumbent": incumbent}, budget.parsed_gates())
    return [dataclasses.asdict(r) for r in results]


def run_search(model, tok, out: str | Path, budget: SearchBudget, space: SearchSpace = SearchSpace(), *,
               protocol: EvalProtocol = EvalProtocol(tokens=32768, decode_batch_sizes=(1,), repeats=3),
               calib=None, overwrite: bool = False, show_progress: bool = True) -> dict:
    """Measure every candidate, write `out` (report.md/html with the Pareto plots, search.json, and the
    chosen artifact in best/), and return search.json's content."""
    t0 = time.perf_counter()
    check_output(out, overwrite, protect=model.pocketlm_source.inputs if getattr(model, "pocketlm_source", None)
                 else ())  # before the long work
    calib_kw = dict(tok=tok, calib=calib, calib_samples=64, calib_len=512, show_progress=show_progress)
    reports, candidates, skipped = [], [], []
    incumbent = None  # the original's report, when a gate compares against it
    if any(g.uses_incumbent for g in budget.parsed_gates()):
        incumbent = evaluate(model, tok, protocol, label="original", show_progress=show_progress).to_dict()
    with atomic_dir(out, overwrite=overwrite) as tmp:
        # Only a candidate within the budget can be chosen, so only those are kept (on disk).
        kept = tmp / "candidates"
        for ratio in (0.0, *space.prune_ratios):
            stage, passes = model, []
            if ratio:
                passes = [WidthPruneConfig(target_ratio=1 - ratio)] + ([space.kd] if space.kd else [])
                stage = copy.deepcopy(model)
                passes = compress_(stage, passes, teacher=model, **calib_kw)
            for quant in space.quant:
                name = _name(ratio, space.kd is not None, quant)
                cand, applied = stage, list(passes)
                if QUANT[quant] is not None:
                    try:  # a pruned width that no group size divides cannot take int4 groups
                        check_targets(stage, QUANT[quant].scheme)
                    except ConfigError as e:
                        skipped.append({"name": name, "reason": e.problem})
                        continue
                    cand = copy.deepcopy(stage)
                    applied += compress_(cand, QUANT[quant], **calib_kw)
                report = evaluate(cand, tok, protocol, baseline=(model, tok), label=name, show_progress=show_progress)
                reports.append(report.to_dict())
                gates = _gates(reports[-1], incumbent, budget)
                candidates.append({"name": name, "recipe": applied, "ppl": report.quality["ppl"],
                                   "weights_mb": report.efficiency["weights_mb"],
                                   "decode_tok_s": report.efficiency.get("decode_tok_s"), "gates": gates,
                                   "within_budget": _fits(reports[-1], budget) and all(g["passed"] for g in gates)})
                if candidates[-1]["within_budget"]:
                    save(cand, tok, kept / str(len(candidates)))
                del cand
        weights = ScoreWeights(w_time=budget.w_time, w_energy=budget.w_energy)
        scores = weighted_scores(reports, weights)
        for c, row in zip(candidates, scores["rows"]):
            c.update(score=row["score"], pareto=c["name"] in (scores["fronts"]["quality_vs_size"] or []))
        within = [i for i, c in enumerate(candidates) if c["within_budget"]]
        best = max(within, key=lambda i: candidates[i]["score"]) if within else None
        result = {"budget": budget.to_dict(), "space": {**space.to_dict(), "kd": space.kd and space.kd.to_dict()},
                  "protocol": protocol.to_dict(), "score_formula": scores["formula"], "candidates": candidates,
                  "skipped": skipped, "pareto": scores["fronts"],
                  "best": candidates[best]["name"] if best is not None else None, "wall_s": time.perf_counter() - t0}
        render_report(reports, tmp, weights)
        (tmp / "search.json").write_text(json.dumps(result, indent=2) + "\n")
        if best is not None:
            (kept / str(best + 1)).rename(tmp / "best")
        if kept.exists():
            shutil.rmtree(kept)
    return result
