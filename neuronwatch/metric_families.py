"""Every metric family neuronwatch exports, declared once (name, kind, unit, help, labels).

The Prometheus exporter, the OpenTelemetry exporter, the Grafana dashboards, the alert rules and
``docs/metrics.md`` all use these names, so they cannot drift apart. Naming follows the
Prometheus conventions: prefix ``neuronwatch_``, base units, ratios 0-1 named ``_ratio``,
counters ``_total``. Labels are ``model`` (every family), ``layer`` and ``kind`` (per-layer
families), plus the user's constant labels (``run``, ``rank``, ...). There is never a per-neuron
label: per-neuron detail lives in reports.

The OpenTelemetry instrument of each family (:attr:`MetricFamily.otel_name`,
:attr:`MetricFamily.otel_unit`) is chosen so that the standard OTLP-to-Prometheus translation
(dots to underscores, ``_ratio`` for unit ``1`` gauges, ``_seconds`` for unit ``s``, ``_total``
for monotonic sums, ``{annotations}`` dropped) lands on the same names as the native exporter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .errors import ConfigError
from .states import STATES
from .stats import FREQUENCY_EDGES

__all__ = [
    "FAMILIES",
    "LAYER_LABELS",
    "MODEL_LABELS",
    "PREFIX",
    "SILENT_STEP_BUCKETS",
    "MetricFamily",
    "MetricKind",
    "family",
    "le_label",
    "validate_labels",
]

PREFIX = "neuronwatch_"
MetricKind = Literal["gauge", "counter", "gaugehistogram", "info"]
Scope = Literal["model", "layer"]

MODEL_LABELS: tuple[str, ...] = ("model",)
LAYER_LABELS: tuple[str, ...] = ("model", "layer", "kind")

# "Neurons silent for 10k steps" is one query: gcount - bucket{le="10000.0"}.
SILENT_STEP_BUCKETS: tuple[float, ...] = (10.0, 100.0, 1e3, 1e4, 1e5)

# OpenMetrics units whose OpenTelemetry (UCUM) spelling the OTLP translation maps back.
_OTEL_UNITS = {"ratio": "1", "seconds": "s"}


@dataclass(frozen=True)
class MetricFamily:
    """One exported family.

    ``name`` is the family name as OpenMetrics and prometheus_client spell it: counters without
    ``_total``, info families without ``_info``, gauge-histograms without ``_bucket``. Sample
    names are :attr:`samples`. ``unit`` is the OpenMetrics unit (the name ends with it);
    ``counts`` is what a count-like family counts (an OTel annotation such as ``{neuron}``).
    """

    name: str
    kind: MetricKind
    scope: Scope
    help: str
    unit: str = ""
    counts: str = ""
    info_labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.startswith(PREFIX):
            raise ValueError(f"metric family {self.name!r} lacks the {PREFIX!r} prefix")
        if self.unit and not self.name.endswith("_" + self.unit):
            raise ValueError(f"metric family {self.name!r} must end with its unit {self.unit!r}")
        if (self.kind == "gaugehistogram") != bool(self.buckets):
            raise ValueError(f"metric family {self.name!r}: buckets go with gaugehistogram only")

    @property
    def labels(self) -> tuple[str, ...]:
        """Label names before the user's constant labels (and before ``le``)."""
        base = LAYER_LABELS if self.scope == "layer" else MODEL_LABELS
        return base + self.info_labels

    @property
    def samples(self) -> tuple[str, ...]:
        """The sample names a query uses."""
        if self.kind == "counter":
            return (self.name + "_total",)
        if self.kind == "info":
            return (self.name + "_info",)
        if self.kind == "gaugehistogram":
            return (self.name + "_bucket", self.name + "_gcount", self.name + "_gsum")
        return (self.name,)

    @property
    def bucket_labels(self) -> tuple[str, ...]:
        """The ``le`` label values, ``+Inf`` last."""
        return tuple(le_label(b) for b in (*self.buckets, math.inf))

    @property
    def otel_name(self) -> str:
        """The OpenTelemetry instrument name (for a gauge-histogram: the stem of its three
        gauges ``<stem>_bucket``, ``<stem>_gcount``, ``<stem>_gsum``)."""
        body = self.name[len(PREFIX) :]
        if self.kind == "info":
            body += "_info"
        elif self.unit and self.kind != "gaugehistogram":
            body = body[: -len(self.unit) - 1]  # the translation appends the unit again
        return "neuronwatch." + body

    @property
    def otel_unit(self) -> str:
        if self.kind in ("info", "gaugehistogram"):
            return ""
        return _OTEL_UNITS.get(self.unit, self.counts)


def le_label(bound: float) -> str:
    """An ``le`` label value exactly as prometheus_client writes it (``10000.0``, ``+Inf``),
    so the native and the OpenTelemetry series carry the same value."""
    if bound == math.inf:
        return "+Inf"
    text = repr(float(bound))
    dot = text.find(".")
    if bound > 0 and dot > 6:  # Go (and prometheus_client) switch to exponents sooner
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _state_families() -> list[MetricFamily]:
    families = []
    for state in STATES:
        families.append(
            MetricFamily(
                f"neuronwatch_{state.value}_neurons",
                "gauge",
                "layer",
                f"Neurons of the layer that are {state.value}: {state.description}.",
                counts="{neuron}",
            )
        )
        families.append(
            MetricFamily(
                f"neuronwatch_{state.value}_ratio",
                "gauge",
                "layer",
                f"Share (0-1) of the layer's neurons that are {state.value}.",
                unit="ratio",
            )
        )
    return families


FAMILIES: tuple[MetricFamily, ...] = (
    MetricFamily(
        "neuronwatch_build",
        "info",
        "model",
        "The neuronwatch version exporting this model.",
        info_labels=("version",),
    ),
    MetricFamily(
        "neuronwatch_layer",
        "info",
        "layer",
        "How the layer is judged: activation, family and thresholds.",
        info_labels=("activation", "family", "fire_threshold", "asleep_below", "tau", "min_rows"),
    ),
    MetricFamily(
        "neuronwatch_steps",
        "counter",
        "model",
        "Training steps counted by the monitor (0 for a process that only serves).",
        counts="{step}",
    ),
    MetricFamily(
        "neuronwatch_windows_completed",
        "counter",
        "model",
        "Windows completed; the per-layer figures cover the last one (lifetime before).",
        counts="{window}",
    ),
    MetricFamily(
        "neuronwatch_last_update_timestamp_seconds",
        "gauge",
        "model",
        "Unix time of the snapshot exported (the monitor's last flush).",
        unit="seconds",
    ),
    MetricFamily(
        "neuronwatch_active_parameter_ratio",
        "gauge",
        "model",
        "Parameters not attached to a dead neuron over all parameters wired to the watched "
        "layers (absent when the wiring is unknown).",
        unit="ratio",
    ),
    MetricFamily(
        "neuronwatch_neurons",
        "gauge",
        "layer",
        "Neurons (features) of the layer.",
        counts="{neuron}",
    ),
    *_state_families(),
    MetricFamily(
        "neuronwatch_window_rows",
        "gauge",
        "layer",
        "Rows in the window the per-layer figures cover (the last complete one, else lifetime).",
        counts="{row}",
    ),
    MetricFamily(
        "neuronwatch_rows_observed",
        "counter",
        "layer",
        "Rows (activation vectors) observed since the start.",
        counts="{row}",
    ),
    MetricFamily(
        "neuronwatch_nonfinite_values",
        "counter",
        "layer",
        "NaN and +-Inf activation values observed since the start.",
        counts="{value}",
    ),
    MetricFamily(
        "neuronwatch_hook_errors",
        "counter",
        "layer",
        "Failures of whatever feeds the layer (a hook, a session), counted instead of raised.",
        counts="{error}",
    ),
    MetricFamily(
        "neuronwatch_firing_frequency_ratio",
        "gaugehistogram",
        "layer",
        "Known neurons of the layer by firing frequency (share of the window's rows on which "
        "the neuron fired); le=0 counts those that never fired.",
        unit="ratio",
        buckets=FREQUENCY_EDGES,
    ),
    MetricFamily(
        "neuronwatch_steps_since_last_fired",
        "gaugehistogram",
        "layer",
        "Neurons of the layer by training steps since they last fired (the whole run for a "
        "neuron that never fired).",
        buckets=SILENT_STEP_BUCKETS,
    ),
)

_BY_NAME = {f.name: f for f in FAMILIES}


def family(name: str) -> MetricFamily:
    """The family called ``name`` (without ``_total``/``_info``/``_bucket``)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"no metric family {name!r}; known: {sorted(_BY_NAME)}") from None


_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED = frozenset(
    {"le", "quantile", *LAYER_LABELS, *(n for f in FAMILIES for n in f.info_labels)}
)


def validate_labels(
    labels: Mapping[str, object] | None, argument: str = "labels"
) -> dict[str, str]:
    """The user's constant labels (``{"run": "exp-3", "rank": 0}``) as strings, or a
    ConfigError naming ``argument`` and the bad key."""
    if labels is None:
        return {}
    if not isinstance(labels, Mapping):
        raise ConfigError(f"{argument} must be a mapping of label names to values, got {labels!r}")
    checked: dict[str, str] = {}
    for name, value in labels.items():
        if not isinstance(name, str) or not _LABEL_NAME.match(name) or name.startswith("__"):
            raise ConfigError(
                f"{argument}: {name!r} is not a valid label name (letters, digits and _, not "
                "starting with a digit or __)"
            )
        if name in _RESERVED:
            raise ConfigError(
                f"{argument}: label {name!r} is set by neuronwatch itself; choose another name "
                f"(reserved: {sorted(_RESERVED)})"
            )
        checked[name] = str(value)
    return checked
