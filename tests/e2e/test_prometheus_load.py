"""Under load: 20 scrapes a second for 30 seconds while a real training run steps. No training
step is lost and no scrape mixes two snapshots (every figure of a scrape agrees with the others).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from exporter_harness import OPENMETRICS, Training
from neuronwatch.exporters.prometheus import serve

om_parser = pytest.importorskip("prometheus_client.openmetrics.parser")

SCRAPES_PER_SECOND = 20
SECONDS = 30
WINDOW, BATCH = 20, 32

# Runs in its own process, as Prometheus would: the test's parsing does not compete with the
# training thread for the GIL.
SCRAPER = """
import json, sys, time, urllib.request
url, accept, out = sys.argv[1], sys.argv[2], sys.argv[3]
rate, seconds = float(sys.argv[4]), float(sys.argv[5])
request = urllib.request.Request(url, headers={"Accept": accept})
bodies, started, latencies = [], time.monotonic(), []
for i in range(int(rate * seconds)):
    time.sleep(max(0.0, started + i / rate - time.monotonic()))
    t = time.monotonic()
    with urllib.request.urlopen(request, timeout=10) as response:
        bodies.append(response.read().decode())
    latencies.append(time.monotonic() - t)
json.dump({"bodies": bodies, "latencies": latencies, "elapsed": time.monotonic() - started},
          open(out, "w"))
"""


def figures(body: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Model-scope values by family, and per-layer values by family and layer."""
    model: dict[str, float] = {}
    layers: dict[str, dict[str, float]] = defaultdict(dict)
    for family in om_parser.text_string_to_metric_families(body):
        for sample in family.samples:
            name = sample.name
            if "le" in sample.labels:
                name = f"{name}[{sample.labels['le']}]"
            if "layer" in sample.labels:
                layers[name][sample.labels["layer"]] = sample.value
            else:
                model[name] = sample.value
    return model, layers


def check_one_snapshot(body: str) -> int:
    """Every figure of the scrape comes from one snapshot of one window; returns its step."""
    model, layers = figures(body)
    steps = int(model["neuronwatch_steps_total"])
    names = set(layers["neuronwatch_neurons"])
    assert names == {"act1", "act2"}
    for layer in names:
        neurons = layers["neuronwatch_neurons"][layer]
        states = ("dead", "leaking", "asleep", "active", "unknown")
        assert sum(layers[f"neuronwatch_{s}_neurons"][layer] for s in states) == neurons
        known = neurons - layers["neuronwatch_unknown_neurons"][layer]
        assert layers["neuronwatch_firing_frequency_ratio_gcount"][layer] == known
        assert layers["neuronwatch_firing_frequency_ratio_bucket[+Inf]"][layer] == known
        assert layers["neuronwatch_steps_since_last_fired_gcount"][layer] == neurons
        # Lifetime rows are exactly the steps of the snapshot times the batch...
        assert layers["neuronwatch_rows_observed_total"][layer] == steps * BATCH
        # ...and the window shown is one whole window (lifetime before the first closes).
        window_rows = layers["neuronwatch_window_rows"][layer]
        if model["neuronwatch_windows_completed_total"] >= 1:
            assert window_rows == WINDOW * BATCH
        else:
            assert window_rows == steps * BATCH
    return steps


@pytest.mark.slow
def test_twenty_scrapes_a_second_lose_no_step_and_tear_no_snapshot(tmp_path: Path) -> None:
    training = Training(window=WINDOW, flush_every=5, batch=BATCH).start()
    server = serve(training.monitor, port=0)
    try:
        quiet_start = time.perf_counter()
        time.sleep(3)
        quiet_end = time.perf_counter()
        out = tmp_path / "scrapes.json"
        subprocess.run(
            [
                sys.executable,
                "-c",
                SCRAPER,
                server.url,
                OPENMETRICS,
                str(out),
                str(SCRAPES_PER_SECOND),
                str(SECONDS),
            ],
            check=True,
            timeout=SECONDS + 60,
        )
        loaded_end = time.perf_counter()
    finally:
        server.stop()
        training.stop()  # raises if the training thread failed
    result: dict[str, Any] = json.loads(out.read_text())

    # Every scrape answered, each from one snapshot, and the snapshots only move forward.
    assert len(result["bodies"]) == SCRAPES_PER_SECOND * SECONDS
    steps = [check_one_snapshot(body) for body in result["bodies"]]
    assert steps == sorted(steps)
    assert len(set(steps)) > SECONDS  # the scrapes saw training progress, not one snapshot

    # No step lost: the monitor counted every step, and every row of every step is there.
    final = training.monitor.flush()
    assert training.monitor.steps == training.steps
    for stats in final.windows["lifetime"].values():
        assert stats.rows == training.steps * BATCH

    quiet_pace = training.steps_between(quiet_start, quiet_end) / (quiet_end - quiet_start)
    loaded_pace = training.steps_between(quiet_end, loaded_end) / (loaded_end - quiet_end)
    latencies = sorted(result["latencies"])
    print(
        f"steps/s quiet {quiet_pace:.0f}, under 20 scrapes/s {loaded_pace:.0f} "
        f"(ratio {loaded_pace / quiet_pace:.2f}); scrape p50 "
        f"{latencies[len(latencies) // 2] * 1e3:.1f} ms, p99 "
        f"{latencies[int(len(latencies) * 0.99)] * 1e3:.1f} ms"
    )
    # Training keeps going at a comparable pace (not a timing target: a generous floor).
    assert loaded_pace > 0.5 * quiet_pace
