"""Where a rescue run may write, checked before anything is read twice or written once.

Every output (the checkpoint, an ONNX model's external data, the manifest) must have a path of
its own: not an input of the run (the checkpoint, its external data or shards, the report's
files), not another output, and not an existing folder (replacing a folder would delete what
the user keeps there; a sharded checkpoint may go into an empty one), not anything else that
is not a regular file (a device node, a FIFO, a socket: renaming a file onto one would destroy
it), and not inside another output. Paths are compared resolved (symlinks followed) and by
inode, so a hard link or a symlink to an input is caught.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

__all__ = ["Output", "check_outputs", "check_spelling", "report_files", "special_kind"]


@dataclass(frozen=True)
class Output:
    """One path a run writes, named the way the user gave it (``--out``, ``--manifest``)."""

    option: str
    path: Path
    folder: bool = False  # a sharded checkpoint: a new (or empty) folder
    fix: str = "choose a new path"  # when the path is an existing folder


def report_files(report: Path | None) -> list[Path]:
    """The files a report is read from (the run must not overwrite them)."""
    if report is None:
        return []
    if report.is_dir():
        return [report / "report.json", report / "report.npz"]
    return [report]


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def special_kind(path: Path) -> str | None:
    """What ``path`` is when it exists (through symlinks) and is neither a regular file nor a
    folder, or None. Rescue never replaces such a path: renaming its output onto a device node
    (``--out /dev/null``) would turn the device into a regular file."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return None  # nothing there (or a dangling symlink, which is replaced as before)
    except OSError:
        return None  # unreadable: the write itself will fail and say where
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def check_spelling(option: str, given: str | Path, folder: bool, example: str) -> None:
    """Refuse an output path that is empty, or that names a folder (a trailing ``/``, a last
    part ``.`` or ``..``) where a file is written: :class:`~pathlib.Path` would silently drop
    the slash and write a file named like the folder."""
    raw = os.fspath(given)
    if raw == "":
        raise ConfigError(f"{option} is empty: name the file to write")
    if folder:
        return
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    if raw.endswith(seps) or os.path.basename(raw) in (".", ".."):
        raise ConfigError(
            f"{option} {raw} names a folder, but a file is written there: name the file, "
            f"e.g. {option} {os.path.join(raw, example)}"
        )


def _check_kind(output: Output) -> None:
    path = output.path
    special = special_kind(path)
    if special is not None:
        raise ConfigError(
            f"{output.option} {path} is {special}, not a regular file; rescue never replaces "
            "one (its output would take the device's or pipe's place): choose another path"
        )
    if output.folder:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise ConfigError(
                f"{output.option} {path} exists; a sharded checkpoint needs a new (or empty) "
                "folder, so nothing of yours in it is replaced"
            )
    elif path.is_dir():
        raise ConfigError(
            f"{output.option} {path} is a folder; an existing folder is never replaced (that would "
            f"delete what it holds): {output.fix}"
        )


def check_outputs(outputs: Sequence[Output], inputs: Sequence[tuple[str, Path]]) -> None:
    """Refuse outputs that are folders or special files, collide with each other (or sit one
    inside another), or would overwrite (or sit inside) an input; ``inputs`` are ``(what it
    is, path)`` pairs."""
    for output in outputs:
        _check_kind(output)
    for i, first in enumerate(outputs):
        for second in outputs[i + 1 :]:
            if _same(first.path, second.path):
                raise ConfigError(
                    f"{first.option} and {second.option} are the same file ({second.path}): "
                    f"one would overwrite the other; give {second.option} a path of its own"
                )
            for outer, inner in ((first, second), (second, first)):
                # A new checkpoint folder is built under a temporary name and renamed into
                # place whole: nothing else can be written inside it.
                if outer.path.resolve() in inner.path.resolve().parents:
                    raise ConfigError(
                        f"{inner.option} {inner.path} is inside {outer.option} {outer.path}, "
                        "which is renamed into place whole: give "
                        f"{inner.option} a path outside it"
                    )
    for output in outputs:
        resolved = output.path.resolve()
        for what, source in inputs:
            if _same(output.path, source) or source.resolve() in resolved.parents:
                raise ConfigError(
                    f"{output.option} {output.path} would overwrite {what} {source}; inputs "
                    f"are never modified: choose another path for {output.option}"
                )
