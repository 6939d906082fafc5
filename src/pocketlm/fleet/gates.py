"""Acceptance gates: `METRIC OP EXPR` lines checked against a candidate's report (and the incumbent's).

EXPR is arithmetic over numbers and the name `incumbent`, parsed with `ast` and walked by hand — never
eval() — so a gate file cannot run code. A gate that cannot be checked (metric missing) fails.
"""
from __future__ import annotations

import ast
import dataclasses
import json
import math
import operator
import re
from pathlib import Path

import yaml

from ..errors import ConfigError, DataError

_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
# Two-character operators first so `>=` is not read as `>` followed by `=EXPR`.
_GATE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(>=|<=|==|>|<)\s*(.+?)\s*$")
_BIN = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_GATE_FIX = "write a gate as 'METRIC OP EXPR', OP one of >= <= > < ==, EXPR numbers and 'incumbent' with + - * / ( )"


def _bad(gate: str, part: str) -> ConfigError:
    return ConfigError(f"gate {gate!r}: {part} is not allowed", _GATE_FIX)


def _check_tree(node: ast.AST, gate: str) -> bool:
    """Validate the expression; return whether it uses `incumbent`."""
    if isinstance(node, ast.Constant):
        # bool is an int subclass; True in a gate is a typo, not a number.
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise _bad(gate, f"constant {node.value!r}")
        return False
    if isinstance(node, ast.Name):
        if node.id != "incumbent":
            raise _bad(gate, f"name {node.id!r}")
        return True
    if isinstance(node, ast.BinOp):
        if type(node.op) not in _BIN:
            raise _bad(gate, f"operator {type(node.op).__name__}")
        return _check_tree(node.left, gate) | _check_tree(node.right, gate)
    if isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY:
            raise _bad(gate, f"operator {type(node.op).__name__}")
        return _check_tree(node.operand, gate)
    raise _bad(gate, f"{type(node).__name__} ({ast.unparse(node)!r})")


def _evaluate(node: ast.AST, incumbent: float | None) -> float:
    if isinstance(node, ast.Constant):
        return float(node.value)
    if isinstance(node, ast.Name):
        if incumbent is None:
            raise ValueError("no incumbent value")
        return float(incumbent)
    if isinstance(node, ast.BinOp):
        return _BIN[type(node.op)](_evaluate(node.left, incumbent), _evaluate(node.right, incumbent))
    return _UNARY[type(node.op)](_evaluate(node.operand, incumbent))


def _parse_expr(expr: str, gate: str) -> tuple[ast.AST, bool]:
    try:
        tree = ast.parse(expr, mode="eval").body
    except SyntaxError as e:
        raise ConfigError(f"gate {gate!r}: expression {expr!r} does not parse ({e.msg})", _GATE_FIX) from None
    return tree, _check_tree(tree, gate)


def _lookup(values: dict | None, metric: str):
    """Resolve a dotted metric through nested dicts; None where any step is missing."""
    cur = values
    for key in metric.split("."):
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


@dataclasses.dataclass(frozen=True)
class GateResult:
    gate: str
    metric: str
    value: float | None
    threshold: float | None
    passed: bool
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class Gate:
    text: str
    metric: str
    op: str
    expr: str

    @property
    def uses_incumbent(self) -> bool:
        return _parse_expr(self.expr, self.text)[1]

    def threshold(self, incumbent: float | None) -> float:
        """The value the metric is compared with; ValueError if it needs an incumbent and has none."""
        return _evaluate(_parse_expr(self.expr, self.text)[0], incumbent)

    def check(self, report: dict) -> GateResult:
        candidate, incumbent = _split_report(report)
        fail = lambda value, threshold, reason: GateResult(self.text, self.metric, value, threshold, False, reason)
        raw = _lookup(candidate, self.metric)
        if raw is None:
            return fail(None, None, f"metric {self.metric!r} missing from the candidate")
        value = _number(raw)
        if value is None:
            return fail(None, None, f"metric {self.metric!r} in the candidate is not a number ({raw!r})")
        inc = None
        if self.uses_incumbent:
            inc_raw = _lookup(incumbent, self.metric)
            if inc_raw is None:
                return fail(value, None, f"metric {self.metric!r} missing from the incumbent")
            inc = _number(inc_raw)
            if inc is None:
                return fail(value, None, f"metric {self.metric!r} in the incumbent is not a number ({inc_raw!r})")
        try:
            threshold = self.threshold(inc)
        except ZeroDivisionError:
            return fail(value, None, "threshold divides by zero")
        # NaN compares false either way; say so rather than report a bare failure.
        if math.isnan(value) or math.isnan(threshold):
            return fail(value, threshold, "value or threshold is NaN")
        if _OPS[self.op](value, threshold):
            return GateResult(self.text, self.metric, value, threshold, True, "")
        return fail(value, threshold, f"{self.metric} = {value:g} is not {self.op} {threshold:g}")


def _split_report(report: dict) -> tuple[dict, dict | None]:
    """A report is {candidate: {...}, incumbent: {...}} or a flat dict of the candidate's metrics."""
    if isinstance(report, dict) and isinstance(report.get("candidate"), dict):
        inc = report.get("incumbent")
        return report["candidate"], inc if isinstance(inc, dict) else None
    return report, None


def parse_gate(text: str) -> Gate:
    """Parse one `METRIC OP EXPR` gate; ConfigError on anything else."""
    if not isinstance(text, str):
        raise ConfigError(f"gate {text!r} is not a string", _GATE_FIX)
    m = _GATE_RE.match(text)
    if not m:
        raise ConfigError(f"gate {text!r} is not 'METRIC OP EXPR'", _GATE_FIX)
    metric, op, expr = m.groups()
    if any(not part for part in metric.split(".")):
        raise ConfigError(f"gate {text!r}: metric {metric!r} has an empty dotted part", _GATE_FIX)
    _parse_expr(expr, text)  # validate now, so a bad file fails at load rather than at check
    return Gate(text.strip(), metric, op, expr)


def _read_text(path: Path, what: str, fix: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist", fix) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{what} {path} cannot be read ({e})", fix) from None


def load_gates(path) -> list[Gate]:
    """Gates from a YAML file: a list of gate strings, or {gates: [...]}."""
    path = Path(path)
    fix = "give a YAML file with a list of gates, e.g. '- task_accuracy >= incumbent - 0.01'"
    text = _read_text(path, "gate file", fix)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise DataError(f"gate file {path} is not valid YAML ({str(e).splitlines()[0]})", fix) from None
    if isinstance(data, dict):
        if "gates" not in data:
            raise ConfigError(f"gate file {path} is a mapping without a 'gates' key", fix)
        data = data["gates"]
    if not data:
        raise DataError(f"gate file {path} has no gates", fix)
    if not isinstance(data, list):
        raise ConfigError(f"gate file {path}: gates must be a list, got {type(data).__name__}", fix)
    return [parse_gate(g) for g in data]


def check_gates(report: dict, gates: list[Gate]) -> tuple[bool, list[GateResult]]:
    """(all passed, per-gate results). No gates is not a pass: nothing was accepted."""
    results = [g.check(report) for g in gates]
    return bool(results) and all(r.passed for r in results), results


def read_report(path) -> dict:
    """A JSON report file as a dict; DataError if missing, not JSON or not an object."""
    path = Path(path)
    fix = "give the JSON report written by 'pocketlm eval --json' (or a {candidate, incumbent} object)"
    text = _read_text(path, "report", fix)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"report {path} is not JSON ({e.msg} at line {e.lineno})", fix) from None
    if not isinstance(data, dict):
        raise DataError(f"report {path} is a JSON {type(data).__name__}, not an object", fix)
    return data
