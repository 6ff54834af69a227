"""One rescue run: open, plan (refuse or skip), write through temporary files, manifest last."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..report import Report
from .checkpoint import Checkpoint, WriteResult
from .formats import open_checkpoint
from .formats.onnx import OnnxCheckpoint
from .manifest import Manifest, build_manifest, manifest_path
from .outputs import Stage, staged
from .plan import Options, Plan, make_plan

__all__ = ["check_outputs", "execute", "report_summary", "rescue"]


def _same(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_outputs(checkpoint: Checkpoint, targets: Iterable[Path]) -> None:
    """Refuse outputs that would overwrite (or sit inside) any input file or folder."""
    inputs = [p.resolve() for p in checkpoint.input_files()]
    for target in targets:
        resolved = target.resolve()
        for source in inputs:
            if resolved == source or _same(resolved, source) or source in resolved.parents:
                raise ConfigError(
                    f"--out {target} would overwrite the input {source}; the input is never "
                    "modified: choose a new path"
                )


def report_summary(report: Report, where: str | Path | None) -> dict[str, Any]:
    return {
        "path": None if where is None else str(where),
        "model": report.model,
        "window": report.window,
        "step": report.step,
    }


def _onnx_meta(report: Report) -> Mapping[str, Any]:
    """What an ONNX audit records about the file (``report.meta["onnx"]``), or nothing."""
    meta = report.meta.get("onnx")
    return meta if isinstance(meta, Mapping) else {}


def _targets(checkpoint: Checkpoint, out: Path) -> list[Path]:
    targets = [out]
    if checkpoint.format == "onnx":
        targets.append(out.with_name(f"{out.name}.data"))
    return targets


def rescue(
    op: str,
    checkpoint: str | Path,
    report: Report | str | Path,
    out: str | Path | None = None,
    *,
    layers: Iterable[str] = ("*",),
    dry_run: bool = False,
    manifest: str | Path | None = None,
    state_key: str | None = None,
    **options: Any,
) -> Manifest:
    """Apply ``op`` (``strip``, ``reinit``, ``prune``, ``lift``) to ``checkpoint`` as
    ``report`` directs, writing ``out`` and its manifest; returns the manifest.

    ``options`` are those of :class:`~neuronwatch.rescue.plan.Options` (``state``,
    ``fraction``, ``init``, ``match_norm``, ``seed``, ``top``, ``constant_tol``). With
    ``dry_run`` nothing is written and the manifest says what would change.

    >>> rescue("prune", "model.safetensors", "runs/audit", "pruned.safetensors")  # doctest: +SKIP
    """
    report_path = None if isinstance(report, Report) else Path(report)
    loaded = report if isinstance(report, Report) else Report.load(report)
    try:
        settings = Options(**options)
    except TypeError as exc:
        raise ConfigError(f"unknown rescue option: {exc}") from None
    source = Path(checkpoint)
    opened = open_checkpoint(source, state_key=state_key)
    renamed = _onnx_meta(loaded).get("initializers")
    if isinstance(opened, OnnxCheckpoint) and isinstance(renamed, Mapping):
        opened.add_aliases(renamed)
    plan = make_plan(
        op,
        loaded,
        opened.tensors(),
        opened.read,
        layers=layers,
        options=settings,
        where=str(source),
    )
    return execute(plan, opened, loaded, report_path, out, dry_run=dry_run, manifest=manifest)


def execute(
    plan: Plan,
    checkpoint: Checkpoint,
    report: Report | None,
    report_path: Path | None,
    out: str | Path | None,
    *,
    dry_run: bool = False,
    manifest: str | Path | None = None,
    write: Any = None,
    parameters: dict[str, Any] | None = None,
) -> Manifest:
    """Write ``plan`` (or describe it, with ``dry_run``). ``write`` replaces the format's own
    ``write(out, editor, stage)`` (swap passes one that also rewrites the graph)."""
    summary = report_summary(report, report_path) if report is not None else {}
    tensors = dict(checkpoint.tensors())

    def describe(result: WriteResult | None) -> Manifest:
        return build_manifest(
            plan,
            checkpoint_path=checkpoint.path,
            checkpoint_format=checkpoint.format,
            tensors=tensors,
            report=summary,
            result=result,
            parameters=parameters,
        )

    if dry_run:
        return describe(None)
    if out is None:
        raise ConfigError("--out is required unless --dry-run is given")
    target = Path(out)
    record = Path(manifest) if manifest is not None else manifest_path(target)
    check_outputs(checkpoint, [*_targets(checkpoint, target), record])
    folder = checkpoint.format == "sharded"
    if target.is_dir() and not folder:
        raise ConfigError(f"--out {target} is a folder; name the new checkpoint file")
    if folder and target.exists() and (not target.is_dir() or any(target.iterdir())):
        # Replacing a folder would delete whatever else the user keeps in it.
        raise ConfigError(f"--out {target} exists; a sharded checkpoint needs a new folder")
    with staged() as stage:
        result = (write or _write(checkpoint))(target, plan, stage)
        written = describe(result)
        with stage.file(record).open("w", encoding="utf-8") as handle:
            written.write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        stage.commit()
    return written


def _write(checkpoint: Checkpoint) -> Any:
    def write(out: Path, plan: Plan, stage: Stage) -> WriteResult:
        return checkpoint.write(out, plan, stage)

    return write
