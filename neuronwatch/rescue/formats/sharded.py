"""Sharded checkpoints in the Hugging Face layout: an index JSON mapping each tensor to a shard.

The checkpoint is a folder (or its ``*.index.json``); shards are safetensors or PyTorch files
named by the index, which must sit in the same folder. The output is a new folder written shard
by shard (each streamed as its format streams), with the index's ``total_size`` updated to the
new widths, and the folder's small side files (``config.json``, tokenizer files) copied over.
"""

from __future__ import annotations

import errno
import json
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
    checksum_file,
)
from ..dtypes import nbytes, stored_bytes
from ..outputs import Stage
from .safetensors import SafetensorsCheckpoint

__all__ = ["ShardedCheckpoint", "find_index"]

# Weights never copied as side files: they are the shards, or another copy of the weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".h5", ".msgpack")


class _Shard(Protocol):
    def tensors(self) -> Mapping[str, TensorInfo]: ...

    def read(self, name: str) -> NDArray[np.float64]: ...

    def write_to(
        self, target: Path, editor: TensorEditor, final: Path, writeback: bool = False
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
        metadata = data.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise CheckpointError(
                f'{index}: "metadata" must be an object (it holds total_size), got '
                f"{type(metadata).__name__}; fix or delete that entry"
            )
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
                if not info.stored and name not in weight_map:
                    self._infos[name] = info  # a tied name the shard keeps one copy for
                    continue
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
        inputs: list[FileDigest] = [checksum_file(self.index_path)]
        outputs: list[FileDigest] = []
        for shard, checkpoint in self.shards.items():
            digest_in, digest_out, _ = checkpoint.write_to(
                folder / shard, editor, out / shard, stage.fsync
            )
            inputs.append(digest_in)
            outputs.append(digest_out)
        index = dict(self.index)
        index["metadata"] = {**(index.get("metadata") or {}), "total_size": self._total(editor)}
        target = folder / self.index_path.name
        target.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        written = checksum_file(target)
        outputs.append(written.named(str(out / self.index_path.name)))
        notes = self._copy_side_files(folder)
        return WriteResult(outputs=outputs, inputs=inputs, notes=notes)

    def _total(self, editor: TensorEditor) -> int:
        """The index's ``total_size`` after the edit: the bytes of every tensor written, or,
        when a type this module does not know leaves that open, the stated total changed by
        what the edit removed."""
        stored = {n: i for n, i in self._infos.items() if i.stored}
        sizes = [stored_bytes(i.shape, i.dtype) for i in stored.values()]
        change = sum(
            nbytes(editor.new_shape(n, i.shape), i.dtype, n) - nbytes(i.shape, i.dtype, n)
            for n, i in stored.items()
            if editor.touches(n)
        )
        stated = (self.index.get("metadata") or {}).get("total_size")
        if None in sizes and isinstance(stated, int) and not isinstance(stated, bool):
            return stated + change
        return sum(size or 0 for size in sizes) + change

    def _copy_side_files(self, folder: Path) -> dict[str, list[str]]:
        """Copy what sits beside the shards (config, tokenizer files and folders) into
        ``folder``. Other weights (another format, a subfolder holding checkpoints) are not
        copied: they were not edited and would no longer match; the notes name them."""
        copied: list[str] = []
        skipped: list[str] = []
        for side in sorted(self.path.iterdir()):
            if side == self.index_path or side.name in self.shards or side.name.startswith("."):
                continue
            if side.is_dir():
                if any(_is_weights(p) for p in side.rglob("*")):
                    skipped.append(f"{side.name}/")
                    continue
                _copying(shutil.copytree, side, folder / side.name)
                copied.append(f"{side.name}/")
            elif side.is_file():
                if _is_weights(side):
                    skipped.append(side.name)
                    continue
                _copying(shutil.copy2, side, folder / side.name)
                copied.append(side.name)
        notes = {"copied": copied}
        if skipped:
            notes["not_copied"] = skipped
        return notes


def _copying(copy: Any, source: Path, destination: Path) -> None:
    """``copy(source, destination)``, its failure told as the destination's (a full disk is
    where the output goes, not the input; ``copytree`` lists every file that failed)."""
    try:
        copy(source, destination)
    except shutil.Error as exc:
        failures = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
        why = failures[0][2] if failures and len(failures[0]) == 3 else str(exc)
        message = f"copying {source.name} failed: {why}"
        raise OSError(errno.EIO, message, str(destination.parent)) from exc
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(destination.parent)) from exc


def _is_weights(path: Path) -> bool:
    # Another index (pytorch_model.bin.index.json beside the safetensors one) names weights
    # that are not copied either.
    return path.name.endswith((*_WEIGHT_SUFFIXES, ".index.json"))
