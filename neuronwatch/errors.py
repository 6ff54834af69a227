"""The exception tree: one root, one subclass per kind of failure.

Messages quote the bad value and say how to fix it. Subclasses also derive from the matching
builtin so callers that already catch ``ValueError`` or ``FileNotFoundError`` keep working.
"""

from __future__ import annotations


class NeuronwatchError(Exception):
    """Root of every error neuronwatch raises on purpose."""


class ConfigError(NeuronwatchError, ValueError):
    """An argument or per-layer setting is out of range or names something that does not exist."""


class ShapeError(NeuronwatchError, ValueError):
    """An array does not fit the layer it was given for (wrong neuron count, wrong axis)."""


class MergeError(NeuronwatchError, ValueError):
    """Two engines, windows or reports cannot be merged (different layers, thresholds or edges)."""


class CheckpointError(NeuronwatchError, ValueError):
    """A checkpoint is unreadable, hostile, or does not fit the report; nothing was written."""


class ReportError(NeuronwatchError, ValueError):
    """A report directory is missing, incomplete or from an unknown schema version."""


class MissingExtraError(NeuronwatchError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"{module!r} is not installed; install it with: pip install 'neuronwatch[{extra}]'"
        )
        self.module = module
        self.extra = extra
