"""One rescue run: open, plan (refuse or skip), write through temporary files, manifest last."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..report import Report
from .checkpoint import Checkpoint, CheckpointError, WriteResult
from .formats import open_checkpoint
from .formats.onnx import OnnxCheckpoint
from .manifest import Manifest, build_manifest, manifest_path
from .options import check_patterns
from .outputs import Stage, staged
from .paths import Output, check_outputs, check_spelling, report_files
from .plan import Options, Plan, make_plan

__all__ = ["execute", "report_summary", "rescue"]


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


def _outputs(checkpoint: Checkpoint, out: Path, record: Path, named: bool) -> list[Output]:
    """Every path the run writes, named as the user gave it."""
    folder = checkpoint.format == "sharded"
    fix = "name the new checkpoint " + ("folder" if folder else "file")
    outputs = [Output("--out", out, folder=folder, fix=fix)]
    if isinstance(checkpoint, OnnxCheckpoint) and checkpoint.has_external_data:
        data = out.with_name(f"{out.name}.data")
        outputs.append(Output("--out's external data file", data, fix="choose another --out"))
    example = record / manifest_path(out).name
    option = "--manifest" if named else "the manifest (--out + .manifest.json)"
    fix = f"name a file, e.g. --manifest {example}"
    outputs.append(Output(option, record, fix=fix))
    return outputs


def _inputs(checkpoint: Checkpoint, report_path: Path | None) -> list[tuple[str, Path]]:
    sources = [("the input", path) for path in checkpoint.input_files()]
    return sources + [("the report's", path) for path in report_files(report_path)]


def _targets(
    checkpoint: Checkpoint,
    report_path: Path | None,
    out: str | Path | None,
    manifest: str | Path | None,
) -> tuple[Path, Path]:
    """The output and manifest paths, once every check of :mod:`.paths` passed."""
    if out is None:
        raise ConfigError("--out is required unless --dry-run is given")
    folder = checkpoint.format == "sharded"
    check_spelling("--out", out, folder, example=checkpoint.path.name)
    if manifest is not None:
        check_spelling("--manifest", manifest, False, example="manifest.json")
    target = Path(out)
    record = Path(manifest) if manifest is not None else manifest_path(target)
    outputs = _outputs(checkpoint, target, record, named=manifest is not None)
    check_outputs(outputs, _inputs(checkpoint, report_path))
    return target, record


def rescue(
    op: str,
    checkpoint: str | Path,
    report: Report | str | Path,
    out: str | Path | None = None,
    *,
    layers: Iterable[str] = ("*",),
    dry_run: bool = False,
    fsync: bool = False,
    manifest: str | Path | None = None,
    state_key: str | None = None,
    trust_optimizer_order: bool = False,
    **options: Any,
) -> Manifest:
    """Apply ``op`` (``strip``, ``reinit``, ``prune``, ``lift``) to ``checkpoint`` as
    ``report`` directs, writing ``out`` and its manifest; returns the manifest.

    ``options`` are those of :class:`~neuronwatch.rescue.plan.Options` (``state``,
    ``fraction``, ``init``, ``match_norm``, ``seed``, ``top``, ``constant_tol``). With
    ``dry_run`` nothing is written and the manifest says what would change. With ``fsync`` the
    outputs are on the disk before they are renamed into place (see
    :class:`~neuronwatch.rescue.outputs.Stage`).
    ``trust_optimizer_order`` says a PyTorch file's optimizer lists the parameters in the
    state_dict's order (built from ``model.parameters()``), so their moments are reset by that
    order even where two parameters share a shape; without it such an edit is refused.

    >>> rescue("prune", "model.safetensors", "runs/audit", "pruned.safetensors")  # doctest: +SKIP
    """
    patterns = check_patterns(layers)
    try:
        settings = Options(**options)
    except TypeError as exc:
        raise ConfigError(f"unknown rescue option: {exc}") from None
    settings.check(op)  # before any file is opened: a bad option costs no read
    report_path = None if isinstance(report, Report) else Path(report)
    loaded = report if isinstance(report, Report) else Report.load(report)
    source = Path(checkpoint)
    opened = open_checkpoint(
        source, state_key=state_key, trust_optimizer_order=trust_optimizer_order
    )
    renamed = _onnx_meta(loaded).get("initializers")
    if isinstance(opened, OnnxCheckpoint) and isinstance(renamed, Mapping):
        opened.add_aliases(renamed)
    if not dry_run:
        _targets(opened, report_path, out, manifest)  # before any tensor is read
    plan = make_plan(
        op,
        loaded,
        opened.tensors(),
        opened.read,
        layers=patterns,
        options=settings,
        where=str(source),
    )
    return execute(
        plan, opened, loaded, report_path, out, dry_run=dry_run, fsync=fsync, manifest=manifest
    )


def execute(
    plan: Plan,
    checkpoint: Checkpoint,
    report: Report | None,
    report_path: Path | None,
    out: str | Path | None,
    *,
    dry_run: bool = False,
    fsync: bool = False,
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
    # Checked (again, for rescue()): the plan took time, and paths change meanwhile.
    target, record = _targets(checkpoint, report_path, out, manifest)
    try:
        with staged(fsync) as stage:
            result = (write or _write(checkpoint))(target, plan, stage)
            written = describe(result)
            with stage.file(record).open("w", encoding="utf-8") as handle:
                written.write(handle)
            stage.commit()
    except OSError as exc:
        # A read-only folder, a full disk: one line naming where, nothing left behind.
        raise CheckpointError(
            f"{target} was not written: {exc.strerror or exc} ({_where(exc, target)}); "
            "nothing was left behind: check that the folder is writable and has space"
        ) from None
    return written


def _where(exc: OSError, target: Path) -> str:
    """The path an OSError names, with our temporary files shown as their folder."""
    if not exc.filename:
        return str(target.parent)
    path = Path(str(exc.filename))
    return str(path.parent) if path.name.endswith(".tmp") else str(path)


def _write(checkpoint: Checkpoint) -> Any:
    def write(out: Path, plan: Plan, stage: Stage) -> WriteResult:
        return checkpoint.write(out, plan, stage)

    return write
