"""A layer's fire threshold carried back through its activation, for lift.

A neuron fires when its activation's *output* exceeds the layer's ``fire_threshold``; lift moves
the *pre-activation*, so it needs the pre-activation value above which the output exceeds the
threshold. For the ReLU family that is the threshold itself, but a sigmoid fires above 1e-3 from
a pre-activation of about -6.9 (``logit(1e-3)``), and Softplus from about -6.9 as well: using
the output threshold there makes every row fire. Activations are named as the report names them
(torch class names, ONNX operator names, their aliases), matched through
:func:`neuronwatch.families.canonical`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..families import SELU_SCALE, canonical

__all__ = ["pre_threshold"]

# Outputs equal their input above the threshold (for thresholds in the linear part).
_IDENTITY = frozenset({"ReLU", "ReLU6", "Hardtanh", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU"})


def _gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def _gelu_tanh(x: float) -> float:
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)
    return 0.5 * x * (1.0 + math.tanh(inner))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


# Increasing for positive inputs, <= 0 for non-positive ones: the threshold is found by
# bisection on (0, inf) for any threshold >= 0.
_POSITIVE_BRANCH: dict[str, Callable[[float], float]] = {
    "GELU": _gelu,
    "GELUActivation": _gelu,
    "AccurateGELUActivation": _gelu_tanh,
    "NewGELUActivation": _gelu_tanh,
    "FastGELUActivation": _gelu_tanh,
    "GELUTanh": _gelu_tanh,
    "PytorchGELUTanh": _gelu_tanh,
    "QuickGELUActivation": lambda x: x * _sigmoid(1.702 * x),
    "SiLU": lambda x: x * _sigmoid(x),
    "SiLUActivation": lambda x: x * _sigmoid(x),
    "Mish": lambda x: x * math.tanh(_softplus(x)),
    "MishActivation": lambda x: x * math.tanh(_softplus(x)),
    "Hardswish": lambda x: x * min(max(x + 3.0, 0.0), 6.0) / 6.0,
    "ReLUSquaredActivation": lambda x: max(x, 0.0) ** 2,
}


def _bisect(f: Callable[[float], float], threshold: float) -> float:
    """The x > 0 where the increasing ``f`` crosses ``threshold`` (>= 0)."""
    low, high = 0.0, 1.0
    while f(high) <= threshold:
        low, high = high, high * 2.0
    for _ in range(80):
        middle = 0.5 * (low + high)
        if f(middle) > threshold:
            high = middle
        else:
            low = middle
    return high


def _closed_form(name: str, t: float) -> float | None:
    """The pre-activation threshold of the bounded and one-sided activations, or None."""
    if name == "Sigmoid" and 0.0 < t < 1.0:
        return math.log(t / (1.0 - t))
    if name == "Tanh" and -1.0 < t < 1.0:
        return math.atanh(t)
    if name == "Hardsigmoid" and 0.0 <= t < 1.0:
        return 6.0 * t - 3.0  # relu6(x + 3) / 6
    if name == "Softplus" and t > 0.0:
        return math.log(math.expm1(t))
    if name == "SELU" and t >= 0.0:
        return t / SELU_SCALE
    return None


def pre_threshold(activation: str | None, threshold: float) -> float | None:
    """The pre-activation value above which ``activation``'s output exceeds ``threshold``;
    ``None`` when it is not known (an activation this module cannot invert, or a threshold
    outside the activation's range). No activation: the layer's values are its own."""
    if activation is None:
        return threshold
    name = canonical(activation)
    if name in _IDENTITY:
        # A threshold on the linear part (ReLU6 below 6, Hardtanh inside its bounds) or, for
        # the leaky ones, at or above 0 where they are the identity.
        return threshold if threshold >= 0.0 or name == "Hardtanh" else None
    found = _closed_form(name, threshold)
    if found is not None:
        return found
    branch = _POSITIVE_BRANCH.get(name)
    if branch is not None and threshold >= 0.0:
        return _bisect(branch, threshold)
    return None
