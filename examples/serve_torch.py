"""Serve a PyTorch model and export its neurons' liveness to Prometheus (no step() calls).

A serving process never calls ``monitor.step()``: with ``flush_interval`` the forward that
finishes after the interval publishes a fresh snapshot, from its own thread, and every scrape
of http://127.0.0.1:9464/metrics reads the latest one. Try it:

    python examples/serve_torch.py &
    curl -s 127.0.0.1:9464/metrics | grep neuronwatch_dead_ratio

Copy the three marked lines into your server; ``--requests N`` stops after N requests.
"""

import argparse
import time

import torch
from neuronwatch.exporters.prometheus import serve

import neuronwatch

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=9464, help="0 picks a free port")
parser.add_argument("--requests", type=int, default=0, help="stop after N (0: until Ctrl-C)")
args = parser.parse_args()

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
).eval()
with torch.no_grad():
    model[0].bias[:16] = -100.0  # 16 neurons that can never fire, to see something

# (1) watch the model: a snapshot at most once a second while requests come in;
# (2) serve /metrics on the loopback interface (addr="0.0.0.0" to expose it)
with (
    neuronwatch.watch(model, name="served-mlp", flush_interval=1.0, min_rows=100) as monitor,
    serve(monitor, port=args.port, labels={"instance_role": "demo"}) as server,
):
    print(f"metrics at {server.url}", flush=True)
    handled = 0
    try:
        # (3) nothing else: requests run as usual, no step(), under inference_mode too
        with torch.inference_mode():
            while args.requests == 0 or handled < args.requests:
                model(torch.randn(1, 64))  # one request
                handled += 1
                time.sleep(0.001)
    except KeyboardInterrupt:
        pass
print(f"served {handled} requests")
