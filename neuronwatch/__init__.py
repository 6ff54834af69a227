"""neuronwatch: find dead, dormant and saturated neurons while models train and serve.

``import neuronwatch`` loads numpy only; framework adapters load when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .config import LayerConfig
from .engine import Engine
from .errors import (
    ConfigError,
    MergeError,
    MissingExtraError,
    NeuronwatchError,
    ReportError,
    ShapeError,
)
from .families import Family, family_of
from .partials import Partials
from .report import Report
from .snapshot import Snapshot
from .stats import LayerStats
from .wiring import ParamRef, Wiring

if TYPE_CHECKING:
    # adapters/ installs as neuronwatch.adapters through setuptools' package-dir, which mypy
    # cannot follow from the source tree.
    from neuronwatch.adapters.torch import TorchMonitor  # type: ignore[import-not-found]

__all__ = [
    "ConfigError",
    "Engine",
    "Family",
    "LayerConfig",
    "LayerStats",
    "MergeError",
    "MissingExtraError",
    "NeuronwatchError",
    "ParamRef",
    "Partials",
    "Report",
    "ReportError",
    "ShapeError",
    "Snapshot",
    "Wiring",
    "__version__",
    "family_of",
    "watch",
]


def watch(model: Any, **options: Any) -> TorchMonitor:
    """Watch a ``torch.nn.Module``'s activations; see :func:`neuronwatch.adapters.torch.watch`.

    >>> with neuronwatch.watch(model) as monitor:   # doctest: +SKIP
    ...     train(model)
    ...     monitor.report().save("runs/latest")
    """
    from neuronwatch.adapters.torch import watch as torch_watch

    return torch_watch(model, **options)
