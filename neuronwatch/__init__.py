"""neuronwatch: find dead, dormant and saturated neurons while models train and serve.

``import neuronwatch`` loads numpy only; framework adapters load when first used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._version import __version__
from .config import LayerConfig
from .engine import Engine
from .errors import (
    CheckpointError,
    ConfigError,
    MergeError,
    MissingExtraError,
    NeuronwatchError,
    ReportError,
    ShapeError,
)
from .families import Family, family_of
from .monitor import ActivationSource, Monitor, SnapshotSource
from .partials import Partials
from .report import Report
from .snapshot import Snapshot
from .states import STATES, State
from .stats import LayerStats
from .wiring import ParamRef, Wiring

# adapters/ and exporters/ sit beside this package in a checkout and are installed into it as
# neuronwatch.adapters / neuronwatch.exporters (docs/architecture.md). Python run from the
# repository root imports this source tree ahead of any installed copy, so give it the same two
# subpackages;
# otherwise `neuronwatch.watch` fails there with "No module named 'neuronwatch.adapters'".
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "adapters" / "torch.py").is_file():
    __path__.append(str(_checkout))

__all__ = [
    "STATES",
    "ActivationSource",
    "CheckpointError",
    "ConfigError",
    "Engine",
    "Family",
    "LayerConfig",
    "LayerStats",
    "MergeError",
    "MissingExtraError",
    "Monitor",
    "NeuronwatchError",
    "ParamRef",
    "Partials",
    "Report",
    "ReportError",
    "ShapeError",
    "Snapshot",
    "SnapshotSource",
    "State",
    "Wiring",
    "__version__",
    "family_of",
    "watch",
]


def watch(model: Any, **options: Any) -> Monitor:
    """Watch a ``torch.nn.Module``'s activations; see :func:`neuronwatch.adapters.torch.watch`.

    >>> with neuronwatch.watch(model) as monitor:   # doctest: +SKIP
    ...     train(model)
    ...     monitor.report().save("runs/latest")
    """
    try:
        # adapters/ installs as neuronwatch.adapters through setuptools' package-dir, which
        # mypy cannot follow from the source tree.
        from neuronwatch.adapters.torch import (  # type: ignore[import-not-found]
            watch as torch_watch,
        )
    except ImportError as exc:
        if exc.name != "torch":
            raise
        raise MissingExtraError("torch", "torch") from exc

    monitor: Monitor = torch_watch(model, **options)
    return monitor
