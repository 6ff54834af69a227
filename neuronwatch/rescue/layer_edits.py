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
from .norm_fold import EPS_RANGE, TOLERANCE, norm_outputs
from .options import LayerPlan, Options, Skip, needed, refs, role
from .steps import Add, Delete, Fill, Redraw, Step, Strip
from .thresholds import pre_threshold

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
            self._reinit(name, stats, wiring, neurons, width)
        elif self.op == "lift":
            self._lift(name, stats, wiring, neurons, width)
        else:
            self._prune(name, stats, wiring, neurons, width)

    def _reinit(
        self,
        name: str,
        stats: LayerStats,
        wiring: Wiring,
        neurons: NDArray[np.intp],
        width: int,
    ) -> None:
        o = self.options
        folds: list[tuple[ParamRef, str]] = []
        constants: NDArray[np.float64] | None = None
        if any(role(ref) != "weight" for ref in wiring.consumes):
            through = self._through_norm(name, stats, wiring, neurons, folds)
            if through is None:
                return
            neurons, constants = through
        for ref in wiring.produces:
            if role(ref) == "weight":
                step: Step = Redraw(name, ref.axis, neurons, o.init, o.match_norm, o.seed)
                self.add(ref.name, step)
            elif role(ref) == "bias":
                self.add(ref.name, Fill(name, ref.axis, neurons, 0.0))
        for ref in wiring.consumes:
            # Zeroing a norm's per-channel parameters would not silence the channel (its
            # running mean still leaks through); zeroing the consumer's weights does, and
            # what the norm passed on for the neuron is folded into the consumer's bias.
            if role(ref) == "weight":
                self.add(ref.name, Fill(name, ref.axis, neurons, 0.0))
        if constants is not None:
            self._fold(name, folds, neurons, constants)
        self.layers.append(LayerPlan(name, o.state, neurons, width, constants=constants))

    def _through_norm(
        self,
        name: str,
        stats: LayerStats,
        wiring: Wiring,
        neurons: NDArray[np.intp],
        folds: list[tuple[ParamRef, str]],
    ) -> tuple[NDArray[np.intp], NDArray[np.float64]] | None:
        """With a norm between the neurons and their consumer: the neurons whose constant
        output the norm turns into a constant that can be folded, and that constant; the rest
        are skipped (``None``: all of them)."""
        top, bottom = stats.partials.max[neurons], stats.partials.min[neurons]
        constant = np.isfinite(top) & np.isfinite(bottom) & (top == bottom)
        if not constant.all():
            self.skipped.append(
                Skip(
                    name,
                    "a per-channel norm sits between the neurons and their consumer and their "
                    "output is not constant over the audit: zeroing the outgoing weights would "
                    "change the outputs",
                    neurons=tuple(neurons[~constant].tolist()),
                )
            )
        neurons, values = neurons[constant], top[constant]
        if neurons.size == 0:
            return None
        norms = [ref for ref in wiring.consumes if role(ref) != "weight"]
        found = norm_outputs(norms, self.tensors, self.read, neurons, values)
        why = "zeroing the outgoing weights would drop what the norm passes on, and "
        if isinstance(found, str):
            self.skipped.append(Skip(name, f"{why}it cannot be folded: {found}"))
            return None
        outputs, spread = found
        consumers = [ref for ref in wiring.consumes if role(ref) == "weight"]
        if outputs.any():
            reason = self._fold_targets(consumers, folds)
            if reason is not None:
                self.skipped.append(Skip(name, f"{why}it cannot be folded: {reason}"))
                return None
        worst = max(
            (_bound(self.read(ref.name), ref.axis, neurons, spread) for ref in consumers),
            default=0.0,
        )
        if not worst <= TOLERANCE:  # also NaN: a variance the norm could not have divided by
            amount = f"up to {worst:.2g}" if np.isfinite(worst) else "without bound"
            self.skipped.append(
                Skip(
                    name,
                    f"{why}the norm's eps (not stored in the checkpoint) changes that {amount} "
                    f"for eps between {EPS_RANGE[0]:g} and {EPS_RANGE[1]:g}",
                )
            )
            return None
        return neurons, outputs

    def _fold(
        self,
        name: str,
        folds: list[tuple[ParamRef, str]],
        neurons: NDArray[np.intp],
        values: NDArray[np.float64],
    ) -> None:
        """Add what ``neurons`` (constant at ``values``) gave each consumer to its bias."""
        kept = values != 0
        for ref, bias in folds:
            delta = ops.fold_delta(self.read(ref.name), ref.axis, neurons[kept], values[kept])
            index = np.flatnonzero(delta).astype(np.intp)
            if index.size:
                self.add(bias, Add(name, 0, index, delta[index], why="fold"))

    def _lift(
        self,
        name: str,
        stats: LayerStats,
        wiring: Wiring,
        neurons: NDArray[np.intp],
        width: int,
    ) -> None:
        pre = _pre_statistics(self.report, name, width)
        config = stats.config
        threshold = pre_threshold(config.activation, config.fire_threshold)
        if threshold is None:
            self.skipped.append(
                Skip(
                    name,
                    f"lift cannot tell which pre-activation makes {config.activation} exceed "
                    f"the fire threshold {config.fire_threshold:g} (an activation it cannot "
                    "invert, or a threshold outside its range)",
                )
            )
            return
        bias = needed("lift", wiring)[0]
        p = pre.partials
        shifts = ops.lift_shifts(
            pre.finite_rows[neurons],
            p.sum[neurons],
            p.sq_sum[neurons],
            p.max[neurons],
            threshold,
            self.options.top,
        )
        finite = np.isfinite(shifts)
        if not finite.all():
            self.skipped.append(
                Skip(
                    name,
                    "no finite pre-activation statistics (every audit row was NaN or inf, or "
                    "its values passed 1.8e19, whose squares overflow float32)",
                    neurons=tuple(neurons[~finite].tolist()),
                )
            )
            neurons, shifts = neurons[finite], shifts[finite]
            if neurons.size == 0:
                return
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
        self._fold(name, folds, neurons, values)
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
            if info.tied:
                return f"the consumer's bias {bias!r} is tied to {info.tied_to!r}"
            if info.dtype not in EDITABLE:
                return f"the consumer's bias {bias!r} holds {info.dtype} values"
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
                    and info.stored
                ):
                    found.append(name)
        return found


def _bound(
    weight: NDArray[np.float64],
    axis: int,
    neurons: NDArray[np.intp],
    spread: NDArray[np.float64],
) -> float:
    """The most any output of a consumer can move when its inputs ``neurons`` move by up to
    ``spread`` (a conv's kernel positions add up)."""
    taken = np.abs(np.take(weight, neurons, axis=axis))
    with np.errstate(invalid="ignore"):
        moved = np.tensordot(taken, spread, axes=([axis], [0]))
    return float(moved.reshape(moved.shape[0], -1).sum(axis=1).max()) if moved.size else 0.0


def _pre_statistics(report: Report, name: str, width: int) -> LayerStats:
    pre = report.layers.get(f"{name}:pre")
    if pre is None or pre.neurons != width:
        raise ConfigError(
            f"lift needs the pre-activation statistics of layer {name!r} (layer "
            f"{name + ':pre'!r}); take the report with neuronwatch.watch(model, pre=True)"
        )
    return pre
