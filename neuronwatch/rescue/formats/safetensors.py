"""safetensors, read and written tensor by tensor, never loaded whole.

The header is checked before anything else: every tensor's byte range must match its shape and
type, and the ranges must tile the data section exactly (a header that lies about offsets, or a
truncated file, is refused naming the tensor). Writing streams the file in offset order: tensors
the plan does not touch are copied in chunks, each touched tensor is memory-mapped on its own,
edited and written, so memory stays near the largest touched tensor. Both checksums are taken
on the way, in the same single pass.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from io import BufferedReader
from pathlib import Path
from typing import IO, Any, TypeGuard

import numpy as np
from numpy.typing import NDArray

from neuronwatch.writeback import EarlyWriteback

from ..checkpoint import (
    BackgroundDigest,
    CheckpointError,
    FileDigest,
    QueuedDigest,
    TensorEditor,
    TensorInfo,
    WriteResult,
)
from ..dtypes import decode, nbytes, storage_dtype, stored_bytes
from ..outputs import Stage, open_staged

__all__ = ["Header", "SafetensorsCheckpoint", "read_header", "stream_file"]

# The reference implementation refuses headers above 100 MB; so do we, before parsing.
MAX_HEADER = 100_000_000
_CHUNK = 1 << 23


@dataclass(frozen=True)
class Entry:
    info: TensorInfo
    begin: int  # offsets into the data section, as the header states them
    end: int


@dataclass(frozen=True)
class Header:
    path: Path
    data_start: int  # 8 + header length
    entries: tuple[Entry, ...]  # in offset order
    metadata: Mapping[str, str] | None

    def infos(self) -> dict[str, TensorInfo]:
        """Every stored tensor, and every tied name ``save_model`` dropped for a kept one
        (``__metadata__`` maps the dropped name to the kept one), both marked tied."""
        infos = {entry.info.name: entry.info for entry in self.entries}
        aliases = {
            alias: kept
            for alias, kept in (self.metadata or {}).items()
            if alias not in infos and kept in infos
        }
        for alias, kept in aliases.items():
            info = infos[kept]
            infos[alias] = replace(info, name=alias, tied=True, tied_to=kept, stored=False)
            if not info.tied:
                infos[kept] = replace(info, tied=True, tied_to=alias)
        return infos

    def entry(self, name: str) -> Entry:
        for entry in self.entries:
            if entry.info.name == name:
                return entry
        raise CheckpointError(f"{self.path} has no tensor {name!r}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise CheckpointError(f"tensor {key!r} appears twice in the header")
        result[key] = value
    return result


def _ints(value: Any) -> TypeGuard[list[int]]:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    )


def read_header(path: Path) -> Header:
    """Parse and check the header of ``path``; a :class:`CheckpointError` names what is wrong."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path} is too short for a safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length == 0 or length > MAX_HEADER or 8 + length > size:
                raise CheckpointError(
                    f"{path}: header length {length} does not fit a file of {size} bytes "
                    "(truncated, or not a safetensors file)"
                )
            raw = handle.read(length)
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc}") from exc
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: the header is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: the header must be a JSON object")
    metadata = data.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    entries = []
    for name, spec in data.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str):
            raise CheckpointError(f"{where} has no dtype")
        shape, offsets = spec.get("shape"), spec.get("data_offsets")
        if not _ints(shape) or not _ints(offsets) or len(offsets) != 2:
            raise CheckpointError(f"{where}: shape and data_offsets must be non-negative integers")
        begin, end = offsets
        info = TensorInfo(name, tuple(shape), spec["dtype"])
        # A type newer than this module is copied byte for byte; only its range is checked.
        expected = stored_bytes(info.shape, info.dtype)
        if end < begin or (expected is not None and end - begin != expected):
            raise CheckpointError(
                f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes but a "
                f"{info.dtype} tensor of shape {info.shape} needs {expected} (the header lies)"
            )
        entries.append(Entry(info, begin, end))
    entries.sort(key=lambda e: (e.begin, e.end))
    data_bytes = size - 8 - length
    position = 0
    for entry in entries:
        if entry.begin != position:
            kind = "overlaps the previous tensor" if entry.begin < position else "leaves a gap"
            raise CheckpointError(
                f"{path}: tensor {entry.info.name!r} starts at byte {entry.begin}, which {kind} "
                f"(expected {position}): the header lies about offsets"
            )
        position = entry.end
    if position != data_bytes:
        state = "truncated" if position > data_bytes else "followed by stray bytes"
        raise CheckpointError(
            f"{path}: the header describes {position} data bytes but the file holds "
            f"{data_bytes} ({state})"
        )
    return Header(path, 8 + length, tuple(entries), metadata)


def _read_region(path: Path, start: int, count: int) -> NDArray[np.uint8]:
    """A private memory map of ``count`` bytes at ``start`` (an empty array for 0 bytes)."""
    if count == 0:
        return np.empty(0, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(count,))


def read_tensor(header: Header, name: str) -> NDArray[np.float64]:
    entry = header.entry(name)
    info = entry.info
    region = _read_region(header.path, header.data_start + entry.begin, entry.end - entry.begin)
    where = f"{header.path}: tensor {name!r}"
    raw = region.view(storage_dtype(info.dtype, where)).reshape(info.shape)
    values = decode(raw, info.dtype, where).astype(np.float64, copy=False)
    del raw, region  # unmap now: pages of a mapping count towards the process's memory
    return values


def _new_header(header: Header, editor: TensorEditor) -> tuple[bytes, list[tuple[int, int]]]:
    spec: dict[str, Any] = {}
    if header.metadata is not None:
        spec["__metadata__"] = dict(header.metadata)
    sizes = []
    offset = 0
    for entry in header.entries:
        info = entry.info
        if editor.touches(info.name):
            shape = editor.new_shape(info.name, info.shape)
            size = nbytes(shape, info.dtype, info.name)
        else:
            shape, size = info.shape, entry.end - entry.begin  # copied as it is
        spec[info.name] = {
            "dtype": info.dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        sizes.append((offset, size))
        offset += size
    text = json.dumps(spec, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text, sizes


def _copy(
    src: BufferedReader, dst: IO[bytes], count: int, digest: QueuedDigest, early: EarlyWriteback
) -> None:
    while count:
        # A new buffer per chunk: the digest thread may still be reading the previous one.
        chunk = src.read(min(count, _CHUNK))
        if not chunk:
            raise CheckpointError(f"{src.name} ended early: it changed while being read")
        dst.write(chunk)
        digest.update(chunk)
        early.wrote(len(chunk))
        count -= len(chunk)


def stream_file(
    header: Header, out: Path, editor: TensorEditor, final: Path, writeback: bool = False
) -> tuple[FileDigest, FileDigest, dict[str, tuple[int, ...]]]:
    """Write ``header.path`` edited by ``editor`` to ``out``; returns the input and output
    digests (the output named ``final``) and the new shape of every tensor written.
    ``writeback`` starts writing to the disk as it goes, for a caller that will ``fsync``."""
    head, layout = _new_header(header, editor)
    source = header.path
    digest_in = BackgroundDigest(source)
    digest = QueuedDigest()
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with source.open("rb") as src, open_staged(out) as dst:
            dst.write(head)
            digest.update(head)
            early = EarlyWriteback(dst, enabled=writeback)
            for entry, (_, size) in zip(header.entries, layout, strict=True):
                info = entry.info
                count = entry.end - entry.begin
                if not editor.touches(info.name):
                    src.seek(header.data_start + entry.begin)
                    _copy(src, dst, count, digest, early)
                    shapes[info.name] = info.shape
                    continue
                where = f"{source}: tensor {info.name!r}"
                region = _read_region(source, header.data_start + entry.begin, count)
                raw = region.view(storage_dtype(info.dtype, where)).reshape(info.shape)
                edited = np.ascontiguousarray(editor.apply(info.name, raw, info.dtype))
                del raw, region  # unmap: pages of a mapping count towards the process's memory
                new_shape = editor.new_shape(info.name, info.shape)
                if edited.shape != new_shape or edited.nbytes != size:
                    raise CheckpointError(
                        f"{where}: edit gave shape {edited.shape}, not {new_shape}"
                    )
                data = edited.data.cast("B")  # no copy; keeps ``edited`` alive while queued
                dst.write(data)
                digest.update(data)
                early.wrote(len(data))
                shapes[info.name] = new_shape
            written = dst.tell()
        output = FileDigest(str(final), digest.hexdigest(), written)
    finally:
        digest.close()
    return digest_in.result(), output, shapes


class SafetensorsCheckpoint:
    """One ``.safetensors`` file."""

    format = "safetensors"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.header = read_header(path)

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self.header.infos()

    def input_files(self) -> list[Path]:
        return [self.path]

    def read(self, name: str) -> NDArray[np.float64]:
        return read_tensor(self.header, name)

    def write_to(
        self, target: Path, editor: TensorEditor, final: Path, writeback: bool = False
    ) -> tuple[FileDigest, FileDigest, dict[str, Any]]:
        digest_in, digest_out, _ = stream_file(self.header, target, editor, final, writeback)
        return digest_in, digest_out, {}

    def write(self, out: Path, editor: TensorEditor, stage: Stage) -> WriteResult:
        digest_in, digest_out, _ = self.write_to(stage.file(out), editor, out, stage.fsync)
        return WriteResult(outputs=[digest_out], inputs=[digest_in])
