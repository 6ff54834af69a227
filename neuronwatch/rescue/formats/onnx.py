"""ONNX models: initializers edited in place of their bytes, external data included.

The model is parsed without its external data; every tensor stored outside the ``.onnx`` file
must name a file inside the model's folder (an absolute path, ``..`` or a symlink leading out is
refused) and a byte range inside that file. The output keeps inline tensors inline and writes
every external tensor (edited or not) into one new data file beside the output, named
``<output>.data``, so the new model never points back at the old files. A graph rewrite (prune's
new widths, swap's activations) is checked with strict shape inference before anything is
renamed into place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ...errors import MissingExtraError
from ..checkpoint import (
    CheckpointError,
    TensorEditor,
    TensorInfo,
    WriteResult,
    checksum_file,
)
from ..dtypes import decode, nbytes, storage_dtype
from ..outputs import Stage, open_staged

__all__ = ["ELEMENT_TYPES", "OnnxCheckpoint", "all_tensors"]

# onnx.TensorProto.DataType -> the dtype names of .dtypes (types without one are never edited).
ELEMENT_TYPES: dict[int, str] = {
    1: "F32",
    2: "U8",
    3: "I8",
    4: "U16",
    5: "I16",
    6: "I32",
    7: "I64",
    9: "BOOL",
    10: "F16",
    11: "F64",
    12: "U32",
    13: "U64",
    16: "BF16",
}
_EXTERNAL = 1  # TensorProto.EXTERNAL

Rewrite = Callable[[Any], dict[str, Any]]


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise MissingExtraError("onnx", "onnx") from exc
    return onnx


def _graph_tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: Any) -> Iterator[Any]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _graph_tensors(graph)


def all_tensors(model: Any) -> Iterator[Any]:
    """Every TensorProto of the model: initializers, sparse ones, constants in attributes and
    subgraphs, and those inside local functions."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _external(tensor: Any) -> dict[str, str] | None:
    if tensor.data_location != _EXTERNAL:
        return None
    return {entry.key: entry.value for entry in tensor.external_data}


class OnnxCheckpoint:
    """An ``.onnx`` file and the external data files it points to."""

    format = "onnx"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.onnx = _onnx()
        if not path.is_file():
            raise CheckpointError(f"{path} not found")
        try:
            self.model = self.onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError and friends have no common base
            raise CheckpointError(
                f"{path} is not a readable ONNX model (truncated or another format): {exc}"
            ) from None
        if not self.model.HasField("graph") or not self.model.opset_import:
            # Protobuf parses an empty file (and many short ones) as an empty message.
            size = path.stat().st_size
            raise CheckpointError(
                f"{path} is not an ONNX model: it holds no graph ({size} bytes; empty, "
                "truncated or another format)"
            )
        self.folder = path.resolve().parent
        # Protobuf hands out a new wrapper object on every access, so tensors are known by
        # their position in the traversal of all_tensors(), never by id().
        self._sources: list[tuple[Path, int, int] | None] = []
        for tensor in all_tensors(self.model):
            info = _external(tensor)
            self._sources.append(None if info is None else self._locate(tensor, info))
        # Top-level initializers come first in the traversal.
        self._initializers = {t.name: i for i, t in enumerate(self.model.graph.initializer)}
        self._aliases: dict[str, tuple[str, bool]] = {}

    def _locate(self, tensor: Any, info: Mapping[str, str]) -> tuple[Path, int, int]:
        where = f"{self.path}: external data of {tensor.name!r}"
        location = info.get("location", "")
        try:
            resolved = (self.folder / location).resolve()  # an absolute location replaces folder
        except (ValueError, OSError) as exc:  # a NUL byte, a symlink loop
            raise CheckpointError(f"{where}: unusable location {location!r} ({exc})") from None
        if not location or self.folder not in resolved.parents:
            raise CheckpointError(
                f"{where} points outside the model's folder ({location!r} -> {resolved}); "
                "refusing to read it"
            )
        if not resolved.is_file():
            raise CheckpointError(f"{where}: file {location!r} not found beside the model")
        try:
            offset = int(info.get("offset", "0"))
            size = resolved.stat().st_size
            length = int(info["length"]) if "length" in info else size - offset
        except ValueError as exc:
            raise CheckpointError(f"{where}: bad offset or length ({exc})") from None
        if offset < 0 or length < 0 or offset + length > size:
            raise CheckpointError(
                f"{where}: bytes [{offset}, {offset + length}) lie beyond the end of "
                f"{location!r} ({size} bytes): truncated data file"
            )
        dtype = ELEMENT_TYPES.get(tensor.data_type)
        if dtype is not None and length != nbytes(tuple(tensor.dims), dtype, where):
            raise CheckpointError(
                f"{where}: {length} bytes for a {dtype} tensor of shape {tuple(tensor.dims)}"
            )
        return resolved, offset, length

    @property
    def has_external_data(self) -> bool:
        """Whether a write produces ``<out>.data`` (some tensor is stored outside the file)."""
        return any(source is not None for source in self._sources)

    # -- reading --------------------------------------------------------------------------------

    def add_aliases(self, mapping: Mapping[str, Any]) -> None:
        """Expose initializers under the names an ONNX audit's wiring uses.

        torch's exporters store a Linear's weight transposed under a made-up name
        (``onnx::MatMul_18``); the ONNX audit reports it under its torch name and layout and
        records ``{torch name: {"initializer": file name, "transposed": bool}}`` in
        ``report.meta["onnx"]["initializers"]``. Edits of an alias are made on the
        initializer, transposed back.
        """
        for alias, target in mapping.items():
            initializer = target.get("initializer") if isinstance(target, Mapping) else None
            if not isinstance(initializer, str) or initializer not in self._initializers:
                raise CheckpointError(
                    f"the report maps {alias!r} to initializer {initializer!r}, which {self.path} "
                    "lacks; was the report taken on this model?"
                )
            if alias not in self._initializers:  # a real initializer of that name wins
                self._aliases[alias] = (initializer, bool(target.get("transposed", False)))

    def tensors(self) -> Mapping[str, TensorInfo]:
        infos = {
            t.name: TensorInfo(
                t.name, tuple(t.dims), ELEMENT_TYPES.get(t.data_type, f"onnx:{t.data_type}")
            )
            for t in self.model.graph.initializer
        }
        for alias, (initializer, transposed) in self._aliases.items():
            info = infos[initializer]
            shape = info.shape[::-1] if transposed else info.shape
            infos[alias] = TensorInfo(alias, shape, info.dtype)
        return infos

    def _edited_as(self, editor: TensorEditor, initializer: str) -> tuple[str, bool] | None:
        """The name (and transposition) under which the plan edits ``initializer``."""
        names = [(initializer, False)] + [
            (alias, flip)
            for alias, (target, flip) in self._aliases.items()
            if target == initializer
        ]
        touched = [(name, flip) for name, flip in names if editor.touches(name)]
        if len(touched) > 1:
            raise CheckpointError(
                f"{self.path}: initializer {initializer!r} would be edited under two names "
                f"({', '.join(n for n, _ in touched)})"
            )
        return touched[0] if touched else None

    def _raw(self, tensor: Any, source: tuple[Path, int, int] | None) -> NDArray[Any]:
        dtype = ELEMENT_TYPES.get(tensor.data_type)
        where = f"{self.path}: initializer {tensor.name!r}"
        if dtype is None:
            raise CheckpointError(
                f"{where} has ONNX element type {tensor.data_type}; cannot edit it"
            )
        storage = storage_dtype(dtype, where)
        shape = tuple(tensor.dims)
        if source is not None:
            file, offset, length = source
            if length == 0:
                return np.zeros(shape, dtype=storage)
            region = np.memmap(file, dtype=np.uint8, mode="r", offset=offset, shape=(length,))
            return np.array(region).view(storage).reshape(shape)
        if tensor.raw_data:
            data = np.frombuffer(tensor.raw_data, dtype=storage)
        else:
            array = self.onnx.numpy_helper.to_array(tensor)
            data = (
                np.ascontiguousarray(array).view(storage)
                if array.dtype.itemsize == storage.itemsize
                else array.astype(storage)
            )
        if data.size != int(np.prod(shape)):
            raise CheckpointError(f"{where} holds {data.size} values for shape {shape}")
        return data.reshape(shape)

    def input_files(self) -> list[Path]:
        return [self.path, *dict.fromkeys(s[0] for s in self._sources if s is not None)]

    def read(self, name: str) -> NDArray[np.float64]:
        initializer, transposed = self._aliases.get(name, (name, False))
        index = self._initializers[initializer]
        tensor = self.model.graph.initializer[index]
        dtype = ELEMENT_TYPES.get(tensor.data_type, "?")
        raw = self._raw(tensor, self._sources[index])
        where = f"{self.path}: initializer {initializer!r}"
        values = decode(raw.T if transposed else raw, dtype, where)
        return values.astype(np.float64, copy=False)

    # -- writing --------------------------------------------------------------------------------

    def write(
        self,
        out: Path,
        editor: TensorEditor,
        stage: Stage,
        rewrite: Rewrite | None = None,
    ) -> WriteResult:
        onnx = self.onnx
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        # The copy's tensors pair with the original's in traversal order.
        originals = list(all_tensors(self.model))
        data_name = f"{out.name}.data"
        data_path = stage.file(out.with_name(data_name)) if self.has_external_data else None
        digests_in = {str(self.path): checksum_file(self.path)}
        top_level = len(model.graph.initializer)
        data_handle = open_staged(data_path) if data_path is not None else None
        try:
            offset = 0
            copies = all_tensors(model)
            for position, (tensor, original, source) in enumerate(
                zip(copies, originals, self._sources, strict=True)
            ):
                edit = self._edited_as(editor, tensor.name) if position < top_level else None
                if edit is None and source is None:
                    continue
                if edit is not None:
                    name, transposed = edit
                    dtype = ELEMENT_TYPES.get(tensor.data_type, "?")
                    raw = self._raw(original, source)
                    edited = editor.apply(name, raw.T if transposed else raw, dtype)
                    edited = edited.T if transposed else edited
                    payload = np.ascontiguousarray(edited).tobytes()
                    _set_dims(tensor, edited.shape)
                else:
                    payload = self._raw(original, source).tobytes()
                if source is None:
                    _set_raw(tensor, payload)
                    continue
                assert data_handle is not None
                digests_in.setdefault(str(source[0]), checksum_file(source[0]))
                data_handle.write(payload)
                _set_external(tensor, data_name, offset, len(payload))
                offset += len(payload)
        finally:
            if data_handle is not None:
                data_handle.close()
        notes: dict[str, Any] = {}
        if rewrite is not None:
            notes = rewrite(model)
        names = [*self._initializers, *self._aliases]
        if any(editor.touches(name) for name in names) or rewrite is not None:
            _clear_stale_shapes(model)
            check(onnx, model, self.path)
        target = stage.file(out)
        with open_staged(target) as handle:
            handle.write(model.SerializeToString())
        outputs = []
        if data_path is not None:
            written = checksum_file(data_path)
            outputs.append(written.named(str(out.with_name(data_name))))
        written = checksum_file(target)
        outputs.insert(0, written.named(str(out)))
        return WriteResult(outputs=outputs, inputs=list(digests_in.values()), notes=notes)


def _set_dims(tensor: Any, shape: tuple[int, ...]) -> None:
    del tensor.dims[:]
    tensor.dims.extend(shape)


def _set_raw(tensor: Any, payload: bytes) -> None:
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        tensor.ClearField(field)
    tensor.raw_data = payload


def _set_external(tensor: Any, location: str, offset: int, length: int) -> None:
    for field in (
        "float_data",
        "int32_data",
        "int64_data",
        "double_data",
        "uint64_data",
        "raw_data",
    ):
        tensor.ClearField(field)
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = _EXTERNAL


def _clear_stale_shapes(model: Any) -> None:
    """Intermediate shapes recorded by the exporter may name the old widths: drop them and
    let shape inference recompute them (graph inputs and outputs keep theirs)."""
    del model.graph.value_info[:]


def check(onnx: Any, model: Any, path: Path) -> None:
    """Strict shape inference over the rewritten graph: a width that no longer fits (a
    Reshape with the old size baked in) is an error here, before anything is written."""
    try:
        # The checker would look for external data files (not renamed into place yet)
        # relative to the working directory; shape inference never reads tensor data.
        if not any(t.data_location == _EXTERNAL for t in all_tensors(model)):
            onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path}: the rewritten graph does not check ({first}); nothing was written"
        ) from None
