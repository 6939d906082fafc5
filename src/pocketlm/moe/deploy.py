"""How an MoE model runs on the device, as one config that every command and an artifact share.

    cfg = MoEDeployConfig(resident=0.25, bits_budget_mb=6, top_p=0.8)
    cfg = plan(model, tok, cfg)          # the expert-wise bit plan, from calibration (once)
    save_deploy(model, tok, cfg, "art")  # an artifact that `pocketlm.load("art")` runs this way
    rt = deploy(model, cfg)              # or apply it now: offloaded, bit-mixed, dynamic top-k

The plan is stored with the config, so loading an artifact quantizes its experts by it without
calibrating again; the artifact itself keeps the float weights (the expert store is a machine-local
cache written at load, see `moe.store`).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..config import BaseConfig, check, config_from_dict, register_config
from ..errors import ConfigError, CorruptModelError
from .block import Routing
from .runtime import MoERuntime, offload_experts, require_moe

RECORD_KEY = "moe_deploy"  # in pocketlm.json


@register_config
@dataclasses.dataclass(frozen=True)
class MoEDeployConfig(BaseConfig):
    """resident (a share in (0, 1] or a count of experts) or expert_memory_mb: the cache budget (neither:
    every expert resident); policy lru|lfu; prefetch the next layer's likely expert; bits_budget_mb:
    expert-wise 8/4-bit mix within this size (int4 groups of group_size, planned on calib_samples
    windows); top_p / threshold: dynamic top-k; bits: the plan, per layer per expert (set by `plan`)."""

    resident: float | int | None = None
    expert_memory_mb: float | None = None
    policy: str = "lfu"
    prefetch: bool = False
    bits_budget_mb: float | None = None
    group_size: int = 32
    calib_samples: int = 32
    top_p: float | None = None
    threshold: float | None = None
    bits: list | None = None

    kind: ClassVar[str] = "moe_deploy"

    def validate(self) -> None:
        check(self.resident is None or self.expert_memory_mb is None,
              "both resident experts and expert memory given", "pass one of --resident-experts, --expert-memory-mb")
        check(self.policy in ("lru", "lfu"), f"unknown eviction policy '{self.policy}'", "use lru or lfu")
        check(self.bits_budget_mb is None or self.bits_budget_mb > 0, "the expert bit budget must be positive",
              "pass --expert-bits-mb above 0")
        check(self.group_size in (32, 64, 128, 256), f"int4 group size {self.group_size} is not one the kernel takes",
              "use 32, 64, 128 or 256")
        check(self.calib_samples >= 1, "calib_samples must be ≥ 1", "use e.g. 32")
        self.routing()  # its own checks

    def routing(self) -> Routing:
        return Routing(top_p=self.top_p, threshold=self.threshold)

    def merged(self, **changes) -> "MoEDeployConfig":
        """This config with the given (non-None) fields changed; a new bit budget drops the old plan."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "resident" in changes or "expert_memory_mb" in changes:  # one budget replaces the other
            changes.setdefault("resident", None)
            changes.setdefault("expert_memory_mb", None)
        if {"bits_budget_mb", "group_size"} & changes.keys():
            changes["bits"] = None
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_record(cls, record: dict) -> "MoEDeployConfig | None":
        data = record.get(RECORD_KEY)
        return None if data is None else config_from_dict(data, cls)


def plan(model, tok, cfg: MoEDeployConfig, show_progress: bool = True) -> MoEDeployConfig:
    """cfg with its bit plan, calibrated on the embedded training text (kept when it already has one)."""
    from .bits import plan_bits
    require_moe(model)
    if cfg.bits_budget_mb is None or cfg.bits is not None:
        return cfg
    bits = plan_bits(model, tok, cfg.bits_budget_mb, cfg.group_size, cfg.calib_samples, show_progress)
    return dataclasses.replace(cfg, bits=bits)


def deploy(model, cfg: MoEDeployConfig) -> MoERuntime:
    """Run `model` (in place) as cfg says; the runtime is also kept as `model.pocketlm_moe`."""
    blocks = require_moe(model)
    if cfg.bits_budget_mb is not None and cfg.bits is None:
        raise ConfigError("an expert bit budget without a bit plan", "plan it first with moe.deploy.plan(model, tok, cfg)")
    if cfg.bits is not None and len(cfg.bits) != len(blocks):
        raise CorruptModelError(f"the saved expert bit plan has {len(cfg.bits)} layers, the model "
                                f"{len(blocks)} MoE layers", "re-create the artifact with `pocketlm moe deploy`")
    resident = cfg.resident if cfg.resident is not None or cfg.expert_memory_mb is not None else 1.0
    rt = offload_experts(model, resident=resident, expert_memory_mb=cfg.expert_memory_mb, policy=cfg.policy,
                         prefetch=cfg.prefetch, routing=cfg.routing(), bits=cfg.bits, group_size=cfg.group_size)
    rt.config = cfg
    model.pocketlm_moe = rt
    return rt


def save_deploy(model, tok, cfg: MoEDeployConfig, out, overwrite: bool = False):
    """Save `model` (its float experts intact: call before `deploy`) with cfg in its record."""
    from ..io import save
    require_moe(model)
    model.pocketlm_record = {**(getattr(model, "pocketlm_record", {}) or {}), RECORD_KEY: cfg.to_dict()}
    return save(model, tok, out, recipe=[{k: v for k, v in cfg.to_dict().items() if k != "bits"}],
                overwrite=overwrite)
