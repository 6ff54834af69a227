"""Checkpoint formats: one module each, chosen by :func:`open_checkpoint`.

Only ``safetensors`` and ``sharded`` (with safetensors shards) work without extras; PyTorch
files need ``torch`` and ONNX models ``onnx``, imported when such a file is opened.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import Checkpoint, CheckpointError

__all__ = ["TORCH_SUFFIXES", "open_checkpoint"]

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _sniff(path: Path) -> str | None:
    try:
        with path.open("rb") as handle:
            head = handle.read(9)
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from exc
    if head.startswith(b"PK\x03\x04") or head[:2] == b"\x80\x02":
        return "torch"  # torch.save's zip archive, or the legacy pickle
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 27:
        return "safetensors"
    return None


def open_checkpoint(
    path: str | Path, *, state_key: str | None = None, trust_optimizer_order: bool = False
) -> Checkpoint:
    """Open ``path`` for rescue: a ``.safetensors`` file, a PyTorch file (``.pt``, ``.pth``,
    ``.bin``, ``.ckpt``), an ``.onnx`` model, or a sharded folder (or its ``*.index.json``).

    The file is validated here; every problem is a :class:`CheckpointError` naming it.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} not found")
    if path.is_dir() or path.name.endswith(".index.json"):
        from .sharded import ShardedCheckpoint

        return ShardedCheckpoint(path)
    kind = {".safetensors": "safetensors", ".onnx": "onnx"}.get(path.suffix)
    if kind is None and path.suffix in TORCH_SUFFIXES:
        kind = "torch"
    kind = kind or _sniff(path)
    if kind == "safetensors":
        from .safetensors import SafetensorsCheckpoint

        return SafetensorsCheckpoint(path)
    if kind == "torch":
        from .torch_pickle import TorchCheckpoint

        return TorchCheckpoint(
            path, state_key=state_key, trust_optimizer_order=trust_optimizer_order
        )
    if kind == "onnx":
        from .onnx import OnnxCheckpoint

        return OnnxCheckpoint(path)
    raise CheckpointError(
        f"{path}: unknown checkpoint format; rescue reads .safetensors, .pt/.pth/.bin/.ckpt "
        "(PyTorch), .onnx, and sharded folders with an *.index.json"
    )
