"""What a rescue run may be asked for, and the records it keeps of each layer.

Which neurons each op acts on (``state``; every op defaults to ``dead``):

- ``strip``: dead, leaking, asleep or dormant neurons: their incoming weights are stripped.
- ``reinit``: dead, dormant (ReDo's criterion, for GELU/SiLU layers), leaking or asleep.
- ``prune``: dead or saturated neurons whose output is constant over the audit (``max == min``,
  or within ``constant_tol``): only a constant can be folded into the consumer's bias.
- ``lift``: dead, leaking or asleep neurons, from the ``<layer>:pre`` statistics.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError
from ..wiring import ParamRef, Wiring

__all__ = [
    "OPS",
    "STATES",
    "LayerPlan",
    "Options",
    "Skip",
    "check_patterns",
    "needed",
    "refs",
    "role",
]

Op = Literal["strip", "reinit", "prune", "lift"]
OPS: tuple[str, ...] = ("strip", "reinit", "prune", "lift")
STATES: dict[str, tuple[str, ...]] = {
    "strip": ("dead", "leaking", "asleep", "dormant"),
    "reinit": ("dead", "dormant", "leaking", "asleep"),
    "prune": ("dead", "saturated"),
    "lift": ("dead", "leaking", "asleep"),
}


@dataclass(frozen=True)
class Options:
    """Settings of the ops (each op reads its own)."""

    state: str = "dead"
    fraction: float = 0.1  # strip
    init: Literal["torch", "kaiming"] = "torch"  # reinit
    match_norm: bool = False  # reinit
    seed: int = 0  # reinit
    top: float = 0.1  # lift: share of audit rows the neuron should fire on
    constant_tol: float = 0.0  # prune: max - min allowed for a "constant" output

    def check(self, op: str) -> None:
        if op not in OPS:
            raise ConfigError(f"unknown rescue op {op!r}; choose one of {', '.join(OPS)}")
        if self.state not in STATES[op]:
            raise ConfigError(
                f"{op} acts on {', '.join(STATES[op])} neurons, not {self.state!r} (--state)"
            )
        for flag, value in (
            ("--fraction", self.fraction),
            ("--top", self.top),
            ("--constant-tol", self.constant_tol),
        ):
            # Checked before anything is read: a NaN passes every range test below, and an
            # infinity would only fail when the manifest is written.
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ConfigError(f"{flag} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ConfigError(f"{flag} must be a finite number, got {value}")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}")
        if not 0.0 < self.top < 1.0:
            raise ConfigError(f"--top must be a percentage in (0, 100), got {self.top * 100}")
        if self.constant_tol < 0:
            raise ConfigError(f"--constant-tol must be >= 0, got {self.constant_tol}")
        if self.init not in ("torch", "kaiming"):
            raise ConfigError(f"--init must be 'torch' or 'kaiming', got {self.init!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            # numpy's generators take non-negative integer seeds only.
            raise ConfigError(f"--seed must be an integer >= 0, got {self.seed!r}")

    def for_op(self, op: str) -> dict[str, Any]:
        """The settings ``op`` uses, for the manifest."""
        used = {
            "strip": ("state", "fraction"),
            "reinit": ("state", "init", "match_norm", "seed"),
            "prune": ("state", "constant_tol"),
            "lift": ("state", "top"),
        }[op]
        return {name: getattr(self, name) for name in used}


@dataclass(frozen=True)
class Skip:
    """A layer (or some of its neurons) left alone, and why."""

    layer: str
    reason: str
    param: str | None = None
    neurons: tuple[int, ...] = ()

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"layer": self.layer, "reason": self.reason}
        if self.param is not None:
            data["param"] = self.param
        if self.neurons:
            data["neurons"] = list(self.neurons)
        return data


@dataclass(frozen=True)
class LayerPlan:
    layer: str
    state: str
    neurons: NDArray[np.intp]
    width: int
    new_width: int | None = None  # prune
    constants: NDArray[np.float64] | None = None  # prune: each removed neuron's output
    shifts: NDArray[np.float64] | None = None  # lift: added to the bias

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "layer": self.layer,
            "state": self.state,
            "neurons": self.neurons.tolist(),
            "width": self.width,
        }
        if self.new_width is not None:
            data["new_width"] = self.new_width
        if self.constants is not None:
            data["constants"] = self.constants.tolist()
        if self.shifts is not None:
            data["bias_shifts"] = self.shifts.tolist()
        return data


_LEAF = re.compile(r"[./:]")


def role(ref: ParamRef) -> Literal["weight", "bias", "scale"]:
    """What a wired parameter is to the neurons: a weight (2-D or more), a bias, or a per-neuron
    scale (a norm's weight). 1-D parameters are told apart by name (``bias``/``beta``), the
    only hint a state_dict or an ONNX initializer carries."""
    if len(ref.shape) >= 2:
        return "weight"
    leaf = _LEAF.split(ref.name)[-1].lower()
    return "bias" if "bias" in leaf or "beta" in leaf else "scale"


# -- selection and checks ---------------------------------------------------------------------


def check_patterns(patterns: Iterable[str], argument: str = "layers") -> tuple[str, ...]:
    """``patterns`` as a tuple of globs. A bare string is refused: iterated, ``"act1*"``
    would be the globs ``a``, ``c``, ``t``, ``1``, ``*``, and ``*`` matches every layer."""
    if isinstance(patterns, str):
        raise ConfigError(
            f"{argument} must be a list of names or globs, not a string: {argument}=[{patterns!r}]"
        )
    found = tuple(patterns)
    wrong = [p for p in found if not isinstance(p, str)]
    if wrong:
        raise ConfigError(f"{argument} must hold strings (names or globs), got {wrong[0]!r}")
    return found


def refs(wiring: Wiring) -> tuple[ParamRef, ...]:
    return (*wiring.produces, *wiring.consumes)


def needed(op: str, wiring: Wiring) -> list[ParamRef]:
    if op == "strip":
        return [r for r in wiring.produces if role(r) == "weight"]
    if op == "lift":
        return [r for r in wiring.produces if role(r) == "bias"][:1]
    if op == "reinit":
        return [r for r in wiring.produces if role(r) != "scale"] + [
            r for r in wiring.consumes if role(r) == "weight"
        ]
    return list(refs(wiring))  # prune removes the neurons everywhere


# -- per-op steps -----------------------------------------------------------------------------
