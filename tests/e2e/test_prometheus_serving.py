"""Processes that serve and never call step(): a torch model under inference_mode, the examples,
and ``neuronwatch demo --serve``, each scraped over HTTP while it runs."""

from __future__ import annotations

import importlib.util
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from exporter_harness import REPO, get, mlp, torch
from neuronwatch.exporters.prometheus import serve

import neuronwatch

om_parser = pytest.importorskip("prometheus_client.openmetrics.parser")


def samples(body: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in om_parser.text_string_to_metric_families(body)
        for s in family.samples
        if s.name == name
    }


def wait_until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_serving_process_that_never_steps_is_scraped() -> None:
    model = mlp().eval()
    stop = threading.Event()
    with neuronwatch.watch(
        model, name="served", flush_interval=0.2, compile=False, min_rows=50
    ) as monitor:

        def requests() -> None:
            with torch.inference_mode():
                while not stop.is_set():
                    model(torch.randn(1, 16))
                    time.sleep(0.002)

        worker = threading.Thread(target=requests, daemon=True)
        with serve(monitor, port=0) as server:
            assert get(server.url) == "# EOF\n"  # nothing published before the first forward
            worker.start()
            try:
                first: dict[tuple[tuple[str, str], ...], float] = {}

                def judged() -> bool:  # min_rows rows seen: neurons are no longer unknown
                    body = get(server.url)
                    first.update(samples(body, "neuronwatch_rows_observed_total"))
                    return sum(samples(body, "neuronwatch_dead_neurons").values()) > 0

                wait_until(judged)
                time.sleep(0.5)
                body = get(server.url)
            finally:
                stop.set()
                worker.join()
    later = samples(body, "neuronwatch_rows_observed_total")
    assert set(later) == set(first)
    assert all(later[k] > first[k] for k in first)  # published again, every flush_interval
    assert list(samples(body, "neuronwatch_steps_total").values()) == [0.0]
    assert list(samples(body, "neuronwatch_windows_completed_total").values()) == [0.0]
    dead = samples(body, "neuronwatch_dead_neurons")
    assert dead[(("kind", "post"), ("layer", "act2"), ("model", "served"))] >= 8


def start(command: list[str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    """Start ``command``; returns it and the metrics URL it prints."""
    process = subprocess.Popen(
        command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    for line in process.stdout:
        found = re.search(r"(https?://\S+/metrics)", line)
        if found:
            return process, found[1]
    process.wait()
    raise AssertionError(f"no metrics URL printed; stderr: {process.stderr.read()}")  # type: ignore[union-attr]


def interrupt(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    return out


@pytest.mark.parametrize(
    ("script", "model"),
    [("serve_torch.py", "served-mlp"), ("serve_onnx.py", "served-onnx")],
)
def test_the_serving_examples_export_while_they_serve(
    script: str, model: str, tmp_path: Path
) -> None:
    if script == "serve_onnx.py" and importlib.util.find_spec("neuronwatch.adapters.onnx") is None:
        pytest.skip("needs neuronwatch.adapters.onnx.watch_session (the ONNX adapter)")
    process, url = start([sys.executable, str(REPO / "examples" / script), "--port", "0"], tmp_path)
    try:
        dead: dict[tuple[tuple[str, str], ...], float] = {}

        def published() -> bool:
            dead.update(samples(get(url), "neuronwatch_dead_neurons"))
            return sum(dead.values()) >= 16

        wait_until(published)
    finally:
        out = interrupt(process)
    assert {dict(k)["model"] for k in dead} == {model}
    assert re.search(r"served \d+ requests", out)


def test_demo_serve_keeps_metrics_up_until_ctrl_c(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-c",
        "from neuronwatch.cli import main; main()",
        "demo",
        "--serve",
        "0",
        "--epochs",
        "2",
        "--quiet",
        "--out",
        str(tmp_path / "demo"),
    ]
    process, url = start(command, tmp_path)
    assert url.startswith("http://127.0.0.1:")
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if "still serving metrics at" in line:
                break
        body = get(url)
    finally:
        out = interrupt(process)
    models = {dict(k)["model"] for k in samples(body, "neuronwatch_neurons")}
    assert models == {"digits-mlp-relu", "digits-mlp-leaky_relu"}
    windows = samples(body, "neuronwatch_windows_completed_total")
    assert set(windows.values()) == {2.0}  # both runs, to their last epoch
    assert "stopped serving metrics" in out
