"""Converter registry: (domain, op_type, since_version) -> a function that lowers one ONNX node.

A converter is `fn(ctx: NodeContext, *inputs) -> output | tuple[output, ...]`. Inputs are
`torch.Tensor`s, `IntList`s (small int64 data kept as Python values: shapes, axes, indices) or
None for absent optional inputs. For a node at opset `v`, the op's since-version `s` is resolved
with `onnx.defs.get_schema(op, max_inclusive_version=v, domain=...)` (custom domains: `s = v`) and
the converter with the largest `since <= s` is used: a converter registered `since=13` covers the
op's versions from 13 until the next registered one.

A converter may come with a `prepare` hook, called once per node when the graph is lowered (not in
`forward`) with the node's constant inputs (initializers and Constant outputs, by input index). It returns
a `Prepared`: constants derived from them (e.g. a weight in a kernel's layout), which the interpreter holds
as buffers and hands to the converter as `prepared={name: tensor}`, and the input indices the converter then
no longer reads (passed as None; their initializers are dropped when no other node reads them). It returns
None when it cannot prepare (e.g. the weight is computed in the graph): the converter then gets its inputs as
usual and `prepared=None`. Work done in a hook is not traced, so it is not repeated by exported programs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import onnx.defs
import torch
from onnx import numpy_helper

from qcompile.errors import LoweringError
from qcompile.lowering.options import LoweringOptions

logger = logging.getLogger(__name__)

Converter = Callable[..., Any]
_REGISTRY: dict[tuple[str, str], dict[int, Converter]] = {}


@dataclass(frozen=True)
class Prepared:
    """What a `prepare` hook derived once: `constants` (None values are left out of `prepared=`) and the
    input indices the converter no longer reads (`replaces`)."""

    constants: dict[str, torch.Tensor | None]
    replaces: tuple[int, ...] = ()


Prepare = Callable[["NodeContext", dict[int, torch.Tensor]], "Prepared | None"]
_PREPARE: dict[Converter, Prepare] = {}


def read_float_constants(*slots: tuple[int, str], scalar: bool = False) -> Prepare:
    """A prepare hook storing the constant inputs at `slots` ((index, key) pairs) in `ctx.extra[key]` as lists of
    Python floats (read from the initializer when there is one: exact even under a compute dtype); the converter
    then gets None for them. `scalar`: only 0-d float constants are read, others stay inputs."""

    def hook(ctx, constants: dict) -> Prepared | None:
        initializers = ctx.extra.get("initializers", {})
        read = []
        for index, key in slots:
            if index in initializers:
                value = numpy_helper.to_array(initializers[index])
            elif index in constants and constants[index].dtype.is_floating_point:
                value = constants[index].double().numpy()
            else:
                continue
            if scalar and (value.ndim != 0 or value.dtype.kind != "f"):
                continue
            ctx.extra[key] = [float(v) for v in value.reshape(-1)]
            read.append(index)
        return Prepared({}, tuple(read)) if read else None

    return hook


def register_converter(op_type: str, since: int = 1, domain: str = "",
                       prepare: Prepare | None = None) -> Callable[[Converter], Converter]:
    """Decorator registering `fn` for `domain::op_type` from opset `since` on (with an optional
    `prepare` hook, see the module docstring; the converter then takes a `prepared=` keyword)."""

    def wrap(fn: Converter) -> Converter:
        _REGISTRY.setdefault((domain, op_type), {})[since] = fn
        if prepare is not None:
            _PREPARE[fn] = prepare
        return fn

    return wrap


def prepare_hook(converter: Converter) -> Prepare | None:
    """The `prepare` hook registered with `converter`, if any."""
    return _PREPARE.get(converter)


def schema_since(domain: str, op_type: str, opset: int) -> int:
    """The since-version of `domain::op_type` at `opset` (the opset itself for ops without a schema)."""
    try:
        return onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain=domain).since_version
    except onnx.defs.SchemaError:
        return opset


def get_converter(domain: str, op_type: str, opset: int, node_name: str = "?") -> Converter:
    """The converter for `domain::op_type` at `opset`; LoweringError names the node when there is none."""
    import qcompile.lowering.ops  # noqa: F401  (registers the converters)

    domain = "" if domain == "ai.onnx" else domain
    versions = _REGISTRY.get((domain, op_type), {})
    since = schema_since(domain, op_type, opset)
    eligible = [v for v in versions if v <= since]
    if not eligible:
        known = f" (converters exist from opset {min(versions)})" if versions else ""
        raise LoweringError(
            f"cannot lower node {node_name!r}: op {op_type!r} of domain {domain or 'ai.onnx'!r} at opset {opset} "
            f"is not supported{known}; rewrite the model without it (or export it at a supported opset), or add a "
            f"converter with qcompile.lowering.register_converter({op_type!r}, since={since}, domain={domain!r})"
        )
    return versions[max(eligible)]


def has_converter(domain: str, op_type: str) -> bool:
    """Whether any converter exists for `domain::op_type` (of any version)."""
    import qcompile.lowering.ops  # noqa: F401

    return bool(_REGISTRY.get(("" if domain == "ai.onnx" else domain, op_type)))


def supported_ops() -> list[tuple[str, str]]:
    """(domain, op_type) of every op with a converter."""
    import qcompile.lowering.ops  # noqa: F401  (registers the converters)

    return sorted(_REGISTRY)


@dataclass
class NodeContext:
    """What a converter may know about the node it lowers."""

    name: str
    op_type: str
    attrs: dict[str, Any]
    num_outputs: int
    opset: int
    options: LoweringOptions = LoweringOptions()
    extra: dict = field(default_factory=dict)
    domain: str = ""

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return self.options.compute_dtype

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def float_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """`dtype`, or the compute dtype when one is set and `dtype` is floating point."""
        if self.compute_dtype is not None and dtype.is_floating_point and dtype.itemsize >= 2 \
                and dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            return self.compute_dtype
        return dtype

    def fail(self, what: str) -> LoweringError:
        return LoweringError(f"cannot lower node {self.name!r} (op {self.op_type!r}, domain "
                             f"{self.domain or 'ai.onnx'!r}, opset {self.opset}): {what}")
