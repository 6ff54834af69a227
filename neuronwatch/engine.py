"""The engine: per-layer accumulators over three windows, fed by any framework."""

from __future__ import annotations

import fnmatch
import threading
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from .config import LayerConfig
from .errors import ConfigError, MergeError, ShapeError
from .partials import Partials, histogram_bins
from .reduce import as_rows, reduce_rows
from .snapshot import Snapshot
from .stats import JudgedLayers
from .wiring import Wiring

__all__ = ["Engine"]


class Engine:
    """Accumulates partial sums per layer and judges neurons over windows.

    >>> import numpy as np
    >>> engine = Engine("mlp", min_rows=100)
    >>> acts = np.maximum(np.random.default_rng(0).normal(size=(512, 8)), 0)
    >>> acts[:, 3] = 0.0  # plant a dead neuron
    >>> engine.observe("fc1.act", acts)
    >>> engine.snapshot().layers("current")["fc1.act"].dead_indices.tolist()
    [3]

    ``defaults`` apply to every layer (``min_rows``, ``asleep_below``, ``tau``, ...); ``overrides``
    maps a layer name or glob to settings for the matching layers and wins over ``defaults``.
    Thread-safe: adapters update from the training thread while exporters take snapshots.
    """

    def __init__(
        self,
        model: str = "model",
        *,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        **defaults: Any,
    ) -> None:
        self.model = model
        self._defaults = dict(defaults)
        self._overrides = {pattern: dict(values) for pattern, values in (overrides or {}).items()}
        # Fail early on a misspelt setting rather than at the first add_layer.
        LayerConfig.for_activation("<check>", None, **self._defaults)
        self._lock = threading.Lock()
        self._configs: dict[str, LayerConfig] = {}
        self._current: dict[str, Partials] = {}
        self._last: dict[str, Partials] = {}
        self._lifetime: dict[str, Partials] = {}
        self._wiring: dict[str, Wiring] = {}
        self._errors: dict[str, int] = {}
        self._windows_completed = 0
        self._step = 0

    # -- layers ---------------------------------------------------------------------------------

    def add_layer(
        self,
        name: str,
        activation: str | None = None,
        kind: str = "post",
        params: Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> LayerConfig:
        """Declare a layer: family defaults of ``activation``, then what the activation's own
        ``params`` imply (ReLU6's ``max_val``, ELU's ``alpha``), then engine defaults, then the
        matching ``overrides`` patterns, then ``settings``. Re-adding an identical layer is a
        no-op; a different one is an error."""
        values = dict(self._defaults)
        for pattern, pattern_values in self._overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                values.update(pattern_values)
        values.update(settings)
        config = LayerConfig.for_activation(name, activation, kind, params, **values)
        with self._lock:
            known = self._configs.get(name)
            if known is not None and known != config:
                raise ConfigError(f"layer {name!r} is already declared with different settings")
            self._configs[name] = config
        return config

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self._configs)

    def config(self, layer: str) -> LayerConfig:
        try:
            return self._configs[layer]
        except KeyError:
            raise ConfigError(
                f"unknown layer {layer!r}; declared layers: {sorted(self._configs)}"
            ) from None

    def set_wiring(self, layer: str, wiring: Wiring) -> None:
        self.config(layer)
        with self._lock:
            self._wiring[layer] = wiring

    def count_error(self, layer: str) -> None:
        """Count a failure of whatever feeds ``layer`` (a hook, a scrape) without raising."""
        with self._lock:
            self._errors[layer] = self._errors.get(layer, 0) + 1

    # -- feeding --------------------------------------------------------------------------------

    def observe(self, layer: str, array: ArrayLike, feature_axis: int = -1) -> None:
        """Reduce an activation array (numpy, JAX, anything array-like) into ``layer``.

        ``feature_axis`` holds the neurons; every other axis is a row. An undeclared layer is
        declared with the ``generic`` family (fires at ``> 0``); call :meth:`add_layer` first to
        name its activation.
        """
        if layer not in self._configs:
            self.add_layer(layer)
        config = self._configs[layer]
        self.update(layer, reduce_rows(as_rows(array, feature_axis, layer), config))

    def update(self, layer: str, partials: Partials) -> None:
        """Merge partials an adapter reduced in its own runtime into ``layer``'s windows.

        ``last_fired_step`` is stamped here with the engine's current step for every neuron
        that fired in ``partials`` (merged by max with whatever the partials carry), so it costs
        the adapters nothing.
        """
        config = self.config(layer)
        bins = histogram_bins(config.histogram_edges)
        if partials.histogram.size != bins:
            raise ShapeError(
                f"layer {layer!r}: histogram has {partials.histogram.size} bins, expected {bins}"
            )
        with self._lock:
            current = self._current.get(layer)
            if current is not None and current.neurons != partials.neurons:
                raise ShapeError(
                    f"layer {layer!r} has {current.neurons} neurons but got {partials.neurons}; "
                    "is feature_axis right?"
                )
            lifetime = self._lifetime.get(layer)
            stamp = np.where(partials.fired > 0, self._step, -1)
            # Every stored Partials is the engine's own, read-only object: the stamped copy is
            # made here, so a caller reusing its arrays changes nothing, and snapshots can
            # share the objects without copying them.
            first = partials.replace(
                last_fired_step=np.maximum(partials.last_fired_step, stamp)
            ).copy(readonly=True)
            self._current[layer] = first if current is None else current.merged(first).frozen()
            self._lifetime[layer] = first if lifetime is None else lifetime.merged(first).frozen()

    def advance(self, steps: int = 1) -> int:
        """Count training steps (for snapshots); returns the new step."""
        with self._lock:
            self._step += steps
            return self._step

    def rollover(self, windows: int = 1) -> None:
        """Close the current window: it becomes the last complete one and a new one starts.

        ``windows > 1`` says the closed window spans that many window boundaries (a
        ``step(k)`` that crossed several): the count of completed windows moves by that much,
        while the rows, which cannot be split after the fact, stay in the one window closed.
        """
        if windows < 1:
            raise ConfigError(f"windows must be >= 1, got {windows}")
        with self._lock:
            self._last = {
                name: self._current.get(name)
                or Partials.empty(
                    self._lifetime[name].neurons, histogram_bins(config.histogram_edges)
                ).frozen()
                for name, config in self._configs.items()
                if name in self._lifetime
            }
            self._current = {}
            self._windows_completed += windows

    # -- reading --------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """An immutable, thread-safe picture of every layer over every window."""
        with self._lock:
            # The stored partials are read-only and replaced, never modified: no copies needed.
            raw = {
                "current": dict(self._current),
                "last": dict(self._last),
                "lifetime": dict(self._lifetime),
            }
            configs = dict(self._configs)
            wiring = dict(self._wiring)
            errors = dict(self._errors)
            step, completed = self._step, self._windows_completed
        # Verdicts are judged when first read, not here: a flush on the training thread only
        # copies dict entries, and a scrape of a 1,000-layer model pays for the layers it reads.
        windows = {window: JudgedLayers(configs, layers) for window, layers in raw.items()}
        return Snapshot(
            model=self.model,
            step=step,
            taken_at=time.time(),
            windows_completed=completed,
            windows=MappingProxyType(windows),
            wiring=MappingProxyType(wiring),
            errors=MappingProxyType(errors),
        )

    # -- merging --------------------------------------------------------------------------------

    def merged(self, other: Engine) -> Engine:
        """A new engine holding both engines' windows (e.g. two DDP ranks or two shards)."""
        if other.model != self.model:
            raise MergeError(f"cannot merge engines of models {self.model!r} and {other.model!r}")
        result = Engine(self.model, overrides=self._overrides, **self._defaults)
        for engine in (self, other):
            with engine._lock:
                for name, config in engine._configs.items():
                    known = result._configs.setdefault(name, config)
                    if known != config:
                        raise MergeError(
                            f"layer {name!r} has different settings in the two engines"
                        )
                    wiring = engine._wiring.get(name)
                    if wiring is not None and result._wiring.setdefault(name, wiring) != wiring:
                        raise MergeError(f"layer {name!r} has different wiring in the two engines")
                for target, source in (
                    (result._current, engine._current),
                    (result._last, engine._last),
                    (result._lifetime, engine._lifetime),
                ):
                    for name, partials in source.items():
                        target[name] = (
                            target[name].merged(partials).frozen() if name in target else partials
                        )
                for name, count in engine._errors.items():
                    result._errors[name] = result._errors.get(name, 0) + count
                result._step = max(result._step, engine._step)
                result._windows_completed = max(
                    result._windows_completed, engine._windows_completed
                )
        return result
