"""Per-layer error localization: which quantized layers of a plugin graph lose the accuracy.

For each quantized GEMM plugin node of the quantized (plugin) graph (`PLUGINS`: every plugin kind of the
build's layer table: ScaledGemm, DynamicScaledGemm, Int4GroupwiseGemm, Fp4Gemm, Fp4GemmW4A4,
Int8WeightOnlyGemm, Fp8BlockGemm):

- *local error*: the layer alone, fed the FP input x it sees in the FP reference graph, against the FP
  output y (error not inherited from upstream layers); with its clip rate (fraction of x beyond the
  format's range at its static scale: ScaledGemm, W4A8; for NVFP4 W4A4, beyond 6 * 448 times the activation's
  global scale, where a block scale saturates) and scales;
- *contribution*: the gain in model-output SQNR (worst output, vs the FP reference) when only this layer
  runs in FP: the plugin node is replaced by the FP graph's nodes computing y from x (`revert_layer`).

The layer is its plugin node plus the ops in front of it that prepare its input (`INPUT_RULES`): the AWQ
scaling (the tagged `Mul(x, 1/s)`, or the ops `FoldAwqScalesPass` folded s into) and the FP4 pass's zero padding
of K; x is where they start, a tensor the FP graph has too; the local error runs those ops and the plugin node
(lowered, as in the engine) on the FP x.

Layers are ranked by contribution, worst offender first. Graphs run through `qcompile.lowering` (float32;
on CPU the plugin op is its exact torch reference); metrics are `compare_arrays`, worst over the feeds.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import numpy as np
import onnx
import torch

from qcompile.engine.load import to_numpy, to_torch
from qcompile.errors import ValidationError
from qcompile.layers import layer_table, module_of
from qcompile.lowering import lower_onnx
from qcompile.lowering.interpreter import tensor_from_onnx
from qcompile.passes._graph import RULE_KEY
from qcompile.passes.fold_awq_scales import FOLD_RULE
from qcompile.passes.quantize_weights_fp4 import PAD_K_RULE
from qcompile.passes.quantize_weights_int4 import AWQ_SCALE_RULE
from qcompile.plugins import formats
from qcompile.plugins.fp4_gemm import format as fp4_format
from qcompile.plugins.fp4_gemm import onnx_schema as fp4_schema
from qcompile.plugins.fp8_block_gemm import onnx_schema as fp8_block_schema
from qcompile.plugins.int4_gemm import onnx_schema as int4_schema
from qcompile.plugins.int8_wo_gemm import onnx_schema as int8_wo_schema
from qcompile.plugins.scaled_gemm import dynamic_schema, onnx_schema
from qcompile.report import format_table
from qcompile.validation.metrics import compare_arrays, merge_iterations

logger = logging.getLogger(__name__)

__all__ = ["LayerError", "NotRevertibleError", "localize_layers", "revert_layer", "format_layer_table"]


class NotRevertibleError(ValidationError):
    """The FP subgraph computing a plugin node's output from its input cannot be found in the FP graph."""


@dataclass
class LayerError:
    """One quantized layer: its local error, clip rate, scales and its contribution to the output error."""

    node: str
    module: str
    format: str                        # "weight/activation" as in the build's layer table: "int8/int8", "int4/fp16"
    local_cosine: float | None         # layer fed the FP x, vs the FP y (None: x or y not in the FP graph)
    local_sqnr_db: float | None
    local_max_abs: float | None
    clip_rate: float | None            # fraction of x beyond what x_scale represents (None: no static x_scale)
    x_scale: float | None              # static activation scale (NVFP4 W4A4: the activation's global scale)
    w_scale_min: float
    w_scale_max: float
    reverted_cosine: float | None      # model outputs with only this layer in FP, vs the FP reference
    reverted_sqnr_db: float | None
    contribution_db: float | None      # reverted_sqnr_db - all-quantized SQNR (None: not revertible)
    revertible: bool = True
    note: str = ""                     # why the layer could not be analysed or reverted
    rank: int = 0                      # 1 = worst offender

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Plugin:
    """A plugin node, the ops in front of it that belong to the layer (`INPUT_RULES`) and its scales."""

    node: onnx.NodeProto
    region: list[onnx.NodeProto]       # the input ops (AWQ scaling, K padding), then the plugin node: y from x
    x: str                             # the region's input, a tensor of the FP graph
    fmt: str                           # "weight/activation", as in the build's layer table
    scales: _Scales

    @property
    def y(self) -> str:
        return self.node.output[0]


class _FPGraph:
    """Index of the FP reference graph for finding the subgraph that computes y from x."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.nodes = list(graph.node)
        self.producer = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.inits = {t.name: t for t in graph.initializer}
        self.inputs = {v.name for v in graph.input} - set(self.inits)

    def subgraph(self, x: str, y: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """(nodes in graph order, initializers) of the ancestors of y down to x; NotRevertibleError if none."""
        if y not in self.producer:
            raise NotRevertibleError(f"the FP graph has no node producing {y!r}")
        nodes: set[int] = set()
        inits: dict[str, onnx.TensorProto] = {}
        stack, seen = [y], set()
        while stack:
            name = stack.pop()
            if not name or name == x or name in seen:
                continue
            seen.add(name)
            if name in self.producer:
                index = self.producer[name]
                if index not in nodes:
                    nodes.add(index)
                    stack.extend(self.nodes[index].input)
            elif name in self.inits:
                inits[name] = self.inits[name]
            elif name in self.inputs:
                raise NotRevertibleError(f"in the FP graph, {y!r} depends on graph input {name!r}, not only on {x!r}")
            else:
                raise NotRevertibleError(f"in the FP graph, {y!r} depends on {name!r}, which nothing produces")
        return [self.nodes[i] for i in sorted(nodes)], list(inits.values())


def revert_layer(quantized_model: onnx.ModelProto, reference_model: onnx.ModelProto,
                 node_name: str) -> onnx.ModelProto:
    """A copy of `quantized_model` with plugin node `node_name` replaced by the FP nodes computing it.

    The FP nodes (and the initializers they read, renamed where a name is taken by a different tensor) are
    inserted at the plugin node's position; its now unused constants and input ops (AWQ scaling, K padding)
    are dropped.

    Raises:
        NotRevertibleError: the node's output is not produced in the FP graph, or it depends on more than x.
        ValidationError: no plugin node of that name.
    """
    return _revert(quantized_model, _FPGraph(reference_model), node_name)


def _revert(quantized_model: onnx.ModelProto, fp: _FPGraph, node_name: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(quantized_model)
    graph = model.graph
    nodes = list(graph.node)
    index = next((i for i, n in enumerate(nodes) if n.name == node_name and _is_plugin(n)), None)
    if index is None:
        raise ValidationError(f"the quantized graph has no plugin node ({', '.join(t for _, t in PLUGINS)}) "
                              f"named {node_name!r}")
    region, x = _region(nodes[index], _producers(nodes), _constant_names(quantized_model))
    y = region[-1].output[0]
    fp_nodes, fp_inits = fp.subgraph(x, y)
    nodes.pop(index)
    for node in reversed(region[:-1]):  # input ops that fed only this layer
        if not {i for n in nodes for i in n.input} & set(node.output):
            nodes.remove(node)
            index -= 1
    dropped = {i for n in region for i in n.input[1:]}

    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used or t.name not in dropped]
    existing = {t.name: t for t in kept}
    taken = (set(existing) | {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
             | {o for n in nodes for o in n.output} | {n.name for n in nodes})
    rename: dict[str, str] = {}

    def fresh(name: str) -> str:
        new, k = f"{name}.fp", 1
        while new in taken:
            new, k = f"{name}.fp{k}", k + 1
        taken.add(new)
        return new

    added = []
    for t in fp_inits:
        if t.name in existing and existing[t.name].SerializeToString() == t.SerializeToString():
            continue  # the same tensor is already there (e.g. a weight shared with an FP op)
        if t.name in taken:
            rename[t.name] = fresh(t.name)
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = rename.get(t.name, t.name)
        added.append(copy)
        taken.add(copy.name)
    spliced = []
    for n in fp_nodes:
        for o in n.output:
            if o and o != y and o in taken:
                rename[o] = fresh(o)
            taken.add(rename.get(o, o))
        copy = onnx.NodeProto()
        copy.CopyFrom(n)
        copy.input[:] = [rename.get(i, i) for i in n.input]
        copy.output[:] = [rename.get(o, o) for o in n.output]
        if copy.name in taken:
            copy.name = fresh(copy.name)
        taken.add(copy.name)
        spliced.append(copy)

    del graph.node[:]
    graph.node.extend(nodes[:index] + spliced + nodes[index:])
    del graph.initializer[:]
    graph.initializer.extend(kept + added)
    logger.debug("reverted %s: %d FP nodes, %d initializers (%d renamed)", node_name, len(spliced), len(added),
                 len(rename))
    return model


def localize_layers(reference_model: onnx.ModelProto, quantized_model: onnx.ModelProto,
                    feeds_list: Iterable[dict[str, Any]], *, device: str = "cpu",
                    progress: Callable[[int, int], None] | None = None) -> list[LayerError]:
    """Rank the plugin layers (`PLUGINS`) of `quantized_model` by their contribution to the output error.

    Args:
        reference_model: the FP32 ONNX graph the quantized graph was built from (same tensor names).
        quantized_model: the plugin graph (`BuildResult.plugin_model`, or `quantized.onnx` of an engine).
        feeds_list: input feeds (name -> array), one per iteration; metrics are the worst over them.
        progress: called as progress(done, total) once per layer.
    Returns:
        One `LayerError` per plugin node, biggest contribution first (rank 1); not revertible last.
    """
    feeds = [{k: to_torch(v).to(device) for k, v in f.items()} for f in feeds_list]
    if not feeds:
        raise ValidationError("per-layer localization needs at least one input feed")
    plugins = _plugins(quantized_model)
    fp_graph = _FPGraph(reference_model)
    known = set(fp_graph.producer) | fp_graph.inputs
    capture = sorted({name for p in plugins if p.x in known and p.y in known for name in (p.x, p.y)})

    local: dict[str, list[dict]] = {p.node.name: [] for p in plugins}
    clipped = dict.fromkeys(local, 0)
    counted = dict.fromkeys(local, 0)
    reference_outputs = []
    with torch.no_grad():
        layers = {p.node.name: _layer_program(quantized_model, p).to(device) for p in plugins
                  if p.x in known and p.y in known}
        program = lower_onnx(reference_model).to(device)
        for feed in feeds:
            outputs, captured = program.run(feed, capture=capture)
            reference_outputs.append(_numpy(outputs))
            for p in plugins:
                if p.node.name not in layers:
                    continue
                out, seen = layers[p.node.name].run({p.x: captured[p.x]}, capture=[p.node.input[0]])
                local[p.node.name].append(compare_arrays(to_numpy(captured[p.y]), to_numpy(out[p.y])))
                if p.scales.x_max is not None:
                    x = seen[p.node.input[0]].float()
                    clipped[p.node.name] += int((torch.abs(x) > p.scales.x_max.to(x.device)).sum())
                    counted[p.node.name] += x.numel()
            del captured
        del layers
        del program
        base = _output_error(reference_outputs, _run(quantized_model, feeds, device))

        rows = []
        for done, p in enumerate(plugins, 1):
            name = p.node.name
            metrics = merge_iterations(local[name]) if local[name] else {}
            w_scale, x_scale = p.scales.w_scale.double(), p.scales.x_scale
            row = LayerError(name, module_of(p.node), p.fmt, metrics.get("cosine"), metrics.get("sqnr_db"),
                             metrics.get("max_abs"), clipped[name] / counted[name] if counted[name] else None,
                             None if x_scale is None else float(x_scale), float(w_scale.min()),
                             float(w_scale.max()), None, None, None)
            if not local[name]:
                row.note = f"{p.x!r} or {p.y!r} is not a tensor of the FP graph"
            try:
                variant = _revert(quantized_model, fp_graph, name)
            except NotRevertibleError as exc:
                row.revertible, row.note = False, str(exc)
                logger.info("layer %s is not revertible: %s", name, exc)
            else:
                reverted = _output_error(reference_outputs, _run(variant, feeds, device))
                row.reverted_cosine, row.reverted_sqnr_db = reverted["cosine"], reverted["sqnr_db"]
                row.contribution_db = _difference(reverted["sqnr_db"], base["sqnr_db"])
            rows.append(row)
            if progress is not None:
                progress(done, len(plugins))

    rows.sort(key=lambda r: (r.contribution_db is None or math.isnan(r.contribution_db), -(r.contribution_db or 0.0)))
    for rank, row in enumerate(rows, 1):
        row.rank = rank
    logger.info("localized %d layers; all-quantized output SQNR %.2f dB; worst: %s", len(rows), base["sqnr_db"],
                rows[0].node if rows else "-")
    return rows


def format_layer_table(rows: Iterable[LayerError | dict[str, Any]], top: int = 10) -> str:
    """The `top` worst offenders (rows from `localize_layers`, or their `to_dict()`) as a text table."""
    rows = [r.to_dict() if isinstance(r, LayerError) else dict(r) for r in rows]
    shown = sorted(rows, key=lambda r: r.get("rank") or math.inf)[:max(top, 0)]
    headers = ["rank", "node", "module", "format", "local cos", "local SQNR dB", "clip %", "x_scale",
               "contribution dB"]
    table = [(r["rank"], r["node"], r["module"] or "-", r["format"], _fmt(r["local_cosine"], ".5f"),
              _fmt(r["local_sqnr_db"], ".1f"), _fmt(None if r["clip_rate"] is None else 100 * r["clip_rate"], ".2f"),
              _fmt(r["x_scale"], ".3g"), _fmt(r["contribution_db"], "+.2f")) for r in shown]
    title = (f"Per-layer error: top {len(shown)} of {len(rows)} quantized layers by contribution "
             "(output SQNR gain when only that layer runs in FP)")
    return format_table(headers, table, title=title)


# --------------------------------------------------------------------------- helpers


@dataclass
class _Scales:
    """What a plugin node's constants say about its quantization."""

    w_scale: torch.Tensor                # the weight's scales as applied (an FP4 global scale folded in)
    x_scale: torch.Tensor | None = None  # static activation scale, else None (weight-only or dynamic)
    x_max: torch.Tensor | None = None    # largest |x| that scale represents: beyond it x clips (clip rate)


def _scaled_gemm(node: onnx.NodeProto, const: "_Constants") -> _Scales:
    """ScaledGemm (x, x_scale, x_zero, w_q, w_scale, bias): INT8/FP8 weight and static activation."""
    x_scale, _, w_q, w_scale, bias = (list(node.input[1:]) + [""] * 5)[:5]
    if not (x_scale and w_q and w_scale):
        raise ValidationError(f"{node.op_type} node {node.name!r} lacks x_scale, w_q or w_scale")
    if bias:
        const.onnx_type(bias)  # must be a constant too
    fmt = formats.format_of_onnx_dtype(const.onnx_type(w_q))
    if fmt not in ("int8", "fp8"):
        raise ValidationError(f"{node.op_type} node {node.name!r}: weight format {fmt} is not int8 or fp8")
    scale = const(x_scale).reshape(())
    return _Scales(const(w_scale), scale, scale * formats.qmax(fmt))


def _int4_gemm(node: onnx.NodeProto, const: "_Constants") -> _Scales:
    """Int4GroupwiseGemm (x, w_q, w_scale, w_zero_point, bias, x_scale): INT4 weight, FP or FP8 activation."""
    const.onnx_type(node.input[1])  # the weight must be a constant
    act_quant = next((a.s.decode() for a in node.attribute if a.name == "act_quant"), "none")  # none: W4A16
    if act_quant == "fp8_static" and len(node.input) > 5 and node.input[5]:
        scale = const(node.input[5]).reshape(())
        return _Scales(const(node.input[2]), scale, scale * formats.qmax("fp8"))
    return _Scales(const(node.input[2]))


def _fp4_gemm(node: onnx.NodeProto, const: "_Constants") -> _Scales:
    """Fp4Gemm (x, w_q, w_scale, w_global, bias) and Fp4GemmW4A4 (x, w_q, w_scale, w_global, x_global, bias).
    W4A4 quantizes x dynamically per 16 values, but a block scale saturates at E4M3's 448: |x| beyond
    6 * 448 * x_global clips."""
    const.onnx_type(node.input[1])
    w_scale = const(node.input[2]) * const(node.input[3]).reshape(())
    if node.op_type != fp4_schema.OP_TYPE_W4A4:
        return _Scales(w_scale)
    x_global = const(node.input[4]).reshape(())
    return _Scales(w_scale, x_global, x_global * fp4_format.E4M3_MAX * fp4_format.E2M1_MAX)


def _weight_scale_at(index: int) -> Callable[[onnx.NodeProto, "_Constants"], _Scales]:
    """A plugin whose only quantization constants are its weight w_q (input index - 1) and w_scale (index):
    weight-only, or activations quantized dynamically in the kernel (nothing static to clip)."""
    def describe(node: onnx.NodeProto, const: "_Constants") -> _Scales:
        const.onnx_type(node.input[index - 1])
        return _Scales(const(node.input[index]))
    return describe


# (domain, op type) -> fn(node, const) -> its scales; every plugin kind `layers.layer_table` lists
PLUGINS: dict[tuple[str, str], Callable[[onnx.NodeProto, "_Constants"], _Scales]] = {
    (onnx_schema.DOMAIN, onnx_schema.OP_TYPE): _scaled_gemm,
    (dynamic_schema.DOMAIN, dynamic_schema.OP_TYPE): _weight_scale_at(3),
    (int4_schema.DOMAIN, int4_schema.OP_TYPE): _int4_gemm,
    **{(fp4_schema.DOMAIN, op): _fp4_gemm for op in fp4_schema.OP_TYPES},
    (int8_wo_schema.DOMAIN, int8_wo_schema.OP_TYPE): _weight_scale_at(2),
    (fp8_block_schema.DOMAIN, fp8_block_schema.OP_TYPE): _weight_scale_at(2),
}
# the ops in front of a plugin node that belong to its layer (`_region`): AWQ's scaling of x by 1/s, and the
# zero padding of x's K to a multiple of the FP4 block
INPUT_RULES = (AWQ_SCALE_RULE, FOLD_RULE, PAD_K_RULE)


def _is_plugin(node: onnx.NodeProto) -> bool:
    return (node.domain, node.op_type) in PLUGINS


class _Constants:
    """The model's constants (initializers, Constant nodes) by name, as float32 torch tensors on request;
    `bind(node)` names the node whose operands are asked for in the error when one is not a constant."""

    def __init__(self, model: onnx.ModelProto):
        self.node = None
        self.protos = {t.name: t for t in model.graph.initializer}
        self.protos.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant" and not n.domain
                            for a in n.attribute if a.name == "value"})

    def bind(self, node: onnx.NodeProto) -> "_Constants":
        bound = copy.copy(self)
        bound.node = node
        return bound

    def onnx_type(self, name: str) -> int:
        return self._proto(name).data_type

    def __call__(self, name: str) -> torch.Tensor:
        return tensor_from_onnx(self._proto(name)).float()

    def _proto(self, name: str) -> onnx.TensorProto:
        if name not in self.protos:
            raise ValidationError(f"{self.node.op_type} node {self.node.name!r}: operand {name!r} is not a constant "
                                  "(its weights, scales and bias must be initializers)")
        return self.protos[name]


def _plugins(model: onnx.ModelProto) -> list[_Plugin]:
    """The plugin nodes of `model` with their layer regions and scales (float32, on the CPU)."""
    producer, constants, values = _producers(model.graph.node), _constant_names(model), _Constants(model)
    fmt = {row.node: row.format for row in layer_table(model)}
    plugins = []
    for node in model.graph.node:
        if not _is_plugin(node):
            continue
        scales = PLUGINS[(node.domain, node.op_type)](node, values.bind(node))
        region, x = _region(node, producer, constants)
        plugins.append(_Plugin(node, region, x, fmt.get(node.name, "?"), scales))
    if not plugins:
        raise ValidationError(f"the quantized graph has no plugin nodes ({', '.join(t for _, t in PLUGINS)}) "
                              "to localize")
    return plugins


def _producers(nodes: Iterable[onnx.NodeProto]) -> dict[str, onnx.NodeProto]:
    return {o: n for n in nodes for o in n.output if o}


def _constant_names(model: onnx.ModelProto) -> set[str]:
    return ({t.name for t in model.graph.initializer}
            | {n.output[0] for n in model.graph.node if n.op_type == "Constant" and not n.domain})


def _region(node: onnx.NodeProto, producer: dict[str, onnx.NodeProto], constants: set[str]
            ) -> tuple[list[onnx.NodeProto], str]:
    """(the input ops in front of plugin `node` (`INPUT_RULES`), then `node`; the tensor they start from)."""
    region, x = [node], node.input[0]
    while x in producer and _rule(producer[x]) in INPUT_RULES:
        inputs = [i for i in producer[x].input if i and i not in constants]
        if len(inputs) != 1:
            break
        region.insert(0, producer[x])
        x = inputs[0]
    return region, x


def _rule(node: onnx.NodeProto) -> str | None:
    return next((p.value for p in node.metadata_props if p.key == RULE_KEY), None)


def _layer_program(model: onnx.ModelProto, p: _Plugin):
    """The layer's region (input ops + plugin node) alone as a lowered program: x in, y out."""
    names = {i for n in p.region for i in n.input}
    constants = [n for n in model.graph.node if n.op_type == "Constant" and not n.domain and n.output[0] in names]
    graph = onnx.helper.make_graph(
        constants + p.region, f"layer_{p.node.name}",
        [onnx.helper.make_tensor_value_info(p.x, onnx.TensorProto.FLOAT, None)],
        [onnx.helper.make_tensor_value_info(p.y, onnx.TensorProto.FLOAT, None)],
        [t for t in model.graph.initializer if t.name in names])
    layer = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    layer.functions.extend(model.functions)
    return lower_onnx(layer)


def _run(model: onnx.ModelProto, feeds: list[dict[str, torch.Tensor]], device: str) -> list[dict[str, np.ndarray]]:
    """The outputs of `model` (lowered) for each feed, as numpy arrays."""
    program = lower_onnx(model).to(device)
    return [_numpy(program.run(feed)[0]) for feed in feeds]


def _output_error(reference: list[dict[str, np.ndarray]], actual: list[dict[str, np.ndarray]]) -> dict:
    """Worst-case metrics over the feeds and then over the outputs present in both."""
    names = [n for n in reference[0] if n in actual[0]]
    per_output = [merge_iterations([compare_arrays(r[n], a[n]) for r, a in zip(reference, actual)]) for n in names]
    return merge_iterations(per_output)


def _difference(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return 0.0 if a == b else a - b  # equal (also inf, inf): reverting the layer changed nothing


def _numpy(outputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in outputs.items()}


def _fmt(value: float | None, spec: str) -> str | None:
    return None if value is None else format(value, spec)
