"""Check a report against a checkpoint and decide every edit before anything is written.

The plan is where the report is trusted or refused. A report is **refused** (nothing written)
when a selected layer's wiring names a tensor the checkpoint lacks, with another shape, or of a
type that cannot be edited. A parameter is **not editable**, and the layers that need it are
**skipped** (the manifest says why), when it is marked so by the wiring, tied to another tensor
in the checkpoint, produced by two different layers, wired to two layers along the same axis, or
wired with shapes that disagree with each other or with the layer's neuron count.

Which neurons each op acts on: see :mod:`.options`; what each op does to them:
:mod:`.layer_edits`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError
from ..report import Report
from ..wiring import Wiring
from .checkpoint import CheckpointError, TensorInfo
from .dtypes import EDITABLE
from .layer_edits import LayerEdits
from .norm_fold import unplaced_statistics
from .options import OPS, STATES, LayerPlan, Options, Skip, needed, refs, role
from .steps import Applied, Step, apply_steps, new_shape

__all__ = ["OPS", "STATES", "LayerPlan", "Options", "Plan", "Skip", "make_plan", "role"]


@dataclass
class Plan:
    """Every edit of one run, and the editor formats call while writing."""

    op: str
    options: Options
    layers: list[LayerPlan]
    skipped: list[Skip]
    steps: dict[str, list[Step]]
    shapes: dict[str, tuple[int, ...]]  # checkpoint shapes of the touched tensors
    applied: dict[str, list[Applied]] = field(default_factory=dict)

    # -- TensorEditor ---------------------------------------------------------------------------

    def touches(self, name: str) -> bool:
        return name in self.steps

    def new_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        return new_shape(shape, self.steps[name]) if name in self.steps else shape

    def apply(self, name: str, raw: NDArray[Any], dtype: str) -> NDArray[Any]:
        edited, applied = apply_steps(raw, dtype, self.steps[name], name)
        self.applied[name] = applied
        return edited

    def apply_moment(self, name: str, raw: NDArray[Any]) -> NDArray[Any]:
        if name not in self.applied:
            raise AssertionError(f"moment of {name!r} edited before the parameter")
        values = np.array(raw)  # never edit the loaded (possibly memory-mapped) array
        for applied in self.applied[name]:
            values = applied.moment(values)
        return values


# -- selection and checks ---------------------------------------------------------------------


def _select(report: Report, patterns: Iterable[str]) -> list[str]:
    patterns = list(patterns) or ["*"]
    # ":pre" layers share their activation's neurons and wiring: they are statistics for lift,
    # never edited themselves (editing both would act twice on the same neurons).
    candidates = [name for name, stats in report.layers.items() if stats.kind != "pre"]
    chosen = [n for n in candidates if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ConfigError(
            f"--layers {' '.join(patterns)} matches no layer of the report; layers: "
            f"{', '.join(candidates) or '(none)'}"
        )
    return chosen


def _check_against(
    report: Report, layers: list[str], tensors: Mapping[str, TensorInfo], where: str
) -> None:
    """Refuse a report whose selected wiring does not fit the checkpoint."""
    missing: list[str] = []
    for layer in layers:
        wiring = report.wiring.get(layer)
        if wiring is None:
            continue
        for ref in refs(wiring):
            info = tensors.get(ref.name)
            if info is None:
                missing.append(f"{ref.name} (layer {layer})")
            elif info.shape != ref.shape:
                raise CheckpointError(
                    f"the report does not match {where}: layer {layer!r} is wired to "
                    f"{ref.name!r} of shape {ref.shape}, the checkpoint holds {info.shape}; "
                    "was the report taken on this model?"
                )
    if missing:
        hint = ""
        names = list(tensors)
        if names and missing:
            first = missing[0].split(" ")[0]
            close = [n for n in names if n.endswith(first) or first.endswith(n)]
            if close:
                hint = f" (the checkpoint has {close[0]!r}: a name prefix differs)"
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise CheckpointError(
            f"the report does not match {where}: it has no tensor {shown}{hint}; was the "
            "report taken on this model?"
        )


def _not_editable(report: Report, tensors: Mapping[str, TensorInfo]) -> dict[str, str]:
    """Parameter name -> why rescue must not edit it (see the module docstring)."""
    producers: dict[str, set[str]] = {}
    claims: dict[tuple[str, int], set[str]] = {}
    shapes: dict[str, set[tuple[int, ...]]] = {}
    reasons: dict[str, str] = {}
    for layer, wiring in report.wiring.items():
        stats = report.layers.get(layer)
        if stats is None or stats.kind == "pre":
            continue
        for ref in refs(wiring):
            claims.setdefault((ref.name, ref.axis), set()).add(layer)
            shapes.setdefault(ref.name, set()).add(ref.shape)
            if getattr(ref, "editable", True) is False:
                reasons[ref.name] = "marked not editable by the wiring (tied or gated)"
            if ref.shape[ref.axis] != stats.neurons:
                reasons.setdefault(
                    ref.name,
                    f"axis {ref.axis} has size {ref.shape[ref.axis]} but layer {layer!r} has "
                    f"{stats.neurons} neurons",
                )
        for ref in wiring.produces:
            producers.setdefault(ref.name, set()).add(layer)
    for name, layers in producers.items():
        if len(layers) > 1:
            reasons.setdefault(name, f"produced by several layers ({', '.join(sorted(layers))})")
    for (name, axis), layers in claims.items():
        if len(layers) > 1:
            reasons.setdefault(
                name, f"axis {axis} is wired to several layers ({', '.join(sorted(layers))})"
            )
    for name, seen in shapes.items():
        if len(seen) > 1:
            reasons.setdefault(name, f"wired with different shapes {sorted(seen)}")
    for name, info in tensors.items():
        if info.tied:
            other = f"tied to {info.tied_to!r}" if info.tied_to else "tied to another tensor"
            reasons.setdefault(name, f"{other} (tied weights share one storage)")
    return reasons


# What editing only the consumer side would do, per op, when no producer is wired.
_WITHOUT_PRODUCER = {
    "prune": "removing them from the consumer alone would leave a checkpoint that cannot load",
    "reinit": "there are no incoming weights to redraw, so nothing would be revived",
    "strip": "there are no incoming weights to strip",
    "lift": "there is no bias to lift",
}


def _no_producer(op: str, wiring: Wiring) -> str | None:
    """Why the layer has no single producer to edit, or None. A ReLU after a residual add
    (ResNet's block-final ReLU) reads the sum of two branches: its wiring lists the consumer
    but no producer, or only a norm after the add, and no weight to edit."""
    if wiring.produces and (
        op in ("strip", "lift") or any(role(ref) == "weight" for ref in wiring.produces)
    ):
        return None
    return (
        "no single producer: the neurons are not the output of one Linear/conv (a residual "
        f"add, a concatenation); {_WITHOUT_PRODUCER[op]}"
    )


# The ops that promise the same outputs (and a loadable checkpoint) after the edit.
_OUTPUT_SAFE = ("reinit", "prune")


def _unplaced_reason(op: str, norms: list[str]) -> str:
    """Why a layer is skipped when running statistics of its width are not in any wiring."""
    names = ", ".join(repr(n) for n in norms)
    harm = {
        "reinit": "zeroing the outgoing weights would drop what it passes on for the neurons",
        "prune": "its statistics would keep the old width (the checkpoint would not load) and "
        "what it passes on for the neurons would not be folded",
    }[op]
    return (
        f"the checkpoint holds running statistics of this layer's width ({names}) that the "
        "report's wiring does not place (a norm without weight and bias, e.g. "
        f"BatchNorm1d(affine=False)): if it sits between the neurons and their consumer, {harm}; "
        "give the norm affine parameters, or leave this layer out with --layers"
    )


def _left_out(report: Report) -> dict[str, list[str]]:
    """Layers whose wiring lacks parameters an ONNX audit found not editable (a tied
    initializer, a gate), from ``report.meta["onnx"]["not_editable"]``: editing the rest of
    such a layer would be a partial edit, so the whole layer is skipped."""
    onnx_meta = report.meta.get("onnx")
    listed = onnx_meta.get("not_editable") if isinstance(onnx_meta, Mapping) else None
    if not isinstance(listed, Mapping):
        return {}
    return {str(k): [str(p) for p in v] for k, v in listed.items() if v}


def make_plan(
    op: str,
    report: Report,
    tensors: Mapping[str, TensorInfo],
    read: Callable[[str], NDArray[np.float64]],
    *,
    layers: Iterable[str] = ("*",),
    options: Options | None = None,
    where: str = "the checkpoint",
) -> Plan:
    """Every edit of ``op`` on ``tensors`` (a checkpoint's table) driven by ``report``.

    ``read`` loads one tensor's values (prune folds constants into consumer biases). Raises
    :class:`CheckpointError` when the report does not match, :class:`ConfigError` for bad
    options or layer patterns; nothing is written in either case.
    """
    options = options or Options()
    options.check(op)
    selected = _select(report, layers)
    _check_against(report, selected, tensors, where)
    blocked = _not_editable(report, tensors)
    builder = LayerEdits(op, options, report, tensors, read)
    hidden = _left_out(report)
    unplaced = unplaced_statistics(report.wiring.values(), tensors) if op in _OUTPUT_SAFE else {}
    for name in selected:
        stats = report.layers[name]
        wiring = report.wiring.get(name)
        if wiring is None:
            builder.skipped.append(Skip(name, "the report has no wiring for this layer"))
            continue
        if name in hidden:
            builder.skipped.append(
                Skip(
                    name,
                    "not editable: the ONNX audit left shared or gated parameters out of "
                    f"this layer's wiring ({', '.join(hidden[name])})",
                )
            )
            continue
        neurons = stats.indices(options.state).astype(np.intp)
        if neurons.size == 0:
            continue
        lonely = _no_producer(op, wiring)
        if lonely is not None:
            builder.skipped.append(Skip(name, lonely))
            continue
        norms = unplaced.get(stats.neurons)
        if norms:
            builder.skipped.append(Skip(name, _unplaced_reason(op, norms)))
            continue
        required = needed(op, wiring)
        if not required:
            what = {"strip": "incoming weight", "lift": "bias", "reinit": "weight"}.get(op, "")
            builder.skipped.append(Skip(name, f"no {what} wired to the layer's neurons"))
            continue
        if op == "reinit" and not any(role(r) == "weight" for r in wiring.consumes):
            builder.skipped.append(
                Skip(name, "no outgoing weights to zero: reinit would change the outputs")
            )
            continue
        refused = next((r for r in required if r.name in blocked), None)
        if refused is not None:
            builder.skipped.append(
                Skip(name, f"not editable: {blocked[refused.name]}", refused.name)
            )
            continue
        for ref in required:
            dtype = tensors[ref.name].dtype
            if dtype not in EDITABLE:
                raise CheckpointError(
                    f"{where}: {ref.name!r} (layer {name!r}) holds {dtype} values; rescue edits "
                    f"{', '.join(sorted(EDITABLE))} tensors only"
                )
        builder.layer(name, stats, wiring, neurons)
    shapes = {name: tensors[name].shape for name in builder.steps}
    return Plan(op, options, builder.layers, builder.skipped, builder.steps, shapes)
