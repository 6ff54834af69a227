"""A drop-in stand-in for ``onnxruntime.InferenceSession`` that feeds a Monitor.

:class:`WatchedSession` runs the augmented graph and returns exactly what the model's own
session would (its outputs, in the order asked); the per-neuron partial sums of the same run go
to the monitor's :class:`~.onnx_source.OnnxSource`. ``get_inputs``/``get_outputs`` show the
model's own interface; ``run_with_ort_values`` and ``run_async`` behave as ``run``; IO binding
is refused (it would return or drop the hidden statistics); every other attribute is the
underlying session's.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from neuronwatch.engine import Engine
from neuronwatch.monitor import Monitor

from .onnx_plan import Plan
from .onnx_source import OnnxSource

__all__ = ["WatchedSession"]

log = logging.getLogger(__name__)

# Ways to run that bypass what the stand-in returns and records (IO binding hands ONNX Runtime
# the output buffers, hidden statistics included): refused with a clear error.
_UNSUPPORTED = frozenset({"io_binding", "run_with_iobinding"})


class WatchedSession:
    """``run()`` returns the model's outputs; the statistics flow into :attr:`monitor`.

    >>> session = watch_session("model.onnx")                       # doctest: +SKIP
    >>> logits, = session.run(None, {"input_ids": ids, "attention_mask": mask})  # doctest: +SKIP
    >>> session.monitor.report().summary()                          # doctest: +SKIP
    """

    def __init__(
        self,
        session: Any,
        plan: Plan,
        monitor: Monitor,
        source: OnnxSource,
        *,
        histogram_every: int,
        strict: bool,
    ) -> None:
        self._session = session
        self.plan = plan
        self.monitor = monitor
        self.source = source
        self._histogram_every = histogram_every
        self._strict = strict
        self._extra = source.output_names()
        self._runs = itertools.count()
        self._lock = threading.Lock()
        self._failed_logged = False
        self._own_outputs = [o for o in session.get_outputs() if o.name in set(plan.outputs)]

    # -- the InferenceSession interface ---------------------------------------------------------

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: Mapping[str, Any],
        run_options: Any = None,
    ) -> list[Any]:
        names = self._names(output_names)
        if not self.monitor.watching:
            return list(self._session.run(names, dict(input_feed), run_options))
        histogram = self._next_histogram()
        feed = dict(input_feed)
        feed[self.plan.augmented.histogram_input] = np.asarray(histogram)
        results = self._session.run(names + self._extra, feed, run_options)
        self._record(results[len(names) :], histogram, self._strict)
        return list(results[: len(names)])

    def run_with_ort_values(
        self,
        output_names: Sequence[str] | None,
        input_dict_ort_values: Mapping[str, Any],
        run_options: Any = None,
    ) -> list[Any]:
        """``InferenceSession.run_with_ort_values``: the model's outputs as ``OrtValue``s; the
        statistics are recorded as by :meth:`run`."""
        names = self._names(output_names)
        feed = dict(input_dict_ort_values)
        if not self.monitor.watching:
            return list(self._session.run_with_ort_values(names, feed, run_options))
        ort: Any = importlib.import_module("onnxruntime")
        histogram = self._next_histogram()
        flag = ort.OrtValue.ortvalue_from_numpy(np.asarray(histogram))
        feed[self.plan.augmented.histogram_input] = flag
        values = self._session.run_with_ort_values(names + self._extra, feed, run_options)
        self._record([v.numpy() for v in values[len(names) :]], histogram, self._strict)
        return list(values[: len(names)])

    def run_async(
        self,
        output_names: Sequence[str] | None,
        input_feed: Mapping[str, Any],
        callback: Callable[[Any, Any, str], None],
        user_data: Any,
        run_options: Any = None,
    ) -> Any:
        """``InferenceSession.run_async``: ``callback(outputs, user_data, err)`` gets the
        model's outputs only; the statistics are recorded first, on ONNX Runtime's thread,
        where a failure to record is counted and logged, never raised."""
        names = self._names(output_names)
        if not self.monitor.watching:
            return self._session.run_async(
                names, dict(input_feed), callback, user_data, run_options
            )
        histogram = self._next_histogram()
        feed = dict(input_feed)
        feed[self.plan.augmented.histogram_input] = np.asarray(histogram)

        def done(results: Any, data: Any, err: str) -> None:
            if not err:
                try:
                    self._record(list(results)[len(names) :], histogram, strict=False)
                finally:
                    results = list(results)[: len(names)]
            callback(results, data, err)

        return self._session.run_async(names + self._extra, feed, done, user_data, run_options)

    def _names(self, output_names: Sequence[str] | None) -> list[str]:
        return list(output_names) if output_names else list(self.plan.outputs)

    def _next_histogram(self) -> bool:
        with self._lock:
            return next(self._runs) % self._histogram_every == 0

    def _record(self, extras: Sequence[Any], histogram: bool, strict: bool) -> None:
        """Add one run's statistics; a refused layer is counted as that layer's error (and
        raised when ``strict``), the others are kept."""
        try:
            refused = self.source.record(extras, histogram)
        except Exception as exc:  # the outputs do not fit the taps at all: every layer
            refused = dict.fromkeys(self.source.layers, exc)
        for layer in refused:
            self.monitor.engine.count_error(layer)
        if refused:
            if strict:
                raise next(iter(refused.values()))
            if not self._failed_logged:
                self._failed_logged = True
                log.warning(
                    "neuronwatch could not record a run for layer(s) %s (the run's outputs are "
                    "fine): %s",
                    ", ".join(refused),
                    next(iter(refused.values())),
                )
        try:
            self.monitor.forward_done()
        except Exception as exc:  # a flush must never break serving
            if strict:
                raise
            log.warning("neuronwatch flush failed: %r", exc)

    def detached(self) -> WatchedSession:
        """A stand-in on the same ONNX Runtime session whose statistics go to a new monitor
        with this one's layers, thresholds and wiring and nothing recorded yet (strict, no
        interval flushes): one audit's rows alone, whatever this session recorded before or
        records meanwhile. Closing it leaves this session and its monitor untouched."""
        old = self.monitor.engine
        engine = Engine(old.model)
        for layer in old.layers:
            config = old.config(layer)
            settings = {
                f.name: getattr(config, f.name)
                for f in dataclasses.fields(config)
                if f.name not in ("name", "kind", "activation")
            }
            engine.add_layer(layer, config.activation, config.kind, None, **settings)
            if layer in self.plan.wiring:
                engine.set_wiring(layer, self.plan.wiring[layer].wiring)
        monitor = Monitor(engine, flush_interval=None)
        source = OnnxSource(self.plan.augmented.taps, on_error=engine.count_error)
        monitor.attach(source)
        return WatchedSession(
            self._session,
            self.plan,
            monitor,
            source,
            histogram_every=self._histogram_every,
            strict=True,
        )

    def get_outputs(self) -> list[Any]:
        return list(self._own_outputs)

    def get_overridable_initializers(self) -> list[Any]:
        hidden = self.plan.augmented.histogram_input
        return [i for i in self._session.get_overridable_initializers() if i.name != hidden]

    def get_providers(self) -> list[str]:
        return list(self._session.get_providers())

    @property
    def session(self) -> Any:
        """The underlying (augmented) ``onnxruntime.InferenceSession``."""
        return self._session

    def __getattr__(self, name: str) -> Any:
        # get_inputs, get_modelmeta, get_session_options, ...
        if name in _UNSUPPORTED:
            raise AttributeError(
                f"a watched session does not support {name}(): its outputs would miss the "
                "statistics or carry hidden ones; use run() or run_with_ort_values()"
            )
        return getattr(self._session, name)

    # -- life cycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop watching (the session stays usable; what was collected stays readable)."""
        self.monitor.close()

    def __enter__(self) -> WatchedSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
