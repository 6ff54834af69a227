"""Provider selection: CUDA only when the session really runs on it, one log line either way.

There is no GPU here: the CUDA cases use a stand-in for the onnxruntime module whose sessions
report the providers a real one would (the CPU case runs the real onnxruntime).
"""

from __future__ import annotations

import logging
from typing import Any

import onnx_graphs
import pytest
from neuronwatch.adapters.onnx_session import create_session

from neuronwatch.errors import ConfigError

MODEL = onnx_graphs.activation("Relu").SerializeToString()


class FakeOptions:
    def __init__(self) -> None:
        self.log_severity_level = 2
        self.entries: dict[str, str] = {}

    def add_session_config_entry(self, key: str, value: str) -> None:
        self.entries[key] = value


class FakeOrt:
    """``get_available_providers`` lists CUDA; sessions run on ``runs_on``."""

    SessionOptions = FakeOptions

    def __init__(self, runs_on: list[str], fails: bool = False) -> None:
        self.runs_on, self.fails = runs_on, fails
        self.created: list[tuple[list[str], int]] = []

    def get_available_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def InferenceSession(self, model: Any, options: FakeOptions, providers: list[str]) -> Any:
        self.created.append((providers, options.log_severity_level))
        if self.fails and "CUDAExecutionProvider" in providers:
            raise RuntimeError("libcublasLt.so.12: cannot open shared object file\nmore lines")
        runs = [p for p in self.runs_on if p in providers] or providers[-1:]

        class Session:
            def get_providers(self) -> list[str]:
                return runs

        return Session()


def test_cpu_with_the_real_onnxruntime_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="neuronwatch.adapters.onnx_session"):
        session = create_session(MODEL, "auto", where="relu.onnx")
    assert session.get_providers() == ["CPUExecutionProvider"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert "relu.onnx: ONNX Runtime runs on CPUExecutionProvider" in lines[0]


def test_cuda_is_used_when_the_session_really_runs_on_it(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeOrt(["CUDAExecutionProvider", "CPUExecutionProvider"])
    with caplog.at_level(logging.INFO, logger="neuronwatch.adapters.onnx_session"):
        session = create_session(MODEL, "auto", ort=fake)
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    assert [r.getMessage() for r in caplog.records] == [
        "model: ONNX Runtime runs on CUDAExecutionProvider"
    ]
    assert fake.created == [(["CUDAExecutionProvider", "CPUExecutionProvider"], 4)]


def test_cuda_that_silently_falls_back_is_reported_as_cpu(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeOrt(["CPUExecutionProvider"])  # libraries missing: ORT drops CUDA quietly
    with caplog.at_level(logging.INFO, logger="neuronwatch.adapters.onnx_session"):
        session = create_session(MODEL, "auto", ort=fake)
    assert session.get_providers() == ["CPUExecutionProvider"]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "CPUExecutionProvider (the CUDA libraries could not be loaded)" in messages[0]
    # The CUDA attempt ran with ORT's own logging quieted (severity 4: fatal only).
    assert fake.created[0][1] == 4


def test_cuda_asked_for_but_broken_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"--provider cuda, but CUDA failed: libcublasLt"):
        create_session(MODEL, "cuda", ort=FakeOrt([], fails=True))
    with pytest.raises(ConfigError, match="could not be loaded"):
        create_session(MODEL, "cuda", ort=FakeOrt(["CPUExecutionProvider"]))


def test_cpu_never_tries_cuda_and_bad_names_are_refused() -> None:
    fake = FakeOrt(["CUDAExecutionProvider", "CPUExecutionProvider"])
    create_session(MODEL, "cpu", ort=fake)
    assert fake.created == [(["CPUExecutionProvider"], 3)]
    with pytest.raises(ConfigError, match="provider must be one of"):
        create_session(MODEL, "gpu", ort=fake)  # type: ignore[arg-type]


def test_a_model_onnx_runtime_refuses_is_one_line() -> None:
    with pytest.raises(ConfigError, match="ONNX Runtime cannot load the model") as caught:
        create_session(b"\x08\x07garbage", "cpu")
    assert "\n" not in str(caught.value)
