"""The plan: a report that does not fit the checkpoint is refused before anything is written;
wiring that is not editable is skipped and said so; each op picks the right neurons."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from rescue_helpers import linear_wiring, mlp_report, mlp_weights, save_safetensors
from safetensors.numpy import load_file

from neuronwatch import ConfigError, ParamRef, Wiring
from neuronwatch.rescue import CheckpointError, Manifest, make_plan, prune, reinit, rescue
from neuronwatch.rescue.checkpoint import TensorInfo

SIZES = (8, 16, 12, 4)


def _infos(weights: dict[str, np.ndarray]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(k, v.shape, "F32") for k, v in weights.items()}


def _no_read(name: str) -> np.ndarray:
    raise AssertionError(f"nothing should be read, got {name}")


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_report_of_another_model_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "m.safetensors", mlp_weights((8, 20, 12, 4)))
    mlp_report(SIZES, {1: [0]}).save(tmp_path / "r")
    before = (tmp_path / "m.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match=r"'fc1.weight' of shape \(16, 8\).*\(20, 8\)"):
        prune(tmp_path / "m.safetensors", tmp_path / "r", tmp_path / "out.safetensors")
    assert _files(tmp_path) == ["m.safetensors", "r"]
    assert (tmp_path / "m.safetensors").read_bytes() == before


def test_missing_tensors_are_named_with_a_prefix_hint() -> None:
    weights = {f"module.{k}": v for k, v in mlp_weights(SIZES).items()}
    with pytest.raises(CheckpointError, match=r"module\.fc1\.weight.*a name prefix differs"):
        make_plan("prune", mlp_report(SIZES, {1: [0]}), _infos(weights), _no_read)


def test_pre_layers_are_statistics_not_targets() -> None:
    report = mlp_report(SIZES, {1: [0, 3]}, pre=True)
    plan = make_plan("strip", report, _infos(mlp_weights(SIZES)), _no_read)
    assert [layer.layer for layer in plan.layers] == ["act1"]
    assert plan.layers[0].neurons.tolist() == [0, 3]
    with pytest.raises(ConfigError, match=r"matches no layer.*act1, act2"):
        make_plan("strip", report, _infos(mlp_weights(SIZES)), _no_read, layers=["*:pre"])


def test_a_parameter_produced_by_two_layers_is_skipped_and_said_so(tmp_path: Path) -> None:
    # act2 claims to be produced by fc1's bias as well (as a shared parameter would be).
    sizes = (8, 16, 16, 4)
    shared = Wiring(
        feature_axis=-1,
        producer="fc2",
        consumer="fc3",
        produces=(ParamRef("fc1.bias", (16,), 0), ParamRef("fc2.weight", (16, 16), 0)),
        consumes=(ParamRef("fc3.weight", (4, 16), 1),),
    )
    report = mlp_report(sizes, {1: [0], 2: [1]}, wiring={"act2": shared})
    weights = mlp_weights(sizes)
    save_safetensors(tmp_path / "m.safetensors", weights)
    report.save(tmp_path / "r")
    manifest = reinit(tmp_path / "m.safetensors", tmp_path / "r", tmp_path / "o.safetensors")
    skipped = {(s["layer"], s.get("param")): s["reason"] for s in manifest.skipped}
    assert "produced by several layers (act1, act2)" in skipped[("act1", "fc1.bias")]
    assert ("act2", "fc1.bias") in skipped
    assert manifest.layers == []
    written = Manifest.load(tmp_path / "o.safetensors.manifest.json")
    assert written.skipped == manifest.skipped
    new = load_file(str(tmp_path / "o.safetensors"))
    np.testing.assert_array_equal(new["fc1.weight"], weights["fc1.weight"])


def test_wiring_whose_axis_disagrees_with_the_layer_is_not_editable() -> None:
    wrong = linear_wiring("fc1", "fc2", 16, 8, 12)
    wrong = Wiring(produces=(ParamRef("fc1.weight", (16, 8), 1),), consumes=wrong.consumes)
    report = mlp_report(SIZES, {1: [2]}, wiring={"act1": wrong})
    plan = make_plan("reinit", report, _infos(mlp_weights(SIZES)), _no_read)
    assert plan.steps == {}
    assert "axis 1 has size 8 but layer 'act1' has 16 neurons" in plan.skipped[0].reason


def test_tied_checkpoint_tensors_are_not_editable() -> None:
    infos = _infos(mlp_weights(SIZES))
    infos["fc2.weight"] = TensorInfo("fc2.weight", (12, 16), "F32", tied=True)
    plan = make_plan("reinit", mlp_report(SIZES, {1: [2]}), infos, _no_read)
    assert plan.skipped[0].param == "fc2.weight"
    assert "tied" in plan.skipped[0].reason


def test_prune_folds_a_saturated_constant_into_the_consumer_bias(tmp_path: Path) -> None:
    weights = mlp_weights(SIZES)
    save_safetensors(tmp_path / "m.safetensors", weights)
    # act1 is tanh: neuron 4 saturated at exactly 1.0; neuron 6 saturated near -1 but its
    # value still varies in the last digits, so it is not constant.
    report = mlp_report(SIZES, {1: [6]}, activation="Tanh", constant={1: {4: 1.0}})
    report.save(tmp_path / "r")
    manifest = prune(
        tmp_path / "m.safetensors",
        tmp_path / "r",
        tmp_path / "p.safetensors",
        state="saturated",
        layers=["act1"],
    )
    new = load_file(str(tmp_path / "p.safetensors"))
    assert new["fc1.weight"].shape == (15, 8)
    np.testing.assert_allclose(
        new["fc2.bias"], weights["fc2.bias"] + weights["fc2.weight"][:, 4], rtol=1e-6
    )
    assert manifest.layers[0]["constants"] == [1.0]
    assert manifest.skipped[0]["neurons"] == [6]
    assert "not constant" in manifest.skipped[0]["reason"]


def test_prune_never_removes_a_whole_layer() -> None:
    report = mlp_report(SIZES, {2: list(range(12))})
    plan = make_plan("prune", report, _infos(mlp_weights(SIZES)), _no_read)
    assert plan.steps == {}
    assert plan.skipped[0].reason == "would remove every neuron of the layer"


def test_lift_needs_pre_activation_statistics() -> None:
    with pytest.raises(ConfigError, match=r"pre=True"):
        make_plan("lift", mlp_report(SIZES, {1: [0]}), _infos(mlp_weights(SIZES)), _no_read)
    plan = make_plan(
        "lift", mlp_report(SIZES, {1: [0]}, pre=True), _infos(mlp_weights(SIZES)), _no_read
    )
    assert list(plan.steps) == ["fc1.bias"]
    # Pre-activations ~ N(-20, 1): the shift to fire on the top 10 % is about 20 - 1.28.
    assert plan.layers[0].shifts is not None
    assert plan.layers[0].shifts[0] == pytest.approx(20 - 1.2816, abs=0.15)


@pytest.mark.parametrize(
    ("op", "options", "message"),
    [
        ("prune", {"state": "dormant"}, "prune acts on dead, saturated"),
        ("strip", {"fraction": 0.0}, "--fraction"),
        ("lift", {"top": 1.5}, "--top"),
        ("shrink", {}, "unknown rescue op"),
    ],
)
def test_bad_options_are_refused(
    tmp_path: Path, op: str, options: dict[str, object], message: str
) -> None:
    save_safetensors(tmp_path / "m.safetensors", mlp_weights(SIZES))
    mlp_report(SIZES, {1: [0]}).save(tmp_path / "r")
    with pytest.raises(ConfigError, match=message):
        rescue(op, tmp_path / "m.safetensors", tmp_path / "r", tmp_path / "o", **options)
    assert _files(tmp_path) == ["m.safetensors", "r"]


def test_dry_run_writes_nothing_and_describes_everything(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "m.safetensors", mlp_weights(SIZES))
    mlp_report(SIZES, {1: [0, 2], 2: [5]}).save(tmp_path / "r")
    manifest = prune(
        tmp_path / "m.safetensors", tmp_path / "r", tmp_path / "o.safetensors", dry_run=True
    )
    assert _files(tmp_path) == ["m.safetensors", "r"]
    assert manifest.dry_run
    assert manifest.widths == {"act1": 14, "act2": 11}
    shapes = {t["name"]: t["new_shape"] for t in manifest.tensors}
    assert shapes["fc2.weight"] == [11, 14]
    assert manifest.outputs == []


def test_the_input_is_never_an_output(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "m.safetensors", mlp_weights(SIZES))
    mlp_report(SIZES, {1: [0]}).save(tmp_path / "r")
    with pytest.raises(ConfigError, match="would overwrite the input"):
        prune(tmp_path / "m.safetensors", tmp_path / "r", tmp_path / "m.safetensors")
    with pytest.raises(ConfigError, match="would overwrite the input"):
        prune(
            tmp_path / "m.safetensors",
            tmp_path / "r",
            tmp_path / "o",
            manifest=tmp_path / "m.safetensors",
        )


def test_an_existing_folder_is_never_replaced_by_a_file(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "m.safetensors", mlp_weights(SIZES))
    mlp_report(SIZES, {1: [0]}).save(tmp_path / "r")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is a folder"):
        prune(tmp_path / "m.safetensors", tmp_path / "r", tmp_path / "keep")
    assert (tmp_path / "keep" / "notes.txt").read_text() == "mine"
