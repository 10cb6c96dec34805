"""Insert Quantize/Dequantize pairs as the recipe says, with TensorRT's placement rules.

Does the following transformation:
- MatMul(x, W) -> MatMul(DQ(Q(x)), DQ(Q(W)))  (same for Gemm and Conv; W stays float here, folded later)
- W -> Transpose -> MatMul  ->  DQ(Q(W)) -> Transpose -> MatMul  (weight Q/DQ goes on the constant)
- x -> {MatMul_a, MatMul_b}  ->  one shared Q/DQ pair on x feeding both (same format)
- dynamic per-token activations (MatMul/Gemm):  x -> DQ(Q(x, s, axis=-1, block_size=K)) with
  s = max(ReduceMax(Abs(x), axes=[-1]) / qmax, MIN_SCALE) computed in the graph (`_graph.make_dynamic_row_qdq`)
- residual_add="quantize": Add(conv_branch, skip) -> Add(conv_branch, DQ(Q(skip)))  (TensorRT CNN rule)
- quantize_output=True: MatMul -> y  ->  MatMul -> DQ(Q(y))
- W4A8 (a rule with an `int4` weight and an fp8 activation): MatMul(x, DQ(W_int4)) -> MatMul(DQ(Q(x)), DQ(W_int4))
  with only the activation Q/DQ (static per tensor, or dynamic per token as above) placed here; INT4 weights are
  `QuantizeWeightsInt4Pass`'s, which runs first, so AWQ's `x / s` is what gets quantized

Not quantized (declined, with a reason): GEMV, K < min_k, N < min_n, non-constant weights, formats or
granularities this pass does not emit yet. Residual Adds and normalization inputs stay high precision
unless residual_add="quantize". Layers of another pass's form are not targets here, neither quantized nor declined
(`_forms.rule_form`): weight-only INT4 (QuantizeWeightsInt4Pass's), FP4 (QuantizeWeightsFp4Pass's) and FP8 block
(QuantizeFp8BlockPass's).
"""
from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile.errors import PassError
from qcompile.passes import _graph as G
from qcompile.passes._forms import INT4, INT8_WEIGHT_ONLY, QDQ, rule_form
from qcompile.passes.fuse_int4_gemm import int4_weight_dq
from qcompile.passes.infra import InPlacePass, PassResult
from qcompile.passes.quantize_weights_int4 import decline_reason as int4_decline_reason
from qcompile.plugins import formats
from qcompile.recipes.schema import Recipe, Rule

logger = logging.getLogger(__name__)

__all__ = ["QuantTarget", "plan_quantization", "activation_tensors", "InsertQDQPass"]

GEMM_OPS = ("MatMul", "Gemm", "Conv")
_FLOAT_DTYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
# Ops a Conv backbone may pass through before a residual Add (TensorRT fuses them into the conv).
_BACKBONE_OPS = ("Relu", "BatchNormalization", "Add", "Mul", "Sigmoid", "MaxPool", "Clip", *G.COPY_OPS)


@dataclass
class QuantTarget:
    """One node a recipe rule matched, and how it is (or why it is not) quantized.

    Attributes:
        node: node name. op_type: its op type. module: torch module name (from node metadata), if known.
        rule: the matching recipe rule.
        activation: the activation tensor to quantize (for kind "residual": the Add's skip input).
        weight: the constant weight tensor the weight Q/DQ goes on (before any copy ops).
        axis: the output-channel axis of `weight` (None: not known / per-tensor only).
        k, n: reduction and output sizes of the GEMM/Conv.
        output: the output tensor to quantize too (quantize_output), else None.
        kind: "gemm" (MatMul/Gemm/Conv) or "residual" (a residual Add's skip input).
        declined: why placement rejected the node (empty: it is quantized).
    """

    node: str
    op_type: str
    module: str | None
    rule: Rule
    activation: str | None = None
    weight: str | None = None
    axis: int | None = None
    k: int | None = None
    n: int | None = None
    output: str | None = None
    kind: str = "gemm"
    declined: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return not self.declined


def plan_quantization(graph: gs.Graph | onnx.ModelProto, recipe: Recipe) -> list[QuantTarget]:
    """Which nodes get quantized, and why the others a rule matched do not (see QuantTarget).

    Pass the onnx.ModelProto (or a graph from `qcompile.passes.import_model`) so module-name globs see
    the `qcompile.module` node metadata; a plain `gs.import_onnx` graph has lost it.
    """
    if isinstance(graph, onnx.ModelProto):
        graph = G.import_model(graph)
    targets = []
    for node in graph.nodes:
        rule = recipe.rule_for(node.op, node.name, G.module_of(graph, node))
        if rule is not None and _is_target(rule):
            targets.append(_plan_node(graph, node, rule, recipe))
    if recipe.placement.for_op("Add").residual_add == "quantize":
        targets += _plan_residuals(graph, [t for t in targets if t.quantized and t.op_type == "Conv"])
    return targets


def activation_tensors(targets: list[QuantTarget]) -> list[str]:
    """The tensors calibration must measure (static activations of quantized targets), in order."""
    names: dict[str, None] = {}
    for t in targets:
        if t.quantized and t.rule.activation is not None and t.rule.activation.mode == "static":
            for name in (t.activation, t.output):
                if name:
                    names[name] = None
    return list(names)


def _is_target(rule: Rule) -> bool:
    """Whether this pass places Q/DQ for the rule's layers: its own forms, and W4A8's activations (the INT4
    weights are QuantizeWeightsInt4Pass's); FP4 and FP8 block layers are other passes', not declines here."""
    form = rule_form(rule)
    return form in (QDQ, INT8_WEIGHT_ONLY) or form == INT4 and rule.activation is not None


def _int4_weight(rule: Rule) -> bool:
    """INT4 weights are QuantizeWeightsInt4Pass's; this pass quantizes only their activations (W4A8)."""
    return rule_form(rule) == INT4


def _plan_node(graph: gs.Graph, node: gs.Node, rule: Rule, recipe: Recipe) -> QuantTarget:
    t = QuantTarget(node.name, node.op, G.module_of(graph, node), rule)
    if node.op not in GEMM_OPS:
        t.declined.append(f"op type {node.op} is not a GEMM/Conv; InsertQDQPass quantizes {', '.join(GEMM_OPS)}")
        return t
    if _int4_weight(rule):
        return _plan_w4a8(graph, node, rule, recipe, t)
    opts = recipe.placement.for_op(node.op)
    act, wt = node.inputs[0], node.inputs[1]
    t.activation = act.name
    if opts.quantize_output and not G.is_graph_output(graph, node.outputs[0]):
        t.output = node.outputs[0].name
    if any(G.producer(x) is not None and G.producer(x).op == "DequantizeLinear" for x in (act, wt)):
        t.declined.append("already quantized (an input is fed by DequantizeLinear)")
        return t
    source, chain = _weight_source(wt)
    if source is None:
        t.declined.append(f"weight '{wt.name}' is not constant")
        return t
    t.weight = source.name
    if G.onnx_dtype(source) not in _FLOAT_DTYPES:
        t.declined.append(f"weight '{source.name}' is not a float tensor")
        return t
    shape, axis_src = _through_chain(source, chain, node)
    if shape is None:
        t.declined.append(f"weight '{source.name}' passes through a copy op with non-constant parameters")
        return t
    rank = len(shape)
    if node.op == "MatMul":
        if rank < 2:
            t.declined.append(f"weight rank {rank}: a matrix-vector product (GEMV)")
            return t
        t.k, t.n, axis = shape[-2], shape[-1], rank - 1
    elif node.op == "Gemm":
        trans_b = int(node.attrs.get("transB", 0))
        t.n, t.k = (shape[0], shape[1]) if trans_b else (shape[1], shape[0])
        axis = 0 if trans_b else 1
    else:
        t.n, t.k, axis = shape[0], math.prod(shape[1:]), 0
    t.axis = axis_src(axis)
    m = _static_rows(node, act)
    if opts.skip_gemv and (t.n == 1 or m == 1):
        t.declined.append(f"GEMV ({'N' if t.n == 1 else 'M'}=1); skip_gemv is set")
    if t.k < opts.min_k:
        t.declined.append(f"K={t.k} < min_k={opts.min_k}")
    if t.n < opts.min_n:
        t.declined.append(f"N={t.n} < min_n={opts.min_n}")
    if rule.weight is not None:
        if rule.weight.format not in formats.FORMATS:
            t.declined.append(f"weight format {rule.weight.format} is not emitted by InsertQDQPass yet")
        if rule.weight.granularity not in ("tensor", "channel"):
            t.declined.append(f"weight granularity {rule.weight.granularity} is not emitted by InsertQDQPass yet")
        if rule.weight.granularity == "channel" and t.axis is None:
            t.declined.append(f"the output-channel axis of weight '{source.name}' is merged or split by a Reshape "
                              "before the GEMM")
    if rule.activation is not None:
        spec = rule.activation
        dynamic_token = spec.mode == "dynamic" and spec.granularity == "token"
        if not (spec.mode == "static" and spec.granularity == "tensor" or dynamic_token):
            t.declined.append(f"{spec.mode} {spec.granularity} activation quantization is not emitted by "
                              "InsertQDQPass yet (static per-tensor and dynamic per-token only)")
        if dynamic_token and (node.op == "Conv" or node.op == "Gemm" and int(node.attrs.get("transA", 0))):
            t.declined.append(f"dynamic per-token activations are emitted for MatMul/Gemm (K last), not {node.op}")
        if spec.format not in ("int8", "fp8"):
            t.declined.append(f"activation format {spec.format} is not emitted by InsertQDQPass yet")
    return t


def _plan_w4a8(graph: gs.Graph, node: gs.Node, rule: Rule, recipe: Recipe, t: QuantTarget) -> QuantTarget:
    """The activation of an INT4-weight MatMul: planned alike on the FP graph (calibration) and after
    QuantizeWeightsInt4Pass (whose INT4 DequantizeLinear then feeds the weight input)."""
    x, spec = node.inputs[0], rule.activation
    t.activation = x.name
    w_dq = int4_weight_dq(node.inputs[1]) if len(node.inputs) > 1 else None
    w = G.const_values(w_dq.inputs[0] if w_dq is not None else node.inputs[1])
    if w_dq is None:  # the FP weight: QuantizeWeightsInt4Pass's verdict on it
        reason = int4_decline_reason(node, w, rule, recipe) if node.op == "MatMul" else \
            f"INT4 weights are for MatMul, not {node.op}"
        if reason:
            t.declined.append(f"the INT4 weight is declined ({reason}), so the activation stays FP too")
            return t
    t.k, t.n = w.shape
    if G.producer(x) is not None and G.producer(x).op == "DequantizeLinear":
        t.declined.append("already quantized (the activation is fed by DequantizeLinear)")
    if spec.format != "fp8":
        t.declined.append(f"activation format {spec.format} with INT4 weights: W4A8 takes fp8 (E4M3) activations")
    if (spec.mode, spec.granularity) not in (("static", "tensor"), ("dynamic", "token")):
        t.declined.append(f"{spec.mode} {spec.granularity} activations with INT4 weights: W4A8 takes static "
                          "per-tensor or dynamic per-token")
    elif spec.mode == "dynamic" and G.onnx_dtype(x) not in (None, onnx.TensorProto.FLOAT):
        t.declined.append("per-token dynamic FP8 is emitted for float32 activations only")
    return t


def _weight_source(tensor) -> tuple[gs.Constant | None, list[gs.Node]]:
    """The constant behind `tensor` through single-consumer copy ops, and those ops (source first)."""
    chain = []
    while not isinstance(tensor, gs.Constant):
        node = G.producer(tensor)
        if node is None or node.op not in G.COPY_OPS or len(node.inputs[0].outputs) != 1:
            return None, []
        chain.insert(0, node)
        tensor = node.inputs[0]
    return tensor, chain


def _through_chain(source: gs.Constant, chain: list[gs.Node], gemm: gs.Node):
    """(weight shape at the GEMM, function mapping a GEMM-side axis back to the source axis)."""
    shapes = [tuple(source.shape)]
    if not chain:
        return shapes[0], lambda axis: axis
    probe = np.zeros(shapes[0], dtype=np.int8)
    for op in chain:
        probe = G.apply_copy_op(op, probe)
        if probe is None:
            return None, None
        shapes.append(probe.shape)

    def back(axis: int) -> int | None:
        for i in range(len(chain) - 1, -1, -1):
            axis = G.map_axis_back(chain[i], shapes[i], shapes[i + 1], axis)
            if axis is None:
                return None
        return axis

    return shapes[-1], back


def _static_rows(node: gs.Node, act) -> int | None:
    """M, the static number of activation rows, when known."""
    shape = G.static_shape(act)
    if not shape:
        return None
    if node.op == "Conv":
        return None
    if node.op == "Gemm":
        return shape[1] if int(node.attrs.get("transA", 0)) else shape[0]
    return math.prod(shape[:-1])


def _plan_residuals(graph: gs.Graph, convs: list[QuantTarget]) -> list[QuantTarget]:
    conv_rule = {t.node: t.rule for t in convs}
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    targets = []
    for add in graph.nodes:
        if add.op != "Add" or len(add.inputs) != 2 or any(isinstance(x, gs.Constant) for x in add.inputs):
            continue
        backbones = [_backbone_conv(x, conv_rule) for x in add.inputs]
        if backbones[0] is None and backbones[1] is None:
            continue
        if backbones[0] is not None and backbones[1] is not None:
            # Both branches start at a Conv (e.g. a projection shortcut): the later conv is the fused one.
            skip = 0 if order[backbones[0].name] < order[backbones[1].name] else 1
        else:
            skip = 0 if backbones[0] is None else 1
        rule = conv_rule[backbones[1 - skip].name]
        x = add.inputs[skip]
        t = QuantTarget(add.name, "Add", G.module_of(graph, add), rule, activation=x.name, kind="residual")
        if rule.activation is None:
            t.declined.append("the backbone Conv's rule has no activation format")
        elif G.producer(x) is not None and G.producer(x).op == "DequantizeLinear":
            t.declined.append("skip input is already quantized")
        targets.append(t)
    return targets


def _backbone_conv(tensor, conv_rule: dict) -> gs.Node | None:
    """The quantized Conv that `tensor` comes from through fusible ops, or None."""
    for _ in range(16):
        node = G.producer(tensor)
        if node is None:
            return None
        if node.op == "Conv":
            return node if node.name in conv_rule else None
        if node.op not in _BACKBONE_OPS:
            return None
        if node.op in ("Add", "Mul"):
            # only a bias/scale by a constant (a second activation input means another Add/Mul)
            if sum(not isinstance(x, gs.Constant) for x in node.inputs) != 1:
                return None
            tensor = next(x for x in node.inputs if not isinstance(x, gs.Constant))
        else:
            tensor = node.inputs[0]
    return None


class InsertQDQPass(InPlacePass):
    """Inserts Q/DQ on the activations and (float) weights of the nodes `plan_quantization` selects.

    Args:
        recipe (Recipe): the rules and placement options.
        activation_amax (dict[str, float]): calibrated absolute max per activation tensor.
        input_amax (dict[str, float]): by node name, the amax of the node's input where it is not the
            calibrated tensor's (AWQ divides a W4A8 layer's input by s: the amax of x / s).

    Raises:
        PassError: an activation that must be quantized has no amax.
    """

    def __init__(self, recipe: Recipe, activation_amax: dict[str, float],
                 input_amax: dict[str, float] | None = None):
        self.recipe = recipe
        self.activation_amax = dict(activation_amax)
        self.input_amax = dict(input_amax or {})

    def call(self, graph: gs.Graph) -> PassResult:
        for i, node in enumerate(graph.nodes):
            if not node.name:
                node.name = G.unique_name(graph, f"{node.op}_{i}")
        targets = plan_quantization(graph, self.recipe)
        declined = [(t.node, reason) for t in targets for reason in t.declined]
        stats: collections.Counter = collections.Counter()
        nodes = {n.name: n for n in graph.nodes}
        shared: dict[tuple[str, str], gs.Variable] = {}
        new_nodes: list[gs.Node] = []
        for t in (t for t in targets if t.quantized):
            node = nodes[t.node]
            if t.rule.activation is not None and t.activation:
                index = next(i for i, x in enumerate(node.inputs) if x.name == t.activation)
                node.inputs[index] = self._activation_qdq(graph, node.inputs[index], t, shared, new_nodes, stats)
                stats["residual_qdq" if t.kind == "residual" else "quantized_nodes"] += 1
            elif t.kind == "gemm":
                stats["quantized_nodes"] += 1
            if t.rule.weight is not None and t.weight and not _int4_weight(t.rule):
                self._weight_qdq(graph, node, t, new_nodes)
                stats["weight_qdq"] += 1
            if t.output and t.rule.activation is not None:
                self._output_qdq(graph, node, t, new_nodes)
                stats["output_qdq"] += 1
        graph.nodes.extend(new_nodes)
        graph.toposort()
        return PassResult(graph, bool(new_nodes), stats, declined)

    def _scale(self, tensor_name: str, t: QuantTarget, dtype) -> np.ndarray:
        amax = self.input_amax.get(t.node) if t.kind == "gemm" and tensor_name == t.activation else None
        amax = self.activation_amax.get(tensor_name) if amax is None else amax
        if amax is None:
            raise PassError(
                f"no amax for activation tensor '{tensor_name}' (needed to quantize node '{t.node}'); "
                "calibrate the tensors listed by activation_tensors(plan_quantization(model, recipe))")
        return formats.scale_from_amax(float(amax), t.rule.activation.format).astype(_float_np(dtype))

    def _activation_qdq(self, graph, x, t, shared, new_nodes, stats) -> gs.Variable:
        fmt, mode = t.rule.activation.format, t.rule.activation.mode
        if (x.name, fmt, mode) in shared:
            stats["shared_activation_qdq"] += 1
            return shared[(x.name, fmt, mode)]
        if mode == "dynamic":
            nodes, out = G.make_dynamic_row_qdq(graph, x, fmt, t.k, x.name)
            new_nodes += nodes
            stats["dynamic_activation_qdq"] += 1
        else:
            q, dq, out = G.make_qdq(graph, x, self._scale(x.name, t, x.dtype), fmt, None, x.name)
            new_nodes += [q, dq]
            stats["activation_qdq"] += 1
        shared[(x.name, fmt, mode)] = out
        return out

    def _weight_qdq(self, graph, node, t, new_nodes) -> None:
        spec = t.rule.weight
        source = next(x for x in graph.tensors().values() if x.name == t.weight)
        w = G.const_values(source)
        axis = t.axis if spec.granularity == "channel" else None
        scale = formats.scale_from_amax(formats.weight_amax(w, axis), spec.format).astype(w.dtype)
        q, dq, out = G.make_qdq(graph, source, scale, spec.format, axis, source.name)
        new_nodes += [q, dq]
        # Rewire only this path: the first copy op on the way to `node`, or `node` itself.
        consumer = node
        tensor = node.inputs[1]
        while tensor is not source:
            consumer = G.producer(tensor)
            tensor = consumer.inputs[0]
        consumer.inputs[next(i for i, x in enumerate(consumer.inputs) if x is source)] = out

    def _output_qdq(self, graph, node, t, new_nodes) -> None:
        y = node.outputs[0]
        consumers = list(y.outputs)
        q, dq, out = G.make_qdq(graph, y, self._scale(y.name, t, y.dtype), t.rule.activation.format, None, y.name)
        new_nodes += [q, dq]
        for consumer in consumers:
            for i, x in enumerate(consumer.inputs):
                if x is y:
                    consumer.inputs[i] = out


def _float_np(dtype) -> np.dtype:
    """The numpy dtype for a scale matching a float tensor of `dtype` (float32 when unknown)."""
    try:
        d = np.dtype(dtype) if not isinstance(dtype, int) else onnx.helper.tensor_dtype_to_np_dtype(dtype)
    except Exception:  # noqa: BLE001
        return np.dtype(np.float32)
    return d if d in (np.dtype(np.float16), np.dtype(np.float32)) else np.dtype(np.float32)
