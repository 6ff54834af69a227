"""Swap activations of a live torch model, in process (a checkpoint holds no activation types).

``nn.ReLU`` modules are replaced by ``nn.LeakyReLU(negative_slope)`` or ``nn.GELU``, keeping
``inplace``; the functional ReLU of ``nn.TransformerEncoderLayer``/``DecoderLayer`` is replaced
too, with the layer's fast-path flag updated (left alone, eval-mode inference would keep running
ReLU). Parameters are untouched, so a checkpoint saved before the swap loads into the swapped
model as it is.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import ConfigError, MissingExtraError
from .options import check_patterns

__all__ = ["ACTIVATIONS", "swap_activations"]

ACTIVATIONS = ("leaky_relu", "gelu")
_ALIASES = {"leaky_relu": "leaky_relu", "leakyrelu": "leaky_relu", "gelu": "gelu"}


def _factory(
    nn: Any, to: str | Callable[[], Any], negative_slope: float, approximate: str
) -> tuple[str, Callable[[bool], Any]]:
    if callable(to):
        return getattr(to, "__name__", "custom"), lambda inplace: to()
    kind = _ALIASES.get(str(to).lower().replace("-", "_"))
    if kind is None:
        raise ConfigError(f"to={to!r}: choose one of {', '.join(ACTIVATIONS)} or pass a factory")
    if kind == "leaky_relu":
        if not negative_slope > 0:
            raise ConfigError(f"negative_slope must be > 0, got {negative_slope}")
        return kind, lambda inplace: nn.LeakyReLU(negative_slope, inplace=inplace)
    if approximate not in ("none", "tanh"):
        raise ConfigError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return kind, lambda inplace: nn.GELU(approximate=approximate)


def swap_activations(
    model: Any,
    to: str | Callable[[], Any] = "leaky_relu",
    *,
    negative_slope: float = 0.01,
    approximate: str = "none",
    layers: Iterable[str] = ("*",),
) -> list[str]:
    """Replace the ReLUs of ``model`` whose names match ``layers`` (globs); returns the names
    replaced (``<block>.activation`` for a Transformer layer's functional ReLU).

    >>> swap_activations(model, "gelu")                  # doctest: +SKIP
    ['1', '3', '5']
    """
    try:
        import torch
        from torch import nn
    except ImportError as exc:
        raise MissingExtraError("torch", "torch") from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"swap_activations takes a torch.nn.Module, got {type(model).__name__}")
    kind, make = _factory(nn, to, negative_slope, approximate)
    patterns = list(check_patterns(layers))
    relu_functions = {torch.relu, nn.functional.relu}
    transformer_layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    # Transformer layers pick their fused inference kernel from this flag (1 relu, 2 gelu);
    # left at 1, eval-mode inference would keep running ReLU. 0 turns the kernel off.
    fast_path = 2 if kind == "gelu" and approximate == "none" else 0
    swapped: list[str] = []
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        for child_name, child in list(module.named_children()):
            full = prefix + child_name
            if type(child) is nn.ReLU and any(fnmatch.fnmatchcase(full, p) for p in patterns):
                setattr(module, child_name, make(bool(child.inplace)))
                swapped.append(full)
                if child_name == "activation" and isinstance(module, transformer_layers):
                    module.activation_relu_or_gelu = fast_path
        if isinstance(module, transformer_layers):
            full = f"{prefix}activation"
            if getattr(module, "activation", None) in relu_functions and any(
                fnmatch.fnmatchcase(full, p) for p in patterns
            ):
                module.activation = make(False)
                module.activation_relu_or_gelu = fast_path
                swapped.append(full)
    if not swapped and patterns != ["*"]:
        raise ConfigError(f"layers {patterns} match no ReLU of {type(model).__name__}")
    return swapped
