"""ONNX audit overhead: in-graph reductions against the two naive ways, on a transformer.

Model: 4 Transformer encoder blocks, d_model 512, MLP 2048 with GELU (torch's
``nn.TransformerEncoderLayer``, exported with torch's default exporter), batches of 32 x 128
tokens, ONNX Runtime on CPU. Variants, each timed against plain inference of the same model:

- (a) ours: ``watch_session`` — reductions appended to the graph, only ``O(neurons)`` vectors
  returned (the layer histogram on one batch in 8, as by default);
- (b) the watched activations returned as extra outputs and reduced on the host with numpy
  (float32, the same statistics, histogram one batch in 8);
- (c) every tensor of the graph marked as an output (what "just fetch everything" costs).

Printed: time per batch and its ratio to plain (medians of interleaved runs in one process, a
histogram batch's extra cost amortized over the 8 batches of its period),
bytes returned per batch beyond the model's own outputs, and peak RSS, each variant measured
in a process of its own. Targets for (a): <= 1.10x time, returned bytes <= 1 % of (b), peak RSS
<= 1.15x plain. Figures depend on the machine's load: run it on a quiet one::

    python bench/onnx_audit.py                  # full run
    python bench/onnx_audit.py --batches 2      # a quick check that it works
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BATCH, TOKENS, WIDTH, HIDDEN, BLOCKS, HEADS = 32, 128, 512, 2048, 4, 8
VARIANTS = ("plain", "a", "b", "c")
NAMES = {
    "plain": "plain inference",
    "a": "(a) in-graph reductions (ours)",
    "b": "(b) activations returned, reduced in numpy",
    "c": "(c) every tensor marked as an output",
}


def export(path: Path) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        WIDTH, HEADS, HIDDEN, dropout=0.0, activation="gelu", batch_first=True
    )
    model = nn.TransformerEncoder(layer, BLOCKS, enable_nested_tensor=False).eval()
    x = torch.randn(BATCH, TOKENS, WIDTH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["x"], verbose=False)
    return path


def feed() -> dict[str, np.ndarray]:
    return {
        "x": np.random.default_rng(0).standard_normal((BATCH, TOKENS, WIDTH)).astype(np.float32)
    }


def _ort() -> Any:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    return ort


def _session(model: Any) -> Any:
    ort = _ort()
    return ort.InferenceSession(
        model if isinstance(model, str) else model.SerializeToString(),
        providers=["CPUExecutionProvider"],
    )


def _with_outputs(path: Path, names: list[str]) -> Any:
    import onnx

    model = onnx.load(str(path))
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    known = {o.name for o in model.graph.output}
    for name in names:
        if name not in known and types.get(name):
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
            known.add(name)
    return model


def _activation_outputs(path: Path) -> list[str]:
    """The tensors (a) watches: every activation's output."""
    from neuronwatch.adapters.onnx_plan import plan

    the_plan, _ = plan(str(path))
    return [named.site.output for named in the_plan.layers]


def _numpy_stats(values: np.ndarray, histogram: bool) -> list[np.ndarray]:
    """The statistics of (a) for one activation, in float32 numpy, over every row."""
    rows = values.reshape(-1, values.shape[-1])
    out = [
        (rows > 1e-3).sum(0),
        np.abs(rows).sum(0),
        rows.sum(0),
        np.square(rows).sum(0),
        rows.max(0),
        rows.min(0),
    ]
    if histogram:
        edges = np.asarray(
            [-10, -3, -1, -0.3, -0.1, -0.01, -1e-3, 0, 1e-3, 0.01, 0.1, 0.3, 1, 3, 10], np.float32
        )
        out.append(np.bincount(np.searchsorted(edges, rows.ravel()), minlength=edges.size + 1))
    return out


def runner(
    variant: str, path: Path
) -> tuple[Callable[[dict[str, np.ndarray]], bool], Callable[[], int]]:
    """A function running one batch through ``variant`` (it says whether the batch took the
    layer histogram), and one giving the bytes returned by the last batch beyond the model's
    own outputs."""
    own = [o.name for o in _session(str(path)).get_outputs()]
    returned = [0]
    if variant == "plain":
        session = _session(str(path))

        def run_plain(f: dict[str, np.ndarray]) -> bool:
            session.run(None, f)
            return False

        return run_plain, lambda: 0
    if variant == "a":
        from neuronwatch.adapters.onnx import watch_session

        watched = watch_session(str(path), provider="cpu", flush_interval=None)
        inner = watched.session
        extra = watched.source.output_names()
        hidden = watched.plan.augmented.histogram_input
        count = [0]

        def run_a(f: dict[str, np.ndarray]) -> bool:
            # What WatchedSession.run does, keeping the outputs to count their bytes.
            histogram = count[0] % 8 == 0
            count[0] += 1
            results = inner.run(own + extra, {**f, hidden: np.asarray(histogram)})
            watched.source.record(results[len(own) :], histogram)
            returned[0] = sum(r.nbytes for r in results[len(own) :])
            return histogram

        return run_a, lambda: returned[0]
    if variant == "b":
        names = _activation_outputs(path)
        session = _session(_with_outputs(path, names))
        count = [0]

        def run_b(f: dict[str, np.ndarray]) -> bool:
            results = session.run(own + names, f)
            histogram = count[0] % 8 == 0
            count[0] += 1
            for values in results[len(own) :]:
                _numpy_stats(values, histogram)
            returned[0] = sum(r.nbytes for r in results[len(own) :])
            return histogram

        return run_b, lambda: returned[0]
    import onnx

    model = onnx.load(str(path))
    everything = [out for node in model.graph.node for out in node.output if out]
    session = _session(_with_outputs(path, everything))

    def run_c(f: dict[str, np.ndarray]) -> bool:
        results = session.run(None, f)
        returned[0] = sum(getattr(r, "nbytes", 0) for r in results[len(own) :])
        return False

    return run_c, lambda: returned[0]


def child(variant: str, path: Path, batches: int) -> None:
    """Run one variant alone (for its peak RSS) and print a JSON line."""
    run, returned = runner(variant, path)
    data = feed()
    for _ in range(batches):
        run(data)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": variant, "peak_rss_mib": peak_kib / 1024, "bytes": returned()}))


def timings(
    path: Path, batches: int, variants: tuple[str, ...]
) -> dict[str, tuple[list[float], list[float]]]:
    """Seconds per batch, without and with the histogram, variants interleaved batch by batch
    so load changes hit all alike."""
    runs = {v: runner(v, path)[0] for v in variants}
    data = feed()
    for run in runs.values():
        run(data)  # warm-up
    times: dict[str, tuple[list[float], list[float]]] = {v: ([], []) for v in variants}
    for _ in range(batches):
        for variant, run in runs.items():
            start = time.perf_counter()
            sampled = run(data)
            times[variant][sampled].append(time.perf_counter() - start)
    return times


def amortized(ordinary: list[float], sampled: list[float]) -> float:
    """Seconds per batch over the histogram's period: the ordinary batch's median plus an
    eighth of what a histogram batch costs beyond it. A plain median of every batch would
    hide the histogram (one batch in 8 is never the median)."""
    base = statistics.median(ordinary)
    return base + (statistics.median(sampled) - base) / 8 if sampled else base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40, help="timed batches per variant")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, max(2, min(args.batches, 4)))
        return
    with tempfile.TemporaryDirectory() as folder:
        path = export(Path(folder) / "encoder.onnx")
        print(
            f"{BLOCKS} blocks, d_model {WIDTH}, MLP {HIDDEN} GELU, batch {BATCH} x {TOKENS} "
            f"tokens; ONNX Runtime CPU; {args.batches} timed batches per variant (median, the "
            "histogram batches amortized)"
        )
        memory = {}
        for variant in VARIANTS:
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    variant,
                    "--model",
                    str(path),
                    "--batches",
                    str(args.batches),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            memory[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        times = timings(path, args.batches, ("plain", "a", "b", "c"))
    per_batch = {variant: amortized(*times[variant]) for variant in VARIANTS}
    plain = per_batch["plain"]
    plain_rss = memory["plain"]["peak_rss_mib"]
    b_bytes = memory["b"]["bytes"] or 1
    print(
        f"{'variant':46s} {'ms/batch':>9s} {'time':>6s} {'returned/batch':>15s} {'of (b)':>8s} "
        f"{'peak RSS':>12s} {'RSS':>6s}"
    )
    for variant in VARIANTS:
        median = per_batch[variant]
        returned = memory[variant]["bytes"]
        rss = memory[variant]["peak_rss_mib"]
        print(
            f"{NAMES[variant]:46s} {median * 1e3:9.1f} {median / plain:5.2f}x "
            f"{_size(returned):>15s} {returned / b_bytes:8.2%} {rss:8.0f} MiB "
            f"{rss / plain_rss:5.2f}x"
        )


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return str(count)


if __name__ == "__main__":
    main()
