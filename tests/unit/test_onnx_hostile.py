"""The ONNX adapter against hostile inputs (issue 6's audit): overflowing sums, scalar
activations, a caller's session reused, model-local functions, decomposed GELUs, the
``run_with_ort_values`` path."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from neuronwatch.adapters.onnx import audit, watch_session
from onnx import helper
from onnx_graphs import FLOAT, init, mlp, model, tensor


def _relu(shape: list[object] | None = None) -> onnx.ModelProto:
    return model(
        [helper.make_node("Relu", ["x"], ["y"], name="/act/Relu")],
        [tensor("x", FLOAT, shape or ["b", 3])],
        [tensor("y", FLOAT, None)],
    )


def test_an_overflowing_run_neither_wedges_serving_nor_poisons_the_sums() -> None:
    # Two finite 3e38 values sum to inf in float32; inf - inf was NaN in the "saturated"
    # zeros, which Partials refused at every later flush: the layer never reported again.
    session = watch_session(_relu(), provider="cpu", flush_interval=None)
    big = np.ones((2, 3), np.float32)
    big[:, 1] = 3e38
    session.run(None, {"x": big})
    for _ in range(3):
        session.run(None, {"x": np.ones((10, 3), np.float32)})
    stats = session.monitor.report().layers["act"]
    assert stats.rows == 32
    assert stats.partials.fired.tolist() == [32, 32, 32]
    assert stats.partials.saturated.tolist() == [0, 0, 0]
    assert stats.partials.nonfinite.tolist() == [0, 0, 0]
    # Overflowed in float32, so taken again in float64: the true sum, not inf.
    assert stats.partials.abs_sum[1] == pytest.approx(2 * float(np.float32(3e38)) + 30)
    assert stats.partials.abs_sum[0] == 32
    assert session.monitor.snapshot().errors.get("act", 0) == 0


def test_a_run_with_nan_sums_is_refused_alone_and_counted() -> None:
    # A run whose sums cannot be partials is dropped for that layer and counted as its error;
    # the runs before and after stay in the statistics.
    session = watch_session(_relu(), provider="cpu", flush_interval=None)
    session.run(None, {"x": np.ones((4, 3), np.float32)})
    real = session.source.record

    names = session.source.output_names()

    def nan_sums(results: list[np.ndarray], histogram: bool) -> dict[str, Exception]:
        poisoned = [
            np.full_like(r, np.nan) if name.endswith("/sum") else r
            for name, r in zip(names, results, strict=True)
        ]
        return real(poisoned, histogram)

    session.source.record = nan_sums  # type: ignore[method-assign]
    session.run(None, {"x": np.ones((5, 3), np.float32)})
    session.source.record = real  # type: ignore[method-assign]
    session.run(None, {"x": np.ones((6, 3), np.float32)})
    assert session.monitor.report().layers["act"].rows == 10
    assert session.monitor.snapshot().errors["act"] == 1


def test_a_scalar_activation_is_one_neuron_not_a_crash() -> None:
    # tanh of a scalar initializer gates the input: rank 0, a single neuron over one row.
    built = model(
        [
            helper.make_node("Tanh", ["g"], ["tg"], name="/gate/Tanh"),
            helper.make_node("Mul", ["x", "tg"], ["h"]),
            helper.make_node("Relu", ["h"], ["y"], name="/act/Relu"),
        ],
        [tensor("x", FLOAT, ["b", 4])],
        [tensor("y", FLOAT, None)],
        [init("g", np.float32(0.3))],
    )
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    report = audit(built, [{"x": x}, {"x": x}], provider="cpu")
    gate = report.layers["gate"]
    assert (gate.neurons, gate.rows, gate.partials.fired.tolist()) == (1, 2, [2])
    assert report.layers["act"].rows == 100


def test_audit_on_a_callers_session_leaves_it_open_and_its_monitor_alone() -> None:
    session = watch_session(mlp(), provider="cpu", flush_interval=None)
    x = np.random.default_rng(1).standard_normal((7, 4)).astype(np.float32)
    session.run(None, {"x": x})
    first = audit("ignored", [{"x": x}, {"x": x}], session=session)
    second = audit("ignored", [{"x": x}], session=session)
    assert first.layers["act"].rows == 14
    assert second.layers["act"].rows == 7
    out = session.run(None, {"x": x})  # still open, still watched
    assert out[0].shape == (7, 3)
    assert session.monitor.report().layers["act"].rows == 14


def test_run_with_ort_values_returns_the_models_outputs_and_records() -> None:
    session = watch_session(mlp(), provider="cpu", flush_interval=None)
    x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
    plain = ort.InferenceSession(mlp().SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run_with_ort_values(None, {"x": ort.OrtValue.ortvalue_from_numpy(x)})
    assert len(values) == len(plain.get_outputs())
    np.testing.assert_allclose(values[0].numpy(), plain.run(None, {"x": x})[0], rtol=1e-6)
    assert session.monitor.report().layers["act"].rows == 5
    with pytest.raises(AttributeError, match="does not support io_binding"):
        session.io_binding()


def test_activations_inside_model_local_functions_are_watched() -> None:
    # torch's export_modules_as_functions puts whole blocks in FunctionProtos.
    block = helper.make_function(
        "local",
        "Block",
        ["a"],
        ["b"],
        [helper.make_node("Relu", ["a"], ["b"], name="/block/act/Relu")],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Block", ["x"], ["h"], domain="local", name="b1"),
            helper.make_node("Sigmoid", ["h"], ["y"], name="/out/Sigmoid"),
        ],
        "g",
        [tensor("x", FLOAT, ["b", 3])],
        [tensor("y", FLOAT, None)],
    )
    built = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[block],
    )
    built.ir_version = 8
    x = np.array([[1.0, -1.0, 2.0]] * 4, np.float32)
    session = watch_session(built, provider="cpu", flush_interval=None)
    out = session.run(None, {"x": x})
    np.testing.assert_allclose(out[0], 1 / (1 + np.exp(-np.maximum(x, 0))), rtol=1e-6)
    report = session.monitor.report()
    assert len(report.layers) == 2
    relu = next(s for name, s in report.layers.items() if name != "out")
    assert relu.partials.fired.tolist() == [4, 0, 4]


def _tanh_gelu(x: str, out: str, tag: str) -> list[onnx.NodeProto]:
    """``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))`` as old exporters wrote it."""
    n = helper.make_node
    return [
        n("Mul", [x, x], [f"{tag}sq"]),
        n("Mul", [x, f"{tag}sq"], [f"{tag}cube"]),
        n("Mul", ["c044", f"{tag}cube"], [f"{tag}cubic"]),
        n("Add", [x, f"{tag}cubic"], [f"{tag}inner"]),
        n("Mul", ["c079", f"{tag}inner"], [f"{tag}scaled"]),
        n("Tanh", [f"{tag}scaled"], [f"{tag}t"], name=f"/{tag}/Tanh"),
        n("Add", [f"{tag}t", "one"], [f"{tag}onep"]),
        n("Mul", [x, f"{tag}onep"], [f"{tag}xo"]),
        n("Mul", [f"{tag}xo", "half"], [out]),
    ]


def test_stacked_tanh_gelus_are_each_rooted_at_their_own_input() -> None:
    # Two decomposed tanh-GELUs in a row, a Linear between: the second must be matched at its
    # own x (fc's output), not at an ancestor the first GELU's nodes also reach.
    w = np.eye(3, dtype=np.float32) * 2
    nodes = [
        *_tanh_gelu("x", "g1", "g1"),
        helper.make_node("MatMul", ["g1", "w"], ["h"], name="/fc/MatMul"),
        *_tanh_gelu("h", "y", "g2"),
    ]
    constants = [
        init("c044", np.float32(0.044715)),
        init("c079", np.float32(np.sqrt(2 / np.pi))),
        init("one", np.float32(1.0)),
        init("half", np.float32(0.5)),
        init("w", w),
    ]
    built = model(nodes, [tensor("x", FLOAT, ["b", 3])], [tensor("y", FLOAT, None)], constants)
    session = watch_session(built, provider="cpu", flush_interval=None)
    sites = session.plan.meta()["sites"]
    assert sorted(sites.values()) == ["GELU(tanh)", "GELU(tanh)"]
    x = np.array([[1.0, -3.0, 0.5]] * 2, np.float32)
    session.run(None, {"x": x})
    report = session.monitor.report()
    assert [s.config.activation for s in report.layers.values()] == ["GELU", "GELU"]
    # The second GELU reads 2 * gelu(x): its maxima are those of gelu(2 * gelu(x)).
    gelu = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    h = 2 * gelu[0]
    second = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
    last = list(report.layers.values())[-1]
    np.testing.assert_allclose(last.partials.max, second, rtol=1e-4)
