"""Outputs appear whole or not at all: staged under temporary names, renamed together.

A rescue run writes one to three outputs (a checkpoint file or directory, an ONNX model and its
external data, the manifest). Each is written under a temporary name next to its target; once
all of them are complete they are renamed into place, the manifest last, and a failure halfway
puts back whatever was there before. On any error every temporary file is removed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["Stage", "staged"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Stage:
    """Temporary paths for targets; :meth:`commit` renames them into place in order."""

    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def file(self, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        self._pending.append((Path(name), target))
        return Path(name)

    def directory(self, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        name = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        self._pending.append((Path(name), target))
        return Path(name)

    def commit(self) -> None:
        done: list[tuple[Path, Path | None, list[bool]]] = []  # target, its old version, renamed
        try:
            for temp, target in self._pending:
                backup: Path | None = None
                if target.exists() or target.is_symlink():
                    backup = target.with_name(f".{target.name}.{os.getpid()}.old")
                    _remove(backup)
                    os.replace(target, backup)
                renamed = [False]
                done.append((target, backup, renamed))
                if temp.is_file():
                    # mkstemp's private 0600 would hide the output from other users.
                    umask = os.umask(0o022)
                    os.umask(umask)
                    os.chmod(temp, 0o666 & ~umask)
                os.replace(temp, target)
                renamed[0] = True
        except BaseException:
            for target, backup, renamed in reversed(done):
                if renamed[0]:
                    _remove(target)
                if backup is not None:
                    os.replace(backup, target)
            raise
        for _, backup, _ in done:
            if backup is not None:
                _remove(backup)
        self._pending.clear()

    def discard(self) -> None:
        for temp, _ in self._pending:
            _remove(temp)
        self._pending.clear()


@contextmanager
def staged() -> Iterator[Stage]:
    """A :class:`Stage` whose temporary files are removed unless :meth:`Stage.commit` ran."""
    stage = Stage()
    try:
        yield stage
    finally:
        stage.discard()
