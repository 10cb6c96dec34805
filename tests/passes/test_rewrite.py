from passes_testlib import graph_of, op_types, parse

from qcompile.passes import MatchResult, RewritePass, RewriteRule
from qcompile.passes._graph import RULE_KEY, node_metadata


class ReluReluToRelu(RewriteRule):
    """Relu(Relu(x)) -> Relu(x); declines when the inner Relu has other readers."""

    pattern = ("Relu",)

    def match(self, graph, node):
        inner = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        return {"outer": node, "inner": inner} if inner is not None and inner.op == "Relu" else None

    def check(self, graph, outer, inner):
        if len(inner.outputs[0].outputs) != 1:
            return MatchResult.fail("inner Relu output has other consumers")
        return MatchResult.ok()

    def rewrite(self, graph, outer, inner):
        outer.inputs[0] = inner.inputs[0]
        return [outer]


def test_rewrite_counts_tags_and_declines():
    model = parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[2] x) => (float[2] y, float[2] z) { a = Relu(x)
                                                      y = Relu(a)
                                                      b = Relu(x)
                                                      c = Relu(b)
                                                      z = Add(c, b) }""")
    for i, node in enumerate(model.graph.node):
        node.name = f"n{i}"
    graph = graph_of(model)
    names = [n.name for n in graph.nodes]
    result = RewritePass([ReluReluToRelu()])(graph)
    assert result.modified and result.stats["ReluReluToRelu"] == 1
    assert result.declined == [(names[3], "ReluReluToRelu: inner Relu output has other consumers")]
    assert op_types(graph) == ["Relu", "Relu", "Relu", "Add"]
    assert node_metadata(graph)[names[1]][RULE_KEY] == "ReluReluToRelu"


def test_match_result():
    assert MatchResult.ok() and not MatchResult.fail("x")
    assert MatchResult.fail("why").reason == "why"
