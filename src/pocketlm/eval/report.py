"""Comparison report over EvalReport JSONs: report.md, report.html, report.json and Pareto plots."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import DataError
from ..io import atomic_dir
from .score import ScoreWeights, _get, _positive, quality_fronts, weighted_scores

if TYPE_CHECKING:
    from rich.table import Table

MISSING = "–"
FIX = "pass JSON written by `pocketlm eval --json`"
SIZE_PNG, SPEED_PNG = "quality_vs_size.png", "quality_vs_speed.png"


def _check(report: Any, where: str) -> None:
    if not isinstance(report, dict) or not isinstance(report.get("quality"), dict) \
            or not isinstance(report.get("efficiency"), dict):
        raise DataError(f"{where} is not an evaluation report (no 'quality'/'efficiency' keys)", FIX)


def _unique_labels(reports: Sequence[dict]) -> list[dict]:
    """Shallow copies whose labels are unique: repeats get '#2', '#3'… so plots stay readable."""
    bases = [str(r.get("label") or _get(r, "model", "name") or f"report {i + 1}") for i, r in enumerate(reports)]
    taken, used, out = set(bases), set(), []
    for r, base in zip(reports, bases):
        label, n = base, 2
        if label in used:
            while f"{base}#{n}" in taken:  # never collide with a label that already ends in '#N'
                n += 1
            label = f"{base}#{n}"
            taken.add(label)
        used.add(label)
        out.append({**r, "label": label})
    return out


def load_reports(paths: Sequence[str | os.PathLike]) -> list[dict]:
    """Read EvalReport JSON files, in order, with duplicate labels made unique.

    Raises DataError for an empty list, a missing or unreadable file, invalid JSON, or a JSON
    object without the `quality` and `efficiency` sections.
    """
    if not paths:
        raise DataError("no evaluation reports given", FIX)
    reports = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise DataError(f"report '{path}' does not exist", FIX)
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"report '{path}' is not valid JSON ({e})", FIX) from None
        _check(report, f"report '{path}'")
        reports.append(report)
    return _unique_labels(reports)


def _f(value: Any, spec: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return MISSING
    return format(value, spec)


def _batch_speed(report: dict, batch: int) -> Any:
    speeds = _get(report, "efficiency", "decode_tok_s_batch") or {}
    return speeds.get(str(batch), speeds.get(batch))  # JSON keys are strings, Python dicts may hold ints


def _energy_cell(report: dict) -> str:
    energy = report.get("energy") or {}
    cell = _f(energy.get("joules_per_token"), ".3g")
    return f"{cell} (est.)" if cell != MISSING and energy.get("kind") != "measured" else cell


def _table(reports: Sequence[dict], scores: dict) -> tuple[list[str], list[list[str]]]:
    """Headers and string cells shared by the markdown, HTML and rich tables."""
    with_task = any(_get(r, "quality", "task_accuracy") is not None for r in reports)
    with_score = len(reports) > 1  # the score normalizes within a set: alone it says nothing
    headers = ["model", "ppl", "KL", "top-1", "cloze", *(["task acc"] if with_task else []), "weights MB",
               "peak RSS MB", "prefill ms", "tok/s b1", "tok/s b8", "J/token",
               *(["score"] if with_score else [])]
    rows = []
    for r, row in zip(reports, scores["rows"]):
        q, e = r["quality"], r["efficiency"]
        task = [_f(q.get("task_accuracy"), ".3f")] if with_task else []
        rows.append([r["label"], _f(q.get("ppl"), ".2f"), _f(q.get("kl"), ".3g"), _f(q.get("top1"), ".3f"),
                     _f(q.get("cloze"), ".3f"), *task, _f(e.get("weights_mb"), ".1f"),
                     _f(e.get("peak_rss_mb"), ".0f"), _f(e.get("prefill_ms"), ".1f"),
                     _f(e.get("decode_tok_s"), ".1f"), _f(_batch_speed(r, 8), ".1f"),
                     _energy_cell(r), *([_f(row["score"], ".3f")] if with_score else [])])
    return headers, rows


def render_table(reports: Sequence[dict], weights: ScoreWeights = ScoreWeights()) -> Table:
    """A rich Table with the same columns as report.md, for the CLI to print."""
    from rich.table import Table
    reports = _unique_labels(reports)
    headers, rows = _table(reports, weighted_scores(reports, weights))
    table = Table(title="pocketlm evaluation")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def _protocol_diff(reports: Sequence[dict]) -> list[str]:
    protos = [r.get("protocol") or {} for r in reports]
    keys = sorted({k for p in protos for k in p})
    return [k for k in keys if any(p.get(k) != protos[0].get(k) for p in protos[1:])]


def _plot(path: Path, reports: list[dict], xs: list[float], front: list[int], xlabel: str,
          ylabel: str, ys: list[float], title: str, steps: str) -> None:
    # Figure + Agg canvas directly: no pyplot global state, no display needed, safe in threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rest = [i for i in range(len(reports)) if i not in front]
    if rest:
        ax.scatter([xs[i] for i in rest], [ys[i] for i in rest], color="0.6", label="dominated", zorder=2)
    ax.scatter([xs[i] for i in front], [ys[i] for i in front], color="tab:red", s=60,
               label="Pareto front", zorder=3)
    order = sorted(front, key=lambda i: xs[i])
    ax.plot([xs[i] for i in order], [ys[i] for i in order], color="tab:red", drawstyle=steps, lw=1.2, zorder=1)
    seen: dict[tuple, int] = {}
    x_span, y_span = (max(v) - min(v) or 1.0 for v in (xs, ys))
    for i, r in enumerate(reports):
        # Stack the labels of points within ~2% of each other; '$' would start mathtext in a label.
        cell = (round(xs[i] / x_span * 50), round(ys[i] / y_span * 50))
        k = seen[cell] = seen.get(cell, -1) + 1
        ax.annotate(r["label"].replace("$", r"\$"), (xs[i], ys[i]), xytext=(5, 5 + 10 * k),
                    textcoords="offset points", fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def _plots(tmp: Path, reports: list[dict], metric: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Draw the plots into `tmp`; returns ([(file, caption)], notes about what was left out)."""
    fronts = quality_fronts(reports)
    if metric == "task_accuracy":
        ys, ylabel = [_get(r, "quality", "task_accuracy") for r in reports], "task accuracy (higher is better)"
    else:
        ys, ylabel = [_get(r, "quality", "ppl") for r in reports], "perplexity (lower is better)"
    plots, notes = [], []
    # Size: smaller x is better -> steps-post; speed: larger x is better -> steps-pre (attainment outline).
    specs = ((SIZE_PNG, "weights_mb", "weights (MB)", "quality vs size", "quality_vs_size", "steps-post"),
             (SPEED_PNG, "decode_tok_s", "decode tok/s (batch 1)", "quality vs speed", "quality_vs_speed", "steps-pre"))
    for name, field, xlabel, title, key, steps in specs:
        have = [i for i, r in enumerate(reports) if _positive(_get(r, "efficiency", field)) is not None]
        if not have:
            notes.append(f"{name} not drawn: no report has {xlabel}"
                         + (" (evaluated with --no-speed)" if field == "decode_tok_s" else ""))
            continue
        if len(have) < len(reports):
            left = [r["label"] for i, r in enumerate(reports) if i not in have]
            notes.append(f"{name}: left out {', '.join(left)} (no {xlabel})")
        sub = [reports[i] for i in have]
        front = [have.index(i) for i in fronts[key]]
        _plot(tmp / name, sub, [float(r["efficiency"][field]) for r in sub], front, xlabel, ylabel,
              [ys[i] for i in have], title, steps)
        plots.append((name, title))
    return plots, notes


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _costs(reports: list[dict], inputs) -> list[tuple]:
    """Per report: cost per 1M tokens (energy, hardware, total), per 1,000 requests, × cloud, energy kind."""
    from ..fleet.cost import cost_from_eval_report
    rows = []
    for r in reports:
        try:
            c = cost_from_eval_report(r, inputs)
        except DataError:  # no speed or energy measured: nothing to price
            rows.append((r["label"], *[MISSING] * 6))
            continue
        fmt = lambda v: MISSING if v is None else f"{v:.4g}"  # noqa: E731
        rows.append((r["label"], *(fmt(c[k]) for k in ("energy_per_1m_tokens", "hardware_per_1m_tokens",
                                                         "total_per_1m_tokens", "per_1000_requests", "ratio_to_cloud")),
                     "estimated" if c["estimated"] else "measured"))
    return rows


def _context(reports: list[dict], weights: ScoreWeights, cost=None) -> dict:
    scores = weighted_scores(reports, weights)
    headers, rows = _table(reports, scores)
    protocol = reports[0].get("protocol") or {}
    diff = _protocol_diff(reports)
    est = set()
    for r in reports:
        energy = r.get("energy") or {}
        if energy.get("joules_per_token") is not None and energy.get("kind") != "measured":
            wpc = energy.get("watts_per_core")
            est.add(f"{energy.get('source') or 'unknown source'}"
                    + (f" ({wpc:g} W/core)" if isinstance(wpc, (int, float)) else ""))
    machines = [f"{r['label']}: " + ", ".join(f"{k} {v}" for k, v in (r.get("machine") or {}).items() if v is not None)
                for r in reports]
    warnings = list(scores["notes"])
    if diff:
        warnings.append("protocols differ between reports in: " + ", ".join(diff)
                        + " — quality numbers may not be comparable")
    fronts = {k.replace("_", " "): ", ".join(v) if v else MISSING for k, v in scores["fronts"].items()}
    routing = [(r["label"], f"{q['mean_active_experts']:.2f}", f"{q['mean_cv']:.2f}",
                ", ".join(f"{x['cv']:.2f}" for x in q["layers"] if x["cv"] is not None))
               for r in reports if (q := (r.get("quality") or {}).get("routing"))]
    cost_note = None if cost is None else (
        f"kWh {cost.kwh_price:g}, hardware {cost.hardware_price:g} over {cost.lifetime_years:g} years at "
        f"{cost.utilization:.0%} use, {cost.tokens_per_request:g} tokens per request"
        + (f", cloud {cost.cloud_price_per_1m_tokens:g} per 1M tokens" if cost.cloud_price_per_1m_tokens else ""))
    return {"reports": reports, "scores": scores, "headers": headers, "rows": rows, "warnings": warnings, "fronts": fronts,
            "routing": routing, "costs": _costs(reports, cost) if cost is not None else [], "cost_note": cost_note,
            "protocol": {k: v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)
                         for k, v in protocol.items()},
            "protocol_from": reports[0]["label"], "estimated": sorted(est), "machines": machines}


def _markdown(ctx: dict, plots: list[tuple[str, str]], plot_notes: list[str]) -> str:
    s = ctx["scores"]
    lines = ["# pocketlm evaluation report", "", "## Results", "",
             "| " + " | ".join(ctx["headers"]) + " |", "|" + "---|" * len(ctx["headers"])]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in ctx["rows"]]
    lines += ["", f"{MISSING}: not measured. KL and top-1 are against the baseline model."]
    if ctx["estimated"]:
        lines.append("J/token marked (est.) is estimated, not measured: " + "; ".join(ctx["estimated"]) + ".")
    lines += ["", "## Score", "", f"`{s['formula']}`", ""]
    lines += [f"- {d}" for d in s["definitions"]]
    lines += [f"- weights: w_time = {s['weights']['w_time']:g}, w_energy = {s['weights']['w_energy']:g}"]
    lines += [f"- Pareto front, {k}: {_md_cell(v)}" for k, v in ctx["fronts"].items()]
    lines += [""] + [f"> **Warning:** {_md_cell(w)}" for w in ctx["warnings"]]
    lines += ["", "## Plots", ""] + [f"![{cap}]({name})" for name, cap in plots] + [f"- {n}" for n in plot_notes]
    if ctx["costs"]:
        lines += ["", "## Cost (on-prem)", "", f"{ctx['cost_note']}; decode at batch 1.", "",
                  "| " + " | ".join(COST_HEADERS) + " |", "|" + "---|" * len(COST_HEADERS)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in ctx["costs"]]
    if ctx["routing"]:
        lines += ["", "## Expert routing (MoE models)", "", ROUTING_NOTE, "",
                  "| model | mean active experts | mean CV | CV per layer |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in ctx["routing"]]
    lines += ["", f"## Protocol (from {_md_cell(ctx['protocol_from'])})", "", "| setting | value |", "|---|---|"]
    lines += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in ctx["protocol"].items()]
    lines += ["", "## Machines", ""] + [f"- {_md_cell(m)}" for m in ctx["machines"]]
    return "\n".join(lines) + "\n"


COST_HEADERS = ("model", "energy / 1M tokens", "hardware / 1M tokens", "total / 1M tokens", "per 1,000 requests",
                "× cloud", "energy")

ROUTING_NOTE = ("Over the perplexity text: tokens routed per expert, per layer. CV is the coefficient of "
                "variation of the counts (0: perfectly balanced).")

HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pocketlm evaluation report</title>
<style>
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px}
td{text-align:right}td:first-child{text-align:left}th{background:#f3f3f3}
.warn{background:#fff4e0;border-left:4px solid #e69500;padding:6px 10px;margin:6px 0}
code{background:#f3f3f3;padding:2px 4px}img{max-width:100%;margin:1em 0}
</style></head><body>
<h1>pocketlm evaluation report</h1>
<h2>Results</h2>
<table><tr>{% for h in headers %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in rows %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>
{% endfor %}</table>
<p>{{ missing }}: not measured. KL and top-1 are against the baseline model.
{% if estimated %}J/token marked (est.) is estimated, not measured: {{ estimated|join("; ") }}.{% endif %}</p>
<h2>Score</h2>
<p><code>{{ scores.formula }}</code></p>
<ul>{% for d in scores.definitions %}<li>{{ d }}</li>{% endfor %}
<li>weights: w_time = {{ scores.weights.w_time }}, w_energy = {{ scores.weights.w_energy }}</li>
{% for k, v in fronts.items() %}<li>Pareto front, {{ k }}: {{ v }}</li>{% endfor %}</ul>
{% for w in warnings %}<div class="warn">Warning: {{ w }}</div>{% endfor %}
<h2>Plots</h2>
{% for name, cap in plots %}<figure><img src="{{ name }}" alt="{{ cap }}"><figcaption>{{ cap }}</figcaption></figure>
{% endfor %}{% for n in plot_notes %}<p>{{ n }}</p>{% endfor %}
{% if costs %}<h2>Cost (on-prem)</h2><p>{{ cost_note }}; decode at batch 1.</p>
<table><tr>{% for h in cost_headers %}<th>{{ h }}</th>{% endfor %}</tr>
{% for row in costs %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% if routing %}<h2>Expert routing (MoE models)</h2><p>{{ routing_note }}</p>
<table><tr><th>model</th><th>mean active experts</th><th>mean CV</th><th>CV per layer</th></tr>
{% for row in routing %}<tr>{% for c in row %}<td>{{ c }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
<h2>Protocol (from {{ protocol_from }})</h2>
<table><tr><th>setting</th><th>value</th></tr>
{% for k, v in protocol.items() %}<tr><td>{{ k }}</td><td>{{ v }}</td></tr>{% endfor %}</table>
<h2>Machines</h2><ul>{% for m in machines %}<li>{{ m }}</li>{% endfor %}</ul>
</body></html>
"""


def write_report(reports: Sequence[dict], out_dir: str | os.PathLike, weights: ScoreWeights = ScoreWeights(),
                 overwrite: bool = False, cost=None) -> Path:
    """Write a comparison report directory.

    Args:
        reports: EvalReport dicts (see `load_reports`); duplicate labels get '#2'… suffixes.
        out_dir: the directory to create; written to a temporary directory and moved into place.
        weights: the score weights (default ScoreWeights(): w_time 0.2, w_energy 0.2).
        overwrite: replace an existing `out_dir` (default False raises OutputExistsError).
        cost: fleet.cost.CostInputs: add a cost table (per 1M tokens and per 1,000 requests, beside a cloud
            price) from each report's J/token and decode tok/s.

    Writes report.md, report.html (standalone, images by relative path), report.json
    ({"score": weighted_scores(...), "reports": [...]}) and quality_vs_size.png /
    quality_vs_speed.png (the latter only when some report has a decode speed).
    Returns the output directory.
    """
    ctx = _prepare(reports, weights, cost)  # before atomic_dir, so bad input leaves nothing behind
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        _render(ctx, tmp)
    return Path(out_dir)


def render_report(reports: Sequence[dict], directory: str | os.PathLike,
                  weights: ScoreWeights = ScoreWeights()) -> Path:
    """The files of `write_report`, written into an existing directory that the caller makes atomic."""
    _render(_prepare(reports, weights), Path(directory))
    return Path(directory)


def _prepare(reports: Sequence[dict], weights: ScoreWeights, cost=None) -> dict:
    if not reports:
        raise DataError("no evaluation reports given", FIX)
    for i, r in enumerate(reports):
        _check(r, f"report {i + 1}")
    return _context(_unique_labels(reports), weights, cost)


def _render(ctx: dict, directory: Path) -> None:
    import jinja2
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    plots, plot_notes = _plots(directory, ctx["reports"], ctx["scores"]["quality_metric"])
    (directory / "report.md").write_text(_markdown(ctx, plots, plot_notes), encoding="utf-8")
    html = env.from_string(HTML).render(**ctx, plots=plots, plot_notes=plot_notes, missing=MISSING,
                                        routing_note=ROUTING_NOTE, cost_headers=COST_HEADERS)
    (directory / "report.html").write_text(html, encoding="utf-8")
    payload = {"score": ctx["scores"], "reports": ctx["reports"]}
    (directory / "report.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
