"""Every metric family is declared once, named by the Prometheus rules, and the OpenTelemetry
instrument of each lands on the same name through the standard OTLP-to-Prometheus translation."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from neuronwatch.errors import ConfigError
from neuronwatch.metric_families import (
    FAMILIES,
    PREFIX,
    SILENT_STEP_BUCKETS,
    family,
    le_label,
    validate_labels,
)
from neuronwatch.states import STATES
from neuronwatch.stats import FREQUENCY_EDGES

# The OTLP -> Prometheus unit map and rules of prometheus/otlptranslator (normalizeName with
# suffixes), the translation Prometheus' OTLP receiver and the collector's exporters apply.
UNIT_MAP = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": "", "%": "percent"}


def otlp_to_prometheus(name: str, unit: str, kind: str) -> str:
    tokens = [t for t in re.split(r"[^a-zA-Z0-9:]", name) if t]
    main = unit.split("/", 1)[0].strip()
    suffix = "" if not main or "{" in main or "}" in main else UNIT_MAP.get(main, main)
    if suffix and suffix not in tokens:
        tokens.append(suffix)
    if kind == "counter":
        tokens = [t for t in tokens if t != "total"] + ["total"]
    if unit == "1" and kind == "gauge":
        tokens = [t for t in tokens if t != "ratio"] + ["ratio"]
    return "_".join(tokens)


@pytest.mark.parametrize(
    ("name", "unit", "kind", "expected"),
    [
        # Examples from the translator's own documentation.
        ("http.server.request.duration", "s", "histogram", "http_server_request_duration_seconds"),
        ("requests.count", "1", "counter", "requests_count_total"),
        ("memory.usage", "By", "gauge", "memory_usage_bytes"),
        ("system.cpu.utilization", "1", "gauge", "system_cpu_utilization_ratio"),
        ("queue.items", "{item}", "gauge", "queue_items"),
    ],
)
def test_the_translation_reference_follows_the_translator(
    name: str, unit: str, kind: str, expected: str
) -> None:
    assert otlp_to_prometheus(name, unit, kind) == expected


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: f.name)
def test_the_otel_instrument_translates_to_the_native_sample_names(fam: object) -> None:
    from neuronwatch.metric_families import MetricFamily

    assert isinstance(fam, MetricFamily)
    if fam.kind == "gaugehistogram":
        # Three gauges, one per sample name of the gauge-histogram.
        translated = tuple(
            otlp_to_prometheus(f"{fam.otel_name}_{part}", fam.otel_unit, "gauge")
            for part in ("bucket", "gcount", "gsum")
        )
    else:
        kind = "counter" if fam.kind == "counter" else "gauge"
        translated = (otlp_to_prometheus(fam.otel_name, fam.otel_unit, kind),)
    assert translated == fam.samples
    if fam.kind != "gaugehistogram":  # its otel_name is the stem of three gauges
        # OpenTelemetry names carry no unit or type suffix: the translation adds them.
        assert not fam.otel_name.endswith(("_ratio", "_seconds", "_total"))


def test_names_follow_the_prometheus_conventions() -> None:
    names = [s for f in FAMILIES for s in f.samples]
    assert len(names) == len(set(names)), "two families share a sample name"
    for fam in FAMILIES:
        assert fam.name.startswith(PREFIX)
        assert re.fullmatch(r"[a-z_]+", fam.name), fam.name
        assert not fam.name.endswith(("_total", "_info", "_bucket", "_count", "_sum"))
        if fam.unit == "ratio":
            assert fam.name.endswith("_ratio")
            assert fam.kind in ("gauge", "gaugehistogram")
        assert ("timestamp" in fam.name) == (fam.unit == "seconds")


def test_every_state_has_a_count_and_a_ratio_per_layer() -> None:
    for state in STATES:
        count = family(f"neuronwatch_{state.value}_neurons")
        ratio = family(f"neuronwatch_{state.value}_ratio")
        assert count.scope == ratio.scope == "layer"
        assert state.value in count.help


def test_per_layer_families_carry_model_layer_and_kind() -> None:
    for fam in FAMILIES:
        assert fam.labels[0] == "model"
        if fam.scope == "layer":
            assert fam.labels[:3] == ("model", "layer", "kind")
        assert "neuron" not in fam.labels  # never a per-neuron label


def test_bucket_labels_are_written_as_prometheus_client_writes_them() -> None:
    utils = pytest.importorskip("prometheus_client.utils")
    for bound in (*FREQUENCY_EDGES, *SILENT_STEP_BUCKETS, 1e6, 123456789.0, math.inf):
        assert le_label(bound) == utils.floatToGoString(bound)
    assert family("neuronwatch_steps_since_last_fired").bucket_labels[3] == "10000.0"


def test_an_unknown_family_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="neuronwatch_dead_ratio"):
        family("neuronwatch_dead")


def test_constant_labels_are_checked_and_stringified() -> None:
    assert validate_labels({"run": "exp-3", "rank": 0}) == {"run": "exp-3", "rank": "0"}
    assert validate_labels(None) == {}
    for bad in ({"2run": "x"}, {"__name__": "x"}, {"run-id": "x"}):
        with pytest.raises(ConfigError, match="not a valid label name"):
            validate_labels(bad)
    for reserved in ("layer", "model", "kind", "le", "version", "activation"):
        with pytest.raises(ConfigError, match="set by neuronwatch"):
            validate_labels({reserved: "x"})
    with pytest.raises(ConfigError, match="labels must be a mapping"):
        validate_labels(["run"])  # type: ignore[arg-type]


def test_the_docs_describe_every_family() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()
    for fam in FAMILIES:
        assert f"`{fam.samples[0]}`" in docs, fam.name


def test_the_core_modules_of_the_exporters_load_no_framework() -> None:
    code = (
        "import sys\n"
        "import neuronwatch.metric_families, neuronwatch.metric_values, neuronwatch.alerts\n"
        "import neuronwatch.cli.grafana\n"
        "heavy = ('torch', 'prometheus_client', 'opentelemetry', 'onnxruntime')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
