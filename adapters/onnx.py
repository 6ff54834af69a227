"""ONNX Runtime adapter: watch an ONNX model's neurons while it serves, or audit it on data.

ONNX Runtime itself computes the per-neuron partial sums: reduction nodes are appended to the
graph after every activation (:mod:`.onnx_augment`), so only ``O(neurons)`` vectors leave the
session and the production kernels (fusions included) run unchanged. Layer names, thresholds
and wiring agree with the torch adapter's wherever the exporter kept module names, so a torch
report and an ONNX report of one model compare and merge.

- :func:`watch_session` returns a stand-in for ``onnxruntime.InferenceSession`` whose
  ``run()`` returns the model's outputs while the statistics flow into a Monitor (serving).
- :func:`audit` runs batches through the model and returns a :class:`~neuronwatch.Report`.

The pieces, one concern each: loading and external data (:mod:`.onnx_load`), the graph index
(:mod:`.onnx_graph`), activation sites (:mod:`.onnx_sites`), layer names (:mod:`.onnx_names`),
wiring (:mod:`.onnx_wiring`), reductions (:mod:`.onnx_augment`, nodes built by
:mod:`.onnx_build`), the plan tying them together
(:mod:`.onnx_plan`), provider selection (:mod:`.onnx_session`), the activation source
(:mod:`.onnx_source`) and the session stand-in (:mod:`.onnx_serving`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from neuronwatch.errors import ConfigError, NeuronwatchError
from neuronwatch.monitor import DEFAULT_FLUSH_EVERY, Monitor
from neuronwatch.report import Report

from .onnx_load import stage
from .onnx_plan import InputSpec, Plan, plan
from .onnx_serving import WatchedSession
from .onnx_session import Provider, create_session
from .onnx_source import OnnxSource

__all__ = ["InputSpec", "Plan", "WatchedSession", "audit", "watch_session"]

DEFAULT_HISTOGRAM_EVERY = 8
DEFAULT_FLUSH_INTERVAL = 10.0

ModelSource = str | os.PathLike[str] | onnx.ModelProto


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def watch_session(
    model: ModelSource,
    *,
    name: str | None = None,
    provider: Provider = "auto",
    mask: str | None = "attention_mask",
    pre: bool = False,
    layers: Sequence[str] | None = None,
    flush_every: int = DEFAULT_FLUSH_EVERY,
    flush_interval: float | None = DEFAULT_FLUSH_INTERVAL,
    window: int | None = None,
    histogram_every: int = DEFAULT_HISTOGRAM_EVERY,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    threads: int | None = None,
    strict: bool = False,
    **defaults: Any,
) -> WatchedSession:
    """An ``InferenceSession`` stand-in for ``model`` (a path or a ``ModelProto``) whose runs
    feed a :class:`~neuronwatch.Monitor` (``.monitor``).

    - ``provider``: ``auto`` (CUDA when it works, else CPU), ``cuda`` or ``cpu``.
    - ``mask``: the model input holding the ``[batch, tokens]`` attention mask; rows at its
      zero positions are left out of every statistic (``None``: count every row).
    - ``pre=True`` also watches each activation's input (layers ``<name>:pre``).
    - ``layers``: layer names or globs to watch (default: every activation).
    - ``flush_interval``: seconds between published snapshots of a serving process.
    - ``histogram_every``: the layer histogram is computed on one run in this many.
    - ``strict=True`` raises recording failures instead of counting them.
    - ``overrides``/``defaults``: per-layer settings, as for :func:`neuronwatch.watch`.
    """
    _positive("histogram_every", histogram_every)
    the_plan, engine = plan(
        model,
        name=name,
        mask=mask,
        pre=pre,
        layers=layers,
        defaults=dict(defaults),
        overrides={k: dict(v) for k, v in (overrides or {}).items()},
    )
    monitor = Monitor(engine, flush_every=flush_every, window=window, flush_interval=flush_interval)
    staged = stage(the_plan.augmented.model, the_plan.loaded)
    # The graph lives on in ONNX Runtime: drop our copy (and its weights) before it loads.
    the_plan.augmented.model.Clear()
    try:
        session = create_session(
            staged.payload,
            provider,
            where=the_plan.where,
            data_folder=staged.data_folder,
            threads=threads,
        )
    finally:
        # ONNX Runtime has read the graph (and mapped the weights) once the session exists.
        staged.remove()
    source = OnnxSource(the_plan.augmented.taps, on_error=engine.count_error)
    monitor.attach(source)
    return WatchedSession(
        session, the_plan, monitor, source, histogram_every=histogram_every, strict=strict
    )


def audit(
    model: ModelSource,
    batches: Iterable[Mapping[str, np.ndarray[Any, Any]]],
    *,
    name: str | None = None,
    provider: Provider = "auto",
    mask: str | None = "attention_mask",
    histogram_every: int = DEFAULT_HISTOGRAM_EVERY,
    layers: Sequence[str] | None = None,
    threads: int | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    session: WatchedSession | None = None,
    **defaults: Any,
) -> Report:
    """Run every batch (a mapping of input name to array) through ``model`` and judge every
    layer over all of them; ``on_batch(samples, rows)`` is called after each batch
    (progress): its samples (axis 0 of the inputs) and the most rows one layer saw in it
    (token positions or pixels; pads left out).

    Pass an open ``session`` (from :func:`watch_session`) to reuse its ONNX Runtime session
    (``model`` and the other settings are then the session's): the report holds this audit's
    batches only, and the session stays open, its own monitor untouched, for more audits or
    serving.
    """
    watched = (
        session.detached()
        if session is not None
        else watch_session(
            model,
            name=name,
            provider=provider,
            mask=mask,
            layers=layers,
            flush_interval=None,
            histogram_every=histogram_every,
            threads=threads,
            strict=True,
            **defaults,
        )
    )
    batches_run = 0
    with watched:
        for batch in batches:
            try:
                watched.run(None, batch)
            except NeuronwatchError:
                raise
            except Exception as exc:  # ONNX Runtime's own errors: one line, which batch
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                raise ConfigError(
                    f"{watched.plan.where}: ONNX Runtime failed on batch {batches_run + 1}: {first}"
                ) from exc
            batches_run += 1
            if on_batch is not None:
                arrays = list(batch.values())
                samples = int(np.shape(arrays[0])[0]) if arrays and np.ndim(arrays[0]) else 1
                on_batch(samples, watched.source.last_rows)
    meta = {
        "source": "onnx",
        "onnx": {
            **watched.plan.meta(),
            "provider": watched.get_providers()[0],
            "batches": batches_run,
        },
    }
    return watched.monitor.report("lifetime", meta)
