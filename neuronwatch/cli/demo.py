"""``neuronwatch demo``: ReLUs dying on real handwritten digits, beside LeakyReLU."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from .. import render
from .options import console, domain_errors, quiet_option

DEFAULT_DEMO_OUT = Path("neuronwatch-demo")
DEFAULT_SERVE_PORT = 9464  # neuronwatch.exporters.prometheus.DEFAULT_PORT, without importing it


@click.command()
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=DEFAULT_DEMO_OUT,
    show_default=True,
    help="Directory for the two reports (relu/ and leaky_relu/).",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    help="Epochs per run; one epoch is one window. [default: the tuned setting, printed]",
)
@click.option("--seed", type=int, default=None, help="Training seed. [default: the tuned one]")
@click.option(
    "--serve",
    "serve_port",
    type=click.IntRange(0, 65535),
    is_flag=False,
    flag_value=DEFAULT_SERVE_PORT,
    default=None,
    metavar="[PORT]",
    help=f"Serve Prometheus metrics at http://127.0.0.1:PORT/metrics (PORT defaults to "
    f"{DEFAULT_SERVE_PORT}; 0 picks a free one) during the demo, and keep serving at the end "
    "until Ctrl-C.",
)
@quiet_option
def demo(
    out: Path, epochs: int | None, seed: int | None, serve_port: int | None, quiet: bool
) -> None:
    """Watch ReLUs die on real handwritten digits.

    Trains a 5x128 MLP on scikit-learn's digits with ReLU, then with LeakyReLU from the same
    initial weights, saves both reports and compares how many neurons died. Needs:
    pip install 'neuronwatch[demo]'.
    """
    screen = console()
    started = time.perf_counter()
    with domain_errors(), ExitStack() as stack:
        from .. import demo as digits  # torch and scikit-learn: only this command needs them

        epochs = digits.DEFAULT_EPOCHS if epochs is None else epochs
        seed = digits.DEFAULT_SEED if seed is None else seed
        screen.print(
            f"{digits.HIDDEN_LAYERS}x{digits.WIDTH} MLP on {digits.DATASET}, "
            f"{digits.OPTIMIZER_TEXT}, {epochs} epochs, seed {seed}, activations "
            f"{', '.join(digits.ACTIVATIONS)}; dead = never fired during the last epoch",
            soft_wrap=True,
        )
        server = None
        if serve_port is not None:
            server = stack.enter_context(_serve(serve_port))  # stopped however we leave
            screen.print(
                f"serving metrics at {server.url} (scrape it with Prometheus)", soft_wrap=True
            )
        progress = render.TrainingProgress()
        with render.live(screen, progress, enabled=not quiet):
            runs = digits.run_demo(
                out,
                epochs=epochs,
                seed=seed,
                on_epoch=progress.update,
                on_watch=server.exporter.add if server is not None else None,
            )
        for run in runs:
            screen.print(
                f"{run.activation}: trained in {run.seconds:.1f} s, wrote {run.saved}  "
                f"(see it with: neuronwatch show {run.saved})",
                soft_wrap=True,
            )
        screen.print(render.comparison_table({run.activation: run.report for run in runs}))
        screen.print(f"done in {time.perf_counter() - started:.1f} s")
        if server is not None:
            screen.print(
                f"still serving metrics at {server.url}; press Ctrl-C to stop", soft_wrap=True
            )
            try:
                threading.Event().wait()
            except KeyboardInterrupt:
                screen.print("stopped serving metrics")


def _serve(port: int) -> Any:
    """A Prometheus exporter of the demo's monitors, each added as its training starts."""
    # Lazily: the exporter is needed only with --serve.
    from ..exporters.prometheus import (  # type: ignore[import-not-found]
        PrometheusExporter,
        serve,
    )

    return serve(PrometheusExporter(), port=port)
