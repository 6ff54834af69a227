"""Swap an ONNX model's Relu nodes for LeakyRelu(alpha) or GELU, aware of the opset.

``LeakyRelu`` exists in every opset. ``Gelu`` is an operator from opset 20 on; for older
models it is written as its definition, ``x * 0.5 * (1 + Erf(x / sqrt(2)))`` (or the tanh
approximation), from operators every opset since 9 has, so the opset of the model (and every
other operator in it) stays as it was. Constants take the Relu's element type. ONNX Runtime has
no float64 LeakyRelu kernel in most opsets and no float64 Erf or Gelu: float64 LeakyRelu is
written as ``Max(x, alpha * x)`` (``Min`` for alpha > 1), float64 GELU only in its tanh form.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .formats.onnx import OnnxCheckpoint
from .manifest import Manifest
from .options import check_patterns
from .outputs import Stage
from .plan import Options, Plan
from .run import execute

__all__ = ["GELU_OPSET", "onnx_opset", "swap_onnx", "swap_relu_nodes"]

GELU_OPSET = 20
LEAKY_BF16_OPSET = 16  # LeakyRelu accepts bfloat16 from this opset on
# onnx.TensorProto element types a Relu may be swapped on, by name for messages.
_FLOAT_TYPES: dict[int, str] = {1: "float32", 10: "float16", 11: "float64", 16: "bfloat16"}
_FLOAT64 = 11
_BFLOAT16 = 16


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
    for tensor in graph.initializer:
        types[tensor.name] = tensor.data_type
    return types


def _matches(node: Any, patterns: list[str]) -> bool:
    names = [node.name, *node.output]
    return any(fnmatch.fnmatchcase(n, p) for n in names if n for p in patterns)


def _gelu_nodes(
    onnx: Any, node: Any, element: int, approximate: str, tag: str
) -> tuple[list[Any], list[Any]]:
    """Nodes and constant initializers computing GELU of ``node``'s input into its output, in
    the input's element type ``element`` (an onnx.TensorProto type)."""
    helper = onnx.helper
    x, y = node.input[0], node.output[0]

    def const(name: str, value: float) -> Any:
        return helper.make_tensor(f"{tag}/{name}", element, [], [value])

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


def _leaky_nodes(
    onnx: Any, node: Any, element: int, alpha: float, tag: str
) -> tuple[list[Any], list[Any]]:
    """LeakyRelu of ``node``'s input as ``Max(x, alpha * x)`` (``Min`` for alpha > 1): the
    same values bit for bit, from operators ONNX Runtime runs in float64 (its LeakyRelu kernel
    is float32-only in some opsets)."""
    helper = onnx.helper
    x, y = node.input[0], node.output[0]
    const = helper.make_tensor(f"{tag}/alpha", element, [], [float(alpha)])
    pick = "Max" if alpha <= 1.0 else "Min"
    nodes = [
        helper.make_node("Mul", [x, const.name], [f"{tag}/scaled"], name=f"{tag}/Mul"),
        helper.make_node(pick, [x, f"{tag}/scaled"], [y], name=node.name or f"{tag}/{pick}"),
    ]
    return nodes, [const]


def _element(types: dict[str, int], node: Any, label: str) -> int:
    """The element type of the Relu's input (float32 when shape inference cannot tell)."""
    element = types.get(node.input[0], 1)
    if element not in _FLOAT_TYPES:
        raise ConfigError(
            f"Relu node {label!r} has a non-float input (ONNX element type {element}); "
            "swap writes float32, float16, float64 and bfloat16 graphs only"
        )
    return element


def _refuse_unrunnable(to: str, approximate: str, opset: int, element: int, label: str) -> None:
    """Forms that are valid ONNX but that ONNX Runtime cannot run, or that the opset lacks."""
    if to == "gelu" and element == _FLOAT64 and approximate == "none":
        raise ConfigError(
            f"Relu node {label!r} works on float64 values and ONNX Runtime has no float64 "
            "Erf/Gelu kernel: use --approximate tanh (runs in float64) or --to leaky_relu"
        )
    if to == "leaky_relu" and element == _BFLOAT16 and opset < LEAKY_BF16_OPSET:
        raise ConfigError(
            f"Relu node {label!r} works on bfloat16 values, which LeakyRelu accepts from opset "
            f"{LEAKY_BF16_OPSET} on; this model has opset {opset}: convert it to opset "
            f"{LEAKY_BF16_OPSET}+ first, or use --to gelu"
        )


def _swapped(
    onnx: Any,
    node: Any,
    index: int,
    to: str,
    alpha: float,
    approximate: str,
    opset: int,
    element: int,
) -> tuple[list[Any], list[Any], str]:
    """What replaces one Relu node: nodes, constants, and the form written."""
    helper = onnx.helper
    if to == "leaky_relu" and element == _FLOAT64:
        nodes, consts = _leaky_nodes(onnx, node, element, alpha, f"nw_leaky_{index}")
        return nodes, consts, "Max/Min(x, alpha * x)"
    if to == "leaky_relu":
        made = helper.make_node(
            "LeakyRelu", list(node.input), list(node.output), name=node.name, alpha=float(alpha)
        )
        return [made], [], "LeakyRelu"
    # ONNX Runtime's Gelu has no float64 kernel: float64 (tanh form) gets the decomposition.
    if opset >= GELU_OPSET and element != _FLOAT64:
        extra = {"approximate": approximate} if approximate != "none" else {}
        made = helper.make_node(
            "Gelu", list(node.input), list(node.output), name=node.name, **extra
        )
        return [made], [], "Gelu"
    nodes, consts = _gelu_nodes(onnx, node, element, approximate, f"nw_gelu_{index}")
    return nodes, consts, "Erf/Tanh decomposition"


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
    patterns = list(check_patterns(nodes, "nodes")) or ["*"]
    opset = onnx_opset(model)
    graph = model.graph
    types = _element_types(onnx, model)
    new_nodes: list[Any] = []
    swapped: list[str] = []
    forms: set[str] = set()
    for index, node in enumerate(graph.node):
        if (
            node.op_type != "Relu"
            or node.domain not in ("", "ai.onnx")
            or not _matches(node, patterns)
        ):
            new_nodes.append(node)
            continue
        label = node.name or node.output[0]
        element = _element(types, node, label)
        _refuse_unrunnable(to, approximate, opset, element, label)
        made, consts, form = _swapped(onnx, node, index, to, alpha, approximate, opset, element)
        new_nodes.extend(made)
        graph.initializer.extend(consts)
        swapped.append(label)
        forms.add(form)
    if not swapped:
        raise ConfigError(f"no Relu node matches {' '.join(patterns)}; nothing to swap")
    del graph.node[:]
    graph.node.extend(new_nodes)
    form = " and ".join(sorted(forms))
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
    fsync: bool = False,
    manifest: str | Path | None = None,
) -> Manifest:
    """Write ``model`` with its Relu nodes swapped (see :func:`swap_relu_nodes`) to ``out``
    with a manifest; ``dry_run`` returns the manifest without writing."""
    nodes = check_patterns(nodes, "nodes")
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
        plan,
        checkpoint,
        None,
        None,
        out,
        fsync=fsync,
        manifest=manifest,
        write=write,
        parameters=settings,
    )
