"""Budgets on neuron states per layer: the release gate behind ``neuronwatch check``.

A :class:`Budget` caps the share of each layer's neurons that may be dead, leaking, dormant or
saturated. :func:`check_budget` judges a report against it and returns every offending layer
with its ratios; :meth:`GateResult.to_json` is the machine-readable summary for CI systems.

A layer whose window did not reach ``min_rows`` has *unknown* neurons, which are counted as
neither dead nor alive: its ratios would understate the damage, so such a layer offends too
(state ``unknown``) unless the budget says ``allow_unknown``; then it is only listed.

>>> result = check_budget(report, Budget({"dead": 0.3}))      # doctest: +SKIP
>>> [(o.layer, o.state.value, o.ratio) for o in result.offending]   # doctest: +SKIP
[('blocks.1.mlp.act', 'dead', 0.34375)]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, cast

from .config import KINDS
from .errors import ConfigError, ReportError
from .report import Report
from .states import State, parse_state
from .stats import LayerStats

__all__ = [
    "BUDGET_STATES",
    "DEFAULT_KINDS",
    "SUMMARY_SCHEMA",
    "Budget",
    "GateResult",
    "Offence",
    "check_budget",
]

# The states a budget can cap: the two that waste parameters for good (dead, saturated), the
# ReDo notion for smooth activations (dormant), and never-firing units that still pass gradient
# (leaking). Active and asleep are healthy; unknown has its own rule (allow_unknown).
BUDGET_STATES: tuple[State, ...] = (State.DEAD, State.LEAKING, State.DORMANT, State.SATURATED)
SUMMARY_SCHEMA = "neuronwatch.check/1"
# Budgets apply to what a layer outputs. A ``pre`` layer (the activation's input, watched with
# ``pre=True``) is a diagnostic: judged as a generic unit, a GELU's input that is never > 0 is
# "dead" while the GELU's output is only leaking, so gating on it would fail healthy models.
DEFAULT_KINDS: frozenset[str] = frozenset({"post", "attn"})


@dataclass(frozen=True)
class Budget:
    """The largest share of each layer's neurons allowed per state; states not named are not
    capped. ``Budget({"dead": 0.3, "dormant": 0.5})``."""

    max_ratio: Mapping[State | str, float] = field(default_factory=dict)
    allow_unknown: bool = False
    kinds: frozenset[str] = DEFAULT_KINDS

    def __post_init__(self) -> None:
        kinds = frozenset(self.kinds)
        if not kinds or not kinds <= set(KINDS):
            raise ConfigError(f"budget kinds must be some of {KINDS}, got {sorted(kinds)}")
        object.__setattr__(self, "kinds", kinds)
        limits: dict[State, float] = {}
        for name, limit in self.max_ratio.items():
            state = parse_state(name)
            if state not in BUDGET_STATES:
                allowed = ", ".join(s.value for s in BUDGET_STATES)
                raise ConfigError(f"no budget can be set on {state.value!r}; allowed: {allowed}")
            value = float(limit)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(
                    f"the {state.value} budget is a share of a layer's neurons in [0, 1], got "
                    f"{limit!r} (0.3 means 30 %)"
                )
            limits[state] = value
        # Keep the order of BUDGET_STATES so output and JSON never depend on argument order.
        ordered = {state: limits[state] for state in BUDGET_STATES if state in limits}
        object.__setattr__(self, "max_ratio", MappingProxyType(ordered))

    @property
    def limits(self) -> Mapping[State, float]:
        """``max_ratio`` with every key parsed to a :class:`State`, in a fixed order."""
        return cast("Mapping[State, float]", self.max_ratio)

    @property
    def empty(self) -> bool:
        return not self.max_ratio


@dataclass(frozen=True)
class Offence:
    """One layer over one budget (``state`` unknown: the layer could not be judged)."""

    layer: str
    kind: str
    state: State
    count: int
    neurons: int
    budget: float | None

    @property
    def ratio(self) -> float:
        return self.count / self.neurons if self.neurons else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "state": self.state.value,
            "ratio": self.ratio,
            "count": self.count,
            "neurons": self.neurons,
            "budget": self.budget,
        }


@dataclass(frozen=True)
class GateResult:
    """Every offence of a report against a budget, in report (graph) order."""

    report: Report
    budget: Budget
    offending: tuple[Offence, ...]
    unknown: tuple[Offence, ...]

    @property
    def checked(self) -> list[LayerStats]:
        """The layers the budget applies to (of the budget's kinds), in report order."""
        return [s for s in self.report.layers.values() if s.kind in self.budget.kinds]

    @property
    def passed(self) -> bool:
        return not self.offending

    @property
    def offending_layers(self) -> dict[str, list[Offence]]:
        """Offences grouped by layer (report order)."""
        grouped: dict[str, list[Offence]] = {}
        for offence in self.offending:
            grouped.setdefault(offence.layer, []).append(offence)
        return grouped

    def to_json(self) -> dict[str, Any]:
        """The summary a CI system reads: verdict, budgets, offences and every layer's ratios."""
        report = self.report
        offended = set(self.offending_layers)
        return {
            "schema": SUMMARY_SCHEMA,
            "passed": self.passed,
            "model": report.model,
            "window": report.window,
            "step": report.step,
            "budgets": {state.value: limit for state, limit in self.budget.limits.items()},
            "allow_unknown": self.budget.allow_unknown,
            "kinds": sorted(self.budget.kinds),
            "layers_checked": len(self.checked),
            "layers_offending": len(offended),
            "offending": [offence.to_json() for offence in self.offending],
            "unknown": [offence.to_json() for offence in self.unknown],
            "layers": [
                {
                    "layer": stats.name,
                    "kind": stats.kind,
                    "neurons": stats.neurons,
                    "rows": stats.rows,
                    "min_rows": stats.config.min_rows,
                    "checked": stats.kind in self.budget.kinds,
                    "passed": stats.name not in offended,
                    "ratios": {
                        state.value: stats.ratio(state) for state in (*BUDGET_STATES, State.UNKNOWN)
                    },
                }
                for stats in report.layers.values()
            ],
        }


def _offence(stats: LayerStats, state: State, budget: float | None) -> Offence:
    return Offence(stats.name, stats.kind, state, stats.count(state), stats.neurons, budget)


def check_budget(report: Report, budget: Budget) -> GateResult:
    """Judge every layer of ``report`` against ``budget``.

    A layer offends when a capped state's share is strictly above its limit (``0.3`` lets 3 of
    10 neurons be dead), and, unless ``budget.allow_unknown``, when any of its neurons is
    unknown. Only layers of ``budget.kinds`` are judged (``post`` and ``attn`` by default).
    An empty budget caps nothing and nothing offends. A report without layers raises
    :class:`ReportError` when anything is capped.
    """
    kinds = ", ".join(sorted(budget.kinds))
    if not budget.empty and not any(s.kind in budget.kinds for s in report.layers.values()):
        # Nothing checked is not "within budget": a gate must not pass on an empty report.
        raise ReportError(
            f"report of {report.model!r} has no layers of kind {kinds} "
            f"({len(report.layers)} layers in all), so no budget can be checked; was the model "
            "watched at all, or are the budget's kinds right?"
        )
    offending: list[Offence] = []
    unknown: list[Offence] = []
    for stats in report.layers.values():
        if stats.kind not in budget.kinds:
            continue
        if stats.count(State.UNKNOWN):
            unknown.append(_offence(stats, State.UNKNOWN, None))
            if not budget.allow_unknown and not budget.empty:
                offending.append(unknown[-1])
        for state, limit in budget.limits.items():
            if stats.ratio(state) > limit:
                offending.append(_offence(stats, state, limit))
    return GateResult(report, budget, tuple(offending), tuple(unknown))
