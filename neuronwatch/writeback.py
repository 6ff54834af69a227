"""Start writing a large output to disk while it is still being produced.

Linux holds written pages in memory until the dirty share of RAM passes its background
threshold (10 % of memory by default: gigabytes), so a 1 GiB output is written out only when
the final ``fsync`` asks for it, and the writer then waits for the whole file. Asking the
kernel every few tens of megabytes to start writing what is done (``sync_file_range`` with
``SYNC_FILE_RANGE_WRITE``: it does not wait) overlaps the disk with the work, and the final
``fsync`` finds little left to do. Elsewhere (no ``sync_file_range``) this is a no-op and the
``fsync`` does all of it, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import IO, Any

__all__ = ["EarlyWriteback"]

# Bytes written between two requests: large enough that a request costs nothing, small enough
# that the disk starts early.
STRIDE = 32 * 2**20
_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux), or ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


class EarlyWriteback:
    """Counts the bytes written to ``handle`` and starts their writeback every :data:`STRIDE`.

    Failures are ignored: this only schedules work the final ``fsync`` would do anyway, and
    that ``fsync`` reports any error.
    """

    def __init__(self, handle: IO[bytes], enabled: bool = True) -> None:
        self._handle = handle
        self._started = handle.tell()  # bytes before this are someone else's business
        self._written = self._started
        # Disabled when nothing will fsync: the kernel then writes back at its own pace,
        # as it does for ``cp``, and the writer never waits for the disk.
        self._call = _sync_file_range() if enabled else None

    def wrote(self, count: int) -> None:
        self._written += count
        if self._call is None or self._written - self._started < STRIDE:
            return
        self._handle.flush()
        self._call(
            self._handle.fileno(),
            self._started,
            self._written - self._started,
            _SYNC_FILE_RANGE_WRITE,
        )
        self._started = self._written
