"""Outputs appear whole or not at all: staged under temporary names, renamed together.

A rescue run writes one to three outputs (a checkpoint file or directory, an ONNX model and its
external data, the manifest). Each is written under a temporary name next to its target; once
all of them are complete they are renamed into place, the manifest last, and a failure halfway
puts back whatever was there before. On any error every temporary file is removed. The renames
hold a lock on their folders, so two runs writing the same outputs at once never leave one run's
checkpoint beside the other's manifest, and Ctrl-C, SIGTERM or SIGHUP arriving during them is
delivered once they are done.

Only our own temporary files and folders are ever deleted recursively. A user's path is replaced
only when it is a file (or a symlink) or an empty folder; a folder with anything in it is refused
before a byte is written, since replacing it would delete what the user keeps there. A device
node, FIFO or socket is never replaced (checked when staging and again when renaming). Folders
made to hold an output are removed again (when empty) if the run fails.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from ..errors import ConfigError
from .paths import special_kind

__all__ = ["Stage", "open_staged", "staged"]

log = logging.getLogger(__name__)


def open_staged(path: Path) -> BinaryIO:
    """Open a new output for writing: an empty temporary of :meth:`Stage.file`, or a file
    to be made inside a temporary folder of :meth:`Stage.directory`. Truncates only a file
    that is not empty (any other path a caller passes).

    ``open(path, "wb")`` truncates, and on ext4 truncating a file to zero marks it for
    ``auto_da_alloc``: closing it then allocates every block and starts the writeback of the
    whole file in the closing thread. That cost 0.25 s per GiB here, a third of what ``cp``
    takes for the same file (``cp`` creates its output, it never truncates an empty one).
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if os.fstat(fd).st_size:
            # Not one of ours (those start empty): a caller's own path. Old bytes past the
            # end of the new content would survive otherwise.
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "wb")  # on a descriptor, "w" truncates nothing


@contextmanager
def _locked(folders: Iterable[Path]) -> Iterator[None]:
    """An exclusive ``flock`` on each folder (in one order, so two runs cannot deadlock),
    where the platform has it; a folder that cannot be opened is not locked."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; renames are still atomic one by one
        yield
        return
    held: list[int] = []
    try:
        # Real paths: two runs naming one folder through different symlinks lock it once,
        # in the same order.
        for folder in sorted({folder.resolve() for folder in folders}):
            try:
                fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except OSError:
                continue
            held.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a file system without locks (ENOLCK on some NFS mounts)
                continue
        yield
    finally:
        for fd in reversed(held):
            os.close(fd)  # closing releases the lock


# fsync on a folder: "not supported here" (some file systems, FUSE) is no failure: the files
# themselves are synced. Anything else (EIO) is.
_FOLDER_SYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF}


def _sync_folder(folder: Path) -> None:
    """fsync a folder's entries, where the platform can open a folder (not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _FOLDER_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _remove_ours(path: Path) -> None:
    """Delete a temporary file or folder this module created (never a user's path)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _drop_backup(path: Path) -> None:
    """Delete a replaced target's old version: a file, a symlink, or an empty folder (never
    recursively). The run has committed: a failure here only leaves that name behind."""
    try:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning(
            "the outputs are in place, but the old version %s could not be deleted (%s): "
            "delete it yourself",
            path,
            exc.strerror or exc,
        )


def _refuse_folder(target: Path, folder: bool) -> None:
    """A file output never replaces a folder; a folder output only an empty one; no output
    replaces a device node, FIFO or socket (nor a symlink to one)."""
    special = special_kind(target)
    if special is not None:
        raise ConfigError(
            f"{target} is {special}, not a regular file; refusing to replace it: choose "
            "another path"
        )
    if not target.is_dir() or target.is_symlink():
        return
    if not folder or any(target.iterdir()):
        raise ConfigError(
            f"{target} is an existing folder; refusing to replace it (that would delete what "
            "it holds): choose a new path"
        )


def _backup_name(target: Path) -> Path:
    for n in range(1000):
        candidate = target.with_name(f".{target.name}.{os.getpid()}.{n}.old")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    raise ConfigError(f"cannot find a free backup name beside {target}")


class _Renaming:
    """One temporary being renamed onto its target, and how to undo it at any point."""

    def __init__(self, temp: Path, target: Path) -> None:
        self.temp = temp
        self.target = target
        self.backup: Path | None = None  # the old version's second name, once there is one
        self.linked = False  # backup is a hard link (target still the old file) or a rename

    def undo(self) -> None:
        renamed = not (self.temp.exists() or self.temp.is_symlink())
        has_backup = self.backup is not None and (self.backup.exists() or self.backup.is_symlink())
        if renamed:
            if has_backup:
                assert self.backup is not None
                if self.target.is_dir() and not self.target.is_symlink():
                    _remove_ours(self.target)  # a folder cannot be renamed over
                os.replace(self.backup, self.target)  # the old version back, ours gone
            else:
                _remove_ours(self.target)  # our own output, renamed a moment ago
        elif has_backup:
            assert self.backup is not None
            if self.linked:
                self.backup.unlink()  # the target still is the old file
            else:
                os.replace(self.backup, self.target)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP wait until the renames (or their undo) are done, so a run
    is never left half-committed; each one caught is raised again right after, through the
    handler that was in place. (Blocking them would not do: the kernel hands a signal to any
    thread that does not block it, such as a thread pool's.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python runs signal handlers in the main thread only: nothing to defer here
        return
    caught: list[int] = []

    def remember(signum: int, frame: object) -> None:
        caught.append(signum)

    numbers: list[int] = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGHUP"):
        numbers.append(signal.SIGHUP)
    previous = {number: signal.signal(number, remember) for number in numbers}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        for number in caught:
            signal.raise_signal(number)


class Stage:
    """Temporary paths for targets; :meth:`commit` renames them into place in order.

    With ``fsync``, :meth:`commit` first waits until every temporary file is on the disk, so a
    power cut after the rename finds the whole new file. Without it (the default, as ``cp``,
    ``torch.save`` and ``rsync`` without ``--fsync``) the kernel writes them back later: a
    crashed *process* still leaves nothing behind, and the input is never touched either way;
    only a power cut or a kernel crash in the next half minute could leave an output short,
    and its manifest checksum then tells.
    """

    def __init__(self, fsync: bool = False) -> None:
        self.fsync = fsync  # also read by writers: early writeback only pays when syncing
        self._pending: list[tuple[Path, Path]] = []
        self._made: list[Path] = []  # folders made for the outputs, removed if nothing commits

    def _parent(self, target: Path) -> None:
        """Make ``target``'s folder, remembering each folder that did not exist before."""
        missing = []
        folder = target.parent
        while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
            missing.append(folder)
            folder = folder.parent
        target.parent.mkdir(parents=True, exist_ok=True)
        self._made.extend(missing)

    def file(self, target: Path) -> Path:
        """A new empty temporary file beside ``target``; write it with :func:`open_staged`."""
        _refuse_folder(target, folder=False)
        self._parent(target)
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        self._pending.append((Path(name), target))
        return Path(name)

    def directory(self, target: Path) -> Path:
        _refuse_folder(target, folder=True)
        self._parent(target)
        name = tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        self._pending.append((Path(name), target))
        return Path(name)

    def _sync(self) -> None:
        """Every temporary file on the disk, and every temporary folder's entries (a sharded
        checkpoint's shard names, deepest folder first)."""
        for temp, _ in self._pending:
            if not temp.is_dir():
                with temp.open("rb") as handle:
                    os.fsync(handle.fileno())
                continue
            inside = sorted(temp.rglob("*"), key=lambda path: len(path.parts), reverse=True)
            for item in [*inside, temp]:
                if item.is_symlink():
                    continue
                if item.is_dir():
                    _sync_folder(item)
                elif item.is_file():
                    with item.open("rb") as handle:
                        os.fsync(handle.fileno())

    def commit(self) -> None:
        """Rename every temporary into place, in order; on any failure (or Ctrl-C, SIGTERM)
        put back what was there before."""
        if self.fsync:
            self._sync()  # before any rename: a target is replaced by a whole file or not at all
        # Two runs writing the same outputs at once: each one's renames happen together, so
        # a checkpoint never ends up beside the other run's manifest.
        folders = dict.fromkeys(target.parent for _, target in self._pending)
        with _locked(folders), _signals_deferred():
            replaced = self._rename_all()
            self._pending.clear()
            self._made.clear()  # they hold the outputs now
            for backup in replaced:
                _drop_backup(backup)
            if self.fsync:
                # The renames live in the folders: without this, a power cut could still
                # find the old names.
                for folder in folders:
                    try:
                        _sync_folder(folder)
                    except OSError as exc:
                        raise ConfigError(
                            f"{folder}: the outputs are in place, but syncing the folder failed "
                            f"({exc.strerror or exc}); they may not survive a power cut"
                        ) from exc

    def _rename_all(self) -> list[Path]:
        """The renames, undone on failure; returns the old versions to delete.

        An existing file target keeps a hard link to its old version, and the new file is
        renamed *over* it: the name always points at a whole file (ext4 also writes the new
        data before such a rename commits, without an fsync), and a failure puts the old
        inode back. Where hard links do not exist (and for an empty folder target) the old
        version is renamed aside first. Every step is recorded before it runs, so the undo
        knows a rename that happened even when the exception came right after it.
        """
        done: list[_Renaming] = []
        try:
            for temp, target in self._pending:
                # Checked again: the folder may have appeared since the temporary was made.
                _refuse_folder(target, folder=temp.is_dir())
                step = _Renaming(temp, target)
                done.append(step)
                if target.exists() or target.is_symlink():
                    step.backup = _backup_name(target)
                    step.linked = not (target.is_dir() and not target.is_symlink())
                    if step.linked:
                        try:
                            os.link(target, step.backup, follow_symlinks=False)
                        except OSError:
                            step.linked = False
                    if not step.linked:
                        os.replace(target, step.backup)
                # mkstemp's private 0600 (mkdtemp's 0700) would hide the output from others.
                umask = os.umask(0o022)
                os.umask(umask)
                os.chmod(temp, (0o777 if temp.is_dir() else 0o666) & ~umask)
                os.replace(temp, target)
        except BaseException:
            for step in reversed(done):
                step.undo()
            raise
        return [step.backup for step in done if step.backup is not None]

    def discard(self) -> None:
        for temp, _ in self._pending:
            _remove_ours(temp)
        self._pending.clear()
        # Deepest first; only empty ones: a folder someone else filled meanwhile stays.
        for folder in sorted(self._made, key=lambda path: len(path.parts), reverse=True):
            with suppress(OSError):
                folder.rmdir()
        self._made.clear()


@contextmanager
def staged(fsync: bool = False) -> Iterator[Stage]:
    """A :class:`Stage` whose temporary files are removed unless :meth:`Stage.commit` ran."""
    stage = Stage(fsync)
    try:
        yield stage
    finally:
        stage.discard()
