"""``neuronwatch check DIR --max-dead-ratio 0.3``: fail a build when a layer is over budget.

Exit codes: 0 every layer within budget, 1 a layer over budget (or not judged yet, see
``--allow-unknown``), 2 bad input (a usage error, or a report that cannot be loaded), so a CI
step can tell "the model regressed" from "the gate is misconfigured".

``budget_options`` and ``enforce_budget`` are shared with ``neuronwatch audit``::

    @click.command()
    @budget_options
    def audit(..., **budget):
        ...
        ctx.exit(enforce_budget(report, **budget))
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..atomic import write_text_atomic
from ..config import KINDS
from ..errors import NeuronwatchError
from ..gate import DEFAULT_KINDS, Budget, GateResult, Offence, check_budget
from ..report import Report
from ..report_files import JSON_NAME, NPZ_NAME
from ..states import State
from .options import report_directory

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_OVER_BUDGET",
    "EXIT_PASSED",
    "BadInput",
    "budget_options",
    "check",
    "enforce_budget",
]

EXIT_PASSED = 0
EXIT_OVER_BUDGET = 1
EXIT_BAD_INPUT = 2  # click's own exit code for usage errors

F = TypeVar("F", bound=Callable[..., Any])

# option name -> state; every one becomes a keyword argument of enforce_budget.
_BUDGET_FLAGS: dict[str, State] = {
    "max_dead_ratio": State.DEAD,
    "max_leaking_ratio": State.LEAKING,
    "max_dormant_ratio": State.DORMANT,
    "max_saturated_ratio": State.SATURATED,
}


class BadInput(click.ClickException):
    """One line on stderr and exit code 2: the gate could not judge (unreadable report, an
    unwritable summary), which must not look like a model over budget (1)."""

    exit_code = EXIT_BAD_INPUT


def budget_options(fn: F) -> F:
    """Add ``--max-{dead,leaking,dormant,saturated}-ratio``, ``--allow-unknown`` and
    ``--summary-json`` to a command; pass them on with ``enforce_budget(report, **those)``."""
    ratio = click.FloatRange(0.0, 1.0)
    decorators = [
        click.option(
            f"--{name.replace('_', '-')}",
            name,
            type=ratio,
            default=None,
            metavar="RATIO",
            help=f"Fail when a layer's share of {state.value} neurons is above RATIO (0-1). "
            f"{_meaning(state)}",
        )
        for name, state in _BUDGET_FLAGS.items()
    ]
    decorators += [
        click.option(
            "--allow-unknown",
            is_flag=True,
            help="Do not fail on layers whose window has fewer than min_rows rows (their "
            "neurons are unknown, counted neither as dead nor alive); they are still listed.",
        ),
        click.option(
            "--kind",
            "kinds",
            type=click.Choice(KINDS),
            multiple=True,
            default=sorted(DEFAULT_KINDS),
            show_default=True,
            help="Kinds of layers the budgets apply to (repeat the option for several). pre "
            "layers, an activation's input, are left out by default: they are diagnostics.",
        ),
        click.option(
            "--summary-json",
            type=click.Path(dir_okay=False, writable=True, path_type=Path),
            default=None,
            help="Also write the verdict, budgets, offending layers and every layer's ratios "
            "as JSON here (for CI systems).",
        ),
    ]
    for decorator in reversed(decorators):
        fn = decorator(fn)
    return fn


def _meaning(state: State) -> str:
    return {
        State.DEAD: "Dead: never fired, no gradient (ReLU family).",
        State.LEAKING: "Leaking: never fired, gradient still flows (LeakyReLU, GELU, ...).",
        State.DORMANT: "Dormant: ReDo score <= tau.",
        State.SATURATED: "Saturated: on the flat region on every row (tanh, sigmoid, ReLU6).",
    }[state]


def budget_of(
    max_dead_ratio: float | None = None,
    max_leaking_ratio: float | None = None,
    max_dormant_ratio: float | None = None,
    max_saturated_ratio: float | None = None,
    allow_unknown: bool = False,
    kinds: tuple[str, ...] | None = None,
) -> Budget:
    given = {
        "max_dead_ratio": max_dead_ratio,
        "max_leaking_ratio": max_leaking_ratio,
        "max_dormant_ratio": max_dormant_ratio,
        "max_saturated_ratio": max_saturated_ratio,
    }
    limits: dict[State | str, float] = {
        _BUDGET_FLAGS[name]: value for name, value in given.items() if value is not None
    }
    chosen = DEFAULT_KINDS if kinds is None else frozenset(kinds)
    return Budget(limits, allow_unknown=allow_unknown, kinds=chosen)


def _offence_text(offence: Offence) -> str:
    what = f"{offence.count} of {offence.neurons} neurons"
    return f"{offence.state.value} {offence.ratio:.4f} ({what}) > max {offence.budget:g}"


def _unknown_text(offence: Offence, result: GateResult) -> str:
    stats = result.report.layers[offence.layer]
    return (
        f"unknown {offence.ratio:.4f} ({offence.count} of {offence.neurons} neurons): the "
        f"window has {stats.rows} rows < min_rows {stats.config.min_rows}, not judged"
    )


def _limits(result: GateResult) -> str:
    budget = result.budget
    limits = ", ".join(f"{state.value} <= {limit:g}" for state, limit in budget.limits.items())
    skipped = len(result.report.layers) - len(result.checked)
    kinds = "/".join(sorted(budget.kinds))
    return f"{limits}; {kinds} layers" + (
        f", {skipped} layers of other kinds not checked" if skipped else ""
    )


def print_result(result: GateResult) -> None:
    """One line per offending layer (every state it is over, with ratio and budget), then a
    verdict line; unknown layers allowed by ``--allow-unknown`` are warned about on stderr."""
    for layer, offences in result.offending_layers.items():
        parts = [
            _unknown_text(o, result) + " (pass --allow-unknown to accept)"
            if o.state is State.UNKNOWN
            else _offence_text(o)
            for o in offences
        ]
        click.echo(f"over budget: {layer} [{offences[0].kind}]: " + "; ".join(parts))
    if result.budget.allow_unknown:
        for o in result.unknown:
            click.echo(f"warning: {o.layer} [{o.kind}]: {_unknown_text(o, result)}", err=True)
    checked = len(result.checked)
    if result.passed:
        click.echo(f"passed: {checked} layers within budget ({_limits(result)})")
    else:
        click.echo(
            f"failed: {len(result.offending_layers)} of {checked} layers over budget "
            f"({_limits(result)})"
        )


def check_summary_target(path: Path | None, protected: list[Path]) -> None:
    """Refuse a ``--summary-json`` that would replace something that is not an earlier summary:
    one of ``protected`` (the command's inputs and the files it writes, whether they exist yet
    or not), anything that is not a regular file, or a file that is not a summary. Called
    before any work, so nothing is lost and no time is wasted."""
    if path is None:
        return
    target = path.resolve()
    for other in protected:
        if target == other.resolve() or (path.exists() and other.exists() and _same(path, other)):
            raise BadInput(
                f"--summary-json {path} is {other}, which this command reads or writes; "
                "pass another path"
            )
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_file():
        raise BadInput(f"--summary-json {path} exists and is not a regular file; pass another path")
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInput(
            f"--summary-json {path} exists and is not an earlier summary (not JSON: {exc}); "
            "refusing to replace it, pass another path"
        ) from exc
    if not isinstance(earlier, dict) or not {"exit_code", "passed"} <= earlier.keys():
        raise BadInput(
            f"--summary-json {path} exists and is not an earlier summary; refusing to replace "
            "it, pass another path"
        )


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def write_summary(result: GateResult, path: Path, source: Path | None = None) -> None:
    summary = result.to_json()
    summary["exit_code"] = EXIT_PASSED if result.passed else EXIT_OVER_BUDGET
    if source is not None:
        summary["report"] = str(source)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(summary, indent=2) + "\n")
    except OSError as exc:
        raise BadInput(f"cannot write --summary-json {path}: {exc.strerror or exc}") from exc


def enforce_budget(
    report: Report,
    *,
    max_dead_ratio: float | None = None,
    max_leaking_ratio: float | None = None,
    max_dormant_ratio: float | None = None,
    max_saturated_ratio: float | None = None,
    allow_unknown: bool = False,
    kinds: tuple[str, ...] | None = None,
    summary_json: Path | None = None,
    source: Path | None = None,
) -> int:
    """Check ``report`` against the budgets of :func:`budget_options`, print one line per
    offending layer and a verdict, write ``summary_json`` if asked; returns the exit code
    (0 within budget, 1 over). With no budget given nothing is printed and 0 is returned
    (``audit`` without a gate); the summary is still written when asked for."""
    try:
        budget = budget_of(
            max_dead_ratio,
            max_leaking_ratio,
            max_dormant_ratio,
            max_saturated_ratio,
            allow_unknown,
            kinds,
        )
        result = check_budget(report, budget)
    except NeuronwatchError as exc:
        raise BadInput(str(exc)) from exc
    if not budget.empty:
        print_result(result)
    if summary_json is not None:
        write_summary(result, summary_json, source)
    return EXIT_PASSED if result.passed else EXIT_OVER_BUDGET


@click.command()
@report_directory
@budget_options
@click.pass_context
def check(ctx: click.Context, /, directory: Path, **budget: Any) -> None:
    """Exit non-zero when a layer of the report in DIRECTORY is over budget.

    \b
    Exit codes: 0 within budget, 1 over budget (or a layer not judged yet:
    fewer rows than min_rows, unless --allow-unknown), 2 bad input.
    Example: neuronwatch check runs/audit --max-dead-ratio 0.3 --summary-json gate.json
    """
    if all(budget[name] is None for name in _BUDGET_FLAGS):
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in _BUDGET_FLAGS)
        raise click.UsageError(f"give at least one budget: {flags} (e.g. --max-dead-ratio 0.3)")
    check_summary_target(budget["summary_json"], [directory / JSON_NAME, directory / NPZ_NAME])
    try:
        report = Report.load(directory)
    except NeuronwatchError as exc:
        raise BadInput(str(exc)) from exc
    ctx.exit(enforce_budget(report, source=directory, **budget))
