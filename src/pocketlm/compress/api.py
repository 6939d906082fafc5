"""`compress_`: apply pass configs to a model in place, through a registry keyed on the config type."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch

from ..config import BaseConfig
from ..errors import ConfigError
from .calibration import calibration_tokens, release_freed_memory

HANDLERS: dict[type, Callable] = {}


@dataclasses.dataclass(frozen=True)
class PassConfig(BaseConfig):
    """Base of every compression method's config; says whether the method needs calibration data."""

    needs_calibration: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = False  # KD recovery: trains toward the model as it entered compress_


def register_pass(config_type: type[PassConfig]):
    """Decorator: `@register_pass(WandaConfig) def _wanda(model, cfg, ctx): ...`."""
    def decorate(fn: Callable) -> Callable:
        HANDLERS[config_type] = fn
        return fn
    return decorate


@dataclasses.dataclass
class PassContext:
    """What a handler may use besides the model: the tokenizer and calibration tokens (made lazily)."""

    tok: object
    calib: str | Path | torch.Tensor | None = None
    calib_samples: int = 128
    calib_len: int = 512
    show_progress: bool = True
    calib_hash: str | None = None
    teacher: object = None
    _tokens: torch.Tensor | None = None

    @property
    def tokens(self) -> torch.Tensor:
        """(samples, calib_len) calibration token ids."""
        if self._tokens is None:
            self._tokens, self.calib_hash = calibration_tokens(self.tok, self.calib, samples=self.calib_samples,
                                                               seq_len=self.calib_len)
            release_freed_memory()  # the tokenizer's buffers for the whole text
        return self._tokens


def compress_(model, configs: PassConfig | Sequence[PassConfig], *, tok=None, calib=None, calib_samples: int = 128,
              calib_len: int = 512, show_progress: bool = True, teacher=None) -> list[dict]:
    """Apply compression passes to `model` in place, in order.

    Args:
        model: a causal LM from `pocketlm.load`.
        configs: one pass config or a list (a recipe).
        tok: the tokenizer (needed by passes that use calibration data).
        calib: calibration text file, (N, L) token tensor, or None for the embedded calibration text.
        calib_samples, calib_len: calibration sequences and their length in tokens (128 × 512).
        teacher: the teacher of KD recovery passes; default a frozen copy of `model` as it is now,
            before the first pass (it costs one more copy of the model in memory while they run).

    Returns the applied configs as dicts with each pass's statistics; they are also appended to
    `model.pocketlm_record["recipe"]` so that `pocketlm.save` stores them with the artifact.
    """
    configs = [configs] if isinstance(configs, PassConfig) else list(configs)
    ctx = PassContext(tok=tok, calib=calib, calib_samples=calib_samples, calib_len=calib_len,
                      show_progress=show_progress)
    for cfg in configs:
        if type(cfg) not in HANDLERS:
            raise ConfigError(f"no compression pass is registered for {type(cfg).__name__}",
                              "use a config from pocketlm.compress")
        if (cfg.needs_calibration or cfg.needs_teacher) and tok is None:
            what = "calibration data" if cfg.needs_calibration else "training text"
            raise ConfigError(f"{cfg.kind} needs {what}, so compress_ needs the tokenizer", "pass tok=tokenizer")
    record = getattr(model, "pocketlm_record", None)
    if record is None:
        record = model.pocketlm_record = {}
    if record.get("moefy"):  # its FFNs slice their float weights per expert; passes would replace them
        raise ConfigError("compressing a moefied model is not supported yet",
                          "prune the dense model, then moefy it; quantized MoEfied FFNs do not exist yet")
    if any(cfg.needs_teacher for cfg in configs):
        ctx.teacher = teacher if teacher is not None else copy.deepcopy(model).eval().requires_grad_(False)
    applied = []
    for cfg in configs:
        stats = HANDLERS[type(cfg)](model, cfg, ctx) or {}
        applied.append({**cfg.to_dict(), "stats": stats})
    record.setdefault("recipe", []).extend(applied)
    if ctx.calib_hash:
        record["calibration_hash"] = ctx.calib_hash
    return applied
