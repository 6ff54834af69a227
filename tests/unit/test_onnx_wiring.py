"""Wiring and layer names from the graph, in the torch adapter's schema and vocabulary."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from neuronwatch.adapters.onnx_plan import plan
from onnx import helper
from onnx_graphs import FLOAT, init, mlp, model, tensor

from neuronwatch.wiring import ParamRef, Wiring

FC1 = (ParamRef("fc1.weight", (5, 4), 0), ParamRef("fc1.bias", (5,), 0))
FC2 = (ParamRef("fc2.weight", (3, 5), 1),)


@pytest.mark.parametrize("weights", ["anonymous", "transpose", "gemm"])
def test_producer_and_consumer_in_torch_names_and_orientation(weights: str) -> None:
    _the_plan, engine = plan(mlp(weights=weights))
    wiring = engine.snapshot().wiring["act"]
    assert wiring == Wiring(-1, "fc1", "fc2", FC1, FC2)


def test_anonymous_initializers_are_mapped_back_to_the_file() -> None:
    the_plan, _ = plan(mlp(weights="anonymous"))
    assert the_plan.meta()["initializers"] == {
        "fc1.weight": {"initializer": "onnx::MatMul_1", "transposed": True},
        "fc2.weight": {"initializer": "onnx::MatMul_2", "transposed": True},
    }


def test_a_shared_initializer_is_not_editable() -> None:
    the_plan, engine = plan(mlp(shared=True))
    wiring = engine.snapshot().wiring["act"]
    # fc2's weight also feeds fc3: editing it changes both, so rescue must leave it alone.
    assert wiring.consumes == (ParamRef("onnx::MatMul_2", (5, 3), 0, editable=False),)
    assert the_plan.meta()["not_editable"] == {"act": ["onnx::MatMul_2"]}


def test_a_gated_consumer_is_not_editable() -> None:
    the_plan, engine = plan(mlp(gate=True))
    wiring = engine.snapshot().wiring["act"]
    assert (wiring.producer, wiring.produces) == ("fc1", FC1)
    # fc2 reads act * gate: editing fc2's columns would not remove the neuron alone.
    assert wiring.consumes == (ParamRef("fc2.weight", (3, 5), 1, editable=False),)
    assert the_plan.meta()["not_editable"] == {"act": ["fc2.weight"]}


def test_conv_and_batchnorm() -> None:
    rng = np.random.default_rng(0)
    inits = [
        init("conv1.weight", rng.standard_normal((4, 2, 3, 3)).astype(np.float32)),
        init("bn.weight", np.ones(4, np.float32)),
        init("bn.bias", np.zeros(4, np.float32)),
        init("bn.running_mean", np.zeros(4, np.float32)),
        init("bn.running_var", np.ones(4, np.float32)),
        init("conv2.weight", rng.standard_normal((3, 4, 1, 1)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight"], ["c"], name="/conv1/Conv"),
        helper.make_node(
            "BatchNormalization",
            ["c", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
            ["n"],
            name="/bn/BatchNormalization",
        ),
        helper.make_node("Relu", ["n"], ["a"], name="/act/Relu"),
        helper.make_node("Conv", ["a", "conv2.weight"], ["y"], name="/conv2/Conv"),
    ]
    built = model(
        nodes, [tensor("x", FLOAT, ["b", 2, 6, 6])], [tensor("y", FLOAT, ["b", 3, 4, 4])], inits
    )
    _, engine = plan(built)
    assert engine.snapshot().wiring["act"] == Wiring(
        1,
        "conv1",
        "conv2",
        (
            ParamRef("bn.weight", (4,), 0),
            ParamRef("bn.bias", (4,), 0),
            ParamRef("conv1.weight", (4, 2, 3, 3), 0),
        ),
        (ParamRef("conv2.weight", (3, 4, 1, 1), 1),),
    )


def _relus(names: list[str]) -> onnx.ModelProto:
    nodes = []
    current = "x"
    for i, name in enumerate(names):
        nodes.append(helper.make_node("Relu", [current], [f"r{i}"], name=name))
        current = f"r{i}"
    return model(nodes, [tensor("x", FLOAT, ["b", 4])], [tensor(current, FLOAT, ["b", 4])])


def test_legacy_scopes_name_layers_and_second_calls() -> None:
    the_plan, _ = plan(
        _relus(["/layer1/layer1.0/relu/Relu", "/layer1/layer1.0/relu_1/Relu", "/head/act/Relu"])
    )
    assert [n.name for n in the_plan.layers] == [
        "layer1.layer1.0.relu",
        "layer1.layer1.0.relu#2",
        "head.act",
    ]


def test_unscoped_nodes_are_named_after_the_node() -> None:
    the_plan, _ = plan(_relus(["first", ""]))
    assert [n.name for n in the_plan.layers] == ["first", "r1"]


def _dynamo_node(
    op: str, inputs: list[str], output: str, scopes: list[str], classes: list[str]
) -> onnx.NodeProto:
    node = helper.make_node(op, inputs, [output], name=f"node_{output}")
    for key, value in (
        ("pkg.torch.onnx.name_scopes", scopes),
        ("pkg.torch.onnx.class_hierarchy", classes),
    ):
        entry = node.metadata_props.add()
        entry.key, entry.value = key, repr(value)
    return node


def test_dynamo_metadata_gives_module_names_and_classes() -> None:
    nodes = [
        _dynamo_node(
            "Gelu",
            ["x"],
            "gelu",
            ["", "encoder.layer.0.intermediate.act"],
            ["BertModel", "transformers.activations.GELUActivation", "aten.gelu.default"],
        ),
        _dynamo_node(
            "Relu",
            ["gelu"],
            "relu",
            ["", "encoder.layers.0", "relu"],
            ["Net", "torch.nn.modules.transformer.TransformerEncoderLayer", "aten.relu.default"],
        ),
    ]
    # Gelu's scopes end with the module itself (no FX node name): give it one.
    nodes[0].metadata_props[0].value = repr(["", "encoder.layer.0.intermediate.act", "gelu"])
    nodes[0].metadata_props[1].value = repr(
        ["BertModel", "transformers.activations.GELUActivation", "aten.gelu.default"]
    )
    built = model(
        nodes, [tensor("x", FLOAT, ["b", 4])], [tensor("relu", FLOAT, ["b", 4])], opset=20
    )
    the_plan, engine = plan(built)
    assert [(n.name, n.activation) for n in the_plan.layers] == [
        ("encoder.layer.0.intermediate.act", "GELUActivation"),
        ("encoder.layers.0.activation", "ReLU"),
    ]
    assert engine.model == "BertModel"


def test_pre_layers_watch_the_activation_input() -> None:
    the_plan, engine = plan(mlp(), pre=True)
    assert [(n.name, n.kind) for n in the_plan.layers] == [("act", "post"), ("act:pre", "pre")]
    assert engine.config("act:pre").family == "generic"


# -- hostile graphs (issue 6's audit) ---------------------------------------------------------


def test_wiring_walks_through_a_functional_activation_as_the_torch_adapter_does() -> None:
    # Block b calls F.relu(b.fc(x)); module act (GELU) follows. torch's wiring of act names
    # b.fc as its producer (a functional activation passes neurons through); so must ONNX's.
    rng = np.random.default_rng(0)
    inits = [
        init("b.fc.weight", rng.standard_normal((6, 4)).astype(np.float32)),
        init("b.fc.bias", np.zeros(6, np.float32)),
        init("out.weight", rng.standard_normal((2, 6)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node(
            "Gemm", ["x", "b.fc.weight", "b.fc.bias"], ["h"], name="/b/fc/Gemm", transB=1
        ),
        helper.make_node("Relu", ["h"], ["/b/Relu_output_0"], name="/b/Relu"),
        helper.make_node(
            "Gelu",
            ["/b/Relu_output_0"],
            ["/act/Gelu_output_0"],
            name="/act/Gelu",
            domain="com.microsoft",
        ),
        helper.make_node(
            "Gemm", ["/act/Gelu_output_0", "out.weight"], ["y"], name="/out/Gemm", transB=1
        ),
    ]
    built = model(nodes, [tensor("x", FLOAT, ["b", 4])], [tensor("y", FLOAT, None)], inits, ms=True)
    _the_plan, engine = plan(built)
    wirings = engine.snapshot().wiring
    assert list(wirings) == ["b.relu", "act"]
    act = wirings["act"]
    assert (act.producer, act.consumer) == ("b.fc", "out")
    assert act.produces == (
        ParamRef("b.fc.weight", (6, 4), 0),
        ParamRef("b.fc.bias", (6,), 0),
    )


def test_ort_fused_graphs_keep_module_names_and_producers() -> None:
    # ONNX Runtime's optimiser fuses Gemm + activation and names the node after the Gemm
    # ("fused /fc/Gemm"), dropping the dynamo exporter's scopes: the layer keeps the
    # activation's own name (its output) and the producer is read from the parameters.
    rng = np.random.default_rng(0)
    inits = [
        init("fc.weight", rng.standard_normal((6, 4)).astype(np.float32)),
        init("fc.bias", np.zeros(6, np.float32)),
        init("head.weight", rng.standard_normal((3, 6)).astype(np.float32)),
        init("head.bias", np.zeros(3, np.float32)),
    ]

    def fused(name: str, inputs: list[str], output: str, act: str) -> onnx.NodeProto:
        return helper.make_node(
            "FusedGemm",
            inputs,
            [output],
            name=name,
            domain="com.microsoft",
            transB=1,
            activation=act,
        )

    legacy = model(
        [
            fused("fused /fc/Gemm", ["x", "fc.weight", "fc.bias"], "/relu/Relu_output_0", "Relu"),
            fused(
                "fused /head/Gemm",
                ["/relu/Relu_output_0", "head.weight", "head.bias"],
                "y",
                "Sigmoid",
            ),
        ],
        [tensor("x", FLOAT, ["b", 4])],
        [tensor("y", FLOAT, None)],
        inits,
        ms=True,
    )
    dynamo = model(
        [
            fused("fused node_linear", ["x", "fc.weight", "fc.bias"], "relu", "Relu"),
            fused("fused node_linear_1", ["relu", "head.weight", "head.bias"], "y", "Sigmoid"),
        ],
        [tensor("x", FLOAT, ["b", 4])],
        [tensor("y", FLOAT, None)],
        inits,
        ms=True,
    )
    for built in (legacy, dynamo):
        _the_plan, engine = plan(built)
        wirings = engine.snapshot().wiring
        assert list(wirings) == ["relu", "y"]
        assert [(w.producer, w.consumer) for w in wirings.values()] == [
            ("fc", "head"),
            ("head", None),
        ]
