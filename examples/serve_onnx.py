"""Serve an ONNX model with ONNX Runtime and export its neurons' liveness to Prometheus.

``watch_session`` adds in-graph reductions to the model's activations and returns a session
whose ``run`` works like ``onnxruntime.InferenceSession.run``; with ``flush_interval`` a run
that finishes after the interval publishes a fresh snapshot (a server never calls
``monitor.step()``). Try it:

    python examples/serve_onnx.py &
    curl -s 127.0.0.1:9464/metrics | grep neuronwatch_dead_ratio

The model here is a two-layer ReLU MLP built with onnx.helper, 16 of whose neurons can never
fire; use your own .onnx file instead. ``--requests N`` stops after N requests.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from neuronwatch.adapters.onnx import watch_session
from neuronwatch.exporters.prometheus import serve
from onnx import TensorProto, helper, numpy_helper


def mlp(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.1, (64, 128)).astype(np.float32)
    b1 = np.zeros(128, dtype=np.float32)
    b1[:16] = -100.0  # these 16 neurons can never fire
    w2 = rng.normal(0, 0.1, (128, 10)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["pre"]),
            helper.make_node("Relu", ["pre"], ["act"], name="act"),
            helper.make_node("MatMul", ["act", "w2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))],
    )
    # IR 9 / opset 17: what every recent ONNX Runtime loads.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, path)
    return path


parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, default=9464, help="0 picks a free port")
parser.add_argument("--requests", type=int, default=0, help="stop after N (0: until Ctrl-C)")
args = parser.parse_args()

with tempfile.TemporaryDirectory() as folder:
    model = mlp(Path(folder) / "mlp.onnx")
    # (1) a watched session: a snapshot at most once a second while requests come in
    session = watch_session(model, name="served-onnx", flush_interval=1.0, min_rows=100)
    # (2) serve /metrics on the loopback interface (addr="0.0.0.0" to expose it)
    with session.monitor, serve(session.monitor, port=args.port) as server:
        print(f"metrics at {server.url}", flush=True)
        handled, rng = 0, np.random.default_rng()
        try:
            # (3) nothing else: requests run as usual, no step()
            while args.requests == 0 or handled < args.requests:
                session.run(None, {"x": rng.normal(size=(1, 64)).astype(np.float32)})
                handled += 1
                time.sleep(0.001)
        except KeyboardInterrupt:
            pass
print(f"served {handled} requests")
