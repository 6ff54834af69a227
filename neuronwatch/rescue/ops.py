"""The arithmetic of every rescue op, on numpy arrays, with no framework and no files.

Neurons are indices along one axis of a parameter (rows of a Linear weight, entries of a bias,
input columns of the consumer, input channels of a conv), as the report's wiring states them.
Functions that edit take a float64 array and change it in place.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "Floats",
    "add",
    "fill",
    "fold_delta",
    "init_bound",
    "lift_shifts",
    "normal_quantile",
    "redraw",
    "spread",
    "strip",
    "zero_positions",
]


# Values being edited, in the tensor's own float type (see .dtypes.decode).
Floats = NDArray[np.floating[Any]]


def _slices(values: NDArray[Any], axis: int) -> NDArray[Any]:
    """A view with the neuron axis first: ``view[n]`` is neuron ``n``'s slice."""
    return np.moveaxis(values, axis, 0)


def fill(values: NDArray[Any], axis: int, index: NDArray[np.intp], value: float) -> NDArray[Any]:
    _slices(values, axis)[index] = value
    return values


def add(
    values: Floats,
    axis: int,
    index: NDArray[np.intp],
    amounts: NDArray[np.float64],
) -> None:
    view = _slices(values, axis)
    view[index] = view[index] + amounts.reshape((-1,) + (1,) * (view.ndim - 1))


def zero_positions(
    values: NDArray[Any], axis: int, positions: dict[int, NDArray[np.intp]]
) -> NDArray[Any]:
    """Zero, per neuron, the given flat positions inside its slice."""
    view = _slices(values, axis)
    for neuron, where in positions.items():
        flat = view[neuron].reshape(-1).copy()
        flat[where] = 0.0
        view[neuron] = flat.reshape(view[neuron].shape)
    return values


def strip(
    values: Floats, axis: int, index: NDArray[np.intp], fraction: float
) -> dict[int, NDArray[np.intp]]:
    """Synaptic Stripping: zero the ``fraction`` most negative of each neuron's remaining
    non-zero incoming weights; returns the zeroed flat positions per neuron.

    ``ceil(fraction * non-zero count)`` weights are chosen, but only negative ones: zeroing a
    positive weight cannot help a ReLU fire on non-negative inputs. A second call strips the
    same fraction of what remains. All neurons of a tensor are done at once.
    """
    if index.size == 0:
        return {}
    view = _slices(values, axis)
    block = view[index].reshape(index.size, -1)  # a copy: one row per neuron
    negative = block < 0
    wanted = np.ceil(fraction * np.count_nonzero(block, axis=1)).astype(np.intp)
    take = np.minimum(wanted, negative.sum(axis=1))
    zero = np.zeros(block.shape, dtype=bool)
    most = int(take.max())
    if most > 0:
        # The take-th most negative value of each row, by partial sort (a full sort of every
        # row is the bulk of the cost on large layers) ...
        keyed = np.where(negative, block, block.dtype.type(np.inf))  # stays in block's type
        smallest = np.sort(np.partition(keyed, most - 1, axis=1)[:, :most], axis=1)
        cut = smallest[np.arange(index.size), np.maximum(take - 1, 0)][:, None]
        zero = (keyed < cut) & (take[:, None] > 0)
        need = take - zero.sum(axis=1)
        if need.any():
            # ... then values equal to it, leftmost first, until each row has its count.
            ties = (keyed == cut) & (need[:, None] > 0)
            zero |= ties & (np.cumsum(ties, axis=1) <= need[:, None])
    rows, positions = np.nonzero(zero)
    block[rows, positions] = 0.0
    view[index] = block.reshape((index.size, *view.shape[1:]))
    split = np.split(positions.astype(np.intp), np.cumsum(take)[:-1])
    return {int(n): split[i] for i, n in enumerate(index.tolist())}


def init_bound(shape: tuple[int, ...], axis: int, init: Literal["torch", "kaiming"]) -> float:
    """Half-width of the uniform init of one neuron's incoming weights (its slice).

    ``torch``: Kaiming-uniform with ``a=sqrt(5)``, the default of ``nn.Linear``/``nn.Conv*``,
    ``1/sqrt(fan_in)``; ``kaiming``: Kaiming-uniform for ReLU (He), ``sqrt(6/fan_in)``.
    """
    fan_in = max(1, math.prod(shape) // max(1, shape[axis]))
    gain_sq = 1.0 / 3.0 if init == "torch" else 2.0
    return math.sqrt(gain_sq * 3.0 / fan_in)


def redraw(
    values: Floats,
    axis: int,
    index: NDArray[np.intp],
    bound: float,
    rng: np.random.Generator,
    match_norm: bool = False,
) -> float | None:
    """Draw new incoming weights for ``index`` from U(-bound, bound).

    ``match_norm`` rescales each redrawn slice to the mean L2 norm of the other neurons' slices
    (ReDo's option to keep revived neurons on the scale of the live ones); returns that norm.
    A live slice with a NaN or an infinity has no norm to match: ValueError.
    """
    view = _slices(values, axis)
    shape = view.shape[1:]
    norm: float | None = None
    if match_norm:
        live = np.ones(view.shape[0], dtype=bool)
        live[index] = False
        if live.any():
            norms = np.sqrt((view[live].reshape(int(live.sum()), -1) ** 2).sum(axis=1))
            broken = np.flatnonzero(live)[~np.isfinite(norms)]
            if broken.size:
                raise ValueError(f"live neurons {broken[:5].tolist()} hold non-finite weights")
            norm = float(norms.mean())
    for neuron in index.tolist():
        drawn = rng.uniform(-bound, bound, size=shape)
        if norm is not None:
            length = float(np.sqrt((drawn**2).sum()))
            if length > 0:
                drawn *= norm / length
        view[neuron] = drawn
    return norm


def fold_delta(
    consumer_weight: NDArray[np.float64],
    axis: int,
    index: NDArray[np.intp],
    constants: NDArray[np.float64],
) -> NDArray[np.float64]:
    """What removing inputs ``index`` (each constant at ``constants``) takes away from every
    output of a Linear consumer: ``sum_n c_n * W[:, n]``, to be added to its bias.

    ``consumer_weight`` is 2-D with the neurons on ``axis``; the result has the other axis's
    size.
    """
    if consumer_weight.ndim != 2:
        raise ValueError("folding needs a 2-D consumer weight")
    taken = np.take(consumer_weight, index, axis=axis)  # [out, k] or [k, out]
    delta: NDArray[np.float64] = np.tensordot(taken, constants, axes=([axis], [0]))
    return delta


def normal_quantile(p: float) -> float:
    """The standard normal quantile ``Phi^-1(p)`` for ``0 < p < 1``."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    return NormalDist().inv_cdf(p)


# Relative precision of the float32 sums an audit takes per batch. Below this many times it
# (times mean squared) the variance ``sq_sum/n - mean^2`` is rounding noise, not spread.
_VARIANCE_RESOLUTION = 16 * float(np.finfo(np.float32).eps)


def spread(
    rows: NDArray[np.int64],
    total: NDArray[np.float64],
    sq_total: NDArray[np.float64],
    maximum: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """Per neuron: the mean, the standard deviation, and whether the deviation had to be read
    off the maximum.

    ``sq_sum/n - mean^2`` cancels when the values sit far from zero with a small spread (mean
    -60, deviation 0.01: the variance is below float32's resolution of ``mean^2``). There the
    deviation is estimated from how far the recorded maximum lies above the mean: for ``n``
    normal values that is about ``Phi^-1(1 - 1/(n + 1))`` deviations.
    """
    n = np.maximum(rows, 1).astype(np.float64)
    mean = total / n
    variance = np.maximum(sq_total / n - mean**2, 0.0)
    unresolved = variance < _VARIANCE_RESOLUTION * mean**2
    std = np.sqrt(variance)
    if unresolved.any():
        peak = np.array([normal_quantile(1.0 - 1.0 / (k + 1.0)) for k in n[unresolved]])
        std[unresolved] = np.maximum(maximum[unresolved] - mean[unresolved], 0.0) / peak
    return mean, std, unresolved


def lift_shifts(
    rows: NDArray[np.int64],
    total: NDArray[np.float64],
    sq_total: NDArray[np.float64],
    maximum: NDArray[np.float64],
    threshold: float,
    top: float,
) -> NDArray[np.float64]:
    """Per neuron, how much to add to its bias so its pre-activation exceeds ``threshold`` on
    about the top ``top`` share of the audit rows.

    The pre-activation's mean and standard deviation (from ``sum`` and ``sq_sum``, see
    :func:`spread`) give a normal estimate of its ``1 - top`` quantile; the recorded ``max``
    caps it, so the shift always makes the neuron fire at least on the row where its
    pre-activation peaked, whatever the distribution's shape. A margin keeps float rounding
    from landing exactly on the threshold.
    """
    mean, std, _ = spread(rows, total, sq_total, maximum)
    estimate = np.minimum(mean + std * normal_quantile(1.0 - top), maximum)
    margin = 1e-3 * std + 1e-5 * (1.0 + np.abs(estimate))
    shift: NDArray[np.float64] = threshold - estimate + margin
    return shift
