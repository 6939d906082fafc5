"""BaseConfig: frozen dataclasses that validate themselves and round-trip to plain dicts."""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from .errors import ConfigError


@dataclasses.dataclass(frozen=True)
class BaseConfig:
    """Subclasses declare fields and override `validate`; construction fails on a bad value."""

    kind: ClassVar[str] = "base"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for an impossible value."""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BaseConfig":
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if kind != cls.kind:
            raise ConfigError(f"config of kind '{kind}' given where '{cls.kind}' is expected",
                              f"pass a '{cls.kind}' config")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.kind} option(s): {', '.join(unknown)}",
                              f"use only: {', '.join(sorted(names))}")
        return cls(**data)

    def replace(self, **changes: Any) -> "BaseConfig":
        return dataclasses.replace(self, **changes)


def check(condition: bool, problem: str, fix: str) -> None:
    """Raise ConfigError(problem, fix) unless condition holds."""
    if not condition:
        raise ConfigError(problem, fix)
