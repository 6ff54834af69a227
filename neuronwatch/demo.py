"""The classic dead-ReLU experiment on real data, watched by neuronwatch.

A 5x128 ReLU MLP trained on scikit-learn's handwritten digits (bundled with the wheel, so
nothing is downloaded) with Adam at a learning rate high enough to push many ReLUs into their
zero region for good; then the same network, same seed and same initial weights, with
LeakyReLU. Each epoch is one window: a ReLU neuron that never fired during the last epoch is
*dead* (it passes no gradient), a LeakyReLU neuron that never fired is *leaking* (its negative
slope still passes gradient, so it can come back).

>>> run = train("relu", epochs=3)                      # doctest: +SKIP
>>> run.report.count("dead") / run.report.neurons      # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

import neuronwatch
from neuronwatch.errors import ConfigError, MissingExtraError
from neuronwatch.report import Report
from neuronwatch.stats import LayerStats

# The demo's extras are imported here, not in the CLI, so a missing one disables this command
# only, with one line naming the install command.
try:
    import torch
    from torch import nn
except ImportError as exc:
    raise MissingExtraError("torch", "demo") from exc
try:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
except ImportError as exc:
    raise MissingExtraError("scikit-learn", "demo") from exc

__all__ = [
    "ACTIVATIONS",
    "DEFAULT_EPOCHS",
    "DEFAULT_LR",
    "DEFAULT_SEED",
    "Digits",
    "EpochRecord",
    "Run",
    "build_model",
    "epoch_batches",
    "load_data",
    "run_demo",
    "train",
]

DATASET = "sklearn.datasets.load_digits"
# Chosen so that the contrast holds for every seed 0-9, not for one tuned seed (see
# examples/demo_seeds.py, which prints the table the README quotes): the ReLU run ends with
# more than a third of its hidden neurons dead and its last hidden layer more than half dead,
# while the LeakyReLU run, from the same initial weights, has none dead. The training run is
# chaotic, so exact counts move with floating-point details between machines; the margins do
# not. Both runs together take ~6 s on a 2-core CPU.
DEFAULT_EPOCHS = 30
DEFAULT_SEED = 6
DEFAULT_LR = 1e-2
BATCH_SIZE = 16
OPTIMIZER_TEXT = f"Adam lr {DEFAULT_LR:g}, batch {BATCH_SIZE}"
HIDDEN_LAYERS = 5
WIDTH = 128
TEST_SHARE = 0.2
# The split does not move with the training seed, so every run is scored on the same digits.
SPLIT_SEED = 0

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
}


@dataclass(frozen=True)
class Digits:
    """Standardised 8x8 digits: 64 features per row, labels 0-9."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass(frozen=True)
class EpochRecord:
    """What one epoch ended with; ``layers`` is the epoch's window, judged."""

    model: str
    epoch: int
    epochs: int
    loss: float
    test_accuracy: float
    layers: Mapping[str, LayerStats]


@dataclass(frozen=True)
class Run:
    """One finished training run; ``saved`` is the report directory once written."""

    activation: str
    report: Report
    test_accuracy: float
    seconds: float
    saved: Path | None = None


def load_data() -> Digits:
    """The 1797 digits, split 80/20 (stratified, fixed), scaled with train-set statistics."""
    features: NDArray[np.float64]
    labels: NDArray[np.int64]
    features, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=TEST_SHARE, random_state=SPLIT_SEED, stratify=labels
    )
    scaler = StandardScaler().fit(x_train)
    return Digits(
        x_train=torch.as_tensor(scaler.transform(x_train), dtype=torch.float32),
        y_train=torch.as_tensor(y_train, dtype=torch.int64),
        x_test=torch.as_tensor(scaler.transform(x_test), dtype=torch.float32),
        y_test=torch.as_tensor(y_test, dtype=torch.int64),
    )


def build_model(activation: str, inputs: int = 64, classes: int = 10) -> nn.Sequential:
    """``fc1 act1 ... fc5 act5 out``: named modules so reports say ``act3``, not ``5``.

    Activations own no parameters, so the same ``torch.manual_seed`` gives the same initial
    weights whatever the activation.
    """
    try:
        make_activation = ACTIVATIONS[activation]
    except KeyError:
        raise ConfigError(
            f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
        ) from None
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    width_in = inputs
    for i in range(1, HIDDEN_LAYERS + 1):
        modules[f"fc{i}"] = nn.Linear(width_in, WIDTH)
        modules[f"act{i}"] = make_activation()
        width_in = WIDTH
    modules["out"] = nn.Linear(width_in, classes)
    return nn.Sequential(modules)


def epoch_batches(rows: int, shuffle: torch.Generator) -> list[torch.Tensor]:
    """Row indices of one epoch's batches: a fresh permutation cut into ``BATCH_SIZE`` slices
    (the last one smaller), so every row is seen exactly once per epoch."""
    return list(torch.split(torch.randperm(rows, generator=shuffle), BATCH_SIZE))


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return int((model(x).argmax(dim=1) == y).sum()) / len(y)


def train(
    activation: str = "relu",
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    lr: float = DEFAULT_LR,
    data: Digits | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_watch: Callable[[neuronwatch.Monitor], None] | None = None,
) -> Run:
    """Train one MLP on the digits under a neuronwatch monitor and report the last epoch.

    ``on_epoch`` is called after every epoch (for a progress display); ``on_watch`` with the
    monitor before training starts (e.g. to export it: ``PrometheusExporter.add``).
    """
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    started = time.perf_counter()
    data = data if data is not None else load_data()
    # One intra-op thread: the matrices are tiny, so a second thread buys nothing and, on a busy
    # 2-core machine, made each step >10x slower (threads spin waiting for each other). It also
    # makes the result independent of the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report, accuracy = _fit(activation, epochs, seed, lr, data, on_epoch, on_watch)
    finally:
        torch.set_num_threads(threads)
    return Run(activation, report, accuracy, time.perf_counter() - started)


def _fit(
    activation: str,
    epochs: int,
    seed: int,
    lr: float,
    data: Digits,
    on_epoch: Callable[[EpochRecord], None] | None,
    on_watch: Callable[[neuronwatch.Monitor], None] | None = None,
) -> tuple[Report, float]:
    rows = data.x_train.shape[0]
    batches = math.ceil(rows / BATCH_SIZE)  # training steps per epoch (see epoch_batches)

    torch.manual_seed(seed)
    model = build_model(activation)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(seed)

    name = f"digits-mlp-{activation}"
    # One window per epoch, and a neuron is judged only once it has seen a whole epoch of rows.
    with neuronwatch.watch(
        model, name=name, compile=False, window=batches, min_rows=rows
    ) as monitor:
        if on_watch is not None:
            on_watch(monitor)
        accuracy = 0.0
        for epoch in range(1, epochs + 1):
            model.train()
            total_loss = 0.0
            for index in epoch_batches(rows, shuffle):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(data.x_train[index]), data.y_train[index])
                loss.backward()
                optimizer.step()
                monitor.step()
                total_loss += float(loss.detach()) * index.numel()
            with monitor.paused():  # test rows must not enter the training window
                accuracy = _accuracy(model.eval(), data.x_test, data.y_test)
            if on_epoch is not None:
                latest = monitor.latest
                layers = latest.layers("last") if latest is not None else {}
                on_epoch(EpochRecord(name, epoch, epochs, total_loss / rows, accuracy, layers))
        meta: dict[str, Any] = {
            "dataset": DATASET,
            "activation": activation,
            "seed": seed,
            "epochs": epochs,
            "lr": lr,
            "batch_size": BATCH_SIZE,
            "train_rows": rows,
            "test_rows": int(data.x_test.shape[0]),
            "test_accuracy": accuracy,
        }
        report = monitor.report("last", meta=meta)
    return report, accuracy


def run_demo(
    out: Path,
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    lr: float = DEFAULT_LR,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    on_watch: Callable[[neuronwatch.Monitor], None] | None = None,
) -> list[Run]:
    """Train every activation of :data:`ACTIVATIONS` with the same seed, initial weights and
    data, saving each report to ``out/<activation>``."""
    data = load_data()
    runs: list[Run] = []
    for activation in ACTIVATIONS:
        run = train(
            activation,
            epochs=epochs,
            seed=seed,
            lr=lr,
            data=data,
            on_epoch=on_epoch,
            on_watch=on_watch,
        )
        runs.append(dataclasses.replace(run, saved=run.report.save(out / activation)))
    return runs
