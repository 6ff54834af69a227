"""The torch activation source: hooks that reduce activations on the device, drained by a Monitor.

The hooks only launch fused reductions into device buffers (:mod:`.torch_reduce`); partials
reach the engine when the monitor drains the source. Forward boundaries and masks come from
:mod:`.torch_forward`, the wiring and neuron axes from the first watched forward
(:mod:`.torch_wiring`).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from neuronwatch.monitor import Monitor
from neuronwatch.partials import Partials
from neuronwatch.wiring import ParamRef

from .torch_forward import ForwardState, ForwardTracker, MaskSpec
from .torch_probes import Probe, Site, site_name
from .torch_reduce import LayerAccumulator
from .torch_wiring import WiringTracer, feature_axis_of, in_backward

__all__ = ["MAX_CALL_SITES", "RING_BYTES", "TorchSource"]

log = logging.getLogger(__name__)

# Staging ring of each [rows, neurons] layer: small activations (serving batch sizes) are copied
# there and reduced many forwards at a time, since at those sizes the fixed cost of one reduction
# call per layer and forward is most of the overhead (see LayerAccumulator). Each layer's ring
# takes at most RING_BYTES, and all of a model's rings together at most RINGS_BYTES.
RING_BYTES = 2**20
RINGS_BYTES = 64 * 2**20
# A module called more often than this in one forward (a cell applied per time step) gets no
# further layers: pool its calls with per_call_site=False instead.
MAX_CALL_SITES = 64


def _quiet_autograd(device_type: str) -> AbstractContextManager[Any]:
    """No graph recording and no autocast around our reductions. Each context manager costs
    microseconds on the hot path, so one is made only when grad or autocast is on (serving
    under inference_mode gets a shared no-op)."""
    grad = torch.is_grad_enabled()
    autocast = torch.is_autocast_enabled(device_type)
    if not grad and not autocast:
        return _NOTHING
    stack = ExitStack()
    if grad:
        stack.enter_context(torch.no_grad())
    if autocast:
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


_NOTHING = nullcontext()


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, list | tuple) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _input_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """The first tensor a module was called with, positionally or by keyword."""
    found = _first_tensor(args)
    if found is None:
        found = next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
    return found


def _fitting(refs: tuple[ParamRef, ...], neurons: int | None, layer: str) -> tuple[ParamRef, ...]:
    """The parameters whose neuron axis has as many entries as the layer has neurons; any other
    is a wrong guess of the walk (a reshape between producer and activation) and is dropped."""
    if neurons is None:
        return refs
    kept = tuple(ref for ref in refs if ref.shape[ref.axis] == neurons)
    for ref in refs:
        if ref not in kept:
            log.debug(
                "layer %r: %s (shape %s, axis %d) does not index its %d neurons; left out",
                layer,
                ref.name,
                ref.shape,
                ref.axis,
                neurons,
            )
    return kept


def _report_axis(accumulator: LayerAccumulator, x: torch.Tensor) -> int:
    """The neuron axis as reports state it: -1 when the neurons are the last axis (Linear
    outputs of any rank), else the axis counted from the front (1 for batched conv maps)."""
    rank = max(x.dim(), 2)
    axis = accumulator.feature_axis % rank
    return -1 if axis == rank - 1 else axis


def _tracing() -> bool:
    """torch.jit.trace or the ONNX exporter is running the model: not a forward of ours."""
    return bool(torch._C._get_tracing_state() or torch.onnx.is_in_onnx_export())


class TorchSource:
    """Hooks on one model's activations; drained into a :class:`~neuronwatch.Monitor`."""

    def __init__(
        self,
        model: nn.Module,
        monitor: Monitor,
        probes: list[Probe],
        *,
        every: int,
        histogram_every: int,
        compile: bool,
        strict: bool,
        mask: MaskSpec,
        per_call_site: bool,
        compiled_model: bool,
    ) -> None:
        self.model = model
        self.monitor = monitor
        self.every = every
        self.histogram_every = histogram_every
        self.compile = compile
        self.strict = strict
        self.per_call_site = per_call_site
        self._probes = probes
        self._handles: list[Any] = []
        self._forward_count = itertools.count()
        self._watched_count = itertools.count()
        self._lock = threading.Lock()
        self._tracer = WiringTracer(model, compiled=compiled_model)
        self._pending: dict[str, tuple[Probe, int, torch.Tensor, int]] = {}
        self._watched_ids: set[int] = set()
        self._logged: set[str] = set()
        self.forwards = ForwardTracker(model, self._begin_forward, self._end_forward, mask)
        try:
            for probe in probes:
                if probe.watch == "input":
                    hook = probe.module.register_forward_pre_hook(
                        self._input_hook(probe), with_kwargs=True
                    )
                else:
                    hook = probe.module.register_forward_hook(self._output_hook(probe))
                self._handles.append(hook)
            # After the probes: an entry's pre-hook is prepended and its post-hook appended, so a
            # model that is itself an activation opens its forward first and closes it last.
            self.forwards.start()
            # Armed from the start, so the first forward is traced whichever method runs it.
            self._tracer.start()
        except BaseException:
            self.close()
            raise

    # -- life cycle -----------------------------------------------------------------------------

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(site.layer for probe in self._probes for site in probe.sites)

    @property
    def hooks(self) -> int:
        """Number of hooks this source still holds on the model."""
        return len(self._handles) + self.forwards.hooks + self._tracer.hooks

    def close(self) -> None:
        """Remove every hook and method wrapper (idempotent). Collected data stays drainable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.forwards.close()
        self._tracer.clear()

    def drain(self) -> Iterator[tuple[str, Partials]]:
        with self._lock:
            drained = [
                (site.layer, site.accumulator.drain())
                for probe in self._probes
                for site in probe.sites
                if site.accumulator is not None
            ]
        for layer, partials in drained:
            if partials is not None:
                yield layer, partials

    def _log_once(self, key: str, level: int, message: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, message, *args)

    # -- forwards -------------------------------------------------------------------------------

    def _begin_forward(
        self,
        state: ForwardState,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> None:
        state.open = True
        state.calls = {}
        state.traced = False
        # Recomputation under activation checkpointing runs inside backward, and jit/ONNX
        # tracing runs the model symbolically: neither is a forward to count.
        state.watched = self.monitor.watching and not in_backward() and not _tracing()
        if not state.watched:
            return
        if self._tracer.active and self._tracer.claimed_elsewhere():
            # Another thread runs the traced first forward: until it ends, axes are unknown here.
            self._log_once(
                "warm-up",
                logging.INFO,
                "forwards of other threads are not watched while the first one is traced",
            )
            state.watched = False
            return
        state.watched = next(self._forward_count) % self.every == 0
        if not state.watched:
            return
        state.histogram = next(self._watched_count) % self.histogram_every == 0
        if self._tracer.active and not self._tracer.claimed:
            self._tracer.claim()
            self._tracer.enter_functions()
            state.traced = True

    def _end_forward(self, state: ForwardState, failed: bool) -> None:
        watched, traced = state.watched, state.traced
        state.open = state.watched = state.traced = False
        state.calls = {}
        if traced and failed:
            self._pending.clear()
            self._watched_ids.clear()
            self._tracer.reset()
        elif traced:
            self._finish_trace()
        if watched:
            try:
                self.monitor.forward_done()
            except Exception as exc:  # a flush must never raise into the user's forward
                self._hook_failed("<flush>", None, exc)

    # -- hooks (hot path) -----------------------------------------------------------------------

    def _output_hook(self, probe: Probe) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            state = self.forwards.state
            if not state.open:
                self.forwards.discover(state)
            if state.watched:
                self._record(probe, state, _first_tensor(output), _first_tensor(args))

        return hook

    def _input_hook(self, probe: Probe) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, kwargs: Any) -> None:
            state = self.forwards.state
            if not state.open:
                self.forwards.discover(state)
            if state.watched:
                x = _input_tensor(args, kwargs)
                self._record(probe, state, x, x)

        return hook

    def _record(
        self,
        probe: Probe,
        state: ForwardState,
        x: torch.Tensor | None,
        act_input: torch.Tensor | None,
    ) -> None:
        index = state.calls.get(id(probe), 0)
        state.calls[id(probe)] = index + 1
        if not self.per_call_site:
            index = 0
        site: Site | None = None
        try:
            if x is None:
                raise TypeError(f"layer {probe.base!r} produced no tensor to watch")
            known = index < len(probe.sites)
            site = probe.sites[index] if known else self._new_site(probe, index, x)
            if site is None:
                return
            accumulator = site.accumulator or self._start_site(probe, index, site, x, act_input)
            if accumulator is None:
                return  # its neuron axis is only known after a traced forward: from the next one
            if state.traced:
                self._watched_ids.add(id(x))
                if act_input is not None:
                    self._pending.setdefault(
                        site.layer, (probe, index, act_input, _report_axis(accumulator, x))
                    )
            with self._lock, _quiet_autograd(accumulator.device_type):
                masked = accumulator.add(x, state.histogram, state.mask)
            if state.mask is not None and not masked and not site.unmasked_logged:
                site.unmasked_logged = True
                log.info(
                    "layer %r: its activation %s has no [batch, tokens] rows matching the mask "
                    "%s, so all its rows count",
                    site.layer,
                    tuple(x.shape),
                    tuple(state.mask.shape),
                )
        except Exception as exc:
            self._hook_failed(site.layer if site is not None else probe.base, site, exc)

    def _new_site(self, probe: Probe, index: int, x: torch.Tensor) -> Site | None:
        if index >= MAX_CALL_SITES:
            if not probe.over_cap_logged:
                probe.over_cap_logged = True
                log.warning(
                    "%r runs more than %d times in one forward; its further calls are not "
                    "watched. Pool every call into one layer with per_call_site=False",
                    probe.module_name,
                    MAX_CALL_SITES,
                )
            return None
        name = site_name(probe.base, index)
        if name in self.monitor.engine.layers:
            # A module literally named like a call site ("act#2" in a ModuleDict): never merge
            # two different neuron sets under one name.
            self._log_once(
                f"collision:{name}",
                logging.WARNING,
                "call %d of %r would be named %r, which is another watched module's name; that "
                "call is not watched (rename the module, or pass per_call_site=False)",
                index + 1,
                probe.module_name,
                name,
            )
            return None
        activation = probe.activation
        if activation is None and probe.infer_activation and self._tracer.active:
            activation = self._tracer.function_before(x)
        config = self.monitor.engine.add_layer(name, activation, probe.kind, probe.params)
        site = Site(config.name, config)
        probe.sites.append(site)
        if index > 0 and not self._tracer.active and probe.fixed_wiring is None:
            # A call site first seen after the traced forward: trace the next one for its wiring.
            self._tracer.start()
        return site

    def _start_site(
        self,
        probe: Probe,
        index: int,
        site: Site,
        x: torch.Tensor,
        act_input: torch.Tensor | None,
    ) -> LayerAccumulator | None:
        with self._lock:  # two threads may see a new site at once: one accumulator for both
            if site.accumulator is not None:
                return site.accumulator
            axis = self._axis(probe, index, x, act_input)
            if axis is None:
                return None
            sites = sum(len(p.sites) for p in self._probes)
            ring = min(RING_BYTES, RINGS_BYTES // max(sites, 1))
            site.accumulator = LayerAccumulator(
                site.config, axis, self.compile, ring, self.histogram_every
            )
            return site.accumulator

    def _axis(
        self, probe: Probe, index: int, x: torch.Tensor, act_input: torch.Tensor | None
    ) -> int | None:
        """The neuron axis of a new site, or None to wait for a traced forward."""
        if probe.axis_override is not None:
            return probe.axis_override
        if probe.consumes_itself:  # inputs=[...]: the consumer's own type says
            own = feature_axis_of(probe.module)
            if own is not None:
                return own
        first = probe.sites[0].accumulator if probe.sites else None
        if index > 0 and first is not None:
            return first.feature_axis  # the same module: the same producer's axis
        recording = self._tracer.active and self._tracer.recording()
        if recording and act_input is not None:
            axis = self._tracer.feature_axis(act_input)
            if axis is not None:
                return axis
        if not recording and x.dim() >= 3:
            if not self._tracer.active:
                self._tracer.start()  # the next forward finds the producer
            return None
        level = logging.WARNING if x.dim() >= 4 else logging.INFO
        self._log_once(
            f"axis:{probe.base}",
            level,
            "layer %r: the module producing its input is unknown, so its neurons are taken on "
            "the last axis of %s; pass feature_axis={%r: AXIS} if that is wrong",
            probe.base,
            tuple(x.shape),
            probe.base,
        )
        return -1

    def _hook_failed(self, layer: str, site: Site | None, exc: Exception) -> None:
        self.monitor.engine.count_error(layer)
        if self.strict:
            raise exc
        first = site.failed_once if site is not None else layer in self._logged
        if not first:
            if site is not None:
                site.failed_once = True
            else:
                self._logged.add(layer)
            log.warning(
                "layer %r: the neuronwatch hook failed; the model runs on, further failures of "
                "this layer are counted, not logged: %r",
                layer,
                exc,
            )

    # -- wiring ---------------------------------------------------------------------------------

    def _neurons(self, probe: Probe, index: int) -> int | None:
        accumulator = probe.sites[index].accumulator if index < len(probe.sites) else None
        return accumulator.neurons if accumulator is not None else None

    def _finish_trace(self) -> None:
        tracer = self._tracer
        tracer.exit_functions()
        pending, self._pending = self._pending, {}
        watched, self._watched_ids = self._watched_ids, set()
        try:
            for layer, (probe, index, tensor, axis) in pending.items():
                wiring = probe.fixed_wiring or tracer.wiring_for(
                    probe.module, index, tensor, axis, consumes_itself=probe.consumes_itself
                )
                neurons = self._neurons(probe, index)
                self.monitor.engine.set_wiring(
                    layer,
                    replace(
                        wiring,
                        feature_axis=axis,
                        produces=_fitting(wiring.produces, neurons, layer),
                        consumes=_fitting(wiring.consumes, neurons, layer),
                    ),
                )
            for unwatched in tracer.unwatched_functions(watched):
                self._log_once(
                    f"functional:{unwatched.function}:{unwatched.producer}:{unwatched.consumer}",
                    logging.WARNING,
                    "%s; module hooks cannot see functions. %s",
                    unwatched.description,
                    unwatched.remedy,
                )
        except Exception as exc:  # wiring is a bonus; never break the forward for it
            log.warning("wiring discovery failed: %r", exc)
            if self.strict:
                raise
        finally:
            if pending:
                tracer.clear()
            else:  # nothing watched in that forward (paused, or no activation ran): again
                tracer.reset()
