"""The steps each op takes on one layer's parameters (the arithmetic itself is in :mod:`.ops`).

strip strips the incoming weights; reinit redraws them, zeroes the bias and the outgoing
weights (never a norm's per-channel parameters: the running mean would still leak through);
lift shifts the bias closest to the activation; prune deletes the neurons everywhere they are
wired (and a norm's running statistics), folding each constant output into the consumer's bias.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError
from ..report import Report
from ..stats import LayerStats
from ..wiring import ParamRef, Wiring
from . import ops
from .checkpoint import TensorInfo
from .dtypes import EDITABLE
from .options import LayerPlan, Options, Skip, needed, refs, role
from .steps import Add, Delete, Fill, Redraw, Step, Strip

__all__ = ["LayerEdits"]


@dataclass
class LayerEdits:
    op: str
    options: Options
    report: Report
    tensors: Mapping[str, TensorInfo]
    read: Callable[[str], NDArray[np.float64]]
    steps: dict[str, list[Step]] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    layers: list[LayerPlan] = field(default_factory=list)

    def add(self, name: str, step: Step) -> None:
        self.steps.setdefault(name, []).append(step)

    def layer(
        self, name: str, stats: LayerStats, wiring: Wiring, neurons: NDArray[np.intp]
    ) -> None:
        state = self.options.state
        width = stats.neurons
        if self.op == "strip":
            for ref in needed("strip", wiring):
                self.add(ref.name, Strip(name, ref.axis, neurons, fraction=self.options.fraction))
            self.layers.append(LayerPlan(name, state, neurons, width))
        elif self.op == "reinit":
            self._reinit(name, wiring, neurons, width)
        elif self.op == "lift":
            self._lift(name, stats, wiring, neurons, width)
        else:
            self._prune(name, stats, wiring, neurons, width)

    def _reinit(self, name: str, wiring: Wiring, neurons: NDArray[np.intp], width: int) -> None:
        o = self.options
        for ref in wiring.produces:
            if role(ref) == "weight":
                step: Step = Redraw(name, ref.axis, neurons, o.init, o.match_norm, o.seed)
                self.add(ref.name, step)
            elif role(ref) == "bias":
                self.add(ref.name, Fill(name, ref.axis, neurons, 0.0))
        for ref in wiring.consumes:
            # Zeroing a norm's per-channel parameters would not silence the channel (its
            # running mean still leaks through); zeroing the consumer's weights does.
            if role(ref) == "weight":
                self.add(ref.name, Fill(name, ref.axis, neurons, 0.0))
        self.layers.append(LayerPlan(name, o.state, neurons, width))

    def _lift(
        self,
        name: str,
        stats: LayerStats,
        wiring: Wiring,
        neurons: NDArray[np.intp],
        width: int,
    ) -> None:
        pre = _pre_statistics(self.report, name, width)
        bias = needed("lift", wiring)[0]
        p = pre.partials
        shifts = ops.lift_shifts(
            pre.finite_rows[neurons],
            p.sum[neurons],
            p.sq_sum[neurons],
            p.max[neurons],
            stats.config.fire_threshold,
            self.options.top,
        )
        self.add(bias.name, Add(name, bias.axis, neurons, shifts, why="lift"))
        self.layers.append(LayerPlan(name, self.options.state, neurons, width, shifts=shifts))

    def _prune(
        self,
        name: str,
        stats: LayerStats,
        wiring: Wiring,
        neurons: NDArray[np.intp],
        width: int,
    ) -> None:
        top, bottom = stats.partials.max[neurons], stats.partials.min[neurons]
        constant = (
            np.isfinite(top) & np.isfinite(bottom) & (top - bottom <= self.options.constant_tol)
        )
        if not constant.all():
            self.skipped.append(
                Skip(
                    name,
                    "output not constant over the audit (max != min): removing the neuron "
                    "would change the outputs",
                    neurons=tuple(neurons[~constant].tolist()),
                )
            )
        values = (top + bottom) / 2.0
        if not wiring.consumes:
            self.skipped.append(
                Skip(name, "no consumer in the wiring: the next layer's input cannot shrink")
            )
            return
        if any(role(ref) != "weight" for ref in wiring.consumes):
            self.skipped.append(
                Skip(
                    name,
                    "a per-channel norm sits between the neurons and their consumer: "
                    "its output for a removed neuron cannot be folded exactly",
                )
            )
            return
        consumers = list(wiring.consumes)
        folds: list[tuple[ParamRef, str]] = []
        nonzero = constant & (values != 0)
        if nonzero.any():
            reason = self._fold_targets(consumers, folds)
            if reason is not None:
                self.skipped.append(Skip(name, reason, neurons=tuple(neurons[nonzero].tolist())))
                constant &= ~nonzero
        neurons, values = neurons[constant], values[constant]
        if neurons.size == 0:
            return
        if neurons.size >= width:
            self.skipped.append(Skip(name, "would remove every neuron of the layer"))
            return
        for ref, bias in folds:
            kept = values != 0
            delta = ops.fold_delta(self.read(ref.name), ref.axis, neurons[kept], values[kept])
            index = np.flatnonzero(delta).astype(np.intp)
            if index.size:
                self.add(bias, Add(name, 0, index, delta[index], why="fold"))
        wired = {ref.name for ref in refs(wiring)}
        for ref in refs(wiring):
            self.add(ref.name, Delete(name, ref.axis, neurons))
        for companion in self._companions(wiring, wired, width):
            self.add(companion, Delete(name, 0, neurons))
        self.layers.append(
            LayerPlan(name, self.options.state, neurons, width, width - int(neurons.size), values)
        )

    def _fold_targets(
        self, consumers: list[ParamRef], folds: list[tuple[ParamRef, str]]
    ) -> str | None:
        if not consumers:
            return "no consumer to fold a non-zero constant output into"
        for ref in consumers:
            if len(ref.shape) != 2:
                return (
                    f"consumer {ref.name!r} is not a Linear: folding a non-zero constant into a "
                    "convolution's bias is wrong at padded borders"
                )
            bias = f"{ref.name.rsplit('.', 1)[0]}.bias" if "." in ref.name else ""
            info = self.tensors.get(bias)
            if info is None or info.shape != (ref.shape[1 - ref.axis],):
                return f"consumer {ref.name!r} has no bias to fold a non-zero constant output into"
            folds.append((ref, bias))
        return None

    def _companions(self, wiring: Wiring, wired: set[str], width: int) -> list[str]:
        """Per-neuron tensors of a producing module that the wiring does not list (a norm's
        running mean and variance): pruned with it so the checkpoint stays loadable."""
        found = []
        for ref in wiring.produces:
            if "." not in ref.name:
                continue
            prefix = ref.name.rsplit(".", 1)[0] + "."
            for name, info in self.tensors.items():
                leaf = name[len(prefix) :]
                if (
                    name.startswith(prefix)
                    and "." not in leaf
                    and name not in wired
                    and name not in found
                    and info.shape == (width,)
                    and info.dtype in EDITABLE
                ):
                    found.append(name)
        return found


def _pre_statistics(report: Report, name: str, width: int) -> LayerStats:
    pre = report.layers.get(f"{name}:pre")
    if pre is None or pre.neurons != width:
        raise ConfigError(
            f"lift needs the pre-activation statistics of layer {name!r} (layer "
            f"{name + ':pre'!r}); take the report with neuronwatch.watch(model, pre=True)"
        )
    return pre
