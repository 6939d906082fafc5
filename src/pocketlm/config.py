"""BaseConfig: frozen dataclasses that validate themselves and round-trip to dicts and YAML.

Loading goes through an allowlist: only classes registered with `@register_config` can be built
from data, by their `kind`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import yaml

from .errors import ConfigError

CONFIG_TYPES: dict[str, type["BaseConfig"]] = {}


def register_config(cls: type["BaseConfig"]) -> type["BaseConfig"]:
    """Class decorator: allow `cls` to be loaded from data under its `kind`."""
    CONFIG_TYPES[cls.kind] = cls
    return cls


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Subclasses declare fields, a `kind`, and override `validate`; construction fails on a bad value."""

    kind: ClassVar[str] = "base"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for an impossible value."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: list(v) if isinstance(v, tuple) else v
                                      for k, v in dataclasses.asdict(self).items()}}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **changes: Any) -> "BaseConfig":
        return dataclasses.replace(self, **changes)


def config_from_dict(data: dict[str, Any], expected: type[BaseConfig] | None = None) -> BaseConfig:
    """Build a registered config from its dict; unknown kinds and unknown fields are refused."""
    if not isinstance(data, dict) or "kind" not in data:
        raise ConfigError("config data has no 'kind'", f"write one of: {', '.join(sorted(CONFIG_TYPES))}")
    data = dict(data)
    kind = data.pop("kind")
    cls = CONFIG_TYPES.get(kind)
    if cls is None:
        raise ConfigError(f"unknown config kind '{kind}'", f"use one of: {', '.join(sorted(CONFIG_TYPES))}")
    if expected is not None and not issubclass(cls, expected):
        raise ConfigError(f"config of kind '{kind}' given where '{expected.kind}' is expected",
                          f"pass a '{expected.kind}' config")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {kind} option(s): {', '.join(unknown)}", f"use only: {', '.join(sorted(names))}")
    return cls(**data)


def config_from_yaml(text: str, expected: type[BaseConfig] | None = None) -> BaseConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config is not valid YAML ({e.__class__.__name__})", "fix the YAML syntax") from None
    return config_from_dict(data, expected)


def check(condition: bool, problem: str, fix: str) -> None:
    """Raise ConfigError(problem, fix) unless condition holds."""
    if not condition:
        raise ConfigError(problem, fix)
