"""watch_session: a drop-in InferenceSession whose runs feed a Monitor."""

from __future__ import annotations

import threading
import time

import numpy as np
import onnxruntime as ort
import pytest
from neuronwatch.adapters.onnx import watch_session
from onnx import helper
from onnx_graphs import FLOAT, mlp, model, tensor

from neuronwatch.monitor import ActivationSource


def plain_session() -> ort.InferenceSession:
    return ort.InferenceSession(mlp().SerializeToString(), providers=["CPUExecutionProvider"])


def batch(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)}


def test_run_returns_exactly_the_models_outputs() -> None:
    plain, watched = plain_session(), watch_session(mlp(), provider="cpu")
    feed = batch(9)
    ours = watched.run(None, feed)
    theirs = plain.run(None, feed)
    assert len(ours) == len(theirs) == 1
    np.testing.assert_array_equal(ours[0], theirs[0])
    np.testing.assert_array_equal(watched.run(["y"], feed)[0], theirs[0])
    assert [(o.name, o.shape) for o in watched.get_outputs()] == [
        (o.name, o.shape) for o in plain.get_outputs()
    ]
    assert [i.name for i in watched.get_inputs()] == ["x"]
    assert watched.get_overridable_initializers() == []
    assert watched.get_providers() == ["CPUExecutionProvider"]
    assert isinstance(watched.monitor.sources[0], ActivationSource)


def test_statistics_flow_into_the_monitor() -> None:
    session = watch_session(mlp(), provider="cpu", flush_interval=None)
    for seed in range(3):
        session.run(None, batch(10, seed))
    report = session.monitor.report()
    assert report.layers["act"].rows == 30
    assert report.wiring["act"].producer == "fc1"


def test_a_serving_process_publishes_snapshots_by_itself() -> None:
    session = watch_session(mlp(), provider="cpu", flush_interval=0.05)
    assert session.monitor.latest is None
    session.run(None, batch(4))
    first = session.monitor.latest
    assert first is not None
    assert first.layers("lifetime")["act"].rows == 4
    session.run(None, batch(4))  # within the interval: not published yet
    assert session.monitor.latest is first
    time.sleep(0.06)
    session.run(None, batch(4))
    # Published by this run's flush, or (when the monitor's idle flusher published the second
    # run during the sleep) by the idle flusher once no run follows for an interval.
    deadline = time.monotonic() + 2.0
    while True:
        latest = session.monitor.latest
        assert latest is not None
        if latest.layers("lifetime")["act"].rows == 12 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert latest.layers("lifetime")["act"].rows == 12


def test_paused_and_closed_runs_are_not_counted() -> None:
    session = watch_session(mlp(), provider="cpu", flush_interval=None)
    with session.monitor.paused():
        session.run(None, batch(5))
    session.run(None, batch(3))
    with session:
        pass
    session.run(None, batch(7))  # still serves after close
    assert session.monitor.report().layers["act"].rows == 3


def test_concurrent_runs_count_every_row() -> None:
    session = watch_session(mlp(), provider="cpu", flush_interval=0.001)
    errors: list[BaseException] = []

    def serve(seed: int) -> None:
        try:
            for i in range(20):
                session.run(None, batch(3, seed * 100 + i))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=serve, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert session.monitor.report().layers["act"].rows == 4 * 20 * 3


def test_a_recording_failure_never_breaks_serving(caplog: pytest.LogCaptureFixture) -> None:
    session = watch_session(mlp(), provider="cpu", flush_interval=None)

    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("boom")

    session.source.record = broken  # type: ignore[method-assign]
    out = session.run(None, batch(2))
    assert out[0].shape == (2, 3)
    assert session.monitor.snapshot().errors["act"] == 1
    strict = watch_session(mlp(), provider="cpu", strict=True)
    strict.source.record = broken  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="boom"):
        strict.run(None, batch(2))


def test_models_with_control_flow_watch_the_main_graph() -> None:
    branch = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="inner")],
        "then",
        [],
        [tensor("r", FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["n"])], "else", [], [tensor("n", FLOAT, None)]
    )
    nodes = [
        helper.make_node("If", ["cond"], ["b"], name="gate", then_branch=branch, else_branch=other),
        helper.make_node("Sigmoid", ["b"], ["y"], name="/out/Sigmoid"),
    ]
    built = model(
        nodes,
        [tensor("x", FLOAT, ["b", 3]), tensor("cond", 9, [])],
        [tensor("y", FLOAT, ["b", 3])],
    )
    session = watch_session(built, provider="cpu")
    x = np.ones((2, 3), np.float32)
    out = session.run(None, {"x": x, "cond": np.array(False)})
    np.testing.assert_allclose(out[0], 1 / (1 + np.exp(1.0)), rtol=1e-6)
    assert session.plan.meta()["unwatched"] == ["gate/inner"]
    assert list(session.monitor.report().layers) == ["out"]
