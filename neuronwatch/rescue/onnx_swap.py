"""Swap an ONNX model's Relu nodes for LeakyRelu(alpha) or GELU, aware of the opset.

``LeakyRelu`` exists in every opset. ``Gelu`` is an operator from opset 20 on; for older
models it is written as its definition, ``x * 0.5 * (1 + Erf(x / sqrt(2)))`` (or the tanh
approximation), from operators every opset since 9 has, so the opset of the model (and every
other operator in it) stays as it was.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .formats.onnx import OnnxCheckpoint
from .manifest import Manifest
from .outputs import Stage
from .plan import Options, Plan
from .run import execute

__all__ = ["GELU_OPSET", "onnx_opset", "swap_onnx", "swap_relu_nodes"]

GELU_OPSET = 20
_FLOAT_TYPES: dict[int, type[np.floating[Any]]] = {1: np.float32, 10: np.float16, 11: np.float64}


def onnx_opset(model: Any) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ConfigError("the model imports no ai.onnx opset")


def _element_types(onnx: Any, model: Any) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    types = {}
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.type.HasField("tensor_type"):
            types[value.name] = value.type.tensor_type.elem_type
    return types


def _matches(node: Any, patterns: list[str]) -> bool:
    names = [node.name, *node.output]
    return any(fnmatch.fnmatchcase(n, p) for n in names if n for p in patterns)


def _gelu_nodes(
    onnx: Any, node: Any, dtype: type[np.floating[Any]], approximate: str, tag: str
) -> tuple[list[Any], list[Any]]:
    """Nodes and constant initializers computing GELU of ``node``'s input into its output."""
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    x, y = node.input[0], node.output[0]

    def const(name: str, value: float) -> Any:
        return numpy_helper.from_array(np.array(value, dtype=dtype), f"{tag}/{name}")

    if approximate == "tanh":
        consts = [
            const("c", 0.044715),
            const("k", math.sqrt(2 / math.pi)),
            const("one", 1.0),
            const("half", 0.5),
            const("three", 3.0),
        ]
        nodes = [
            helper.make_node("Pow", [x, f"{tag}/three"], [f"{tag}/x3"]),
            helper.make_node("Mul", [f"{tag}/x3", f"{tag}/c"], [f"{tag}/cx3"]),
            helper.make_node("Add", [x, f"{tag}/cx3"], [f"{tag}/inner"]),
            helper.make_node("Mul", [f"{tag}/inner", f"{tag}/k"], [f"{tag}/scaled"]),
            helper.make_node("Tanh", [f"{tag}/scaled"], [f"{tag}/t"]),
        ]
    else:
        consts = [const("sqrt2", math.sqrt(2.0)), const("one", 1.0), const("half", 0.5)]
        nodes = [
            helper.make_node("Div", [x, f"{tag}/sqrt2"], [f"{tag}/scaled"]),
            helper.make_node("Erf", [f"{tag}/scaled"], [f"{tag}/t"]),
        ]
    nodes += [
        helper.make_node("Add", [f"{tag}/t", f"{tag}/one"], [f"{tag}/onep"]),
        helper.make_node("Mul", [x, f"{tag}/onep"], [f"{tag}/xp"]),
        helper.make_node("Mul", [f"{tag}/xp", f"{tag}/half"], [y], name=node.name),
    ]
    return nodes, consts


def swap_relu_nodes(
    model: Any,
    to: str,
    *,
    alpha: float = 0.01,
    approximate: str = "none",
    nodes: Iterable[str] = ("*",),
) -> dict[str, Any]:
    """Rewrite ``model``'s top-level Relu nodes in place; returns what changed (for the
    manifest). ``nodes`` are globs over node names and output names."""
    import onnx

    if to not in ("leaky_relu", "gelu"):
        raise ConfigError(f"--to must be leaky_relu or gelu, got {to!r}")
    if approximate not in ("none", "tanh"):
        raise ConfigError(f"--approximate must be none or tanh, got {approximate!r}")
    if to == "leaky_relu" and not alpha > 0:
        raise ConfigError(f"--alpha must be > 0, got {alpha}")
    patterns = list(nodes) or ["*"]
    opset = onnx_opset(model)
    graph = model.graph
    types = _element_types(onnx, model) if to == "gelu" and opset < GELU_OPSET else {}
    new_nodes: list[Any] = []
    swapped: list[str] = []
    for index, node in enumerate(graph.node):
        if (
            node.op_type != "Relu"
            or node.domain not in ("", "ai.onnx")
            or not _matches(node, patterns)
        ):
            new_nodes.append(node)
            continue
        label = node.name or node.output[0]
        swapped.append(label)
        if to == "leaky_relu":
            new_nodes.append(
                onnx.helper.make_node(
                    "LeakyRelu",
                    list(node.input),
                    list(node.output),
                    name=node.name,
                    alpha=float(alpha),
                )
            )
        elif opset >= GELU_OPSET:
            extra = {"approximate": approximate} if approximate != "none" else {}
            new_nodes.append(
                onnx.helper.make_node(
                    "Gelu", list(node.input), list(node.output), name=node.name, **extra
                )
            )
        else:
            dtype = _FLOAT_TYPES.get(types.get(node.input[0], 1))
            if dtype is None:
                raise ConfigError(f"Relu node {label!r} has a non-float input; cannot write GELU")
            made, consts = _gelu_nodes(onnx, node, dtype, approximate, f"nw_gelu_{index}")
            new_nodes.extend(made)
            graph.initializer.extend(consts)
    if not swapped:
        raise ConfigError(f"no Relu node matches {' '.join(patterns)}; nothing to swap")
    del graph.node[:]
    graph.node.extend(new_nodes)
    form = (
        "LeakyRelu"
        if to == "leaky_relu"
        else ("Gelu" if opset >= GELU_OPSET else "Erf/Tanh decomposition")
    )
    return {"swapped_nodes": swapped, "to": to, "written_as": form, "opset": opset}


def swap_onnx(
    model: str | Path,
    out: str | Path | None = None,
    *,
    to: str = "leaky_relu",
    alpha: float = 0.01,
    approximate: str = "none",
    nodes: Iterable[str] = ("*",),
    dry_run: bool = False,
    manifest: str | Path | None = None,
) -> Manifest:
    """Write ``model`` with its Relu nodes swapped (see :func:`swap_relu_nodes`) to ``out``
    with a manifest; ``dry_run`` returns the manifest without writing."""
    checkpoint = OnnxCheckpoint(Path(model))
    settings = {"to": to, "alpha": alpha, "approximate": approximate, "nodes": list(nodes)}
    plan = Plan("swap", Options(), [], [], {}, {})

    def rewrite(proto: Any) -> dict[str, Any]:
        return swap_relu_nodes(proto, to, alpha=alpha, approximate=approximate, nodes=nodes)

    if dry_run:
        import onnx

        copy = onnx.ModelProto()
        copy.CopyFrom(checkpoint.model)
        notes = rewrite(copy)
        described = execute(plan, checkpoint, None, None, out, dry_run=True, parameters=settings)
        described.notes.update(notes)
        return described

    def write(target: Path, editor: Plan, stage: Stage) -> Any:
        return checkpoint.write(target, editor, stage, rewrite=rewrite)

    return execute(
        plan, checkpoint, None, None, out, manifest=manifest, write=write, parameters=settings
    )
