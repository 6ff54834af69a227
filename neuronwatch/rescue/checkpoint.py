"""What every checkpoint format offers rescue: its tensors by name, reading one, writing all.

A format is a small class behind :class:`Checkpoint`; the ops never see files. Writing goes
through a :class:`TensorEditor`, called once per tensor the plan touches, while the format
streams everything else through unchanged.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from ..errors import CheckpointError
from .outputs import Stage

__all__ = [
    "BackgroundDigest",
    "Checkpoint",
    "CheckpointError",
    "FileDigest",
    "QueuedDigest",
    "TensorEditor",
    "TensorInfo",
    "WriteResult",
    "checksum_file",
]

# The manifest's checksum. BLAKE3 hashes ~4x faster than SHA-256 here (7 GB/s against 1.8 GB/s
# on one core with SHA extensions), and every rescue hashes each input and output byte once:
# with SHA-256 the two checksums alone took longer than `cp` of the file. `b3sum FILE` checks a
# file against its manifest (or `blake3.blake3(data).hexdigest()` in Python).
CHECKSUM = "blake3"


def new_hasher() -> Any:
    """A fresh BLAKE3 hasher (imported here: only rescue needs it)."""
    from blake3 import blake3

    return blake3()


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint. ``dtype`` uses the names of :mod:`.dtypes`; ``tied`` marks a
    tensor sharing its storage with another one, ``tied_to`` (editing one would silently edit or
    untie the other, so rescue leaves it alone). ``stored`` is False for a name that is only an
    alias of ``tied_to`` (safetensors' ``save_model`` keeps one copy of tied weights)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    tied: bool = False
    tied_to: str | None = None
    stored: bool = True


@dataclass(frozen=True)
class FileDigest:
    """One file read or written, its :data:`CHECKSUM` (hex) and size."""

    path: str
    digest: str
    bytes: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, CHECKSUM: self.digest, "bytes": self.bytes}

    def named(self, path: str) -> FileDigest:
        """The same digest under the name the file will have once renamed into place."""
        return FileDigest(path, self.digest, self.bytes)


@dataclass
class WriteResult:
    """What a format wrote: the output files, the input files it read, and format notes
    (optimizer moments reset, graph nodes rewritten) for the manifest."""

    outputs: list[FileDigest]
    inputs: list[FileDigest]
    notes: dict[str, Any] = field(default_factory=dict)


class TensorEditor(Protocol):
    """The plan, as a format sees it while writing."""

    def touches(self, name: str) -> bool: ...

    def new_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]: ...

    def apply(self, name: str, raw: NDArray[Any], dtype: str) -> NDArray[Any]:
        """The edited stored values of ``name`` (element type ``dtype``, see :mod:`.dtypes`)."""
        ...

    def apply_moment(self, name: str, raw: NDArray[Any]) -> NDArray[Any]:
        """An optimizer moment of parameter ``name`` (same shape as the parameter) after the
        edit: deleted where the parameter was, zero wherever its values changed."""
        ...


class Checkpoint(Protocol):
    """A checkpoint opened for rescue. Opening validates the file; reading never modifies it."""

    path: Path
    format: str

    def tensors(self) -> Mapping[str, TensorInfo]: ...

    def input_files(self) -> list[Path]:
        """Every file the checkpoint is read from (an output must never be one of them)."""
        ...

    def read(self, name: str) -> NDArray[np.float64]:
        """One tensor's values as float64 (for the plan's preparation, e.g. folding)."""
        ...

    def write(self, out: Path, editor: TensorEditor, stage: Stage) -> WriteResult:
        """Write the edited checkpoint to ``out`` through temporary paths from ``stage``
        (renamed into place by the caller once everything succeeded); digests name ``out``."""
        ...


_CHUNK = 1 << 24


class BackgroundDigest:
    """:func:`checksum_file` of an input on another thread, while the output is being written
    (hashing releases the GIL: on two cores the input's checksum costs no wall time)."""

    def __init__(self, path: Path) -> None:
        self._result: list[FileDigest | BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(path,), daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self._result.append(checksum_file(path))
        except BaseException as exc:  # handed to the caller of result()
            self._result.append(exc)

    def result(self) -> FileDigest:
        self._thread.join()
        outcome = self._result[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class QueuedDigest:
    """The checksum of the buffers a writer hands over, computed on another thread so the writer
    moves on at once (with the input hashed by :class:`BackgroundDigest`, both checksums run
    beside the copy on two cores). At most ``depth`` buffers wait; a buffer must not change
    after :meth:`update`. :meth:`close` ends the thread (also after an error)."""

    def __init__(self, depth: int = 4) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._digest = new_hasher()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            self._digest.update(item)

    def update(self, data: Any) -> None:
        self._queue.put(data)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def hexdigest(self) -> str:
        self.close()
        return str(self._digest.hexdigest())


def checksum_file(path: Path) -> FileDigest:
    digest = new_hasher()
    size = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with path.open("rb") as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
            size += count
    return FileDigest(str(path), digest.hexdigest(), size)
