"""ONNX Runtime contrib ops (placeholder)."""
from __future__ import annotations
