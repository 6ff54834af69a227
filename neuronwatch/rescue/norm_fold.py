"""What a BatchNorm between a layer's neurons and their consumer passes on for a constant neuron.

reinit zeroes a neuron's outgoing weights so the outputs do not change at the edit. With a
norm in between (``Linear -> ReLU -> BatchNorm -> Linear``) the consumer does not read the
neuron's 0 but the norm's output for it, ``gamma * (0 - running_mean) / sqrt(running_var +
eps) + beta``, a constant per channel; zeroing the outgoing weights drops it. It is folded into
the consumer's bias instead, as prune folds a constant output.

Only a norm with running statistics (BatchNorm in eval mode) passes a per-channel constant; a
LayerNorm or GroupNorm output depends on the other neurons, and nothing is folded through it.
``eps`` is not saved in a state_dict: torch's default ``1e-5`` is used, and only where any
``eps`` from ``1e-6`` to ``1e-3`` gives the same outputs within :data:`TOLERANCE`.

A norm without weight and bias (``BatchNorm1d(affine=False)``) has no parameters, so the wiring
cannot list it; only its running statistics in the checkpoint show it exists, not where it
sits. :func:`unplaced_statistics` finds such statistics; reinit and prune skip a layer of their
width (they might sit between its neurons and the consumer), since acting would change the
outputs or leave statistics of the old width that no longer load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from ..wiring import ParamRef, Wiring
from .checkpoint import TensorInfo
from .dtypes import EDITABLE
from .options import role

__all__ = ["EPS", "TOLERANCE", "norm_outputs", "unplaced_statistics"]

EPS = 1e-5  # torch's BatchNorm default
EPS_RANGE = (1e-6, 1e-3)  # the defaults in use (torch 1e-5, Keras/TF 1e-3) and around
TOLERANCE = 1e-6  # largest output change the unknown eps may cause

Read = Callable[[str], NDArray[np.float64]]


def _statistics(
    norms: Sequence[ParamRef], tensors: Mapping[str, TensorInfo]
) -> tuple[str, str] | str:
    """The running mean and variance of the one norm in ``norms``, or why there are none."""
    prefixes = {ref.name.rsplit(".", 1)[0] for ref in norms if "." in ref.name}
    if len(prefixes) != 1 or any("." not in ref.name for ref in norms):
        return "several norms (or unnamed ones) sit between the neurons and their consumer"
    prefix = prefixes.pop()
    width = norms[0].shape[0]
    names = (f"{prefix}.running_mean", f"{prefix}.running_var")
    for name in names:
        info = tensors.get(name)
        if info is None or info.shape != (width,) or info.dtype not in EDITABLE or info.tied:
            return (
                f"the norm {prefix!r} between the neurons and their consumer has no running "
                "statistics (a LayerNorm or GroupNorm): its output for these neurons depends "
                "on the others"
            )
    return names


def norm_outputs(
    norms: Sequence[ParamRef],
    tensors: Mapping[str, TensorInfo],
    read: Read,
    neurons: NDArray[np.intp],
    values: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.float64]] | str:
    """The norm's output for ``neurons`` whose input is constant at ``values`` (with the
    assumed :data:`EPS`), and how far any eps in :data:`EPS_RANGE` moves it; or why it cannot
    be known."""
    found = _statistics(norms, tensors)
    if isinstance(found, str):
        return found
    mean = read(found[0])[neurons]
    variance = read(found[1])[neurons]
    scale = np.ones(neurons.size)
    shift = np.zeros(neurons.size)
    for ref in norms:
        if role(ref) == "bias":
            shift = read(ref.name)[neurons]
        else:
            scale = read(ref.name)[neurons]

    centred = values - mean

    def at(eps: float) -> NDArray[np.float64]:
        with np.errstate(divide="ignore", invalid="ignore"):
            out: NDArray[np.float64] = scale * centred / np.sqrt(variance + eps) + shift
        # A channel whose running mean is its constant input passes beta whatever eps is
        # (a channel dead since initialisation: mean 0, variance decayed towards 0).
        return np.where(centred == 0.0, shift, out)

    assumed = at(EPS)
    low, high = (np.abs(at(eps) - assumed) for eps in EPS_RANGE)
    spread = np.maximum(low, high)
    spread[~np.isfinite(spread)] = np.inf
    return assumed, spread


_STATISTICS = ("running_mean", "running_var")


def unplaced_statistics(
    wirings: Iterable[Wiring], tensors: Mapping[str, TensorInfo]
) -> dict[int, list[str]]:
    """Width -> the modules (name prefixes) holding running statistics of that width that no
    wiring places: no wired parameter shares their prefix (a BatchNorm with weight and bias is
    wired through those; one without them is not)."""
    placed = {ref.name.rsplit(".", 1)[0] for w in wirings for ref in (*w.produces, *w.consumes)}
    found: dict[int, list[str]] = {}
    for name, info in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if leaf not in _STATISTICS or len(info.shape) != 1 or prefix in placed:
            continue
        modules = found.setdefault(info.shape[0], [])
        if prefix not in modules:
            modules.append(prefix)
    return found
