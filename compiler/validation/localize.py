"""Per-layer error localization: which quantized layers of a plugin graph lose the accuracy.

For each `qcompile::ScaledGemm` node of the quantized (plugin) graph:

- *local error*: the layer alone, fed the FP input x it sees in the FP reference graph, against the FP
  output y (error not inherited from upstream layers); with its clip rate (fraction of x beyond the
  format's range at its scale) and scales;
- *contribution*: the gain in model-output SQNR (worst output, vs the FP reference) when only this layer
  runs in FP: the plugin node is replaced by the FP graph's nodes computing y from x (`revert_layer`).

Layers are ranked by contribution, worst offender first. Graphs run through `qcompile.lowering` (float32;
on CPU the plugin op is its exact torch reference); metrics are `compare_arrays`, worst over the feeds.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable

import numpy as np
import onnx
import torch

from qcompile.engine.load import to_numpy, to_torch
from qcompile.errors import ValidationError
from qcompile.layers import module_of
from qcompile.lowering import lower_onnx
from qcompile.lowering.interpreter import tensor_from_onnx
from qcompile.plugins import formats
from qcompile.plugins.scaled_gemm import onnx_schema, scaled_gemm_reference
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
    format: str                        # "int8" or "fp8"
    local_cosine: float | None         # layer fed the FP x, vs the FP y (None: x or y not in the FP graph)
    local_sqnr_db: float | None
    local_max_abs: float | None
    clip_rate: float | None            # fraction of x with |x / x_scale| > the format's max
    x_scale: float
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
    """A ScaledGemm node with its constant operands as torch tensors (the reference op's arguments)."""

    node: onnx.NodeProto
    fmt: str
    w_q: torch.Tensor
    w_scale: torch.Tensor
    x_scale: torch.Tensor
    bias: torch.Tensor | None

    @property
    def x(self) -> str:
        return self.node.input[0]

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
    """A copy of `quantized_model` with ScaledGemm node `node_name` replaced by the FP nodes computing it.

    The FP nodes (and the initializers they read, renamed where a name is taken by a different tensor) are
    inserted at the plugin node's position; its now unused constants are dropped.

    Raises:
        NotRevertibleError: the node's output is not produced in the FP graph, or it depends on more than x.
        ValidationError: no ScaledGemm node of that name.
    """
    return _revert(quantized_model, _FPGraph(reference_model), node_name)


def _revert(quantized_model: onnx.ModelProto, fp: _FPGraph, node_name: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(quantized_model)
    graph = model.graph
    nodes = list(graph.node)
    index = next((i for i, n in enumerate(nodes) if n.name == node_name and _is_plugin(n)), None)
    if index is None:
        raise ValidationError(f"the quantized graph has no {onnx_schema.OP_TYPE} node named {node_name!r}")
    plugin = nodes.pop(index)
    x, y = plugin.input[0], plugin.output[0]
    fp_nodes, fp_inits = fp.subgraph(x, y)

    used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used or t.name not in plugin.input[1:]]
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
    """Rank the ScaledGemm layers of `quantized_model` by their contribution to the output error.

    Args:
        reference_model: the FP32 ONNX graph the quantized graph was built from (same tensor names).
        quantized_model: the plugin graph (`BuildResult.plugin_model`, or `quantized.onnx` of an engine).
        feeds_list: input feeds (name -> array), one per iteration; metrics are the worst over them.
        progress: called as progress(done, total) once per layer.
    Returns:
        One `LayerError` per ScaledGemm node, biggest contribution first (rank 1); not revertible last.
    """
    feeds = [{k: to_torch(v).to(device) for k, v in f.items()} for f in feeds_list]
    if not feeds:
        raise ValidationError("per-layer localization needs at least one input feed")
    plugins = _plugins(quantized_model, device)
    fp_graph = _FPGraph(reference_model)
    known = set(fp_graph.producer) | fp_graph.inputs
    capture = sorted({name for p in plugins if p.x in known and p.y in known for name in (p.x, p.y)})

    local: dict[str, list[dict]] = {p.node.name: [] for p in plugins}
    clipped = dict.fromkeys(local, 0)
    counted = dict.fromkeys(local, 0)
    reference_outputs = []
    with torch.no_grad():
        program = lower_onnx(reference_model).to(device)
        for feed in feeds:
            outputs, captured = program.run(feed, capture=capture)
            reference_outputs.append(_numpy(outputs))
            for p in plugins:
                if p.x not in captured or p.y not in captured:
                    continue
                x = captured[p.x]
                y_q = scaled_gemm_reference(x, p.w_q, p.w_scale, p.x_scale, p.bias)
                local[p.node.name].append(compare_arrays(to_numpy(captured[p.y]), to_numpy(y_q)))
                clipped[p.node.name] += int((torch.abs(x.float() / p.x_scale) > formats.qmax(p.fmt)).sum())
                counted[p.node.name] += x.numel()
            del captured
        del program
        base = _output_error(reference_outputs, _run(quantized_model, feeds, device))

        rows = []
        for done, p in enumerate(plugins, 1):
            name = p.node.name
            metrics = merge_iterations(local[name]) if local[name] else {}
            w_scale = p.w_scale.double()
            row = LayerError(name, module_of(p.node), p.fmt, metrics.get("cosine"), metrics.get("sqnr_db"),
                             metrics.get("max_abs"), clipped[name] / counted[name] if counted[name] else None,
                             float(p.x_scale), float(w_scale.min()), float(w_scale.max()), None, None, None)
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


def _is_plugin(node: onnx.NodeProto) -> bool:
    return node.domain == onnx_schema.DOMAIN and node.op_type == onnx_schema.OP_TYPE


def _plugins(model: onnx.ModelProto, device: str) -> list[_Plugin]:
    """The ScaledGemm nodes of `model` with their constant operands on `device`."""
    consts = {t.name: t for t in model.graph.initializer}
    consts.update({n.output[0]: a.t for n in model.graph.node if n.op_type == "Constant" and not n.domain
                   for a in n.attribute if a.name == "value"})
    plugins = []
    for node in model.graph.node:
        if not _is_plugin(node):
            continue
        x_scale, _, w_q, w_scale, bias = (list(node.input[1:]) + [""] * 5)[:5]
        missing = next((n for n in (x_scale, w_q, w_scale, bias) if n and n not in consts), None)
        if missing is not None or not (x_scale and w_q and w_scale):
            raise ValidationError(f"{onnx_schema.OP_TYPE} node {node.name!r}: operand {missing!r} is not a "
                                  "constant (x_scale, w_q, w_scale and bias must be initializers)")
        fmt = formats.format_of_onnx_dtype(consts[w_q].data_type)
        if fmt not in ("int8", "fp8"):
            raise ValidationError(f"{onnx_schema.OP_TYPE} node {node.name!r}: weight format {fmt} is not int8 or fp8")
        ws = tensor_from_onnx(consts[w_scale]).float()
        plugins.append(_Plugin(
            node, fmt, tensor_from_onnx(consts[w_q]).to(device),
            (ws.reshape(()) if ws.numel() == 1 else ws).to(device),
            tensor_from_onnx(consts[x_scale]).float().reshape(()).to(device),
            tensor_from_onnx(consts[bias]).float().to(device) if bias else None))
    if not plugins:
        raise ValidationError(f"the quantized graph has no {onnx_schema.OP_TYPE} nodes to localize")
    return plugins


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
