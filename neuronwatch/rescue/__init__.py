"""Offline checkpoint repair driven by a report (strip, reinit, prune, swap, lift).

Checkpoint in, new checkpoint out, manifest of every change; the arithmetic is numpy only
(:mod:`.ops`), each file format has its own module (:mod:`.formats`), and torch or onnx load
only when a file of theirs is opened.

>>> from neuronwatch import rescue
>>> rescue.prune("model.safetensors", "runs/audit", "pruned.safetensors")   # doctest: +SKIP
>>> rescue.swap_activations(model, to="leaky_relu")                          # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..report import Report
from .checkpoint import CheckpointError, TensorInfo
from .formats import open_checkpoint
from .manifest import Manifest
from .plan import OPS, STATES, Options, Plan, make_plan
from .run import rescue

__all__ = [
    "OPS",
    "STATES",
    "CheckpointError",
    "Manifest",
    "Options",
    "Plan",
    "TensorInfo",
    "lift",
    "make_plan",
    "open_checkpoint",
    "prune",
    "reinit",
    "rescue",
    "strip",
    "swap_activations",
    "swap_onnx",
]

_Report = Report | str | Path


def strip(
    checkpoint: str | Path, report: _Report, out: str | Path | None = None, **kw: Any
) -> Manifest:
    """Synaptic Stripping: zero the ``fraction`` (0.1) most negative non-zero incoming weights
    of each dead neuron."""
    return rescue("strip", checkpoint, report, out, **kw)


def reinit(
    checkpoint: str | Path, report: _Report, out: str | Path | None = None, **kw: Any
) -> Manifest:
    """ReDo: redraw each dead (``state="dormant"``: dormant) neuron's incoming weights, zero its
    bias and its outgoing weights (outputs unchanged at the edit)."""
    return rescue("reinit", checkpoint, report, out, **kw)


def prune(
    checkpoint: str | Path, report: _Report, out: str | Path | None = None, **kw: Any
) -> Manifest:
    """Remove dead (or saturated) neurons whose output is constant, folding the constant into
    the consumer's bias (outputs preserved)."""
    return rescue("prune", checkpoint, report, out, **kw)


def lift(
    checkpoint: str | Path, report: _Report, out: str | Path | None = None, **kw: Any
) -> Manifest:
    """Raise each dead neuron's bias so it fires on about the top ``top`` share of the audit
    rows (needs a report taken with ``pre=True``)."""
    return rescue("lift", checkpoint, report, out, **kw)


def swap_activations(model: Any, to: str = "leaky_relu", **kw: Any) -> list[str]:
    """Replace a torch model's ReLUs in place (see :mod:`neuronwatch.rescue.swap`)."""
    from .swap import swap_activations as swap

    return swap(model, to, **kw)


def swap_onnx(model: str | Path, out: str | Path | None = None, **kw: Any) -> Manifest:
    """Replace an ONNX model's Relu nodes; see :func:`neuronwatch.rescue.onnx_swap.swap_onnx`."""
    from .onnx_swap import swap_onnx as swap

    return swap(model, out, **kw)
