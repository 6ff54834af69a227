"""Discover wiring and neuron axes by tensor identity in one traced forward (never from names).

During the traced forward every leaf module records, in call order, which tensor objects it
read and which it returned; elementwise activation *functions* (``F.relu``, ``torch.tanh``, ...)
are recorded the same way through a ``TorchFunctionMode``, so functional activations are seen
too. The module that produced an activation's input is found by walking back from that tensor
through calls made *before* the activation's own call: Dropout variants, Identity, in-place ops
and functional activations are walked through, per-channel norms are walked through and their
parameters recorded, and the first Linear/Conv/Embedding found produces the neurons. Consumers
are found by walking forward from the activation's output.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from neuronwatch.wiring import ParamRef, Wiring

__all__ = [
    "ACTIVATION_FUNCTIONS",
    "WiringTracer",
    "consumer_params",
    "feature_axis_of",
    "producer_params",
]

log = logging.getLogger(__name__)

# Modules that keep every neuron on its axis: the neurons after them are the neurons before them
# (dropout, identity, and the channel-preserving spatial ops between a conv and its activation).
_PASS_THROUGH: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd, nn.Upsample, nn.modules.padding._ConstantPadNd,
    nn.modules.padding._ReflectionPadNd, nn.modules.padding._ReplicationPadNd,
)  # fmt: skip
_BATCH_NORM = nn.modules.batchnorm._BatchNorm
_INSTANCE_NORM = nn.modules.instancenorm._InstanceNorm
_PER_CHANNEL = (_BATCH_NORM, nn.LayerNorm, nn.GroupNorm, _INSTANCE_NORM)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

# Functions that produce neurons on a known axis (functional layers and norms, e.g. inside
# timm's BatchNormAct2d): the walk for a neuron axis stops there. -1: the last axis; 1: channels
# of a batched map; None: from the weight's rank (conv: -(rank - 1)).
AXIS_FUNCTIONS: dict[Callable[..., Any], int | None] = {
    torch.nn.functional.linear: -1,
    torch.nn.functional.layer_norm: -1,
    torch.nn.functional.batch_norm: 1,
    torch.nn.functional.group_norm: 1,
    torch.nn.functional.instance_norm: 1,
    torch.nn.functional.conv1d: None,
    torch.nn.functional.conv2d: None,
    torch.nn.functional.conv3d: None,
}

# Elementwise activation functions (and their in-place forms) -> activation class name.
ACTIVATION_FUNCTIONS: dict[Callable[..., Any], str] = {
    torch.relu: "ReLU",
    torch.relu_: "ReLU",
    torch.nn.functional.relu: "ReLU",
    torch.nn.functional.relu_: "ReLU",
    torch.nn.functional.relu6: "ReLU6",
    torch.nn.functional.hardtanh: "Hardtanh",
    torch.nn.functional.leaky_relu: "LeakyReLU",
    torch.nn.functional.prelu: "PReLU",
    torch.nn.functional.elu: "ELU",
    torch.nn.functional.selu: "SELU",
    torch.nn.functional.celu: "CELU",
    torch.nn.functional.gelu: "GELU",
    torch.nn.functional.silu: "SiLU",
    torch.nn.functional.mish: "Mish",
    torch.nn.functional.hardswish: "Hardswish",
    torch.nn.functional.softplus: "Softplus",
    torch.tanh: "Tanh",
    torch.sigmoid: "Sigmoid",
    torch.nn.functional.hardsigmoid: "Hardsigmoid",
    torch.Tensor.relu: "ReLU",
    torch.Tensor.relu_: "ReLU",
    torch.Tensor.tanh: "Tanh",
    torch.Tensor.sigmoid: "Sigmoid",
}


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: a Linear with a transposed [in, out] weight.
    return type(module).__name__ == "Conv1D" and not isinstance(module, nn.Conv1d)


def feature_axis_of(module: nn.Module) -> int | None:
    """Axis of the module's output that indexes neurons, or ``None`` if unknown.

    Convolutions and instance norms give the channel axis counted from the end (``-3`` for 2-D
    maps), which is right for batched ``[B, C, H, W]`` and unbatched ``[C, H, W]`` inputs alike;
    BatchNorm and GroupNorm always see a batch, so their channels are axis 1.
    """
    # Only nn.LayerNorm itself normalises the last axis; subclasses (timm's LayerNorm2d on NCHW
    # maps) may permute, so their axis comes from what produced their input.
    if isinstance(module, nn.Linear | nn.Embedding) or type(module) is nn.LayerNorm:
        return -1
    if _is_hf_conv1d(module):
        return -1
    if isinstance(module, _CONV + _CONV_T):
        return -(len(module.kernel_size) + 1)
    if isinstance(module, _INSTANCE_NORM):
        spatial = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}
        return -(spatial.get(type(module), 2) + 1)
    if isinstance(module, _BATCH_NORM | nn.GroupNorm):
        return 1
    return None


def _params(prefix: str, module: nn.Module, axes: Mapping[str, int]) -> list[ParamRef]:
    refs = []
    for pname, param in module.named_parameters(recurse=False):
        if pname in axes and param is not None:
            full = f"{prefix}.{pname}" if prefix else pname
            refs.append(ParamRef(full, tuple(param.shape), axes[pname]))
    return refs


def producer_params(name: str, module: nn.Module) -> list[ParamRef] | None:
    """Parameters of ``module`` indexed by the neurons it outputs; ``None`` if it is not a
    neuron-producing layer."""
    if isinstance(module, (nn.Linear, *_CONV)):
        return _params(name, module, {"weight": 0, "bias": 0})
    if isinstance(module, _CONV_T):
        return _params(name, module, {"weight": 1, "bias": 0}) if module.groups == 1 else []
    if _is_hf_conv1d(module):
        return _params(name, module, {"weight": 1, "bias": 0})
    if isinstance(module, nn.Embedding):
        return _params(name, module, {"weight": 1})
    return None


def consumer_params(name: str, module: nn.Module) -> list[ParamRef] | None:
    """Parameters of ``module`` indexed by the neurons it reads; ``None`` if it is not a
    neuron-consuming layer."""
    if isinstance(module, nn.Linear):
        return _params(name, module, {"weight": 1})
    if isinstance(module, _CONV):
        return _params(name, module, {"weight": 1}) if module.groups == 1 else []
    if isinstance(module, _CONV_T):
        return _params(name, module, {"weight": 0}) if module.groups == 1 else []
    if _is_hf_conv1d(module):
        return _params(name, module, {"weight": 0})
    return None


def _tensors(values: Iterable[Any]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(_tensors(value))
    return found


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread right now (as it
    does when activation checkpointing recomputes a forward)."""
    return bool(torch._C._current_graph_task_id() != -1)


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter, or -1 where none is kept (inference tensors)."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return -1


@dataclass
class Call:
    """One recorded call: a leaf module, or an activation function (``module`` is None).

    ``inputs``/``outputs`` are tensor ids; the ``*_versions`` beside them are the tensors'
    in-place version counters when the call began (inputs) and ended (outputs), so an in-place
    op between a producer and its reader (``out += identity`` in a ResNet block) is seen.
    """

    order: int
    name: str
    module: nn.Module | None
    inputs: list[int]
    outputs: list[int]
    function: str | None = None  # activation class name of a recorded function
    axis: int | None = None  # neuron axis of a recorded functional layer or norm
    input_versions: list[int] = field(default_factory=list)
    output_versions: list[int] = field(default_factory=list)


class _FunctionRecorder(TorchFunctionMode):
    """Records calls of elementwise activation functions while the trace runs."""

    def __init__(self, tracer: WiringTracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        activation = ACTIVATION_FUNCTIONS.get(func)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        before = _version(first) if activation is not None and first is not None else -1
        result = func(*args, **(kwargs or {}))
        if first is None or self.tracer.closed:
            return result
        if activation is not None:
            self.tracer.record_function(activation, first, before, result)
        elif func in AXIS_FUNCTIONS:
            axis = AXIS_FUNCTIONS[func]
            weight = args[1] if len(args) > 1 else (kwargs or {}).get("weight")
            if axis is None and isinstance(weight, torch.Tensor):
                axis = -(weight.dim() - 1)  # conv{n}d weight [out, in, *k]: channels -(n + 1)
            if axis is not None:
                self.tracer.record_axis(func.__name__, first, result, axis)
        return result


@dataclass
class WiringTracer:
    """Records the calls of one forward pass; its hooks live only while it records."""

    model: nn.Module
    # A torch.compile'd model: no TorchFunctionMode inside dynamo's trace, and the recorders run
    # outside it.
    compiled: bool = False
    calls: list[Call] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)
    _keep: list[torch.Tensor] = field(default_factory=list)  # ids stay unique while traced
    _mode: _FunctionRecorder | None = None
    _thread: int | None = None
    _starts: dict[int, list[list[int]]] = field(default_factory=dict)
    _inside: int = 0  # leaf modules running now: functions they call are theirs, not recorded

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @property
    def hooks(self) -> int:
        return len(self._handles)

    @property
    def claimed(self) -> bool:
        return self._thread is not None

    def claimed_elsewhere(self) -> bool:
        """Another thread's forward is being traced."""
        thread = self._thread
        return thread is not None and thread != threading.get_ident()

    def recording(self) -> bool:
        """Calls of this thread go into the trace now."""
        return self.active and self._recording()

    @property
    def closed(self) -> bool:
        return not self._handles

    def claim(self) -> None:
        """Record only this thread's calls from now on (the thread of the traced forward)."""
        self._thread = threading.get_ident()

    def start(self) -> None:
        """Hook every leaf module from now on; calls of any thread are recorded until
        :meth:`claim`."""
        self.clear()
        start: Callable[..., None] = self._start_recorder
        # Under torch.compile, dynamo would trace these recorders into the graph (and recompile
        # over their Python state): run them outside it.
        keep_out: Callable[[Callable[..., Any]], Callable[..., Any]] = (
            torch._dynamo.disable if self.compiled else (lambda fn: fn)
        )
        try:
            for name, module in self.model.named_modules():
                if next(module.children(), None) is None:
                    self._handles.append(module.register_forward_pre_hook(keep_out(start)))
                    self._handles.append(
                        module.register_forward_hook(keep_out(self._recorder(name)))
                    )
        except BaseException:
            self.clear()
            raise

    def enter_functions(self) -> None:
        """Record activation functions until :meth:`exit_functions` (one forward's span)."""
        if self.compiled or self._mode is not None or not self.active:
            return
        mode = _FunctionRecorder(self)
        try:
            mode.__enter__()  # type: ignore[no-untyped-call]
        except Exception as exc:  # a tracing context that refuses modes: modules only
            log.debug("activation functions are not traced: %r", exc)
            return
        self._mode = mode

    def exit_functions(self) -> None:
        mode, self._mode = self._mode, None
        if mode is not None:
            try:
                mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
            except Exception as exc:  # another mode pushed on top and left there
                log.debug("could not leave the function recorder: %r", exc)

    def stop(self) -> None:
        self.exit_functions()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Forget what was recorded, keep recording (and unclaim)."""
        self.exit_functions()
        self.calls.clear()
        self._keep.clear()
        self._starts.clear()
        self._inside = 0
        self._thread = None

    def clear(self) -> None:
        self.stop()
        self.reset()

    def _recording(self) -> bool:
        # Recomputation under activation checkpointing, and other threads, are not this
        # forward's calls.
        thread = self._thread
        return (thread is None or thread == threading.get_ident()) and not in_backward()

    def _start_recorder(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._recording():
            versions = [_version(t) for t in _tensors(args)]
            self._starts.setdefault(id(module), []).append(versions)
            self._inside += 1

    def _recorder(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self._recording():
                return
            inputs = _tensors(args)
            outputs = _tensors([output])
            started = self._starts.get(id(module))
            if started:
                versions = started.pop()
                self._inside = max(self._inside - 1, 0)
            else:
                versions = [_version(t) for t in inputs]
            self._keep.extend(inputs + outputs)
            self.calls.append(
                Call(
                    len(self.calls),
                    name,
                    module,
                    [id(t) for t in inputs],
                    [id(t) for t in outputs],
                    input_versions=versions,
                    output_versions=[_version(t) for t in outputs],
                )
            )

        return record

    def record_axis(self, name: str, x: torch.Tensor, result: Any, axis: int) -> None:
        if not self._recording() or self._inside:
            return
        outputs = _tensors([result])
        self._keep.extend([x, *outputs])
        self.calls.append(
            Call(len(self.calls), f"<{name}>", None, [id(x)], [id(t) for t in outputs], axis=axis)
        )

    def record_function(
        self, activation: str, x: torch.Tensor, x_version: int, result: Any
    ) -> None:
        if not self._recording() or self._inside:
            return
        outputs = _tensors([result])
        self._keep.extend([x, *outputs])
        self.calls.append(
            Call(
                len(self.calls),
                f"<{activation}>",
                None,
                [id(x)],
                [id(t) for t in outputs],
                function=activation,
                input_versions=[x_version],
                output_versions=[_version(t) for t in outputs],
            )
        )

    # -- walking ----------------------------------------------------------------------------------

    def _producer_call(self, tensor_id: int, before: int) -> Call | None:
        for call in reversed(self.calls[:before]):
            if tensor_id in call.outputs:
                return call
        return None

    def call_of(self, module: nn.Module, index: int) -> Call | None:
        """The ``index``-th recorded call of ``module``, if recorded."""
        own = self.calls_of(module)
        return own[index] if index < len(own) else None

    def calls_of(self, module: nn.Module) -> list[Call]:
        return [call for call in self.calls if call.module is module]

    def walk_back(
        self, tensor_id: int, before: int | None = None, version: int = -1
    ) -> tuple[list[Call], Call | None]:
        """Walk from a tensor back through pass-through calls made before ``before``.

        Returns the calls walked through (pass-through modules, per-channel norms, activation
        functions) and the call that ended the walk (a producer, or any other module), or
        ``None`` when the tensor came from no recorded call. With a ``version`` (the tensor's
        version counter when it was read), a tensor changed in place after its producer
        returned it ends the walk: that producer is not the only source of the values.
        """
        walked: list[Call] = []
        current: int | None = tensor_id
        limit = len(self.calls) if before is None else before
        while current is not None:
            found = self._producer_call(current, limit)
            if found is None:
                return walked, None
            index = found.outputs.index(current)
            produced = found.output_versions[index] if found.output_versions else -1
            if version >= 0 and produced >= 0 and produced != version:
                return walked, None
            module = found.module
            if found.axis is not None or (
                module is not None
                and (
                    producer_params(found.name, module) is not None
                    or not isinstance(module, _PASS_THROUGH + _PER_CHANNEL)
                )
            ):
                return walked, found
            walked.append(found)
            limit, current = found.order, (found.inputs[0] if found.inputs else None)
            version = found.input_versions[0] if found.input_versions else -1
        return walked, None

    def feature_axis(self, tensor: torch.Tensor, before: int | None = None) -> int | None:
        """The neuron axis of ``tensor``: that of the first module with a known axis found
        walking back through pass-through modules, or ``None``."""
        walked, end = self.walk_back(id(tensor), before)
        for call in [*walked, end]:
            if call is not None and call.axis is not None:
                return call.axis
            if call is not None and call.module is not None:
                axis = feature_axis_of(call.module)
                if axis is not None:
                    return axis
        return None

    def function_before(self, tensor: torch.Tensor, before: int | None = None) -> str | None:
        """The activation function that produced ``tensor`` (through pass-through modules)."""
        walked, _ = self.walk_back(id(tensor), before)
        return next((call.function for call in walked if call.function), None)

    def producer(
        self, tensor_id: int, before: int | None, version: int = -1
    ) -> tuple[str | None, list[ParamRef]]:
        walked, end = self.walk_back(tensor_id, before, version)
        refs: list[ParamRef] = []
        producer: str | None = None
        for call in walked:
            if call.module is not None and isinstance(call.module, _PER_CHANNEL):
                refs.extend(_per_channel_params(call.name, call.module))
                producer = call.name
        if end is not None and end.module is not None:
            found = producer_params(end.name, end.module)
            if found is not None:
                return end.name, refs + found
        return producer, refs

    def consumers(self, outputs: Iterable[int], after: int) -> tuple[str | None, list[ParamRef]]:
        """Modules reading the tensors ``outputs`` (or what pass-through calls made of them)
        in calls after ``after``."""
        frontier = set(outputs)
        consumer: str | None = None
        refs: list[ParamRef] = []
        for call in self.calls[after + 1 :]:
            if not frontier.intersection(call.inputs):
                continue
            module = call.module
            if module is None:
                continue  # an activation function applied to our neurons: not a consumer
            found = consumer_params(call.name, module)
            if found is not None:
                consumer = consumer or call.name
                refs.extend(found)
            elif isinstance(module, _PASS_THROUGH + _PER_CHANNEL):
                if isinstance(module, _PER_CHANNEL):
                    refs.extend(_per_channel_params(call.name, module))
                frontier.update(call.outputs)
        return consumer, refs

    def wiring_for(
        self,
        module: nn.Module,
        call_index: int,
        watched_input: torch.Tensor,
        feature_axis: int,
        consumes_itself: bool = False,
    ) -> Wiring:
        """Wiring of the ``call_index``-th call of ``module``, whose neurons are
        ``watched_input`` (an activation's input, or a module's watched input).

        ``consumes_itself``: the neurons are the input of ``module`` (``inputs=`` layers), so
        ``module`` consumes them; otherwise its outputs are followed to the consumers.
        """
        call = self.call_of(module, call_index)
        own = None if call is None or consumes_itself else producer_params(call.name, module)
        producer: str | None
        if call is not None and own is not None:
            # A watched Linear/Conv (layers=["*.fc1"]): its own outputs are the neurons.
            producer, produces = call.name, own
        elif call is not None and call.inputs:
            version = call.input_versions[0] if call.input_versions else -1
            producer, produces = self.producer(call.inputs[0], call.order, version)
        else:
            producer, produces = self.producer(id(watched_input), None)
        consumer: str | None = None
        consumes: list[ParamRef] = []
        if call is not None:
            direct = consumer_params(call.name, module) if consumes_itself else None
            if direct is not None:
                consumer, consumes = call.name, direct
            elif not consumes_itself:
                consumer, consumes = self.consumers(call.outputs, call.order)
        return Wiring(
            feature_axis=feature_axis,
            producer=producer,
            consumer=consumer,
            produces=tuple(produces),
            consumes=tuple(consumes),
        )

    def unwatched_functions(self, watched: set[int]) -> list[Unwatched]:
        """Activation functions applied to a layer's outputs (a Linear/Conv found walking back)
        whose output no hook watched, with the module reading them when pass-through modules
        lead to one. In call order."""
        found: list[Unwatched] = []
        for call in self.calls:
            if call.function is None or watched.intersection(call.outputs):
                continue
            _, end = self.walk_back(call.inputs[0], call.order)
            producer = (
                end.name
                if end is not None
                and end.module is not None
                and producer_params(end.name, end.module) is not None
                else None
            )
            if producer is None:
                continue  # not a layer's neurons (a gate on a computed tensor, say)
            consumer: str | None = None
            frontier = set(call.outputs)
            for later in self.calls[call.order + 1 :]:
                if not frontier.intersection(later.inputs):
                    continue
                if watched.intersection(later.inputs):
                    consumer = ""  # an inputs= layer watches it
                    break
                if later.module is None or not isinstance(later.module, _PASS_THROUGH):
                    if later.module is not None and consumer_params(later.name, later.module):
                        consumer = later.name
                    break
                frontier.update(later.outputs)
            if consumer != "":
                found.append(Unwatched(call.function, producer, consumer))
        return found


@dataclass(frozen=True)
class Unwatched:
    """An activation function nobody watches: what it is and how to watch it."""

    function: str
    producer: str
    consumer: str | None

    @property
    def description(self) -> str:
        feeds = f" and feeds {self.consumer!r}" if self.consumer else ""
        return (
            f"a functional activation ({self.function}) is applied to the outputs of "
            f"{self.producer!r}{feeds} and is not watched"
        )

    @property
    def remedy(self) -> str:
        if self.consumer:
            return f"Watch its neurons with inputs=[{self.consumer!r}]"
        return (
            "Other operations follow it before a module reads it: watch the input features of "
            "that module with inputs=[...]"
        )


def _per_channel_params(name: str, module: nn.Module) -> list[ParamRef]:
    return _params(name, module, {"weight": 0, "bias": 0})
