"""`OnnxProgram`: an nn.Module that runs an ONNX graph by calling one torch function per node.

`torch.export` traces `forward` into an aten graph; each node's call is annotated with its ONNX
node name (`meta["custom"]["onnx_node"]`) so per-layer tools can map aten nodes back.
"""
from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from qcompile.errors import LoweringError
from qcompile.lowering.registry import NodeContext, get_converter
from qcompile.lowering.values import IntList, as_tensor, is_static_int

logger = logging.getLogger(__name__)

# Model-local functions lowered as one node (a converter exists), never inlined.
KEEP_FUNCTION_DOMAINS = ("qcompile",)


def tensor_from_onnx(tensor: onnx.TensorProto, base_dir: str | None = None) -> torch.Tensor:
    """An initializer as a torch tensor: fp8 as float8_e4m3fn, int4/uint4 as int8/uint8 values."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL and base_dir:
        onnx.external_data_helper.load_external_data_for_tensor(tensor, base_dir)
    array = numpy_helper.to_array(tensor)
    if tensor.data_type == onnx.TensorProto.FLOAT8E4M3FN:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint8)).view(torch.float8_e4m3fn)
    if tensor.data_type == onnx.TensorProto.FLOAT8E5M2:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint8)).view(torch.float8_e5m2)
    if tensor.data_type in (onnx.TensorProto.INT4,):
        return torch.from_numpy(array.astype(np.int8))
    if tensor.data_type in (onnx.TensorProto.UINT4,):
        return torch.from_numpy(array.astype(np.uint8))
    if tensor.data_type == onnx.TensorProto.BFLOAT16:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.uint16)).view(torch.bfloat16)
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

    def __init__(self, model: onnx.ModelProto, *, compute_dtype: torch.dtype | None = None,
                 base_dir: str | None = None):
        super().__init__()
        import qcompile.lowering.ops  # noqa: F401  (registers the converters)

        model = _inline_functions(model)
        graph = model.graph
        self.opsets = {o.domain or "": o.version for o in model.opset_import}
        self.compute_dtype = compute_dtype
        init_names = {t.name for t in graph.initializer}
        self.input_names = [v.name for v in graph.input if v.name not in init_names]
        self.output_names = [v.name for v in graph.output]
        self._output_dtypes = {v.name: _torch_dtype(v.type.tensor_type.elem_type) for v in graph.output}
        self._input_dtypes = {v.name: _torch_dtype(v.type.tensor_type.elem_type) for v in graph.input}

        self._static: dict[str, Any] = {}
        self._buffer_of: dict[str, str] = {}
        for tensor in graph.initializer:
            self._add_constant(tensor.name, tensor_from_onnx(tensor, base_dir))
        self._nodes = []
        inits = {t.name: t for t in graph.initializer}
        elem_types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info]}
        elem_types.update({t.name: t.data_type for t in graph.initializer})
        for index, node in enumerate(graph.node):
            domain = node.domain if node.domain != "ai.onnx" else ""
            opset = self.opsets.get(domain, 1)
            name = node.name or f"{node.op_type}_{index}"
            converter = get_converter(domain, node.op_type, opset, name)
            ctx = NodeContext(name, node.op_type, {a.name: _attr_value(a) for a in node.attribute},
                              len(node.output), opset, compute_dtype)
            ctx.extra["initializers"] = {i: inits[n] for i, n in enumerate(node.input) if n in inits}
            ctx.extra["input_types"] = [elem_types.get(n) for n in node.input]
            self._nodes.append((ctx, converter, list(node.input), list(node.output)))
        self._known = init_names | set(self.input_names) | {o for n in graph.node for o in n.output}

    def _add_constant(self, name: str, value: torch.Tensor) -> None:
        if is_static_int(value.numpy() if value.dtype in (torch.int64, torch.int32, torch.bool) else np.zeros((2, 2))):
            self._static[name] = IntList.from_numpy(value.numpy())
            return
        buffer = "c_" + re.sub(r"\W", "_", name)
        while hasattr(self, buffer):
            buffer += "_"
        self.register_buffer(buffer, value, persistent=True)
        self._buffer_of[name] = buffer

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
        env: dict[str, Any] = dict(self._static)
        for name, buffer in self._buffer_of.items():
            env[name] = getattr(self, buffer)
        for name in self.input_names:
            env[name] = self._to_compute(feeds[name])
        wanted = set(capture)
        captured = {n: env[n] for n in wanted if n in env}
        for ctx, converter, input_names, output_names in self._nodes:
            args = [env[i] if i else None for i in input_names]
            with _annotate(ctx.name):
                try:
                    result = converter(ctx, *args)
                except LoweringError:
                    raise
                except Exception as exc:
                    raise LoweringError(f"node {ctx.name!r} ({ctx.op_type}) failed: {type(exc).__name__}: {exc}") from exc
            results = result if isinstance(result, (tuple, list)) else (result,)
            for name, value in zip(output_names, results):
                if name:
                    env[name] = self._to_compute(value)
                    if name in wanted:
                        captured[name] = env[name]
        outputs = {}
        for name in self.output_names:
            value = as_tensor(env[name])
            dtype = self._output_dtypes.get(name)
            if dtype is not None and isinstance(value, torch.Tensor) and value.dtype != dtype:
                value = value.to(dtype)
            outputs[name] = value
        captured = {k: as_tensor(v) for k, v in captured.items()}
        return outputs, captured

    def _to_compute(self, value: Any) -> Any:
        if (self.compute_dtype is not None and isinstance(value, torch.Tensor) and value.dtype.is_floating_point
                and value.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)):
            return value.to(self.compute_dtype)
        return value


def _torch_dtype(elem_type: int) -> torch.dtype | None:
    if not elem_type:
        return None
    if elem_type == onnx.TensorProto.BFLOAT16:
        return torch.bfloat16
    if elem_type == onnx.TensorProto.FLOAT8E4M3FN:
        return torch.float8_e4m3fn
    try:
        return torch.from_numpy(np.zeros(0, helper.tensor_dtype_to_np_dtype(elem_type))).dtype
    except (TypeError, KeyError, ValueError):
        return None


def _inline_functions(model: onnx.ModelProto) -> onnx.ModelProto:
    others = [(f.domain, f.name) for f in model.functions if f.domain not in KEEP_FUNCTION_DOMAINS]
    if not others:
        return model
    import onnx.inliner

    return onnx.inliner.inline_selected_functions(model, others)


def lower_onnx(model: onnx.ModelProto | str | Path, *, compute_dtype: torch.dtype | None = None) -> OnnxProgram:
    """Lower an ONNX model (proto or path) to an `OnnxProgram` (a torch.nn.Module).

    Args:
        model: the ONNX model, or the path of an .onnx file (external data next to it is read).
        compute_dtype: run floating-point math in this dtype (e.g. torch.float16); outputs keep
            their declared ONNX dtype. None keeps the graph's own dtypes.
    Raises:
        LoweringError: an op has no converter (names node, op, domain and opset).
    """
    base_dir = None
    if isinstance(model, (str, Path)):
        path = Path(model)
        base_dir = str(path.parent)
        model = onnx.load(str(path), load_external_data=True)
    return OnnxProgram(model, compute_dtype=compute_dtype, base_dir=base_dir)
