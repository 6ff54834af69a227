"""``neuronwatch audit MODEL.onnx --data DATA --out DIR``: an ONNX model's neurons on real data.

Runs the data through ONNX Runtime with the reductions appended to the graph, then writes the
report, its plots and HTML page into DIR, and applies the dead/dormant/saturated budgets of
``neuronwatch check`` when given.

DIR is checked before the audit runs (a new or empty directory, or an earlier report's) and
nothing is written until the audit succeeded: a failed audit leaves DIR as it was. Then only
the audit's own files are replaced in DIR, each atomically (the report pair first, then the
plots and page together); anything else in DIR (a checkpoint, logs) is never touched. The
report is kept even when the plots cannot be made (no matplotlib): one line says so.

Exit codes, as ``neuronwatch check``: 0 within budget, 1 over budget, 2 bad input (one line on
stderr), so a CI step can tell "the model regressed" from "the gate is misconfigured".
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ..audit_data import InputSpec, open_data, parse_shape
from ..errors import ConfigError, MissingExtraError, NeuronwatchError
from ..report import Report
from ..report_files import JSON_NAME, NPZ_NAME
from .check import BadInput, budget_options, check_summary_target, enforce_budget
from .options import console, quiet_option

__all__ = ["audit"]

PROVIDERS = ("auto", "cuda", "cpu")
REPORT_FILES = (JSON_NAME, NPZ_NAME)
DEFAULT_BATCH = 32


@contextmanager
def _bad_input() -> Iterator[None]:
    """neuronwatch's errors as one line on stderr and exit code 2 (``check``'s bad input), so
    a CI step tells a misconfigured gate from a model over budget (1)."""
    try:
        yield
    except NeuronwatchError as exc:
        raise BadInput(str(exc)) from exc


def _check_out(out: Path) -> None:
    """Refuse an ``--out`` the audit could not fill without touching something else: a file,
    or a directory holding things but no neuronwatch report (a ``report.json`` of another
    tool is not one). Checked before the audit runs."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not _holds_a_report(out):
        raise ConfigError(
            f"--out {out} exists and holds something other than a neuronwatch report; pass a "
            "new or an empty directory, or an earlier audit's (only the audit's own files are "
            "replaced there)"
        )


def _holds_a_report(folder: Path) -> bool:
    """Whether ``folder`` holds a report this neuronwatch wrote (it loads)."""
    try:
        Report.load(folder)
    except NeuronwatchError:
        return False
    return True


def _written_by_audit(out: Path) -> list[Path]:
    """Every file the audit may write into ``out``."""
    from ..plots import HTML_NAME, VIEWS

    return [out / name for name in (*REPORT_FILES, HTML_NAME, *(view.file for view in VIEWS))]


def _save(report: Report, out: Path) -> list[Path]:
    """``report.json`` and ``report.npz`` into ``out`` (replaced together, atomically); a
    directory this call created is removed again when the save fails."""
    created = not out.exists()
    try:
        report.save(out)
    except BaseException as exc:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if isinstance(exc, OSError):
            raise ConfigError(f"cannot write the report into --out {out}: {exc}") from exc
        raise
    return [out / name for name in REPORT_FILES]


def _plots(report: Report, out: Path) -> list[Path]:
    """The plots and ``index.html`` beside the report; when they cannot be made the report is
    kept, one line on stderr says why, and a previous audit's plots (which would show another
    report) are removed."""
    from ..plots import HTML_NAME, VIEWS, write_plots  # matplotlib only inside write_plots

    try:
        return write_plots(report, out)
    except Exception as exc:  # the report is safe on disk: never lose it to a plot
        reason = str(exc) if isinstance(exc, NeuronwatchError) else f"{type(exc).__name__}: {exc}"
        stale = [out / name for name in (*(v.file for v in VIEWS), HTML_NAME)]
        removed = False
        for path in stale:
            if path.is_file():
                path.unlink()
                removed = True
        note = "; the previous audit's plots were removed" if removed else ""
        click.echo(
            f"warning: plots skipped ({reason}); the report is saved: draw them later with "
            f"neuronwatch plot {out}{note}",
            err=True,
        )
        return []


def _batch_size(batch: int | None, fixed: int | None) -> int:
    """``--batch``, or the batch size the model fixes (which ``--batch`` may only repeat)."""
    if fixed is None:
        return DEFAULT_BATCH if batch is None else batch
    if batch is not None and batch != fixed:
        raise ConfigError(
            f"--batch {batch}: the model takes batches of exactly {fixed} samples (its inputs "
            f"fix axis 0); pass --batch {fixed}, or leave --batch out"
        )
    return fixed


def _check_mask(ctx: click.Context, mask: str, inputs: Sequence[InputSpec]) -> None:
    """An explicit ``--mask`` must name a model input (a typo would count pad positions
    silently); the default ``attention_mask`` is used only when the model has it."""
    source = ctx.get_parameter_source("mask")
    if source is click.core.ParameterSource.DEFAULT or not mask:
        return
    if mask not in {spec.name for spec in inputs}:
        raise ConfigError(
            f"--mask {mask!r}: the model has no input of that name; its inputs: "
            f"{', '.join(spec.describe() for spec in inputs)}; pass --mask '' to count every row"
        )


def _adapter() -> Any:
    """The ONNX adapter, imported only by this command (onnx and onnxruntime are an extra)."""
    try:
        return importlib.import_module("neuronwatch.adapters.onnx")
    except ImportError as exc:
        if exc.name in ("onnx", "onnxruntime"):
            raise MissingExtraError(exc.name, "onnx") from exc
        raise


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="An .npz with arrays named after the model's inputs, or a directory of .npz/.npy "
    "shards (streamed). Axis 0 indexes samples.",
)
@click.option(
    "--random", "random_samples", type=click.IntRange(min=1), default=None, metavar="N",
    help="Audit on N random samples instead of --data (a smoke test, not a verdict).",
)  # fmt: skip
@click.option(
    "--shape", "shapes", multiple=True, metavar="INPUT=DIMS",
    help="With --random: the dims of one sample of an input with dynamic axes, e.g. "
    "--shape input_ids=128. Repeat per input.",
)  # fmt: skip
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), required=True,
    help="Directory for report.json, report.npz, the plots and index.html.",
)  # fmt: skip
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Samples per run. [default: 32, or the batch size the model fixes]")  # fmt: skip
@click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True,
              help="auto: CUDA when it works, else CPU.")  # fmt: skip
@click.option(
    "--threshold", type=float, default=None,
    help="Fire threshold for every layer (a value above it fires). [default: the activation "
    "family's: 0 for ReLU, 1e-3 for smooth ones]",
)  # fmt: skip
@click.option("--min-rows", type=click.IntRange(min=1), default=None,
              help="Rows a layer needs before its neurons are judged. [default: 1000]")  # fmt: skip
@click.option("--mask", default="attention_mask", show_default=True,
              help="Model input whose zeros mark pad positions, left out of every statistic; "
              "'' counts every row.")  # fmt: skip
@click.option("--histogram-every", type=click.IntRange(min=1), default=8, show_default=True,
              help="Compute the value histogram on one batch in this many.")  # fmt: skip
@click.option(
    "--pre", is_flag=True,
    help="Also watch each activation's input (layers <name>:pre): what `neuronwatch rescue "
    "lift` needs.",
)  # fmt: skip
@click.option("--name", default=None, help="Model name in the report. [default: from the file]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --random.")
@budget_options
@quiet_option
@click.pass_context
def audit(
    ctx: click.Context,
    /,
    model: Path,
    data: Path | None,
    random_samples: int | None,
    shapes: tuple[str, ...],
    out: Path,
    batch: int | None,
    provider: str,
    threshold: float | None,
    min_rows: int | None,
    mask: str,
    histogram_every: int,
    pre: bool,
    name: str | None,
    seed: int,
    quiet: bool,
    **budget: Any,
) -> None:
    """Audit an ONNX MODEL for dead, dormant and saturated neurons on DATA.

    \b
    Examples:
      neuronwatch audit model.onnx --data batches.npz --out audit/
      neuronwatch audit model.onnx --data shards/ --out audit/ --max-dead-ratio 0.3
      neuronwatch audit model.onnx --random 256 --shape input_ids=128 --out smoke/
      neuronwatch audit model.onnx --data batches.npz --pre --out audit-pre/   (for lift)
    """
    screen = console()
    with _bad_input():
        if shapes and random_samples is None:
            raise ConfigError("--shape only applies with --random N")
        if threshold is not None and not math.isfinite(threshold):
            raise ConfigError(f"--threshold must be finite, got {threshold}")
        _check_out(out)
        protected = [model, *([] if data is None else [data]), *_written_by_audit(out)]
        check_summary_target(budget["summary_json"], protected)
        summary = budget["summary_json"]
        if (
            data is not None
            and summary is not None
            and data.is_dir()
            and summary.resolve().is_relative_to(data.resolve())
        ):
            raise BadInput(f"--summary-json {summary} is inside --data {data}; pass another path")
        adapter = _adapter()
        settings: dict[str, Any] = {}
        if threshold is not None:
            settings["fire_threshold"] = threshold
        if min_rows is not None:
            settings["min_rows"] = min_rows
        session = adapter.watch_session(
            model,
            name=name,
            provider=provider,
            mask=mask or None,
            flush_interval=None,
            histogram_every=histogram_every,
            pre=pre,
            strict=True,
            **settings,
        )
        _check_mask(ctx, mask, session.plan.inputs)
        source = open_data(
            data,
            session.plan.inputs,
            random=random_samples,
            shapes=dict(parse_shape(s) for s in shapes),
            seed=seed,
            mask=mask or None,
        )
        batch = _batch_size(batch, source.fixed)
        fixed = " (the model's fixed batch size)" if source.fixed is not None else ""
        screen.print(
            f"{model}: {len(session.plan.layers)} layers on {session.get_providers()[0]}; "
            f"data {source.where}, batches of {batch}{fixed}",
            soft_wrap=True,
        )
        with _progress(screen, source.runnable, quiet) as advance:
            report = adapter.audit(model, source.batches(batch), session=session, on_batch=advance)
        if source.left_out:
            screen.print(
                f"left out the last {source.left_out} samples: the model takes batches of "
                f"exactly {batch}",
                soft_wrap=True,
            )
        written = _save(report, out)
    written += _plots(report, out)
    screen.print(
        f"wrote {out} ({', '.join(p.name for p in written)}); see it with: neuronwatch show {out}",
        soft_wrap=True,
    )
    totals = report.summary()["totals"]
    screen.print(
        f"{totals['neurons']} neurons in {totals['layers']} layers: "
        f"{totals['dead']} dead, {totals['leaking']} leaking, {totals['dormant']} dormant, "
        f"{totals['saturated']} saturated, {totals['unknown']} unknown",
        soft_wrap=True,
    )
    ctx.exit(enforce_budget(report, source=out, **budget))


@contextmanager
def _progress(screen: Any, total: int | None, quiet: bool) -> Iterator[Any]:
    """A progress bar counting samples (axis 0 of the data), with the rate of samples and of
    rows (a sample holds many rows when it has tokens or pixels: the rows of the layer that
    sees the most, pads left out)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = [
        TextColumn("auditing"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]} samples/s, {task.fields[rows]} rows/s"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=screen, disable=quiet, transient=False) as progress:
        task = progress.add_task("audit", total=total, rate="-", rows="-")
        started = time.monotonic()
        seen = [0]

        def advance(samples: int, rows: int) -> None:
            progress.advance(task, samples)
            seen[0] += rows
            speed = progress.tasks[task].speed
            elapsed = time.monotonic() - started
            progress.update(
                task,
                rate=f"{speed:,.0f}" if speed else "-",
                rows=f"{seen[0] / elapsed:,.0f}" if elapsed > 0 else "-",
            )

        yield advance
