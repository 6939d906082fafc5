"""Recipes: ordered compression passes written in YAML, checked whole before any work starts.

    name: minitron-50
    description: prune width to half, then recover by KD
    passes:
      - kind: prune_width
        target_ratio: 0.5
      - kind: kd
        steps: 400

Each pass is a registered pass config (its `kind` and options, as `config.to_dict()` writes them).
Order rules: pruning comes before quantization, at most one quantization pass, and after it only KD
recovery. Built-in recipes live in pocketlm/assets/recipes/; `compress_` stores the applied passes in
the artifact, and `apply_recipe` also stores the recipe as written.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from ..config import CONFIG_TYPES, config_from_dict
from ..errors import ConfigError, DataError
from ..io import ASSETS
from .api import PassConfig, compress_

BUILTIN = ASSETS / "recipes"


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    passes: tuple[PassConfig, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "passes": [p.to_dict() for p in self.passes]}


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.yaml"))


def pass_kinds() -> list[str]:
    """Every registered pass (pocketlm.compress imports them all before this module)."""
    return sorted(k for k, c in CONFIG_TYPES.items() if issubclass(c, PassConfig))


def is_quantization(cfg: PassConfig) -> bool:
    return type(cfg).__module__.startswith("pocketlm.compress.quant.")


def load_recipe(spec: str | Path) -> Recipe:
    """A recipe from a YAML file, or a built-in by name."""
    path = Path(spec).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"recipe file '{path}' cannot be read ({e.__class__.__name__})",
                            "pass a UTF-8 YAML recipe file") from None
        return parse_recipe(text, path.stem)
    if str(spec) in builtin_recipes():
        return parse_recipe((BUILTIN / f"{spec}.yaml").read_text(encoding="utf-8"), str(spec))
    raise ConfigError(f"recipe '{spec}' is neither a file nor a built-in recipe",
                      f"give a YAML file or one of: {', '.join(builtin_recipes())}")


def parse_recipe(text: str, name: str) -> Recipe:
    """Build and check every pass (unknown pass, unknown option, bad value, bad order → ConfigError)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe '{name}' is not valid YAML ({e.__class__.__name__})", "fix the YAML syntax") from None
    if not isinstance(data, dict) or not isinstance(data.get("passes"), list) or not data["passes"]:
        raise ConfigError(f"recipe '{name}' has no list of passes", "write `passes:` with one `- kind: ...` per pass")
    kinds = pass_kinds()
    passes = []
    for i, entry in enumerate(data["passes"], 1):
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind not in kinds:
            raise ConfigError(f"recipe '{name}', pass {i}: unknown pass '{kind}'", f"use one of: {', '.join(kinds)}")
        try:
            passes.append(config_from_dict(entry, PassConfig))
        except ConfigError as e:
            raise ConfigError(f"recipe '{name}', pass {i} ({kind}): {e.problem}", e.fix) from None
    _check_order(name, passes)
    return Recipe(str(data.get("name") or name), str(data.get("description") or ""), tuple(passes))


def _check_order(name: str, passes: list[PassConfig]) -> None:
    quantized = None
    for i, cfg in enumerate(passes, 1):
        if quantized is not None and not cfg.needs_teacher:
            problem = ("a second quantization pass" if is_quantization(cfg) else f"{cfg.kind} after quantization")
            raise ConfigError(f"recipe '{name}', pass {i}: {problem} (pass {quantized} quantized the model)",
                              "prune first, quantize once, and put only kd recovery after quantization")
        if is_quantization(cfg):
            quantized = i
            if cfg.kind == "smoothquant" and any(p.needs_teacher for p in passes[i:]):
                raise ConfigError(f"recipe '{name}': kd after smoothquant cannot train through int8 activations",
                                  "recover before smoothquant, or use a weight-only method")


def apply_recipe(model, recipe: Recipe, **kwargs) -> list[dict]:
    """`compress_` with the recipe's passes; the recipe as written is stored in the artifact's record."""
    applied = compress_(model, list(recipe.passes), **kwargs)
    model.pocketlm_record.setdefault("recipes", []).append(recipe.to_dict())
    return applied
