"""Tiny ONNX models and numpy oracles shared by the pass tests."""
import numpy as np
import onnx
from onnx import numpy_helper

IR = 10



def parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.ir_version = IR
    return model


def with_initializers(model: onnx.ModelProto, **arrays) -> onnx.ModelProto:
    model.graph.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in arrays.items())
    return model


def mlp_residual(d: int = 32, h: int = 64, seed: int = 0) -> onnx.ModelProto:
    """2-layer MLP with bias Adds, Relu and a residual Add; nodes carry qcompile.module metadata."""
    rng = np.random.default_rng(seed)
    model = parse(f"""
    <ir_version: 10, opset_import: ["" : 18]>
    mlp (float[B, {d}] x) => (float[B, {d}] y) {{
        h0 = MatMul(x, w1)
        h1 = Add(h0, b1)
        h2 = Relu(h1)
        h3 = MatMul(h2, w2)
        h4 = Add(h3, b2)
        y = Add(h4, x)
    }}""")
    names = ["up_proj", "up_bias", "act", "down_proj", "down_bias", "residual"]
    for node, name in zip(model.graph.node, names):
        node.name = name
        node.metadata_props.add(key="qcompile.module", value=f"layers.0.mlp.{name}")
    return with_initializers(
        model, w1=(rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32),
        b1=(0.1 * rng.standard_normal(h)).astype(np.float32),
        w2=(rng.standard_normal((h, d)) / np.sqrt(h)).astype(np.float32),
        b2=(0.1 * rng.standard_normal(d)).astype(np.float32))


def graph_of(model: onnx.ModelProto):
    from qcompile.passes import import_model

    return import_model(model)


def export(graph, like: onnx.ModelProto) -> onnx.ModelProto:
    from qcompile.passes import export_model

    return export_model(graph, like)


def op_types(model_or_graph) -> list[str]:
    nodes = model_or_graph.graph.node if isinstance(model_or_graph, onnx.ModelProto) else model_or_graph.nodes
    return [n.op_type if isinstance(n, onnx.NodeProto) else n.op for n in nodes]


def run(model: onnx.ModelProto, **feeds) -> list[np.ndarray]:
    """Check the model (full check) and run it in ORT with graph optimizations off."""
    from qc_testutil import ort_session

    onnx.checker.check_model(model, full_check=True)
    return ort_session(model).run(None, feeds)


def initializer(model: onnx.ModelProto, name_part: str) -> np.ndarray:
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if name_part in t.name)


def fake_quant(x: np.ndarray, scale, fmt: str, axis: int | None = None) -> np.ndarray:
    """Independent float64 oracle of Q->DQ (division in float32, as ONNX QuantizeLinear does)."""
    import ml_dtypes

    s = np.asarray(scale, np.float32)
    if axis is not None and s.ndim == 1:
        shape = [1] * x.ndim
        shape[axis] = s.size
        s = s.reshape(shape)
    y = x.astype(np.float32) / s
    if fmt == "int8":
        q = np.clip(np.round(y), -128, 127)  # np.round is half-to-even
    else:
        q = np.clip(y, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return q.astype(np.float64) * s.astype(np.float64)


def random(shape, seed=0, scale=1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)
