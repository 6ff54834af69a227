"""Reports round-trip exactly through report.json + report.npz; bad files give clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from neuronwatch import Engine, ParamRef, Report, ReportError, Wiring


def make_report(window: str = "lifetime") -> Report:
    rng = np.random.default_rng(7)
    engine = Engine("digits-mlp", min_rows=50)
    engine.add_layer("fc1.act", "ReLU")
    engine.add_layer("fc2.act", "Tanh", tau=0.05)
    acts = np.maximum(rng.normal(size=(200, 6)), 0)
    acts[:, [0, 4]] = 0.0
    acts[3, 1] = np.nan
    engine.observe("fc1.act", acts)
    engine.observe("fc2.act", np.tanh(rng.normal(size=(200, 3)) * 5))
    engine.set_wiring(
        "fc1.act",
        Wiring(
            -1,
            "fc1",
            "fc2",
            (ParamRef("fc1.weight", (6, 8), 0),),
            (ParamRef("fc2.weight", (3, 6), 1),),
        ),
    )
    return Report.from_snapshot(engine.snapshot(), window, meta={"dataset": "synthetic"})


def test_round_trip_is_exact(tmp_path: Path) -> None:
    report = make_report()
    report.save(tmp_path / "r")
    loaded = Report.load(tmp_path / "r")
    assert loaded.equals(report)
    assert loaded.layers["fc1.act"].dead_indices.tolist() == [0, 4]
    assert loaded.layers["fc2.act"].config.tau == 0.05
    assert loaded.meta == {"dataset": "synthetic"}
    assert loaded.active_parameter_ratio() == report.active_parameter_ratio()
    np.testing.assert_array_equal(
        loaded.layers["fc1.act"].frequency, report.layers["fc1.act"].frequency
    )


def test_json_carries_the_documented_fields(tmp_path: Path) -> None:
    make_report().save(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["schema_version"] == 2
    assert data["model"] == "digits-mlp"
    assert data["window"] == "lifetime"
    layer = data["layers"][0]
    for key in (
        "name",
        "kind",
        "activation",
        "neurons",
        "rows",
        "dead",
        "dead_ratio",
        "leaking",
        "leaking_ratio",
        "unknown",
        "asleep",
        "asleep_ratio",
        "active",
        "dormant",
        "saturated",
        "saturated_ratio",
        "dead_indices",
        "wiring",
        "thresholds",
    ):
        assert key in layer, key
    assert layer["dead_indices"] == [0, 4]
    assert layer["nonfinite"] == 1
    assert layer["thresholds"]["min_rows"] == 50
    assert layer["wiring"]["produces"][0] == {"name": "fc1.weight", "shape": [6, 8], "axis": 0}
    assert data["totals"]["dead"] == 2
    # Strict JSON: infinities are written as strings, not as bare Infinity tokens.
    json.loads((tmp_path / "report.json").read_text(), parse_constant=_reject)
    npz = np.load(tmp_path / "report.npz")
    assert npz["fc1.act/is_dead"].tolist() == [True, False, False, False, True, False]
    assert npz["fc2.act/saturated"].dtype == np.int64  # the count, not the is_saturated mask
    assert npz["fc1.act/last_fired_step"].tolist() == [-1, 0, 0, 0, -1, 0]


def _reject(token: str) -> None:
    raise AssertionError(f"non-standard JSON token {token}")


def test_load_errors_name_the_file_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match=r"report\.json not found"):
        Report.load(tmp_path)
    make_report().save(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    data["layers"][0]["dead"] = 5
    (tmp_path / "report.json").write_text(json.dumps(data))
    with pytest.raises(ReportError, match="says 5 dead neurons"):
        Report.load(tmp_path)
    data["schema_version"] = 99
    (tmp_path / "report.json").write_text(json.dumps(data))
    with pytest.raises(ReportError, match="schema_version 99"):
        Report.load(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        Report.load(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReportError, match="not a directory"):
        make_report().save(tmp_path / "file")


def test_auto_window_prefers_last_complete() -> None:
    engine = Engine("m", min_rows=1)
    engine.observe("a", np.ones((3, 2)))
    assert Report.from_snapshot(engine.snapshot()).window == "lifetime"
    engine.rollover()
    engine.observe("a", np.ones((5, 2)))
    report = Report.from_snapshot(engine.snapshot())
    assert report.window == "last"
    assert report.layers["a"].rows == 3


def test_loaded_and_merged_reports_are_read_only(tmp_path: Path) -> None:
    make_report().save(tmp_path)
    loaded = Report.load(tmp_path)
    for report in (loaded, loaded.merged(loaded)):
        with pytest.raises(ValueError, match="read-only"):
            report.layers["fc1.act"].partials.fired[0] = 7
