"""Creating the ONNX Runtime session: CUDA when it really works, else CPU, said in one line.

``CUDAExecutionProvider`` being *available* only means the wheel was built with it; whether it
runs depends on the CUDA and cuDNN libraries found at session creation, and ONNX Runtime then
falls back to CPU silently after logging errors. So the session is created, asked which
providers it actually uses (``get_providers()``), and one INFO line names the one in use. The
failed CUDA attempt runs with ONNX Runtime's logging quieted (session log severity: errors and
above are hidden), so a CPU machine with the GPU wheel is not flooded with library errors.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from neuronwatch.errors import ConfigError

__all__ = ["PROVIDERS", "Provider", "create_session"]

log = logging.getLogger(__name__)

Provider = Literal["auto", "cuda", "cpu"]
PROVIDERS: tuple[str, ...] = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# ORT severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_QUIET = 4
_DEFAULT = 3


def _options(ort: Any, severity: int, data_folder: Path | None, threads: int | None) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = severity
    # Run nodes in the file's order: each reduction then runs right after its activation (see
    # onnx_augment) and the activation and temporaries are freed early. ORT's default order
    # may postpone them, keeping every watched activation alive at once (+30 % peak RSS on
    # bench/onnx_audit.py's encoder, against +14 % in this order).
    priority = getattr(getattr(ort, "ExecutionOrder", None), "PRIORITY_BASED", None)
    if priority is not None:
        options.execution_order = priority
    if threads is not None:
        options.intra_op_num_threads = threads
    if data_folder is not None:
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(data_folder)
        )
    return options


def create_session(
    model: bytes | str,
    provider: Provider = "auto",
    *,
    where: str = "model",
    data_folder: Path | None = None,
    threads: int | None = None,
    ort: Any = None,
    session_factory: Callable[..., Any] | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` for ``model`` (bytes or a path) on ``provider``.

    ``auto`` uses CUDA when it works, else CPU; ``cuda`` raises :class:`ConfigError` when it
    does not; ``cpu`` never tries CUDA. ``ort``/``session_factory`` replace the onnxruntime
    module and ``InferenceSession`` (tests without a GPU).
    """
    if provider not in PROVIDERS:
        raise ConfigError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if ort is None:
        ort = importlib.import_module("onnxruntime")
    factory = session_factory or ort.InferenceSession
    available: Sequence[str] = ort.get_available_providers()
    reason = (
        "asked for"
        if provider == "cpu"
        else "CUDAExecutionProvider is not in this onnxruntime build"
    )
    if provider != "cpu" and CUDA in available:
        try:
            session = factory(
                model, _options(ort, _QUIET, data_folder, threads), providers=[CUDA, CPU]
            )
        except Exception as exc:
            session, reason = None, f"CUDA failed: {exc}".splitlines()[0]
        if session is not None:
            if session.get_providers()[:1] == [CUDA]:
                log.info("%s: ONNX Runtime runs on %s", where, CUDA)
                return session
            reason = "the CUDA libraries could not be loaded"
    if provider == "cuda":
        raise ConfigError(
            f"{where}: --provider cuda, but {reason}; install onnxruntime-gpu with a working "
            "CUDA, or use --provider auto/cpu"
        )
    try:
        session = factory(model, _options(ort, _DEFAULT, data_folder, threads), providers=[CPU])
    except Exception as exc:
        raise ConfigError(f"{where}: {_cannot_load(exc, ort)}") from exc
    log.info("%s: ONNX Runtime runs on %s (%s)", where, CPU, reason)
    return session


# ORT's refusal of an opset it does not support: "Opset 29 is under development ... Current
# official support for domain ai.onnx is till opset 28."
_NEWER_OPSET = re.compile(
    r"Opset (\d+) is under development.*support for domain (\S+) is till opset (\d+)", re.S
)


def _cannot_load(exc: BaseException, ort: Any) -> str:
    """Why ONNX Runtime refused a model, in one line, with the fix when it is known."""
    newer = _NEWER_OPSET.search(str(exc))
    if newer is not None:
        opset, domain, supported = newer.groups()
        return (
            f"the model's {domain} opset {opset} is newer than onnxruntime "
            f"{getattr(ort, '__version__', '?')} supports (up to {supported}); export with an "
            "older opset or upgrade onnxruntime"
        )
    return f"ONNX Runtime cannot load the model: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
