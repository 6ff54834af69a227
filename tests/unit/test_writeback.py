"""EarlyWriteback asks the kernel to start writing every STRIDE bytes, and never alters them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from neuronwatch import writeback
from neuronwatch.writeback import STRIDE, EarlyWriteback


def test_the_real_call_exists_on_linux() -> None:
    # Not a mock: libc's sync_file_range is found here (Linux), so the rescue uses it.
    assert writeback._sync_file_range() is not None


def test_writeback_is_requested_per_stride_for_the_bytes_written_since(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[int, int, int]] = []
    real = writeback._sync_file_range()

    def record(fd: int, offset: int, count: int, flags: int) -> int:
        calls.append((offset, count, flags))
        return int(real(fd, offset, count, flags))

    monkeypatch.setattr(writeback, "_sync_file_range", lambda: record)
    path = tmp_path / "out"
    half = b"\x01" * (STRIDE // 2)
    with path.open("wb") as handle:
        handle.write(b"head")  # written before: not this writer's business
        early = EarlyWriteback(handle)
        for _ in range(5):
            handle.write(half)
            early.wrote(len(half))
    assert calls == [(4, STRIDE, 2), (4 + STRIDE, STRIDE, 2)]
    assert path.read_bytes() == b"head" + half * 5


def test_a_failing_request_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(*_: Any) -> int:
        return -1  # EBADF, EINVAL, ...: the final fsync does the work (and reports errors)

    monkeypatch.setattr(writeback, "_sync_file_range", lambda: failing)
    path = tmp_path / "out"
    with path.open("wb") as handle:
        early = EarlyWriteback(handle)
        handle.write(b"x" * STRIDE)
        early.wrote(STRIDE)
    assert path.stat().st_size == STRIDE
