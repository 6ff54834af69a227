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
import os
import pickle
import re
import zipfile
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
    sha256_file,
)
from ..dtypes import decode
from ..outputs import Stage

__all__ = ["TorchCheckpoint"]

# Where training scripts usually put the model's weights, most likely first.
STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
# Buffers torch modules save next to their parameters (never in an optimizer).
_BUFFER_LEAVES = frozenset({"running_mean", "running_var", "num_batches_tracked"})


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
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Files from torch < 1.6 (legacy format) cannot be memory-mapped.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights_only" in text or "Weights only" in text:
            wanted = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"global[: ]+([\w.]+)", text)
            what = f" ({wanted.group(1)})" if wanted else ""
            raise CheckpointError(
                f"{path} needs code to load{what}: rescue loads PyTorch files with "
                "weights_only=True and never runs their code; save plain tensors instead "
                "(torch.save(model.state_dict(), PATH))"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: {text}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint: {str(exc).splitlines()[0]}"
        ) from None


def _is_state_dict(torch: Any, value: Any) -> bool:
    """A mapping of names to tensors; other values (a module's ``_extra_state``) may sit
    beside them, but no nested mapping (that is a training checkpoint's outer dict)."""
    return (
        isinstance(value, Mapping)
        and all(isinstance(k, str) for k in value)
        and any(isinstance(v, torch.Tensor) for v in value.values())
        and not any(isinstance(v, Mapping) for v in value.values())
    )


def _is_optimizer(value: Any) -> bool:
    return isinstance(value, Mapping) and "state" in value and "param_groups" in value


def _find(
    torch: Any, obj: Any, state_key: str | None
) -> tuple[tuple[Any, ...], tuple[Any, ...] | None]:
    """Key paths of the state_dict and of the optimizer state inside ``obj``."""
    if _is_state_dict(torch, obj):
        return (), None
    states: list[tuple[Any, ...]] = []
    optimizers: list[tuple[Any, ...]] = []

    def walk(value: Any, path: tuple[Any, ...], depth: int) -> None:
        if not isinstance(value, Mapping) or depth > 3:
            return
        for key, item in value.items():
            if _is_optimizer(item):
                optimizers.append((*path, key))
            elif _is_state_dict(torch, item):
                states.append((*path, key))
            else:
                walk(item, (*path, key), depth + 1)

    walk(obj, (), 0)
    if state_key is not None:
        chosen = [p for p in states if ".".join(map(str, p)) == state_key]
        if not chosen:
            found = ", ".join(".".join(map(str, p)) for p in states) or "none"
            raise CheckpointError(f"no state_dict at key {state_key!r}; state_dicts: {found}")
    else:
        rank = {key: i for i, key in enumerate(STATE_KEYS)}
        chosen = sorted(states, key=lambda p: (len(p), rank.get(str(p[-1]), len(rank))))
    if not chosen:
        raise CheckpointError(
            "holds no state_dict (a mapping of names to tensors) within three levels"
        )
    return chosen[0], (optimizers[0] if optimizers else None)


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def _replaced(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A shallow copy of ``obj`` with the item at ``path`` replaced (containers copied along
    the path, so the loaded object is never changed)."""
    if not path:
        return value
    head = copy.copy(obj)
    head[path[0]] = _replaced(obj[path[0]], path[1:], value)
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
    and its EMA copy); by default the one under the most usual key is used.
    """

    format = "torch"

    def __init__(self, path: Path, state_key: str | None = None) -> None:
        self.path = path
        self._torch = _torch()
        self._obj = _load(self._torch, path)
        try:
            self._state_path, self._optim_path = _find(self._torch, self._obj, state_key)
        except CheckpointError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        self._state: dict[str, Any] = _get(self._obj, self._state_path)

    def tensors(self) -> Mapping[str, TensorInfo]:
        seen: dict[tuple[int, int], str] = {}
        tied: set[str] = set()
        tensors = {k: v for k, v in self._state.items() if isinstance(v, self._torch.Tensor)}
        for name, tensor in tensors.items():
            if tensor.numel() == 0:
                continue
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if key in seen:
                tied.update({name, seen[key]})
            seen.setdefault(key, name)
        return {
            name: TensorInfo(
                name,
                tuple(tensor.shape),
                _dtype_name(self._torch, tensor.dtype),
                name in tied,
            )
            for name, tensor in tensors.items()
        }

    def input_files(self) -> list[Path]:
        return [self.path]

    def read(self, name: str) -> NDArray[np.float64]:
        info = self.tensors()[name]
        raw = _to_numpy(self._torch, self._state[name])
        return decode(raw, info.dtype, f"{self.path}: {name!r}").astype(np.float64, copy=False)

    # -- optimizer ------------------------------------------------------------------------------

    def _param_names(self, optimizer: Mapping[str, Any]) -> tuple[dict[Any, str], str]:
        """Optimizer parameter id -> state_dict name, and how it was found."""
        groups = optimizer["param_groups"]
        ids = [pid for group in groups for pid in group["params"]]
        if all("param_names" in group for group in groups):
            names = [n for group in groups for n in group["param_names"]]
            return dict(zip(ids, names, strict=True)), "param_names"
        # Without recorded names, optimizer ids follow model.parameters(): the state_dict's
        # order without buffers and without the second copy of a tied parameter.
        infos = self.tensors()
        seen: set[tuple[int, int]] = set()
        candidates = []
        for name, tensor in self._state.items():
            if not isinstance(tensor, self._torch.Tensor):
                continue
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
            if key in seen and tensor.numel():
                continue
            seen.add(key)
            if name.rsplit(".", 1)[-1] in _BUFFER_LEAVES or not tensor.is_floating_point():
                continue
            candidates.append(name)
        state = optimizer["state"]
        if len(candidates) != len(ids):
            raise CheckpointError(
                f"{self.path}: the optimizer has {len(ids)} parameters but the state_dict "
                f"{len(candidates)}; cannot tell which moments belong to which parameter "
                "(build the optimizer from model.named_parameters() so it saves param_names)"
            )
        for pid, name in zip(ids, candidates, strict=True):
            for value in state.get(pid, {}).values():
                if (
                    isinstance(value, self._torch.Tensor)
                    and value.dim()
                    and (tuple(value.shape) != infos[name].shape)
                ):
                    raise CheckpointError(
                        f"{self.path}: optimizer parameter #{pid} has moments of shape "
                        f"{tuple(value.shape)} but parameter {name!r} in the same position has "
                        f"shape {infos[name].shape}; build the optimizer from "
                        "model.named_parameters() so it saves param_names"
                    )
        return dict(zip(ids, candidates, strict=True)), "order"

    def _edit_optimizer(
        self,
        optimizer: Mapping[str, Any],
        editor: TensorEditor,
        shapes: Mapping[str, tuple[int, ...]],
    ) -> tuple[Any, dict[str, Any]]:
        torch = self._torch
        names, mapped_by = self._param_names(optimizer)
        state = dict(optimizer["state"])
        reset: list[dict[str, Any]] = []
        for pid, name in names.items():
            if not editor.touches(name) or pid not in state:
                continue
            entry = dict(state[pid])
            keys = []
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and tuple(value.shape) == shapes[name]:
                    dtype = _dtype_name(torch, value.dtype)
                    moment = editor.apply_moment(name, _to_numpy(torch, value))
                    entry[key] = _from_numpy(torch, moment, dtype)
                    keys.append(key)
            state[pid] = entry
            reset.append({"param": name, "keys": keys})
        edited = dict(optimizer)
        edited["state"] = state
        return edited, {"mapped_by": mapped_by, "moments": reset}

    # -- writing --------------------------------------------------------------------------------

    def write_to(
        self, target: Path, editor: TensorEditor, final: Path
    ) -> tuple[FileDigest, FileDigest, dict[str, Any]]:
        torch = self._torch
        infos = self.tensors()
        state = copy.copy(self._state)  # keeps the OrderedDict type and its _metadata
        for name in list(state):
            if not editor.touches(name):
                continue
            dtype = infos[name].dtype
            edited = editor.apply(name, _to_numpy(torch, state[name]), dtype)
            state[name] = _from_numpy(torch, edited, dtype)
        obj = _replaced(self._obj, self._state_path, state)
        notes: dict[str, Any] = {
            "state_dict": ".".join(map(str, self._state_path)) or "(top level)"
        }
        if self._optim_path is not None:
            optimizer = _get(self._obj, self._optim_path)
            shapes = {name: info.shape for name, info in infos.items()}
            edited, notes["optimizer"] = self._edit_optimizer(optimizer, editor, shapes)
            obj = _replaced(obj, self._optim_path, edited)
        torch.save(obj, target)
        with target.open("rb+") as handle:
            os.fsync(handle.fileno())
        written = sha256_file(target)
        return sha256_file(self.path), FileDigest(str(final), written.sha256, written.bytes), notes

    def write(self, out: Path, editor: TensorEditor, stage: Stage) -> WriteResult:
        digest_in, digest_out, notes = self.write_to(stage.file(out), editor, out)
        return WriteResult(outputs=[digest_out], inputs=[digest_in], notes=notes)
