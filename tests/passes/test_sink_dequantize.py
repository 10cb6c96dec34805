import numpy as np
import pytest
from passes_testlib import export, graph_of, op_types, parse, random, run, with_initializers

from qcompile.passes import SinkDequantizePass


def dq_then(copy_ops: str, w_shape, axis, extra=None, out="y", k=32, n=16):
    model = parse(f"""<ir_version: 10, opset_import: ["" : 21]>
        g (float[B, {k}] x) => (float[B, {n}] y) {{
            wd = DequantizeLinear <axis = {axis}> (wq, s, zp)
            {copy_ops}
            y = MatMul(x, wt) }}""")
    rng = np.random.default_rng(0)
    c = w_shape[axis]
    return with_initializers(model, wq=rng.integers(-127, 128, w_shape).astype(np.int8),
                             s=(0.01 + 0.01 * rng.random(c)).astype(np.float32), zp=np.zeros(c, np.int8),
                             **(extra or {}))


@pytest.mark.parametrize("copy_ops, w_shape, axis, extra, new_axis", [
    ("wt = Transpose <perm = [1, 0]> (wd)", (16, 32), 0, None, 1),
    ("wr = Unsqueeze(wd, ax)\n wt = Squeeze(wr, ax)", (32, 16), 1, {"ax": np.array([0], np.int64)}, 1),
    ("wr = Reshape(wd, shp)\n wt = Transpose <perm = [1, 0]> (wr)", (16, 2, 16), 0,
     {"shp": np.array([16, 32], np.int64)}, 1),
])
def test_sinks_through_copy_ops(copy_ops, w_shape, axis, extra, new_axis):
    model = dq_then(copy_ops, w_shape, axis, extra)
    graph = graph_of(model)
    result = SinkDequantizePass()(graph)
    assert result.modified and not result.declined
    assert op_types(graph) == ["DequantizeLinear", "MatMul"]
    dq = graph.nodes[0]
    assert dq.attrs["axis"] == new_axis and tuple(dq.inputs[0].shape) == (32, 16)
    x = random((3, 32), 4)
    np.testing.assert_array_equal(run(export(graph, model), x=x)[0], run(model, x=x)[0])


def test_decline_reshape_merges_channel_axis():
    model = dq_then("wt = Reshape(wd, shp)", (32, 4, 4), 2, {"shp": np.array([32, 16], np.int64)})
    graph = graph_of(model)
    result = SinkDequantizePass()(graph)
    assert not result.modified and op_types(graph) == ["DequantizeLinear", "Reshape", "MatMul"]
    assert "per-channel axis 2 (size 4) is merged or split" in result.declined[0][1]


def test_decline_dq_with_several_consumers():
    model = dq_then("wt = Transpose <perm = [1, 0]> (wd)\n u = Relu(wd)", (16, 32), 0)
    model.graph.output.append(model.graph.output[0])
    model.graph.output[1].name = "u"
    result = SinkDequantizePass()(graph_of(model))
    assert not result.modified and result.declined[0][1] == "the DQ output has several consumers"
