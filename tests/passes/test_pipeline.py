import numpy as np
import onnx
import pytest
from passes_testlib import mlp_residual, op_types, random, run

from qcompile.passes import (activation_tensors, export_model, fuse_plugins, import_model, plan_quantization,
                             plugin_passes, qdq_passes, quantize_model)
from qcompile.recipes import load_recipe


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_mlp_residual_end_to_end(name):
    model = mlp_residual()
    recipe = load_recipe(name)
    targets = plan_quantization(model, recipe)
    assert [(t.node, t.module) for t in targets] == [("up_proj", "layers.0.mlp.up_proj"),
                                                       ("down_proj", "layers.0.mlp.down_proj")]
    amax = {t: 3.0 for t in activation_tensors(targets)}
    assert list(amax) == ["x", "h2"]

    qdq, result = quantize_model(model, recipe, amax)
    assert result.modified and result.stats["FoldWeightQDQPass.folded"] == 2
    assert op_types(qdq) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul",
                             "Add", "Relu", "QuantizeLinear", "DequantizeLinear", "MatMul", "Add", "Add"]
    assert {o.domain: o.version for o in qdq.opset_import} == {"": 21} and qdq.ir_version == 10
    assert sum(t.ByteSize() for t in qdq.graph.initializer) < sum(t.ByteSize() for t in model.graph.initializer) / 2
    x = random((5, 32), 11)
    (y_qdq,) = run(qdq, x=x)
    (y_fp,) = run(model, x=x)
    cos = float((y_qdq * y_fp).sum() / np.linalg.norm(y_qdq) / np.linalg.norm(y_fp))
    assert cos > 0.98

    fused, fresult = fuse_plugins(qdq)
    assert fresult.stats["FuseScaledGemmPass.ScaledGemmRule"] == 2 and not fresult.declined
    assert op_types(fused) == ["ScaledGemm", "Relu", "ScaledGemm", "Add"]
    assert {o.domain for o in fused.opset_import} == {"", "qcompile"}
    assert [(f.domain, f.name) for f in fused.functions] == [("qcompile", "ScaledGemm")]
    meta = {n.name: {p.key: p.value for p in n.metadata_props} for n in fused.graph.node}
    assert meta["up_proj"] == {"qcompile.module": "layers.0.mlp.up_proj", "qcompile.rule": "ScaledGemmRule"}
    (y_fused,) = run(fused, x=x)  # ORT runs ScaledGemm through its function body
    np.testing.assert_allclose(y_fused, y_qdq, rtol=1e-5, atol=1e-5)


def test_pass_order_is_data():
    recipe = load_recipe("int8")
    assert [p.name for p in qdq_passes(recipe, {})] == [
        "QuantizeWeightsInt4Pass", "FoldAwqScalesPass", "InsertQDQPass", "QuantizeWeightsFp4Pass", "QuantizeFp8BlockPass", "FoldWeightQDQPass",
        "SinkDequantizePass", "CleanupPass",
        "LintQDQPass"]
    assert [p.name for p in plugin_passes()] == ["ImportMatMulNBitsPass", "FuseScaledGemmPass", "FuseInt4GemmPass",
                                                    "FuseInt8WoGemmPass", "FuseFp8BlockGemmPass",
                                                    "FuseFp4GemmPass", "CleanupPass",
                                                    "LintQDQPass"]


def test_export_model_keeps_opsets_functions_and_metadata():
    model = mlp_residual()
    model.metadata_props.add(key="source", value="unit-test")
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 2))
    out = export_model(import_model(model), like=model, opset=21)
    assert {o.domain: o.version for o in out.opset_import} == {"": 21, "com.example": 2}
    assert out.ir_version == 10 and out.metadata_props[0].value == "unit-test"
    assert out.graph.node[0].metadata_props[0].value == "layers.0.mlp.up_proj"
    onnx.checker.check_model(out, full_check=True)


def test_fp16_recipe_changes_nothing():
    model = mlp_residual()
    qdq, result = quantize_model(model, load_recipe("fp16"), {})
    assert not result.stats.get("InsertQDQPass.quantized_nodes")
    assert op_types(qdq) == op_types(model)


def test_gemm_and_transposed_weight_end_to_end():
    """Gemm(transB=1) and MatMul(x, Transpose(W)): the weight DQ is sunk through the Transpose, then fused."""
    from passes_testlib import parse, with_initializers

    model = with_initializers(parse("""<ir_version: 10, opset_import: ["" : 18]>
        g (float[B, 32] x) => (float[B, 32] y) {
            h = Gemm <transB = 1> (x, w1, b1)
            r = Relu(h)
            w2t = Transpose <perm = [1, 0]> (w2)
            y = MatMul(r, w2t) }"""), w1=random((48, 32), 1, 0.2), b1=random(48, 2), w2=random((32, 48), 3, 0.2))
    recipe = load_recipe("int8")
    amax = {t: 4.0 for t in activation_tensors(plan_quantization(model, recipe))}
    qdq, result = quantize_model(model, recipe, amax)
    assert result.stats["SinkDequantizePass.sunk_through_Transpose"] == 1
    assert "Transpose" not in op_types(qdq)
    fused, fresult = fuse_plugins(qdq)
    assert op_types(fused) == ["ScaledGemm", "Relu", "ScaledGemm"], fresult.declined
    x = random((3, 32), 4)
    np.testing.assert_allclose(run(fused, x=x)[0], run(qdq, x=x)[0], rtol=1e-5, atol=1e-5)
