"""The MoE deployment options that generate, chat, eval, serve and `moe deploy` share.

Each command declares them with these defaults and passes them to `moe_overrides`, whose dict goes to
`pocketlm.load(..., moe=...)`: values given change the artifact's saved deployment, if it has one.
"""
from __future__ import annotations

from typing import Optional

import typer

from .errors import ConfigError

RESIDENT = typer.Option(None, "--resident-experts",
                        help="MoE: experts kept in memory, a count (12) or a share (0.25); the rest load from disk.")
EXPERT_MEMORY = typer.Option(None, "--expert-memory-mb", help="MoE: instead, memory for resident experts, MB.")
EXPERT_BITS = typer.Option(None, "--expert-bits-mb",
                           help="MoE: quantize experts to a per-expert 8/4-bit mix of this size, MB (calibrated).")
MOE_TOP_P = typer.Option(None, "--moe-top-p", help="MoE dynamic top-k: fewest experts whose router mass reaches P.")
MOE_THRESHOLD = typer.Option(None, "--moe-threshold",
                             help="MoE dynamic top-k: experts whose router probability is ≥ T.")


def resident_value(value: Optional[str]) -> float | int | None:
    """'0.25' → a share of all experts; '12' → a count."""
    if value is None:
        return None
    try:
        return int(value) if value.strip().isdigit() else float(value)
    except ValueError:
        raise ConfigError(f"--resident-experts '{value}' is neither a count nor a share",
                          "pass e.g. 12 (experts) or 0.25 (of all experts)") from None


def moe_overrides(resident_experts: Optional[str], expert_memory_mb: Optional[float],
                  expert_bits_mb: Optional[float], moe_top_p: Optional[float],
                  moe_threshold: Optional[float]) -> dict:
    """The given options as MoEDeployConfig fields, checked now (before any model loads)."""
    from .moe.deploy import MoEDeployConfig
    changes = {"resident": resident_value(resident_experts), "expert_memory_mb": expert_memory_mb,
               "bits_budget_mb": expert_bits_mb, "top_p": moe_top_p, "threshold": moe_threshold}
    changes = {k: v for k, v in changes.items() if v is not None}
    MoEDeployConfig().merged(**changes)  # raises ConfigError on an impossible value
    return changes
