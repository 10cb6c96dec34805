"""What the opt-in FP8 path (`plugins/fp8_large_m.py`, `--fp8-large-m`) costs in accuracy, on the CPU (its emulation).

1. One 4096 x 1024 INT4 g128 layer (RTN of N(0, 0.02) weights), 256 rows of bf16 x (Gaussian, then with 1% of the
   channels 20x): relative L2 error of the op with the flag against the exact op, and of each against the FP weights.
2. tiny-llama's logits at 2 x 80 tokens (every GEMM call 160 rows) for w4a16_rtn and w4a16_nvfp4: our lowering of the
   plugin graph with and without the flag, against the FP32 graph in ONNX Runtime (optimizations off).

    python3 tools/diag/fp8_large_m_accuracy.py

Not part of the product.
"""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

import qcompile
from qcompile.algorithms.int4 import quantize_rtn
from qcompile.frontend import load_source
from qcompile.lowering import lower_onnx
from qcompile.plugins.int4_gemm import register
from qcompile.plugins.int4_gemm.format import to_engine


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def cos(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def layer() -> None:
    op = register()
    g = torch.Generator().manual_seed(0)
    k, n, m = 4096, 1024, 256
    w = torch.randn(k, n, generator=g) * 0.02
    qw = quantize_rtn(w, 128, symmetric=True)
    words, scale = to_engine(qw.q, 128), qw.scale.float()
    outliers = torch.where(torch.rand(k, generator=g) < 0.01, 20.0, 1.0)
    for name, x in (("gaussian x", torch.randn(m, k, generator=g)),
                    ("x with 1% channels x20", torch.randn(m, k, generator=g) * outliers)):
        x = x.to(torch.bfloat16)
        exact = op(x, words, scale, None, None, 128).double()
        fp8 = op(x, words, scale, None, None, 128, None, False, True).double()
        fp_weights = x.double() @ w.double()
        print(f"layer, {name}: FP8 path vs exact {rel(fp8, exact):.4f}; exact vs FP weights "
              f"{rel(exact, fp_weights):.4f}; FP8 path vs FP weights {rel(fp8, fp_weights):.4f}")


def tiny_llama() -> None:
    src = load_source("tiny-llama")
    feeds = src.random_inputs(np.random.default_rng(80), {"batch": 2, "seq": 80})
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    fp32 = ort.InferenceSession(src.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ref = fp32.run(["logits"], feeds)[0]
    for recipe in ("w4a16_rtn", "w4a16_nvfp4"):
        plugin = qcompile.build("tiny-llama", recipe, output=None, calib="random", device="cpu",
                                progress_stream=None).plugin_model
        out = {}
        for flag in (False, True):
            program = lower_onnx(plugin, fp8_large_m=flag)
            out[flag] = program(*[torch.from_numpy(feeds[i]) for i in program.input_names])[0].numpy()
        print(f"tiny-llama {recipe}, 2 x 80 tokens: cosine to FP32 {cos(out[False], ref):.5f} exact, "
              f"{cos(out[True], ref):.5f} with the flag; the flag moves the logits {rel(out[True], out[False]):.4f}")


if __name__ == "__main__":
    layer()
    tiny_llama()
