"""GPTQ vs round to nearest on tiny-llama as the calibration token count grows (CPU, graph-only builds).

Each GPTQ build calibrates on N seeded random samples of batch 2 x seq 16 (32 tokens each; tiny-llama's
GPTQ layers have K = 256 input channels). Output SQNR / cosine of the portable Q/DQ graph against the FP32
graph, both run by our lowering in float64, on 4 fresh random inputs that are not calibration data.

    python tools/diag/gptq_calib_tokens.py 16 24 32 64   # recorded: benchmarks/gptq-calib-tokens-cpu.txt
"""
import sys

import numpy as np
import torch

import qcompile
from qcompile.frontend import load_source
from qcompile.lowering import lower_onnx

SIZES = {"batch": 2, "seq": 16}


def score(model, feeds, want) -> tuple[float, float]:
    """(min cosine, mean SQNR dB) of `model`'s outputs against `want` over `feeds`."""
    run = lower_onnx(model, compute_dtype=torch.float64)
    cos, sqnr = [], []
    for f, w in zip(feeds, want):
        got = run.run(f)[0]
        for name in w:
            a, b = got[name].double().flatten(), w[name].double().flatten()
            cos.append(float(a @ b / (a.norm() * b.norm())))
            sqnr.append(float(10 * torch.log10((b ** 2).sum() / ((a - b) ** 2).sum())))
    return min(cos), float(np.mean(sqnr))


def main(counts: list[int]) -> None:
    src = load_source("tiny-llama")
    ref = lower_onnx(src.model, compute_dtype=torch.float64)
    feeds = [{k: torch.from_numpy(v) for k, v in src.random_inputs(np.random.default_rng(100 + i), SIZES).items()}
             for i in range(4)]
    want = [ref.run(f)[0] for f in feeds]
    cos, sqnr = score(qcompile.build("tiny-llama", "w4a16_rtn", output=None).qdq_model, feeds, want)
    print(f"{'w4a16_rtn':>10} {'-':>7} {'-':>7}  cosine {cos:.4f}  SQNR {sqnr:.2f} dB", flush=True)
    for n in counts:
        samples = [src.random_inputs(np.random.default_rng(1000 + i), SIZES) for i in range(n)]
        path = f"/tmp/gptq-calib-{n}.npz"
        np.savez(path, **{k: np.stack([s[k] for s in samples]) for k in samples[0]})
        built = qcompile.build("tiny-llama", "w4a16_gptq", output=None, calib=path)
        cos, sqnr = score(built.qdq_model, feeds, want)
        tokens = n * SIZES["batch"] * SIZES["seq"]
        print(f"{'w4a16_gptq':>10} {n:>4} samples {tokens:>5} tokens  cosine {cos:.4f}  SQNR {sqnr:.2f} dB",
              flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [16, 24, 32, 64])
