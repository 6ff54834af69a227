"""Tiny ONNX models built with onnx.helper for the ONNX adapter's unit tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT


def tensor(name: str, elem: int = FLOAT, shape: Sequence[Any] | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def init(name: str, value: Any) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = 17,
    ms: bool = False,
) -> onnx.ModelProto:
    """A checked-in-memory model (IR version ONNX Runtime reads)."""
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), list(initializers))
    opsets = [helper.make_opsetid("", opset)]
    if ms:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    built = helper.make_model(graph, opset_imports=opsets)
    built.ir_version = 8
    return built


def activation(
    op: str,
    shape: Sequence[Any] = ("batch", 6),
    opset: int = 17,
    elem: int = FLOAT,
    domain: str = "",
    extra_inputs: Sequence[str] = (),
    initializers: Sequence[onnx.TensorProto] = (),
    **attrs: Any,
) -> onnx.ModelProto:
    """``y = op(x)``: the activation's output is the model's output."""
    node = helper.make_node(
        op, ["x", *extra_inputs], ["y"], name=f"/act/{op}", domain=domain, **attrs
    )
    return model(
        [node],
        [tensor("x", elem, shape)],
        [tensor("y", elem, shape)],
        initializers,
        opset=opset,
        ms=domain == "com.microsoft",
    )


def mlp(
    hidden: int = 5,
    weights: str = "anonymous",
    shared: bool = False,
    gate: bool = False,
) -> onnx.ModelProto:
    """``/fc1`` (MatMul + bias Add) -> ``/act/Relu`` -> ``/fc2`` (MatMul), legacy names.

    ``weights``: ``anonymous`` stores fc1's weight as a folded ``[in, out]`` initializer named
    ``onnx::MatMul_1`` (torch's exporters); ``transpose`` keeps ``fc1.weight`` ``[out, in]``
    behind a Transpose; ``gemm`` uses Gemm with transB=1. ``shared`` makes fc2 read fc1's
    bias-free weight too (a tied initializer); ``gate`` multiplies the activation by a second
    branch before fc2 (a gated, non-linear consumer).
    """
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, hidden)).astype(np.float32)
    b1 = rng.standard_normal(hidden).astype(np.float32)
    w2 = rng.standard_normal((hidden, 3)).astype(np.float32)
    nodes: list[onnx.NodeProto] = []
    inits = [init("fc1.bias", b1)]
    if weights == "anonymous":
        inits.append(init("onnx::MatMul_1", w1))
        nodes.append(helper.make_node("MatMul", ["x", "onnx::MatMul_1"], ["h"], name="/fc1/MatMul"))
        nodes.append(helper.make_node("Add", ["fc1.bias", "h"], ["hb"], name="/fc1/Add"))
    elif weights == "transpose":
        inits.append(init("fc1.weight", w1.T.copy()))
        nodes.append(
            helper.make_node(
                "Transpose", ["fc1.weight"], ["wt"], name="/fc1/Transpose", perm=[1, 0]
            )
        )
        nodes.append(helper.make_node("MatMul", ["x", "wt"], ["h"], name="/fc1/MatMul"))
        nodes.append(helper.make_node("Add", ["h", "fc1.bias"], ["hb"], name="/fc1/Add"))
    else:
        inits.append(init("fc1.weight", w1.T.copy()))
        nodes.append(
            helper.make_node(
                "Gemm", ["x", "fc1.weight", "fc1.bias"], ["hb"], name="/fc1/Gemm", transB=1
            )
        )
    nodes.append(helper.make_node("Relu", ["hb"], ["a"], name="/act/Relu"))
    consumed = "a"
    if gate:
        inits.append(init("gate.weight", rng.standard_normal((4, hidden)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", ["x", "gate.weight"], ["g"], name="/gate/MatMul"))
        nodes.append(helper.make_node("Mul", ["a", "g"], ["ag"], name="/Mul"))
        consumed = "ag"
    inits.append(init("onnx::MatMul_2", w2))
    nodes.append(
        helper.make_node("MatMul", [consumed, "onnx::MatMul_2"], ["y"], name="/fc2/MatMul")
    )
    outputs = [tensor("y", FLOAT, ["batch", 3])]
    if shared:
        nodes.append(
            helper.make_node("MatMul", ["a", "onnx::MatMul_2"], ["y2"], name="/fc3/MatMul")
        )
        outputs.append(tensor("y2", FLOAT, ["batch", 3]))
    return model(nodes, [tensor("x", FLOAT, ["batch", 4])], outputs, inits)


def save(built: onnx.ModelProto, path: Path) -> Path:
    onnx.save(built, str(path))
    return path
