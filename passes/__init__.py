"""ONNX -> ONNX graph passes on onnx-graphsurgeon graphs (one public pass per module).

The order is data: `qdq_passes(recipe, amax)`, `plugin_passes()` and `engine_passes()` list the passes that
`quantize_model`, `fuse_plugins` and `prepare_for_engine` run through a `PassManager`.
"""
from qcompile.passes.cleanup import CleanupPass
from qcompile.passes.fold_weight_qdq import FoldWeightQDQPass
from qcompile.passes.fuse_scaled_gemm import FuseScaledGemmPass
from qcompile.passes.infra import DUMP_ENV, InPlacePass, PassBase, PassManager, PassResult
from qcompile.passes.insert_qdq import InsertQDQPass, QuantTarget, activation_tensors, plan_quantization
from qcompile.passes.lint_qdq import LintQDQPass
from qcompile.passes.fuse_sibling_gemms import FuseSiblingGemmsPass
from qcompile.passes.pipeline import (engine_passes, export_model, fuse_plugins, import_model, plugin_passes,
                                      prepare_for_engine, qdq_passes, quantize_model)
from qcompile.passes.rewrite import MatchResult, RewritePass, RewriteRule
from qcompile.passes.sink_dequantize import SinkDequantizePass

__all__ = [
    "PassResult", "PassBase", "InPlacePass", "PassManager", "DUMP_ENV",
    "MatchResult", "RewriteRule", "RewritePass",
    "QuantTarget", "plan_quantization", "activation_tensors", "InsertQDQPass",
    "FoldWeightQDQPass", "SinkDequantizePass", "FuseScaledGemmPass", "FuseSiblingGemmsPass", "CleanupPass",
    "LintQDQPass", "qdq_passes", "plugin_passes", "engine_passes", "quantize_model", "fuse_plugins",
    "prepare_for_engine", "export_model", "import_model",
]
