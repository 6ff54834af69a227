"""Prometheus exporter cost: scrape latency and size for a 1,000-layer model, and what 1 scrape/s
costs a training loop.

    .venv/bin/python bench/scrape.py                 # ~1-2 min
    .venv/bin/python bench/scrape.py --rounds 2 --period 3 --scrapes 40   # a quick look

1. Scrape latency: an Engine with ``--layers`` layers of ``--neurons`` neurons fed by
   ``Engine.observe``, served by ``neuronwatch.exporters.prometheus.serve``, scraped over HTTP as
   Prometheus does (OpenMetrics, gzip). "cold" publishes a new snapshot (one step later) before
   the scrape, so it reads and renders it (target p99 < 50 ms); "window" closes a window first,
   so every layer is judged again too (the worst case); "cached" scrapes the same snapshot
   again (the exposition is rendered once per snapshot).
2. Training-step ratio: a ``--train-layers``-deep ReLU MLP trained under ``neuronwatch.watch``
   while another process scrapes it once a second, in alternating periods with and without the
   scraper; the median step time of each "with" period over the "without" period before it.
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import subprocess
import sys
import time
import urllib.request

import numpy as np
from neuronwatch.exporters.prometheus import serve

import neuronwatch
from neuronwatch.monitor import Monitor

ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


def scrape(url: str) -> tuple[float, bytes]:
    request = urllib.request.Request(url, headers={"Accept": ACCEPT, "Accept-Encoding": "gzip"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return time.perf_counter() - started, body


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def latency(layers: int, neurons: int, scrapes: int) -> None:
    engine = neuronwatch.Engine("bench", min_rows=10)
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(16, neurons))
    for i in range(layers):
        engine.add_layer(f"blocks.{i}.mlp.act", "GELU")
        engine.observe(f"blocks.{i}.mlp.act", batch)
    monitor = Monitor(engine)
    monitor.rollover()  # one completed window: the state a training run is in
    with serve(monitor, port=0, labels={"run": "bench", "rank": "0"}) as server:
        cold, window, cached = [], [], []
        body = b""
        for _ in range(scrapes):
            engine.advance(1)
            monitor.flush()  # a new snapshot: the next scrape renders it
            seconds, body = scrape(server.url)
            cold.append(seconds)
            cached.append(scrape(server.url)[0])
            for i in range(layers):  # a window in which every layer saw a batch, as in training
                engine.observe(f"blocks.{i}.mlp.act", batch)
            monitor.rollover()  # a new complete window: every layer is judged again
            monitor.flush()
            window.append(scrape(server.url)[0])
    text = gzip.decompress(body)
    lines = sum(1 for line in text.splitlines() if not line.startswith(b"#"))
    print(f"{layers} layers x {neurons} neurons, {scrapes} scrapes (OpenMetrics, gzip)")
    for name, values in (("cold", cold), ("window", window), ("cached", cached)):
        print(
            f"  {name:6} p50 {percentile(values, 0.5) * 1e3:6.1f} ms   "
            f"p99 {percentile(values, 0.99) * 1e3:6.1f} ms"
        )
    print(
        f"  exposition: {lines} samples, {len(text) / 1e6:.2f} MB "
        f"({len(body) / 1e3:.0f} kB gzipped)"
    )


SCRAPER = """
import sys, time, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
request = urllib.request.Request(url, headers={"Accept": sys.argv[3], "Accept-Encoding": "gzip"})
end = time.monotonic() + seconds
while time.monotonic() < end:
    started = time.monotonic()
    urllib.request.urlopen(request, timeout=30).read()
    time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
"""


def training_ratio(depth: int, width: int, rounds: int, period: float) -> None:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)  # the scraper's process gets the other core
    modules: list[torch.nn.Module] = []
    for _ in range(depth):
        modules += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*modules, torch.nn.Linear(width, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, width), torch.randn(32, 1)
    with (
        neuronwatch.watch(model, name="bench-mlp", window=50, compile=False) as monitor,
        serve(monitor, port=0) as server,
    ):

        def steps_for(seconds: float) -> list[float]:
            times, end = [], time.perf_counter() + seconds
            while time.perf_counter() < end:
                started = time.perf_counter()
                loss = torch.nn.functional.mse_loss(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                monitor.step()
                times.append(time.perf_counter() - started)
            return times

        steps_for(min(period, 3.0))  # warm-up: wiring trace, first windows
        ratios = []
        for _ in range(rounds):
            without = statistics.median(steps_for(period))
            scraper = subprocess.Popen(
                [sys.executable, "-c", SCRAPER, server.url, str(period), ACCEPT]
            )
            with_scrapes = statistics.median(steps_for(period))
            scraper.wait()
            ratios.append(with_scrapes / without)
        layers = len(monitor.layers)
    print(
        f"training step, {layers} watched layers (MLP {depth}x{width}, batch 32), "
        f"1 scrape/s vs none: median ratio {statistics.median(ratios):.3f} "
        f"(rounds: {', '.join(f'{r:.3f}' for r in ratios)}; {without * 1e3:.1f} ms/step)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=1000)
    parser.add_argument("--neurons", type=int, default=256)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--train-layers", type=int, default=1000)
    parser.add_argument("--train-width", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--period", type=float, default=5.0, help="seconds per half-round")
    args = parser.parse_args()
    latency(args.layers, args.neurons, args.scrapes)
    training_ratio(args.train_layers, args.train_width, args.rounds, args.period)


if __name__ == "__main__":
    main()
