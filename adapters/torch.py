"""PyTorch adapter: ``neuronwatch.watch(model)`` hooks activation modules and feeds an Engine.

The hooks only launch reductions into device buffers (see :mod:`.torch_reduce`); partials reach
the engine at a flush: every ``flush_every`` calls of :meth:`TorchMonitor.step`, or on demand
through :meth:`TorchMonitor.snapshot` / :meth:`TorchMonitor.report`. Wiring and each layer's
feature axis come from tensor identity in the first watched forward pass (:mod:`.torch_wiring`).
"""

from __future__ import annotations

import difflib
import fnmatch
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn

from neuronwatch.config import LayerConfig
from neuronwatch.engine import Engine
from neuronwatch.errors import ConfigError
from neuronwatch.families import ACTIVATION_CLASSES
from neuronwatch.report import Report
from neuronwatch.snapshot import Snapshot

from .torch_reduce import LayerAccumulator
from .torch_wiring import WiringTracer, feature_axis_of

__all__ = ["TorchMonitor", "find_activations", "watch"]

log = logging.getLogger(__name__)

DEFAULT_FLUSH_EVERY = 10
DEFAULT_HISTOGRAM_EVERY = 8


def find_activations(model: nn.Module) -> list[str]:
    """Names of the activation modules of ``model`` (torch.nn and Hugging Face classes)."""
    return [
        name
        for name, module in model.named_modules()
        if name and type(module).__name__ in ACTIVATION_CLASSES
    ]


def _select(model: nn.Module, layers: Iterable[str] | None) -> list[str]:
    if layers is None:
        found = find_activations(model)
        if not found:
            raise ConfigError(
                f"{type(model).__name__} has no activation modules (nn.ReLU, nn.GELU, ...); "
                "name the modules to watch with layers=[...] (globs allowed)"
            )
        return found
    names = [name for name, _ in model.named_modules() if name]
    selected: list[str] = []
    for pattern in layers:
        matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(f"layers: {pattern!r} matches no module of the model{hint}")
        selected.extend(m for m in matches if m not in selected)
    return selected


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, list | tuple) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


@dataclass
class _Probe:
    """One watched layer: its module, its accumulator (created at the first call)."""

    layer: str
    module_name: str
    module: nn.Module
    config: LayerConfig
    axis_override: int | None
    accumulator: LayerAccumulator | None = None
    failed_once: bool = False


class TorchMonitor:
    """Hooks on a model's activation modules feeding an :class:`~neuronwatch.Engine`.

    Use as a context manager (or call :meth:`close`) so every hook is removed.
    """

    def __init__(
        self,
        model: nn.Module,
        engine: Engine,
        probes: list[_Probe],
        *,
        every: int,
        flush_every: int,
        window: int | None,
        histogram_every: int,
        compile: bool,
        strict: bool,
    ) -> None:
        self.model = model
        self.engine = engine
        self.every = every
        self.flush_every = flush_every
        self.window = window
        self.histogram_every = histogram_every
        self.compile = compile
        self.strict = strict
        self._probes = probes
        self._handles: list[Any] = []
        self._tracer = WiringTracer(model)
        self._traced = False
        self._forwards = 0
        self._watched_forwards = 0
        self._watching = False
        self._paused = False
        self._steps = 0
        self._flush_lock = threading.Lock()
        self._latest: Snapshot | None = None
        self._pending_wiring: dict[str, tuple[str, torch.Tensor, int]] = {}
        try:
            self._handles.append(model.register_forward_pre_hook(self._before_forward))
            self._handles.append(model.register_forward_hook(self._after_forward))
            for probe in probes:
                if probe.config.kind == "pre":
                    hook = probe.module.register_forward_pre_hook(self._pre_hook(probe))
                else:
                    hook = probe.module.register_forward_hook(self._post_hook(probe))
                self._handles.append(hook)
        except BaseException:
            self.close()
            raise

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(p.layer for p in self._probes)

    @property
    def hooks(self) -> int:
        """Number of hooks this monitor still holds on the model."""
        return len(self._handles) + self._tracer.hooks

    def close(self) -> None:
        """Remove every hook (idempotent). Data already collected stays readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._tracer.clear()

    def __enter__(self) -> TorchMonitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- hooks (hot path) -----------------------------------------------------------------------

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop watching inside the block, e.g. for an evaluation pass whose rows must not
        enter the training window. Forwards inside the block do not count for ``every``."""
        before, self._paused = self._paused, True
        try:
            yield
        finally:
            self._paused = before

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if self._paused:
            self._watching = False
            return
        self._forwards += 1
        self._watching = (self._forwards - 1) % self.every == 0
        if self._watching:
            self._watched_forwards += 1
            if not self._traced:
                self._tracer.clear()  # a previous traced pass may have died mid-forward
                self._pending_wiring.clear()
                self._tracer.start()

    def _after_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._tracer.active:
            return
        try:
            for layer, (module_name, act_input, axis) in self._pending_wiring.items():
                self.engine.set_wiring(layer, self._tracer.wiring_for(module_name, act_input, axis))
        except Exception as exc:  # wiring is a bonus; never break the forward for it
            log.warning("wiring discovery failed: %r", exc)
            if self.strict:
                raise
        finally:
            self._pending_wiring.clear()
            self._traced = True
            self._tracer.clear()

    def _post_hook(self, probe: _Probe) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._watching:
                self._observe(probe, _first_tensor(output), _first_tensor(args))

        return hook

    def _pre_hook(self, probe: _Probe) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            if self._watching:
                x = _first_tensor(args)
                self._observe(probe, x, x)

        return hook

    def _observe(
        self, probe: _Probe, x: torch.Tensor | None, act_input: torch.Tensor | None
    ) -> None:
        try:
            if x is None:
                raise TypeError(f"layer {probe.layer!r} produced no tensor to watch")
            if probe.accumulator is None:
                probe.accumulator = self._start_layer(probe, act_input)
            if self._tracer.active and act_input is not None:
                # Recorded on every traced pass, so a first pass that died mid-forward is redone.
                self._pending_wiring.setdefault(
                    probe.layer, (probe.module_name, act_input, probe.accumulator.feature_axis)
                )
            histogram = (self._watched_forwards - 1) % self.histogram_every == 0
            # The lock only matters if someone flushes from another thread; uncontended it
            # costs a fraction of a microsecond.
            with self._flush_lock, torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                probe.accumulator.add(x, histogram)
        except Exception as exc:
            self._hook_failed(probe, exc)

    def _start_layer(self, probe: _Probe, act_input: torch.Tensor | None) -> LayerAccumulator:
        axis = probe.axis_override
        if self._tracer.active and act_input is not None:
            found = self._tracer.producer_of(act_input, exclude=probe.module_name)
            if axis is None and found is not None:
                axis = feature_axis_of(found[1])
        if axis is None:
            log.info(
                "layer %r: the module producing its input is unknown, so its neurons are taken "
                "on the last axis; pass feature_axis={%r: AXIS} to change that",
                probe.layer,
                probe.layer,
            )
            axis = -1
        return LayerAccumulator(probe.config, axis, self.compile)

    def _hook_failed(self, probe: _Probe, exc: Exception) -> None:
        self.engine.count_error(probe.layer)
        if self.strict:
            raise exc
        if not probe.failed_once:
            probe.failed_once = True
            log.warning(
                "layer %r: the neuronwatch hook failed; training goes on, further failures of "
                "this layer are counted, not logged: %r",
                probe.layer,
                exc,
            )

    # -- flushing and reading -------------------------------------------------------------------

    def step(self, steps: int = 1) -> None:
        """Mark the end of a training step: flushes every ``flush_every`` steps and closes the
        window every ``window`` steps."""
        self._steps += steps
        self.engine.advance(steps)
        if self.window and self._steps % self.window == 0:
            self.rollover()
        elif self._steps % self.flush_every == 0:
            self.flush()

    def flush(self) -> Snapshot:
        """Copy the device partials into the engine (one host sync) and publish a snapshot."""
        with self._flush_lock:
            for probe in self._probes:
                if probe.accumulator is None:
                    continue
                partials = probe.accumulator.drain()
                if partials is not None:
                    self.engine.update(probe.layer, partials)
            self._latest = self.engine.snapshot()
            return self._latest

    def rollover(self) -> None:
        """Flush, then close the engine's current window."""
        self.flush()
        self.engine.rollover()
        self._latest = self.engine.snapshot()

    @property
    def latest(self) -> Snapshot | None:
        """The snapshot published at the last flush, for exporters: never touches a device."""
        return self._latest

    def snapshot(self) -> Snapshot:
        """Flush now and return a fresh snapshot."""
        return self.flush()

    def report(self, window: str = "auto", meta: Mapping[str, Any] | None = None) -> Report:
        """Flush now and judge every layer over ``window`` (``auto``: the last complete window,
        or the lifetime totals before the first rollover)."""
        return Report.from_snapshot(self.flush(), window, meta)


def watch(
    model: nn.Module,
    *,
    layers: Iterable[str] | None = None,
    pre: bool = False,
    every: int = 1,
    flush_every: int = DEFAULT_FLUSH_EVERY,
    window: int | None = None,
    name: str | None = None,
    feature_axis: Mapping[str, int] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    histogram_every: int = DEFAULT_HISTOGRAM_EVERY,
    compile: bool = True,
    strict: bool = False,
    **defaults: Any,
) -> TorchMonitor:
    """Watch the activations of ``model``.

    - ``layers``: module names or globs; default: every activation module (ReLU ... Sigmoid,
      Hugging Face activation classes). ``pre=True`` also watches each activation's input.
    - ``every=k`` watches one forward pass in ``k``; ``flush_every`` steps between host copies;
      ``window`` steps per window (``None``: close windows yourself with ``rollover()``).
    - ``feature_axis``: per-layer neuron axis when the producing module cannot be identified.
    - ``overrides``: per-layer settings by name or glob; ``defaults`` (``min_rows``,
      ``asleep_below``, ``tau``, ...) apply to every layer.
    - ``histogram_every``: the layer value histogram is accumulated on one watched forward in
      this many (it costs ~3x the other statistics); every other statistic sees every row.
    - ``compile``: fuse the reductions with ``torch.compile``, falling back to eager ops if the
      compiler is unavailable. ``strict=True`` raises hook failures instead of counting them.
    """
    for arg, value in (
        ("every", every),
        ("flush_every", flush_every),
        ("histogram_every", histogram_every),
    ):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{arg} must be a positive integer, got {value!r}")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ConfigError(f"window must be a positive number of steps or None, got {window!r}")
    # torch.compile wraps the model in an OptimizedModule whose names all start with
    # "_orig_mod."; hook the wrapped module so layer and parameter names match the user's model
    # and its state_dict.
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module):
        model = original
    selected = _select(model, layers)
    axes = dict(feature_axis or {})
    engine = Engine(name or type(model).__name__, overrides=overrides, **defaults)
    modules = dict(model.named_modules())
    probes: list[_Probe] = []
    for module_name in selected:
        module = modules[module_name]
        activation = type(module).__name__
        kinds: list[tuple[str, str, str | None]] = [("post", module_name, activation)]
        if pre:
            kinds.append(("pre", f"{module_name}:pre", None))
        for kind, layer, act in kinds:
            config = engine.add_layer(layer, act, kind)
            axis = axes.get(layer, axes.get(module_name))
            probes.append(_Probe(layer, module_name, module, config, axis))
    unknown_axes = set(axes) - {p.layer for p in probes} - {p.module_name for p in probes}
    if unknown_axes:
        raise ConfigError(f"feature_axis names layers that are not watched: {sorted(unknown_axes)}")
    return TorchMonitor(
        model,
        engine,
        probes,
        every=every,
        flush_every=flush_every,
        window=window,
        histogram_every=histogram_every,
        compile=compile,
        strict=strict,
    )
