"""Defects a hostile review of rescue found (issue 8), each pinned by the smallest case that
showed it: user folders deleted, outputs colliding with inputs, residual layers corrupted,
cancelling variances, thresholds of other families, tied safetensors, a bare string as globs."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from rescue_helpers import mlp_report, mlp_weights, save_safetensors
from safetensors.numpy import load_file

from neuronwatch import Engine, ParamRef, Report, Wiring
from neuronwatch.errors import ConfigError
from neuronwatch.rescue import lift, ops, prune, reinit
from neuronwatch.rescue.outputs import staged
from neuronwatch.rescue.thresholds import pre_threshold

SIZES = (8, 16, 12, 4)


@pytest.fixture
def files(tmp_path: Path) -> Path:
    save_safetensors(tmp_path / "m.safetensors", mlp_weights(SIZES))
    mlp_report(SIZES, {1: [1, 4], 2: [7]}).save(tmp_path / "report")
    return tmp_path


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- 1: a folder of the user's is never replaced -----------------------------------------------


def test_a_manifest_path_that_is_a_folder_is_refused_and_the_folder_kept(files: Path) -> None:
    kept = files / "manifests" / "old"
    kept.mkdir(parents=True)
    (kept / "run1.json").write_text("earlier run")
    before = _tree(files)
    with pytest.raises(ConfigError, match=r"--manifest .*manifests is a folder"):
        prune(
            files / "m.safetensors",
            files / "report",
            files / "o.safetensors",
            manifest=files / "manifests",
        )
    assert _tree(files) == before  # nothing deleted, nothing written
    assert not list(files.glob(".*"))


def test_an_out_that_is_a_folder_is_refused(files: Path) -> None:
    (files / "o.safetensors").mkdir()
    (files / "o.safetensors" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is a folder"):
        prune(files / "m.safetensors", files / "report", files / "o.safetensors")
    assert (files / "o.safetensors" / "keep.txt").read_text() == "mine"


def test_the_stage_itself_never_replaces_a_folder_with_contents(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="existing folder"), staged() as stage:
        stage.file(folder)
    with pytest.raises(ConfigError, match="existing folder"), staged() as stage:
        stage.directory(folder)
    # A folder that appears between staging and the commit is caught there too.
    with staged() as stage:
        stage.file(tmp_path / "late").write_text("output")
        (tmp_path / "late").mkdir()
        (tmp_path / "late" / "keep.txt").write_text("mine")
        with pytest.raises(ConfigError, match="existing folder"):
            stage.commit()
    assert (folder / "keep.txt").read_text() == "mine"
    assert (tmp_path / "late" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late", "mine"]


# -- 5: outputs never collide with each other or with an input --------------------------------


@pytest.mark.parametrize(
    ("out", "manifest", "message"),
    [
        ("o.safetensors", "o.safetensors", "--out and --manifest are the same file"),
        ("report/report.npz", None, "would overwrite the report's"),
        ("o.safetensors", "report/report.json", "--manifest .* would overwrite the report's"),
        ("o.safetensors", "m.safetensors", "--manifest .* would overwrite the input"),
        ("m.safetensors", None, "--out .* would overwrite the input"),
    ],
)
def test_colliding_outputs_are_refused_before_anything_is_written(
    files: Path, out: str, manifest: str | None, message: str
) -> None:
    before = _tree(files)
    with pytest.raises(ConfigError, match=message):
        prune(
            files / "m.safetensors",
            files / "report",
            files / out,
            manifest=None if manifest is None else files / manifest,
        )
    assert _tree(files) == before


# -- 2: neurons with a consumer but no producer (after a residual add) --------------------------


def _residual_report() -> Report:
    """``act`` reads the sum of two branches: its wiring has a consumer and no producer."""
    rng = np.random.default_rng(0)
    engine = Engine("residual")
    engine.add_layer("act", "ReLU")
    values = np.maximum(rng.normal(size=(1200, 16)), 0.0)
    values[:, [3, 5]] = 0.0
    engine.observe("act", values)
    engine.set_wiring(
        "act",
        Wiring(
            feature_axis=-1,
            producer=None,
            consumer="head",
            produces=(),
            consumes=(ParamRef("head.weight", (4, 16), 1),),
        ),
    )
    return Report.from_snapshot(engine.snapshot())


@pytest.mark.parametrize("op", [prune, reinit])
def test_a_layer_without_a_producer_is_skipped_not_half_edited(tmp_path: Path, op: object) -> None:
    weights = {
        "head.weight": np.ones((4, 16), np.float32),
        "head.bias": np.zeros(4, np.float32),
    }
    save_safetensors(tmp_path / "m.safetensors", weights)
    _residual_report().save(tmp_path / "r")
    assert callable(op)
    manifest = op(tmp_path / "m.safetensors", tmp_path / "r", tmp_path / "o.safetensors")
    assert [s["layer"] for s in manifest.skipped] == ["act"]
    assert "no single producer" in manifest.skipped[0]["reason"]
    assert manifest.widths == {}
    assert manifest.tensors == []
    written = load_file(tmp_path / "o.safetensors")
    np.testing.assert_array_equal(written["head.weight"], weights["head.weight"])


# -- 13: the lift's spread survives float32 sums of values far from zero -----------------------


def test_lift_spread_does_not_cancel_for_large_means() -> None:
    rng = np.random.default_rng(3)
    values = (-60.0 + 0.01 * rng.standard_normal((2000, 8))).astype(np.float32)
    # What an audit records: float32 sums per batch of 500, added up in float64.
    total = np.zeros(8)
    squares = np.zeros(8)
    for batch in np.split(values, 4):
        total += batch.sum(axis=0, dtype=np.float32)
        squares += (batch * batch).sum(axis=0, dtype=np.float32)
    rows = np.full(8, 2000, dtype=np.int64)
    shifts = ops.lift_shifts(rows, total, squares, values.max(axis=0).astype(np.float64), 0.0, 0.1)
    share = (values.astype(np.float64) + shifts > 0).mean(axis=0)
    assert ((share > 0.03) & (share < 0.25)).all(), share


# -- 8: lift aims at the pre-activation threshold of the layer's family -------------------------


def test_pre_thresholds_invert_each_family() -> None:
    assert pre_threshold("ReLU", 0.0) == 0.0
    assert pre_threshold("Sigmoid", 1e-3) == pytest.approx(math.log(1e-3 / (1 - 1e-3)))
    assert pre_threshold("Tanh", 1e-3) == pytest.approx(math.atanh(1e-3))
    gelu = pre_threshold("GELU", 1e-3)
    assert gelu is not None
    assert 0.5 * gelu * (1 + math.erf(gelu / math.sqrt(2))) == pytest.approx(1e-3, rel=1e-6)
    assert pre_threshold("Sigmoid", 1.5) is None  # outside its range: lift skips the layer


def test_lift_of_a_sigmoid_layer_fires_on_the_top_share_not_every_row(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pre_values = rng.normal(size=(1000, 16))
    pre_values[:, [2, 9]] -= 20.0
    engine = Engine("sigmoid")
    engine.add_layer("act1", "Sigmoid")
    engine.observe("act1", 1.0 / (1.0 + np.exp(-pre_values)))
    engine.add_layer("act1:pre", None, kind="pre")
    engine.observe("act1:pre", pre_values)
    wiring = Wiring(
        feature_axis=-1,
        producer="fc1",
        consumer="fc2",
        produces=(ParamRef("fc1.weight", (16, 8), 0), ParamRef("fc1.bias", (16,), 0)),
        consumes=(ParamRef("fc2.weight", (12, 16), 1),),
    )
    engine.set_wiring("act1", wiring)
    engine.set_wiring("act1:pre", wiring)
    report = Report.from_snapshot(engine.snapshot())
    assert report.layers["act1"].dead_indices.tolist() == [2, 9]
    weights = mlp_weights(SIZES)
    save_safetensors(tmp_path / "m.safetensors", weights)
    lift(tmp_path / "m.safetensors", report, tmp_path / "o.safetensors", top=0.1)
    shift = load_file(tmp_path / "o.safetensors")["fc1.bias"] - weights["fc1.bias"]
    fired = 1.0 / (1.0 + np.exp(-(pre_values[:, [2, 9]] + shift[[2, 9]]))) > 1e-3
    share = fired.mean(axis=0)
    assert ((share > 0.05) & (share < 0.2)).all(), share


# -- 9: a bare string is not a list of globs ---------------------------------------------------


def test_layers_given_as_a_string_are_refused(files: Path) -> None:
    with pytest.raises(ConfigError, match=r"not a string: layers=\['act1'\]"):
        reinit(files / "m.safetensors", files / "report", files / "o.safetensors", layers="act1")
    assert not (files / "o.safetensors").exists()


# -- 7: safetensors tied names and __metadata__ -------------------------------------------------


def _header(path: Path) -> dict[str, object]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header: dict[str, object] = json.loads(raw[8 : 8 + length])
    return header


def test_tied_safetensors_weights_are_skipped_and_the_metadata_kept(tmp_path: Path) -> None:
    sizes = (8, 16, 16, 16)
    weights = mlp_weights(sizes)
    # safetensors' save_model keeps one copy of tied weights and names the dropped one in
    # __metadata__: fc3.weight is fc2.weight.
    del weights["fc3.weight"]
    metadata = {"format": "pt", "fc3.weight": "fc2.weight"}
    from safetensors.numpy import save_file

    save_file(weights, str(tmp_path / "m.safetensors"), metadata=metadata)
    mlp_report(sizes, {1: [0, 5], 2: [3]}).save(tmp_path / "r")
    manifest = reinit(tmp_path / "m.safetensors", tmp_path / "r", tmp_path / "o.safetensors")
    reasons = {(s["layer"], s.get("param")): s["reason"] for s in manifest.skipped}
    assert "tied to 'fc3.weight'" in reasons[("act1", "fc2.weight")]
    assert ("act2", "fc2.weight") in reasons
    assert _header(tmp_path / "o.safetensors")["__metadata__"] == metadata
    written = load_file(tmp_path / "o.safetensors")
    np.testing.assert_array_equal(written["fc2.weight"], weights["fc2.weight"])
