"""PyTorch adapter: ``neuronwatch.watch(model)`` hooks activations and feeds a Monitor.

:mod:`.torch_probes` chooses what to watch, :mod:`.torch_source` holds the hooks (an activation
source, see :mod:`neuronwatch.monitor`), :mod:`.torch_forward` finds forward boundaries and
masks, :mod:`.torch_reduce` reduces on the device, :mod:`.torch_wiring` traces the wiring. Layers
are *call sites*: a module that runs twice in a forward (torchvision's reused ``relu``) gives two
layers, ``layer1.0.relu`` and ``layer1.0.relu#2``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from neuronwatch.engine import Engine
from neuronwatch.errors import ConfigError
from neuronwatch.monitor import DEFAULT_FLUSH_EVERY, Monitor

from .torch_forward import MaskSpec
from .torch_probes import Site, find_activations, probes_for
from .torch_source import MAX_CALL_SITES, TorchSource

__all__ = ["MAX_CALL_SITES", "TorchSource", "find_activations", "watch"]

DEFAULT_HISTOGRAM_EVERY = 8


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def watch(
    model: nn.Module,
    *,
    layers: Iterable[str] | None = None,
    inputs: Iterable[str] | Mapping[str, str | None] | None = None,
    pre: bool = False,
    every: int = 1,
    flush_every: int = DEFAULT_FLUSH_EVERY,
    flush_interval: float | None = None,
    window: int | None = None,
    name: str | None = None,
    mask: MaskSpec = "attention_mask",
    feature_axis: Mapping[str, int] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    histogram_every: int = DEFAULT_HISTOGRAM_EVERY,
    per_call_site: bool = True,
    compile: bool = True,
    strict: bool = False,
    **defaults: Any,
) -> Monitor:
    """Watch the activations of ``model``; returns a :class:`~neuronwatch.Monitor`.

    - ``layers``: module names or globs; default: every activation module (ReLU ... Sigmoid,
      Hugging Face activation classes) and the functional feed-forward activation of every
      ``nn.TransformerEncoderLayer``/``DecoderLayer`` (layer ``<block>.activation``).
    - ``inputs``: modules whose *input* features are the neurons (an activation applied as a
      function before them, e.g. ``inputs=["*.mlp.fc2"]``), as names/globs, or a mapping to
      the activation's name (``{"*.fc2": "gelu"}``); layers ``<module>:input``.
    - ``pre=True`` also watches each activation's input (layers ``<module>:pre``).
    - A module called n times in one forward gives n layers: ``relu``, ``relu#2``, ...
      (``per_call_site=False`` pools them into one).
    - ``every=k`` watches one forward in ``k``; ``flush_every`` steps between flushes;
      ``window`` steps per window (``None``: close windows yourself with ``rollover()``);
      ``flush_interval`` seconds: a process that never calls ``step()`` (serving) publishes
      ``latest`` at most this often, from the thread that ran the forward.
    - ``mask``: rows at masked (padding) positions are left out of every statistic. The default
      reads the forward's ``attention_mask`` argument (``[batch, tokens]``, non-zero on real
      tokens, the Hugging Face convention); pass another argument name, a function
      ``(module, args, kwargs) -> mask``, or ``None`` to count every row.
    - ``feature_axis``: per-layer neuron axis when the producing module cannot be identified.
    - ``overrides``: per-layer settings by name or glob; ``defaults`` (``min_rows``,
      ``asleep_below``, ``tau``, ...) apply to every layer.
    - ``histogram_every``: the layer value histogram is accumulated on one watched forward in
      this many (it costs ~3x the other statistics); every other statistic sees every row.
    - ``compile``: fuse the reductions with ``torch.compile``, falling back to eager ops if the
      compiler is unavailable. ``strict=True`` raises hook failures instead of counting them.
    """
    for arg, value in (("every", every), ("histogram_every", histogram_every)):
        _positive(arg, value)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"watch() takes a torch.nn.Module, got {type(model).__name__}")
    if mask is not None and not (isinstance(mask, str) or callable(mask)):
        raise ConfigError(
            f"mask must be an argument name, a function (module, args, kwargs) -> mask, or "
            f"None; got {mask!r}"
        )
    # torch.compile wraps the model in an OptimizedModule whose names all start with
    # "_orig_mod."; hook the wrapped module so layer and parameter names match the user's model
    # and its state_dict.
    original = getattr(model, "_orig_mod", None)
    compiled_model = isinstance(original, nn.Module)
    if isinstance(original, nn.Module):
        model = original
    probes = probes_for(model, layers, inputs, pre, dict(feature_axis or {}))
    engine = Engine(name or type(model).__name__, overrides=overrides, **defaults)
    monitor = Monitor(engine, flush_every=flush_every, window=window, flush_interval=flush_interval)
    for probe in probes:
        if not probe.infer_activation:
            config = engine.add_layer(probe.base, probe.activation, probe.kind, probe.params)
            probe.sites.append(Site(probe.base, config))
    source = TorchSource(
        model,
        monitor,
        probes,
        every=every,
        histogram_every=histogram_every,
        compile=compile,
        strict=strict,
        mask=mask,
        per_call_site=per_call_site,
        compiled_model=compiled_model,
    )
    monitor.attach(source)
    return monitor
