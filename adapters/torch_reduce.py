"""On-device accumulation of one layer's partial sums (the hot path of the torch adapter).

Every statistic comes out of one pass over the activation: with ``torch.compile`` (inductor) the
reductions fuse into one kernel, ~0.17 ms for a [1024, 1024] fp32 activation on 2 CPU cores
against ~2.6 ms as separate eager reductions (``bench/overhead.py``). Nothing here
reads a tensor value on the host: buffers stay on the activation's device until
:meth:`LayerAccumulator.drain`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from neuronwatch.config import LayerConfig
from neuronwatch.families import float32_above, float32_below
from neuronwatch.partials import FIELDS, Partials

__all__ = [
    "BUFFER_FIELDS",
    "LayerAccumulator",
    "fit_mask",
    "histogram_eager",
    "reduce_eager",
    "reduce_masked_eager",
]

log = logging.getLogger(__name__)

Buffers = tuple[torch.Tensor, ...]
# The per-neuron Partials fields a runtime reduces, in declaration order; the reduction
# functions below return their buffers in this order. The histogram is kept apart as "above"
# counts, and host-side fields (last_fired_step) are the engine's business.
BUFFER_FIELDS: tuple[str, ...] = tuple(
    name for name, spec in FIELDS.items() if spec.per == "neuron" and not spec.on_host
)
assert BUFFER_FIELDS == (
    "fired", "saturated", "nonfinite", "abs_sum", "sum", "sq_sum", "max", "min"
)  # fmt: skip

# A call's counts are summed in a narrow type when they cannot overflow it and then added to the
# int64 buffers: the same results, but narrow lanes are faster on CPU. Per-neuron counts are
# summed as float32 (exact below 2**24), which vectorises best beside the float sums of the
# same pass (~15 % faster than int32); the histogram's, as int32 (~3x faster than int64).
_FLOAT_EXACT = 2**24
_NARROW_LIMIT = 2**31


def count_dtype(n: int) -> torch.dtype:
    """A type that exactly sums ``n`` booleans of one neuron, and is fast to vectorise."""
    if n < _FLOAT_EXACT:
        return torch.float32
    return torch.int32 if n < _NARROW_LIMIT else torch.int64


def histogram_count_dtype(n: int) -> torch.dtype:
    """The narrowest integer type that exactly sums ``n`` booleans."""
    return torch.int32 if n < _NARROW_LIMIT else torch.int64


def _working(x: torch.Tensor) -> torch.Tensor:
    """Statistics are computed in float32, or in float64 for float64 activations."""
    return x if x.dtype == torch.float64 else x.float()


def reduce_eager(
    x: torch.Tensor,
    buffers: Buffers,
    threshold: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    dims: tuple[int, ...],
    count: torch.dtype = torch.int64,
    saturates: bool = True,
) -> Buffers:
    """New buffers = old buffers + the statistics of ``x`` reduced over ``dims``.

    Functional (returns new tensors) so that the compiled version needs no input mutation.
    Thresholds arrive as 0-d tensors so changing them never triggers a recompile. ``count`` is
    the type of this call's counts (see :func:`count_dtype`); the buffers stay int64. The
    buffers are the per-neuron :data:`~neuronwatch.partials.FIELDS`, in :data:`BUFFER_FIELDS`
    order.
    """
    fired, saturated, nonfinite, abs_sum, total, squares, high_water, low_water = buffers
    x = _working(x)
    finite = torch.isfinite(x)
    zeroed = torch.where(finite, x, 0.0)
    fired = fired + ((zeroed > threshold) & finite).sum(dims, dtype=count).to(fired.dtype)
    if saturates:  # a Python constant: non-saturating families leave these comparisons out
        flat = ((zeroed < low) | (zeroed > high)) & finite
        saturated = saturated + flat.sum(dims, dtype=count).to(saturated.dtype)
    nonfinite = nonfinite + (~finite).sum(dims, dtype=count).to(nonfinite.dtype)
    abs_sum = abs_sum + zeroed.abs().sum(dims).to(abs_sum.dtype)
    total = total + zeroed.sum(dims).to(total.dtype)
    squares = squares + (zeroed * zeroed).sum(dims).to(squares.dtype)
    high_water = torch.maximum(high_water, torch.where(finite, x, float("-inf")).amax(dims))
    low_water = torch.minimum(low_water, torch.where(finite, x, float("inf")).amin(dims))
    return fired, saturated, nonfinite, abs_sum, total, squares, high_water, low_water


def reduce_masked_eager(
    x: torch.Tensor,
    mask: torch.Tensor,
    buffers: Buffers,
    rows: torch.Tensor,
    threshold: torch.Tensor,
    low: torch.Tensor,
    high: torch.Tensor,
    dims: tuple[int, ...],
    count: torch.dtype = torch.int64,
    saturates: bool = True,
) -> tuple[Buffers, torch.Tensor]:
    """:func:`reduce_eager` over the rows where ``mask`` (bool, broadcastable to ``x`` with a
    1 on the feature axis) is true; pad rows touch no statistic. Also returns ``rows`` plus
    the number of rows kept, counted on the device (no host sync)."""
    fired, saturated, nonfinite, abs_sum, total, squares, high_water, low_water = buffers
    x = _working(x)
    finite = torch.isfinite(x)
    valid = finite & mask
    zeroed = torch.where(valid, x, 0.0)
    fired = fired + ((zeroed > threshold) & valid).sum(dims, dtype=count).to(fired.dtype)
    if saturates:
        flat = ((zeroed < low) | (zeroed > high)) & valid
        saturated = saturated + flat.sum(dims, dtype=count).to(saturated.dtype)
    nonfinite = nonfinite + ((~finite) & mask).sum(dims, dtype=count).to(nonfinite.dtype)
    abs_sum = abs_sum + zeroed.abs().sum(dims).to(abs_sum.dtype)
    total = total + zeroed.sum(dims).to(total.dtype)
    squares = squares + (zeroed * zeroed).sum(dims).to(squares.dtype)
    high_water = torch.maximum(high_water, torch.where(valid, x, float("-inf")).amax(dims))
    low_water = torch.minimum(low_water, torch.where(valid, x, float("inf")).amin(dims))
    rows = rows + mask.sum(dtype=torch.int64)
    return (fired, saturated, nonfinite, abs_sum, total, squares, high_water, low_water), rows


def histogram_compiled_form(
    x: torch.Tensor,
    above: torch.Tensor,
    edges: torch.Tensor,
    count: torch.dtype = torch.int64,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``above[j]`` += number of finite values ``> edges[j]`` (``edges[0]`` is ``-inf``).

    Written as comparisons so inductor fuses it into one reduction; bin counts are differences
    of neighbouring entries (see :func:`bins_from_above`). One comparison per edge, unrolled
    (the compiled graph is specialised to the number of edges): inductor then reads ``x`` once
    with an accumulator per edge, where the ``[n, edges]`` broadcast form reads it once per edge.
    """
    x = _working(x)
    keep = torch.isfinite(x) if mask is None else torch.isfinite(x) & mask
    x = torch.where(keep, x, float("-inf"))
    counts = [(x > edges[j]).sum(dtype=count) for j in range(edges.shape[0])]
    return above + torch.stack(counts)


def histogram_eager(
    x: torch.Tensor,
    above: torch.Tensor,
    edges: torch.Tensor,
    count: torch.dtype = torch.int64,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same result as :func:`histogram_compiled_form` without the ``[n, edges]`` temporary
    (``count`` only mirrors its signature: ``bincount`` always counts in int64)."""
    x = _working(x)
    # Non-finite values (and pad rows) go to -inf, i.e. bucket 0, which no "above" entry counts
    # (cheaper than dropping them with a boolean mask).
    keep = torch.isfinite(x) if mask is None else torch.isfinite(x) & mask
    x = torch.where(keep, x, float("-inf")).reshape(-1)
    # bucketize(right=False): index i with edges[i-1] < x <= edges[i]; edges[0] = -inf.
    counts = torch.bincount(torch.bucketize(x, edges), minlength=edges.numel() + 1)
    # counts[i] for i >= 1 is the bin (edges[i-1], edges[i]]; "above edge j" is a suffix sum.
    suffix = counts.flip(0).cumsum(0).flip(0)
    return above + suffix[1:]


def bins_from_above(above: NDArray[np.int64]) -> NDArray[np.int64]:
    """Histogram bins from "count above each edge" (first entry: all finite values)."""
    return np.asarray(above - np.append(above[1:], 0), dtype=np.int64)


_compiled: dict[str, Callable[..., Any]] = {}


def compiled(name: str) -> Callable[..., Any]:
    """The process-wide compiled form of ``reduce``, ``reduce_masked`` or ``histogram``.

    One compiled object per function for the whole process: dynamic shapes serve every layer
    width, batch and sequence size from the same graph, and every monitor shares it.
    """
    if name not in _compiled:
        forms: dict[str, Callable[..., Any]] = {
            "reduce": reduce_eager,
            "reduce_masked": reduce_masked_eager,
            "histogram": histogram_compiled_form,
        }
        _compiled[name] = torch.compile(forms[name], dynamic=True)
    return _compiled[name]


_EAGER: dict[str, Callable[..., Any]] = {
    "reduce": reduce_eager,
    "reduce_masked": reduce_masked_eager,
    "histogram": histogram_eager,
}


def fit_mask(mask: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor | None:
    """``mask`` (bool ``[B, T]``, true on real tokens) shaped to broadcast over ``x`` with the
    neurons on ``axis``, or ``None`` when the rows of ``x`` are not the mask's positions."""
    rows_shape = x.shape[:axis] + x.shape[axis + 1 :]
    if tuple(rows_shape) == tuple(mask.shape):
        return mask.unsqueeze(axis)
    if x.dim() == 2 and x.shape[1 - axis] == mask.numel():  # tokens flattened to [B*T, F]
        return mask.reshape(-1, 1) if axis == 1 else mask.reshape(1, -1)
    return None


@dataclass
class Staged:
    """One activation ready to reduce: its ``[before, neurons, after]`` view (or a private
    copy of it), its fitted row mask, its row count and whether it carries the histogram."""

    accumulator: LayerAccumulator
    x: torch.Tensor
    mask: torch.Tensor | None
    rows: int
    histogram: bool


# New buffers, new masked-row count (or None), new histogram counts (or None).
Reduced = tuple[Buffers, "torch.Tensor | None", "torch.Tensor | None"]


def _reduce_one(staged: Staged, compile: bool) -> Reduced:
    args = staged.accumulator.arguments(staged)
    x, mask, buffers, rows, threshold, low, high, edges, above, count, hcount = args
    fn = compiled if compile else _EAGER.__getitem__
    saturates = staged.accumulator.config.saturates
    if mask is None:
        new = fn("reduce")(x, buffers, threshold, low, high, (0, 2), count, saturates)
    else:
        new, rows = fn("reduce_masked")(
            x, mask, buffers, rows, threshold, low, high, (0, 2), count, saturates
        )
    if above is not None:
        above = fn("histogram")(x, above, edges, hcount, mask)
    return new, rows, above


class LayerAccumulator:
    """Device buffers of one layer, allocated at the first activation it sees.

    The buffers hold the per-neuron fields of :data:`~neuronwatch.partials.FIELDS` that a
    runtime reduces (:data:`BUFFER_FIELDS`), each starting at its declared identity, plus the
    histogram kept as "count above each edge". Rows are counted on the host from shapes, except
    for masked calls, whose kept rows are counted on the device.

    **Staging ring.** With ``ring_bytes``, small ``[rows, neurons]`` activations (serving batch
    sizes) are not reduced one call at a time: each is copied into a preallocated device buffer
    of that many bytes (one copy, a few microseconds), and the buffer is reduced in one call when
    it is full and at every drain. Every row is still reduced exactly once; a call's fixed cost
    (guards, launch) is paid once per ring instead of once per forward, and the histogram of a
    ring covers all its rows.
    """

    def __init__(
        self,
        config: LayerConfig,
        feature_axis: int,
        compile: bool,
        ring_bytes: int = 0,
        histogram_every: int = 1,
    ) -> None:
        self.config = config
        self.feature_axis = feature_axis
        self.compile = compile
        self.ring_bytes = ring_bytes
        self.histogram_every = histogram_every
        self._ring_flushes = 0
        self.rows = 0
        self._masked_rows: torch.Tensor | None = None
        self._buffers: Buffers | None = None
        self._above: torch.Tensor | None = None
        self._consts: dict[tuple[torch.dtype, torch.device], tuple[torch.Tensor, ...]] = {}
        self.device_type = "cpu"  # of the activations seen, for autocast checks
        self._ring: torch.Tensor | None = None
        self._ring_mask: torch.Tensor | None = None
        self._ring_rows = 0

    @property
    def neurons(self) -> int | None:
        return None if self._buffers is None else int(self._buffers[0].shape[0])

    def _allocate(self, device: torch.device, neurons: int) -> None:
        self.device_type = device.type
        # float64 sums and extrema where the device has them (MPS does not).
        wide = torch.float32 if device.type == "mps" else torch.float64
        dtypes = {np.int64: torch.int64, np.float64: wide}
        self._buffers = tuple(
            torch.full(
                (neurons,), FIELDS[name].identity, dtype=dtypes[FIELDS[name].dtype], device=device
            )
            for name in BUFFER_FIELDS
        )
        self._above = torch.zeros(
            len(self.config.histogram_edges) + 1, dtype=torch.int64, device=device
        )
        self._masked_rows = None

    def _constants(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Thresholds and edges as 0-d/1-d tensors in the working precision.

        For float32 work each is rounded in the direction that keeps every comparison identical
        to the float64 comparison of the numpy engine (0.1 is not a float32 number).
        """
        key = (dtype, device)
        if key not in self._consts:
            config = self.config
            exact = dtype == torch.float64
            below = (lambda v: v) if exact else float32_below
            above = (lambda v: v) if exact else float32_above
            edges = (float("-inf"), *(below(e) for e in config.histogram_edges))
            self._consts[key] = (
                torch.tensor(below(config.fire_threshold), dtype=dtype, device=device),
                torch.tensor(above(config.saturation_low), dtype=dtype, device=device),
                torch.tensor(below(config.saturation_high), dtype=dtype, device=device),
                torch.tensor(edges, dtype=dtype, device=device),
            )
        return self._consts[key]

    def axis_of(self, x: torch.Tensor) -> int:
        """The neuron axis of ``x`` as a non-negative index (raises if out of range)."""
        if not -x.dim() <= self.feature_axis < x.dim():
            raise ValueError(
                f"layer {self.config.name!r}: feature axis {self.feature_axis} does not exist in "
                f"an activation of shape {tuple(x.shape)}; pass feature_axis"
            )
        return self.feature_axis % x.dim()

    def add(self, x: torch.Tensor, with_histogram: bool, mask: torch.Tensor | None = None) -> bool:
        """Accumulate one activation tensor (hot path: no host sync, no value-dependent
        branch). ``mask`` is the forward's ``[batch, tokens]`` row mask (true on real tokens),
        applied when the rows of ``x`` are those positions (see :func:`fit_mask`); returns
        whether it was."""
        if x.dim() == 1:  # one unbatched row; torch's sum over dims=() would reduce everything
            x = x.unsqueeze(0)
        axis = self.axis_of(x)
        if mask is not None:
            mask = fit_mask(mask, x, axis)
        neurons = x.shape[axis]
        if self._buffers is None:
            self._allocate(x.device, neurons)
        elif self._buffers[0].shape[0] != neurons:
            raise ValueError(
                f"layer {self.config.name!r} had {self.neurons} neurons on axis "
                f"{self.feature_axis}, now {neurons} (shape {tuple(x.shape)}); pass feature_axis"
            )
        rows = x.numel() // neurons if neurons else 0
        if not rows:
            return mask is not None
        last = axis == x.dim() - 1
        if last and self.ring_bytes and rows * neurons * x.element_size() <= self.ring_bytes:
            self._stage_in_ring(x.reshape(rows, neurons), mask, rows)
            return mask is not None
        # Every activation is viewed as [before, neurons, after] (a view: no copy for the
        # contiguous tensors layers return), so one compiled graph per dtype serves every rank
        # and axis; inductor tells apart after == 1 (rows) and after > 1 (conv maps).
        after = 1 if last else math.prod(x.shape[axis + 1 :])
        view = x.detach().reshape(rows // after, neurons, after)
        if mask is not None:
            mask = mask.reshape(view.shape[0], 1, after)
        self.reduce(Staged(self, view, mask, rows, with_histogram))
        return mask is not None

    def _stage_in_ring(self, x: torch.Tensor, mask: torch.Tensor | None, rows: int) -> None:
        ring = self._ring
        if ring is None or ring.dtype != x.dtype or ring.device != x.device:
            self.flush_ring()
            capacity = self.ring_bytes // (x.shape[1] * x.element_size())
            # A normal tensor even under inference_mode, so it can be written in any mode.
            with torch.inference_mode(False):
                ring = torch.empty((capacity, x.shape[1]), dtype=x.dtype, device=x.device)
            self._ring = ring
            self._ring_mask = None
        if self._ring_rows + rows > ring.shape[0]:
            self.flush_ring()
        start, end = self._ring_rows, self._ring_rows + rows
        ring[start:end].copy_(x)
        if mask is not None or self._ring_mask is not None:
            if self._ring_mask is None:  # the rows staged so far had no mask: all real
                with torch.inference_mode(False):
                    self._ring_mask = torch.ones(ring.shape[0], dtype=torch.bool, device=x.device)
            keep = self._ring_mask[start:end]
            if mask is None:
                keep.fill_(True)
            else:
                keep.copy_(mask.reshape(-1))
        self._ring_rows = end

    def flush_ring(self) -> None:
        """Reduce the rows waiting in the staging ring into the buffers."""
        rows, ring = self._ring_rows, self._ring
        if not rows or ring is None:
            return
        self._ring_rows = 0
        mask = None if self._ring_mask is None else self._ring_mask[:rows].reshape(rows, 1, 1)
        # The histogram (~3x the other statistics) samples one ring in histogram_every, as the
        # direct path samples one forward in histogram_every.
        histogram = self._ring_flushes % self.histogram_every == 0
        self._ring_flushes += 1
        self.reduce(Staged(self, ring[:rows].unsqueeze(-1), mask, rows, histogram))
        self._ring_mask = None

    def reduce(self, staged: Staged) -> None:
        """Reduce one staged activation into the buffers with this layer's own calls."""
        try:
            self.commit(staged, _reduce_one(staged, self.compile))
        except Exception as exc:
            if not self.compile:
                raise
            # A compiler failure (no C compiler, unsupported platform or op) is not the user's
            # problem: log once, switch this layer to the eager reductions and redo the call
            # from the untouched buffers.
            log.warning(
                "layer %r: torch.compile failed, using eager reductions: %r", self.config.name, exc
            )
            self.compile = False
            self.commit(staged, _reduce_one(staged, False))

    def arguments(self, staged: Staged) -> tuple[Any, ...]:
        """What the reduction functions take for ``staged``, with the buffers as they are now
        (read under the caller's lock, so a drain in between is never double counted)."""
        buffers, above = self._buffers, self._above
        if buffers is None or above is None:
            raise RuntimeError(f"layer {self.config.name!r}: buffers not allocated")
        x = staged.x
        working = torch.float64 if x.dtype == torch.float64 else torch.float32
        threshold, low, high, edges = self._constants(working, x.device)
        rows = self._masked_rows
        if staged.mask is not None and rows is None:
            rows = torch.zeros((), dtype=torch.int64, device=x.device)
        return (
            x,
            staged.mask,
            buffers,
            rows,
            threshold,
            low,
            high,
            edges,
            above if staged.histogram else None,
            count_dtype(staged.rows),
            histogram_count_dtype(x.numel()),
        )

    def commit(self, staged: Staged, result: Reduced) -> None:
        buffers, masked_rows, above = result
        self._buffers = buffers
        if above is not None:
            self._above = above
        if staged.mask is None:
            self.rows += staged.rows
        else:
            self._masked_rows = masked_rows

    def drain(self) -> Partials | None:
        """Copy the buffers to the host as :class:`Partials` and reset them (a sync point)."""
        self.flush_ring()
        if self._buffers is None or self._above is None:
            return None
        rows = self.rows + (0 if self._masked_rows is None else int(self._masked_rows))
        if rows == 0 and self._masked_rows is None:
            return None
        host: dict[str, Any] = {
            name: buffer.cpu().numpy()
            for name, buffer in zip(BUFFER_FIELDS, self._buffers, strict=True)
        }
        host["histogram"] = bins_from_above(self._above.cpu().numpy())
        partials = Partials.from_arrays(rows=rows, **host)
        neurons = partials.neurons
        device = self._buffers[0].device
        self.rows = 0
        self._allocate(device, neurons)
        return partials
