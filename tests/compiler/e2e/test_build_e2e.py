"""End-to-end: build tiny-llama and small-cnn engines on CPU, load them back, compare with FP32.

References are independent of our lowering: the FP32 ONNX graph and the emitted Q/DQ graph run
in ONNX Runtime with graph optimizations disabled, on fresh random inputs of a size not used
for calibration or export.
"""
import numpy as np
import onnx
import pytest

import qcompile
from qcompile.frontend import load_source

from qc_testutil import cosine, ort_session

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fresh_inputs(llama):
    rng = np.random.default_rng(1234)
    return llama.random_inputs(rng, {"batch": 3, "seq": 40})


@pytest.mark.parametrize("recipe", ["int8", "fp8"])
def test_quantized_engine_matches_fp32_graph(llama, llama_builds, fresh_inputs, recipe):
    engine = qcompile.load(llama_builds[recipe].engine_path)
    got = engine.run(fresh_inputs)["logits"]
    want = ort_session(llama.model).run(["logits"], fresh_inputs)[0]
    assert got.shape == want.shape == (3, 40, 512)
    assert cosine(got, want) >= 0.99
    # quantization really happened: not bit-identical to the float graph
    assert np.abs(got - want).max() > 1e-4


def test_fp16_recipe_engine_equals_float_graph(llama, llama_builds, fresh_inputs):
    engine = qcompile.load(llama_builds["fp16"].engine_path)
    got = engine.run(fresh_inputs)["logits"]
    want = ort_session(llama.model).run(["logits"], fresh_inputs)[0]
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-3)
    assert llama_builds["fp16"].layers == []


@pytest.mark.parametrize("recipe", ["int8", "fp8"])
def test_every_gemm_became_a_plugin(llama_builds, recipe):
    result = llama_builds[recipe]
    # 2 layers x (q, k, v, o, gate, up, down) + lm_head
    assert len(result.layers) == 15
    assert all(r.plugin == "qcompile::ScaledGemm" for r in result.layers)
    assert all(r.format == f"{recipe}/{recipe}" for r in result.layers)
    # weights really shrink (fp32 -> 1 byte + scales)
    assert all(r.bytes_after < r.bytes_before / 3.5 for r in result.layers)
    modules = {r.module for r in result.layers}
    assert "layers.0.attn.q_proj" in modules and "lm_head" in modules


@pytest.mark.parametrize("recipe", ["int8", "fp8"])
def test_emitted_qdq_onnx_runs_in_ort_and_agrees_with_engine(llama_builds, fresh_inputs, recipe, workdir):
    path = workdir / f"tl-{recipe}.qdq.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert not any(n.domain == "qcompile" for n in model.graph.node)  # portable: before plugin fusion
    # weights are stored quantized, with DQ only (TensorRT's pre-quantized weight form)
    quant_inits = [i for i in model.graph.initializer
                   if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.FLOAT8E4M3FN) and len(i.dims) == 2]
    assert len(quant_inits) == 15
    ort_out = ort_session(model).run(["logits"], fresh_inputs)[0]
    engine_out = qcompile.load(llama_builds[recipe].engine_path).run(fresh_inputs)["logits"]
    assert cosine(ort_out, engine_out) >= 0.999


def test_small_cnn_int8(workdir):
    calib = workdir / "cnn-calib.npz"
    src = load_source("small-cnn")
    rng = np.random.default_rng(7)
    samples = [src.random_inputs(rng, {"batch": 2}) for _ in range(4)]
    np.savez(calib, image=np.stack([s["image"] for s in samples]))
    result = qcompile.build("small-cnn", "int8", output=workdir / "cnn.engine", calib=str(calib),
                            device="cpu", progress_stream=None)
    ops = {r.op for r in result.layers}
    assert "Conv" in ops  # convs stay Q/DQ (dequantize + float conv); the classifier may be too small
    feeds = src.random_inputs(np.random.default_rng(99), {"batch": 5})
    got = qcompile.load(result.engine_path).run(feeds)["logits"]
    want = ort_session(src.model).run(["logits"], feeds)[0]
    assert got.shape == (5, 10)
    assert cosine(got, want) >= 0.99
