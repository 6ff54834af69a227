"""Prometheus text (0.0.4) and OpenMetrics (1.0.0) exposition of metric readings.

Why not prometheus_client's ``generate_latest``: it formats every sample through a generic
path (a dict of labels sorted and escaped per sample) and takes ~290 ms for a 1,000-layer model
(~40,000 samples) on this project's CPU; a scrape must stay under 50 ms. Here the label string
of each layer is built once and shared by its ~40 samples. The output parses to the same
families as prometheus_client's own rendering of :class:`~.prometheus.NeuronwatchCollector`
(``tests/unit/test_exporter_prometheus.py`` checks it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from neuronwatch.metric_families import FAMILIES, MetricFamily
from neuronwatch.metric_values import Histogram, Reading

__all__ = ["CONTENT_TYPE_OPENMETRICS", "CONTENT_TYPE_TEXT", "choose_format", "render"]

CONTENT_TYPE_TEXT = "text/plain; version=0.0.4; charset=utf-8"
CONTENT_TYPE_OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def accepted(header: str | None, token: str) -> bool:
    """Whether an ``Accept``/``Accept-Encoding`` header lists ``token`` with a weight above
    zero (``gzip;q=0`` is a refusal, not a request)."""
    for part in (header or "").split(","):
        name, *params = part.split(";")
        if name.strip().lower() != token:
            continue
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0
        if weight > 0:
            return True
    return False


def choose_format(accept: str | None) -> bool:
    """Whether the ``Accept`` header asks for OpenMetrics (Prometheus does, by default)."""
    return accepted(accept, "application/openmetrics-text")


def _label_value(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _help(text: str, openmetrics: bool) -> str:
    text = text.replace("\\", r"\\").replace("\n", r"\n")
    return text.replace('"', r"\"") if openmetrics else text


class _LabelStrings:
    """``kind="post",layer="fc1",model="mlp",run="r1"`` for every label set of a series, built
    once per shared label list (the ~35 per-layer families of a reading share one)."""

    def __init__(self, constant: Mapping[str, str]) -> None:
        self._constant = {k: _label_value(v) for k, v in constant.items()}
        self._templates: dict[tuple[str, ...], str] = {}
        self._cache: dict[int, tuple[Sequence[tuple[str, ...]], list[str]]] = {}

    def _template(self, names: tuple[str, ...]) -> str:
        """A format string with the labels sorted by name (as prometheus_client writes them):
        ``kind="{2}",layer="{1}",model="{0}",run="r1"``."""
        template = self._templates.get(names)
        if template is None:
            fields = {name: f"{{{i}}}" for i, name in enumerate(names)}
            for name, value in self._constant.items():
                fields[name] = value.replace("{", "{{").replace("}", "}}")
            template = ",".join(f'{name}="{fields[name]}"' for name in sorted(fields))
            self._templates[names] = template
        return template

    def __call__(self, names: tuple[str, ...], labels: Sequence[tuple[str, ...]]) -> list[str]:
        cached = self._cache.get(id(labels))
        if cached is not None and cached[0] is labels:
            return cached[1]
        fill = self._template(names).format
        strings = [fill(*map(_label_value, values)) for values in labels]
        # Holding `labels` keeps its id from being reused for another list during this render.
        self._cache[id(labels)] = (labels, strings)
        return strings


def _header(family: MetricFamily, openmetrics: bool) -> str:
    if openmetrics:
        unit = f"# UNIT {family.name} {family.unit}\n" if family.unit else ""
        return (
            f"# HELP {family.name} {_help(family.help, True)}\n"
            f"# TYPE {family.name} {family.kind}\n{unit}"
        )
    # The text format has no info or gaugehistogram types (prometheus_client's munging).
    name, kind = family.samples[0], str(family.kind)
    if kind == "info":
        kind = "gauge"
    elif kind == "gaugehistogram":
        name, kind = family.name, "histogram"
    return f"# HELP {name} {_help(family.help, False)}\n# TYPE {name} {kind}\n"


def _histogram_lines(
    family: MetricFamily,
    points: list[tuple[str, Histogram]],
    openmetrics: bool,
    out: list[str],
) -> None:
    bucket = family.name + "_bucket"
    les = family.bucket_labels
    gcount, gsum = family.name + "_gcount", family.name + "_gsum"
    for labels, value in points:
        prefix = f"{bucket}{{{labels},le="
        out.extend(
            f'{prefix}"{le}"}} {count!r}\n' for le, count in zip(les, value.buckets, strict=True)
        )
        if openmetrics:
            out.append(
                f"{gcount}{{{labels}}} {value.gcount!r}\n{gsum}{{{labels}}} {value.gsum!r}\n"
            )
    if openmetrics:
        return
    # The text format has no gcount/gsum samples: they go in gauges of their own.
    for name, index in ((gcount, 1), (gsum, 2)):
        out.append(f"# HELP {name} {_help(family.help, False)}\n# TYPE {name} gauge\n")
        out.extend(f"{name}{{{labels}}} {value[index]!r}\n" for labels, value in points)


def render(readings: Sequence[Reading], constant: Mapping[str, str], openmetrics: bool) -> bytes:
    """The exposition of ``readings`` (one per watched model) with ``constant`` labels."""
    label_strings = _LabelStrings(constant)
    out: list[str] = []
    for family in FAMILIES:
        points: list[tuple[str, object]] = []
        for reading in readings:
            series = reading.series[family.name]
            strings = label_strings(family.labels, series.labels)
            points.extend(zip(strings, series.values, strict=True))
        if not points:
            continue  # e.g. the active-parameter ratio of a model whose wiring is unknown
        out.append(_header(family, openmetrics))
        if family.kind == "gaugehistogram":
            _histogram_lines(family, points, openmetrics, out)  # type: ignore[arg-type]
        else:
            sample = family.samples[0]
            out.extend(f"{sample}{{{text}}} {value!r}\n" for text, value in points)
    if openmetrics:
        out.append("# EOF\n")
    return "".join(out).encode("utf-8")
