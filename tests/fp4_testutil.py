"""Shared by the FP4 kernel tests: fresh random FP4 weights, the float64 oracle, the error bound, the skip markers."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch
from onnx import TensorProto as T
from onnx import helper, numpy_helper

from qcompile.algorithms.fp4 import quantize_fp4
from qcompile.plugins.fp4_gemm import format as F
from qcompile.plugins.fp4_gemm import register

register()
HAS_TRITON = importlib.util.find_spec("triton") is not None
triton_interp = pytest.mark.skipif(not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
                                   reason="needs triton and TRITON_INTERPRET=1 (CPU interpreter)")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FMTS = ["nvfp4", "mxfp4"]
REL = {torch.float32: 1e-5, torch.float16: 1.5e-3, torch.bfloat16: 1e-2}  # relative L2 error vs float64


def make_case(fmt: str, k: int = 256, n: int = 80, seed: int = 0) -> dict:
    """Fresh random FP4 weights in the engine layout (w_packed [N, K/2], w_scale, w_global)."""
    w = torch.randn(k, n, generator=torch.Generator().manual_seed(seed)) * 0.05
    qw = quantize_fp4(w, fmt)
    glob = None if qw.global_scale is None else qw.global_scale.to(torch.float32)
    return {"w_packed": F.pack_codes(qw.codes), "w_scale": qw.scale, "w_global": glob, "block": qw.block_size}


def planar_case(fmt: str, k: int = 256, n: int = 80, seed: int = 0, zero_scales: bool = False) -> dict:
    """`make_case` with the codes as planar words; zero_scales (NVFP4): every 7th block of each row, from the
    second, gets a zero scale."""
    case = make_case(fmt, k, n, seed)
    if zero_scales and fmt == "nvfp4":
        case["w_scale"] = case["w_scale"].clone()
        case["w_scale"][:, 1::7] = 0.0
    return dict(case, w_packed=F.to_planar_words(case["w_packed"], case["w_scale"]))


def layout_case(fmt: str, layout: str, k: int = 256, n: int = 80, seed: int = 0) -> dict:
    """`make_case` with the codes in an engine layout: "bytes" (as made), "planar" words or row "pairs"."""
    if layout == "bytes":
        return make_case(fmt, k, n, seed)
    case = planar_case(fmt, k, n, seed)
    return dict(case, w_packed=F.to_row_pairs(case["w_packed"])) if layout == "pairs" else case


def weight64(case) -> np.ndarray:
    """W [N, K] in float64 from the format's decoders (exact: codes and scales are float32-exact); w_packed in
    either engine layout."""
    codes = F.unpack_codes(F.engine_bytes(case["w_packed"]))
    s = F.decode_scales(case["w_scale"]).double().numpy()
    s = s * (1.0 if case["w_global"] is None else float(case["w_global"]))
    w = F.e2m1_decode(codes).double().numpy()
    n, k = w.shape
    return (w.reshape(n, -1, case["block"]) * s[..., None]).reshape(n, k)


def oracle(x, case, bias=None) -> np.ndarray:
    y = x.double().reshape(-1, x.shape[-1]).numpy() @ weight64(case).T
    return y if bias is None else y + bias.double().numpy()


def assert_rel_l2(y, ref: np.ndarray, dtype):
    got = y.detach().double().cpu().numpy().reshape(ref.shape)
    err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
    assert err <= REL[dtype], f"relative L2 error {err:.3g} > {REL[dtype]}"


def args(case):
    return case["w_packed"], case["w_scale"], case["w_global"]


def aoti_fp4_linear(weights, bias, block: int, k: int, path: str, batch_and_seq: bool = False, x_global=None):
    """`torch.ops.qcompile.fp4_gemm` with these CUDA weights and bias (and W4A4's `x_global`, a 0-d buffer as in an
    engine), exported with a dynamic row count (1-4096, bf16 x [M, K]; `batch_and_seq`: x [batch, seq, K], both
    dynamic, seq from 1, as an engine's) and compiled into an AOTInductor package at path; returns the loaded
    package."""
    class Fp4Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("x_global", x_global)

        def forward(self, x):
            return torch.ops.qcompile.fp4_gemm(x, *weights, self.x_global, bias, block)

    if batch_and_seq:
        shape, dims = (2, 8, k), {0: torch.export.Dim("batch", min=1, max=64), 1: torch.export.Dim("seq", min=1,
                                                                                                   max=512)}
    else:
        shape, dims = (4, k), {0: torch.export.Dim("rows", min=1, max=4096)}
    ep = torch.export.export(Fp4Linear(), (torch.randn(*shape, device="cuda", dtype=torch.bfloat16),),
                             dynamic_shapes=(dims,))
    return torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(ep, package_path=str(path)))


def fused_fp4_model(k: int = 128, n: int = 32):
    """A one-MatMul ONNX model (x [2, K] @ W [K, N]) quantized to NVFP4 and fused into one `Fp4Gemm` plugin node."""
    from qcompile.passes import _graph as G
    from qcompile.passes.fuse_fp4_gemm import FuseFp4GemmPass
    from qcompile.passes.pipeline import export_model
    from qcompile.passes.quantize_weights_fp4 import QuantizeWeightsFp4Pass
    from qcompile.recipes.schema import Recipe

    w = (np.random.default_rng(0).standard_normal((k, n)) * 0.1).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", T.FLOAT, [2, k])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [2, n])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    recipe = Recipe.from_dict({"name": "t", "description": "", "opset": 23, "rules": [
        {"ops": ["MatMul"], "weight": {"format": "nvfp4", "granularity": "group", "group_size": 16}}],
        "placement": {"min_k": 16, "min_n": 16, "skip_gemv": False}})
    graph = QuantizeWeightsFp4Pass(recipe, {"x": 3.0}).call(G.import_model(model)).graph
    q = export_model(graph, like=model, opset=23)
    graph = G.import_model(q)
    FuseFp4GemmPass().call(graph)
    graph.cleanup()
    return export_model(graph, like=q)
