"""Activation families and the defaults that follow from them (see ``docs/vocabulary.md``).

A *family* decides what "fires" means, whether a never-firing neuron is *dead* or only
*leaking*, and whether *saturated* applies. *Dead* means the unit passes no gradient on any row
of the window, so it is only possible where the region below the fire threshold is flat:

- ``relu``: ReLU, ReLU6, Hardtanh, squared ReLU. Fires at ``> 0`` (Hardtanh: above its lower
  bound); never firing is **dead**. ReLU6 and Hardtanh saturate on their upper plateau.
- ``leaky``: LeakyReLU, PReLU, RReLU. Fires at ``> 0``; never firing is **leaking**: the negative
  slope still passes gradient, so the neuron can recover.
- ``elu``: ELU, SELU, CELU. Like ``leaky``, and **saturated** on the negative plateau (the value
  is within 1 % of ``-alpha`` (``-scale*alpha`` for SELU), where the gradient is < 1 % of its
  linear-region value).
- ``smooth``: GELU, SiLU, Mish, Softplus, Hugging Face GELUs. Values are almost never exactly
  zero, so a neuron fires at ``> 1e-3``; never firing is **leaking** (the negative lobe passes
  gradient) and *dormant* (ReDo) is the notion that matters.
- ``hard``: Hardswish. Fires at ``> 0``; never firing is **leaking** on its negative lobe, but
  **dead** when every value is exactly 0 (the flat floor below -3).
- ``tanh`` / ``sigmoid``: bounded units; fire like smooth ones, never firing is **leaking**, and
  they are **saturated** when every value sits in the flat region (``|tanh| > 0.99``;
  ``sigmoid < 0.01 or > 0.99``).
- ``generic``: anything else (a user-named Linear, an unknown callable): fires at ``> 0`` and,
  since nothing is known about its gradient, never firing is called dead.

In every family, a never-firing neuron that is also *saturated* on every row (a sigmoid stuck at
0, tanh at -1, ELU on its plateau) passes no gradient either: it is **dead**.

Activations are matched by class name so that no framework has to be imported to classify them
(Hugging Face's ``NewGELUActivation`` is recognised without importing ``transformers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ACTIVATION_CLASSES",
    "FAMILIES",
    "Family",
    "activation_settings",
    "family_of",
    "flat_above",
    "float32_above",
    "float32_below",
]


@dataclass(frozen=True)
class Family:
    """Defaults shared by every activation of one family."""

    name: str
    fire_threshold: float
    # A neuron that never fires is dead when this holds (flat region below the threshold),
    # leaking otherwise.
    can_die: bool
    # The flat region is ``value < saturation_low or value > saturation_high``; infinite bounds
    # (the default) mean the family cannot saturate.
    saturation_low: float = -math.inf
    saturation_high: float = math.inf
    # Exactly 0 is a flat floor (Hardswish below -3): a never-firing neuron whose every value is
    # exactly 0 passes no gradient, so it is dead although the family can otherwise leak.
    zero_floor: bool = False

    @property
    def saturates(self) -> bool:
        return math.isfinite(self.saturation_low) or math.isfinite(self.saturation_high)


# Within 1 % of a plateau the gradient of tanh, sigmoid and the ELUs is below ~1-2 % of its peak.
PLATEAU_MARGIN = 0.01

FAMILIES: dict[str, Family] = {
    "relu": Family("relu", 0.0, can_die=True),
    "leaky": Family("leaky", 0.0, can_die=False),
    "elu": Family("elu", 0.0, can_die=False, saturation_low=-(1.0 - PLATEAU_MARGIN)),
    "smooth": Family("smooth", 1e-3, can_die=False),
    "hard": Family("hard", 0.0, can_die=False, zero_floor=True),
    "tanh": Family("tanh", 1e-3, False, -(1.0 - PLATEAU_MARGIN), 1.0 - PLATEAU_MARGIN),
    "sigmoid": Family("sigmoid", 1e-3, False, PLATEAU_MARGIN, 1.0 - PLATEAU_MARGIN),
    "generic": Family("generic", 0.0, can_die=True),
}

# Class names (torch.nn and transformers.activations) and functional names -> family.
ACTIVATION_CLASSES: dict[str, str] = {
    # torch.nn, flat floor: can die
    "ReLU": "relu",
    "ReLU6": "relu",
    "Hardtanh": "relu",
    # torch.nn, leaky
    "LeakyReLU": "leaky",
    "PReLU": "leaky",
    "RReLU": "leaky",
    "ELU": "elu",
    "SELU": "elu",
    "CELU": "elu",
    # torch.nn, smooth
    "GELU": "smooth",
    "SiLU": "smooth",
    "Mish": "smooth",
    "Hardswish": "hard",
    "Softplus": "smooth",
    # torch.nn, bounded
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "Hardsigmoid": "sigmoid",
    # transformers.activations
    "GELUActivation": "smooth",
    "NewGELUActivation": "smooth",
    "FastGELUActivation": "smooth",
    "QuickGELUActivation": "smooth",
    "ClippedGELUActivation": "smooth",
    "AccurateGELUActivation": "smooth",
    "GELUTanh": "smooth",
    "PytorchGELUTanh": "smooth",
    "MishActivation": "smooth",
    "SiLUActivation": "smooth",
    "LaplaceActivation": "smooth",
    "ReLUSquaredActivation": "relu",
    "XIELUActivation": "smooth",
}

_ALIASES: dict[str, str] = {
    "relu": "ReLU",
    "relu6": "ReLU6",
    "hardtanh": "Hardtanh",
    "leaky_relu": "LeakyReLU",
    "leakyrelu": "LeakyReLU",
    "prelu": "PReLU",
    "rrelu": "RReLU",
    "elu": "ELU",
    "selu": "SELU",
    "celu": "CELU",
    "gelu": "GELU",
    "gelu_new": "NewGELUActivation",
    "silu": "SiLU",
    "swish": "SiLU",
    "mish": "Mish",
    "hardswish": "Hardswish",
    "hardsigmoid": "Hardsigmoid",
    "softplus": "Softplus",
    "tanh": "Tanh",
    "sigmoid": "Sigmoid",
}

# SELU's fixed constants (Klambauer et al. 2017), as torch.nn.SELU uses them.
SELU_ALPHA = 1.6732632423543772
SELU_SCALE = 1.0507009873554805


def canonical(activation: str) -> str:
    """The class name of an activation given by class name or alias (``"gelu"`` -> ``GELU``)."""
    return _ALIASES.get(activation.lower(), activation)


def family_of(activation: str | None) -> Family:
    """The family of an activation given by class name (``"GELU"``) or alias (``"gelu"``).

    Unknown names (and ``None``) fall back to the ``generic`` family: fires at ``> 0``.

    >>> family_of("NewGELUActivation").name
    'smooth'
    """
    if activation is None:
        return FAMILIES["generic"]
    return FAMILIES[ACTIVATION_CLASSES.get(canonical(activation), "generic")]


def float32_below(value: float) -> float:
    """The largest float32 <= value: for a float32 x, ``x > value`` iff ``x > this``. Runtimes
    comparing float32 activations use it so every comparison equals the float64 one (0.1 is
    not a float32 number). Beyond float32's range the answer is its largest finite value or
    -inf (the overflow to +-inf is intended: no warning)."""
    with np.errstate(over="ignore", under="ignore"):  # +-inf and subnormals are intended
        f = np.float32(value)
        return float(np.nextafter(f, np.float32(-np.inf)) if float(f) > value else f)


def float32_above(value: float) -> float:
    """The smallest float32 >= value: for a float32 x, ``x < value`` iff ``x < this``."""
    with np.errstate(over="ignore", under="ignore"):
        f = np.float32(value)
        return float(np.nextafter(f, np.float32(np.inf)) if float(f) < value else f)


def flat_above(bound: float) -> float:
    """The largest float32 below ``bound``: ``value > flat_above(b)`` holds exactly for the
    values a clamp at ``b`` outputs on its plateau (``value >= b``), in float32 and float64."""
    return float(np.nextafter(np.float32(bound), np.float32(-np.inf)))


def activation_settings(activation: str | None, **params: Any) -> dict[str, float]:
    """Per-layer thresholds that depend on an activation's own parameters.

    Adapters pass what they read off the module or node (``max_val`` of ReLU6/Hardtanh,
    ``alpha`` of ELU/CELU); missing parameters take the framework defaults.

    >>> activation_settings("ReLU6")["saturation_high"] < 6.0
    True
    """
    if activation is None:
        return {}
    name = canonical(activation)
    if name in ("ReLU6", "Hardtanh"):
        low = float(params.get("min_val", 0.0 if name == "ReLU6" else -1.0))
        high = float(params.get("max_val", 6.0 if name == "ReLU6" else 1.0))
        # The lower plateau is the "off" region (no gradient); the upper one is saturation.
        return {"fire_threshold": low, "saturation_high": flat_above(high)}
    if name in ("ELU", "CELU"):
        alpha = float(params.get("alpha", 1.0))
        return {"saturation_low": -(1.0 - PLATEAU_MARGIN) * abs(alpha)}
    if name == "SELU":
        return {"saturation_low": -(1.0 - PLATEAU_MARGIN) * SELU_ALPHA * SELU_SCALE}
    return {}
