"""Loading ONNX models for watching: checked, weights left where they are.

The graph is read without its external data (``load_external_data=False``), so a model of any
size, including one over protobuf's 2 GB limit, is augmented from its small graph proto. An
augmented model whose weights live in external files is written next to the original, where the
relative data locations still resolve, and ONNX Runtime is handed that path; a self-contained
model is handed over as bytes. External-data locations that escape the model's folder
(``../``, absolute paths) are refused.

Every failure is a :class:`~neuronwatch.ConfigError` that names the file and what to do.
"""

from __future__ import annotations

import importlib
import logging
import os
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import onnx

from neuronwatch.errors import ConfigError

__all__ = ["LoadedModel", "load_model", "lower_ir_version", "runtime_ir_version", "stage"]

log = logging.getLogger(__name__)

# Field 1 (ir_version, varint) opens every ModelProto onnx writes: tag byte 0x08.
_MODEL_TAG = b"\x08"


@dataclass
class LoadedModel:
    """A model's graph proto (no weights from external data) and where it came from."""

    proto: onnx.ModelProto
    path: Path | None
    external: bool

    @property
    def folder(self) -> Path | None:
        return None if self.path is None else self.path.parent


def _external_locations(model: onnx.ModelProto) -> set[str]:
    locations = set()
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    locations.add(entry.value)
    return locations


def _all_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    # Initializers of the main graph and of every subgraph, and Constant values.
    return list(onnx.external_data_helper._get_all_tensors(model))


def _check_location(location: str, path: Path) -> None:
    pure = PurePosixPath(location)
    windows = PureWindowsPath(location)
    if (
        pure.is_absolute()
        or windows.is_absolute()
        or windows.drive
        or ".." in pure.parts
        or ".." in windows.parts
    ):
        raise ConfigError(
            f"{path}: external data location {location!r} escapes the model's folder; only "
            "paths relative to the model, without '..', are read"
        )
    data = path.parent / location
    if not data.is_file():
        raise ConfigError(
            f"{path}: external data file {data} is missing; keep it next to the model"
        )


def load_model(source: str | os.PathLike[str] | onnx.ModelProto) -> LoadedModel:
    """The graph proto of ``source`` (a path or an in-memory model), checked.

    Raises :class:`ConfigError` for a missing file, a file that is not ONNX, a truncated or
    corrupt model, and unsafe or missing external data.
    """
    if isinstance(source, onnx.ModelProto):
        external = bool(_external_locations(source))
        if external:
            raise ConfigError(
                "an in-memory model with external data has no folder to read it from; pass "
                "the model's path instead"
            )
        copy = onnx.ModelProto()
        copy.CopyFrom(source)  # the caller's model is never modified
        return LoadedModel(copy, None, False)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: no such model file")
    with path.open("rb") as handle:
        head = handle.read(1)
    if not head:
        raise ConfigError(f"{path}: the file is empty, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and onnx's own checks
        if head != _MODEL_TAG:
            raise ConfigError(f"{path}: not an ONNX model (it does not parse as one)") from exc
        raise ConfigError(
            f"{path}: the ONNX model is truncated or corrupt ({exc}); export or copy it again"
        ) from exc
    if not proto.HasField("graph") or not proto.graph.node:
        kind = "truncated or corrupt" if head == _MODEL_TAG else "not an ONNX model"
        raise ConfigError(f"{path}: {kind}: it holds no graph nodes")
    locations = _external_locations(proto)
    for location in sorted(locations):
        _check_location(location, path)
    return LoadedModel(proto, path.resolve(), bool(locations))


@cache
def runtime_ir_version() -> int:
    """The newest IR version this ONNX Runtime loads, probed once with a one-node model."""
    ort: Any = importlib.import_module("onnxruntime")

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    options = ort.SessionOptions()
    options.log_severity_level = 4
    for version in range(onnx.IR_VERSION, 6, -1):
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
        model.ir_version = version
        try:
            ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception:
            continue
        return version
    return 7


def _required_ir(model: onnx.ModelProto) -> int:
    """The oldest IR version that can carry the model's default-domain opset."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    for _release, ir, default_opset, *_ in onnx.helper.VERSION_TABLE:
        if default_opset >= opset:
            return int(ir)
    return int(onnx.IR_VERSION)


def lower_ir_version(model: onnx.ModelProto, where: str) -> None:
    """Lower ``model.ir_version`` in place to what ONNX Runtime loads (recent ``onnx`` releases
    write IR versions ahead of the runtime), when the model's opset allows it."""
    supported = runtime_ir_version()
    if model.ir_version <= supported:
        return
    needed = _required_ir(model)
    if needed > supported:
        ort: Any = importlib.import_module("onnxruntime")

        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        raise ConfigError(
            f"{where}: opset {opset} needs ONNX IR version {needed}, but onnxruntime "
            f"{ort.__version__} reads up to IR {supported}; export with an older opset or "
            "upgrade onnxruntime"
        )
    log.debug("%s: IR version %d lowered to %d for onnxruntime", where, model.ir_version, supported)
    model.ir_version = max(needed, min(model.ir_version, supported))


@dataclass
class Staged:
    """What ONNX Runtime loads: serialised bytes, or a file next to the original's data.

    ``data_folder`` is set when bytes of a model with external data are handed over (its
    folder could not be written): the session reads the weights from there.
    """

    payload: bytes | str
    cleanup: Path | None = None
    data_folder: Path | None = None

    def remove(self) -> None:
        if self.cleanup is not None:
            self.cleanup.unlink(missing_ok=True)
            self.cleanup = None


def stage(model: onnx.ModelProto, loaded: LoadedModel) -> Staged:
    """Hand ``model`` (the augmented graph of ``loaded``) to ONNX Runtime: as bytes when it
    carries its weights, else as a hidden file beside the original so that its relative
    external-data locations resolve (removed by :meth:`Staged.remove`). A read-only folder
    falls back to bytes plus the folder to read the weights from."""
    if not loaded.external or loaded.folder is None or loaded.path is None:
        return Staged(model.SerializeToString())
    serialized = model.SerializeToString()
    try:
        handle, name = tempfile.mkstemp(
            prefix=f".{loaded.path.stem}.neuronwatch-", suffix=".onnx", dir=loaded.folder
        )
    except OSError as exc:
        log.debug("cannot write beside %s (%r); handing the graph over as bytes", loaded.path, exc)
        return Staged(serialized, data_folder=loaded.folder)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(serialized)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Staged(name, Path(name))
