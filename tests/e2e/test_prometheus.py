"""A real Prometheus scrapes a real training run: every PromQL expression of the bundled dashboard
and alert rules returns data, and what Prometheus stores is what neuronwatch measured."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from exporter_harness import (
    ALERT_RULES,
    DASHBOARD,
    DEAD_IN_ACT2,
    Prometheus,
    Training,
    binary,
    get,
)
from neuronwatch.exporters.prometheus import PrometheusServer, serve

RUN, RANK = "e2e", "0"
# What Grafana would put in: this run, every layer, the default silence threshold.
VARIABLES = {
    "$model": "e2e-mlp",
    "$run": RUN,
    "$rank": RANK,
    "$layer": ".*",
    "$silent": "10000.0",
    "$__rate_interval": "30s",
}


class Stack:
    def __init__(self, training: Training, server: PrometheusServer, prometheus: Prometheus):
        self.training, self.server, self.prometheus = training, server, prometheus


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    training = Training(window=20, flush_every=5).start()
    server = serve(training.monitor, port=0, labels={"run": RUN, "rank": RANK})
    prometheus = Prometheus(
        tmp_path_factory.mktemp("prometheus"),
        [f"127.0.0.1:{server.port}"],
        rule_files=(ALERT_RULES,),
    )
    try:
        prometheus.start()
        # Enough history for rates, a completed window and the recording rule.
        prometheus.wait_for("neuronwatch_windows_completed_total > 0")
        prometheus.wait_for("rate(neuronwatch_rows_observed_total[30s]) > 0")
        prometheus.wait_for("layer:neuronwatch_alive_neurons:ratio")
        yield Stack(training, server, prometheus)
    finally:
        prometheus.stop()
        server.stop()
        training.stop()


def substitute(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    assert "$" not in expr, expr
    return expr


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


PANEL_QUERIES = [
    pytest.param(target["expr"], id=f"{panel['title']}/{target['refId']}")
    for panel in dashboard()["panels"]
    for target in panel["targets"]
]


@pytest.mark.parametrize("expr", PANEL_QUERIES)
def test_every_dashboard_query_returns_data(stack: Stack, expr: str) -> None:
    assert stack.prometheus.query(substitute(expr)), expr


def test_every_dashboard_variable_finds_values(stack: Stack) -> None:
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        found = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
        assert found, variable["query"]
        match, label = substitute(found[1]), found[2]
        values = stack.prometheus.api(f"label/{label}/values", **{"match[]": match})
        assert values, variable["name"]
    layers = stack.prometheus.api("label/layer/values", **{"match[]": "neuronwatch_neurons"})
    assert layers == ["act1", "act2"]


def rule_expressions() -> list[Any]:
    # The rule file is YAML; PyYAML comes with the dev tools.
    yaml = pytest.importorskip("yaml")
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def without_threshold(expr: str) -> str:
    """``q > 0.3`` as ``q > bool 0.3``: every series of ``q``, firing or not, comes back."""
    found = re.fullmatch(r"(.*\S)\s*(>|<|>=|<=|==|!=)\s*([0-9.eE+-]+)\s*", expr, re.DOTALL)
    assert found, f"the rule expression must end in a comparison with a number: {expr!r}"
    return f"{found[1]} {found[2]} bool {found[3]}"


def test_every_alert_and_recording_rule_expression_returns_data(stack: Stack) -> None:
    rules = rule_expressions()
    assert {r.get("alert") or r.get("record") for r in rules} == {
        "layer:neuronwatch_alive_neurons:ratio",
        "NeuronwatchDeadRatioHigh",
        "NeuronwatchLivenessCollapsing",
        "NeuronwatchExporterStale",
        "NeuronwatchNonFiniteActivations",
        "NeuronwatchHookErrors",
    }
    for rule in rules:
        expr = rule["expr"] if "record" in rule else without_threshold(rule["expr"])
        assert stack.prometheus.query(expr), rule


def test_prometheus_loads_the_rules_and_evaluates_them_healthily(stack: Stack) -> None:
    groups = stack.prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == 6
    assert all(rule["health"] == "ok" for rule in rules), rules
    # Nothing fires in a healthy minute of training (the dead-ratio alert waits 15 minutes).
    assert all(rule["state"] != "firing" for rule in rules if rule["type"] == "alerting")


def test_the_planted_dead_neurons_reach_prometheus(stack: Stack) -> None:
    [sample] = stack.prometheus.query(f'neuronwatch_dead_neurons{{layer="act2",run="{RUN}"}}')
    assert float(sample["value"][1]) >= DEAD_IN_ACT2  # training may kill more
    assert sample["metric"]["kind"] == "post"
    assert sample["metric"]["rank"] == RANK
    # Count and ratio of one scrape agree: 32 neurons.
    [neurons] = stack.prometheus.query(
        'neuronwatch_dead_neurons{layer="act2"} / neuronwatch_dead_ratio{layer="act2"}'
    )
    assert float(neurons["value"][1]) == 32
    [up] = stack.prometheus.query('up{job="neuronwatch"}')
    assert up["value"][1] == "1"


def test_prometheus_reads_the_openmetrics_types(stack: Stack) -> None:
    metadata = stack.prometheus.api("metadata")
    kinds = {name: entries[0]["type"] for name, entries in metadata.items()}
    assert kinds["neuronwatch_firing_frequency_ratio"] == "gaugehistogram"
    assert kinds["neuronwatch_rows_observed"] == "counter"
    assert kinds["neuronwatch_build"] == "info"
    assert metadata["neuronwatch_dead_ratio"][0]["unit"] == "ratio"


def test_the_text_exposition_passes_promtool(stack: Stack, tmp_path: Path) -> None:
    text = get(stack.server.url, accept="text/plain")
    assert "# TYPE neuronwatch_dead_ratio gauge" in text
    done = subprocess.run(
        [binary("promtool"), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == ""  # not even a lint warning
