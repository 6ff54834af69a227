"""Activation families and the defaults that follow from them (DESIGN §2).

A *family* decides what "fires" means and whether "saturated" applies:

- ``relu``: piecewise-linear units with a hard zero region; a neuron fires when its value is
  ``> 0``. Dead neurons are exact zeros here.
- ``smooth``: GELU, SiLU, Mish, ...; values are almost never exactly zero, so a neuron fires at
  ``> 1e-3`` and *dormant* (ReDo) is the notion that matters.
- ``tanh`` / ``sigmoid``: bounded units; they fire like smooth ones and are *saturated* when
  every value sits in the flat region (``|tanh| > 0.99``; ``sigmoid < 0.01 or > 0.99``).
- ``generic``: anything else (a user-named Linear, an unknown callable): fires at ``> 0``.

Activations are matched by class name so that no framework has to be imported to classify them
(Hugging Face's ``NewGELUActivation`` is recognised without importing ``transformers``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ACTIVATION_CLASSES", "FAMILIES", "Family", "family_of"]


@dataclass(frozen=True)
class Family:
    """Defaults shared by every activation of one family."""

    name: str
    fire_threshold: float
    # The flat region is ``value < saturation_low or value > saturation_high``; infinite bounds
    # (the default) mean the family cannot saturate.
    saturation_low: float = -math.inf
    saturation_high: float = math.inf

    @property
    def saturates(self) -> bool:
        return math.isfinite(self.saturation_low) or math.isfinite(self.saturation_high)


FAMILIES: dict[str, Family] = {
    "relu": Family("relu", 0.0),
    "smooth": Family("smooth", 1e-3),
    "tanh": Family("tanh", 1e-3, -0.99, 0.99),
    "sigmoid": Family("sigmoid", 1e-3, 0.01, 0.99),
    "generic": Family("generic", 0.0),
}

# Class names (torch.nn and transformers.activations) and functional names -> family.
ACTIVATION_CLASSES: dict[str, str] = {
    # torch.nn, ReLU family
    "ReLU": "relu",
    "ReLU6": "relu",
    "LeakyReLU": "relu",
    "PReLU": "relu",
    "RReLU": "relu",
    "ELU": "relu",
    "SELU": "relu",
    "CELU": "relu",
    # torch.nn, smooth
    "GELU": "smooth",
    "SiLU": "smooth",
    "Mish": "smooth",
    "Hardswish": "smooth",
    "Softplus": "smooth",
    # torch.nn, bounded
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
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
    "leaky_relu": "LeakyReLU",
    "leakyrelu": "LeakyReLU",
    "prelu": "PReLU",
    "elu": "ELU",
    "selu": "SELU",
    "celu": "CELU",
    "gelu": "GELU",
    "gelu_new": "NewGELUActivation",
    "silu": "SiLU",
    "swish": "SiLU",
    "mish": "Mish",
    "hardswish": "Hardswish",
    "softplus": "Softplus",
    "tanh": "Tanh",
    "sigmoid": "Sigmoid",
}


def family_of(activation: str | None) -> Family:
    """The family of an activation given by class name (``"GELU"``) or alias (``"gelu"``).

    Unknown names (and ``None``) fall back to the ``generic`` family: fires at ``> 0``.

    >>> family_of("NewGELUActivation").name
    'smooth'
    """
    if activation is None:
        return FAMILIES["generic"]
    cls = _ALIASES.get(activation.lower(), activation)
    return FAMILIES[ACTIVATION_CLASSES.get(cls, "generic")]
