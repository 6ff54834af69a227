"""Where one forward begins and ends, whichever method of the model was called.

Layers are call sites ("the second call of ``layer1.0.relu`` in a forward"), ``every`` counts
forwards, masks belong to one forward's inputs and the wiring trace covers one forward, so the
torch adapter needs forward boundaries. They come from *entry* modules: the model itself, plus
any module found to be called from outside the model's ``forward`` (CLIP's ``encode_image`` calls
``self.visual``): the first activation seen outside a forward finds the outermost module call on
the Python stack and makes it an entry. A pre-hook/post-hook pair on each entry counts nesting
depth; a forward is the span from depth 0 to depth 0.

Activations recomputed during backward (``torch.utils.checkpoint``) are not a forward: the
autograd engine is running then, and nothing is recorded.

State is per thread, so a model served from several threads keeps each forward's call counts
and mask apart.
"""

from __future__ import annotations

import inspect
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["ForwardState", "MaskSpec", "mask_of", "outermost_module_call"]

log = logging.getLogger(__name__)

# mask=: a keyword argument name of the entry's forward, or a function of (module, args,
# kwargs) returning a [batch, tokens] tensor that is true (non-zero) on real tokens.
MaskSpec = str | Callable[[nn.Module, tuple[Any, ...], Mapping[str, Any]], Any] | None


@dataclass
class ForwardState:
    """One thread's view of the forward in flight."""

    depth: int = 0
    open: bool = False
    watched: bool = False
    histogram: bool = False
    traced: bool = False
    calls: dict[int, int] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    # Small activations copied during the forward and reduced together at its end.
    deferred: list[Any] = field(default_factory=list)
    deferred_bytes: int = 0


class ThreadForwards(threading.local):
    """Per-thread :class:`ForwardState` (``threading.local`` gives each thread its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.state = ForwardState()


def outermost_module_call(
    modules: Mapping[int, nn.Module],
) -> tuple[nn.Module | None, tuple[Any, ...], dict[str, Any]]:
    """The outermost module of ``modules`` (keyed by ``id``) being called on this thread's
    stack, with the arguments of that call, found from the frames of ``nn.Module.__call__``;
    ``(None, (), {})`` if there is none."""
    frame = sys._getframe(1)
    found: tuple[nn.Module | None, tuple[Any, ...], dict[str, Any]] = (None, (), {})
    while frame is not None:
        if frame.f_code.co_name == "_call_impl":
            local = frame.f_locals
            candidate = local.get("self")
            if candidate is not None and id(candidate) in modules:
                args, kwargs = local.get("args", ()), local.get("kwargs", {})
                found = (
                    candidate,
                    args if isinstance(args, tuple) else (),
                    kwargs if isinstance(kwargs, dict) else {},
                )
        frame = frame.f_back  # type: ignore[assignment]
    return found


_positions: dict[tuple[type, str], int | None] = {}


def _position(module: nn.Module, name: str) -> int | None:
    """Index of parameter ``name`` among the positional arguments of ``module.forward``."""
    key = (type(module), name)
    if key not in _positions:
        try:
            params = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        positional = [
            p.name
            for p in params
            if p.kind
            in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        ]
        _positions[key] = positional.index(name) if name in positional else None
    return _positions[key]


def mask_of(
    spec: MaskSpec, module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Any:
    """The raw mask of one forward under ``spec`` (not yet checked), or ``None``."""
    if spec is None:
        return None
    if callable(spec):
        return spec(module, args, kwargs)
    if spec in kwargs:
        return kwargs[spec]
    index = _position(module, spec)
    return args[index] if index is not None and index < len(args) else None


def as_row_mask(raw: Any) -> torch.Tensor | None:
    """A ``[batch, tokens]`` bool tensor (true on real tokens) from a user's mask, or ``None``
    when it is not one (a 4-D additive attention mask, say): then every row counts."""
    if not isinstance(raw, torch.Tensor) or raw.dim() != 2:
        return None
    return raw if raw.dtype == torch.bool else raw != 0
