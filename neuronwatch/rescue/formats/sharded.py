"""Sharded checkpoints in the Hugging Face layout: an index JSON mapping each tensor to a shard.

The checkpoint is a folder (or its ``*.index.json``); shards are safetensors or PyTorch files
named by the index, which must sit in the same folder. The output is a new folder written shard
by shard (each streamed as its format streams), with the index's ``total_size`` updated to the
new widths, and the folder's small side files (``config.json``, tokenizer files) copied over.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from ..checkpoint import (
    CheckpointError,
    FileDigest,
    TensorEditor,
    TensorInfo,
    WriteResult,
    sha256_file,
)
from ..dtypes import nbytes
from ..outputs import Stage
from .safetensors import SafetensorsCheckpoint

__all__ = ["ShardedCheckpoint", "find_index"]

# Weights never copied as side files: they are the shards, or another copy of the weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack")


class _Shard(Protocol):
    def tensors(self) -> Mapping[str, TensorInfo]: ...

    def read(self, name: str) -> NDArray[np.float64]: ...

    def write_to(
        self, target: Path, editor: TensorEditor, final: Path
    ) -> tuple[FileDigest, FileDigest, dict[str, Any]]: ...


def find_index(folder: Path) -> Path | None:
    found = sorted(folder.glob("*.index.json"))
    # Prefer the safetensors index when a repository ships both formats.
    found.sort(key=lambda p: "safetensors" not in p.name)
    return found[0] if found else None


def _open_shard(path: Path) -> _Shard:
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint(path)
    from .torch_pickle import TorchCheckpoint

    return TorchCheckpoint(path)


class ShardedCheckpoint:
    format = "sharded"

    def __init__(self, path: Path) -> None:
        index = path if path.is_file() else find_index(path)
        if index is None:
            raise CheckpointError(f"{path} holds no *.index.json (a sharded checkpoint's index)")
        self.path = index.parent
        self.index_path = index
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{index} is not a readable index JSON: {exc}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(f"{index} has no weight_map of tensor names to shard files")
        self.index = data
        self.weight_map: dict[str, str] = weight_map
        self.shards: dict[str, _Shard] = {}
        for shard in dict.fromkeys(weight_map.values()):
            if Path(shard).name != shard or shard in (".", ".."):
                raise CheckpointError(
                    f"{index} names shard {shard!r} outside its folder; refusing to read it"
                )
            self.shards[shard] = _open_shard(self.path / shard)
        self._infos: dict[str, TensorInfo] = {}
        for shard, checkpoint in self.shards.items():
            for name, info in checkpoint.tensors().items():
                if weight_map.get(name) != shard:
                    raise CheckpointError(
                        f"{index} and its shards disagree: {shard} holds {name!r}, the index "
                        f"says {weight_map.get(name)!r}"
                    )
                self._infos[name] = info
        missing = [name for name in weight_map if name not in self._infos]
        if missing:
            raise CheckpointError(f"{index} lists tensors no shard holds: {', '.join(missing[:5])}")

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def input_files(self) -> list[Path]:
        return [self.path, self.index_path, *(self.path / shard for shard in self.shards)]

    def read(self, name: str) -> NDArray[np.float64]:
        return self.shards[self.weight_map[name]].read(name)

    def write(self, out: Path, editor: TensorEditor, stage: Stage) -> WriteResult:
        folder = stage.directory(out)
        inputs: list[FileDigest] = [sha256_file(self.index_path)]
        outputs: list[FileDigest] = []
        for shard, checkpoint in self.shards.items():
            digest_in, digest_out, _ = checkpoint.write_to(folder / shard, editor, out / shard)
            inputs.append(digest_in)
            outputs.append(digest_out)
        total = sum(
            nbytes(editor.new_shape(n, i.shape) if editor.touches(n) else i.shape, i.dtype, n)
            for n, i in self._infos.items()
        )
        index = dict(self.index)
        index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
        target = folder / self.index_path.name
        target.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        written = sha256_file(target)
        outputs.append(FileDigest(str(out / self.index_path.name), written.sha256, written.bytes))
        copied = []
        for side in sorted(self.path.iterdir()):
            if (
                side.is_file()
                and side != self.index_path
                and side.name not in self.shards
                and not side.name.endswith(_WEIGHT_SUFFIXES)
                and not side.name.startswith(".")
            ):
                shutil.copy2(side, folder / side.name)
                copied.append(side.name)
        for item in folder.iterdir():
            if item.is_file():
                with item.open("rb") as handle:
                    os.fsync(handle.fileno())
        return WriteResult(outputs=outputs, inputs=inputs, notes={"copied": copied})
