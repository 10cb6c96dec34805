import re

import ml_dtypes
import numpy as np
import pytest
from passes_testlib import graph_of, parse, with_initializers

from qcompile.errors import LintError
from qcompile.passes import LintQDQPass


def dq_model(w, s, zp=None, attrs="", opset=21, rank_shape="16, 32"):
    zp_in = ", zp" if zp is not None else ""
    model = parse(f"""<ir_version: 10, opset_import: ["" : {opset}]>
        g (float[B, {rank_shape.split(', ')[0]}] x) => (float[B, 32] y) {{
            wd = DequantizeLinear {attrs} (w, s{zp_in})
            y = MatMul(x, wd) }}""")
    arrays = {"w": w, "s": s}
    if zp is not None:
        arrays["zp"] = zp
    return with_initializers(model, **arrays)


W8 = np.ones((16, 32), np.int8)


def lint(model):
    return LintQDQPass()(graph_of(model))


def test_valid_per_channel_passes():
    result = lint(dq_model(W8, np.full(32, 0.1, np.float32), np.zeros(32, np.int8), "<axis = 1>"))
    assert not result.modified and result.stats["checked"] == 1


@pytest.mark.parametrize("model, message", [
    (dq_model(W8, np.array(0.0, np.float32)), "zero or negative"),
    (dq_model(W8, np.array(-1.0, np.float32)), "zero or negative"),
    (dq_model(W8, np.array(np.inf, np.float32)), "non-finite"),
    (dq_model(W8.astype(ml_dtypes.float8_e4m3fn), np.array(1.0, np.float32), opset=18),
     "FLOAT8E4M3FN needs opset >= 19"),
    (dq_model(W8.astype(ml_dtypes.int4), np.array(1.0, np.float32), opset=19), "INT4 needs opset >= 21"),
    (dq_model(W8, np.full(16, 0.1, np.float32), attrs="<axis = 1>"),
     "per-channel scale has 16 elements but dim[axis=1]"),
    (dq_model(W8, np.full((16, 4), 0.1, np.float32), attrs="<axis = 1, block_size = 16>"),
     "blocked scale shape [16, 4] does not match"),
    (dq_model(W8, np.array(0.1, np.float32), np.array(3, np.int8)), "non-zero; TensorRT is symmetric only"),
    (dq_model(W8.astype(np.uint8), np.array(0.1, np.float32), np.array(0, np.uint8)), "UINT8 is not accepted"),
    (dq_model(W8.astype(ml_dtypes.float8_e5m2), np.array(0.1, np.float32)), "FLOAT8E5M2 is not accepted"),
])
def test_errors_name_the_node(model, message):
    model.graph.node[0].name = "w_dq"
    with pytest.raises(LintError, match=f"DequantizeLinear node 'w_dq': .*{re.escape(message)}"):
        lint(model)


def test_per_channel_activation_is_rejected():
    model = with_initializers(parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[B, 32] x) => (float[B, 32] y) {
            q = QuantizeLinear <axis = 1> (x, s, z)
            y = DequantizeLinear <axis = 1> (q, s, z) }"""), s=np.full(32, 0.1, np.float32), z=np.zeros(32, np.int8))
    with pytest.raises(LintError, match="per-channel scale on activation 'x'"):
        lint(model)


def test_q_without_zero_point_is_uint8():
    model = with_initializers(parse("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[B, 32] x) => (float[B, 32] y) { q = QuantizeLinear(x, s)
                                                  y = DequantizeLinear(q, s) }"""), s=np.array(0.1, np.float32))
    with pytest.raises(LintError, match="ONNX quantizes to UINT8"):
        lint(model)
