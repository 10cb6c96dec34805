"""The pass order as data, and the two ONNX -> ONNX stages the driver calls.

- `quantize_model`: FP ONNX -> portable Q/DQ ONNX (TensorRT explicit quantization; runs in ORT).
- `fuse_plugins`: Q/DQ ONNX -> plugin ONNX (`qcompile::ScaledGemm` nodes with ONNX function bodies).
- `prepare_for_engine`: plugin ONNX -> the graph the engine is lowered from (sibling GEMMs and attention fused).
"""
from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs

from qcompile.passes import _graph as G
from qcompile.passes.cleanup import CleanupPass
from qcompile.passes.fold_awq_scales import FoldAwqScalesPass
from qcompile.passes.fold_weight_qdq import FoldWeightQDQPass
from qcompile.passes.fuse_attention import FuseAttentionPass
from qcompile.passes.fuse_fp4_gemm import FuseFp4GemmPass
from qcompile.passes.fuse_fp8_block_gemm import FuseFp8BlockGemmPass
from qcompile.passes.fuse_int4_gemm import FuseInt4GemmPass
from qcompile.passes.fuse_int8_wo_gemm import FuseInt8WoGemmPass
from qcompile.passes.fuse_scaled_gemm import FuseScaledGemmPass
from qcompile.passes.fuse_sibling_gemms import FuseSiblingGemmsPass
from qcompile.passes.import_matmul_nbits import ImportMatMulNBitsPass
from qcompile.passes.infra import PassBase, PassManager, PassResult
from qcompile.passes.insert_qdq import InsertQDQPass
from qcompile.passes.lint_qdq import LintQDQPass
from qcompile.passes.quantize_fp8_block import QuantizeFp8BlockPass
from qcompile.passes.quantize_weights_fp4 import QuantizeWeightsFp4Pass
from qcompile.passes.quantize_weights_int4 import QuantizeWeightsInt4Pass
from qcompile.passes.sink_dequantize import SinkDequantizePass
from qcompile.plugins.fp4_gemm import onnx_schema as fp4_schema
from qcompile.plugins.fp8_block_gemm import onnx_schema as fp8_block_schema
from qcompile.plugins.int4_gemm import onnx_schema as int4_schema
from qcompile.plugins.int8_wo_gemm import onnx_schema as int8_wo_schema
from qcompile.plugins.scaled_gemm import dynamic_schema, onnx_schema
from qcompile.recipes.schema import Recipe

logger = logging.getLogger(__name__)

__all__ = ["qdq_passes", "plugin_passes", "engine_passes", "quantize_model", "fuse_plugins", "prepare_for_engine",
           "export_model", "import_model"]

IR_VERSION = 10
MIN_OPSET = 21

import_model = G.import_model


def qdq_passes(recipe: Recipe, activation_amax: dict[str, float], int4_weights=None, int4_input_scales=None,
               int4_input_amax=None) -> list[PassBase]:
    """FP graph -> Q/DQ graph with folded, sunk weights (`int4_*`: AWQ/GPTQ results by node name).

    INT4 weights first: W4A8 activations are quantized after AWQ's input scaling (`int4_input_amax`: the amax
    of each AWQ layer's scaled input)."""
    return [QuantizeWeightsInt4Pass(recipe, int4_weights, int4_input_scales), FoldAwqScalesPass(),
            InsertQDQPass(recipe, activation_amax, int4_input_amax),
            QuantizeWeightsFp4Pass(recipe, activation_amax),
            QuantizeFp8BlockPass(recipe), FoldWeightQDQPass(),
            SinkDequantizePass(recipe), CleanupPass(), LintQDQPass()]


def plugin_passes(recipe: Recipe | None = None) -> list[PassBase]:
    """Q/DQ graph -> plugin graph (`recipe`: the one the graph was quantized with, so that each fusion keeps to
    its own layers; None: every fusion tries every quantized GEMM)."""
    return [ImportMatMulNBitsPass(), FuseScaledGemmPass(recipe), FuseInt4GemmPass(), FuseInt8WoGemmPass(),
            FuseFp8BlockGemmPass(), FuseFp4GemmPass(), CleanupPass(), LintQDQPass()]


def engine_passes(siblings: bool = True, attention: bool = True) -> list[PassBase]:
    """Plugin graph -> the graph the engine is lowered from (rewrites that only serve speed; the plugin graph
    stays the one reports and per-layer validation read): sibling GEMMs, then attention (each can be left out)."""
    return [p for p, on in ((FuseSiblingGemmsPass(), siblings), (FuseAttentionPass(), attention)) if on]


def quantize_model(model: onnx.ModelProto, recipe: Recipe, activation_amax: dict[str, float],
                   int4_weights=None, int4_input_scales=None, int4_input_amax=None
                   ) -> tuple[onnx.ModelProto, PassResult]:
    """The portable Q/DQ ONNX for `model` (opset >= recipe.opset, IR 10) and the pass results.

    `int4_weights` / `int4_input_scales`: AWQ/GPTQ results by node name (`qcompile.algorithms.plan.run_jobs`);
    `int4_input_amax`: W4A8 AWQ layers' scaled-input amax by node name (`plan.awq_input_amax`).

    Raises:
        PassError: a pass failed (e.g. a needed activation has no amax). LintError: invalid Q/DQ.
    """
    opset = max(recipe.opset, MIN_OPSET)
    graph = import_model(model)
    graph.opset = max(graph.opset, opset)
    result = PassManager(qdq_passes(recipe, activation_amax, int4_weights, int4_input_scales,
                                    int4_input_amax)).run(graph)
    return export_model(result.graph, like=model, opset=opset), result


def fuse_plugins(model: onnx.ModelProto, recipe: Recipe | None = None) -> tuple[onnx.ModelProto, PassResult]:
    """Fuse quantized GEMMs of a Q/DQ model into plugin nodes (with their function bodies); `recipe`: the one
    `model` was quantized with (its layers of another fusion's form are not declined by FuseScaledGemmPass)."""
    graph = import_model(model)
    result = PassManager(plugin_passes(recipe)).run(graph)
    return export_model(result.graph, like=model), result


def prepare_for_engine(model: onnx.ModelProto, *, siblings: bool = True,
                       attention: bool = True) -> tuple[onnx.ModelProto, PassResult]:
    """The graph the engine is built from: `engine_passes(siblings, attention)` on the plugin graph `model`."""
    result = PassManager(engine_passes(siblings, attention)).run(import_model(model))
    return export_model(result.graph, like=model), result


def export_model(graph: gs.Graph, like: onnx.ModelProto, opset: int | None = None) -> onnx.ModelProto:
    """Export `graph` keeping what graph-surgeon drops: opsets, IR version, functions, metadata.

    Args:
        graph (gs.Graph): the graph to export.
        like (onnx.ModelProto): the model it came from (opset imports, functions, producer, metadata).
        opset (int): raise the default-domain opset to at least this. Defaults to keeping it.
    """
    model = gs.export_onnx(graph, do_type_check=False)
    versions = {op.domain: op.version for op in like.opset_import}
    for op in model.opset_import:
        versions[op.domain] = max(versions.get(op.domain, 0), op.version)
    versions[""] = max(versions.get("", 0), graph.opset or 0, opset or 0)
    used = {n.domain for n in model.graph.node} | {f.domain for f in model.functions}
    if onnx_schema.DOMAIN in used:  # one "qcompile" domain for every plugin
        versions.setdefault(onnx_schema.DOMAIN, onnx_schema.VERSION)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(versions.items()))
    have = {(f.domain, f.name) for f in model.functions}
    model.functions.extend(f for f in like.functions if (f.domain, f.name) not in have)
    for schema in (onnx_schema, dynamic_schema, int4_schema, int8_wo_schema, fp8_block_schema):
        if any(n.domain == schema.DOMAIN and n.op_type == schema.OP_TYPE for n in model.graph.node):
            schema.add_to_model(model)
    if any(n.domain == fp4_schema.DOMAIN and n.op_type in fp4_schema.OP_TYPES for n in model.graph.node):
        fp4_schema.add_to_model(model)
    model.ir_version = max(IR_VERSION, onnx.helper.find_min_ir_version_for(list(model.opset_import), True))
    model.producer_name = like.producer_name or "qcompile"
    model.producer_version = like.producer_version
    model.doc_string = like.doc_string
    model.graph.doc_string = like.graph.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    meta = G.node_metadata(graph)
    for node in model.graph.node:
        for key, value in meta.get(node.name, {}).items():
            node.metadata_props.add(key=key, value=value)
    return model
