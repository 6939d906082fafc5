"""Cost per 1M tokens and per 1,000 requests: energy at a kWh price plus the machine spread over its serving life.

An estimated energy figure (CPU-time model, not a meter) stays labelled `estimated` in the result.
"""
from __future__ import annotations

import dataclasses
import math

from ..errors import ConfigError, DataError

_SECONDS_PER_YEAR = 365.25 * 24 * 3600
_JOULES_PER_KWH = 3.6e6


def _positive(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@dataclasses.dataclass(frozen=True)
class CostInputs:
    kwh_price: float = 0.30            # currency per kWh
    hardware_price: float = 1000.0     # currency, the machine
    lifetime_years: float = 3.0
    utilization: float = 0.5           # share of the lifetime the machine is serving
    tokens_per_request: float = 256.0
    cloud_price_per_1m_tokens: float | None = None  # a stated cloud price to compare with

    def __post_init__(self):
        for name in ("kwh_price", "hardware_price", "lifetime_years", "tokens_per_request"):
            value = getattr(self, name)
            if not _positive(value):
                raise ConfigError(f"cost input {name} = {value!r} must be a positive number", f"set {name} above 0")
        if not _positive(self.utilization) or self.utilization > 1:
            raise ConfigError(f"cost input utilization = {self.utilization!r} must be in (0, 1]",
                              "give the share of the lifetime the machine serves, e.g. 0.5")
        cloud = self.cloud_price_per_1m_tokens
        if cloud is not None and not _positive(cloud):
            raise ConfigError(f"cost input cloud_price_per_1m_tokens = {cloud!r} must be a positive number",
                              "give the cloud price per 1M tokens, or leave it unset")


def cost_report(joules_per_token: float, tokens_per_s: float, energy_kind: str,
                inputs: CostInputs = CostInputs()) -> dict:
    """Energy, hardware and total cost per 1M tokens, per 1,000 requests, and the ratio to a cloud price."""
    if not _positive(joules_per_token):
        raise DataError(f"joules per token = {joules_per_token!r} must be a positive number",
                        "measure energy with 'pocketlm eval' (without --no-speed)")
    if not _positive(tokens_per_s):
        raise DataError(f"tokens/s = {tokens_per_s!r} must be a positive number",
                        "measure decode speed with 'pocketlm eval' (without --no-speed)")
    energy = joules_per_token / _JOULES_PER_KWH * inputs.kwh_price
    # Tokens the machine serves over its life at this speed and utilization carry its price.
    hardware = inputs.hardware_price / (inputs.lifetime_years * _SECONDS_PER_YEAR * inputs.utilization * tokens_per_s)
    total = energy + hardware
    cloud = inputs.cloud_price_per_1m_tokens
    return {
        "energy_per_1m_tokens": energy * 1e6,
        "hardware_per_1m_tokens": hardware * 1e6,
        "total_per_1m_tokens": total * 1e6,
        "per_1000_requests": total * inputs.tokens_per_request * 1000,
        "cloud_per_1m_tokens": cloud,
        "ratio_to_cloud": total * 1e6 / cloud if cloud is not None else None,
        "energy_kind": energy_kind,
        "estimated": energy_kind != "measured",
        "inputs": dataclasses.asdict(inputs),
    }


def cost_from_eval_report(report: dict, inputs: CostInputs = CostInputs()) -> dict:
    """cost_report from an EvalReport dict's efficiency.decode_tok_s and energy.joules_per_token."""
    rerun = "rerun 'pocketlm eval' without --no-speed to measure speed and energy"
    if not isinstance(report, dict):
        raise DataError(f"eval report is a {type(report).__name__}, not an object", rerun)
    energy = report.get("energy")
    if not isinstance(energy, dict) or energy.get("joules_per_token") is None:
        raise DataError("the eval report has no energy measurement", rerun)
    eff = report.get("efficiency")
    tok_s = eff.get("decode_tok_s") if isinstance(eff, dict) else None
    if tok_s is None:
        raise DataError("the eval report has no decode speed (efficiency.decode_tok_s)", rerun)
    return cost_report(energy["joules_per_token"], tok_s, energy.get("kind", "estimated"), inputs)
