"""Small graph-surgeon helpers shared by the passes (private: not re-exported).

Constants, producers/consumers, Q/DQ node builders, copy ops and how they move a tensor axis.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.logger import G_LOGGER
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from qcompile.plugins import formats

logger = logging.getLogger(__name__)

MODULE_KEY = "qcompile.module"  # node metadata: fully qualified torch module name (set by the frontend)
RULE_KEY = "qcompile.rule"  # node metadata: the rewrite rule that created the node

# Ops that only move or copy elements (ModelOpt's "copy ops" that DQ commutes with), the subset we can remap.
COPY_OPS = ("Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


# ---- node metadata (graph-surgeon drops NodeProto.metadata_props, so we carry it on the graph object) ----

def node_metadata(graph: gs.Graph) -> dict[str, dict[str, str]]:
    """The node-name -> metadata_props map carried by `graph` (created empty if absent)."""
    meta = graph.__dict__.get("_qc_node_metadata")
    if meta is None:
        meta = graph.__dict__["_qc_node_metadata"] = {}
    return meta


def module_of(graph: gs.Graph, node: gs.Node) -> str | None:
    return node_metadata(graph).get(node.name, {}).get(MODULE_KEY)


def quiet_graph_surgeon():
    """Keeps graph surgeon's warnings off the user's terminal: for FP8 and FP4 tensors it warns that it "could not
    convert" their type to numpy (our passes handle those bytes themselves), and its first warning adds one about
    the `colored` module. Errors still show."""
    return G_LOGGER.suppress(G_LOGGER.ERROR)


def import_model(model: onnx.ModelProto) -> gs.Graph:
    """`gs.import_onnx(model)` that keeps node metadata_props (module names) on the graph."""
    with quiet_graph_surgeon():
        graph = gs.import_onnx(model)
    meta = node_metadata(graph)
    for node in model.graph.node:
        if node.name and len(node.metadata_props):
            meta[node.name] = {p.key: p.value for p in node.metadata_props}
    return graph


# ---- tensors ----

def const_values(tensor) -> np.ndarray | None:
    """The value of a gs.Constant as numpy (ml_dtypes for fp8/int4), or None for a non-constant."""
    if not isinstance(tensor, gs.Constant):
        return None
    if isinstance(tensor._values, LazyValues):
        return numpy_helper.to_array(tensor._values.tensor)
    return np.asarray(tensor.values)


def bias_vector(tensor, n: int, strict: bool = False) -> np.ndarray | None:
    """A constant bias as float32 [N], or None. strict: only shape [N] (it must not broadcast the output up)."""
    b = const_values(tensor)
    if b is None or b.dtype.kind != "f":
        return None
    if strict:
        return b.astype(np.float32) if b.shape == (n,) else None
    if b.size not in (1, n) or (b.ndim and b.shape[-1] not in (1, n)) or b.ndim > 2 or b.size != max(b.shape or (1,)):
        return None
    return np.broadcast_to(b.astype(np.float32).reshape(-1), (n,)).copy()


def make_constant(name: str, array: np.ndarray) -> gs.Constant:
    """A gs.Constant that exports every dtype correctly (gs cannot export int4 from numpy itself)."""
    with quiet_graph_surgeon():
        return gs.Constant(name, LazyValues(numpy_helper.from_array(np.ascontiguousarray(array), name)))


def onnx_dtype(tensor) -> int | None:
    """The ONNX TensorProto dtype of a gs tensor, or None when unknown."""
    dtype = tensor.dtype
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    try:
        from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx

        return dtype_to_onnx(np.dtype(dtype))
    except Exception:  # noqa: BLE001 - unknown dtype objects
        return None


def producer(tensor) -> gs.Node | None:
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def unique_name(graph: gs.Graph, base: str) -> str:
    """A tensor name not yet used in `graph`."""
    names = graph.__dict__.setdefault("_qc_names", set())
    if not names:
        names.update(graph.tensors().keys())
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    names.add(name)
    return name


def drop_node(node: gs.Node) -> None:
    """Disconnect `node` so graph.cleanup() removes it."""
    node.inputs.clear()
    node.outputs.clear()


def static_shape(tensor) -> tuple[int, ...] | None:
    shape = tensor.shape
    if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    return tuple(shape)


def plain_export(graph: gs.Graph) -> onnx.ModelProto:
    """`graph` as an ONNX model for onnx's own tools (shape inference, saving a dump): graph-surgeon's export
    without its type check, the IR version capped at 10."""
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = min(model.ir_version, 10)
    return model


def shape_inference(graph: gs.Graph, data_prop: bool = False) -> onnx.ModelProto | None:
    """ONNX shape inference (not strict; `data_prop`: with data propagation) on `plain_export(graph)`, or None
    when it fails: shapes are an aid, not a requirement."""
    try:
        return onnx.shape_inference.infer_shapes(plain_export(graph), strict_mode=False, data_prop=data_prop)
    except Exception as exc:  # noqa: BLE001
        logger.debug("shape inference failed: %s", exc)
        return None


def inferred_shapes(graph: gs.Graph, max_constant: int = 64) -> dict[str, list]:
    """Tensor name -> dims (int, symbolic name or None) from ONNX shape inference with data propagation, so that
    shapes the graph computes (Shape -> Concat -> Reshape) resolve. Runs on a copy of `graph` whose constants of
    more than `max_constant` elements are inputs of their shape (no weight data is serialized). Empty when
    inference fails: shapes are an aid."""
    light = graph.copy()
    for tensor in list(light.tensors().values()):
        if isinstance(tensor, gs.Constant) and math.prod(tensor.shape) > max_constant:
            tensor.to_variable(shape=list(tensor.shape))
            tensor.type = "tensor_type"  # what Variable() sets; to_variable leaves it unset (onnx-graphsurgeon 0.6)
            light.inputs.append(tensor)
    inferred = shape_inference(light, data_prop=True)
    if inferred is None:
        return {}
    return {vi.name: tensor_dims(vi.type.tensor_type)
            for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
            if vi.type.tensor_type.HasField("shape")}


def tensor_dims(tensor_type: onnx.TypeProto.Tensor) -> list:
    """The dims of an ONNX tensor type as graph-surgeon holds them: int, symbolic name, or None when unnamed."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]


def is_graph_output(graph: gs.Graph, tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


# ---- Q/DQ ----

def qdq_axis(node: gs.Node, rank: int | None) -> int | None:
    """The normalized per-axis `axis` of a Q/DQ node whose scale is 1-D, else None (per-tensor)."""
    scale = node.inputs[1]
    shape = scale.shape
    if shape is None or len(shape) == 0 or node.attrs.get("block_size", 0):
        return None
    axis = int(node.attrs.get("axis", 1))
    return axis % rank if rank else axis


def quantized_format(node: gs.Node) -> tuple[int | None, str | None]:
    """(ONNX dtype, qcompile format name or None) that a Q produces / a DQ consumes."""
    if node.op == "DequantizeLinear":
        dtype = onnx_dtype(node.inputs[0])
    elif len(node.inputs) > 2 and not node.inputs[2].is_empty():
        dtype = onnx_dtype(node.inputs[2])
    else:
        dtype = node.attrs.get("output_dtype") or onnx.TensorProto.UINT8
    return dtype, (formats.format_of_onnx_dtype(dtype) if dtype is not None else None)


def zero_point(fmt: str, shape: tuple[int, ...] = ()) -> np.ndarray:
    return np.zeros(shape, dtype=formats.numpy_dtype(fmt))


def make_qdq(graph: gs.Graph, x, scale: np.ndarray, fmt: str, axis: int | None,
             tag: str) -> tuple[gs.Node, gs.Node, gs.Variable]:
    """Q -> DQ nodes on tensor `x` (not yet added to the graph); returns (q, dq, dq_output)."""
    s = make_constant(unique_name(graph, f"{tag}_scale"), np.asarray(scale))
    zp = make_constant(unique_name(graph, f"{tag}_zero_point"), zero_point(fmt, np.shape(scale)))
    attrs = {} if axis is None else {"axis": int(axis)}
    q_out = gs.Variable(unique_name(graph, f"{tag}_quantized"), dtype=formats.numpy_dtype(fmt), shape=x.shape)
    dq_out = gs.Variable(unique_name(graph, f"{tag}_dequantized"), dtype=x.dtype, shape=x.shape)
    q = gs.Node("QuantizeLinear", name=unique_name(graph, f"{tag}/QuantizeLinear"), attrs=dict(attrs),
                inputs=[x, s, zp], outputs=[q_out])
    dq = gs.Node("DequantizeLinear", name=unique_name(graph, f"{tag}/DequantizeLinear"), attrs=dict(attrs),
                 inputs=[q_out, s, zp], outputs=[dq_out])
    return q, dq, dq_out


def make_dynamic_row_qdq(graph: gs.Graph, x, fmt: str, k: int,
                         tag: str) -> tuple[list[gs.Node], gs.Variable]:
    """Per-token (per-row) dynamic Q -> DQ on activation `x` [..., K] (nodes not yet added; returns (nodes, out)).

    `s = Max(Div(ReduceMax(Abs(x), axes=[-1], keepdims=1), qmax), MIN_SCALE)` [..., 1], then
    `QuantizeLinear(x, s, axis=-1, block_size=K, output_dtype=fmt)` -> `DequantizeLinear(·, s, axis=-1,
    block_size=K)` (opset 21 blocked quantization, one block per row; no zero point: its shape would be dynamic).
    `dynamic_row_scale_input` recognizes exactly this form.
    """
    def var(name, dtype=np.float32):
        return gs.Variable(unique_name(graph, f"{tag}_{name}"), dtype=dtype)

    axes = make_constant(unique_name(graph, f"{tag}_axes"), np.array([-1], np.int64))
    qmax = make_constant(unique_name(graph, f"{tag}_qmax"), np.array(formats.qmax(fmt), np.float32))
    tiny = make_constant(unique_name(graph, f"{tag}_min_scale"), np.array(formats.MIN_SCALE, np.float32))
    a, amax, s0, s = var("abs"), var("amax"), var("scale_unclamped"), var("row_scale")
    q_out = gs.Variable(unique_name(graph, f"{tag}_quantized"), dtype=formats.numpy_dtype(fmt), shape=x.shape)
    out = gs.Variable(unique_name(graph, f"{tag}_dequantized"), dtype=x.dtype, shape=x.shape)
    blocked = {"axis": -1, "block_size": int(k)}
    name = lambda op: unique_name(graph, f"{tag}/{op}")  # noqa: E731
    nodes = [
        gs.Node("Abs", name=name("Abs"), inputs=[x], outputs=[a]),
        gs.Node("ReduceMax", name=name("ReduceMax"), attrs={"keepdims": 1}, inputs=[a, axes], outputs=[amax]),
        gs.Node("Div", name=name("Div"), inputs=[amax, qmax], outputs=[s0]),
        gs.Node("Max", name=name("Max"), inputs=[s0, tiny], outputs=[s]),
        gs.Node("QuantizeLinear", name=name("QuantizeLinear"), inputs=[x, s], outputs=[q_out],
                attrs={**blocked, "output_dtype": formats.onnx_dtype(fmt)}),
        gs.Node("DequantizeLinear", name=name("DequantizeLinear"), inputs=[q_out, s], outputs=[out], attrs=blocked),
    ]
    return nodes, out


def dynamic_row_scale_input(q: gs.Node) -> tuple[object, str] | None:
    """(x, format) when QuantizeLinear `q` quantizes x with the per-row dynamic scale of `make_dynamic_row_qdq`."""
    x, scale = q.inputs[0], q.inputs[1]
    chain = []
    for op in ("Max", "Div", "ReduceMax", "Abs"):
        node = producer(scale)
        if node is None or node.op != op:
            return None
        chain.append(node)
        scale = node.inputs[0]
    mx, div, rmax, ab = chain
    fmt = formats.format_of_onnx_dtype(q.attrs.get("output_dtype") or -1)
    axes, qmax, tiny = (const_values(t) for t in (rmax.inputs[1], div.inputs[1], mx.inputs[1]))
    if fmt not in ("int8", "fp8") or ab.inputs[0] is not x or axes is None or qmax is None or tiny is None:
        return None
    rank = len(x.shape) if x.shape is not None else None
    if [int(a) for a in axes.reshape(-1)] not in ([-1], [rank - 1] if rank else [-1]) \
            or not int(rmax.attrs.get("keepdims", 1)) or float(qmax.reshape(-1)[0]) != formats.qmax(fmt) \
            or float(tiny.reshape(-1)[0]) != formats.MIN_SCALE:
        return None
    return x, fmt


# ---- copy ops ----

def copy_op_consts(node: gs.Node) -> dict | None:
    """The constant parameters of a copy op (perm/shape/axes), or None if one is not constant."""
    params = {}
    for i, t in enumerate(node.inputs[1:], start=1):
        if t.is_empty():
            continue
        v = const_values(t)
        if v is None:
            return None
        params[i] = v
    return params


def apply_copy_op(node: gs.Node, array: np.ndarray) -> np.ndarray | None:
    """Apply the copy op `node` to a numpy array (None: unsupported or non-constant parameters)."""
    params = copy_op_consts(node)
    if params is None:
        return None
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return np.transpose(array, None if perm is None else list(perm))
    if node.op == "Reshape":
        shape = [int(d) for d in params[1]]
        if node.attrs.get("allowzero", 0) == 0:
            shape = [array.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return array.reshape(shape)
    if node.op == "Flatten":
        axis = int(node.attrs.get("axis", 1)) % (array.ndim + 1) if array.ndim else 0
        return array.reshape(math.prod(array.shape[:axis]), math.prod(array.shape[axis:]))
    if node.op in ("Squeeze", "Unsqueeze"):
        axes = params.get(1)
        axes = [int(a) for a in (axes if axes is not None else node.attrs.get("axes", []))]
        if node.op == "Squeeze":
            axes = [a % array.ndim for a in axes] if axes else [i for i, d in enumerate(array.shape) if d == 1]
            return np.squeeze(array, axis=tuple(axes))
        return np.expand_dims(array, axis=tuple(a % (array.ndim + len(axes)) for a in axes))
    return None


def map_axis(node: gs.Node, in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int) -> int | None:
    """The output axis that input `axis` becomes through copy op `node` (None: merged or split)."""
    if node.op == "Transpose":
        perm = node.attrs.get("perm") or list(reversed(range(len(in_shape))))
        return list(perm).index(axis)
    return _kept_axis(in_shape, out_shape, axis)


def map_axis_back(node: gs.Node, in_shape: tuple[int, ...], out_shape: tuple[int, ...], axis: int) -> int | None:
    """The input axis that becomes output `axis` through copy op `node` (None: merged or split)."""
    if node.op == "Transpose":
        perm = node.attrs.get("perm") or list(reversed(range(len(in_shape))))
        return int(perm[axis])
    return _kept_axis(out_shape, in_shape, axis)


def _kept_axis(src: tuple[int, ...], dst: tuple[int, ...], axis: int) -> int | None:
    # A reshape keeps axis `axis` of `src` whole iff some dst axis has the same size and the same
    # number of elements before it (row-major order is unchanged by a reshape).
    before = math.prod(src[:axis])
    for j, d in enumerate(dst):
        if d == src[axis] and math.prod(dst[:j]) == before:
            return j
    return None
