"""Immutable snapshots: what exporters, reports and the CLI read (never the live engine)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from .errors import ConfigError
from .partials import Partials
from .stats import LayerStats, active_parameter_ratio
from .wiring import Wiring

__all__ = ["WINDOWS", "Snapshot", "WindowName"]

WindowName = Literal["current", "last", "lifetime"]
WINDOWS: tuple[str, ...] = ("current", "last", "lifetime")


@dataclass(frozen=True)
class Snapshot:
    """The engine's state at one moment: every layer judged over each window.

    ``windows["current"]`` is the window still filling, ``windows["last"]`` the last complete
    one (empty before the first ``rollover()``), ``windows["lifetime"]`` everything since start.
    Safe to hand to another thread: nothing in it changes or refers back to the engine.
    """

    model: str
    step: int
    taken_at: float
    windows_completed: int
    windows: Mapping[str, Mapping[str, LayerStats]]
    wiring: Mapping[str, Wiring]
    errors: Mapping[str, int]

    def resolve_window(self, window: str = "auto") -> str:
        """``auto`` means the last complete window if there is one, else the lifetime totals."""
        if window == "auto":
            return "last" if self.windows_completed else "lifetime"
        if window not in WINDOWS:
            raise ConfigError(f"window must be 'auto' or one of {WINDOWS}, got {window!r}")
        return window

    def layers(self, window: str = "auto") -> Mapping[str, LayerStats]:
        return self.windows[self.resolve_window(window)]

    def partials(self, layer: str, window: str = "lifetime") -> Partials:
        """The raw partial sums of ``layer`` over ``window``, without judging its neurons."""
        layers = self.windows[self.resolve_window(window)]
        raw = getattr(layers, "partials", None)
        return raw(layer) if callable(raw) else layers[layer].partials

    def steps_silent(self, layer: str) -> NDArray[np.int64]:
        """Per neuron of ``layer``, the steps since the last flush in which it fired (the whole
        run's step count for a neuron that never fired), from the lifetime totals: no window
        has to be chosen in advance."""
        if layer not in self.windows["lifetime"]:
            raise ConfigError(
                f"no layer {layer!r} in this snapshot; layers: {sorted(self.windows['lifetime'])}"
            )
        return steps_silent(self.partials(layer).last_fired_step, self.step)

    def silent(self, steps: int) -> dict[str, NDArray[np.intp]]:
        """Indices of the neurons of each layer that have not fired for at least ``steps``
        steps, e.g. ``snapshot.silent(10_000)``."""
        return {
            name: np.flatnonzero(self.steps_silent(name) >= steps)
            for name in self.windows["lifetime"]
        }

    def active_parameter_ratio(self, window: str = "auto") -> float | None:
        """Parameters not attached to a dead neuron over all parameters wired to monitored
        layers; ``None`` when no wiring is known."""
        return active_parameter_ratio(self.wiring, self.layers(window))


def steps_silent(last_fired_step: NDArray[np.int64], step: int) -> NDArray[np.int64]:
    """``step - last_fired_step``, or ``step`` for neurons that never fired (-1)."""
    silent = np.subtract(step, last_fired_step, dtype=np.int64)
    silent[last_fired_step < 0] = step
    return silent
