"""In-process alert rules: read published snapshots, log a warning, call your callbacks.

>>> alerts = Alerts(default_rules(), callbacks=[notify_slack])     # doctest: +SKIP
>>> for batch in loader:                                         # doctest: +SKIP
...     train_step(batch); monitor.step()
...     alerts.check(monitor)          # a no-op until the monitor publishes a new snapshot

A rule is anything with a ``name`` and ``evaluate(snapshot) -> list[Alert]`` (:class:`Rule`).
Rules keep their own history (windows in a row, the previous window's share), keyed by model
and layer, and fire once when their condition starts to hold, not again on every snapshot
while it still holds. Rules read immutable snapshots only: evaluating them never touches a
device or waits for a step. Nothing raised by a rule or a callback reaches the caller: it is
logged. :meth:`Alerts.watch` evaluates from a background thread instead (serving processes).

The same conditions exist as Prometheus alert rules in ``grafana/alerts/`` for deployments
that alert through Alertmanager (``docs/metrics.md``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from .errors import ConfigError
from .metric_values import check_patterns, select_layers
from .monitor import SnapshotSource
from .snapshot import Snapshot
from .stats import LayerStats

__all__ = [
    "Alert",
    "AlertWatcher",
    "Alerts",
    "AliveShareDrop",
    "DeadRatioHigh",
    "Rule",
    "SilentNeurons",
    "alive_share",
    "default_rules",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alert:
    """One rule firing: ``layer`` is ``None`` for a rule about the whole model."""

    rule: str
    model: str
    layer: str | None
    value: float
    step: int
    message: str


@runtime_checkable
class Rule(Protocol):
    name: str

    def evaluate(self, snapshot: Snapshot) -> list[Alert]: ...


def alive_share(stats: LayerStats) -> float:
    """Share of the layer's neurons that fired in the window (asleep or active)."""
    return (stats.count("asleep") + stats.count("active")) / stats.neurons if stats.neurons else 0.0


def _ratio(name: str, value: float, low: float = 0.0, high: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ConfigError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


def _count(name: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


class _WindowRule:
    """A rule judged once per completed window, on the ``last`` window of each layer."""

    name = "window rule"

    def __init__(self, layers: Sequence[str] | None) -> None:
        self.layers = check_patterns(layers)
        self._windows_seen: dict[str, tuple[int, int]] = {}  # model -> (windows, step)

    def forget(self, model: str) -> None:
        """Drop what the rule remembers about ``model`` (a new run of it started)."""

    def new_window(self, snapshot: Snapshot) -> dict[str, LayerStats]:
        """The last window's layers if a window completed since the previous call, else {}."""
        windows, step = self._windows_seen.get(snapshot.model, (0, 0))
        if snapshot.windows_completed < windows or snapshot.step < step:
            # Counts only grow within a run: a model name seen again from the start is a
            # rerun, and the old run's streaks and shares must not carry over into it.
            self.forget(snapshot.model)
            windows = 0
        latest = max(windows, snapshot.windows_completed)
        self._windows_seen[snapshot.model] = (latest, snapshot.step)
        if snapshot.windows_completed <= windows:
            return {}
        last = snapshot.windows["last"]
        return {name: last[name] for name in select_layers(list(last), self.layers)}


class DeadRatioHigh(_WindowRule):
    """A layer's dead ratio is above ``above`` in ``windows`` completed windows in a row.

    Checked on every window the rule sees; windows that complete between two checks count as
    one (call :meth:`Alerts.check` at least once per window, e.g. after every step).
    """

    name = "DeadRatioHigh"

    def __init__(self, above: float = 0.3, windows: int = 3, layers: Sequence[str] | None = None):
        super().__init__(layers)
        self.above = _ratio("above", above)
        self.windows = _count("windows", windows, 1)
        self._streak: dict[tuple[str, str], int] = {}

    def forget(self, model: str) -> None:
        self._streak = {key: n for key, n in self._streak.items() if key[0] != model}

    def evaluate(self, snapshot: Snapshot) -> list[Alert]:
        alerts = []
        for layer, stats in self.new_window(snapshot).items():
            key = (snapshot.model, layer)
            ratio = stats.ratio("dead")
            streak = self._streak[key] = self._streak.get(key, 0) + 1 if ratio > self.above else 0
            if streak == self.windows:
                alerts.append(
                    Alert(
                        self.name,
                        snapshot.model,
                        layer,
                        ratio,
                        snapshot.step,
                        f"{self.name}: {ratio:.0%} of layer {layer!r} of model "
                        f"{snapshot.model!r} is dead (above {self.above:.0%}) for {streak} "
                        f"windows in a row (step {snapshot.step})",
                    )
                )
        return alerts


class AliveShareDrop(_WindowRule):
    """A layer's alive share (asleep + active) fell by at least ``points`` (0.2 = 20
    percentage points) from one completed window to the next. Windows in which some neurons are
    still unknown (fewer than ``min_rows`` rows) are skipped."""

    name = "AliveShareDrop"

    def __init__(self, points: float = 0.2, layers: Sequence[str] | None = None):
        super().__init__(layers)
        self.points = _ratio("points", points)
        self._previous: dict[tuple[str, str], float] = {}

    def forget(self, model: str) -> None:
        self._previous = {key: v for key, v in self._previous.items() if key[0] != model}

    def evaluate(self, snapshot: Snapshot) -> list[Alert]:
        alerts = []
        for layer, stats in self.new_window(snapshot).items():
            if not stats.complete:
                continue  # unknown neurons would read as a drop: judge complete windows only
            key = (snapshot.model, layer)
            share = alive_share(stats)
            before = self._previous.get(key)
            self._previous[key] = share
            # A tolerance: 0.9 - 0.7 is 0.19999999999999996 in floating point.
            if before is not None and before - share >= self.points - 1e-9:
                alerts.append(
                    Alert(
                        self.name,
                        snapshot.model,
                        layer,
                        before - share,
                        snapshot.step,
                        f"{self.name}: the alive share of layer {layer!r} of model "
                        f"{snapshot.model!r} fell from {before:.0%} to {share:.0%} in one "
                        f"window (step {snapshot.step})",
                    )
                )
        return alerts


class SilentNeurons:
    """More than ``more_than`` neurons of the model (of the matching ``layers``) have not fired
    for more than ``steps`` training steps (from ``last_fired_step``: no window involved)."""

    name = "SilentNeurons"

    def __init__(
        self, more_than: int = 0, steps: int = 10_000, layers: Sequence[str] | None = None
    ) -> None:
        self.more_than = _count("more_than", more_than, 0)
        self.steps = _count("steps", steps, 1)
        self.layers = check_patterns(layers)
        self._firing: set[str] = set()

    def evaluate(self, snapshot: Snapshot) -> list[Alert]:
        names = select_layers(list(snapshot.windows["lifetime"]), self.layers)
        per_layer = {
            name: int(np.count_nonzero(snapshot.steps_silent(name) > self.steps)) for name in names
        }
        total = sum(per_layer.values())
        if total <= self.more_than:
            self._firing.discard(snapshot.model)
            return []
        if snapshot.model in self._firing:
            return []
        self._firing.add(snapshot.model)
        worst = sorted(per_layer.items(), key=lambda item: -item[1])[:3]
        where = ", ".join(f"{name!r}: {count}" for name, count in worst if count)
        return [
            Alert(
                self.name,
                snapshot.model,
                None,
                float(total),
                snapshot.step,
                f"{self.name}: {total} neurons of model {snapshot.model!r} have not fired for "
                f"more than {self.steps} steps (most in {where}; step {snapshot.step})",
            )
        ]


def default_rules() -> list[Rule]:
    """Dead ratio > 0.3 in any layer for 3 windows; alive share down 20 points in one window;
    any neuron silent for more than 10,000 steps."""
    return [DeadRatioHigh(), AliveShareDrop(), SilentNeurons()]


class Alerts:
    """Evaluates rules on new snapshots, logs each alert as a warning and calls ``callbacks``."""

    def __init__(
        self,
        rules: Iterable[Rule] | None = None,
        callbacks: Iterable[Callable[[Alert], object]] = (),
    ) -> None:
        self.rules = list(default_rules() if rules is None else rules)
        for rule in self.rules:
            if isinstance(rule, type):
                raise ConfigError(
                    f"{rule.__name__} is a rule class; pass an instance: {rule.__name__}()"
                )
            if not isinstance(rule, Rule):
                raise ConfigError(
                    f"{rule!r} is not an alert rule: it needs a name and evaluate(snapshot)"
                )
        self.callbacks = list(callbacks)
        self._last: Snapshot | None = None
        self._lock = threading.Lock()

    def check(self, source: Snapshot | SnapshotSource) -> list[Alert]:
        """Evaluate every rule on ``source``'s latest snapshot, unless it was evaluated already
        (so calling this after every step costs an identity check between flushes)."""
        snapshot = source if isinstance(source, Snapshot) else source.latest
        with self._lock:  # rules keep history: evaluate one snapshot at a time, each once
            if snapshot is None or snapshot is self._last:
                return []
            self._last = snapshot
            alerts: list[Alert] = []
            for rule in self.rules:
                try:
                    alerts.extend(rule.evaluate(snapshot))
                except Exception:
                    log.exception("alert rule %s failed on step %d", rule.name, snapshot.step)
        for alert in alerts:
            log.warning("%s", alert.message)
            for callback in self.callbacks:
                try:
                    callback(alert)
                except Exception:
                    log.exception("alert callback %r failed on %s", callback, alert.rule)
        return alerts

    def watch(self, source: SnapshotSource, interval: float = 1.0) -> AlertWatcher:
        """Check ``source`` every ``interval`` seconds from a daemon thread."""
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ConfigError(f"interval must be a positive number of seconds, got {interval!r}")
        return AlertWatcher(self, source, float(interval))


class AlertWatcher:
    """A background thread running :meth:`Alerts.check`; :meth:`stop` ends it."""

    def __init__(self, alerts: Alerts, source: SnapshotSource, interval: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run,
            args=(alerts, source, interval),
            name="neuronwatch-alerts",
            daemon=True,
        )
        self._thread.start()

    def _run(self, alerts: Alerts, source: SnapshotSource, interval: float) -> None:
        while not self._stop.wait(interval):
            alerts.check(source)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
