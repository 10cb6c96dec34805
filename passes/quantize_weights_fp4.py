"""FP4 weights (NVFP4, MXFP4) and NVFP4 activations in TensorRT's portable ONNX form (opset 23).

Does the following transformation on each MatMul whose rule has an `nvfp4` / `mxfp4` weight:
- NVFP4 weight:  MatMul(x, W[K,N] const)  ->  MatMul(x, Transpose(DQ(W_f4[N,K] FLOAT4E2M1,
  DQ(S_f8[N,K/16] FLOAT8E4M3FN, g_w FLOAT), axis=-1, block_size=16)))
- MXFP4 weight:  ->  MatMul(x, Transpose(DQ(W_f4[N,K], S[N,K/32] FLOAT (E8M0 powers of two), axis=-1,
  block_size=32)))   (opset 23 has no E8M0 scale type and TensorRT's parser maps none)
- NVFP4 activation (`activation.format = "nvfp4"`, W4A4): x  ->  DQ(x_f4, DQ(sx_f8, g_x), axis=-1,
  block_size=16) with `x_f4, sx_f8 = trt::TRT_FP4DynamicQuantize(x, g_x, axis=-1, block_size=16,
  scale_type=FLOAT8E4M3FN)`, `g_x = amax(x) / (6*448)` from calibration; one chain per tensor, shared by
  the MatMuls that read it.
- K not a multiple of the block B (16 / 32): K is padded to Kp = ceil(K/B)*B: the weight with zero rows
  (`W_f4 [N, Kp]`, its last block scaled by its real elements only) and the input with a constant-zero Pad
  on its last axis, `x -> Pad(x, pads=[0,..,0, 0,..,Kp-K])` (one per tensor and Kp, before any activation
  chain; `Pad(x, [0, Kp-K], axes=[-1])` when x's rank is unknown), so `Pad(x) @ [W; 0] = x @ W` exactly and TensorRT's block DQ / dynamic quantize see K % B == 0.

The weights come from `qcompile.algorithms.fp4` (two-level NVFP4 scales; OCP MX E8M0 scales). A rule's
`weight.scale_search = "mse"` (nvfp4) searches the NVFP4 global and block scales for the least squared error.
NVFP4 layers that read the same input (Q/K/V, gate/up; weight-only and W4A4 groups apart) share one global scale,
from the largest amax of the group, so the engine can run them as one GEMM (`FuseSiblingGemmsPass`); their block
scales absorb the difference (E4M3 values keep their relative precision). Declined, with a reason: a non-constant
or non-2-D weight, K < min_k, N < min_n, and activation formats other than nvfp4. Never emits ModelOpt's
`TRT_FP4QDQ` placeholder.
"""
from __future__ import annotations

import collections
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch

from qcompile.algorithms.fp4 import BLOCK, FORMATS, Fp4Weight, activation_global_scale, quantize_fp4
from qcompile.errors import PassError
from qcompile.passes import _graph as G
from qcompile.passes.infra import InPlacePass, PassResult
from qcompile.plugins.fp4_gemm import format as F
from qcompile.plugins.fp4_gemm import onnx_schema
from qcompile.recipes.schema import Recipe

logger = logging.getLogger(__name__)

__all__ = ["QuantizeWeightsFp4Pass", "fp4_targets", "fp4_activation_tensors", "padded_k", "OPSET", "PAD_K_RULE"]

OPSET = 23  # FLOAT4E2M1 in DequantizeLinear
PAD_K_RULE = "fp4_pad_k"  # the qcompile.rule metadata of the Pad that gives x a K the FP4 blocks divide
T = onnx.TensorProto


def fp4_targets(graph: gs.Graph, recipe: Recipe) -> list[tuple[gs.Node, object]]:
    """(MatMul node, rule) pairs whose rule asks for an FP4 weight."""
    found = []
    for node in graph.nodes:
        if node.op == "MatMul":
            rule = recipe.rule_for(node.op, node.name, G.module_of(graph, node))
            if rule is not None and rule.weight is not None and rule.weight.format in FORMATS:
                found.append((node, rule))
    return found


def fp4_activation_tensors(model: onnx.ModelProto | gs.Graph, recipe: Recipe) -> list[str]:
    """The activations whose amax calibration must measure (NVFP4 W4A4 layers' inputs), in order."""
    if not any(r.activation is not None and r.activation.format == "nvfp4" for r in recipe.rules):
        return []
    graph = G.import_model(model) if isinstance(model, onnx.ModelProto) else model
    names: dict[str, None] = {}
    for node, rule in fp4_targets(graph, recipe):
        if _reason(node, rule, recipe) is None and rule.activation is not None:
            names[node.inputs[0].name] = None
    return list(names)


def _reason(node: gs.Node, rule, recipe: Recipe) -> str | None:
    act = rule.activation
    if act is not None and act.format != "nvfp4":
        return f"activation format {act.format} with an FP4 weight is not supported (nvfp4 or none)"
    if act is not None and rule.weight.format != "nvfp4":
        return "NVFP4 activations go with NVFP4 weights (W4A4)"
    w = G.const_values(node.inputs[1])
    if w is None:
        return f"weight '{node.inputs[1].name}' is not a constant initializer (FP4 needs a constant [K, N])"
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        return f"weight '{node.inputs[1].name}' is not a 2-D float matrix (shape {w.shape}, {w.dtype})"
    k, n = w.shape
    opts = recipe.placement.for_op(node.op)
    if k < opts.min_k:
        return f"K={k} < min_k={opts.min_k}"
    if n < opts.min_n:
        return f"N={n} < min_n={opts.min_n}"
    return None


def padded_k(k: int, fmt: str) -> int:
    """K rounded up to the format's block (16 nvfp4, 32 mxfp4)."""
    return -(-k // BLOCK[fmt]) * BLOCK[fmt]


class QuantizeWeightsFp4Pass(InPlacePass):
    """Quantizes the recipe's FP4 MatMuls to TensorRT's NVFP4 / MXFP4 ONNX form (see the module docstring).

    Args:
        recipe: selects the layers (rules with `weight.format` nvfp4 / mxfp4, optional nvfp4 activation).
        activation_amax: calibrated amax by tensor name (the W4A4 layers' inputs).
        mse_search: search the NVFP4 weight scales for the least squared error in every layer (otherwise only
            in the layers whose rule says `weight.scale_search = "mse"`).
    """

    def __init__(self, recipe: Recipe, activation_amax: dict[str, float] | None = None, mse_search: bool = False):
        self.recipe = recipe
        self.activation_amax = dict(activation_amax or {})
        self.mse_search = mse_search

    def call(self, graph: gs.Graph) -> PassResult:
        stats: collections.Counter = collections.Counter()
        declined: list[tuple[str, str]] = []
        shared: dict[str, gs.Variable] = {}
        pads: dict[tuple[str, int], gs.Variable] = {}
        targets = []
        for node, rule in fp4_targets(graph, self.recipe):
            reason = _reason(node, rule, self.recipe)
            if reason:
                declined.append((node.name, reason))
            else:
                targets.append((node, rule))
        group_amax = self._sibling_amax(targets)
        for node, rule in targets:
            w = G.const_values(node.inputs[1])
            source = node.inputs[0].name  # the calibrated tensor (the amax of its padded copy is the same)
            k, kp = w.shape[0], padded_k(w.shape[0], rule.weight.format)
            w32 = w.astype(np.float32)
            if kp != k:  # zero rows: the last block's scale comes from its real elements only
                w32 = np.concatenate([w32, np.zeros((kp - k, w.shape[1]), np.float32)])
                key = (node.inputs[0].name, kp)
                if key not in pads:
                    pads[key] = self._pad(graph, node.inputs[0], kp - k)
                    stats["inputs_padded"] += 1
                node.inputs[0] = pads[key]
                stats["layers_padded_k"] += 1
                logger.info("%s: K=%d is not a multiple of the %s block %d; padded to K=%d with zeros",
                            node.name, k, rule.weight.format, BLOCK[rule.weight.format], kp)
            mse = self._mse(rule)
            qw = quantize_fp4(torch.from_numpy(w32), rule.weight.format, mse, group_amax.get(node.name))
            if mse:
                stats["nvfp4_mse_searched"] += 1
            node.inputs[1] = self._weight(graph, node, qw, w.dtype)
            if rule.activation is not None:
                x = node.inputs[0]
                if x.name not in shared:
                    shared[x.name] = self._activation(graph, node, x, source)
                    stats["activations_quantized"] += 1
                node.inputs[0] = shared[x.name]
            stats[f"{rule.weight.format}_weights"] += 1
            stats["bytes_saved"] += int(w.nbytes - qw.codes.numel() // 2 - qw.scale.numel())
        if sum(stats.values()):
            graph.opset = max(graph.opset or 0, OPSET)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, bool(sum(stats.values())), stats, declined)

    def _mse(self, rule) -> bool:
        return rule.weight.format == "nvfp4" and (self.mse_search or rule.weight.scale_search == "mse")

    def _sibling_amax(self, targets) -> dict[str, float]:
        """node name -> the largest weight amax of the NVFP4 layers that read the same input (two or more, no MSE
        search; weight-only and W4A4 layers apart): one global scale for the group lets `FuseSiblingGemmsPass`
        lower them as one GEMM (W4A4 siblings also share their activation's quantization, hence its global)."""
        groups = collections.defaultdict(list)
        for node, rule in targets:
            if rule.weight.format == "nvfp4" and not self._mse(rule):
                groups[node.inputs[0].name, rule.activation is None].append(node)
        out = {}
        for nodes in groups.values():
            if len(nodes) > 1:
                amax = max(float(np.abs(G.const_values(n.inputs[1])).max()) for n in nodes)
                out.update({n.name: amax for n in nodes})
        return out

    @staticmethod
    def _pad(graph: gs.Graph, x: gs.Variable, extra: int) -> gs.Variable:
        """`Pad(x)` with `extra` zeros at the end of the last axis (constant mode, value 0). With a known rank the
        pads cover every axis (what every TensorRT parser reads); otherwise they name the last axis through
        Pad's `axes` input (opset >= 18)."""
        inputs = [x]
        if x.shape is not None:
            rank = len(x.shape)
            inputs.append(G.make_constant(G.unique_name(graph, f"{x.name}_pad_k"),
                                          np.asarray([0] * (2 * rank - 1) + [extra], np.int64)))
            last = x.shape[-1]
            shape = [*x.shape[:-1], last + extra if isinstance(last, int) else None]
        else:
            inputs += [G.make_constant(G.unique_name(graph, f"{x.name}_pad_k"), np.asarray([0, extra], np.int64)),
                       gs.Variable.empty(),
                       G.make_constant(G.unique_name(graph, f"{x.name}_pad_axes"), np.asarray([-1], np.int64))]
            shape = None
        out = gs.Variable(G.unique_name(graph, f"{x.name}_padded"), dtype=x.dtype, shape=shape)
        pad = gs.Node("Pad", name=G.unique_name(graph, f"{x.name}/pad_k"), inputs=inputs, outputs=[out],
                      attrs={"mode": "constant"})
        graph.nodes.append(pad)
        G.node_metadata(graph)[pad.name] = {G.RULE_KEY: PAD_K_RULE}
        return out

    @staticmethod
    def _weight(graph: gs.Graph, node: gs.Node, qw: Fp4Weight, dtype) -> gs.Variable:
        """Transpose(DQ(W_f4 [N, K], block scales, axis=-1, block_size)) in front of `node`; returns [K, N]."""
        base = node.inputs[1].name
        n, k = qw.codes.shape
        w_f4 = G.make_constant(G.unique_name(graph, f"{base}_fp4"), F.codes_to_float4(qw.codes.cpu().numpy()))
        new_nodes = []
        if qw.fmt == "nvfp4":
            s_f8 = G.make_constant(G.unique_name(graph, f"{base}_block_scale"), qw.scale.cpu().view(torch.uint8)
                                   .numpy().view(__import__("ml_dtypes").float8_e4m3fn))
            g = _scalar(G.unique_name(graph, f"{base}_global_scale"), qw.global_scale.item())
            scale = gs.Variable(G.unique_name(graph, f"{base}_block_scale_dq"), dtype=np.float32,
                                shape=list(qw.scale.shape))
            new_nodes.append(gs.Node("DequantizeLinear", name=G.unique_name(graph, f"{node.name}/weight_scale_dq"),
                                     inputs=[s_f8, g], outputs=[scale]))
        else:
            scale = G.make_constant(G.unique_name(graph, f"{base}_block_scale"),
                                    F.e8m0_decode(qw.scale).cpu().numpy().astype(np.float32))
        attrs = {"axis": -1, "block_size": qw.block_size}
        if np.dtype(dtype) != np.float32:
            attrs["output_dtype"] = G.onnx_dtype(node.inputs[1])
        w_dq = gs.Variable(G.unique_name(graph, f"{base}_dq"), dtype=np.dtype(dtype), shape=[n, k])
        w_t = gs.Variable(G.unique_name(graph, f"{base}_dq_t"), dtype=np.dtype(dtype), shape=[k, n])
        new_nodes += [
            gs.Node("DequantizeLinear", name=G.unique_name(graph, f"{node.name}/weight_dq"), inputs=[w_f4, scale],
                    outputs=[w_dq], attrs=attrs),
            gs.Node("Transpose", name=G.unique_name(graph, f"{node.name}/weight_t"), inputs=[w_dq], outputs=[w_t],
                    attrs={"perm": [1, 0]}),
        ]
        graph.nodes.extend(new_nodes)
        return w_t

    def _activation(self, graph: gs.Graph, node: gs.Node, x: gs.Variable, source: str) -> gs.Variable:
        """TensorRT's NVFP4 dynamic activation quantization of `x` (`source` padded, or `source` itself);
        returns the dequantized tensor."""
        amax = self.activation_amax.get(source)
        if amax is None:
            raise PassError(f"no amax for activation tensor '{source}' (needed for the NVFP4 global scale of node "
                            f"'{node.name}'); calibrate the tensors listed by fp4_activation_tensors(model, recipe)")
        g = _scalar(G.unique_name(graph, f"{x.name}_fp4_global_scale"), activation_global_scale(amax))
        block_shape = None if x.shape is None else [*x.shape[:-1], _div(x.shape[-1], F.NVFP4_BLOCK)]
        x_f4 = gs.Variable(G.unique_name(graph, f"{x.name}_fp4"), dtype=T.FLOAT4E2M1, shape=x.shape)
        sx_f8 = gs.Variable(G.unique_name(graph, f"{x.name}_fp4_scale"), dtype=T.FLOAT8E4M3FN, shape=block_shape)
        sx = gs.Variable(G.unique_name(graph, f"{x.name}_fp4_scale_dq"), dtype=np.float32, shape=block_shape)
        out = gs.Variable(G.unique_name(graph, f"{x.name}_fp4_dq"), dtype=x.dtype, shape=x.shape)
        dq_attrs = {"axis": -1, "block_size": F.NVFP4_BLOCK}
        if x.dtype is not None and np.dtype(x.dtype) != np.float32:
            dq_attrs["output_dtype"] = G.onnx_dtype(x)
        base = f"{x.name}/fp4"
        graph.nodes.extend([
            gs.Node(onnx_schema.TRT_DYNAMIC_QUANTIZE, name=G.unique_name(graph, f"{base}_dynamic_quantize"),
                    domain=onnx_schema.TRT_DOMAIN, inputs=[x, g], outputs=[x_f4, sx_f8],
                    attrs=onnx_schema.dynamic_quantize_attributes()),
            gs.Node("DequantizeLinear", name=G.unique_name(graph, f"{base}_scale_dq"), inputs=[sx_f8, g],
                    outputs=[sx]),
            gs.Node("DequantizeLinear", name=G.unique_name(graph, f"{base}_dq"), inputs=[x_f4, sx], outputs=[out],
                    attrs=dq_attrs),
        ])
        return out


def _scalar(name: str, value: float) -> gs.Constant:
    """A float32 scalar (shape []) constant: TensorRT reads a 0-D scale as per-tensor and wants the
    TRT_FP4DynamicQuantize global scale a scalar (`G.make_constant` would store it as [1])."""
    return gs.Constant(name, np.asarray(value, np.float32).reshape(()))


def _div(dim, block: int):
    return dim // block if isinstance(dim, int) else None

