"""ONNX -> ONNX graph passes on onnx-graphsurgeon graphs (one public pass per module).

The order is data: `qdq_passes(recipe, amax)` and `plugin_passes()` list the passes that
`quantize_model` and `fuse_plugins` run through a `PassManager`.
"""
from qcompile.passes.cleanup import CleanupPass
from qcompile.passes.fold_weight_qdq import FoldWeightQDQPass
from qcompile.passes.fuse_scaled_gemm import FuseScaledGemmPass
from qcompile.passes.infra import DUMP_ENV, InPlacePass, PassBase, PassManager, PassResult
from qcompile.passes.insert_qdq import InsertQDQPass, QuantTarget, activation_tensors, plan_quantization
from qcompile.passes.lint_qdq import LintQDQPass
from qcompile.passes.pipeline import (export_model, fuse_plugins, import_model, plugin_passes, qdq_passes,
                                      quantize_model)
from qcompile.passes.rewrite import MatchResult, RewritePass, RewriteRule
from qcompile.passes.sink_dequantize import SinkDequantizePass

__all__ = [
    "PassResult", "PassBase", "InPlacePass", "PassManager", "DUMP_ENV",
    "MatchResult", "RewriteRule", "RewritePass",
    "QuantTarget", "plan_quantization", "activation_tensors", "InsertQDQPass",
    "FoldWeightQDQPass", "SinkDequantizePass", "FuseScaledGemmPass", "CleanupPass", "LintQDQPass",
    "qdq_passes", "plugin_passes", "quantize_model", "fuse_plugins", "export_model", "import_model",
]
