"""``neuronwatch audit MODEL.onnx --data DATA --out DIR``: an ONNX model's neurons on real data.

Runs the data through ONNX Runtime with the reductions appended to the graph, then writes the
report, its plots and HTML page into DIR, and applies the dead/dormant/saturated budgets of
``neuronwatch check`` when given. DIR is assembled in a temporary sibling directory and
renamed into place at the end: a failed audit leaves no half-written DIR (and an earlier report
in DIR stays as it was).
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ..audit_data import open_data, parse_shape
from ..errors import ConfigError, MissingExtraError
from ..report import Report
from .check import budget_options, enforce_budget
from .options import console, domain_errors, quiet_option

__all__ = ["audit"]

PROVIDERS = ("auto", "cuda", "cpu")
REPORT_FILES = ("report.json", "report.npz")


@contextmanager
def _staging(out: Path) -> Iterator[Path]:
    """A temporary directory beside ``out`` that replaces it when the block succeeds."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_FILES[0]).is_file():
        raise ConfigError(
            f"--out {out} exists and holds something other than a report; pass a new or an "
            "empty directory, or an earlier audit's"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.audit-", dir=out.parent))
    try:
        yield staging
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            out.rename(old / "previous")
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _write(report: Report, directory: Path) -> list[Path]:
    report.save(directory)
    written = [directory / name for name in REPORT_FILES]
    from ..plots import write_plots  # matplotlib: only when writing

    return written + write_plots(report, directory)


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
@click.option("--batch", type=click.IntRange(min=1), default=32, show_default=True,
              help="Samples per run.")  # fmt: skip
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
    batch: int,
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
    with domain_errors():
        if shapes and random_samples is None:
            raise ConfigError("--shape only applies with --random N")
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
        source = open_data(
            data,
            session.plan.inputs,
            random=random_samples,
            shapes=dict(parse_shape(s) for s in shapes),
            seed=seed,
            mask=mask or None,
        )
        screen.print(
            f"{model}: {len(session.plan.layers)} layers on {session.get_providers()[0]}; "
            f"data {source.where}, batches of {batch}",
            soft_wrap=True,
        )
        with _progress(screen, source.samples, quiet) as advance:
            report = adapter.audit(model, source.batches(batch), session=session, on_batch=advance)
        with _staging(out) as staging:
            written = _write(report, staging)
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
    """A progress bar counting samples (rows of the data) with their rate."""
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
        TextColumn("{task.fields[rate]} rows/s"),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=screen, disable=quiet, transient=False) as progress:
        task = progress.add_task("audit", total=total, rate="-")

        def advance(samples: int) -> None:
            progress.advance(task, samples)
            speed = progress.tasks[task].speed
            progress.update(task, rate=f"{speed:,.0f}" if speed else "-")

        yield advance
