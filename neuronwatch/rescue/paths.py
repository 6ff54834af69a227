"""Where a rescue run may write, checked before anything is read twice or written once.

Every output (the checkpoint, an ONNX model's external data, the manifest) must have a path of
its own: not an input of the run (the checkpoint, its external data or shards, the report's
files), not another output, and not an existing folder (replacing a folder would delete what
the user keeps there; a sharded checkpoint may go into an empty one). Paths are compared
resolved (symlinks followed) and by inode, so a hard link or a symlink to an input is caught.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

__all__ = ["Output", "check_outputs", "report_files"]


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


def _check_kind(output: Output) -> None:
    path = output.path
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
    """Refuse outputs that are folders, collide with each other, or would overwrite (or sit
    inside) an input; ``inputs`` are ``(what it is, path)`` pairs."""
    for output in outputs:
        _check_kind(output)
    for i, first in enumerate(outputs):
        for second in outputs[i + 1 :]:
            if _same(first.path, second.path):
                raise ConfigError(
                    f"{first.option} and {second.option} are the same file ({second.path}): "
                    f"one would overwrite the other; give {second.option} a path of its own"
                )
    for output in outputs:
        resolved = output.path.resolve()
        for what, source in inputs:
            if _same(output.path, source) or source.resolve() in resolved.parents:
                raise ConfigError(
                    f"{output.option} {output.path} would overwrite {what} {source}; inputs "
                    f"are never modified: choose another path for {output.option}"
                )
