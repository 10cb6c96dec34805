import numpy as np
from passes_testlib import export, graph_of, op_types, parse, random, run, with_initializers

from qcompile.passes import CleanupPass


def test_removes_noops_folds_constants_and_dead_nodes():
    model = with_initializers(parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 4] x) => (float[2, 4] y) {
            a = Identity(x)
            b = Cast <to = 1> (a)
            c = Transpose <perm = [0, 1]> (b)
            k2 = Mul(k, k)
            d = Add(c, k2)
            dead = Relu(d)
            y = Identity(d) }"""), k=np.full(4, 2.0, np.float32))
    graph = graph_of(model)
    result = CleanupPass()(graph)
    assert result.modified
    assert op_types(graph) == ["Add"]
    assert result.stats["removed_Identity"] == 2 and result.stats["removed_Cast"] == 1
    assert result.stats["folded"] == 1 and result.stats["removed_dead"] == 1
    assert graph.outputs[0].name == "y"
    out = export(graph, model)
    x = random((2, 4))
    np.testing.assert_array_equal(run(out, x=x)[0], run(model, x=x)[0])


def test_keeps_qdq_and_real_casts():
    model = with_initializers(parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[2, 4] x) => (float16[2, 4] y) {
            q = QuantizeLinear(w, s, z)
            d = DequantizeLinear(q, s, z)
            a = Add(x, d)
            y = Cast <to = 10> (a) }"""), w=random(4), s=np.array(0.1, np.float32), z=np.array(0, np.int8))
    graph = graph_of(model)
    result = CleanupPass()(graph)
    assert not result.modified
    assert op_types(graph) == ["QuantizeLinear", "DequantizeLinear", "Add", "Cast"]
