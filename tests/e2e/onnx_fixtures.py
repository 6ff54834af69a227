"""Small torch models, their ONNX exports and the two audits the ONNX tests compare."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from neuronwatch.adapters.onnx import audit
from torch import nn

import neuronwatch
from neuronwatch import Report

DEAD = [1, 5, 9]  # planted: fc1 neurons whose bias keeps them below zero on every input


class MLP(nn.Module):
    """fc1 -> ReLU (planted dead neurons) -> fc2 -> GELU -> head; 2-D inputs (Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 12)
        self.act2 = nn.GELU()
        self.head = nn.Linear(12, 3)
        with torch.no_grad():
            self.fc1.bias[DEAD] = -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.fc2(self.act(self.fc1(x)))))


class Encoder(nn.Module):
    """Embedding -> 2 TransformerEncoderLayers (GELU, functional) -> head; pads via mask."""

    def __init__(self, vocab: int = 40, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(
            width, 2, hidden, dropout=0.0, activation="gelu", batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        # The encoder's layers are deep copies: make every parameter distinct, or exporters
        # deduplicate equal initializers into one shared tensor.
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
        return self.head(hidden)


class ConvNet(nn.Module):
    """conv1 -> relu -> conv2 -> relu (the same module again) -> pool -> fc: channels axis 1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)
        with torch.no_grad():
            self.conv1.bias[2] = -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def mlp_batches(n: int = 4, rows: int = 64) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((rows, 8)).astype(np.float32)} for _ in range(n)]


def encoder_batches(n: int = 3, batch: int = 4, tokens: int = 9) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    out = []
    for _ in range(n):
        mask = np.ones((batch, tokens), np.int64)
        for row in range(batch):
            mask[row, rng.integers(2, tokens) :] = 0  # padded tails of varying length
        out.append({"input_ids": rng.integers(0, 40, (batch, tokens)), "attention_mask": mask})
    return out


def conv_batches(n: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"x": rng.standard_normal((2, 3, 10, 10)).astype(np.float32)} for _ in range(n)]


MODELS: dict[str, tuple[type[nn.Module], Any]] = {
    "mlp": (MLP, mlp_batches),
    "encoder": (Encoder, encoder_batches),
    "conv": (ConvNet, conv_batches),
}


def export(model: nn.Module, batch: dict[str, np.ndarray], path: Path, dynamo: bool) -> Path:
    """Export with torch's legacy (TorchScript) or dynamo exporter, every axis but the features
    dynamic for the first input's batch (and tokens for 2-D integer inputs)."""
    names = list(batch)
    args = tuple(torch.from_numpy(batch[name]) for name in names)
    axes = {
        name: ({0: "batch", 1: "tokens"} if batch[name].dtype == np.int64 else {0: "batch"})
        for name in names
    }
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            if dynamo:
                shapes = {n: {a: torch.export.Dim.AUTO for a in axes[n]} for n in names}
                torch.onnx.export(
                    model, args, str(path), dynamo=True, input_names=names,
                    dynamic_shapes=shapes, verbose=False,
                )  # fmt: skip
            else:
                torch.onnx.export(
                    model, args, str(path), dynamo=False, input_names=names,
                    dynamic_axes=axes, opset_version=17,
                )  # fmt: skip
        finally:
            logging.disable(logging.NOTSET)
    return path


def torch_report(model: nn.Module, batches: list[dict[str, np.ndarray]], **options: Any) -> Report:
    """The torch adapter's report over the same batches (every histogram, eager reductions)."""
    model.eval()
    with neuronwatch.watch(model, histogram_every=1, compile=False, **options) as monitor:
        for batch in batches:
            model(**{k: torch.from_numpy(v) for k, v in batch.items()})
        return monitor.report("lifetime")


def onnx_report(path: Path | str, batches: list[dict[str, np.ndarray]], **options: Any) -> Report:
    return audit(path, iter(batches), provider="cpu", histogram_every=1, **options)


def layer_rows(report: Report) -> Iterator[tuple[str, int, list[int]]]:
    for name, stats in report.layers.items():
        yield name, stats.rows, stats.dead_indices.tolist()
