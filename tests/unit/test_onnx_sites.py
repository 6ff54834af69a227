"""Activation sites: standard ops, decomposed patterns, com.microsoft fusions, subgraphs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from neuronwatch.adapters.onnx_graph import GraphIndex
from neuronwatch.adapters.onnx_sites import find_sites, unwatched_in_subgraphs
from onnx import helper
from onnx_graphs import FLOAT, activation, init, model, tensor


def sites_of(built: onnx.ModelProto) -> list[tuple[str, str, str]]:
    return [(s.op, s.activation, s.output) for s in find_sites(GraphIndex.of(built.graph))]


@pytest.mark.parametrize(
    ("op", "expected", "opset"),
    [
        ("Relu", "ReLU", 17),
        ("LeakyRelu", "LeakyReLU", 17),
        ("Elu", "ELU", 17),
        ("Selu", "SELU", 17),
        ("Celu", "CELU", 17),
        ("Gelu", "GELU", 20),
        ("Tanh", "Tanh", 17),
        ("Sigmoid", "Sigmoid", 17),
        ("HardSigmoid", "Hardsigmoid", 17),
        ("HardSwish", "Hardswish", 17),
        ("Softplus", "Softplus", 17),
        ("Mish", "Mish", 18),
    ],
)
def test_standard_ops_are_sites_named_by_their_torch_class(
    op: str, expected: str, opset: int
) -> None:
    assert sites_of(activation(op, opset=opset)) == [(op, expected, "y")]


def test_prelu_and_clip_as_relu6_and_hardtanh() -> None:
    prelu = activation(
        "PRelu", extra_inputs=["slope"], initializers=[init("slope", np.float32(0.1))]
    )
    assert sites_of(prelu) == [("PRelu", "PReLU", "y")]
    for bounds, name in (((0.0, 6.0), "ReLU6"), ((-1.0, 1.0), "Hardtanh")):
        clip = activation(
            "Clip",
            extra_inputs=["lo", "hi"],
            initializers=[init("lo", np.float32(bounds[0])), init("hi", np.float32(bounds[1]))],
        )
        site = find_sites(GraphIndex.of(clip.graph))[0]
        assert (site.activation, dict(site.params)) == (
            name,
            {"min_val": bounds[0], "max_val": bounds[1]},
        )


def test_elu_alpha_is_a_parameter() -> None:
    site = find_sites(GraphIndex.of(activation("Elu", alpha=0.5).graph))[0]
    assert dict(site.params) == {"alpha": 0.5}


def _x_times(
    gate_nodes: list[onnx.NodeProto], gate: str, inits: list[onnx.TensorProto] = ()
) -> onnx.ModelProto:
    nodes = [*gate_nodes, helper.make_node("Mul", ["x", gate], ["y"], name="/act/Mul")]
    return model(nodes, [tensor("x", FLOAT, ["b", 6])], [tensor("y", FLOAT, ["b", 6])], list(inits))


def test_silu_written_as_x_times_sigmoid_is_one_site() -> None:
    built = _x_times([helper.make_node("Sigmoid", ["x"], ["s"], name="/act/Sigmoid")], "s")
    assert sites_of(built) == [("SiLU(x*sigmoid(x))", "SiLU", "y")]


def test_quick_gelu_and_hardswish_and_mish_patterns() -> None:
    quick = _x_times(
        [
            helper.make_node("Mul", ["x", "k"], ["t"]),
            helper.make_node("Sigmoid", ["t"], ["s"]),
        ],
        "s",
        [init("k", np.float32(1.702))],
    )
    assert sites_of(quick)[0][1] == "QuickGELUActivation"
    hard = _x_times([helper.make_node("HardSigmoid", ["x"], ["s"], alpha=1 / 6, beta=0.5)], "s")
    assert sites_of(hard)[0][1] == "Hardswish"
    mish = _x_times(
        [helper.make_node("Softplus", ["x"], ["sp"]), helper.make_node("Tanh", ["sp"], ["s"])], "s"
    )
    assert sites_of(mish) == [("Mish(x*tanh(softplus(x)))", "Mish", "y")]


def _erf_gelu(order: str) -> onnx.ModelProto:
    inits = [
        init("r2", np.float32(math.sqrt(2))),
        init("one", np.float32(1)),
        init("half", np.float32(0.5)),
    ]
    nodes = [
        helper.make_node("Div", ["x", "r2"], ["d"]),
        helper.make_node("Erf", ["d"], ["e"]),
        helper.make_node("Add", ["e", "one"], ["a"]),
    ]
    if order == "x*(1+e)*0.5":
        nodes += [
            helper.make_node("Mul", ["x", "a"], ["m"]),
            helper.make_node("Mul", ["m", "half"], ["y"]),
        ]
    elif order == "(x*0.5)*(1+e)":
        nodes += [
            helper.make_node("Mul", ["x", "half"], ["h"]),
            helper.make_node("Mul", ["h", "a"], ["y"]),
        ]
    else:  # ((1+e)*0.5)*x
        nodes += [
            helper.make_node("Mul", ["a", "half"], ["m"]),
            helper.make_node("Mul", ["m", "x"], ["y"]),
        ]
    return model(nodes, [tensor("x", FLOAT, ["b", 6])], [tensor("y", FLOAT, ["b", 6])], inits)


@pytest.mark.parametrize("order", ["x*(1+e)*0.5", "(x*0.5)*(1+e)", "((1+e)*0.5)*x"])
def test_erf_gelu_decompositions_are_one_gelu(order: str) -> None:
    built = _erf_gelu(order)
    found = find_sites(GraphIndex.of(built.graph))
    assert [(s.op, s.activation, s.output, s.input) for s in found] == [
        ("GELU(erf)", "GELU", "y", "x")
    ]


def test_tanh_gelu_decomposition_is_one_gelu_not_a_tanh() -> None:
    inits = [
        init("three", np.float32(3)),
        init("c", np.float32(0.044715)),
        init("k", np.float32(math.sqrt(2 / math.pi))),
        init("one", np.float32(1)),
        init("half", np.float32(0.5)),
    ]
    nodes = [
        helper.make_node("Pow", ["x", "three"], ["p"]),
        helper.make_node("Mul", ["p", "c"], ["pc"]),
        helper.make_node("Add", ["x", "pc"], ["inner"]),
        helper.make_node("Mul", ["inner", "k"], ["scaled"]),
        helper.make_node("Tanh", ["scaled"], ["t"]),
        helper.make_node("Add", ["t", "one"], ["a"]),
        helper.make_node("Mul", ["x", "half"], ["h"]),
        helper.make_node("Mul", ["h", "a"], ["y"]),
    ]
    built = model(nodes, [tensor("x", FLOAT, ["b", 6])], [tensor("y", FLOAT, ["b", 6])], inits)
    assert sites_of(built) == [("GELU(tanh)", "GELU", "y")]


@pytest.mark.parametrize(
    ("op", "expected"),
    [("Gelu", "GELU"), ("FastGelu", "GELU"), ("QuickGelu", "QuickGELUActivation")],
)
def test_microsoft_gelus(op: str, expected: str) -> None:
    built = activation(op, domain="com.microsoft")
    assert sites_of(built) == [(f"com.microsoft.{op}", expected, "y")]


def test_bias_gelu_and_fused_gemm_with_an_activation() -> None:
    bias = activation(
        "BiasGelu",
        domain="com.microsoft",
        extra_inputs=["b"],
        initializers=[init("b", np.zeros(6, np.float32))],
    )
    assert sites_of(bias)[0][:2] == ("com.microsoft.BiasGelu", "GELU")
    inits = [init("w", np.ones((6, 6), np.float32)), init("c", np.zeros(6, np.float32))]
    fused = activation(
        "FusedGemm",
        domain="com.microsoft",
        extra_inputs=["w", "c"],
        initializers=inits,
        activation="Relu",
    )
    found = find_sites(GraphIndex.of(fused.graph))
    assert [(s.activation, s.input, s.producer_node is not None) for s in found] == [
        ("ReLU", None, True)
    ]
    plain = activation(
        "FusedGemm", domain="com.microsoft", extra_inputs=["w", "c"], initializers=inits
    )
    assert sites_of(plain) == []


def test_activations_inside_if_branches_are_reported_not_watched() -> None:
    branch = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="inner_relu")],
        "then",
        [],
        [tensor("r", FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["i"])], "else", [], [tensor("i", FLOAT, None)]
    )
    nodes = [
        helper.make_node("If", ["cond"], ["y"], name="gate", then_branch=branch, else_branch=other),
        helper.make_node("Sigmoid", ["y"], ["z"], name="/out/Sigmoid"),
    ]
    built = model(
        nodes,
        [tensor("x", FLOAT, ["b", 6]), tensor("cond", onnx.TensorProto.BOOL, [])],
        [tensor("z", FLOAT, ["b", 6])],
    )
    assert unwatched_in_subgraphs(built.graph) == ["gate/inner_relu"]
    assert sites_of(built) == [("Sigmoid", "Sigmoid", "z")]
