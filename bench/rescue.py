"""Time and peak memory of ``neuronwatch rescue prune|strip`` on a large safetensors checkpoint,
as ratios to ``cp`` of the same file and to the file's size; and what prune does to an ONNX
model's size and inference time.

Targets (issue 8): rescue <= 2x the time of ``cp``, peak RSS <= 0.5x the file size.

    .venv/bin/python bench/rescue.py                   # ~1 GiB checkpoint, 3 paired runs each
    .venv/bin/python bench/rescue.py --gib 0.25 --runs 1 --onnx-width 512   # a quick check

The checkpoint is a chain of Linear layers (``fc{i}.weight`` 2048x2048 float32 and
``fc{i}.bias``) with a report that marks 10 % of every hidden layer dead, built with the core
API (no model needed). Each command runs as its own process (``sys.executable``, so the CLI's
start-up is included), alternating with ``cp``: ratios are taken pair by pair and the median
is printed: rescue against ``cp``, and ``rescue --fsync`` (which waits for the disk before renaming
its output into place) against ``cp`` followed by ``sync`` of the copy. Peak RSS is the
child's own ``ru_maxrss`` (``os.wait4``). Run it on a quiet machine.

The page cache decides the ratio, so every command starts from a stated one (``--cache``):
``warm``, the checkpoint read into memory just before (one just saved by a training run);
``cold``, the checkpoint's pages evicted (``posix_fadvise(DONTNEED)``: read from the disk, while
Python and its libraries stay cached as they would on a working machine). On a VM whose host
reclaims page cache (DAMON), a "warm" file left alone goes cold within minutes: without this,
two runs of the same build measured 1.05x and 4.25x ``cp``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from neuronwatch import Engine, ParamRef, Partials, Report, Wiring

WIDTH = 2048
DEAD_SHARE = 0.1


def make_checkpoint(folder: Path, gib: float) -> tuple[Path, Path, int]:
    """A chain of Linear layers of about ``gib`` GiB and its report; returns both paths and
    the number of tensors."""
    from safetensors.numpy import save_file

    per_layer = (WIDTH * WIDTH + WIDTH) * 4
    layers = max(2, round(gib * 2**30 / per_layer))
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(1, layers + 1):
        tensors[f"fc{i}.weight"] = rng.standard_normal((WIDTH, WIDTH), dtype=np.float32)
        tensors[f"fc{i}.bias"] = rng.standard_normal(WIDTH, dtype=np.float32)
    path = folder / "model.safetensors"
    save_file(tensors, str(path))
    del tensors
    engine = Engine("bench", min_rows=100)
    rows = 1000
    for i in range(1, layers):
        layer = f"act{i}"
        engine.add_layer(layer, "ReLU")
        dead = rng.permutation(WIDTH)[: int(DEAD_SHARE * WIDTH)]
        fired = np.full(WIDTH, rows)
        fired[dead] = 0
        live = (fired > 0).astype(np.float64)
        engine.update(
            layer,
            Partials.from_arrays(
                rows,
                fired=fired,
                saturated=np.zeros(WIDTH),
                nonfinite=np.zeros(WIDTH),
                abs_sum=live * rows,
                sum=live * rows,
                sq_sum=live * rows,
                max=live,
                min=np.zeros(WIDTH),
                histogram=np.zeros(16),
            ),
        )
        engine.set_wiring(
            layer,
            Wiring(
                producer=f"fc{i}",
                consumer=f"fc{i + 1}",
                produces=(
                    ParamRef(f"fc{i}.weight", (WIDTH, WIDTH), 0),
                    ParamRef(f"fc{i}.bias", (WIDTH,), 0),
                ),
                consumes=(ParamRef(f"fc{i + 1}.weight", (WIDTH, WIDTH), 1),),
            ),
        )
    report = folder / "report"
    Report.from_snapshot(engine.snapshot()).save(report)
    return path, report, 2 * layers


def measure(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        assert process.stderr is not None
        raise SystemExit(f"{command[:4]} failed: {process.stderr.read().decode()}")
    return elapsed, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def set_cache(cache: str, source: Path) -> None:
    """Read ``source`` into the page cache (``warm``) or evict its pages (``cold``)."""
    with source.open("rb") as handle:
        if cache == "cold":
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            return
        while handle.read(2**24):
            pass


def paired(
    ours: list[str],
    baselines: dict[str, list[str]],
    runs: int,
    clean: list[Path],
    copies: list[Path],
    cache: str,
    source: Path,
) -> dict[str, float]:
    """Median of ``ours`` / each baseline over ``runs`` rounds run in turn (after one warm-up
    round), and medians of ours' time and peak RSS; each command starts with ``source`` in the
    page cache state ``cache``."""
    times: list[float] = []
    rss: list[int] = []
    ratios: dict[str, list[float]] = {name: [] for name in baselines}

    def fresh(paths: list[Path]) -> None:
        # Every command writes a new file, and none pays for the previous one's writeback:
        # its output is deleted and the disk is synced before it (without this, a `cp` right
        # after another command's 1 GiB measured 5x slower than a `cp` on a quiet disk).
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        os.sync()
        set_cache(cache, source)

    for index in range(runs + 1):  # the first round warms the page cache and is not counted
        fresh(clean)
        ours_time, ours_rss = measure(ours)
        for name, command in baselines.items():
            fresh(copies)
            base_time, _ = measure(command)
            if index:
                ratios[name].append(ours_time / base_time)
        if index:
            times.append(ours_time)
            rss.append(ours_rss)
    result = {name: statistics.median(values) for name, values in ratios.items()}
    result["time"] = statistics.median(times)
    result["rss"] = statistics.median(rss)
    return result


def bench_checkpoint(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        # Made by a child process: a child forked from a parent holding the tensors would
        # count the parent's pages in its own peak RSS.
        made = subprocess.run(
            [sys.executable, __file__, "--make", str(folder), "--gib", str(args.gib)],
            check=True,
            capture_output=True,
            text=True,
        )
        count = int(made.stdout.split()[-1])
        path, report = folder / "model.safetensors", folder / "report"
        size = path.stat().st_size
        print(
            f"checkpoint: {size / 2**30:.2f} GiB, {count} tensors (Linear {WIDTH}x{WIDTH} "
            f"float32 + bias), {DEAD_SHARE:.0%} of each hidden layer dead"
        )
        cli = [sys.executable, "-c", "from neuronwatch.cli.rescue import rescue; rescue()"]
        copy = folder / "copy"
        # Like for like: rescue leaves its output to the kernel's writeback as cp does, and with
        # --fsync waits for the disk before renaming it into place, as cp followed by sync does.
        baselines = {
            "": ["cp", str(path), str(copy)],
            "--fsync": ["sh", "-c", f'cp "{path}" "{copy}" && sync "{copy}"'],
        }
        caches = ["warm", "cold"] if args.cache == "both" else [args.cache]
        for cache, op in ((c, o) for c in caches for o in ("prune", "strip")):
            out = folder / f"{op}.safetensors"
            manifest = folder / f"{op}.safetensors.manifest.json"
            ours = [*cli, op, str(path), "--report", str(report), "--out", str(out)]
            for flag, baseline in baselines.items():
                command = [*ours, flag] if flag else ours
                name = "cp+sync" if flag else "cp"
                result = paired(
                    command, {name: baseline}, args.runs, [out, manifest, copy], [copy], cache, path
                )
                mib = 2**20
                print(
                    f"{cache} {op:6s}{flag:8s} time {result[name]:.2f}x {name:7s} (median of "
                    f"{args.runs} paired runs; {result['time']:.2f} s)   peak RSS "
                    f"{result['rss'] / size:.3f}x file size ({result['rss'] / mib:.0f} MiB)   "
                    f"manifest {manifest.stat().st_size / mib:.1f} MiB"
                )


def bench_onnx(args: argparse.Namespace) -> None:
    """Prune an MLP exported to ONNX with half of each hidden layer dead: file and latency."""
    import onnxruntime as ort  # type: ignore[import-untyped]
    import torch
    from torch import nn

    import neuronwatch
    from neuronwatch import rescue

    width = args.onnx_width
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(256, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, 10),
    ).eval()
    with torch.no_grad():
        for layer in list(model)[0:6:2]:
            assert isinstance(layer, nn.Linear)
            layer.bias[: width // 2] = -100.0
    x = torch.randn(2000, 256)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        with neuronwatch.watch(model, compile=False, min_rows=100) as monitor:
            model(x)
            monitor.report().save(folder / "report")
        torch.onnx.export(
            model,
            (x[:2],),
            str(folder / "m.onnx"),
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "b"}},
        )
        rescue.prune(folder / "m.onnx", folder / "report", folder / "pruned.onnx")
        sizes = [(folder / n).stat().st_size for n in ("m.onnx", "pruned.onnx")]
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        sessions = [
            ort.InferenceSession(str(folder / n), options, providers=["CPUExecutionProvider"])
            for n in ("m.onnx", "pruned.onnx")
        ]
        batch = {"x": x[:256].numpy()}
        outputs = [s.run(None, batch)[0] for s in sessions]
        error = float(np.abs(outputs[0] - outputs[1]).max())
        ratios = []
        for _ in range(args.onnx_reps):
            timings = []
            for session in sessions:
                started = time.perf_counter()
                session.run(None, batch)
                timings.append(time.perf_counter() - started)
            ratios.append(timings[1] / timings[0])
    print(
        f"onnx prune (MLP 256-{width}x3-10, half of each hidden layer dead): file "
        f"{sizes[1] / sizes[0]:.2f}x ({sizes[0] / 2**20:.1f} -> {sizes[1] / 2**20:.1f} MiB), "
        f"inference {statistics.median(ratios):.2f}x (median of {args.onnx_reps} paired "
        f"batches of 256, 1 thread), max output difference {error:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="checkpoint size")
    parser.add_argument("--runs", type=int, default=3, help="paired runs per op")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (same disk)")
    parser.add_argument(
        "--cache", choices=["warm", "cold", "both"], default="both", help="page cache state"
    )
    parser.add_argument("--onnx-width", type=int, default=2048)
    parser.add_argument("--onnx-reps", type=int, default=30)
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make is not None:
        print(make_checkpoint(args.make, args.gib)[2])
        return
    bench_checkpoint(args)
    if not args.skip_onnx:
        bench_onnx(args)


if __name__ == "__main__":
    main()
