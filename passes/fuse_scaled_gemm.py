"""Fuse quantized GEMMs into `qcompile::ScaledGemm` plugin nodes.

Does the following transformation:
- MatMul(DQ(Q(x, sx)), DQ(W_q[K,N], sw, axis=1)) (+ Add(·, b[N]))  ->  ScaledGemm(x, sx, zp, W_q.T[N,K], sw, b)
- Gemm(DQ(Q(x)), DQ(W_q), C, alpha, beta, transB)  ->  ScaledGemm(x, sx, zp, W_q as [N,K], alpha*sw, beta*C)
- no bias  ->  a zero bias [N]
- MatMul/Gemm(DQ(Q(x, s_row(x), axis=-1, block_size=K)), DQ(W_q)) with the per-token dynamic scale subgraph
  s_row(x) = Max(Div(ReduceMax(Abs(x)), qmax), MIN_SCALE)  ->  DynamicScaledGemm(x, zp, W_q.T[N,K], sw, b)

Given the recipe, GEMMs whose rule hands them to another fusion (weight-only INT8, FP8 block, INT4, FP4:
`_forms.rule_form`) are left to it, not declined. The activation Q/DQ pair stays when another consumer still reads
the DQ output. The plugin contract is
`qcompile.plugins.scaled_gemm.onnx_schema`; `pipeline.fuse_plugins` adds its function body to the model.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompile.passes import _graph as G
from qcompile.passes._forms import QDQ, rule_form
from qcompile.passes.rewrite import MatchResult, RewritePass, RewriteRule
from qcompile.plugins import formats
from qcompile.plugins.scaled_gemm import dynamic_schema, onnx_schema
from qcompile.recipes.schema import Recipe

logger = logging.getLogger(__name__)

__all__ = ["FuseScaledGemmPass"]

_FORMATS = ("int8", "fp8")


class ScaledGemmRule(RewriteRule):
    """DQ-fed MatMul/Gemm with a constant quantized weight -> ScaledGemm."""

    pattern = ("MatMul", "Gemm")

    def match(self, graph, node):
        if len(node.inputs) < 2:
            return None
        w_dq = G.producer(node.inputs[1])
        if w_dq is None or w_dq.op != "DequantizeLinear":
            return None  # not a quantized GEMM at all
        x_dq = G.producer(node.inputs[0])
        x_q = G.producer(x_dq.inputs[0]) if x_dq is not None and x_dq.op == "DequantizeLinear" else None
        bias_add = None
        if node.op == "MatMul":
            y = node.outputs[0]
            if len(y.outputs) == 1 and y.outputs[0].op == "Add" and not G.is_graph_output(graph, y):
                bias_add = y.outputs[0]
        return {"node": node, "w_dq": w_dq, "x_dq": x_dq, "x_q": x_q, "bias_add": bias_add}

    def check(self, graph, node, w_dq, x_dq, x_q, bias_add):
        w_fmt = self.check_weight(graph, node, w_dq)
        if isinstance(w_fmt, MatchResult):
            return w_fmt
        if x_dq is None or x_dq.op != "DequantizeLinear":
            return MatchResult.fail("activation is not quantized (weight-only GEMM)")
        if x_q is None or x_q.op != "QuantizeLinear":
            return MatchResult.fail("activation DequantizeLinear is not fed by a QuantizeLinear")
        sx, sx_dq = G.const_values(x_q.inputs[1]), G.const_values(x_dq.inputs[1])
        if sx is None or sx_dq is None:
            return MatchResult.fail("activation scale is not constant (static quantization only)")
        if sx.size != 1 or sx_dq.size != 1:
            return MatchResult.fail("activation scale is not per-tensor")
        if float(sx.reshape(())) != float(sx_dq.reshape(())):
            return MatchResult.fail("activation Q and DQ scales differ")
        if _nonzero_zero_point(x_q) or _nonzero_zero_point(x_dq):
            return MatchResult.fail("activation zero point is not zero")
        _, x_fmt = G.quantized_format(x_q)
        if x_fmt != w_fmt:
            return MatchResult.fail(f"activation format {x_fmt} and weight format {w_fmt} differ")
        return MatchResult.ok()

    def check_weight(self, graph, node, w_dq) -> str | MatchResult:
        """The weight format ("int8" / "fp8") when the weight side (and Gemm attributes) can be fused, else a fail."""
        wq = G.const_values(w_dq.inputs[0])
        if wq is None:
            return MatchResult.fail("weight is not constant")
        if G.const_values(w_dq.inputs[1]) is None:
            return MatchResult.fail("weight scale is not constant")
        w_fmt = formats.format_of_onnx_dtype(G.onnx_dtype(w_dq.inputs[0]))
        if w_fmt not in _FORMATS:
            found = w_fmt or onnx.helper.tensor_dtype_to_string(G.onnx_dtype(w_dq.inputs[0]))
            return MatchResult.fail(f"weight format {found} is not int8 or fp8")
        if wq.ndim != 2:
            return MatchResult.fail(f"{node.op} weight rank is {wq.ndim}, expected 2")
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            return MatchResult.fail("Gemm transA=1 is not fused")
        n_axis = 0 if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else 1
        scale_shape = tuple(w_dq.inputs[1].shape)
        per_tensor = scale_shape in ((), (1,))
        if w_dq.attrs.get("block_size", 0) or not (per_tensor or (
                len(scale_shape) == 1 and G.qdq_axis(w_dq, 2) == n_axis and scale_shape[0] == wq.shape[n_axis])):
            return MatchResult.fail(f"weight scale {list(scale_shape)} is not per-tensor or per-channel along N "
                                    f"(axis={n_axis})")
        if _nonzero_zero_point(w_dq):
            return MatchResult.fail("weight zero point is not zero")
        if node.op == "Gemm" and float(node.attrs.get("alpha", 1.0)) <= 0:
            return MatchResult.fail("Gemm alpha <= 0 cannot be folded into the weight scale")
        if node.op == "Gemm" and len(node.inputs) > 2 and not node.inputs[2].is_empty():
            if G.bias_vector(node.inputs[2], wq.shape[n_axis]) is None:
                return MatchResult.fail("Gemm C is not a constant bias broadcastable to [N]")
        return w_fmt

    def rewrite(self, graph, node, w_dq, x_dq, x_q, bias_add):
        w_nk, w_scale, bias, y, fmt = self.weight_and_bias(node, w_dq, bias_add)
        base = node.name or G.unique_name(graph, "ScaledGemm")
        sx = G.const_values(x_q.inputs[1]).astype(np.float32).reshape(())
        inputs = [
            x_q.inputs[0],
            G.make_constant(G.unique_name(graph, f"{base}/x_scale"), sx),
            G.make_constant(G.unique_name(graph, f"{base}/x_zero_point"), G.zero_point(fmt)),
            *self.weight_constants(graph, base, w_nk, w_scale, bias),
        ]
        return [self.replace(graph, node, x_dq, base, onnx_schema, inputs, y)]

    @staticmethod
    def weight_and_bias(node, w_dq, bias_add):
        """(w_q [N, K], w_scale [N] or [], bias [N], the output to produce, format); drops a fused bias Add."""
        wq = G.const_values(w_dq.inputs[0])
        trans_b = node.op == "Gemm" and int(node.attrs.get("transB", 0))
        w_nk = wq if trans_b else np.ascontiguousarray(wq.T)
        n = w_nk.shape[0]
        w_scale = G.const_values(w_dq.inputs[1]).astype(np.float32).reshape(-1)
        w_scale = w_scale.reshape(()) if w_scale.size == 1 and tuple(w_dq.inputs[1].shape) in ((), (1,)) else w_scale
        bias = np.zeros(n, np.float32)
        y = node.outputs[0]
        if node.op == "Gemm":
            w_scale = w_scale * np.float32(node.attrs.get("alpha", 1.0))
            if len(node.inputs) > 2 and not node.inputs[2].is_empty():
                bias = G.bias_vector(node.inputs[2], n) * np.float32(node.attrs.get("beta", 1.0))
        elif bias_add is not None:
            other = next(x for x in bias_add.inputs if x is not y)
            b = G.bias_vector(other, n, strict=True)
            if b is not None and sum(x is y for x in bias_add.inputs) == 1:
                bias, y = b, bias_add.outputs[0]
                G.drop_node(bias_add)
        return w_nk, w_scale, bias, y, formats.format_of_onnx_dtype(G.onnx_dtype(w_dq.inputs[0]))

    @staticmethod
    def weight_constants(graph, base, w_nk, w_scale, bias) -> list:
        """The w_q, w_scale and bias inputs of a fused node."""
        return [G.make_constant(G.unique_name(graph, f"{base}/w_q"), w_nk),
                G.make_constant(G.unique_name(graph, f"{base}/w_scale"), w_scale.astype(np.float32)),
                G.make_constant(G.unique_name(graph, f"{base}/bias"), bias.astype(np.float32))]

    @staticmethod
    def replace(graph, node, x_dq, base, schema, inputs, y) -> gs.Node:
        """Put the plugin node `schema.OP_TYPE` in place of `node` (and of the activation DQ if nothing else reads it)."""
        fused = gs.Node(schema.OP_TYPE, name=base, domain=schema.DOMAIN, attrs=schema.attributes(),
                        inputs=inputs, outputs=[y])
        meta = G.node_metadata(graph)
        if node.name in meta:
            meta[base] = dict(meta[node.name])
        x_dq_out = x_dq.outputs[0]
        G.drop_node(node)
        if not x_dq_out.outputs and not G.is_graph_output(graph, x_dq_out):
            G.drop_node(x_dq)  # its Q goes with it in cleanup when nothing else reads it
        graph.nodes.append(fused)
        return fused


class DynamicScaledGemmRule(ScaledGemmRule):
    """DQ-fed MatMul/Gemm whose activation Q uses the per-token dynamic scale subgraph -> DynamicScaledGemm.

    Matches only that form (`_graph.dynamic_row_scale_input`); static Q/DQ is left to `ScaledGemmRule`."""

    def match(self, graph, node):
        bound = super().match(graph, node)
        if bound is None or bound["x_q"] is None or bound["x_q"].op != "QuantizeLinear":
            return None
        return bound if G.dynamic_row_scale_input(bound["x_q"]) is not None else None

    def check(self, graph, node, w_dq, x_dq, x_q, bias_add):
        w_fmt = self.check_weight(graph, node, w_dq)
        if isinstance(w_fmt, MatchResult):
            return w_fmt
        x, x_fmt = G.dynamic_row_scale_input(x_q)
        k = G.const_values(w_dq.inputs[0]).shape[1 if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else 0]
        if x_dq.inputs[1] is not x_q.inputs[1] or int(x_dq.attrs.get("block_size", 0)) != k \
                or int(x_q.attrs.get("block_size", 0)) != k or int(x_q.attrs.get("axis", 1)) not in (-1, len(x.shape or ()) - 1):
            return MatchResult.fail(f"dynamic activation Q/DQ is not one block of K={k} per row with a shared scale")
        if len(x_q.inputs) > 2 or len(x_dq.inputs) > 2:
            return MatchResult.fail("dynamic activation Q/DQ has a zero point (the form has none)")
        if x_fmt != w_fmt:
            return MatchResult.fail(f"activation format {x_fmt} and weight format {w_fmt} differ")
        return MatchResult.ok()

    def rewrite(self, graph, node, w_dq, x_dq, x_q, bias_add):
        w_nk, w_scale, bias, y, fmt = self.weight_and_bias(node, w_dq, bias_add)
        base = node.name or G.unique_name(graph, "DynamicScaledGemm")
        inputs = [x_q.inputs[0], G.make_constant(G.unique_name(graph, f"{base}/x_zero_point"), G.zero_point(fmt)),
                  *self.weight_constants(graph, base, w_nk, w_scale, bias)]
        return [self.replace(graph, node, x_dq, base, dynamic_schema, inputs, y)]


def _nonzero_zero_point(node: gs.Node) -> bool:
    if len(node.inputs) < 3 or node.inputs[2].is_empty():
        return False
    zp = G.const_values(node.inputs[2])
    return zp is None or bool(np.any(zp.astype(np.float32) != 0))


def ensure_function(graph: gs.Graph, schema=onnx_schema) -> None:
    """Put the plugin's (ScaledGemm's) function body into the graph (so dumps and exports can be run by ORT)."""
    if any(f.domain == schema.DOMAIN and f.name == schema.OP_TYPE for f in graph.functions):
        return
    from onnx_graphsurgeon.importers.onnx_importer import OnnxImporter

    domains = [onnx.helper.make_opsetid("", max(graph.opset, schema.FUNCTION_OPSET))]
    graph.functions.append(OnnxImporter.import_function(schema.function_proto(), model_opset=graph.opset,
                                                        model_import_domains=domains))
    graph.import_domains = [d for d in (graph.import_domains or [onnx.helper.make_opsetid("", graph.opset)])
                            if d.domain != onnx_schema.DOMAIN] + [
        onnx.helper.make_opsetid(onnx_schema.DOMAIN, onnx_schema.VERSION)]


class FuseScaledGemmPass(RewritePass):
    """Runs `ScaledGemmRule`; declines say why a quantized GEMM was not fused.

    Args:
        recipe: the recipe the graph was quantized with (optional): its layers of another fusion's form are
            skipped, not declined. Without it every DQ-fed GEMM is a candidate.
    """

    def __init__(self, recipe: Recipe | None = None):
        super().__init__([DynamicScaledGemmRule(), ScaledGemmRule()], name="FuseScaledGemmPass")
        self.recipe = recipe

    def skips(self, graph, node):
        rule = self.recipe.rule_for(node.op, node.name, G.module_of(graph, node)) if self.recipe else None
        return rule is not None and rule_form(rule) != QDQ

    def call(self, graph):
        result = super().call(graph)
        for schema in (onnx_schema, dynamic_schema):
            if any(n.op == schema.OP_TYPE and n.domain == schema.DOMAIN for n in graph.nodes):
                ensure_function(graph, schema)
        return result
