"""Front end: model sources (ONNX file, `file.py:factory`, built-in example) -> FP32 ONNX.

Public API: `load_source(spec, *, opset=21, work_dir=None) -> SourceModel`, `SourceModel`,
`IOSpec`, `export_torch(...)`, `list_examples()`, `EXAMPLES`.
"""
from qcompile.frontend.examples import EXAMPLES, list_examples
from qcompile.frontend.export import export_torch, module_name_from_namespace, stamp_module_names
from qcompile.frontend.source import IOSpec, SourceModel, load_source

__all__ = ["load_source", "SourceModel", "IOSpec", "export_torch", "stamp_module_names",
           "module_name_from_namespace", "list_examples", "EXAMPLES"]
