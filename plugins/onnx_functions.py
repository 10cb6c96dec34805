"""Declaring a plugin's domain and ONNX function body in a model: shared by every plugin's `onnx_schema`."""
from __future__ import annotations

from typing import Callable

import onnx
from onnx import helper


def declare_domain(model: onnx.ModelProto, domain: str, version: int) -> None:
    """Add `domain` to the model's opset imports if it is missing."""
    if not any(op.domain == domain for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))


def add_function(model: onnx.ModelProto, domain: str, op_type: str, make: Callable[[], onnx.FunctionProto]) -> None:
    """Append `make()` (the function body of `domain::op_type`) unless the model already has one."""
    if not any(f.domain == domain and f.name == op_type for f in model.functions):
        model.functions.append(make())
