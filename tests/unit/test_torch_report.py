"""A torch-produced report, wiring included, survives a save/load round trip exactly."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import neuronwatch
from neuronwatch import Report


def model_and_batches() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 6, 3),
            cact=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(6, 10),
            act=nn.Tanh(),
            out=nn.Linear(10, 2),
        )
    )
    with torch.no_grad():
        model.conv.bias[[1, 4]] = -50.0
        model.fc.bias[[2]] = 50.0  # tanh saturated at +1
        model.fc.bias[[7]] = -50.0  # tanh saturated at -1, and dead
    gen = torch.Generator().manual_seed(0)
    return model, [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(4)]


def test_save_load_round_trip_with_wiring(tmp_path: Path) -> None:
    model, batches = model_and_batches()
    with neuronwatch.watch(model, name="tiny", pre=True, compile=False, min_rows=8) as monitor:
        for x in batches[:2]:
            model(x)
        monitor.step(2)
        monitor.rollover()
        for x in batches[2:]:
            model(x)
        report = monitor.report(meta={"run": "round-trip"})
    assert report.window == "last"
    assert report.layers["cact"].rows == 2 * 4 * 6 * 6
    assert report.layers["cact"].dead_indices.tolist() == [1, 4]
    assert np.flatnonzero(report.layers["act"].saturated).tolist() == [2, 7]
    assert report.layers["act:pre"].kind == "pre"
    assert report.wiring["cact"].feature_axis == 1
    ratio = report.active_parameter_ratio()
    assert ratio is not None
    assert 0 < ratio < 1

    out = report.save(tmp_path / "report")
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.npz"]
    loaded = Report.load(out)

    assert loaded.equals(report)
    assert dict(loaded.wiring) == dict(report.wiring)
    assert loaded.wiring["cact"].produces == report.wiring["cact"].produces
    assert loaded.model == "tiny"
    assert loaded.step == 2
    assert dict(loaded.meta) == {"run": "round-trip"}
    assert loaded.active_parameter_ratio() == ratio
    for name, stats in report.layers.items():
        again = loaded.layers[name]
        assert again.kind == stats.kind
        assert again.config == stats.config
        assert again.partials.equals(stats.partials)
        assert again.dead_indices.tolist() == stats.dead_indices.tolist()
        assert np.array_equal(again.saturated, stats.saturated)

    summary = json.loads((out / "report.json").read_text())
    by_name = {layer["name"]: layer for layer in summary["layers"]}
    assert set(by_name) == {"cact", "cact:pre", "act", "act:pre"}
    assert by_name["cact"]["dead_indices"] == [1, 4]
    assert by_name["cact"]["wiring"]["produces"] == [
        {"name": "conv.weight", "shape": [6, 3, 3, 3], "axis": 0},
        {"name": "conv.bias", "shape": [6], "axis": 0},
    ]
    assert by_name["act"]["wiring"]["consumes"] == [
        {"name": "out.weight", "shape": [2, 10], "axis": 1}
    ]
    assert summary["totals"]["active_parameter_ratio"] == pytest.approx(ratio)


def test_reports_of_two_monitors_merge(tmp_path: Path) -> None:
    model, batches = model_and_batches()
    options = {"min_rows": 200, "histogram_every": 1}  # every forward in the histogram
    reports = []
    for part in (batches[:2], batches[2:]):
        with neuronwatch.watch(model, name="tiny", compile=False, **options) as monitor:
            for x in part:
                model(x)
            reports.append(Report.load(monitor.report().save(tmp_path / str(len(reports)))))
    # Each shard's tanh layer has 8 rows: unknown alone, unknown merged (16 < 200) too.
    assert reports[0].layers["act"].count("unknown") == reports[0].layers["act"].neurons
    assert reports[0].layers["cact"].rows == 2 * 4 * 36
    merged = reports[0].merged(reports[1])
    with neuronwatch.watch(model, name="tiny", compile=False, **options) as monitor:
        for x in batches:
            model(x)
        whole = monitor.report()
    assert merged.layers.keys() == whole.layers.keys()
    for name, stats in whole.layers.items():
        mine, theirs = merged.layers[name].partials, stats.partials
        assert mine.rows == theirs.rows
        for field in ("fired", "saturated", "nonfinite", "histogram", "max", "min"):
            assert np.array_equal(getattr(mine, field), getattr(theirs, field)), field
        # float32 activations are summed in float32 within one reduction (a staging ring may
        # hold several batches) and in float64 across reductions: float32 rounding apart.
        np.testing.assert_allclose(mine.sum, theirs.sum, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mine.abs_sum, theirs.abs_sum, rtol=1e-6, atol=1e-6)
    assert merged.layers["cact"].dead_indices.tolist() == [1, 4]
    assert dict(merged.wiring) == dict(whole.wiring)
