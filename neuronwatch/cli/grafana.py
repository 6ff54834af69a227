"""``neuronwatch grafana export DIR``: the bundled dashboards, provisioning and alert rules.

The files ship inside the package (``neuronwatch.grafana``) and are read with
``importlib.resources``, so this works from a wheel as from a checkout.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import click

from ..atomic import write_files_atomic
from ..errors import ConfigError
from .options import console, domain_errors

if TYPE_CHECKING:
    from importlib.abc import Traversable

__all__ = ["DEFAULT_DASHBOARDS_PATH", "DEFAULT_PROMETHEUS_URL", "bundled_files", "grafana"]

# The values in the bundled provisioning files that --dashboards-path / --prometheus-url replace.
DEFAULT_DASHBOARDS_PATH = "/var/lib/grafana/dashboards/neuronwatch"
DEFAULT_PROMETHEUS_URL = "http://localhost:9090"
_SUFFIXES = {"dashboards": ".json", "provisioning": ".yaml", "alerts": ".yml"}


def _walk(folder: Traversable, prefix: PurePosixPath) -> dict[PurePosixPath, bytes]:
    found: dict[PurePosixPath, bytes] = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            found.update(_walk(entry, prefix / entry.name))
        elif entry.name.endswith(_SUFFIXES[prefix.parts[0]]):
            found[prefix / entry.name] = entry.read_bytes()
    return found


def bundled_files() -> dict[PurePosixPath, bytes]:
    """Every bundled file by its path under the export directory (``dashboards/…``,
    ``provisioning/dashboards/…``, ``provisioning/datasources/…``, ``alerts/…``)."""
    root = files("neuronwatch.grafana")
    bundled: dict[PurePosixPath, bytes] = {}
    for folder in _SUFFIXES:
        bundled.update(_walk(root / folder, PurePosixPath(folder)))
    return bundled


def _replace(data: bytes, old: str, new: str, where: PurePosixPath) -> bytes:
    text = data.decode("utf-8")
    if old not in text:
        raise ConfigError(f"bundled file {where} no longer contains {old!r}; cannot set it")
    return text.replace(old, new).encode("utf-8")


def export_files(
    directory: Path,
    *,
    prometheus_url: str | None = None,
    dashboards_path: str | None = None,
    force: bool = False,
) -> list[Path]:
    """Write the bundled files under ``directory``; returns the files written.

    Files already there with the same content are left alone; different ones are an error
    unless ``force``. Everything is written to temporary files first: all or nothing.
    """
    if prometheus_url is not None and (
        not prometheus_url.startswith(("http://", "https://")) or _has_control(prometheus_url)
    ):
        raise ConfigError(
            f"--prometheus-url must be an http:// or https:// URL on one line, got "
            f"{prometheus_url!r}"
        )
    if dashboards_path is not None and (
        not PurePosixPath(dashboards_path).is_absolute() or _has_control(dashboards_path)
    ):
        raise ConfigError(
            f"--dashboards-path must be an absolute path on the Grafana host, on one line, got "
            f"{dashboards_path!r}"
        )
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} exists and is not a directory; pick another DIR")
    outputs: dict[Path, bytes] = {}
    for relative, data in bundled_files().items():
        if prometheus_url and relative.parts[:2] == ("provisioning", "datasources"):
            data = _replace(
                data, f"url: {DEFAULT_PROMETHEUS_URL}", f"url: {_yaml(prometheus_url)}", relative
            )
        if dashboards_path and relative.parts[:2] == ("provisioning", "dashboards"):
            data = _replace(
                data,
                f"path: {DEFAULT_DASHBOARDS_PATH}",
                f"path: {_yaml(dashboards_path)}",
                relative,
            )
        outputs[directory.joinpath(*relative.parts)] = data
    changed = {path: data for path, data in outputs.items() if not _same(path, data)}
    clashes = [str(path) for path in changed if path.exists()]
    if clashes and not force:
        raise ConfigError(
            f"{', '.join(clashes)} already exist(s) with other content; pass --force to "
            "overwrite, or export to an empty directory"
        )
    try:
        for path in changed:
            path.parent.mkdir(parents=True, exist_ok=True)
        write_files_atomic(changed)
    except OSError as exc:
        where = exc.filename or directory
        raise ConfigError(
            f"cannot write the Grafana files under {directory}: {exc.strerror or exc} ({where}); "
            "pick a DIR you can write to"
        ) from exc
    return list(changed)


def _has_control(text: str) -> bool:
    return any(ord(char) < 0x20 or ord(char) == 0x7F for char in text)


def _yaml(text: str) -> str:
    # A JSON string is a YAML double-quoted scalar: '#', ': ' or quotes in a path stay text.
    return json.dumps(text)


def _same(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return False


@click.group()
def grafana() -> None:
    """Grafana dashboards, provisioning and Prometheus alert rules for neuronwatch metrics."""


@grafana.command("export")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--prometheus-url",
    default=None,
    help=f"URL of the Prometheus data source to provision. [default: {DEFAULT_PROMETHEUS_URL}]",
)
@click.option(
    "--dashboards-path",
    default=None,
    help="Folder on the Grafana host where the provisioned dashboards will live. "
    f"[default: {DEFAULT_DASHBOARDS_PATH}]",
)
@click.option("--force", is_flag=True, help="Overwrite files that exist with other content.")
def export(
    directory: Path, prometheus_url: str | None, dashboards_path: str | None, force: bool
) -> None:
    """Write the dashboards, provisioning files and alert rules into DIRECTORY.

    \b
    DIRECTORY/dashboards/*.json               import in Grafana (UI, HTTP API) or provision
    DIRECTORY/provisioning/dashboards/*.yaml  copy to /etc/grafana/provisioning/dashboards/
    DIRECTORY/provisioning/datasources/*.yaml copy to /etc/grafana/provisioning/datasources/
    DIRECTORY/alerts/*.yml                    Prometheus rule_files (+ promtool unit tests)
    """
    screen = console()
    with domain_errors():
        written = export_files(
            directory,
            prometheus_url=prometheus_url,
            dashboards_path=dashboards_path,
            force=force,
        )
    for path in written:
        screen.print(f"wrote {path}", soft_wrap=True)
    if not written:
        screen.print(f"{directory} is up to date", soft_wrap=True)
    target = dashboards_path or DEFAULT_DASHBOARDS_PATH
    screen.print(
        f"Next: import {directory / 'dashboards'}/*.json in Grafana (Dashboards > New > "
        f"Import), or copy {directory / 'provisioning'}/* to /etc/grafana/provisioning/ and the "
        f"dashboards to {target}; add {directory / 'alerts' / 'neuronwatch.yml'} to Prometheus's "
        "rule_files.",
        soft_wrap=True,
    )
