"""Write files so that a crash never leaves a half-written output behind."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = ["atomic_writer", "write_files_atomic", "write_text_atomic"]

_umask_lock = threading.Lock()


def _new_file_mode(target: Path) -> int:
    """The mode ``open()`` would give ``target``: its current mode if it exists, else 0o666
    minus the umask (mkstemp's private 0o600 would otherwise hide outputs from other users)."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        with _umask_lock:  # the umask can only be read by setting it
            umask = os.umask(0o022)
            os.umask(umask)
        return 0o666 & ~umask


@contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Open a temporary file next to ``path``; on success it is renamed over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _new_file_mode(target))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_writer(path) as handle:
        handle.write(text.encode("utf-8"))


def write_files_atomic(files: Mapping[Path, bytes]) -> None:
    """Replace several files together: all of them, or (on an exception) none.

    Every file is written and synced under a temporary name first; then they are renamed into
    place in the given order, each previous version kept under a hard link until all renames
    succeeded. If a rename fails, the files already renamed get their previous version back.
    Order them so that the last one "commits" (a report's JSON names its npz's checksum): a
    crash between two renames then shows as a mismatch, never as a wrong pair.
    """
    temps: list[tuple[Path, Path]] = []
    backups: list[tuple[Path, Path | None, list[bool]]] = []  # target, backup, [renamed]
    try:
        for target, data in files.items():
            fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
            temps.append((Path(name), target))
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(name, _new_file_mode(target))
        for tmp, target in temps:
            backup: Path | None = None
            if target.exists():
                backup = target.with_name(f".{target.name}.{os.getpid()}.bak")
                backup.unlink(missing_ok=True)
                os.link(target, backup)
            renamed = [False]
            backups.append((target, backup, renamed))
            os.replace(tmp, target)
            renamed[0] = True
    except BaseException:
        for target, backup, renamed in reversed(backups):
            if not renamed[0]:
                continue
            if backup is not None:
                os.replace(backup, target)
            else:
                target.unlink(missing_ok=True)
        raise
    finally:
        for leftover, _ in temps:
            leftover.unlink(missing_ok=True)
        for _, backup, _ in backups:
            if backup is not None:
                backup.unlink(missing_ok=True)
