"""The manifest of a rescue run: every neuron and weight touched, and how to check the files.

Written beside the output as ``<output>.manifest.json`` (and printed by ``--dry-run`` before
anything is written). It holds the op and its parameters, the report it followed, the input and
output files with their BLAKE3 checksum (:data:`~.checkpoint.CHECKSUM`), per layer the neurons
acted on (and, for prune, the new width and the constant folded per removed neuron), per tensor
every action with its axis and indices (strip lists the exact entries it zeroed), what was
skipped and why (wiring not editable, a neuron whose output is not constant), and format notes
(the optimizer moments reset).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .._version import __version__
from .checkpoint import CHECKSUM, CheckpointError, TensorInfo, WriteResult
from .jsonout import dumps, plain, write_json
from .plan import Plan

__all__ = ["MANIFEST_SUFFIX", "Manifest", "build_manifest", "manifest_path"]

MANIFEST_SUFFIX = ".manifest.json"


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + MANIFEST_SUFFIX)


@dataclass(frozen=True)
class Manifest:
    op: str
    parameters: dict[str, Any]
    dry_run: bool
    checkpoint: dict[str, Any]
    report: dict[str, Any]
    layers: list[dict[str, Any]]
    tensors: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    inputs: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    neuronwatch_version: str = __version__

    @property
    def neurons(self) -> int:
        """Neurons acted on, over every layer."""
        return sum(len(layer["neurons"]) for layer in self.layers)

    @property
    def widths(self) -> dict[str, int]:
        """Prune: each layer's width after the run."""
        return {x["layer"]: x["new_width"] for x in self.layers if "new_width" in x}

    def to_json(self) -> dict[str, Any]:
        """The manifest as plain JSON values (what ``json.load`` of the file gives)."""
        data: dict[str, Any] = plain(self._fields())
        return data

    def _fields(self) -> dict[str, Any]:
        return {
            "neuronwatch_version": self.neuronwatch_version,
            "created": self.created,
            "op": self.op,
            "parameters": self.parameters,
            "dry_run": self.dry_run,
            "checkpoint": self.checkpoint,
            "report": self.report,
            "inputs": self.inputs,
            "outputs": self.outputs,
            "layers": self.layers,
            "skipped": self.skipped,
            "tensors": self.tensors,
            "notes": self.notes,
        }

    def write(self, out: IO[str]) -> None:
        """The manifest as JSON, streamed (index arrays are never turned into lists)."""
        write_json(self._fields(), out)

    def dumps(self) -> str:
        return dumps(self._fields())

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(**{key: data[key] for key in cls.__dataclass_fields__})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path} is not a rescue manifest: {exc}") from None

    def lines(self) -> list[str]:
        """A short human summary (the CLI prints it)."""
        verb = "would change" if self.dry_run else "changed"
        if self.op == "swap":
            nodes = self.notes.get("swapped_nodes", [])
            form = self.notes.get("written_as", "?")
            out = [f"swap: {verb} {len(nodes)} Relu nodes to {form}: {', '.join(nodes)}"]
        else:
            out = [f"{self.op}: {verb} {self.neurons} neurons in {len(self.layers)} layers"]
        for layer in self.layers:
            width = (
                f", width {layer['width']} -> {layer['new_width']}" if "new_width" in layer else ""
            )
            out.append(f"  {layer['layer']}: {len(layer['neurons'])} {layer['state']}{width}")
        for tensor in self.tensors:
            actions = ", ".join(
                f"{a['action']} axis {a['axis']} x{len(a['index'])}" for a in tensor["actions"]
            )
            shape = tensor["shape"]
            new = tensor.get("new_shape", shape)
            change = f" {shape} -> {new}" if new != shape else ""
            out.append(f"  tensor {tensor['name']}{change}: {actions}")
        for skip in self.skipped:
            param = f" ({skip['param']})" if "param" in skip else ""
            count = f" [{len(skip['neurons'])} neurons]" if "neurons" in skip else ""
            out.append(f"  skipped {skip['layer']}{param}{count}: {skip['reason']}")
        for digest in self.outputs:
            out.append(f"  wrote {digest['path']} {CHECKSUM} {digest[CHECKSUM][:16]}...")
        left = self.notes.get("not_copied")
        if left:
            out.append(
                f"  not copied (weights rescue did not edit, they would not match): "
                f"{', '.join(left)}"
            )
        return out


def _planned(step: Any) -> dict[str, Any]:
    record: dict[str, Any] = step._record(type(step).__name__.lower())
    return record


def build_manifest(
    plan: Plan,
    *,
    checkpoint_path: Path,
    checkpoint_format: str,
    tensors: dict[str, TensorInfo],
    report: dict[str, Any],
    result: WriteResult | None,
    parameters: dict[str, Any] | None = None,
) -> Manifest:
    """The manifest of ``plan``: as planned (``result`` None, a dry run) or as written."""
    entries = []
    for name, steps in plan.steps.items():
        info = tensors[name]
        if result is not None and name in plan.applied:
            actions = [applied.record for applied in plan.applied[name]]
        else:
            actions = [_planned(step) for step in steps]
        entry: dict[str, Any] = {
            "name": name,
            "dtype": info.dtype,
            "shape": list(info.shape),
            "new_shape": list(plan.new_shape(name, info.shape)),
            "actions": actions,
        }
        entries.append(entry)
    return Manifest(
        op=plan.op,
        parameters=plan.options.for_op(plan.op) if parameters is None else parameters,
        dry_run=result is None,
        checkpoint={"path": str(checkpoint_path), "format": checkpoint_format},
        report=report,
        layers=[layer.to_json() for layer in plan.layers],
        tensors=entries,
        skipped=[skip.to_json() for skip in plan.skipped],
        inputs=[d.to_json() for d in result.inputs] if result else [],
        outputs=[d.to_json() for d in result.outputs] if result else [],
        notes=dict(result.notes) if result else {},
    )
