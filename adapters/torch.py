"""PyTorch adapter: ``neuronwatch.watch(model)`` hooks activations and feeds a Monitor.

:class:`TorchSource` is an activation source (see :mod:`neuronwatch.monitor`): its hooks only
launch fused reductions into device buffers (:mod:`.torch_reduce`), and the monitor drains them
at a flush. Layers are *call sites*: a module that runs twice in a forward (torchvision's reused
``relu``) gives two layers, ``layer1.0.relu`` and ``layer1.0.relu#2``. Forward boundaries come
from :mod:`.torch_forward`; the wiring and each layer's neuron axis from tensor identity in the
first watched forward (:mod:`.torch_wiring`).
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from neuronwatch.config import LayerConfig
from neuronwatch.engine import Engine
from neuronwatch.errors import ConfigError
from neuronwatch.families import ACTIVATION_CLASSES
from neuronwatch.monitor import DEFAULT_FLUSH_EVERY, Monitor
from neuronwatch.partials import Partials
from neuronwatch.wiring import ParamRef, Wiring

from .torch_forward import (
    ForwardState,
    MaskSpec,
    ThreadForwards,
    as_row_mask,
    mask_of,
    outermost_module_call,
)
from .torch_reduce import LayerAccumulator, Staged, reduce_staged
from .torch_wiring import ACTIVATION_FUNCTIONS, WiringTracer, in_backward

__all__ = ["MAX_CALL_SITES", "TorchSource", "find_activations", "watch"]

log = logging.getLogger(__name__)

DEFAULT_HISTOGRAM_EVERY = 8
# Activations up to this many elements are copied and reduced together at the end of the forward
# (one compiled call per forward): at serving batch sizes the fixed cost of a call per layer is
# most of the overhead, and copying a small tensor costs a few microseconds. Larger ones are
# reduced at once, so a forward never holds more than DEFER_BYTES of copies.
DEFER_ELEMENTS = 2**17
DEFER_BYTES = 64 * 2**20
# A module called more often than this in one forward (a cell applied per time step) gets no
# further layers: pool its calls with per_call_site=False instead.
MAX_CALL_SITES = 64
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def find_activations(model: nn.Module) -> list[str]:
    """Names of the activation modules of ``model`` (torch.nn and Hugging Face classes)."""
    return [
        name
        for name, module in model.named_modules()
        if name and type(module).__name__ in ACTIVATION_CLASSES
    ]


def site_name(base: str, index: int) -> str:
    """Layer name of the ``index``-th call (0-based) of the layer ``base`` in one forward:
    ``act``, ``act#2``, ``act#3``...; a ``:pre``/``:input`` suffix stays last (``act#2:pre``)."""
    if index == 0:
        return base
    stem, colon, suffix = base.partition(":")
    return f"{stem}#{index + 1}{colon}{suffix}"


def _activation_params(module: nn.Module) -> dict[str, Any]:
    """What an activation's thresholds depend on (see ``activation_settings``)."""
    params: dict[str, Any] = {}
    for attribute in ("min_val", "max_val", "alpha"):
        value = getattr(module, attribute, None)
        if isinstance(value, int | float):
            params[attribute] = float(value)
    return params


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


class _QuietAutograd:
    """No graph recording and no autocast around our reductions. Each context manager costs
    microseconds on the hot path, so they are entered only when grad or autocast is on."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.stack = ExitStack()

    def __enter__(self) -> None:
        if torch.is_grad_enabled():
            self.stack.enter_context(torch.no_grad())
        if torch.is_autocast_enabled(self.device_type):
            self.stack.enter_context(torch.autocast(self.device_type, enabled=False))

    def __exit__(self, *exc: object) -> None:
        self.stack.close()


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, list | tuple) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


@dataclass
class _Site:
    """One layer: one call site of a probed module."""

    layer: str
    config: LayerConfig
    accumulator: LayerAccumulator | None = None
    failed_once: bool = False
    unmasked_logged: bool = False


@dataclass
class _Probe:
    """One hooked module and which of its tensors holds the neurons.

    ``watch="output"``: an activation module's output (kind ``post``); ``"input"``: a module's
    input, for ``pre=True`` layers (an activation's input), ``inputs=`` layers and functional
    activations of Transformer layers.
    """

    base: str
    module_name: str
    module: nn.Module
    watch: Literal["output", "input"]
    kind: str
    activation: str | None
    params: dict[str, Any]
    axis_override: int | None
    consumes_itself: bool = False
    infer_activation: bool = False
    fixed_wiring: Wiring | None = None
    sites: list[_Site] = field(default_factory=list)
    over_cap_logged: bool = False


class TorchSource:
    """Hooks on one model's activations; drained into a :class:`~neuronwatch.Monitor`."""

    def __init__(
        self,
        model: nn.Module,
        monitor: Monitor,
        probes: list[_Probe],
        *,
        every: int,
        histogram_every: int,
        compile: bool,
        strict: bool,
        mask: MaskSpec,
        per_call_site: bool,
        trace_functions: bool,
    ) -> None:
        self.model = model
        self.monitor = monitor
        self.every = every
        self.histogram_every = histogram_every
        self.compile = compile
        self.strict = strict
        self.mask = mask
        self.per_call_site = per_call_site
        self._probes = probes
        self._modules = {id(m): m for m in model.modules()}
        self._entries: set[int] = set()
        self._handles: list[Any] = []
        self._forwards = ThreadForwards()
        self._forward_count = itertools.count()
        self._watched_count = itertools.count()
        self._lock = threading.Lock()
        self._tracer = WiringTracer(model, functions=trace_functions)
        self._pending: dict[str, tuple[_Probe, int, torch.Tensor, int]] = {}
        self._watched_ids: set[int] = set()
        self._logged: set[str] = set()
        try:
            for probe in probes:
                if probe.watch == "input":
                    hook = probe.module.register_forward_pre_hook(self._input_hook(probe))
                else:
                    hook = probe.module.register_forward_hook(self._output_hook(probe))
                self._handles.append(hook)
            # After the probes: an entry's pre-hook is prepended and its post-hook appended, so a
            # model that is itself an activation opens its forward first and closes it last.
            self._add_entry(model)
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
        return len(self._handles) + self._tracer.hooks

    def close(self) -> None:
        """Remove every hook (idempotent). Collected data stays drainable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._entries.clear()
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

    # -- forward boundaries ---------------------------------------------------------------------

    def _add_entry(self, module: nn.Module) -> None:
        if id(module) in self._entries:
            return
        self._entries.add(id(module))
        self._handles.append(
            module.register_forward_pre_hook(self._entry_pre, with_kwargs=True, prepend=True)
        )
        self._handles.append(
            module.register_forward_hook(self._entry_post, with_kwargs=True, always_call=True)
        )

    def _entry_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state = self._forwards.state
        if state.depth == 0:
            if state.open:  # a forward entered through another method, still open
                self._end_forward(state)
            self._begin_forward(state, module, args, kwargs)
        state.depth += 1

    def _entry_post(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        state = self._forwards.state
        state.depth = max(state.depth - 1, 0)
        if state.depth == 0 and state.open:
            # always_call hooks also run when the forward raised (then output is None and an
            # exception is being handled): that forward's trace is incomplete, retrace.
            self._end_forward(state, failed=output is None and sys.exc_info()[1] is not None)

    def _begin_forward(
        self,
        state: ForwardState,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> None:
        state.open = True
        state.calls = {}
        state.mask = None
        state.traced = False
        # Recomputation under activation checkpointing runs inside backward: not a forward.
        state.watched = self.monitor.watching and not in_backward()
        if not state.watched:
            return
        state.watched = next(self._forward_count) % self.every == 0
        if not state.watched:
            return
        state.histogram = next(self._watched_count) % self.histogram_every == 0
        if self.mask is not None:
            try:
                raw = mask_of(self.mask, module, args, kwargs)
                state.mask = as_row_mask(raw)
                if raw is not None and state.mask is None:
                    self._log_once(
                        "mask-shape",
                        logging.INFO,
                        "the mask %r is not a [batch, tokens] tensor (got %s); pad rows are "
                        "counted. Pass mask=lambda module, args, kwargs: ... to supply one",
                        self.mask,
                        getattr(raw, "shape", type(raw).__name__),
                    )
            except Exception as exc:
                self._hook_failed("<mask>", None, exc)
        if self._tracer.active and not self._tracer.claimed:
            self._tracer.claim()
            self._tracer.enter_functions()
            state.traced = True

    def _end_forward(self, state: ForwardState, failed: bool = False) -> None:
        watched, traced = state.watched, state.traced
        state.open = state.watched = state.traced = False
        state.calls = {}
        state.mask = None
        if state.deferred:
            deferred, state.deferred, state.deferred_bytes = state.deferred, [], 0
            self._reduce_deferred(deferred)
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

    def _reduce_deferred(self, items: list[Staged]) -> None:
        try:
            with self._lock, _QuietAutograd(items[0].x.device.type):
                reduce_staged(items)
        except Exception as exc:
            for item in items:
                self._hook_failed(item.accumulator.config.name, None, exc)

    def _outside_forward(self, state: ForwardState) -> None:
        """An activation ran with no forward open on this thread: either recomputation in
        backward (ignored) or a method other than ``forward`` (its entry module is found and
        hooked, and this call opens the forward)."""
        if in_backward():
            return
        entry, args, kwargs = outermost_module_call(self._modules)
        if entry is None:
            return
        self._add_entry(entry)
        self._log_once(
            f"entry:{id(entry)}",
            logging.INFO,
            "%s is called outside the model's forward (through another method); watching "
            "its calls too",
            next((n for n, m in self.model.named_modules() if m is entry), type(entry).__name__)
            or type(self.model).__name__,
        )
        self._begin_forward(state, entry, args, kwargs)

    # -- hooks (hot path) -----------------------------------------------------------------------

    def _output_hook(self, probe: _Probe) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            state = self._forwards.state
            if not state.open:
                self._outside_forward(state)
            if state.watched:
                self._record(probe, state, _first_tensor(output), _first_tensor(args))

        return hook

    def _input_hook(self, probe: _Probe) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            state = self._forwards.state
            if not state.open:
                self._outside_forward(state)
            if state.watched:
                x = _first_tensor(args)
                self._record(probe, state, x, x)

        return hook

    def _record(
        self,
        probe: _Probe,
        state: ForwardState,
        x: torch.Tensor | None,
        act_input: torch.Tensor | None,
    ) -> None:
        index = state.calls.get(id(probe), 0)
        state.calls[id(probe)] = index + 1
        if not self.per_call_site:
            index = 0
        site: _Site | None = None
        try:
            if x is None:
                raise TypeError(f"layer {probe.base!r} produced no tensor to watch")
            site = (
                probe.sites[index] if index < len(probe.sites) else self._new_site(probe, index, x)
            )
            if site is None:
                return
            accumulator = site.accumulator
            if accumulator is None:
                accumulator = site.accumulator = self._start_site(probe, index, site, act_input)
            if state.traced:
                self._watched_ids.add(id(x))
                if act_input is not None:
                    self._pending.setdefault(
                        site.layer, (probe, index, act_input, _report_axis(accumulator, x))
                    )
            if (
                self.compile
                and state.depth > 0  # a bracketed forward: its end will reduce what it held
                and x.numel() <= DEFER_ELEMENTS
                and state.deferred_bytes + x.numel() * x.element_size() <= DEFER_BYTES
                and not any(item.accumulator is accumulator for item in state.deferred)
            ):
                with self._lock, _QuietAutograd(x.device.type):
                    staged = accumulator.stage(x, state.histogram, state.mask, copy=True)
                if staged.rows:
                    state.deferred.append(staged)
                    state.deferred_bytes += staged.x.numel() * staged.x.element_size()
                masked = staged.mask is not None
            else:
                with self._lock, _QuietAutograd(x.device.type):
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

    def _new_site(self, probe: _Probe, index: int, x: torch.Tensor) -> _Site | None:
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
        activation = probe.activation
        if activation is None and probe.infer_activation and self._tracer.active:
            activation = self._tracer.function_before(x)
        config = self.monitor.engine.add_layer(
            site_name(probe.base, index), activation, probe.kind, probe.params
        )
        site = _Site(config.name, config)
        probe.sites.append(site)
        if index > 0 and not self._tracer.active and probe.fixed_wiring is None:
            # A call site first seen after the traced forward: trace the next one for its wiring.
            self._tracer.start()
        return site

    def _start_site(
        self, probe: _Probe, index: int, site: _Site, act_input: torch.Tensor | None
    ) -> LayerAccumulator:
        axis = probe.axis_override
        first = probe.sites[0].accumulator if probe.sites else None
        if axis is None and index > 0 and first is not None:
            axis = first.feature_axis  # the same module: the same producer's axis
        if axis is None and self._tracer.active and act_input is not None:
            axis = self._tracer.feature_axis(act_input)
        if axis is None:
            log.info(
                "layer %r: the module producing its input is unknown, so its neurons are taken "
                "on the last axis; pass feature_axis={%r: AXIS} to change that",
                site.layer,
                probe.base,
            )
            axis = -1
        return LayerAccumulator(site.config, axis, self.compile)

    def _hook_failed(self, layer: str, site: _Site | None, exc: Exception) -> None:
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

    def _neurons(self, probe: _Probe, index: int) -> int | None:
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
            for function, consumer in tracer.unwatched_functions(watched):
                self._log_once(
                    f"functional:{consumer}",
                    logging.WARNING,
                    "a functional activation (%s) feeds %r and is not watched: module hooks "
                    "cannot see it. Watch its neurons with inputs=[%r]",
                    function,
                    consumer,
                    consumer,
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


# -- choosing what to watch ---------------------------------------------------------------------


def _match(names: list[str], patterns: Iterable[str], what: str) -> list[str]:
    selected: list[str] = []
    for pattern in patterns:
        matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(f"{what}: {pattern!r} matches no module of the model{hint}")
        selected.extend(m for m in matches if m not in selected)
    return selected


def _transformer_activation(name: str, layer: nn.Module) -> _Probe | None:
    """The feed-forward activation of ``nn.TransformerEncoderLayer``/``DecoderLayer`` when it is
    applied as a function: its neurons are the input of ``dropout`` (the feed-forward dropout,
    which reads exactly ``activation(linear1(x))``) and feed ``linear2``."""
    function = getattr(layer, "activation", None)
    if isinstance(function, nn.Module) or function is None:
        return None  # a module activation is found like any other
    activation = ACTIVATION_FUNCTIONS.get(function)
    prefix = f"{name}." if name else ""
    linear1, linear2, dropout = layer.linear1, layer.linear2, layer.dropout
    if not (
        isinstance(linear1, nn.Linear)
        and isinstance(linear2, nn.Linear)
        and isinstance(dropout, nn.Module)
    ):
        return None
    wiring = Wiring(
        feature_axis=-1,
        producer=f"{prefix}linear1",
        consumer=f"{prefix}linear2",
        produces=tuple(
            ParamRef(f"{prefix}linear1.{p}", tuple(getattr(linear1, p).shape), 0)
            for p in ("weight", "bias")
            if getattr(linear1, p, None) is not None
        ),
        consumes=(ParamRef(f"{prefix}linear2.weight", tuple(linear2.weight.shape), 1),),
    )
    return _Probe(
        base=f"{prefix}activation",
        module_name=f"{prefix}dropout",
        module=dropout,
        watch="input",
        kind="post",
        activation=activation,
        params={},
        axis_override=-1,
        fixed_wiring=wiring,
    )


def _probes(
    model: nn.Module,
    layers: Iterable[str] | None,
    inputs: Iterable[str] | Mapping[str, str | None] | None,
    pre: bool,
    axes: Mapping[str, int],
) -> list[_Probe]:
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    functional = {
        p.base: p
        for name, module in modules.items()
        if isinstance(module, _TRANSFORMER_LAYERS)
        for p in [_transformer_activation(name, module)]
        if p is not None
    }
    if layers is None:
        chosen = find_activations(model) + list(functional)
        if not chosen and not inputs:
            raise ConfigError(
                f"{type(model).__name__} has no activation modules (nn.ReLU, nn.GELU, ...); "
                "name the modules to watch with layers=[...] (globs allowed), or the modules "
                "whose input features are neurons with inputs=[...]"
            )
    else:
        chosen = _match(names + list(functional), list(layers), "layers")
    probes: list[_Probe] = []
    for name in chosen:
        if name in functional:
            probe = functional[name]
            probes.append(probe)
            if pre:  # the functional activation's input: linear1's output
                linear1 = modules[probe.module_name.removesuffix("dropout") + "linear1"]
                probes.append(
                    replace(
                        probe,
                        base=f"{name}:pre",
                        module_name=probe.module_name.removesuffix("dropout") + "linear1",
                        module=linear1,
                        watch="output",
                        kind="pre",
                        activation=None,
                        sites=[],
                    )
                )
            continue
        module = modules[name]
        activation = type(module).__name__
        params = _activation_params(module)
        axis = axes.get(name)
        probes.append(_Probe(name, name, module, "output", "post", activation, params, axis))
        if pre:
            pre_axis = axes.get(f"{name}:pre", axis)
            probes.append(_Probe(f"{name}:pre", name, module, "input", "pre", None, {}, pre_axis))
    given: dict[str, str | None] = (
        dict(inputs) if isinstance(inputs, Mapping) else dict.fromkeys(inputs or (), None)
    )
    for pattern, named in given.items():
        for name in _match(names, [pattern], "inputs"):
            base = f"{name}:input"
            if any(p.base == base for p in probes):
                continue
            probes.append(
                _Probe(
                    base,
                    name,
                    modules[name],
                    "input",
                    "post",
                    named,
                    {},
                    axes.get(base, axes.get(name)),
                    consumes_itself=True,
                    infer_activation=named is None,
                )
            )
    known = {p.base for p in probes} | {p.module_name for p in probes}
    unknown_axes = set(axes) - known
    if unknown_axes:
        raise ConfigError(f"feature_axis names layers that are not watched: {sorted(unknown_axes)}")
    return probes


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def watch(
    model: nn.Module,
    *,
    layers: Iterable[str] | None = None,
    inputs: Iterable[str] | Mapping[str, str | None] | None = None,
    pre: bool = False,
    every: int = 1,
    flush_every: int = DEFAULT_FLUSH_EVERY,
    flush_interval: float | None = None,
    window: int | None = None,
    name: str | None = None,
    mask: MaskSpec = "attention_mask",
    feature_axis: Mapping[str, int] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    histogram_every: int = DEFAULT_HISTOGRAM_EVERY,
    per_call_site: bool = True,
    compile: bool = True,
    strict: bool = False,
    **defaults: Any,
) -> Monitor:
    """Watch the activations of ``model``; returns a :class:`~neuronwatch.Monitor`.

    - ``layers``: module names or globs; default: every activation module (ReLU ... Sigmoid,
      Hugging Face activation classes) and the functional feed-forward activation of every
      ``nn.TransformerEncoderLayer``/``DecoderLayer`` (layer ``<block>.activation``).
    - ``inputs``: modules whose *input* features are the neurons (an activation applied as a
      function before them, e.g. ``inputs=["*.mlp.fc2"]``), as names/globs, or a mapping to
      the activation's name (``{"*.fc2": "gelu"}``); layers ``<module>:input``.
    - ``pre=True`` also watches each activation's input (layers ``<module>:pre``).
    - A module called n times in one forward gives n layers: ``relu``, ``relu#2``, ...
      (``per_call_site=False`` pools them into one).
    - ``every=k`` watches one forward in ``k``; ``flush_every`` steps between flushes;
      ``window`` steps per window (``None``: close windows yourself with ``rollover()``);
      ``flush_interval`` seconds: a process that never calls ``step()`` (serving) publishes
      ``latest`` at most this often, from the thread that ran the forward.
    - ``mask``: rows at masked (padding) positions are left out of every statistic. The default
      reads the forward's ``attention_mask`` argument (``[batch, tokens]``, non-zero on real
      tokens, the Hugging Face convention); pass another argument name, a function
      ``(module, args, kwargs) -> mask``, or ``None`` to count every row.
    - ``feature_axis``: per-layer neuron axis when the producing module cannot be identified.
    - ``overrides``: per-layer settings by name or glob; ``defaults`` (``min_rows``,
      ``asleep_below``, ``tau``, ...) apply to every layer.
    - ``histogram_every``: the layer value histogram is accumulated on one watched forward in
      this many (it costs ~3x the other statistics); every other statistic sees every row.
    - ``compile``: fuse the reductions with ``torch.compile``, falling back to eager ops if the
      compiler is unavailable. ``strict=True`` raises hook failures instead of counting them.
    """
    for arg, value in (("every", every), ("histogram_every", histogram_every)):
        _positive(arg, value)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"watch() takes a torch.nn.Module, got {type(model).__name__}")
    if mask is not None and not (isinstance(mask, str) or callable(mask)):
        raise ConfigError(
            f"mask must be an argument name, a function (module, args, kwargs) -> mask, or "
            f"None; got {mask!r}"
        )
    # torch.compile wraps the model in an OptimizedModule whose names all start with
    # "_orig_mod."; hook the wrapped module so layer and parameter names match the user's model
    # and its state_dict.
    original = getattr(model, "_orig_mod", None)
    compiled_model = isinstance(original, nn.Module)
    if isinstance(original, nn.Module):
        model = original
    probes = _probes(model, layers, inputs, pre, dict(feature_axis or {}))
    engine = Engine(name or type(model).__name__, overrides=overrides, **defaults)
    monitor = Monitor(engine, flush_every=flush_every, window=window, flush_interval=flush_interval)
    for probe in probes:
        if not probe.infer_activation:
            config = engine.add_layer(probe.base, probe.activation, probe.kind, probe.params)
            probe.sites.append(_Site(probe.base, config))
    source = TorchSource(
        model,
        monitor,
        probes,
        every=every,
        histogram_every=histogram_every,
        compile=compile,
        strict=strict,
        mask=mask,
        per_call_site=per_call_site,
        # Dynamo traces through hooks; a TorchFunctionMode inside its trace is not worth the risk.
        trace_functions=not compiled_model,
    )
    monitor.attach(source)
    return monitor
