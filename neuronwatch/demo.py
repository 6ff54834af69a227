"""The classic dead-ReLU experiment on real data, watched by neuronwatch.

A 5x128 ReLU MLP trained on scikit-learn's handwritten digits (bundled with the wheel, so
nothing is downloaded) with Adam at a learning rate high enough to push many ReLUs into their
zero region for good; then the same network, same seed and same initial weights, with
LeakyReLU. Each epoch is one window, so *dead* means "never fired during the last epoch".

>>> run = train("relu", epochs=3)                      # doctest: +SKIP
>>> run.report.count("dead") / run.report.neurons      # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from neuronwatch.errors import ConfigError, MissingExtraError
from neuronwatch.report import Report
from neuronwatch.stats import LayerStats

# The demo's extras are imported here, not in the CLI, so a missing one disables this command
# only, with one line naming the install command.
try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise MissingExtraError("torch", "demo") from exc
try:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler
except ImportError as exc:  # pragma: no cover - exercised only without the extra
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
    "load_data",
    "train",
]

DATASET = "sklearn.datasets.load_digits"
# Measured on this 2-core CPU: with these settings the ReLU run ends with ~38 % of its hidden
# neurons dead (see the e2e test); the whole demo (both runs) takes well under a minute.
DEFAULT_EPOCHS = 30
DEFAULT_SEED = 3
DEFAULT_LR = 1e-2
BATCH_SIZE = 32
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

    epoch: int
    epochs: int
    loss: float
    test_accuracy: float
    layers: Mapping[str, LayerStats]


@dataclass(frozen=True)
class Run:
    activation: str
    report: Report
    test_accuracy: float
    seconds: float


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


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train(
    activation: str = "relu",
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = DEFAULT_SEED,
    lr: float = DEFAULT_LR,
    data: Digits | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> Run:
    """Train one MLP on the digits under a neuronwatch monitor and report the last epoch.

    ``on_epoch`` is called after every epoch (for a progress display).
    """
    import neuronwatch  # the face: ``watch`` lives there; imported late to avoid a cycle

    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    started = time.perf_counter()
    data = data if data is not None else load_data()
    rows = data.x_train.shape[0]
    batches = -(-rows // BATCH_SIZE)  # the last, smaller batch still counts

    torch.manual_seed(seed)
    model = build_model(activation)
    # Test accuracy is measured on an unwatched twin so test rows never enter the window.
    evaluator = build_model(activation)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(seed)

    name = f"digits-mlp-{activation}"
    # One window per epoch, and a neuron is judged only once it has seen a whole epoch of rows.
    with neuronwatch.watch(model, name=name, compile=False, window=batches, min_rows=rows) as monitor:
        accuracy = 0.0
        for epoch in range(1, epochs + 1):
            model.train()
            order = torch.randperm(rows, generator=shuffle)
            total_loss = 0.0
            for start in range(0, rows, BATCH_SIZE):
                index = order[start : start + BATCH_SIZE]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(data.x_train[index]), data.y_train[index])
                loss.backward()
                optimizer.step()
                monitor.step()
                total_loss += float(loss) * index.numel()
            evaluator.load_state_dict(model.state_dict())
            accuracy = _accuracy(evaluator.eval(), data.x_test, data.y_test)
            if on_epoch is not None:
                latest = monitor.latest
                layers = latest.layers("last") if latest is not None else {}
                on_epoch(EpochRecord(epoch, epochs, total_loss / rows, accuracy, layers))
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
    return Run(activation, report, accuracy, time.perf_counter() - started)
