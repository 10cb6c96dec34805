"""4-bit weight quantization algorithms (pure torch, device-agnostic, no graph code).

A later pass calls these per layer with the statistics calibration collects. Convention: a linear
layer is ``y = x @ W`` with ``W`` [K, N] (ONNX MatMul layout); weights are quantized in groups of
``group_size`` rows along K (``group_size = K``: per output channel); symmetric signed int4 [-8, 7]
by default, asymmetric uint4 [0, 15] with a zero point on request.

Common result type: `QuantizedWeight` (``q`` int8 [K, N] holding int4 values, ``scale`` float32
[K/g, N], ``zero`` int8 [K/g, N] or None, ``group_size``; ``dequantize() -> [K, N]``). Packing is
not done here.

Algorithms:
- RTN (`qcompile.algorithms.int4`): ``quantize_rtn(w, group_size, symmetric=True, clip_ratio=1.0)``.
- AWQ (`qcompile.algorithms.awq`): ``awq_search(w, x_sample, act_abs_mean, group_size, ...) -> AwqResult``
  (per-input-channel scales ``s`` to fold into the producer of x, plus the `QuantizedWeight` of
  ``W * s``); statistics from `ActAbsMeanObserver` and `ActivationSampleObserver`.
- GPTQ (`qcompile.algorithms.gptq`): ``gptq_quantize(w, hessian, group_size, damp=0.01, block_size=128,
  act_order=False, symmetric=True) -> QuantizedWeight``; Hessian from `HessianObserver`.

Observers follow the calibration observers' style: ``update(tensor)`` per captured batch, running
statistics only, ``value()`` at the end.
"""
from qcompile.algorithms.awq import ActAbsMeanObserver, ActivationSampleObserver, AwqResult, awq_search
from qcompile.algorithms.gptq import HessianObserver, gptq_quantize
from qcompile.algorithms.int4 import QuantizedWeight, output_error, quantize_rtn

__all__ = ["QuantizedWeight", "quantize_rtn", "output_error",
           "awq_search", "AwqResult", "ActAbsMeanObserver", "ActivationSampleObserver",
           "gptq_quantize", "HessianObserver"]
