"""The ONNX form of plugin nodes, shared by every plugin's `onnx_schema`: the node (with its arity check), its
model-local function body, and declaring both in a model."""
from __future__ import annotations

from typing import Callable, Sequence

import onnx
from onnx import helper

# The attributes every plugin node carries (TensorRT's ONNX parser reads them); function bodies declare them.
PLUGIN_ATTRIBUTES = ("plugin_version", "plugin_namespace")


def make_plugin_node(domain: str, op_type: str, input_names: Sequence[str], name: str, inputs: Sequence[str],
                     outputs: Sequence[str], attrs: dict, required: int | None = None) -> onnx.NodeProto:
    """A `domain::op_type` NodeProto with attributes `attrs`, after checking its arity against the contract.

    Args:
        input_names: the contract's inputs, in order.
        inputs, outputs: the node's tensor names; exactly one output.
        required: None: every input of `input_names` is given (names may be ""); a number: the first `required`
            inputs are given and not empty, the optional rest may be left off or "".

    Raises:
        ValueError: the inputs or outputs do not fit the contract (the message names the contract's inputs).
    """
    if required is None:
        fits = len(inputs) == len(input_names)
    else:
        fits = required <= len(inputs) <= len(input_names) and all(inputs[:required])
    if not fits or len(outputs) != 1:
        which = "" if required is None else f" (the first {_count(required)} required)"
        raise ValueError(f"{op_type} takes inputs {tuple(input_names)}{which} and one output")
    return helper.make_node(op_type, list(inputs), list(outputs), name=name, domain=domain, **attrs)


def make_plugin_function(domain: str, op_type: str, input_names: Sequence[str], output_names: Sequence[str],
                         body: list[onnx.NodeProto], opset: int, attributes: Sequence[str] = PLUGIN_ATTRIBUTES,
                         attribute_protos: Sequence[onnx.AttributeProto] = ()) -> onnx.FunctionProto:
    """The model-local function `domain::op_type(input_names) -> output_names` computing `body` in the default
    domain at `opset`; `attributes`: the node attributes it declares, `attribute_protos`: those with defaults."""
    return helper.make_function(domain, op_type, list(input_names), list(output_names), body,
                                opset_imports=[helper.make_opsetid("", opset)], attributes=list(attributes),
                                **({"attribute_protos": list(attribute_protos)} if attribute_protos else {}))


def plugin_attributes(version: int = 1, namespace: str = "qcompile") -> dict:
    """The attributes every plugin node carries: plugin_version (a string) and plugin_namespace."""
    return {"plugin_version": str(version), "plugin_namespace": namespace}


def add_plugin_function(model: onnx.ModelProto, domain: str, version: int, op_type: str,
                        make: Callable[[], onnx.FunctionProto]) -> None:
    """Declare `domain` in `model` and add the function body `make()` of `domain::op_type` (idempotent)."""
    declare_domain(model, domain, version)
    add_function(model, domain, op_type, make)


def declare_domain(model: onnx.ModelProto, domain: str, version: int) -> None:
    """Add `domain` to the model's opset imports if it is missing."""
    if not any(op.domain == domain for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def add_function(model: onnx.ModelProto, domain: str, op_type: str, make: Callable[[], onnx.FunctionProto]) -> None:
    """Append `make()` (the function body of `domain::op_type`) unless the model already has one."""
    if not any(f.domain == domain and f.name == op_type for f in model.functions):
        model.functions.append(make())


def _count(n: int) -> str:
    return {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}.get(n, str(n))
