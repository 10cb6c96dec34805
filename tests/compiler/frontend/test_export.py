"""Module-name parsing of the exporter's namespace strings (no export needed)."""
import onnx
from onnx import helper

from qcompile.frontend import module_name_from_namespace, stamp_module_names

QUALIFIED = (": __main__.M/layers.0: __main__.Block/layers.0.attn: __main__.Attn/"
             "layers.0.attn.q_proj: torch.nn.modules.linear.Linear/linear: aten.linear.default")
RELATIVE = (": __main__.M/layers.0: Block/attn: Attention/q_proj: torch.nn.modules.linear.Linear/"
            "linear: aten.linear.default")


def test_qualified_and_relative_namespaces():
    assert module_name_from_namespace(QUALIFIED) == "layers.0.attn.q_proj"
    assert module_name_from_namespace(RELATIVE) == "layers.0.attn.q_proj"
    assert module_name_from_namespace(": __main__.M/add: aten.add.Tensor") == ""
    assert module_name_from_namespace(": __main__.M/head: torch.nn.Linear/linear: aten.linear.default") == "head"
    seq = (": M/layers.0: B/layers.0.mlp: torch.nn.modules.container.Sequential/layers.0.mlp.0: "
           "torch.nn.modules.linear.Linear/linear_1: aten.linear.default")
    assert module_name_from_namespace(seq) == "layers.0.mlp.0"


def test_stamp_every_node():
    a = helper.make_node("Relu", ["x"], ["y"], name="a")
    a.metadata_props.add(key="namespace", value=QUALIFIED)
    b = helper.make_node("Relu", ["y"], ["z"], name="b")
    graph = helper.make_graph([a, b], "g", [helper.make_tensor_value_info("x", 1, [2])],
                              [helper.make_tensor_value_info("z", 1, [2])])
    model = helper.make_model(graph)
    assert stamp_module_names(model) == 1
    stamps = [{p.key: p.value for p in n.metadata_props}["qcompile.module"] for n in model.graph.node]
    assert stamps == ["layers.0.attn.q_proj", ""]
    onnx.checker.check_model(model)
