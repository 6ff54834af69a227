"""Hand-built reports and checkpoints for the rescue tests (no framework needed)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from neuronwatch import Engine, ParamRef, Report, Wiring


def linear_wiring(producer: str, consumer: str | None, width: int, fan_in: int, out: int) -> Wiring:
    """Wiring of the neurons between two Linear layers (torch naming and axes)."""
    consumes = () if consumer is None else (ParamRef(f"{consumer}.weight", (out, width), 1),)
    return Wiring(
        feature_axis=-1,
        producer=producer,
        consumer=consumer,
        produces=(
            ParamRef(f"{producer}.weight", (width, fan_in), 0),
            ParamRef(f"{producer}.bias", (width,), 0),
        ),
        consumes=consumes,
    )


def mlp_weights(sizes: Sequence[int], seed: int = 0) -> dict[str, NDArray[np.float32]]:
    """``fc1 .. fcN`` weights and biases of an MLP with layer sizes ``sizes``."""
    rng = np.random.default_rng(seed)
    weights = {}
    for i, (fan_in, width) in enumerate(itertools.pairwise(sizes), start=1):
        weights[f"fc{i}.weight"] = rng.normal(size=(width, fan_in)).astype(np.float32)
        weights[f"fc{i}.bias"] = rng.normal(size=width).astype(np.float32)
    return weights


def mlp_report(
    sizes: Sequence[int],
    dead: Mapping[int, Sequence[int]],
    *,
    rows: int = 1200,
    pre: bool = False,
    wiring: Mapping[str, Wiring] | None = None,
    constant: Mapping[int, Mapping[int, float]] | None = None,
    activation: str = "ReLU",
) -> Report:
    """A report of the MLP of :func:`mlp_weights`: hidden layer ``act{i}`` (i from 1) between
    ``fc{i}`` and ``fc{i+1}``, with the neurons ``dead[i]`` never firing (output exactly 0,
    or ``constant[i][n]``; ``activation="Tanh"`` gives tanh values). ``pre`` adds
    ``act{i}:pre`` layers with the pre-activation values."""
    rng = np.random.default_rng(1)
    engine = Engine("mlp")
    hidden = len(sizes) - 2
    for i in range(1, hidden + 1):
        name, width = f"act{i}", sizes[i]
        engine.add_layer(name, activation)
        pre_values = rng.normal(size=(rows, width))
        pre_values[:, list(dead.get(i, ()))] -= 20.0
        post = np.tanh(pre_values) if activation == "Tanh" else np.maximum(pre_values, 0.0)
        for neuron, value in (constant or {}).get(i, {}).items():
            post[:, neuron] = value
        engine.observe(name, post)
        if pre:
            engine.add_layer(f"{name}:pre", None, kind="pre")
            engine.observe(f"{name}:pre", pre_values)
        consumer = f"fc{i + 1}"
        layer_wiring = (wiring or {}).get(name) or linear_wiring(
            f"fc{i}", consumer, width, sizes[i - 1], sizes[i + 1]
        )
        engine.set_wiring(name, layer_wiring)
        if pre:
            engine.set_wiring(f"{name}:pre", layer_wiring)
    return Report.from_snapshot(engine.snapshot())


def save_safetensors(path: Path, tensors: Mapping[str, NDArray[np.generic]]) -> Path:
    from safetensors.numpy import save_file

    save_file(dict(tensors), str(path))
    return path


def file_bytes(path: Path) -> bytes:
    return path.read_bytes()


CLI_SIZES = (8, 16, 12, 4)


def write_cli_files(folder: Path) -> Path:
    """``m.safetensors`` (an MLP of :data:`CLI_SIZES`) and the ``report`` that marks neurons 1
    and 4 of act1 and 7 of act2 dead, in ``folder``: what the CLI tests rescue."""
    from safetensors.numpy import save_file

    save_file(mlp_weights(CLI_SIZES), str(folder / "m.safetensors"))
    mlp_report(CLI_SIZES, {1: [1, 4], 2: [7]}).save(folder / "report")
    return folder


def invoke_rescue(*args: str | Path) -> tuple[int, str]:
    """``neuronwatch rescue ARGS`` in process: exit code and output."""
    from click.testing import CliRunner

    from neuronwatch.cli.rescue import rescue

    result = CliRunner().invoke(rescue, [str(a) for a in args])
    return result.exit_code, result.output
