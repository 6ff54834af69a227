"""Per-layer settings: what fires, what is asleep, dormant or saturated, and when to decide."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .errors import ConfigError
from .families import FAMILIES, activation_settings, family_of
from .partials import DEFAULT_HISTOGRAM_EDGES

__all__ = ["DEFAULT_ASLEEP_BELOW", "DEFAULT_MIN_ROWS", "DEFAULT_TAU", "Kind", "LayerConfig"]

Kind = Literal["post", "pre", "attn"]
KINDS: tuple[str, ...] = ("post", "pre", "attn")

DEFAULT_MIN_ROWS = 1000
DEFAULT_ASLEEP_BELOW = 0.05
DEFAULT_TAU = 0.1


@dataclass(frozen=True)
class LayerConfig:
    """Thresholds of one monitored layer.

    Build it with :meth:`for_activation`, which fills the defaults of the activation's family;
    any field can be overridden per layer.
    """

    name: str
    kind: str = "post"
    activation: str | None = None
    family: str = "generic"
    fire_threshold: float = 0.0
    saturation_low: float = -math.inf
    saturation_high: float = math.inf
    asleep_below: float = DEFAULT_ASLEEP_BELOW
    tau: float = DEFAULT_TAU
    min_rows: int = DEFAULT_MIN_ROWS
    histogram_edges: tuple[float, ...] = field(default=DEFAULT_HISTOGRAM_EDGES)

    def __post_init__(self) -> None:
        where = f"layer {self.name!r}"
        if self.family not in FAMILIES:
            raise ConfigError(
                f"{where}: unknown activation family {self.family!r}; known: {sorted(FAMILIES)}"
            )
        if self.kind not in KINDS:
            raise ConfigError(f"{where}: kind must be one of {KINDS}, got {self.kind!r}")
        if not math.isfinite(self.fire_threshold):
            raise ConfigError(f"{where}: fire_threshold must be finite, got {self.fire_threshold}")
        if not 0.0 < self.asleep_below <= 1.0:
            raise ConfigError(
                f"{where}: asleep_below is a firing frequency in (0, 1], got {self.asleep_below}"
            )
        if not 0.0 <= self.tau < 1.0:
            raise ConfigError(f"{where}: tau must be in [0, 1), got {self.tau} (ReDo uses 0.1)")
        if self.min_rows < 1:
            raise ConfigError(f"{where}: min_rows must be >= 1, got {self.min_rows}")
        if self.saturation_low > self.saturation_high:
            raise ConfigError(
                f"{where}: saturation_low {self.saturation_low} is above "
                f"saturation_high {self.saturation_high}"
            )
        edges = self.histogram_edges
        if (
            len(edges) < 1
            or any(not math.isfinite(e) for e in edges)
            or any(b <= a for a, b in itertools.pairwise(edges))
        ):
            raise ConfigError(
                f"{where}: histogram_edges must be finite and strictly increasing, got {edges}"
            )

    @property
    def saturates(self) -> bool:
        return math.isfinite(self.saturation_low) or math.isfinite(self.saturation_high)

    @property
    def can_die(self) -> bool:
        """Whether a never-firing neuron of this layer is *dead* (no gradient below the
        threshold) rather than *leaking*; decided by the family."""
        return FAMILIES[self.family].can_die

    @classmethod
    def for_activation(
        cls,
        name: str,
        activation: str | None = None,
        kind: str = "post",
        params: Mapping[str, Any] | None = None,
        **overrides: Any,
    ) -> LayerConfig:
        """Defaults of ``activation``'s family, then what its own ``params`` imply (ReLU6's
        ``max_val``, ELU's ``alpha``), then ``overrides`` (any field of this class).

        >>> LayerConfig.for_activation("mlp.act", "GELU").fire_threshold
        0.001
        """
        family = family_of(activation)
        base = cls(
            name=name,
            kind=kind,
            activation=activation,
            family=family.name,
            fire_threshold=family.fire_threshold,
            saturation_low=family.saturation_low,
            saturation_high=family.saturation_high,
        )
        return base.with_overrides(
            **activation_settings(activation, **(params or {}))
        ).with_overrides(**overrides)

    def with_overrides(self, **overrides: Any) -> LayerConfig:
        unknown = set(overrides) - set(self.__dataclass_fields__)
        if unknown:
            raise ConfigError(
                f"layer {self.name!r}: unknown setting(s) {sorted(unknown)}; "
                f"known: {sorted(self.__dataclass_fields__)}"
            )
        if "histogram_edges" in overrides:
            overrides["histogram_edges"] = tuple(float(e) for e in overrides["histogram_edges"])
        return replace(self, **overrides)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "activation": self.activation,
            "family": self.family,
            "fire_threshold": self.fire_threshold,
            "saturation_low": _float_to_json(self.saturation_low),
            "saturation_high": _float_to_json(self.saturation_high),
            "asleep_below": self.asleep_below,
            "tau": self.tau,
            "min_rows": self.min_rows,
            "histogram_edges": list(self.histogram_edges),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerConfig:
        """The inverse of :meth:`to_json`; a wrong type raises ConfigError naming the field."""
        values = dict(data)
        for key in ("saturation_low", "saturation_high"):
            values[key] = _float_from_json(values[key])
        values["histogram_edges"] = tuple(float(e) for e in values["histogram_edges"])
        for key, kinds in _JSON_TYPES.items():
            value = values.get(key)
            wrong = isinstance(value, bool) or not isinstance(value, kinds)
            if key in values and wrong and not (key == "activation" and value is None):
                raise ConfigError(f"{key} must be {kinds}, got {value!r}")
        return cls(**values)


_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "kind": str,
    "activation": str,
    "family": str,
    "fire_threshold": (int, float),
    "asleep_below": (int, float),
    "tau": (int, float),
    "min_rows": int,
}


def _float_to_json(value: float) -> float | str:
    # JSON has no infinity; strict parsers reject the bare token Python would write.
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _float_from_json(value: float | str) -> float:
    return float(value)
