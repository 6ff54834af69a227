"""Real pieces for the exporter tests: a Prometheus server, a training run, certificates.

Everything listens on 127.0.0.1 only, on free ports, and is stopped by the test that started it.
"""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import neuronwatch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ALERT_RULES = REPO / "grafana" / "alerts" / "neuronwatch.yml"
DASHBOARD = REPO / "grafana" / "dashboards" / "neuronwatch.json"
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (tools/test-all.sh installs Debian's prometheus)")
    return path


def get(url: str, accept: str = OPENMETRICS, context: ssl.SSLContext | None = None) -> str:
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return bytes(response.read()).decode()


class Prometheus:
    """A Prometheus server scraping ``targets`` every second, with ``rule_files`` loaded."""

    def __init__(
        self,
        workdir: Path,
        targets: list[str],
        *,
        rule_files: tuple[Path, ...] = (),
        scheme: str = "http",
        ca_file: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        job: dict[str, Any] = {
            "job_name": "neuronwatch",
            "scrape_interval": "1s",
            "scheme": scheme,
            "static_configs": [{"targets": targets}],
        }
        if ca_file is not None:
            job["tls_config"] = {"ca_file": str(ca_file)}
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [job],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: no YAML writer needed.
        (workdir / "prometheus.yml").write_text(json.dumps(config))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        log = (self.workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Prometheus did not start: {self.log()}")

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-3000:]

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the vector's samples."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for(self, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                assert result, f"no data for {expr!r} after {timeout} s; log: {self.log()}"
                return result
            time.sleep(0.3)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


DEAD_IN_ACT2 = 8  # act2 neurons whose bias is planted at -10: they never fire


def mlp() -> Any:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        OrderedDict(
            fc1=torch.nn.Linear(16, 32),
            act1=torch.nn.ReLU(),
            fc2=torch.nn.Linear(32, 32),
            act2=torch.nn.ReLU(),
            out=torch.nn.Linear(32, 4),
        )
    )
    with torch.no_grad():
        model.fc2.bias[:DEAD_IN_ACT2] = -10.0  # no gradient below zero: dead for good
    return model


class Training:
    """A real training run on a background thread, watched by neuronwatch; counts its steps."""

    def __init__(
        self, *, window: int = 20, flush_every: int = 5, batch: int = 32, pause: float = 0.002
    ) -> None:
        self.model = mlp()
        self.batch = batch
        self.pause = pause
        self.monitor = neuronwatch.watch(
            self.model,
            name="e2e-mlp",
            window=window,
            flush_every=flush_every,
            min_rows=window * batch,
            compile=False,
        )
        self.steps = 0
        self.step_times: list[tuple[float, float]] = []  # (end time, duration)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="training", daemon=True)
        self._threads = torch.get_num_threads()

    def start(self) -> Training:
        # One intra-op thread (process-wide, restored by stop()): the matrices are tiny, and
        # with two threads on a busy 2-core machine every step waits for the other thread
        # (steps measured 10x slower).
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        self._thread.start()
        # Scrapes from here on see data: a snapshot with a completed window is published.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and self.error is None:
            latest = self.monitor.latest
            if latest is not None and latest.windows_completed > 0:
                return self
            time.sleep(0.05)
        self.stop()
        raise AssertionError("the training run published no completed window in 60 s")

    def _run(self) -> None:
        optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-2)
        generator = torch.Generator().manual_seed(0)
        try:
            while not self._stop.is_set():
                started = time.perf_counter()
                x = torch.randn(self.batch, 16, generator=generator)
                y = torch.randint(0, 4, (self.batch,), generator=generator)
                loss = torch.nn.functional.cross_entropy(self.model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                self.monitor.step()
                self.steps += 1
                now = time.perf_counter()
                self.step_times.append((now, now - started))
                time.sleep(self.pause)
        except BaseException as exc:  # reported by stop(), in the test's thread
            self.error = exc

    def steps_between(self, start: float, end: float) -> int:
        return sum(1 for t, _ in self.step_times if start <= t < end)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.monitor.close()
        torch.set_num_threads(self._threads)
        if self.error is not None:
            raise AssertionError("the training thread failed") from self.error


def self_signed(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made by the openssl command line tool."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [
            binary("openssl"),
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
