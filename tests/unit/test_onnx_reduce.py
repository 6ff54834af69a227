"""In-graph reductions equal the numpy reference (``neuronwatch.reduce``) field by field."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from neuronwatch.adapters.onnx import watch_session
from onnx import TensorProto, helper
from onnx_graphs import FLOAT, activation, init, model, tensor

from neuronwatch.partials import Partials
from neuronwatch.reduce import as_rows, reduce_rows

INT64 = TensorProto.INT64
EXACT = ("fired", "saturated", "nonfinite", "max", "min", "histogram")
SUMS = ("abs_sum", "sum", "sq_sum")


def run(built: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], **options: Any) -> Any:
    options.setdefault("histogram_every", 1)
    session = watch_session(built, provider="cpu", flush_interval=None, strict=True, **options)
    for feed in feeds:
        session.run(None, feed)
    return session


def assert_matches(got: Partials, want: Partials) -> None:
    assert got.rows == want.rows
    for name in EXACT:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    for name in SUMS:
        np.testing.assert_allclose(
            getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-4, err_msg=name
        )


def planted(rows: int, neurons: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, neurons)) * 3).astype(np.float32)
    x[:, 1] = -np.abs(x[:, 1])  # never fires through ReLU
    return x


def test_relu_statistics_equal_the_numpy_reference_over_several_runs() -> None:
    feeds = [{"x": planted(50, 6, seed)} for seed in range(3)]
    session = run(activation("Relu"), feeds)
    config = session.monitor.engine.config("act")
    want = reduce_rows(
        np.maximum(np.concatenate([f["x"] for f in feeds]), 0).astype(np.float64), config
    )
    got = session.monitor.report("lifetime").layers["act"].partials
    assert_matches(got, want)
    assert got.fired[1] == 0


@pytest.mark.parametrize("neurons", [6, 70], ids=["narrow", "wide"])
@pytest.mark.parametrize("rows", [0, 1, 7, 16, 24, 96, 2048, 2056])
def test_every_row_count_gets_exact_extremes_and_counts(rows: int, neurons: int) -> None:
    """Max and min reduce [k, rows / k, neurons] chunks (k from 1 to 256, by what divides the
    rows) and counts go through MatMulInteger: neither may lose a row at any chunking, and an
    empty batch is no error."""
    x = planted(rows, neurons, seed=rows)
    if rows:
        x[rows - 1, 0] = 50.0  # the extremes sit in the last row, the last chunk
        x[rows // 2, 2] = -50.0
    session = run(activation("Elu", shape=("batch", neurons)), [])
    [y] = session.run(None, {"x": x})  # ELU saturates below: the saturated count is tested too
    config = session.monitor.engine.config("act")
    want = reduce_rows(y.astype(np.float64), config)
    assert_matches(session.monitor.report("lifetime").layers["act"].partials, want)


@pytest.mark.parametrize(
    ("cells", "nonfinite"),
    [
        ({(3, 0): np.nan, (7, 2): np.inf, (9, 2): -np.inf, (11, 4): np.inf}, [1, 0, 1, 0, 1, 0]),
        ({(5, 3): np.inf}, [0, 0, 0, 1, 0, 0]),  # +Inf alone: the sums are inf, not NaN
    ],
)
def test_non_finite_values_are_left_out_and_counted(
    cells: dict[tuple[int, int], float], nonfinite: list[int]
) -> None:
    x = planted(40, 6)
    for cell, value in cells.items():
        x[cell] = value
    session = run(activation("Relu"), [{"x": x}])
    config = session.monitor.engine.config("act")
    relu = np.where(np.isnan(x), np.nan, np.maximum(x, 0)).astype(np.float64)
    want = reduce_rows(relu, config)
    got = session.monitor.report("lifetime").layers["act"].partials
    assert_matches(got, want)
    assert got.nonfinite.tolist() == nonfinite  # relu(-inf) = 0 is finite


def test_relu6_saturation_from_clip() -> None:
    x = planted(60, 6)
    x[:, 3] = 8.0  # always on the upper plateau
    clip = activation(
        "Clip",
        extra_inputs=["lo", "hi"],
        initializers=[init("lo", np.float32(0)), init("hi", np.float32(6))],
    )
    session = run(clip, [{"x": x}])
    stats = session.monitor.report("lifetime").layers["act"]
    assert stats.config.activation == "ReLU6"
    want = reduce_rows(np.clip(x, 0, 6).astype(np.float64), stats.config)
    assert_matches(stats.partials, want)
    assert stats.partials.saturated[3] == 60


@pytest.mark.parametrize(
    ("elem", "dtype"), [(TensorProto.FLOAT16, np.float16), (TensorProto.DOUBLE, np.float64)]
)
def test_fp16_is_reduced_in_float32_and_float64_in_float64(elem: int, dtype: type) -> None:
    x = planted(30, 6).astype(dtype)
    session = run(activation("Relu", elem=elem), [{"x": x}])
    config = session.monitor.engine.config("act")
    want = reduce_rows(np.maximum(x, 0).astype(np.float64), config)
    assert_matches(session.monitor.report("lifetime").layers["act"].partials, want)


def test_histogram_only_on_sampled_runs() -> None:
    feeds = [{"x": planted(20, 6, seed)} for seed in range(4)]
    session = watch_session(
        activation("Relu"), provider="cpu", histogram_every=2, flush_interval=None
    )
    for feed in feeds:
        session.run(None, feed)
    config = session.monitor.engine.config("act")
    sampled = np.concatenate([feeds[0]["x"], feeds[2]["x"]])
    want = reduce_rows(np.maximum(sampled, 0).astype(np.float64), config).histogram
    got = session.monitor.report("lifetime").layers["act"].partials
    np.testing.assert_array_equal(got.histogram, want)
    assert got.rows == 80


def _masked_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="/act/Relu")]
    return model(
        nodes,
        [
            tensor("x", FLOAT, ["batch", "tokens", 4]),
            tensor("attention_mask", TensorProto.INT64, ["batch", "tokens"]),
        ],
        [tensor("y", FLOAT, ["batch", "tokens", 4])],
    )


def test_pad_rows_are_left_out_through_the_attention_mask() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.int64)
    x[mask == 0] = 50.0  # pad rows would fire everywhere and dominate every sum
    session = run(_masked_model(), [{"x": x, "attention_mask": mask}])
    config = session.monitor.engine.config("act")
    want = reduce_rows(np.maximum(x[mask == 1], 0).astype(np.float64), config)
    assert_matches(session.monitor.report("lifetime").layers["act"].partials, want)
    unmasked = run(_masked_model(), [{"x": x, "attention_mask": mask}], mask=None)
    assert unmasked.monitor.report("lifetime").layers["act"].rows == 15


def test_a_batch_of_pads_only_adds_no_rows() -> None:
    # Every position masked out: the taps see no row at all (what MatMulInteger over no rows
    # got wrong: it returned its buffer's old contents as counts).
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 4)).astype(np.float32)
    real = np.ones((2, 5), np.int64)
    session = run(_masked_model(), [{"x": x, "attention_mask": real}])
    session.run(None, {"x": x + 50, "attention_mask": np.zeros((2, 5), np.int64)})
    config = session.monitor.engine.config("act")
    want = reduce_rows(np.maximum(x.reshape(10, 4), 0).astype(np.float64), config)
    assert_matches(session.monitor.report("lifetime").layers["act"].partials, want)


def test_conv_channels_are_the_neurons() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="/conv/Conv"),
        helper.make_node("Relu", ["c"], ["y"], name="/act/Relu"),
    ]
    built = model(
        nodes,
        [tensor("x", FLOAT, ["b", 2, 6, 6])],
        [tensor("y", FLOAT, ["b", 4, 4, 4])],
        [init("conv.weight", weight)],
    )
    x = rng.standard_normal((2, 2, 6, 6)).astype(np.float32)
    session = run(built, [{"x": x}])
    plain = ort.InferenceSession(built.SerializeToString(), providers=["CPUExecutionProvider"])
    values = plain.run(None, {"x": x})[0]
    config = session.monitor.engine.config("act")
    want = reduce_rows(as_rows(values, 1, "act"), config)
    got = session.monitor.report("lifetime")
    assert got.wiring["act"].feature_axis == 1
    assert got.layers["act"].rows == 2 * 4 * 4
    assert_matches(got.layers["act"].partials, want)


@pytest.mark.parametrize("opset", [11, 13, 17, 18, 20])
def test_every_supported_opset(opset: int) -> None:
    x = planted(25, 6)
    session = run(activation("Relu", opset=opset), [{"x": x}])
    config = session.monitor.engine.config("act")
    want = reduce_rows(np.maximum(x, 0).astype(np.float64), config)
    assert_matches(session.monitor.report("lifetime").layers["act"].partials, want)


def test_newest_ir_version_is_lowered_for_onnx_runtime() -> None:
    built = activation("Relu")
    built.ir_version = onnx.IR_VERSION  # what onnx.helper.make_model writes today
    session = run(built, [{"x": planted(5, 6)}])
    assert session.monitor.report("lifetime").layers["act"].rows == 5


def _fp16_conv(op: str) -> onnx.ModelProto:
    weight = np.random.default_rng(1).standard_normal((4, 2, 1, 1)).astype(np.float16)
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="/conv/Conv"),
        helper.make_node(op, ["c"], ["y"], name=f"/act/{op}"),
    ]
    return model(
        nodes,
        [tensor("x", TensorProto.FLOAT16, ["b", 2, 5, 5])],
        [tensor("y", TensorProto.FLOAT16, ["b", 4, 5, 5])],
        [init("conv.weight", weight)],
    )


@pytest.mark.parametrize("layout", ["rows", "conv"])
@pytest.mark.parametrize("op", ["Tanh", "Elu", "LeakyRelu"])
def test_fp16_ops_run_in_float32_are_measured_after_rounding(op: str, layout: str) -> None:
    """ORT runs these fp16 ops in float32 between casts it inserts; the statistics must be of
    the fp16 values the model returns (tanh saturates to exactly 1.0 in fp16), not of the
    float32 values before rounding."""
    rng = np.random.default_rng(0)
    if layout == "rows":
        built, axis = activation(op, elem=TensorProto.FLOAT16), -1
        x = (rng.standard_normal((64, 6)) * 4).astype(np.float16)
    else:
        built, axis = _fp16_conv(op), 1
        x = (rng.standard_normal((3, 2, 5, 5)) * 4).astype(np.float16)
    session = run(built, [])
    [y] = session.run(None, {"x": x})
    assert y.dtype == np.float16
    stats = session.monitor.report("lifetime")
    assert stats.wiring["act"].feature_axis == axis
    want = reduce_rows(
        as_rows(y.astype(np.float64), axis % y.ndim, "act"), stats.layers["act"].config
    )
    assert_matches(stats.layers["act"].partials, want)
    if op == "Tanh":
        assert stats.layers["act"].partials.max.max() == 1.0  # rounded to fp16


@pytest.mark.parametrize("layout", ["rows", "conv"])
def test_counts_stay_exact_past_2_to_the_24_rows_in_one_run(layout: str) -> None:
    """float32 stops counting at 2**24 (2**24 + 1 rounds down): one batch with more rows than
    that (a segmentation model's early feature map) must still count every row."""
    if layout == "rows":
        built = activation("Relu", shape=("batch", 1))
        x = np.ones((2**24 + 3, 1), np.float32)
    else:
        nodes = [
            helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="/conv/Conv"),
            helper.make_node("Relu", ["c"], ["y"], name="/act/Relu"),
        ]
        built = model(
            nodes,
            [tensor("x", FLOAT, ["b", 1, "h", "w"])],
            [tensor("y", FLOAT, ["b", 1, "h", "w"])],
            [init("conv.weight", np.ones((1, 1, 1, 1), np.float32))],
        )
        x = np.ones((1, 1, 4097, 4096), np.float32)  # a 4097 x 4096 map: 2**24 + 4096 rows
    rows = x.size
    session = run(built, [{"x": x}])
    got = session.monitor.report("lifetime").layers["act"].partials
    assert got.rows == rows
    assert got.fired.tolist() == [rows]
    assert got.histogram.sum() == rows
    # The sums: a float32 ReduceSum over a whole channel stopped at 2**24 (16777216); now
    # exact for conv maps (each row in float32, the rows in float64), within float32's
    # blocked GEMV rounding for a [rows, neurons] view.
    for total in (got.sum, got.abs_sum, got.sq_sum):
        if layout == "conv":
            assert total.tolist() == [rows]
        else:
            np.testing.assert_allclose(total, [rows], rtol=1e-6)


def test_histogram_edges_beyond_float32_need_no_warning() -> None:
    """Edges of +-1e300 lie outside float32: they round to -inf/float32's largest value on
    purpose, silently, and still bin exactly like the float64 reference."""
    x = planted(40, 6)
    x[0, 0] = 1e18  # far above every edge but +1e300
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        session = run(activation("Relu"), [{"x": x}], histogram_edges=(-1e300, 0.0, 1e300))
    config = session.monitor.engine.config("act")
    want = reduce_rows(np.maximum(x, 0).astype(np.float64), config)
    assert_matches(session.monitor.report("lifetime").layers["act"].partials, want)


def test_sums_that_overflow_float32_are_taken_in_float64() -> None:
    """Finite activations whose squares (|a| > 1.8e19) or sums pass float32's range: the
    partials hold the float64 values, not inf."""
    x = planted(40, 6)
    x[0, 0] = 3e38  # its square is 9e76
    x[:, 3] = 2e38  # 40 of them sum to 8e39
    session = run(activation("Relu"), [{"x": x}])
    config = session.monitor.engine.config("act")
    want = reduce_rows(np.maximum(x, 0).astype(np.float64), config)
    got = session.monitor.report("lifetime").layers["act"].partials
    assert np.isfinite(got.sq_sum).all()
    assert np.isfinite(got.sum).all()
    assert_matches(got, want)


def test_a_map_row_past_2_to_the_24_values_is_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Conv taps count each row of the last axis in float32 first (as fast as one float
    ReduceSum, where int32 took twice as long): a row that long is not exact, and says so."""
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="/conv/Conv"),
        helper.make_node("Relu", ["c"], ["y"], name="/act/Relu"),
    ]
    built = model(
        nodes,
        [tensor("x", FLOAT, ["b", 1, "l"])],
        [tensor("y", FLOAT, ["b", 1, "l"])],
        [init("conv.weight", np.ones((1, 1, 1), np.float32))],
    )
    session = run(built, [{"x": np.ones((1, 1, 8), np.float32)}])
    assert "last axis" not in caplog.text
    session.run(None, {"x": np.ones((1, 1, 2**24 + 3), np.float32)})
    assert "16777219 values along the last axis of one map" in caplog.text


@pytest.mark.parametrize("op", ["Relu", "Tanh"])
@pytest.mark.parametrize("axis", [2, 3])
def test_fp16_conv_maps_with_an_empty_axis(op: str, axis: int) -> None:
    """A conv map sliced to nothing along a spatial axis ([2, 4, 5, 0]) runs as the plain model
    does, with no rows (the fp16 rounding reshape keeps the tap's own shape)."""
    weight = np.random.default_rng(1).standard_normal((4, 2, 1, 1)).astype(np.float16)
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="/conv/Conv"),
        helper.make_node("Slice", ["c", "starts", "ends", "axes"], ["s"], name="/slice"),
        helper.make_node(op, ["s"], ["y"], name=f"/act/{op}"),
    ]
    built = model(
        nodes,
        [tensor("x", TensorProto.FLOAT16, ["b", 2, 5, 5]), tensor("ends", INT64, [1])],
        [tensor("y", TensorProto.FLOAT16, ["b", 4, "h", "w"])],
        [
            init("conv.weight", weight),
            init("starts", np.array([0], np.int64)),
            init("axes", np.array([axis], np.int64)),
        ],
    )
    x = (np.random.default_rng(0).standard_normal((2, 2, 5, 5)) * 3).astype(np.float16)
    session = run(built, [])
    ys = [session.run(None, {"x": x, "ends": np.array([end], np.int64)})[0] for end in (3, 0)]
    assert ys[1].size == 0
    stats = session.monitor.report("lifetime")
    rows = np.concatenate([as_rows(y.astype(np.float64), 1, "act") for y in ys])
    want = reduce_rows(rows, stats.layers["act"].config)
    assert_matches(stats.layers["act"].partials, want)


def _edge_passes(built: onnx.ModelProto, x: np.ndarray, folder: Path) -> tuple[int, Any]:
    """How many histogram edges a histogram run compared the layer against (ONNX Runtime's
    own profile: the ``Greater`` nodes run beyond a run without the histogram), and the
    layer's statistics after a run with the histogram and one without."""
    real = ort.InferenceSession

    def profiled(model: Any, options: Any, **kwargs: Any) -> Any:
        options.enable_profiling = True
        options.profile_file_prefix = str(folder / "profile")
        return real(model, options, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ort, "InferenceSession", profiled)
        session = run(built, [{"x": x}] * 2, histogram_every=2)  # the first run only
    with open(session.session.end_profiling()) as file:
        events = json.load(file)
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    assert len(runs) == 2

    def greater(run: dict[str, Any]) -> int:
        return sum(
            1
            for e in events
            if e.get("cat") == "Node"
            and e["name"].endswith("_kernel_time")
            and e["args"].get("op_name") == "Greater"
            and run["ts"] <= e["ts"] <= run["ts"] + run["dur"]
        )

    return greater(runs[0]) - greater(runs[1]), session.monitor.report("lifetime").layers["act"]


@pytest.mark.parametrize(
    ("low", "high", "passes"),
    [
        (-5.0, 5.0, 6),  # ReLU: [0, 5]: 1e-3 .. 3; the 0 is the fired count, 10 is above all
        (0.2, 0.25, 0),  # between two edges: no pass at all
        (1.0, 3.0, 1),  # min on the edge 1 (compared: it is not above it), max on 3
        (0.3, 1.0, 0),  # float32's 0.3 lies above the edge 0.3: every value is above it
        (-20.0, 20.0, 7),  # 1e-3 .. 10
    ],
)
def test_histogram_compares_only_edges_inside_the_batch_range(
    low: float, high: float, passes: int, tmp_path: Path
) -> None:
    """An edge below the batch's least value counts every finite value, one at or above the
    greatest counts none, and the edge at the fire threshold is the fired count: none of them
    costs a pass over the layer, and the bins still equal the reference exactly."""
    x = np.random.default_rng(1).uniform(low, high, (300, 70)).astype(np.float32)
    x[0, 0], x[1, 1] = low, high  # the extremes exactly, on an edge where the case says so
    x[2, 2] = np.nan  # a non-finite value: "every finite value" must leave it out
    compared, got = _edge_passes(activation("Relu", shape=("batch", 70)), x, tmp_path)
    relu = np.where(np.isnan(x), np.nan, np.maximum(x, 0)).astype(np.float64)
    want = reduce_rows(relu, got.config).histogram  # the second run's only
    np.testing.assert_array_equal(got.partials.histogram, want)
    assert compared == passes


def test_audit_tells_its_progress_each_batchs_samples_and_real_rows() -> None:
    """``on_batch(samples, rows)``: the rows are the real token positions of the batch (pads
    left out), what the CLI's progress bar shows as rows/s."""
    from neuronwatch.adapters.onnx import audit

    masks = [
        np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.int64),
        np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]], np.int64),
    ]
    batches = [
        {"x": np.ones((*mask.shape, 4), np.float32), "attention_mask": mask} for mask in masks
    ]
    told: list[tuple[int, int]] = []
    audit(_masked_model(), batches, provider="cpu", on_batch=lambda s, r: told.append((s, r)))
    assert told == [(3, 9), (2, 6)]
