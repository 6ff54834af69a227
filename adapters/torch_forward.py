"""Where one forward begins and ends, whichever way the model was called, and which rows are pad.

Layers are call sites ("the second call of ``layer1.0.relu`` in a forward"), ``every`` counts
forwards, masks belong to one forward's inputs and the wiring trace covers one forward, so the
torch adapter needs forward boundaries. :class:`ForwardTracker` finds them:

- **Entries.** A pre-hook/post-hook pair counts nesting depth on each entry module; a forward is
  the span from depth 0 back to depth 0. The model itself is an entry. When an activation runs
  with no forward open, the outermost call into the model on the Python stack becomes one: a
  submodule called directly (``model.visual(x)``), or a method of the model (``encode_image``,
  ``forward`` called directly), which is then wrapped on the instance (the class is untouched;
  :meth:`ForwardTracker.close` removes the wrapper).
- **Interrupted forwards.** ``always_call`` hooks do not run on ``KeyboardInterrupt``: the next
  entry call finds the interrupted forward still open (its entry is not running any more) and
  closes it first.
- **Recomputation** during backward (``torch.utils.checkpoint``) is not a forward.
- **Masks.** The entry's ``attention_mask`` (or the ``mask=`` argument) marks real tokens.
  Submodules that take their own mask argument (T5's encoder and decoder stacks, an encoder
  inside a wrapper taking a batch dict) open a nested *mask scope*; one that receives the
  parent's mask expanded to 4-D keeps the parent's, and its hooks are dropped.

State is per thread, so a model served from several threads keeps each forward's call counts
and mask apart.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .torch_wiring import in_backward

__all__ = ["ForwardState", "ForwardTracker", "MaskSpec", "as_row_mask"]

log = logging.getLogger(__name__)

# mask=: an argument name of the entry's forward, or a function of (module, args, kwargs)
# returning a [batch, tokens] tensor that is true (non-zero) on real tokens.
MaskSpec = str | Callable[[nn.Module, tuple[Any, ...], Mapping[str, Any]], Any] | None
Key = tuple[str, int, str]  # ("call" | "method", id(module), method name)


@dataclass
class ForwardState:
    """One thread's view of the forward in flight."""

    depth: int = 0
    open: bool = False
    watched: bool = False
    histogram: bool = False
    traced: bool = False
    calls: dict[int, int] = field(default_factory=dict)
    entries: list[tuple[Key, nn.Module]] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)

    @property
    def mask(self) -> torch.Tensor | None:
        return self.masks[-1] if self.masks else None


class _ThreadStates(threading.local):
    def __init__(self) -> None:
        super().__init__()
        self.state = ForwardState()


BeginFn = Callable[[ForwardState, nn.Module, tuple[Any, ...], Mapping[str, Any]], None]
EndFn = Callable[[ForwardState, bool], None]


def as_row_mask(raw: Any) -> torch.Tensor | None:
    """A ``[batch, tokens]`` bool tensor (true on real tokens) from a user's mask, or ``None``
    when it is not one (a 4-D additive attention mask, say) or, on the CPU, when it marks no
    pad at all (one check per forward saves a mask per layer): then every row counts."""
    if not isinstance(raw, torch.Tensor) or raw.dim() != 2:
        return None
    mask = raw if raw.dtype == torch.bool else raw != 0
    if mask.device.type == "cpu" and bool(mask.all()):
        return None  # reading a CPU tensor is no device sync
    return mask


_positions: dict[tuple[Any, str], int | None] = {}


def _position(function: Callable[..., Any], name: str) -> int | None:
    """Index of parameter ``name`` among the positional arguments of ``function`` (bound)."""
    key = (getattr(function, "__func__", function), name)
    if key not in _positions:
        try:
            params = list(inspect.signature(function).parameters.values())
        except (TypeError, ValueError):
            params = []
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        positional = [p.name for p in params if p.kind in kinds]
        _positions[key] = positional.index(name) if name in positional else None
    return _positions[key]


def _takes(function: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _argument(
    function: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Any:
    if name in kwargs:
        return kwargs[name]
    index = _position(function, name)
    return args[index] if index is not None and index < len(args) else None


class ForwardTracker:
    """Forward boundaries and mask scopes of one model; calls ``begin``/``end`` per forward."""

    def __init__(self, model: nn.Module, begin: BeginFn, end: EndFn, mask: MaskSpec) -> None:
        self.model = model
        self.mask_spec = mask
        self._begin = begin
        self._end = end
        self._threads = _ThreadStates()
        self._modules = {id(m): m for m in model.modules()}
        self._entries: set[Key] = set()
        self._handles: list[Any] = []
        self._wrapped: list[tuple[nn.Module, str]] = []
        self._scope_handles: dict[int, list[Any]] = {}
        self._retired: set[int] = set()

    @property
    def state(self) -> ForwardState:
        return self._threads.state

    @property
    def hooks(self) -> int:
        return len(self._handles) + sum(len(h) for h in self._scope_handles.values())

    def start(self) -> None:
        self.add_entry(self.model)
        if isinstance(self.mask_spec, str):
            self._add_mask_scopes(self.mask_spec)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        for handles in self._scope_handles.values():
            for handle in handles:
                handle.remove()
        self._handles.clear()
        self._scope_handles.clear()
        self._entries.clear()
        for module, name in self._wrapped:
            if name in vars(module):
                delattr(module, name)
        self._wrapped.clear()

    # -- entries --------------------------------------------------------------------------------

    def add_entry(self, module: nn.Module) -> None:
        key: Key = ("call", id(module), "")
        if key in self._entries:
            return
        self._entries.add(key)

        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.enter(key, module, module.forward, args, kwargs)

        def post(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            # always_call hooks also run when the forward raised an Exception (then output is
            # None and an exception is being handled): that forward's trace is incomplete.
            self.leave(key, failed=output is None and sys.exc_info()[1] is not None)

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True, always_call=True))

    def wrap_method(self, module: nn.Module, name: str) -> bool:
        """Bracket ``module.<name>(...)`` calls as forwards, by an instance attribute that wraps
        the class's method. Returns whether it could (a plain method, not already overridden)."""
        key: Key = ("method", id(module), name)
        original = getattr(type(module), name, None)
        if key in self._entries or not _wrappable(module, name) or original is None:
            return False
        self._entries.add(key)
        bound = original.__get__(module)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            self.enter(key, module, bound, args, kwargs)
            try:
                result = bound(*args, **kwargs)
            except BaseException:
                self.leave(key, failed=True)
                raise
            self.leave(key, failed=False)
            return result

        object.__setattr__(module, name, wrapper)  # nn.Module's setattr would do the same
        self._wrapped.append((module, name))
        return True

    def enter(
        self,
        key: Key,
        module: nn.Module,
        function: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> None:
        state = self.state
        if state.depth and self._interrupted(state, key):
            self._close(state, failed=True)
        if state.depth == 0:
            if state.open:  # a forward entered through another path, still open
                self._close(state, failed=False)
            state.masks = [self._entry_mask(module, function, args, kwargs)]
            self._begin(state, module, args, kwargs)
        state.depth += 1
        state.entries.append((key, module))

    def leave(self, key: Key, failed: bool) -> None:
        state = self.state
        if not state.entries or state.entries[-1][0] != key:
            return  # closed already (an interrupted forward was cleaned up)
        state.entries.pop()
        state.depth -= 1
        if state.depth == 0 and state.open:
            self._close(state, failed)

    def _close(self, state: ForwardState, failed: bool) -> None:
        state.depth = 0
        state.entries.clear()
        self._end(state, failed)
        state.masks = []

    def _interrupted(self, state: ForwardState, key: Key) -> bool:
        """Whether the open forward was cut off by a BaseException (Ctrl-C), which skips the
        post-hooks: its entries are no longer running on this thread."""
        if any(open_key == key for open_key, _ in state.entries):
            return True  # an entry does not run inside itself
        outer_key, outer = state.entries[0]
        frame = sys._getframe(1)
        while frame is not None:
            name = frame.f_code.co_name
            if name in _CALL_FRAMES and frame.f_locals.get("self") is outer:
                return False
            if name == "wrapper" and frame.f_locals.get("key") == outer_key:
                return False
            frame = frame.f_back  # type: ignore[assignment]
        return True

    def discover(self, state: ForwardState) -> bool:
        """An activation ran with no forward open on this thread: recomputation in backward
        (ignored), or a call into the model through another path. The outermost such call on
        the stack becomes an entry, and this call opens an implicit forward (its end is known
        at the next entry). Returns whether a forward is open now."""
        if in_backward():
            return False
        found = next(
            (
                call
                for call in reversed(_calls_into(self._modules))  # outermost first
                if call[1] in _CALL_FRAMES or _wrappable(call[0], call[1])
            ),
            None,
        )
        if found is None:
            return False
        module, name, args, kwargs = found
        if name in _CALL_FRAMES:
            self.add_entry(module)
            function: Callable[..., Any] = module.forward
        else:
            self.wrap_method(module, name)
            function = getattr(type(module), name).__get__(module)
        where = next((n for n, m in self.model.named_modules() if m is module), "")
        log.info(
            "%s%s is called outside the model's forward; watching its calls as forwards",
            where or type(self.model).__name__,
            "" if name in _CALL_FRAMES else f".{name}()",
        )
        state.masks = [self._entry_mask(module, function, args, kwargs)]
        self._begin(state, module, args, kwargs)
        return True

    # -- masks ----------------------------------------------------------------------------------

    def _entry_mask(
        self,
        module: nn.Module,
        function: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> torch.Tensor | None:
        spec = self.mask_spec
        if spec is None:
            return None
        try:
            if callable(spec):
                raw = spec(module, args, kwargs)
            else:
                raw = _argument(function, spec, args, kwargs)
        except Exception as exc:
            log.warning("the mask function failed, so pad rows count: %r", exc)
            return None
        mask = as_row_mask(raw)
        if raw is not None and mask is None and callable(spec):
            log.warning("the mask function returned %r, not a [batch, tokens] tensor", raw)
        return mask

    def _add_mask_scopes(self, name: str) -> None:
        """Hooks on the outermost submodules whose forward takes the mask argument."""

        def scopes(module: nn.Module) -> list[nn.Module]:
            found: list[nn.Module] = []
            for child in module.children():
                found += [child] if _takes(child.forward, name) else scopes(child)
            return found

        for scope in scopes(self.model):
            self._scope_handles[id(scope)] = [
                scope.register_forward_pre_hook(self._scope_pre(name), with_kwargs=True),
                scope.register_forward_hook(self._scope_post, always_call=True),
            ]

    def _scope_pre(self, name: str) -> Callable[..., None]:
        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            state = self.state
            raw = _argument(module.forward, name, args, kwargs)
            if isinstance(raw, torch.Tensor) and raw.dim() != 2:
                # The parent's mask expanded for attention: this scope keeps the parent's and
                # adds nothing, so its hooks leave the hot path after this call.
                state.masks.append(state.mask)
                self._retired.add(id(module))
            else:
                # A 2-D mask of its own, or None: its rows are marked by it (None: no pad).
                state.masks.append(as_row_mask(raw))

        return pre

    def _scope_post(self, module: nn.Module, args: Any, output: Any) -> None:
        state = self.state
        if state.masks:
            state.masks.pop()
        if id(module) in self._retired:
            self._retired.discard(id(module))
            for handle in self._scope_handles.pop(id(module), []):
                handle.remove()


_CALL_FRAMES = ("_call_impl", "_wrapped_call_impl")


def _wrappable(module: nn.Module, name: str) -> bool:
    """A plain method of the module's class that the instance does not override."""
    return inspect.isfunction(getattr(type(module), name, None)) and name not in vars(module)


def _calls_into(
    modules: Mapping[int, nn.Module],
) -> list[tuple[nn.Module, str, tuple[Any, ...], dict[str, Any]]]:
    """Frames on this thread's stack that run a method of one of ``modules``, innermost first:
    ``(module, frame name, args, kwargs)``, with the call's own arguments for
    ``nn.Module.__call__`` frames and none for other methods."""
    frame = sys._getframe(2)
    found: list[tuple[nn.Module, str, tuple[Any, ...], dict[str, Any]]] = []
    while frame is not None:
        local = frame.f_locals
        candidate = local.get("self")
        name = frame.f_code.co_name
        if candidate is not None and id(candidate) in modules and name != "inner":
            args, kwargs = local.get("args", ()), local.get("kwargs", {})
            if name not in _CALL_FRAMES:
                found.append((candidate, name, (), {}))
            elif isinstance(args, tuple) and isinstance(kwargs, dict):
                found.append((candidate, name, args, kwargs))
        frame = frame.f_back  # type: ignore[assignment]
    return found
