"""``neuronwatch rescue OP CHECKPOINT --report DIR --out NEW``: fix a checkpoint offline."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ..errors import ConfigError
from .options import domain_errors

__all__ = ["rescue"]

_OPS = ("strip", "reinit", "prune", "lift", "swap")
# Which op reads which option; giving another op's option is an error, not silently ignored.
_OWNERS: dict[str, tuple[str, ...]] = {
    "fraction": ("strip",),
    "dormant": ("reinit",),
    "init": ("reinit",),
    "match_norm": ("reinit",),
    "seed": ("reinit",),
    "top": ("lift",),
    "constant_tol": ("prune",),
    "to": ("swap",),
    "alpha": ("swap",),
    "approximate": ("swap",),
    "state": ("strip", "reinit", "prune", "lift"),
    "state_dict_key": ("strip", "reinit", "prune", "lift"),
}


def _given(ctx: click.Context, name: str) -> bool:
    return ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE


def _check_owners(ctx: click.Context, op: str) -> None:
    for name, owners in _OWNERS.items():
        if op not in owners and _given(ctx, name):
            flag = "--" + name.replace("_", "-")
            raise click.UsageError(f"{flag} applies to {'/'.join(owners)}, not {op}")
    if op == "swap" and _given(ctx, "report_dir"):
        raise click.UsageError(
            "swap rewrites every matching Relu node and follows no report: drop --report"
        )
    state = ctx.params.get("state")
    if ctx.params.get("dormant") and _given(ctx, "state") and state != "dormant":
        raise click.UsageError(
            f"--dormant means --state dormant, which contradicts --state {state}: give one"
        )


@contextmanager
def _terminated_like_interrupted() -> Iterator[None]:
    """While a rescue runs, SIGTERM (kill, a job scheduler's timeout) and SIGHUP (a closed
    terminal or ssh session) unwind the way Ctrl-C does, through the cleanup that deletes the
    half-written temporary files; by default they would end the process at once and leave
    them. The previous handlers come back after. (SIGKILL cannot be caught: it leaves
    ``.NAME.*.tmp`` files beside the output.)"""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def terminate(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    caught = [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
    previous = {number: signal.signal(number, terminate) for number in caught}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)


@click.command()
@click.argument("op", type=click.Choice(_OPS))
@click.argument("checkpoint", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--report",
    "report_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Report directory (report.json + report.npz) whose wiring names the tensors.",
)
# --out and --manifest stay strings as typed: Path("new/") drops the slash that says a folder
# was meant, and rescue refuses that spelling for a file instead of writing a file "new".
@click.option("--out", type=click.Path(), help="New checkpoint (file or folder).")
@click.option("--layers", multiple=True, help="Layer globs (swap: ONNX node/output globs).")
@click.option("--dry-run", is_flag=True, help="Print what would change; write nothing.")
@click.option(
    "--fsync",
    is_flag=True,
    help="Wait until NEW is on the disk before renaming it into place (survives a power cut; "
    "like rsync --fsync). Default: the kernel writes it back later, as cp does.",
)
@click.option(
    "--state",
    default="dead",
    show_default=True,
    help="Neurons to act on: strip dead|leaking|asleep|dormant, reinit dead|dormant|leaking|"
    "asleep, prune dead|saturated, lift dead|leaking|asleep.",
)
@click.option("--fraction", type=float, default=0.1, show_default=True, help="strip: share.")
@click.option("--dormant", is_flag=True, help="reinit: dormant neurons (ReDo's criterion).")
@click.option(
    "--init",
    type=click.Choice(["torch", "kaiming"]),
    default="torch",
    help="reinit: U(+-1/sqrt(fan_in)) as nn.Linear, or He's U(+-sqrt(6/fan_in)).",
)
@click.option("--match-norm", is_flag=True, help="reinit: scale to live neurons' mean norm.")
@click.option("--seed", type=int, default=0, show_default=True, help="reinit: random seed.")
@click.option(
    "--top", type=float, default=10.0, show_default=True, help="lift: % of rows to fire on."
)
@click.option("--constant-tol", type=float, default=0.0, help="prune: max - min allowed.")
@click.option("--to", type=click.Choice(["leaky_relu", "gelu"]), default="leaky_relu", help="swap.")
@click.option("--alpha", type=float, default=0.01, show_default=True, help="swap: LeakyRelu.")
@click.option(
    "--approximate", type=click.Choice(["none", "tanh"]), default="none", help="swap to gelu."
)
@click.option("--state-dict-key", help="PyTorch file: dotted key of the state_dict to edit.")
@click.option(
    "--trust-optimizer-order",
    is_flag=True,
    help="PyTorch file: its optimizer was built from model.parameters() (the state_dict's "
    "order), so reset moments by that order even where shapes cannot verify it.",
)
@click.option("--manifest", type=click.Path(), help="Default: NEW.manifest.json")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.pass_context
def rescue(
    ctx: click.Context,
    /,
    op: str,
    checkpoint: Path,
    report_dir: Path | None,
    out: str | None,
    layers: tuple[str, ...],
    dry_run: bool,
    fsync: bool,
    as_json: bool,
    manifest: str | None,
    **options: Any,
) -> None:
    """Fix CHECKPOINT offline: strip, reinit, prune, lift (driven by a report) or swap.

    \b
    strip   zero the --fraction most negative incoming weights of each dead neuron
    reinit  redraw dead (--dormant: dormant) neurons, zero their bias and outgoing weights
    prune   remove dead neurons with a constant output, folding it into the consumer's bias
    lift    raise dead neurons' biases so they fire on the top --top % of the audit rows
    swap    ONNX: Relu nodes become LeakyRelu(--alpha) or GELU (opset-aware)

    The input is never modified; NEW and NEW.manifest.json appear whole or not at all (a
    failed or killed run leaves neither; add --fsync to survive a power cut too).
    """
    _check_owners(ctx, op)
    with domain_errors(), _terminated_like_interrupted():
        if op == "swap":
            result = _swap(checkpoint, out, layers, dry_run, fsync, manifest, options)
        else:
            if report_dir is None:
                raise ConfigError(f"{op} needs --report DIR (the audit report to follow)")
            from ..rescue import rescue as run

            if options.pop("dormant"):
                options["state"] = "dormant"
            for name in ("to", "alpha", "approximate"):
                options.pop(name)
            options["top"] = options["top"] / 100.0
            state_key = options.pop("state_dict_key")
            trust_order = options.pop("trust_optimizer_order")
            result = run(
                op,
                checkpoint,
                report_dir,
                out,
                layers=layers or ("*",),
                dry_run=dry_run,
                fsync=fsync,
                manifest=manifest,
                state_key=state_key,
                trust_optimizer_order=trust_order,
                **options,
            )
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
        return
    # Plain lines, never wrapped: paths and tensor names are copied from here.
    for line in result.lines():
        click.echo(line)
    if not dry_run and out is not None:
        written = manifest or f"{Path(out).with_name(Path(out).name + '.manifest.json')}"
        click.echo(f"manifest: {written}")


def _swap(
    checkpoint: Path,
    out: str | None,
    layers: tuple[str, ...],
    dry_run: bool,
    fsync: bool,
    manifest: str | None,
    options: dict[str, Any],
) -> Any:
    if checkpoint.suffix != ".onnx":
        raise ConfigError(
            f"swap edits ONNX graphs; {checkpoint.name} holds weights only, no activation "
            "types: in process, call neuronwatch.rescue.swap_activations(model, to=...) and "
            "load the same weights"
        )
    from ..rescue import swap_onnx

    return swap_onnx(
        checkpoint,
        out,
        to=options["to"],
        alpha=options["alpha"],
        approximate=options["approximate"],
        nodes=layers or ("*",),
        dry_run=dry_run,
        fsync=fsync,
        manifest=manifest,
    )
