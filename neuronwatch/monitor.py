"""One Monitor for every runtime: steps, flushes, windows, pause and the published snapshot.

Runtimes plug in as *activation sources* (torch hooks, an ONNX Runtime session, anything that
reduces activations where they live and hands over :class:`~neuronwatch.Partials` when drained);
exporters read a *snapshot source* (anything with a ``latest`` snapshot). Both are small
protocols, so a new runtime or a new wire format never touches the others::

    torch hooks ──┐                        ┌── Prometheus collector
    ORT session ──┼── drain() ─▶ Monitor ──┼── OpenTelemetry callbacks
    your source ──┘       (flush)    latest └── report(), CLI

A flush drains every source into the engine and publishes an immutable snapshot as
:attr:`Monitor.latest`. It happens every ``flush_every`` steps, at every window boundary, on
demand (:meth:`Monitor.snapshot`, :meth:`Monitor.report`), and, for processes that only serve
and never call :meth:`Monitor.step`, at most once per ``flush_interval`` seconds from the thread
that just finished a forward (:meth:`Monitor.forward_done`). Readers of ``latest`` never flush:
a scrape must not touch a device or wait for a step.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from .engine import Engine
from .errors import ConfigError
from .partials import Partials
from .report import Report
from .snapshot import Snapshot

__all__ = ["ActivationSource", "Monitor", "SnapshotSource"]

log = logging.getLogger(__name__)

DEFAULT_FLUSH_EVERY = 10


@runtime_checkable
class ActivationSource(Protocol):
    """Reduces activations in its own runtime and hands the partials over when drained.

    ``drain`` returns the partials accumulated since the previous drain, per layer, and resets
    them; it is called under the monitor's flush lock, from whichever thread flushes. ``close``
    detaches the source from its runtime (removes hooks, ends a session); it is idempotent.
    """

    def drain(self) -> Iterable[tuple[str, Partials]]: ...

    def close(self) -> None: ...


@runtime_checkable
class SnapshotSource(Protocol):
    """What exporters read: the latest published snapshot (``None`` before the first flush).

    Reading it must never flush, block on a training step or touch a device.
    """

    @property
    def latest(self) -> Snapshot | None: ...


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


class Monitor:
    """Owns the life cycle of watching one model: feed it with sources, read snapshots.

    >>> monitor = Monitor(Engine("mlp"), flush_every=10, window=500)   # doctest: +SKIP
    >>> monitor.attach(my_source)                                      # doctest: +SKIP
    >>> for batch in loader:                                           # doctest: +SKIP
    ...     train_step(batch); monitor.step()

    - ``flush_every``: steps between flushes (a flush is the one host sync of a torch source).
    - ``window``: steps per window; ``None`` closes windows only on :meth:`rollover`.
    - ``flush_interval``: seconds; a process that runs forwards without calling :meth:`step`
      (serving) still publishes ``latest`` at most this often, from the forward's own thread.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        flush_every: int = DEFAULT_FLUSH_EVERY,
        window: int | None = None,
        flush_interval: float | None = None,
    ) -> None:
        self.engine = engine
        self.flush_every = _positive_int("flush_every", flush_every)
        self.window = None if window is None else _positive_int("window", window)
        if flush_interval is not None and (
            isinstance(flush_interval, bool)
            or not isinstance(flush_interval, int | float)
            or not math.isfinite(flush_interval)
            or flush_interval <= 0
        ):
            raise ConfigError(
                f"flush_interval must be a positive number of seconds or None, "
                f"got {flush_interval!r}"
            )
        self.flush_interval = None if flush_interval is None else float(flush_interval)
        self._sources: list[ActivationSource] = []
        self._flush_lock = threading.RLock()
        self._steps = 0
        self._pauses = threading.local()  # per thread: how many paused() blocks are open
        self._interval_lock = threading.Lock()
        self._closed = False
        self._latest: Snapshot | None = None
        self._subscribers: list[Callable[[Snapshot], object]] = []
        # -inf: the first finished forward of a serving process publishes at once.
        self._last_flush = -math.inf
        self._last_forward = -math.inf
        self._idle_flusher: threading.Thread | None = None
        self._stop = threading.Event()

    # -- wiring up ------------------------------------------------------------------------------

    def attach(self, source: ActivationSource) -> ActivationSource:
        """Add an activation source; its partials join the engine at every flush."""
        if not isinstance(source, ActivationSource):
            raise ConfigError(
                f"{type(source).__name__} is not an activation source: it needs drain() and "
                "close() (see neuronwatch.monitor.ActivationSource)"
            )
        with self._flush_lock:
            self._sources.append(source)
        return source

    def subscribe(self, callback: Callable[[Snapshot], object]) -> Callable[[], None]:
        """Call ``callback(snapshot)`` with every snapshot the monitor publishes, from the
        thread that flushed (keep it quick: it runs on the training or serving thread). Returns
        a function that unsubscribes. Exceptions are logged, never raised into training.

        >>> monitor.subscribe(neuronwatch.alerts.Alerts().check)   # doctest: +SKIP
        """
        if not callable(callback):
            raise ConfigError(f"subscribe() takes a callable, got {callback!r}")
        with self._flush_lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._flush_lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def _publish(self, snapshot: Snapshot) -> Snapshot:
        self._latest = snapshot
        for callback in list(self._subscribers):
            try:
                callback(snapshot)
            except Exception:
                log.exception("snapshot subscriber %r failed", callback)
        return snapshot

    @property
    def sources(self) -> tuple[ActivationSource, ...]:
        return tuple(self._sources)

    @property
    def model(self) -> str:
        return self.engine.model

    @property
    def layers(self) -> tuple[str, ...]:
        """Every layer declared so far (call sites appear as they are first seen)."""
        return self.engine.layers

    @property
    def steps(self) -> int:
        return self._steps

    # -- watching -------------------------------------------------------------------------------

    @property
    def watching(self) -> bool:
        """Whether sources should record forwards run by this thread now (not paused here,
        not closed)."""
        return not getattr(self._pauses, "depth", 0) and not self._closed

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Stop recording this thread's forwards inside the block, e.g. an evaluation pass whose
        rows must not enter the training window (forwards inside it do not count for
        ``every``). Blocks nest; other threads (a server's workers) keep being watched."""
        self._pauses.depth = getattr(self._pauses, "depth", 0) + 1
        try:
            yield
        finally:
            self._pauses.depth -= 1

    # -- steps, flushes, windows ----------------------------------------------------------------

    def step(self, steps: int = 1) -> None:
        """Mark the end of ``steps`` training steps.

        Every flush and window boundary crossed is honoured: ``window=5`` and five ``step(2)``
        calls close two windows. A single call that crosses several window boundaries closes
        one window (its rows cannot be split) and counts all of them as completed.
        """
        steps = _positive_int("steps", steps)
        before = self._steps
        self._steps = after = before + steps
        self.engine.advance(steps)
        windows = after // self.window - before // self.window if self.window else 0
        if windows:
            self.rollover(windows)
        elif after // self.flush_every != before // self.flush_every:
            self.flush()

    def forward_done(self) -> None:
        """Called by sources from the thread that just finished a forward: flush if
        ``flush_interval`` seconds have passed since the last flush.

        The rows of the last forwards before traffic stops would otherwise wait for the next
        request: a background thread flushes them once no forward has finished for a whole
        interval (the device is idle then, so draining it disturbs nothing).
        """
        if self.flush_interval is None:
            return
        self._last_forward = time.monotonic()
        if self._idle_flusher is None:
            self._start_idle_flusher()
        if self._last_forward - self._last_flush < self.flush_interval:
            return
        # One thread flushes; the others serving at that moment go on without waiting.
        if self._interval_lock.acquire(blocking=False):
            try:
                if time.monotonic() - self._last_flush >= self.flush_interval:
                    self.flush()
            finally:
                self._interval_lock.release()

    def _start_idle_flusher(self) -> None:
        with self._interval_lock:
            if self._idle_flusher is not None or self.flush_interval is None:
                return
            thread = threading.Thread(
                target=self._flush_when_idle, name="neuronwatch-idle-flush", daemon=True
            )
            self._idle_flusher = thread
        thread.start()

    def _flush_when_idle(self) -> None:
        interval = self.flush_interval
        assert interval is not None
        while not self._stop.wait(interval / 2):
            last = self._last_forward
            if last > self._last_flush and time.monotonic() - last >= interval:
                try:
                    self.flush()
                except Exception:  # never kill the thread: the next forward flushes anyway
                    log.exception("flushing after the last requests failed")

    def flush(self) -> Snapshot:
        """Drain every source into the engine and publish a fresh snapshot as ``latest``."""
        with self._flush_lock:
            for source in self._sources:
                for layer, partials in source.drain():
                    self.engine.update(layer, partials)
            self._last_flush = time.monotonic()
            return self._publish(self.engine.snapshot())

    def rollover(self, windows: int = 1) -> Snapshot:
        """Flush, then close the engine's current window."""
        with self._flush_lock:
            for source in self._sources:
                for layer, partials in source.drain():
                    self.engine.update(layer, partials)
            self._last_flush = time.monotonic()
            self.engine.rollover(windows)
            return self._publish(self.engine.snapshot())

    # -- reading --------------------------------------------------------------------------------

    @property
    def latest(self) -> Snapshot | None:
        """The snapshot published at the last flush, for exporters: never touches a device."""
        return self._latest

    def snapshot(self) -> Snapshot:
        """Flush now and return a fresh snapshot."""
        return self.flush()

    def report(self, window: str = "auto", meta: Mapping[str, Any] | None = None) -> Report:
        """Flush now and judge every layer over ``window`` (``auto``: the last complete window,
        or the lifetime totals before the first rollover)."""
        return Report.from_snapshot(self.flush(), window, meta)

    # -- life cycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Detach every source (idempotent). What was collected stays readable: sources still
        drain after closing, so :meth:`report` works after the ``with`` block."""
        if self._closed:
            return
        self._stop.set()
        if self._last_forward > self._last_flush:  # publish what the last forwards recorded
            try:
                self.flush()
            except Exception:
                log.exception("the final flush failed; what was collected stays drainable")
        self._closed = True
        for source in self._sources:
            try:
                source.close()
            except Exception:  # one failing source must not keep the hooks of the others
                log.exception("closing activation source %r failed", source)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Monitor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
