"""PyTorch files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``): plain state_dicts and training
checkpoints that nest one beside an optimizer state.

Files are loaded with ``torch.load(weights_only=True)`` only (memory-mapped when the file allows
it): a pickle that needs code is refused, naming what it wanted to import, and never executed.
In a training checkpoint the optimizer's per-parameter moments (``exp_avg``, ``exp_avg_sq``,
``momentum_buffer``: every state tensor shaped like its parameter) follow the edit: deleted
where the parameter's entries were deleted, reset to zero wherever its values changed, so a
revived neuron does not inherit the stale moments that killed it.
"""

from __future__ import annotations

import copy
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ...errors import MissingExtraError
from ..checkpoint import (
    CheckpointError,
    FileDigest,
    TensorEditor,
    TensorInfo,
    WriteResult,
    checksum_file,
)
from ..dtypes import decode
from ..outputs import Stage, open_staged
from .optimizer import OptimizerMap, is_optimizer, map_optimizer

__all__ = ["TorchCheckpoint"]

# Where training scripts usually put the model's weights, most likely first.
STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingExtraError("torch", "torch") from exc
    return torch


def _dtype_name(torch: Any, dtype: Any) -> str:
    names = {
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.float64: "F64",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }
    return names.get(dtype, str(dtype).replace("torch.", ""))


def _load(torch: Any, path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path} not found")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a PyTorch checkpoint")
    try:
        # torch warns about pickle protocols before refusing them; the refusal becomes one
        # line below, and the warning would only add a second, less useful one.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # Files from torch < 1.6 (legacy format) cannot be memory-mapped.
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_unpickling_message(path, str(exc))) from None
    except Exception as exc:  # garbage makes the unpickler raise anything (KeyError, IndexError)
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint ({type(exc).__name__}: "
            f"{_first_line(str(exc))})"
        ) from None


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else "no message"


def _unpickling_message(path: Path, text: str) -> str:
    """Why torch's weights-only unpickler refused ``path``, and what to do about it."""
    opcode = re.search(r"Unsupported operand (\d+)", text)
    if opcode:
        # FRAME (149) and friends: pickle protocol 4+, which the weights-only unpickler
        # cannot read, although the file may hold nothing but tensors.
        return (
            f"{path} was saved with a pickle protocol torch's safe loader cannot read (pickle "
            f"opcode {opcode.group(1)}, e.g. torch.save(..., pickle_protocol=4)); save it "
            "again with the default protocol: torch.save(obj, PATH)"
        )
    if "weights_only" in text or "Weights only" in text:
        wanted = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global[: ]+([\w.]+)", text)
        what = f" ({wanted.group(1)})" if wanted else ""
        return (
            f"{path} needs code to load{what}: rescue loads PyTorch files with "
            "weights_only=True and never runs their code; save plain tensors instead "
            "(torch.save(model.state_dict(), PATH))"
        )
    return f"{path} is not a PyTorch checkpoint: {_first_line(text)}"


def _is_state_dict(torch: Any, value: Any) -> bool:
    """A mapping of names to tensors; other values (a module's ``_extra_state``) may sit
    beside them, but no nested mapping (that is a training checkpoint's outer dict)."""
    return (
        isinstance(value, Mapping)
        and all(isinstance(k, str) for k in value)
        and any(isinstance(v, torch.Tensor) for v in value.values())
        and not any(isinstance(v, Mapping) for v in value.values())
    )


def _items(value: Any) -> list[tuple[Any, Any]]:
    """The entries of a container a training checkpoint nests things in: a mapping, or a list
    (Lightning keeps its optimizers' states in the list ``optimizer_states``)."""
    if isinstance(value, Mapping):
        return list(value.items())
    if isinstance(value, list | tuple):
        return list(enumerate(value))
    return []


def _find(
    torch: Any, obj: Any, state_key: str | None
) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    """Key paths of the state_dict and of every optimizer state inside ``obj``."""
    if _is_state_dict(torch, obj):
        return (), []
    states: list[tuple[Any, ...]] = []
    optimizers: list[tuple[Any, ...]] = []

    def walk(value: Any, path: tuple[Any, ...], depth: int) -> None:
        if depth > 3:
            return
        for key, item in _items(value):
            if is_optimizer(item):
                optimizers.append((*path, key))
            elif _is_state_dict(torch, item):
                states.append((*path, key))
            else:
                walk(item, (*path, key), depth + 1)

    walk(obj, (), 0)
    if state_key is not None:
        chosen = [p for p in states if _dotted(p) == state_key]
        if not chosen:
            found = ", ".join(_dotted(p) for p in states) or "none"
            raise CheckpointError(f"no state_dict at key {state_key!r}; state_dicts: {found}")
    else:
        rank = {key: i for i, key in enumerate(STATE_KEYS)}
        chosen = sorted(states, key=lambda p: (len(p), rank.get(str(p[-1]), len(rank))))
    if not chosen:
        raise CheckpointError(
            "holds no state_dict (a mapping of names to tensors) within three levels"
        )
    return chosen[0], optimizers


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(map(str, path))


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _replaced(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A shallow copy of ``obj`` with the item at ``path`` replaced (containers copied along
    the path, so the loaded object is never changed)."""
    if not path:
        return value
    inner = _replaced(obj[path[0]], path[1:], value)
    if isinstance(obj, tuple):
        return (*obj[: path[0]], inner, *obj[path[0] + 1 :])
    head = copy.copy(obj)
    head[path[0]] = inner
    return head


def _to_numpy(torch: Any, tensor: Any) -> NDArray[Any]:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return np.asarray(tensor.view(torch.int16).numpy()).view(np.uint16)
    return np.asarray(tensor.numpy())


def _from_numpy(torch: Any, raw: NDArray[Any], dtype: str) -> Any:
    raw = np.ascontiguousarray(raw)
    if dtype == "BF16":
        return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(raw.copy())


class TorchCheckpoint:
    """A ``torch.save`` file holding a state_dict, possibly nested in a training checkpoint.

    ``state_key`` picks the state_dict by its dotted key path when there are several (a model
    and its EMA copy); by default the one under the most usual key is used. Every optimizer
    state found beside it (several, in a list, as Lightning saves them) is matched to the
    state_dict's parameters when the file is opened; one that cannot be matched is refused.
    """

    format = "torch"

    def __init__(
        self, path: Path, state_key: str | None = None, trust_optimizer_order: bool = False
    ) -> None:
        self.path = path
        self._trust_order = trust_optimizer_order
        self._torch = _torch()
        self._obj = _load(self._torch, path)
        try:
            self._state_path, optimizers = _find(self._torch, self._obj, state_key)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        self._state: dict[str, Any] = _get(self._obj, self._state_path)
        self._infos = self._table()
        self._optimizers = [
            (
                where,
                map_optimizer(
                    self._torch,
                    _get(self._obj, where),
                    self._state,
                    self._infos,
                    f"{path}: the optimizer state at {_dotted(where)!r}",
                ),
            )
            for where in optimizers
        ]

    def _table(self) -> dict[str, TensorInfo]:
        first: dict[tuple[int, int], str] = {}
        tied_to: dict[str, str] = {}
        tensors = {k: v for k, v in self._state.items() if isinstance(v, self._torch.Tensor)}
        for name, tensor in tensors.items():
            if tensor.numel() == 0:
                continue
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if key in first:
                tied_to[name] = first[key]
                tied_to.setdefault(first[key], name)
            first.setdefault(key, name)
        return {
            name: TensorInfo(
                name,
                tuple(tensor.shape),
                _dtype_name(self._torch, tensor.dtype),
                name in tied_to,
                tied_to.get(name),
            )
            for name, tensor in tensors.items()
        }

    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._infos

    def input_files(self) -> list[Path]:
        return [self.path]

    def read(self, name: str) -> NDArray[np.float64]:
        info = self._infos[name]
        raw = _to_numpy(self._torch, self._state[name])
        return decode(raw, info.dtype, f"{self.path}: {name!r}").astype(np.float64, copy=False)

    # -- optimizer ------------------------------------------------------------------------------

    def _edit_optimizer(
        self, optimizer: Mapping[str, Any], found: OptimizerMap, editor: TensorEditor
    ) -> tuple[Any, dict[str, Any]]:
        torch = self._torch
        state = dict(optimizer["state"])
        reset: list[dict[str, Any]] = []
        for pid, name in found.names.items():
            if not editor.touches(name) or pid not in state:
                continue
            entry = dict(state[pid])
            keys = []
            for key, value in entry.items():
                # map_optimizer checked that every such tensor is shaped like its parameter.
                if isinstance(value, torch.Tensor) and value.dim():
                    dtype = _dtype_name(torch, value.dtype)
                    moment = editor.apply_moment(name, _to_numpy(torch, value))
                    entry[key] = _from_numpy(torch, moment, dtype)
                    keys.append(key)
            state[pid] = entry
            reset.append({"param": name, "keys": keys})
        edited = dict(optimizer)
        edited["state"] = state
        mapped_by = found.mapped_by
        if self._trust_order and found.unverified:
            mapped_by += " (trusted: --trust-optimizer-order)"
        notes: dict[str, Any] = {"mapped_by": mapped_by, "moments": reset}
        if found.note is not None:
            notes["param_names"] = found.note
        return edited, notes

    # -- writing --------------------------------------------------------------------------------

    def write_to(
        self, target: Path, editor: TensorEditor, final: Path, writeback: bool = False
    ) -> tuple[FileDigest, FileDigest, dict[str, Any]]:
        del writeback  # torch.save writes the whole file at once; Stage.commit syncs it
        torch = self._torch
        state = copy.copy(self._state)  # keeps the OrderedDict type and its _metadata
        for name in list(state):
            if not editor.touches(name):
                continue
            dtype = self._infos[name].dtype
            edited = editor.apply(name, _to_numpy(torch, state[name]), dtype)
            state[name] = _from_numpy(torch, edited, dtype)
        obj = _replaced(self._obj, self._state_path, state)
        notes: dict[str, Any] = {"state_dict": _dotted(self._state_path) or "(top level)"}
        edits = []
        for where, found in self._optimizers:
            edited, note = self._edit_optimizer(_get(self._obj, where), found, editor)
            obj = _replaced(obj, where, edited)
            edits.append({"at": _dotted(where), **note})
        if len(edits) == 1:
            notes["optimizer"] = edits[0]
        elif edits:
            notes["optimizers"] = edits
        try:
            with open_staged(target) as handle:
                torch.save(obj, handle)
        except RuntimeError as exc:
            # A full disk or the file-size limit: the OSError comes first, then torch's zip
            # writer fails to close ("unexpected pos ...") and hides it. The OSError is what
            # to report (one line, naming where).
            cause = _os_error_behind(exc)
            if cause is None:
                raise
            raise cause from exc
        written = checksum_file(target)
        return checksum_file(self.path), written.named(str(final)), notes

    def write(self, out: Path, editor: TensorEditor, stage: Stage) -> WriteResult:
        touched = [name for name in self._infos if editor.touches(name)]
        for where, found in [] if self._trust_order else self._optimizers:
            # Before a byte is written: moments matched by an unverifiable order stay as they
            # are only if no edit reaches them.
            found.check_editable(
                touched,
                _get(self._obj, where)["state"],
                f"{self.path}: the optimizer state at {_dotted(where)!r}",
            )
        digest_in, digest_out, notes = self.write_to(stage.file(out), editor, out)
        return WriteResult(outputs=[digest_out], inputs=[digest_in], notes=notes)


def _os_error_behind(exc: BaseException) -> OSError | None:
    """The OSError an exception was raised while handling (its context chain), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None
