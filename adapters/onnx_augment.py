"""Append per-neuron reductions to an ONNX graph, so ONNX Runtime computes the partial sums.

For every tapped activation ``a`` the graph gains nodes that reduce it over every row (every
axis but the neurons') to the per-neuron :data:`~neuronwatch.partials.FIELDS` and the row
count; only those ``O(neurons)`` vectors become graph outputs, never the activation. The taps
read activation *outputs*, so ONNX Runtime's fusions (BiasGelu, FusedGemm, ...) still run and
the audit measures the production kernels.

The reductions are the cheap ones measured on ORT CPU (DESIGN §7). A ``[rows, neurons]`` view is
summed as a GEMV with a row of ones; counts are ``uint8`` comparisons summed by
``MatMulInteger``; ``Abs`` and ``Mul`` + GEMV give sum |a| and the squares (``ReduceL1`` and
``ReduceSumSquare`` are 3-10x slower); max and min reduce ``[k, rows / k, neurons]`` chunks,
the middle axis first. They assume finite values; an ``If`` on the
(``O(neurons)``) sums switches to the exact form that leaves NaN/Inf out of every statistic only
when a layer holds a non-finite value, so the common case pays nothing for it. The layer
histogram runs on the forwards the caller asks for (a boolean input, default off), like the
torch adapter's sampled histogram.

Pad rows: a tap whose rows are the ``[batch, tokens]`` positions of the model's attention-mask
input keeps only the rows where the mask is non-zero (a ``Gather`` of the kept rows, shared by
every tap), as the torch adapter does with the forward's ``attention_mask``.

fp16/bf16 activations are cast to float32 after their view is taken (a ``Reshape`` in their own
type, see ``_Tapper.rows_view``); float64 ones are reduced in float64. Counts are summed exactly
(int32 or float64) and leave the graph as float64.
Thresholds are rounded to float32 in the direction that keeps every comparison equal to the
float64 one, as in the torch adapter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from neuronwatch.config import LayerConfig
from neuronwatch.errors import ConfigError
from neuronwatch.families import float32_above, float32_below

from .onnx_build import FLOAT_TYPES, PREFIX, Body, Builder
from .onnx_graph import Dim

__all__ = [
    "COUNT_FIELDS",
    "FIELD_ORDER",
    "MIN_OPSET",
    "Augmented",
    "MaskRule",
    "Tap",
    "TapOutputs",
    "augment",
    "mask_rule",
]

HISTOGRAM_INPUT = f"{PREFIX}/histogram"
MIN_OPSET = 11
# The per-neuron statistics every tap outputs, in this order (then rows and the histogram).
FIELD_ORDER: tuple[str, ...] = (
    "fired", "saturated", "nonfinite", "abs_sum", "sum", "sq_sum", "max", "min",
)  # fmt: skip
# Count fields leave the graph as float64: exact to 2**53, where float32 stops at 2**24 rows.
COUNT_FIELDS = frozenset({"fired", "saturated", "nonfinite"})
# So do the sums: a float32 sum of squares overflows once |a| passes 1.8e19.
SUM_FIELDS = frozenset({"abs_sum", "sum", "sq_sum"})
# Chunk counts tried by _Tapper.extreme (largest first), and the fewest rows a chunk may hold.
CHUNKS: tuple[int, ...] = (256, 128, 64, 32, 16, 8, 4, 2)
MIN_CHUNK_ROWS = 8
# Taps at least this wide (or of unknown width) use the byte counts and chunked extremes.
WIDE_TAP = 64


@dataclass(frozen=True)
class Tap:
    """One tensor to reduce: the layer it feeds, its neuron axis (``-1`` last, ``1`` channels),
    its rank and static neuron count when known, and whether pad rows are dropped."""

    layer: str
    tensor: str
    axis: int
    rank: int | None
    neurons: int | None
    config: LayerConfig
    elem_type: int = TensorProto.FLOAT
    masked: MaskRule = "no"


@dataclass(frozen=True)
class TapOutputs:
    """The graph outputs of one tap, by field name (``rows``, ``above`` for the histogram)."""

    layer: str
    names: dict[str, str]
    edges: int


@dataclass
class Augmented:
    model: onnx.ModelProto
    taps: list[TapOutputs]
    histogram_input: str = HISTOGRAM_INPUT
    mask_input: str | None = None


MaskRule = Literal["no", "yes", "check"]


def mask_rule(shape: Sequence[Dim] | None, axis: int, mask_shape: Sequence[Dim] | None) -> MaskRule:
    """Whether a tap's rows are the mask's ``[batch, tokens]`` positions, the torch adapter's
    rule (its rows' shape equals the mask's, or a 2-D tap has as many rows as the mask has
    entries): ``yes`` when the shapes prove it, ``no`` when they rule it out, ``check`` when
    only the run can tell (dynamic dims with unrelated names, as dynamo exports have)."""
    if shape is None or not shape or (mask_shape is not None and len(mask_shape) != 2):
        return "no"
    position = axis % len(shape)
    rows = [d for i, d in enumerate(shape) if i != position]
    if len(rows) == 1:
        return "check"
    if len(rows) != 2:
        return "no"
    if mask_shape is None:
        return "check"
    pairs = list(zip(rows, mask_shape, strict=True))
    if any(isinstance(a, int) and isinstance(b, int) and a != b for a, b in pairs):
        return "no"
    if all(a is not None and a == b for a, b in pairs):
        return "yes"
    return "check"


def field_type(name: str, work: int) -> int:
    """The element type of a tap's output ``name`` (a :data:`FIELD_ORDER` field)."""
    return TensorProto.DOUBLE if name in COUNT_FIELDS or name in SUM_FIELDS else work


class _Tapper:
    """Builds the reductions of every tap into the main graph."""

    def __init__(
        self, builder: Builder, main: Body, mask_index: str | None, mask_input: str | None
    ) -> None:
        self.b = builder
        self.main = main
        self.mask_index = mask_index
        self.mask_input = mask_input
        # Per tap (set by statistics()): the [1, rows] ones of total() and count(), and the
        # chunked shape of extreme(); None where the tap is not a [rows, neurons] view.
        self.ones: str | None = None
        self.byte_ones: str | None = None
        self.any_rows: str | None = None
        self.chunks: str | None = None
        self.double_ones: str | None = None
        self.work: int = TensorProto.FLOAT  # the tap's work type (set by statistics())

    def rows_view(self, tap: Tap) -> tuple[str, int, tuple[int, ...]]:
        """The tap's values (kept rows only when masked), the work type, and the axes to
        reduce over (every axis but the neurons').

        Neurons on the last axis: a ``[rows, neurons]`` view (a Reshape, which ONNX Runtime
        aliases: no copy), the kept rows gathered when masked. Channels first (conv maps,
        unmasked): the tensor itself, reduced over its other axes.
        """
        m = self.main
        x = tap.tensor
        elem = tap.elem_type
        work = elem if elem in FLOAT_TYPES else TensorProto.FLOAT

        def cast(view: str) -> str:
            # After the view, never on the tap itself: ORT runs fp16 ops that lack a CPU kernel
            # (Tanh, Elu, LeakyRelu, ...) in float32 between two casts it inserts, and drops its
            # cast back to fp16 when the only reader is our cast to float32; the statistics
            # were then of values the model never produced (tanh 0.99996, not fp16's 1.0). A
            # Reshape in the tap's own type sits between the two casts and keeps the rounding.
            return view if elem == work else m.op("Cast", view, to=work)

        rank = tap.rank
        if rank == 0:
            # A scalar (a gate such as sigmoid(h.mean()), a scalar input): one neuron, one row.
            one = m.op("Reshape", x, self.b.const(np.asarray([1, 1], np.int64)))
            return cast(one), work, (0,)
        if tap.masked == "no" and rank is not None and tap.axis % rank != rank - 1:
            # Channels first (conv maps): reduce over the other axes in place, no transpose.
            feature = tap.axis % rank
            if elem != work:
                # Reshaped to its own shape (exact on empty maps too: a 0 copies a 0).
                x = m.op("Reshape", x, m.op("Shape", x))
            return cast(x), work, tuple(d for d in range(rank) if d != feature)
        if tap.axis != -1:
            if rank is None:
                raise ConfigError(f"layer {tap.layer!r}: rank unknown, cannot move axis {tap.axis}")
            if tap.axis % rank != rank - 1:
                perm = [d for d in range(rank) if d != tap.axis % rank] + [tap.axis % rank]
                x = m.op("Transpose", x, perm=perm)
        if tap.neurons is not None:
            shape = self.b.const(np.asarray([-1, tap.neurons], np.int64))
        else:
            # The last dim of [1, *shape]: a tensor that turns out to be a scalar is one neuron.
            padded = m.op(
                "Concat", self.b.const(np.asarray([1], np.int64)), m.op("Shape", x), axis=0
            )
            last = m.op(
                "Slice",
                padded,
                self.b.const(np.asarray([-1], np.int64)),
                self.b.const(np.asarray([np.iinfo(np.int64).max], np.int64)),
            )
            shape = m.op("Concat", self.b.const(np.asarray([-1], np.int64)), last, axis=0)
        view = m.op("Reshape", x, shape)
        if tap.masked == "yes" and self.mask_index is not None:
            view = m.op("Gather", view, self.mask_index, axis=0)
        elif tap.masked == "check" and self.mask_index is not None:
            view = self._checked_mask(x, view, tap, elem)
        return cast(view), work, (0,)

    def _checked_mask(self, x: str, view: str, tap: Tap, elem: int) -> str:
        """Keep the mask's rows when, in this run, the tap's rows are its positions."""
        m, b = self.main, self.b
        assert self.mask_input is not None
        rows_shape = m.op(
            "Slice",
            m.op("Shape", x),
            b.const(np.asarray([0], np.int64)),
            b.const(np.asarray([-1], np.int64)),
        )
        if tap.rank == 2:  # tokens flattened to [batch * tokens, neurons]
            wanted = m.op(
                "Reshape", m.op("Size", self.mask_input), b.const(np.asarray([1], np.int64))
            )
        else:
            wanted = m.op("Shape", self.mask_input)
        same = m.op("Equal", rows_shape, wanted)
        matches = m.op(
            "Cast",
            m.reduce("ReduceMin", m.op("Cast", same, to=TensorProto.INT64), None),
            to=TensorProto.BOOL,
        )
        assert self.mask_index is not None
        kept = Body(b)
        kept_graph = kept.graph(
            "masked", [(kept.op("Gather", view, self.mask_index, axis=0), elem)]
        )
        every = Body(b)
        every_graph = every.graph("unmasked", [(view, elem)])
        out = b.fresh("rows")
        m.nodes.append(
            helper.make_node(
                "If", [matches], [out], name=out, then_branch=kept_graph, else_branch=every_graph
            )
        )
        return out

    def thresholds(self, config: LayerConfig, work: int) -> tuple[str, str | None, str | None]:
        dtype = FLOAT_TYPES[work]
        exact = work == TensorProto.DOUBLE
        below = (lambda v: v) if exact else float32_below
        above = (lambda v: v) if exact else float32_above
        threshold = self.b.const(np.asarray(below(config.fire_threshold), dtype))
        low = high = None
        if math.isfinite(config.saturation_low):
            low = self.b.const(np.asarray(above(config.saturation_low), dtype))
        if math.isfinite(config.saturation_high):
            high = self.b.const(np.asarray(below(config.saturation_high), dtype))
        return threshold, low, high

    def _flat(self, body: Body, values: str, low: str | None, high: str | None) -> str | None:
        parts = []
        if low is not None:
            parts.append(body.op("Less", values, low))
        if high is not None:
            parts.append(body.op("Greater", values, high))
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else body.op("Or", *parts)

    def above(
        self,
        body: Body,
        values: str,
        bound: float,
        work: int,
        axes: tuple[int, ...],
    ) -> str:
        """Per neuron, how many values are above ``bound`` (already rounded for ``work``), as
        float64; NaN is above nothing."""
        limit = self.b.const(np.asarray(bound, FLOAT_TYPES[work]))
        return self.count(body, body.op("Greater", values, limit), work, axes)

    def count(self, body: Body, condition: str, work: int, axes: tuple[int, ...]) -> str:
        """Per neuron, how many rows hold the boolean ``condition``, exactly, as float64.

        A wide ``[rows, neurons]`` view is counted as ``ones[1, rows] @ uint8(condition)`` with
        ``MatMulInteger``: exact in int32 and ~2x faster than a float ``Cast`` + GEMV on ORT's
        CPU (1.9 against 4.0 ms for 4096 x 2048 values), since it reads bytes, not floats. A
        narrow one by a float64 GEMV. Other views (conv maps) are summed as 0/1 values by
        :meth:`total`: each row of the last axis in float32 (exact below 2**24 values a row),
        the rows in float64.
        """
        flat = self.b.const(np.asarray([-1], np.int64))
        if axes == (0,) and self.byte_ones is not None and self.any_rows is not None:
            as_bytes = body.op("Cast", condition, to=TensorProto.UINT8)
            # Times 0 or 1: ORT's MatMulInteger over no rows (an empty batch, all pads) returns
            # whatever its output buffer held, not zeros.
            counts = body.op(
                "Mul", body.op("MatMulInteger", self.byte_ones, as_bytes), self.any_rows
            )
            return body.op("Cast", body.op("Reshape", counts, flat), to=TensorProto.DOUBLE)
        if axes == (0,) and self.double_ones is not None:
            as_double = body.op("Cast", condition, to=TensorProto.DOUBLE)
            return body.op("Reshape", body.op("MatMul", self.double_ones, as_double), flat)
        return self.total(body, body.op("Cast", condition, to=work), axes)

    def extreme(self, body: Body, op_type: str, values: str, axes: tuple[int, ...]) -> str:
        """``ReduceMax``/``ReduceMin`` per neuron. A ``[rows, neurons]`` view is reshaped to
        ``[k, rows / k, neurons]`` and reduced over axis 1, then 0: ORT's CPU reduces a middle
        axis ~3x faster than the leading one (2.7 against 8.7 ms for 4096 x 2048 floats, where
        a single ``ReduceMax`` over axis 0 walks the rows one at a time)."""
        if axes != (0,) or self.chunks is None:
            return body.reduce(op_type, values, axes)
        partial = body.reduce(op_type, body.op("Reshape", values, self.chunks), (1,))
        return body.reduce(op_type, partial, (0,))

    def total(self, body: Body, values: str, axes: tuple[int, ...]) -> str:
        """Per-neuron sums over ``axes``, as float64. A ``[rows, neurons]`` view is summed as
        ``ones[1, rows] @ view``: ORT's GEMV reads it ~3x faster than ``ReduceSum`` over
        axis 0 on CPU (0.8 against 2.1 ms for 4096 x 2048 floats), and sums in blocks (relative
        error 4e-7 at 2**24 rows). Other views (conv maps) sum each row of their last axis, then
        the rows in float64: one float32 ``ReduceSum`` over every axis drifted by 4 % at 2**25
        values a channel."""
        double = TensorProto.DOUBLE
        if axes != (0,) or self.ones is None:
            last = max(axes)
            rows = body.reduce("ReduceSum", values, (last,), keepdims=1)
            if self.work != double:
                rows = body.op("Cast", rows, to=double)
            return body.reduce("ReduceSum", rows, axes)
        flat = self.b.const(np.asarray([-1], np.int64))
        sums = body.op("Reshape", body.op("MatMul", self.ones, values), flat)
        return sums if self.work == double else body.op("Cast", sums, to=double)

    def _zeros_like(self, body: Body, vector: str, work: int) -> str:
        """Zeros shaped like the per-neuron ``vector``, never computed from its values:
        ``sum - sum`` is NaN once a sum of finite values overflowed to inf (two values of
        3e38 in float32), and a family without a flat region saturates nowhere."""
        zero = numpy_helper.from_array(np.zeros(1, FLOAT_TYPES[work]), "value")
        return body.op("ConstantOfShape", body.op("Shape", vector), value=zero)

    def _dim(self, shape: str, index: int) -> str:
        """``[shape[index]]``: a view's rows or neurons, for :meth:`_ones`, :meth:`_any_rows`
        and :meth:`_chunks` (read once per tap, shared by all three), or a map's row length."""
        start, end = (self.b.const(np.asarray([i], np.int64)) for i in (index, index + 1))
        return self.main.op("Slice", shape, start, end)

    def _ones(self, rows: str, dtype: type[np.generic]) -> str:
        """A ``[1, rows]`` row of ones for :meth:`total` and :meth:`count`, built once per tap
        and run."""
        shape = self.main.op("Concat", self.b.const(np.asarray([1], np.int64)), rows, axis=0)
        one = numpy_helper.from_array(np.ones(1, dtype), "value")
        return self.main.op("ConstantOfShape", shape, value=one)

    def _any_rows(self, rows: str) -> str:
        """``[1]`` int32: 1 when the view has rows, else 0."""
        some = self.main.op("Greater", rows, self.b.const(np.asarray(0, np.int64)))
        return self.main.op("Cast", some, to=TensorProto.INT32)

    def _chunks(self, rows: str, neurons: str) -> str:
        """The shape ``[k, rows / k, neurons]`` of a ``[rows, neurons]`` view for
        :meth:`extreme`: ``k`` is the largest of :data:`CHUNKS` that divides the rows and leaves
        at least :data:`MIN_CHUNK_ROWS` rows per chunk, else 1 (odd or few rows)."""
        m, b = self.main, self.b
        chunks = b.const(np.asarray(CHUNKS, np.int64))
        divides = m.op("Equal", m.op("Mod", rows, chunks), b.const(np.asarray(0, np.int64)))
        enough = m.op(
            "Not", m.op("Less", rows, b.const(np.asarray(CHUNKS, np.int64) * MIN_CHUNK_ROWS))
        )
        usable = m.op(
            "Concat",
            m.op("Cast", m.op("And", divides, enough), to=TensorProto.FLOAT),
            b.const(np.asarray([1.0], np.float32)),  # k = 1 always works
            axis=0,
        )
        every = b.const(np.asarray([*CHUNKS, 1], np.int64))
        k = m.op("Gather", every, m.op("ArgMax", usable, axis=0, keepdims=1), axis=0)
        # -1, not rows / k: a Reshape reads a 0 in its shape as "keep that dimension", and an
        # empty batch (or one whose every row is a pad) has 0 rows.
        return m.op("Concat", k, b.const(np.asarray([-1], np.int64)), neurons, axis=0)

    def statistics(self, tap: Tap, index: int) -> TapOutputs:
        m = self.main
        view, work, axes = self.rows_view(tap)
        dtype = FLOAT_TYPES[work]
        threshold, low, high = self.thresholds(tap.config, work)
        bound = float(np.asarray(self.b.value(threshold)))
        rows_first = axes == (0,)
        # Byte counts and chunked extremes pay off on wide layers; on narrow ones (a few
        # neurons) their ~28 extra small nodes per tap cost more than they save.
        wide = rows_first and (tap.neurons is None or tap.neurons >= WIDE_TAP)
        self.ones = self.byte_ones = self.any_rows = self.chunks = self.double_ones = None
        self.work = work
        if rows_first:
            shape = m.op("Shape", view)
            rows = self._dim(shape, 0)
            self.ones = self._ones(rows, dtype)
            if wide:
                self.byte_ones = self._ones(rows, np.uint8)
                self.any_rows = self._any_rows(rows)
                self.chunks = self._chunks(rows, self._dim(shape, 1))
            else:
                self.double_ones = self._ones(rows, np.float64)
        # Cheap form: valid when every value is finite. One reduction after another, each
        # temporary freed before the next (with the session's priority-based order).
        cheap = {"fired": self.above(m, view, bound, work, axes)}
        cheap["sum"] = self.total(m, view, axes)
        cheap["max"] = self.extreme(m, "ReduceMax", view, axes)
        cheap["min"] = self.extreme(m, "ReduceMin", view, axes)
        cheap["abs_sum"] = self.total(m, m.op("Abs", view), axes)
        cheap["sq_sum"] = self.total(m, m.op("Mul", view, view), axes)
        flat = self._flat(m, view, low, high)
        zeros = self._zeros_like(m, cheap["sum"], TensorProto.DOUBLE)
        cheap["saturated"] = self.count(m, flat, work, axes) if flat is not None else zeros
        cheap["nonfinite"] = zeros
        # Finite values whose sums (or squares) overflowed the work type go the exact way too,
        # where the sums are taken in float64.
        total = m.op(
            "Add",
            m.reduce("ReduceSum", cheap["sum"], None),
            m.reduce("ReduceSum", cheap["sq_sum"], None),
        )
        finite = m.op("Equal", m.op("Sub", total, total), self.b.const(np.asarray(0.0)))

        then = Body(self.b)
        then_graph = then.graph("cheap", [(cheap[f], field_type(f, work)) for f in FIELD_ORDER])
        exact = self.exact(view, work, threshold, low, high, axes)
        stats = self.b.fresh("stats")
        outputs = [f"{stats}/{f}" for f in FIELD_ORDER]
        m.nodes.append(
            helper.make_node(
                "If", [finite], outputs, name=stats, then_branch=then_graph, else_branch=exact
            )
        )
        names = dict(zip(FIELD_ORDER, outputs, strict=True))
        row_dims = m.op(
            "Gather", m.op("Shape", view), self.b.const(np.asarray(axes, np.int64)), axis=0
        )
        names["rows"] = m.reduce("ReduceProd", row_dims, None)
        if axes != (0,):
            # Counts and sums take one row of the last axis in float32 (see count/total): the
            # source warns when a run's rows are too long for that to be exact.
            names["row_length"] = self._dim(row_dims, len(axes) - 1)
        names["above"], edges = self.histogram(view, tap.config, work, axes, finite, names)
        return TapOutputs(tap.layer, names, edges)

    def exact(
        self,
        view: str,
        work: int,
        threshold: str,
        low: str | None,
        high: str | None,
        axes: tuple[int, ...],
    ) -> onnx.GraphProto:
        """NaN and +-Inf left out of every statistic and counted apart (the torch adapter's
        ``reduce_eager``); the sums in float64, which holds what float32 overflowed."""
        e = Body(self.b)
        dtype = FLOAT_TYPES[work]
        finite = e.op("Not", e.op("Or", e.op("IsNaN", view), e.op("IsInf", view)))
        zeroed = e.op("Where", finite, view, self.b.const(np.asarray(0, dtype)))
        wide = zeroed if work == TensorProto.DOUBLE else e.op("Cast", zeroed, to=TensorProto.DOUBLE)
        flat = self._flat(e, zeroed, low, high)
        lowest = self.b.const(np.asarray(-np.inf, dtype))
        highest = self.b.const(np.asarray(np.inf, dtype))
        stats = {
            "fired": self.count(
                e, e.op("And", e.op("Greater", zeroed, threshold), finite), work, axes
            ),
            "nonfinite": self.count(e, e.op("Not", finite), work, axes),
            "abs_sum": e.reduce("ReduceSum", e.op("Abs", wide), axes),
            "sum": e.reduce("ReduceSum", wide, axes),
            "sq_sum": e.reduce("ReduceSum", e.op("Mul", wide, wide), axes),
            "max": self.extreme(e, "ReduceMax", e.op("Where", finite, view, lowest), axes),
            "min": self.extreme(e, "ReduceMin", e.op("Where", finite, view, highest), axes),
        }
        stats["saturated"] = (
            self.count(e, e.op("And", flat, finite), work, axes)
            if flat is not None
            else self._zeros_like(e, stats["sum"], TensorProto.DOUBLE)
        )
        return e.graph("exact", [(stats[f], field_type(f, work)) for f in FIELD_ORDER])

    def histogram(
        self,
        view: str,
        config: LayerConfig,
        work: int,
        axes: tuple[int, ...],
        finite: str,
        stats: dict[str, str],
    ) -> tuple[str, int]:
        """Counts of finite values above each edge, computed only when the histogram input is
        true (else zeros): bins are their differences (``bins_from_above`` on the host).

        Counted per neuron exactly (:meth:`count`), then summed in float64 over the neurons:
        a layer's total can pass 2**24 values in one batch. +Inf would count above
        every edge: when the layer holds non-finite values they are first moved below all
        edges (NaN compares false anyway).

        Each edge is a full pass over the layer (~0.8 ms for 4096 x 2048 floats), so an edge
        is compared only when the batch can tell: below the layer's least finite value every
        finite value is above it, at or above the greatest none is (both read off this
        batch's per-neuron ``min``/``max``), and an edge equal to the fire threshold is the
        ``fired`` count already taken. A ReLU layer skips its 7 negative edges and the 0;
        a transformer's GELU (min -0.17) the 4 lowest and usually 10.
        """
        dtype = FLOAT_TYPES[work]
        below = (lambda v: v) if work == TensorProto.DOUBLE else float32_below
        fire_bound = self.b.value(self.thresholds(config, work)[0])
        one = self.b.const(np.asarray([1], np.int64))
        on = Body(self.b)
        lowest = on.reduce("ReduceMin", stats["min"], None)
        highest = on.reduce("ReduceMax", stats["max"], None)
        values_shape = on.op("Shape", view)
        size = on.reduce("ReduceProd", values_shape, None)
        finite_values = on.op(
            "Sub",
            on.op("Cast", size, to=TensorProto.DOUBLE),
            on.reduce("ReduceSum", stats["nonfinite"], None),
        )
        zero = self.b.const(np.asarray(0.0, np.float64))

        def layer_total(body: Body, per_neuron: str) -> str:
            return body.op("Reshape", body.reduce("ReduceSum", per_neuron, None), one)

        # Every edge's decision in a handful of vector ops (the If per edge then costs one
        # Gather): whether it needs a pass, and its count when it does not.
        limits = self.b.const(np.asarray([below(e) for e in config.histogram_edges], dtype))
        under = on.op("Less", limits, lowest)
        needed = on.op("And", on.op("Not", under), on.op("Less", limits, highest))
        skipped = on.op("Where", under, finite_values, zero)
        edges: list[tuple[str, str | None, str]] = []
        for index, edge in enumerate(config.histogram_edges):
            bound = np.asarray(below(edge), dtype)
            if bound == fire_bound:
                edges.append((self.b.const(bound), None, layer_total(on, stats["fired"])))
                continue
            at = self.b.const(np.asarray([index], np.int64))
            edges.append(
                (self.b.const(bound), on.op("Gather", needed, at), on.op("Gather", skipped, at))
            )

        def counts(body: Body, values: str, name: str) -> onnx.GraphProto:
            parts = []
            for limit, needed, skipped in edges:
                if needed is None:
                    parts.append(skipped)
                    continue
                compare = Body(self.b)
                above = self.count(compare, compare.op("Greater", values, limit), work, axes)
                count_graph = compare.graph(
                    "edge", [(layer_total(compare, above), TensorProto.DOUBLE)]
                )
                skip = Body(self.b)
                skip_graph = skip.graph("edge_skipped", [(skipped, TensorProto.DOUBLE)])
                part = self.b.fresh("edge")
                body.nodes.append(
                    helper.make_node(
                        "If",
                        [needed],
                        [part],
                        name=part,
                        then_branch=count_graph,
                        else_branch=skip_graph,
                    )
                )
                parts.append(part)
            joined = body.op("Concat", *parts, axis=0) if len(parts) > 1 else parts[0]
            return body.graph(name, [(joined, TensorProto.DOUBLE)])

        plain_graph = counts(Body(self.b), view, "histogram")
        guarded = Body(self.b)
        kept = guarded.op(
            "Where", guarded.op("IsInf", view), self.b.const(np.asarray(-np.inf, dtype)), view
        )
        guarded_graph = counts(guarded, kept, "histogram_nonfinite")
        chosen = self.b.fresh("histogram_counts")
        on.nodes.append(
            helper.make_node(
                "If",
                [finite],
                [chosen],
                name=chosen,
                then_branch=plain_graph,
                else_branch=guarded_graph,
            )
        )
        on_graph = on.graph("histogram_on", [(chosen, TensorProto.DOUBLE)])
        off = Body(self.b)
        zeros = self.b.const(np.zeros(len(config.histogram_edges), np.float64))
        off_graph = off.graph("histogram_off", [(zeros, TensorProto.DOUBLE)])
        out = self.b.fresh("histogram")
        self.main.nodes.append(
            helper.make_node(
                "If",
                [HISTOGRAM_INPUT],
                [out],
                name=out,
                then_branch=on_graph,
                else_branch=off_graph,
            )
        )
        return out, len(config.histogram_edges)


def augment(
    model: onnx.ModelProto,
    taps: Sequence[Tap],
    mask_input: str | None = None,
    copy: bool = True,
) -> Augmented:
    """``model`` with extra outputs: the per-neuron partial sums of ``taps``.

    ``mask_input`` names the model's ``[batch, tokens]`` attention-mask input; taps with
    ``masked`` ``yes``/``check`` keep only its non-zero rows. Weights stay where they are
    (external data references are copied, not read). ``copy=False`` edits ``model`` in place,
    sparing a copy of its weights.

    Each tap's nodes are placed right after the node producing its tensor, so ONNX Runtime
    reduces an activation while it is fresh and frees it as early as the plain model would,
    instead of keeping every watched activation alive until the end of the graph.
    """
    if copy:
        augmented = onnx.ModelProto()
        augmented.CopyFrom(model)
    else:
        augmented = model
    builder = Builder(augmented)
    if builder.opset < MIN_OPSET:
        raise ConfigError(
            f"the model uses opset {builder.opset}; neuronwatch needs opset >= {MIN_OPSET}: "
            "convert it with onnx.version_converter.convert_version(model, 17)"
        )
    graph = augmented.graph
    main = Body(builder)
    mask_index = None
    if mask_input is not None and any(t.masked != "no" for t in taps):
        flat = main.op("Reshape", mask_input, builder.const(np.asarray([-1], np.int64)))
        mask_index = main.op(
            "Reshape", main.op("NonZero", flat), builder.const(np.asarray([-1], np.int64))
        )
    prologue = list(main.nodes)
    tapper = _Tapper(builder, main, mask_index, mask_input)
    outputs: list[TapOutputs] = []
    after: dict[str, list[onnx.NodeProto]] = {}
    for index, tap in enumerate(taps):
        main.nodes = []
        outputs.append(tapper.statistics(tap, index))
        after.setdefault(tap.tensor, []).extend(main.nodes)
    ordered: list[onnx.NodeProto] = list(prologue)
    placed: set[str] = set()
    for node in graph.node:
        ordered.append(node)
        for name in node.output:
            if name in after and name not in placed:
                ordered.extend(after[name])
                placed.add(name)
    for name, nodes in after.items():  # a tap on a graph input: nothing produces it
        if name not in placed:
            ordered[len(prologue) : len(prologue)] = nodes
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(builder.initializers)
    flag = numpy_helper.from_array(np.asarray(False), HISTOGRAM_INPUT)
    graph.initializer.append(flag)
    graph.input.append(helper.make_tensor_value_info(HISTOGRAM_INPUT, TensorProto.BOOL, []))
    work_types = {
        tap.layer: (tap.elem_type if tap.elem_type in FLOAT_TYPES else TensorProto.FLOAT)
        for tap in taps
    }
    for tap_outputs in outputs:
        work = work_types[tap_outputs.layer]
        for field_name, tensor in tap_outputs.names.items():
            elem = {
                "rows": TensorProto.INT64,
                "row_length": TensorProto.INT64,
                "above": TensorProto.DOUBLE,
            }.get(field_name, field_type(field_name, work))
            graph.output.append(helper.make_tensor_value_info(tensor, elem, None))
    # An IR version that carries inputs with default values (initializers as inputs).
    augmented.ir_version = max(augmented.ir_version, 4)
    return Augmented(augmented, outputs, HISTOGRAM_INPUT, mask_input if mask_index else None)
