"""A drop-in stand-in for ``onnxruntime.InferenceSession`` that feeds a Monitor.

:class:`WatchedSession` runs the augmented graph and returns exactly what the model's own
session would (its outputs, in the order asked); the per-neuron partial sums of the same run go
to the monitor's :class:`~.onnx_source.OnnxSource`. ``get_inputs``/``get_outputs`` show the
model's own interface; every other attribute is the underlying session's.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from neuronwatch.monitor import Monitor

from .onnx_plan import Plan
from .onnx_source import OnnxSource

__all__ = ["WatchedSession"]

log = logging.getLogger(__name__)


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
        names = list(output_names) if output_names else list(self.plan.outputs)
        if not self.monitor.watching:
            return list(self._session.run(names, dict(input_feed), run_options))
        with self._lock:
            histogram = next(self._runs) % self._histogram_every == 0
        feed = dict(input_feed)
        feed[self.plan.augmented.histogram_input] = np.asarray(histogram)
        results = self._session.run(names + self._extra, feed, run_options)
        try:
            self.source.record(results[len(names) :], histogram)
        except Exception as exc:
            for layer in self.source.layers:
                self.monitor.engine.count_error(layer)
            if self._strict:
                raise
            if not self._failed_logged:
                self._failed_logged = True
                log.warning(
                    "neuronwatch could not record a run (the run's outputs are fine): %r", exc
                )
        try:
            self.monitor.forward_done()
        except Exception as exc:  # a flush must never break serving
            if self._strict:
                raise
            log.warning("neuronwatch flush failed: %r", exc)
        return list(results[: len(names)])

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
        # get_inputs, get_modelmeta, get_session_options, run_with_ort_values, ...
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
