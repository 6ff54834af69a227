"""Rescue on ONNX models exported from the torch test models: initializers (inline and in
external data) edited per a report's wiring, prune's smaller graph, swap's activations, and
hostile external data refused.

The ONNX adapter's own wiring is not in yet: these reports are the torch audits with each
parameter renamed to the initializer that holds it (found by value, transposed or not), which
is what an ONNX audit's wiring states.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from rescue_models import LAYERS, audit, build, data, plant_dead_by_bias
from torch import nn

from neuronwatch import ParamRef, Report, Wiring
from neuronwatch.rescue import CheckpointError, prune, reinit, swap_onnx

# torch's legacy exporter keeps the initializer names of the state_dict; it warns about itself.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def export(model: nn.Module, x: torch.Tensor, path: Path, opset: int | None = None) -> Path:
    model.eval()
    extra: dict[str, Any] = {} if opset is None else {"opset_version": opset}
    torch.onnx.export(
        model,
        (x[:2],),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}},
        **extra,
    )
    return path


def run(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result: np.ndarray = session.run(None, {"x": x.numpy()})[0]
    return result


def onnx_report(report: Report, model: nn.Module, path: Path) -> Report:
    """``report`` with every wired parameter renamed to the ONNX initializer holding it."""
    graph = onnx.load(str(path)).graph
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    params = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    def ref(old: ParamRef) -> ParamRef:
        value = params[old.name]
        for name, array in arrays.items():
            if array.shape == value.shape and np.array_equal(array, value):
                return ParamRef(name, old.shape, old.axis)
            if array.ndim == 2 and array.shape == value.T.shape and np.array_equal(array, value.T):
                return ParamRef(name, array.shape, 1 - old.axis)
        raise AssertionError(f"no initializer holds {old.name}")

    wiring = {
        layer: Wiring(
            w.feature_axis,
            w.producer,
            w.consumer,
            tuple(ref(r) for r in w.produces),
            tuple(ref(r) for r in w.consumes),
        )
        for layer, w in report.wiring.items()
    }
    return Report(report.model, report.window, report.step, report.layers, wiring, report.meta)


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_prune_shrinks_the_onnx_graph_and_keeps_its_outputs(kind: str, tmp_path: Path) -> None:
    model = build(kind)
    plant_dead_by_bias(model, kind)
    x = data(kind)
    report = audit(model, x)
    path = export(model, x, tmp_path / "model.onnx")
    onnx_report(report, model, path).save(tmp_path / "report")
    manifest = prune(path, tmp_path / "report", tmp_path / "pruned.onnx")
    planted = {layer: len(n) for layer, _, n in LAYERS[kind]}
    widths = {"mlp": {"act1": 32, "act2": 24}, "transformer": dict.fromkeys(planted, 32)}[kind]
    assert manifest.widths == {layer: widths[layer] - planted[layer] for layer in planted}
    np.testing.assert_allclose(run(tmp_path / "pruned.onnx", x), run(path, x), atol=1e-5, rtol=0)
    assert (tmp_path / "pruned.onnx").stat().st_size < path.stat().st_size
    assert [n.op_type for n in onnx.load(str(tmp_path / "pruned.onnx")).graph.node] == [
        n.op_type for n in onnx.load(str(path)).graph.node
    ]


def test_the_torch_report_names_gemm_initializers_directly(tmp_path: Path) -> None:
    # The legacy exporter keeps Linear weights as "fc1.weight" in Gemm(transB=1): the torch
    # audit's wiring applies to the ONNX file as it is.
    model = build("mlp")
    plant_dead_by_bias(model, "mlp")
    x = data("mlp")
    audit(model, x).save(tmp_path / "report")
    path = export(model, x, tmp_path / "model.onnx")
    reinit(path, tmp_path / "report", tmp_path / "new.onnx")
    np.testing.assert_allclose(run(tmp_path / "new.onnx", x), run(path, x), atol=1e-5, rtol=0)


def test_a_report_whose_initializers_were_folded_away_is_refused(tmp_path: Path) -> None:
    # Exported in eval mode, BatchNorm is folded into the conv: "bn1.weight" is gone.
    model = build("conv")
    x = data("conv")
    audit(model, x).save(tmp_path / "report")
    path = export(model, x, tmp_path / "model.onnx")
    with pytest.raises(CheckpointError, match=r"bn1.*was the report taken on this model"):
        prune(path, tmp_path / "report", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def external(path: Path, location: str = "model.onnx.data") -> Path:
    model = onnx.load(str(path))
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )
    return path


def test_external_data_is_read_edited_and_written_beside_the_new_model(tmp_path: Path) -> None:
    model = build("mlp")
    plant_dead_by_bias(model, "mlp")
    x = data("mlp")
    audit(model, x).save(tmp_path / "report")
    source = tmp_path / "in"
    source.mkdir()
    path = external(export(model, x, source / "model.onnx"))
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    manifest = reinit(path, tmp_path / "report", tmp_path / "out" / "new.onnx")
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before
    assert sorted(os.listdir(tmp_path / "out")) == [
        "new.onnx",
        "new.onnx.data",
        "new.onnx.manifest.json",
    ]
    assert [Path(d["path"]).name for d in manifest.inputs] == ["model.onnx", "model.onnx.data"]
    assert [Path(d["path"]).name for d in manifest.outputs] == ["new.onnx", "new.onnx.data"]
    np.testing.assert_allclose(
        run(tmp_path / "out" / "new.onnx", x), run(path, x), atol=1e-5, rtol=0
    )
    new = onnx.load(str(tmp_path / "out" / "new.onnx"), load_external_data=False)
    locations = {
        e.value for t in new.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"new.onnx.data"}


def _point(path: Path, location: str) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    path.write_bytes(model.SerializeToString())


@pytest.mark.parametrize("where", ["../secret.bin", "/etc/passwd", "link.bin"])
def test_external_data_outside_the_models_folder_is_refused(tmp_path: Path, where: str) -> None:
    model = build("mlp")
    x = data("mlp")
    audit(model, x).save(tmp_path / "report")
    folder = tmp_path / "in"
    folder.mkdir()
    path = external(export(model, x, folder / "model.onnx"))
    (tmp_path / "secret.bin").write_bytes((folder / "model.onnx.data").read_bytes())
    (folder / "link.bin").symlink_to(tmp_path / "secret.bin")
    _point(path, where)
    with pytest.raises(CheckpointError, match="outside the model's folder"):
        reinit(path, tmp_path / "report", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_truncated_external_data_and_models_are_refused(tmp_path: Path) -> None:
    model = build("mlp")
    x = data("mlp")
    audit(model, x).save(tmp_path / "report")
    path = external(export(model, x, tmp_path / "model.onnx"))
    data_file = tmp_path / "model.onnx.data"
    data_file.write_bytes(data_file.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated data file"):
        reinit(path, tmp_path / "report", tmp_path / "out.onnx")
    export(model, x, tmp_path / "inline.onnx")
    raw = (tmp_path / "inline.onnx").read_bytes()
    (tmp_path / "cut.onnx").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        reinit(tmp_path / "cut.onnx", tmp_path / "report", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize(
    ("to", "opset", "node"),
    [("leaky_relu", None, "LeakyRelu"), ("gelu", None, "Gelu"), ("gelu", 17, "Erf")],
)
def test_swap_rewrites_relu_nodes_for_the_models_opset(
    tmp_path: Path, to: str, opset: int | None, node: str
) -> None:
    model = build("mlp")
    x = data("mlp")
    path = export(model, x, tmp_path / "model.onnx", opset)
    manifest = swap_onnx(path, tmp_path / "swapped.onnx", to=to, alpha=0.2)
    assert manifest.notes["swapped_nodes"] == ["/act1/Relu", "/act2/Relu"]
    graph = onnx.load(str(tmp_path / "swapped.onnx")).graph
    assert node in [n.op_type for n in graph.node]
    assert "Relu" not in [n.op_type for n in graph.node]
    activation = nn.LeakyReLU(0.2) if to == "leaky_relu" else nn.GELU()
    model.act1, model.act2 = activation, activation
    expected = model(x).detach().numpy()
    np.testing.assert_allclose(run(tmp_path / "swapped.onnx", x), expected, atol=1e-5, rtol=0)


def test_swap_with_the_tanh_approximation_on_an_old_opset(tmp_path: Path) -> None:
    model = build("mlp")
    x = data("mlp")
    path = export(model, x, tmp_path / "model.onnx", 14)
    swap_onnx(path, tmp_path / "swapped.onnx", to="gelu", approximate="tanh", nodes=["/act2/*"])
    model.act2 = nn.GELU(approximate="tanh")
    np.testing.assert_allclose(
        run(tmp_path / "swapped.onnx", x), model(x).detach().numpy(), atol=1e-5, rtol=0
    )


# -- with the ONNX adapter's own audit -----------------------------------------------------------


def onnx_audit(path: Path, x: torch.Tensor) -> Report:
    from neuronwatch.adapters.onnx import audit as run_audit

    batches = [{"x": chunk.numpy()} for chunk in x.split(500)]
    report: Report = run_audit(path, batches, pre=True, min_rows=100)
    return report


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_an_onnx_audit_drives_prune_and_reinit_of_its_own_file(kind: str, tmp_path: Path) -> None:
    # The transformer's Linear weights are stored transposed under made-up names: the audit
    # reports them under their torch names and records the initializers in its meta.
    model = build(kind)
    plant_dead_by_bias(model, kind)
    x = data(kind)
    path = export(model, x, tmp_path / "model.onnx")
    report = onnx_audit(path, x)
    assert {n: s.dead_indices.tolist() for n, s in report.layers.items() if s.kind == "post"} == {
        layer: neurons for layer, _, neurons in LAYERS[kind]
    }
    report.save(tmp_path / "report")
    manifest = prune(path, tmp_path / "report", tmp_path / "pruned.onnx")
    widths = {"mlp": [32, 24], "transformer": [32, 32]}[kind]
    assert manifest.widths == {
        layer: width - len(neurons)
        for (layer, _, neurons), width in zip(LAYERS[kind], widths, strict=True)
    }
    np.testing.assert_allclose(run(tmp_path / "pruned.onnx", x), run(path, x), atol=1e-5, rtol=0)
    assert (tmp_path / "pruned.onnx").stat().st_size < path.stat().st_size
    reinit(path, tmp_path / "report", tmp_path / "reinit.onnx")
    np.testing.assert_allclose(run(tmp_path / "reinit.onnx", x), run(path, x), atol=1e-5, rtol=0)
    after = onnx_audit(tmp_path / "reinit.onnx", x)
    assert after.count("dead") == 0 < report.count("dead")


def test_an_onnx_audit_with_pre_layers_drives_lift(tmp_path: Path) -> None:
    from neuronwatch.rescue import lift

    model = build("transformer")
    plant_dead_by_bias(model, "transformer")
    x = data("transformer")
    path = export(model, x, tmp_path / "model.onnx")
    onnx_audit(path, x).save(tmp_path / "report")
    lift(path, tmp_path / "report", tmp_path / "lifted.onnx")
    after = onnx_audit(tmp_path / "lifted.onnx", x)
    first = after.layers["layers.0.activation"]
    assert first.count("dead") == 0
    assert 0.03 < first.frequency[[4, 9, 30]].min() <= first.frequency[[4, 9, 30]].max() < 0.25


def test_a_layer_with_parameters_the_audit_left_out_is_skipped(tmp_path: Path) -> None:
    model = build("mlp")
    plant_dead_by_bias(model, "mlp")
    x = data("mlp")
    path = export(model, x, tmp_path / "model.onnx")
    report = onnx_audit(path, x)
    meta = {
        **report.meta,
        "onnx": {**report.meta["onnx"], "not_editable": {"act2": ["fc3.weight"]}},
    }
    Report(report.model, report.window, report.step, report.layers, report.wiring, meta).save(
        tmp_path / "report"
    )
    manifest = reinit(path, tmp_path / "report", tmp_path / "out.onnx")
    assert [layer["layer"] for layer in manifest.layers] == ["act1"]
    assert manifest.skipped[0]["layer"] == "act2"
    assert "fc3.weight" in manifest.skipped[0]["reason"]


@pytest.mark.parametrize("kind", ["conv", "transformer"])
def test_the_dynamo_exporters_files_are_pruned_through_their_audit(
    kind: str, tmp_path: Path
) -> None:
    # torch's default exporter writes external data and names transposed weights "val_<n>";
    # the conv net keeps its BatchNorm, whose running statistics are pruned with it.
    model = build(kind).eval()
    plant_dead_by_bias(model, kind)
    x = data(kind)
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        model,
        (x[:2],),
        str(path),
        dynamo=True,
        input_names=["x"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
    )
    assert (tmp_path / "model.onnx.data").exists()
    onnx_audit(path, x).save(tmp_path / "report")
    manifest = prune(path, tmp_path / "report", tmp_path / "out" / "pruned.onnx")
    assert manifest.neurons == sum(len(n) for _, _, n in LAYERS[kind])
    assert manifest.skipped == []
    np.testing.assert_allclose(
        run(tmp_path / "out" / "pruned.onnx", x), run(path, x), atol=1e-5, rtol=0
    )
