"""The bundled Grafana dashboard, provisioning and Prometheus alert rules: schema round trip with
grafana-foundation-sdk 11.x, promtool on the rules, and ``neuronwatch grafana export``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from neuronwatch.cli.grafana import (
    DEFAULT_DASHBOARDS_PATH,
    DEFAULT_PROMETHEUS_URL,
    bundled_files,
    grafana,
)
from neuronwatch.metric_families import FAMILIES

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "grafana"
DASHBOARDS = sorted((BUNDLE / "dashboards").glob("*.json"))
yaml = pytest.importorskip("yaml")


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_the_dashboard_is_a_fixed_point_of_the_grafana_11_schema(path: Path) -> None:
    sdk = pytest.importorskip("grafana_foundation_sdk")
    assert version("grafana-foundation-sdk").split("!")[-1].startswith("11.")
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    assert sdk is not None
    register_default_plugins()
    original = load(path)
    decoded = Dashboard.from_json(original)
    # Nothing unknown to the schema is dropped, nothing is missing that it would add.
    assert json.loads(json.dumps(decoded, cls=JSONEncoder)) == original
    assert {type(p.options).__module__.rsplit(".", 1)[-1] for p in decoded.panels} >= {
        "stat",
        "timeseries",
        "heatmap",
        "bargauge",
    }  # panel options were decoded by their panel plugins' schemas, not kept as raw dicts


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_the_dashboard_imports_anywhere(path: Path) -> None:
    dashboard = load(path)
    assert "__inputs" not in dashboard  # imports through UI, provisioning and HTTP API alike
    assert "id" not in dashboard  # the HTTP API would take an id as "update that dashboard"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "run", "rank", "layer"):
        assert variables[name]["type"] == "query"
        assert variables[name]["includeAll"]
        assert variables[name]["allValue"] == ".*"  # also matches series without the label
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_the_dashboard_has_the_panels_operators_need() -> None:
    panels = {p["title"]: p for p in load(BUNDLE / "dashboards" / "neuronwatch.json")["panels"]}
    kinds = {
        "Worst layer's dead ratio": "stat",
        "Dead ratio per layer": "timeseries",
        "Firing frequency": "heatmap",
        "Alive share per layer": "bargauge",
        "Dormant and saturated": "timeseries",
        "Neurons silent for more than $silent steps": "timeseries",
        "Rows/s per layer": "timeseries",
        "Staleness": "stat",
    }
    for title, kind in kinds.items():
        assert panels[title]["type"] == kind
    heatmap = panels["Firing frequency"]["targets"][0]
    assert heatmap["format"] == "heatmap"
    assert "_bucket" in heatmap["expr"]


def test_every_metric_a_dashboard_or_rule_queries_is_exported() -> None:
    exported = {name for f in FAMILIES for name in f.samples}
    exprs = [t["expr"] for path in DASHBOARDS for p in load(path)["panels"] for t in p["targets"]]
    groups = yaml.safe_load((BUNDLE / "alerts" / "neuronwatch.yml").read_text())["groups"]
    exprs += [rule["expr"] for group in groups for rule in group["rules"]]
    # Not recording rules (layer:neuronwatch_...:ratio): only what the exporters write.
    pattern = r"(?<![\w:])neuronwatch_[a-z_]+(?![\w:])"
    queried = {name for expr in exprs for name in re.findall(pattern, expr)}
    assert len(queried) > 10
    assert queried <= exported, queried - exported


def test_provisioning_files() -> None:
    [providers] = [
        yaml.safe_load(p.read_text())
        for p in (BUNDLE / "provisioning" / "dashboards").glob("*.yaml")
    ]
    [provider] = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == DEFAULT_DASHBOARDS_PATH
    [sources] = [
        yaml.safe_load(p.read_text())
        for p in (BUNDLE / "provisioning" / "datasources").glob("*.yaml")
    ]
    [source] = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == DEFAULT_PROMETHEUS_URL


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (tools/test-all.sh installs Debian's prometheus)")
    return subprocess.run([path, *args], capture_output=True, text=True)


def test_export_writes_the_bundle_and_promtool_accepts_its_rules(tmp_path: Path) -> None:
    out = tmp_path / "grafana"
    result = CliRunner().invoke(grafana, ["export", str(out)])
    assert result.exit_code == 0, result.output
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(str(p) for p in bundled_files())
    assert "alerts/neuronwatch_test.yml" in written
    for relative, data in bundled_files().items():
        assert (out / relative).read_bytes() == data
        assert (out / relative).read_bytes() == (BUNDLE / relative).read_bytes()
    checked = promtool("check", "rules", str(out / "alerts" / "neuronwatch.yml"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", str(out / "alerts" / "neuronwatch_test.yml"))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout

    again = CliRunner().invoke(grafana, ["export", str(out)])
    assert again.exit_code == 0
    assert "is up to date" in again.output


def test_export_sets_urls_and_refuses_to_overwrite_edits(tmp_path: Path) -> None:
    out = tmp_path / "g"
    # YAML-significant characters stay text: '#' would start a comment, ': ' a mapping.
    url, path = "https://prom.example:9090/#x", "/srv/my dash: 'a' #1"
    args = ["--prometheus-url", url, "--dashboards-path", path]
    assert CliRunner().invoke(grafana, ["export", str(out), *args]).exit_code == 0
    source = yaml.safe_load((out / "provisioning/datasources/neuronwatch.yaml").read_text())
    assert source["datasources"][0]["url"] == url
    provider = yaml.safe_load((out / "provisioning/dashboards/neuronwatch.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == path

    edited = out / "dashboards" / "neuronwatch.json"
    edited.write_text("{}")
    refused = CliRunner().invoke(grafana, ["export", str(out)])
    assert refused.exit_code == 1
    assert "already exist(s) with other content; pass --force" in refused.output
    assert edited.read_text() == "{}"  # nothing written: all or nothing
    forced = CliRunner().invoke(grafana, ["export", str(out), "--force"])
    assert forced.exit_code == 0
    assert load(edited)["uid"] == "neuronwatch-liveness"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prometheus-url", "prom:9090"], "must be an http:// or https:// URL"),
        (["--dashboards-path", "dashboards"], "must be an absolute path"),
        (["--dashboards-path", "/srv/a\nb: c"], "on one line"),
        (["--prometheus-url", "http://p:9090\nx: y"], "on one line"),
    ],
)
def test_export_rejects_bad_options_in_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(grafana, ["export", str(tmp_path / "g"), *args])
    assert result.exit_code == 1
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "g").exists()


def test_export_to_an_unwritable_place_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = CliRunner().invoke(grafana, ["export", str(blocker / "g")])
    assert result.exit_code == 1
    assert "cannot write the Grafana files under" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_every_alert_has_a_runbook_paragraph() -> None:
    docs = (REPO / "docs" / "metrics.md").read_text()
    groups = yaml.safe_load((BUNDLE / "alerts" / "neuronwatch.yml").read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    assert len(alerts) == 5
    for rule in alerts:
        name = rule["alert"]
        assert name.startswith("Neuronwatch")
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert set(rule["annotations"]) == {"summary", "description"}
        assert f"#### {name}\n" in docs
        assert f"docs/metrics.md#{name.lower()}" in rule["annotations"]["description"]
