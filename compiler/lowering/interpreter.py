"""`OnnxProgram`: an nn.Module that runs an ONNX graph by calling one torch function per node.

`torch.export` traces `forward` into an aten graph; each node's call is annotated with its ONNX
node name (`meta["custom"]["onnx_node"]`) so per-layer tools can map aten nodes back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from qcompile.errors import LoweringError
from qcompile.lowering.ops.dtypes import onnx_to_torch_dtype
from qcompile.lowering.options import LoweringOptions
from qcompile.lowering.registry import NodeContext, get_converter, has_converter, prepare_hook
from qcompile.lowering.values import IntList, as_tensor, is_static_int

logger = logging.getLogger(__name__)

# Inputs that hold quantization scales: kept in float32 under a compute dtype (fp16 would round
# them and flush tiny ones to zero). (domain, op_type) -> input indices.
SCALE_INPUTS = {("", "QuantizeLinear"): (1,), ("", "DequantizeLinear"): (1,), ("qcompile", "ScaledGemm"): (1, 4),
                ("qcompile", "Int4GroupwiseGemm"): (5,),
                ("qcompile", "Fp4Gemm"): (2, 3), ("qcompile", "Fp4GemmW4A4"): (2, 3, 4)}
SCALE_INPUTS.update({("qcompile", "Int8WeightOnlyGemm"): (2,), ("qcompile", "Fp8BlockGemm"): (2,)})
_COMPUTE_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def tensor_from_onnx(tensor: onnx.TensorProto, base_dir: str | None = None) -> torch.Tensor:
    """An initializer as a torch tensor: fp8 as float8_e4m3fn, int4/uint4 as int8/uint8 values, fp4 as float32."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL and base_dir:
        onnx.external_data_helper.load_external_data_for_tensor(tensor, base_dir)
    array = numpy_helper.to_array(tensor)  # read-only when it views raw_data: C + W copies it then
    if tensor.data_type == onnx.TensorProto.FLOAT8E4M3FN:
        return torch.from_numpy(np.require(array, requirements="CW").view(np.uint8)).view(torch.float8_e4m3fn)
    if tensor.data_type == onnx.TensorProto.FLOAT8E5M2:
        return torch.from_numpy(np.require(array, requirements="CW").view(np.uint8)).view(torch.float8_e5m2)
    if tensor.data_type == onnx.TensorProto.FLOAT4E2M1:  # held as its float values (exact)
        return torch.from_numpy(array.astype(np.float32))
    if tensor.data_type in (onnx.TensorProto.INT4,):
        return torch.from_numpy(array.astype(np.int8))
    if tensor.data_type in (onnx.TensorProto.UINT4,):
        return torch.from_numpy(array.astype(np.uint8))
    if tensor.data_type == onnx.TensorProto.BFLOAT16:
        return torch.from_numpy(np.require(array, requirements="CW").view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _attr_value(attr: onnx.AttributeProto) -> Any:
    if attr.type == onnx.AttributeProto.TENSOR:
        return tensor_from_onnx(attr.t)
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value


def _annotate(node_name: str):
    annotate = getattr(torch.fx.traceback, "annotate", None)
    return annotate({"onnx_node": node_name}) if annotate is not None else contextlib.nullcontext()


class OnnxProgram(torch.nn.Module):
    """Runs an ONNX model with torch. forward(*inputs in graph order) -> tuple of outputs in graph order."""

    def __init__(self, model: onnx.ModelProto, *, options: LoweringOptions = LoweringOptions(),
                 base_dir: str | None = None):
        super().__init__()
        import qcompile.lowering.ops  # noqa: F401  (registers the converters)

        model = _inline_functions(model)
        self.opsets = {(o.domain if o.domain != "ai.onnx" else ""): o.version for o in model.opset_import}
        self.options = options
        self._lower(model.graph, base_dir)

    def _lower(self, graph: onnx.GraphProto, base_dir: str | None) -> None:
        """Prepare the graph's nodes once: converters, constants (static values or buffers), lowered subgraphs."""
        nodes = _toposort(graph)
        init_names = {t.name for t in graph.initializer}
        self.input_names = [v.name for v in graph.input if v.name not in init_names]
        self.output_names = [v.name for v in graph.output]
        self._output_dtypes = {v.name: _torch_dtype(v.type.tensor_type.elem_type) for v in graph.output}
        self._keep_fp32 = {n.input[i] for n in nodes for i in SCALE_INPUTS.get((_domain(n), n.op_type), ())
                           if i < len(n.input) and n.input[i]}

        self._static: dict[str, Any] = {}
        self._buffer_of: dict[str, str] = {}
        constants = {t.name: self._compute_value(t.name, tensor_from_onnx(t, base_dir)) for t in graph.initializer}
        self._nodes = []
        inits = {t.name: t for t in graph.initializer}
        elem_types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
        elem_types.update({t.name: t.data_type for t in graph.initializer})
        replaced: set[str] = set()
        for index, node in enumerate(nodes):
            domain = _domain(node)
            opset = self.opsets.get(domain, 1)
            name = node.name or f"{node.op_type}_{index}"
            converter = get_converter(domain, node.op_type, opset, name)
            ctx = NodeContext(name, node.op_type, {a.name: _attr_value(a) for a in node.attribute},
                              len(node.output), opset, self.options, domain=domain)
            ctx.extra["initializers"] = {i: inits[n] for i, n in enumerate(node.input) if n in inits}
            ctx.extra["input_types"] = [elem_types.get(n) for n in node.input]
            ctx.extra["input_names"] = list(node.input)
            self._lower_subgraphs(node, ctx)
            if node.op_type == "ConstantOfShape" and isinstance(ctx.attr("value"), torch.Tensor):
                ctx.extra["fill"] = ctx.attr("value").reshape(-1)[0].item()  # read now: no data access in forward
            if node.op_type == "Constant" and not domain:  # evaluated once here, outside any tracing
                constants[node.output[0]] = self._compute_value(node.output[0], converter(ctx))
                continue
            inputs, prepared = self._prepare(ctx, converter, list(node.input), constants)
            replaced |= set(node.input) - set(inputs)
            self._nodes.append((ctx, converter, inputs, list(node.output), prepared))
        # constants only a prepare hook read (e.g. an ONNX int4 weight, replaced by its engine layout) are dropped
        read = {n for _, _, inputs, _, _ in self._nodes for n in inputs} | set(self.output_names)
        read |= {n for ctx, *_ in self._nodes for n in ctx.extra.get("outer_names", ())}
        for name, value in constants.items():
            if name in read or name not in replaced:
                self._add_constant(name, value)
        self._known = (init_names | set(self.input_names) | {o for n in nodes for o in n.output if o}) - \
            (replaced - read)
        logger.debug("lowered %d nodes, %d buffers, %d static constants", len(self._nodes), len(self._buffer_of),
                     len(self._static))

    def _lower_subgraphs(self, node: onnx.NodeProto, ctx: NodeContext) -> None:
        """Lower the node's GRAPH attributes once, as child programs (their constants are buffers of this module):
        `ctx.attr(name)` is then a `SubgraphProgram`, and `ctx.extra["outer_names"]` the enclosing values they read,
        which the converter gets as `outer={name: value}`."""
        graphs = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
        if not graphs:
            return
        for key, graph in graphs.items():
            child = SubgraphProgram(graph, self)
            self.add_module(self._free_attribute(f"g_{ctx.name}_{key}"), child)
            ctx.attrs[key] = child
        ctx.extra["outer_names"] = _outer_names_of(node)

    def _compute_value(self, name: str, value: Any) -> Any:
        """A constant as the program holds it: float data in the compute dtype unless it is a scale."""
        return value if name in self._keep_fp32 else self._to_compute(value)

    def _prepare(self, ctx: NodeContext, converter, inputs: list[str], constants: dict) -> tuple[list[str], Any]:
        """Run the converter's prepare hook (if any) on the node's constant inputs: (the inputs the converter
        still reads, "" for replaced ones; {key: buffer name} of the prepared constants, or None)."""
        hook = prepare_hook(converter)
        if hook is None:
            return inputs, None
        given = {i: constants[n] for i, n in enumerate(inputs)
                 if n in constants and isinstance(constants[n], torch.Tensor)}
        try:
            prepared = hook(ctx, given)
        except LoweringError:
            raise
        except Exception as exc:
            raise ctx.fail(f"preparing its constants failed: {type(exc).__name__}: {exc}") from exc
        if prepared is None:
            return inputs, None
        buffers = {key: self._register(f"{ctx.name}/{key}", value)
                   for key, value in prepared.constants.items() if value is not None}
        return ["" if i in prepared.replaces else n for i, n in enumerate(inputs)], buffers

    def _add_constant(self, name: str, value: Any) -> None:
        """A constant the nodes read: small int data as a static IntList, anything else as a buffer."""
        if isinstance(value, IntList):
            self._static[name] = value
        elif is_static_int(value.numpy() if value.dtype in (torch.int64, torch.int32, torch.bool) else np.zeros((2, 2))):
            self._static[name] = IntList.from_numpy(value.numpy())
        else:
            self._buffer_of[name] = self._register(name, value)

    def _register(self, name: str, value: torch.Tensor) -> str:
        """Register `value` as a persistent buffer named after `name`; returns the buffer's attribute name."""
        buffer = self._free_attribute("c_" + name)
        self.register_buffer(buffer, value, persistent=True)
        return buffer

    def _free_attribute(self, name: str) -> str:
        """`name` made an identifier that no attribute of this module has yet."""
        name = re.sub(r"\W", "_", name)
        while hasattr(self, name):
            name += "_"
        return name

    def forward(self, *inputs: torch.Tensor) -> tuple:
        if len(inputs) != len(self.input_names):
            raise LoweringError(f"expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        outputs, _ = self._execute(dict(zip(self.input_names, inputs)), ())
        return tuple(outputs[n] for n in self.output_names)

    def run(self, feeds: dict[str, torch.Tensor], capture: Iterable[str] = ()) -> tuple[dict, dict]:
        """Run on named feeds; returns (outputs by name, captured intermediate tensors by name)."""
        capture = list(capture)
        unknown = [c for c in capture if c not in self._known]
        if unknown:
            raise LoweringError(f"cannot capture {unknown[0]!r}: the graph has no value of that name")
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise LoweringError(f"missing graph input {missing[0]!r}; the graph inputs are {self.input_names}")
        return self._execute(feeds, capture)

    def _execute(self, feeds: dict, capture: Iterable[str]) -> tuple[dict, dict]:
        device = self._device_of(feeds)
        # tensors that converters create (shape data made tensors, Range, ConstantOfShape, ...) go to the
        # device the graph runs on; CPU needs no mode (it is torch's default)
        with torch.device(device) if device.type != "cpu" else contextlib.nullcontext():
            return self._execute_nodes(feeds, capture)

    def _device_of(self, feeds: dict) -> torch.device:
        """The device of the first tensor input (else of the constants, else CPU)."""
        for value in [*feeds.values(), *self.buffers()]:
            if isinstance(value, torch.Tensor):
                return value.device
        return torch.device("cpu")

    def _execute_nodes(self, feeds: dict, capture: Iterable[str]) -> tuple[dict, dict]:
        env = self._environment(feeds)
        wanted = set(capture)
        captured = {n: env[n] for n in wanted if n in env}
        self._run_nodes(env, wanted, captured)
        outputs = {}
        for name in self.output_names:
            value = as_tensor(env[name])
            dtype = self._output_dtypes.get(name)
            if dtype is not None and isinstance(value, torch.Tensor) and value.dtype != dtype:
                value = value.to(dtype)
            outputs[name] = value
        captured = {k: as_tensor(v) for k, v in captured.items()}
        return outputs, captured

    def _environment(self, feeds: dict) -> dict[str, Any]:
        """The values before the first node: static constants, buffers and the graph inputs."""
        env: dict[str, Any] = dict(self._static)
        for name, buffer in self._buffer_of.items():
            env[name] = getattr(self, buffer)
        for name in self.input_names:
            env[name] = self._to_compute(feeds[name])
        return env

    def _run_nodes(self, env: dict, wanted: set, captured: dict) -> None:
        """Run every node on `env` (adding their outputs to it; those in `wanted` also to `captured`)."""
        for ctx, converter, input_names, output_names, prepared in self._nodes:
            args = [env[i] if i else None for i in input_names]
            kwargs = {} if prepared is None else {"prepared": {k: getattr(self, b) for k, b in prepared.items()}}
            if "outer_names" in ctx.extra:
                kwargs["outer"] = {n: env[n] for n in ctx.extra["outer_names"]}
            with _annotate(ctx.name):
                try:
                    result = converter(ctx, *args, **kwargs)
                except LoweringError:
                    raise
                except Exception as exc:
                    raise LoweringError(f"node {ctx.name!r} ({ctx.op_type}) failed: {type(exc).__name__}: {exc}") from exc
            results = result if isinstance(result, (tuple, list)) else (result,)
            for name, value in zip(output_names, results):
                if name:
                    env[name] = value if name in self._keep_fp32 else self._to_compute(value)
                    if name in wanted:
                        captured[name] = env[name]

    def _to_compute(self, value: Any) -> Any:
        dtype = self.options.compute_dtype
        if dtype is not None and getattr(value, "dtype", None) in _COMPUTE_FLOATS:
            if isinstance(value, IntList):
                return IntList(value.values, value.scalar, dtype)
            return value.to(dtype)
        return value


class SubgraphProgram(OnnxProgram):
    """A GRAPH attribute (an If branch, a Loop or Scan body) lowered once, as a child module of the program holding
    its node. `call(inputs, outer)` runs it on its formal inputs; the names it reads from enclosing graphs
    (`outer_names`) come from `outer`."""

    def __init__(self, graph: onnx.GraphProto, parent: OnnxProgram):
        torch.nn.Module.__init__(self)
        self.opsets, self.options = parent.opsets, parent.options
        self.outer_names = _outer_names(graph)
        self._lower(graph, None)

    def call(self, inputs: list, outer: dict) -> list:
        """The graph's outputs (tensors or static values) for its inputs in order and the enclosing values."""
        if len(inputs) != len(self.input_names):
            raise LoweringError(f"subgraph inputs {self.input_names}, got {len(inputs)} values")
        env = {n: outer[n] for n in self.outer_names}
        env.update(self._environment(dict(zip(self.input_names, inputs))))
        self._run_nodes(env, set(), {})
        return [env[n] for n in self.output_names]

    def output_dtype(self, index: int) -> torch.dtype | None:
        """The declared dtype of output `index` (None when the graph does not say)."""
        return self._output_dtypes.get(self.output_names[index])


def _outer_names(graph: onnx.GraphProto) -> list[str]:
    """The names a (sub)graph, its nested subgraphs included, reads without defining them (outer-scope values)."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    defined |= {o for n in graph.node for o in n.output}
    read = [name for n in graph.node for name in [*n.input, *_outer_names_of(n)]] + [v.name for v in graph.output]
    return list(dict.fromkeys(n for n in read if n and n not in defined))


def _outer_names_of(node: onnx.NodeProto) -> list[str]:
    """The enclosing values a node's subgraphs read (implicit inputs of If, Loop, Scan)."""
    return list(dict.fromkeys(n for a in node.attribute if a.type == onnx.AttributeProto.GRAPH
                              for n in _outer_names(a.g)))


def _domain(node: onnx.NodeProto) -> str:
    return "" if node.domain == "ai.onnx" else node.domain


def _torch_dtype(elem_type: int) -> torch.dtype | None:
    if not elem_type:
        return None
    try:
        return onnx_to_torch_dtype(elem_type)
    except ValueError:
        return None


def _toposort(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes in a topological order (stable: already sorted graphs keep their order)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    users: dict[int, list[int]] = {}
    pending = []
    for i, node in enumerate(graph.node):
        deps = {producer[x] for x in [*node.input, *_outer_names_of(node)] if x in producer and producer[x] != i}
        pending.append(len(deps))
        for d in deps:
            users.setdefault(d, []).append(i)
    ready = [i for i, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(graph.node[i])
        for u in users.get(i, ()):
            pending[u] -= 1
            if pending[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(graph.node):
        stuck = next(n for i, n in enumerate(graph.node) if pending[i] > 0)
        raise LoweringError(f"the graph has a cycle (or a node reading its own output) at node {stuck.name!r} "
                            f"({stuck.op_type}); fix the model")
    return order


def _inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline the model-local functions that have no converter (those with one are lowered as one node)."""
    others = [(f.domain, f.name) for f in model.functions if not has_converter(f.domain, f.name)]
    if not others:
        return model
    import onnx.inliner

    logger.debug("inlining model-local functions %s", others)
    return onnx.inliner.inline_selected_functions(model, others)


def lower_onnx(model: onnx.ModelProto | str | Path, options: LoweringOptions | None = None,
               **fields) -> OnnxProgram:
    """Lower an ONNX model (proto or path) to an `OnnxProgram` (a torch.nn.Module).

    Args:
        model: the ONNX model, or the path of an .onnx file (external data next to it is read).
        options: how to lower (`LoweringOptions`: compute dtype, FP8 above 128 rows, FP4 weight layout); default
            the graph's own dtypes, exact GEMMs, FP4 bytes.
        **fields: `LoweringOptions` fields that replace those of `options`, e.g. `compute_dtype=torch.float64`.
    Raises:
        LoweringError: an op has no converter (names node, op, domain and opset).
    """
    base_dir = None
    if isinstance(model, (str, Path)):
        path = Path(model)
        base_dir = str(path.parent)
        model = onnx.load(str(path), load_external_data=True)
    options = dataclasses.replace(options or LoweringOptions(), **fields)
    return OnnxProgram(model, options=options, base_dir=base_dir)
