"""FP4 converters: `trt::TRT_FP4DynamicQuantize`, and `qcompile::Fp4Gemm` / `Fp4GemmW4A4` ->
`torch.ops.qcompile.fp4_gemm`.

The lowering holds FLOAT4E2M1 tensors as their float values (exact on the E2M1 grid; see
`tensor_from_onnx`), so ONNX DequantizeLinear of FP4 data (blocked or not, with a two-level
`DQ(E4M3 scales, global)` scale) is the ordinary DequantizeLinear converter, in float64 when asked.

TRT_FP4DynamicQuantize(x, global; axis=-1, block_size=16, scale_type=FLOAT8E4M3FN) returns the E2M1 values
(float) and the E4M3 block scales, by `format.nvfp4_dynamic_quantize` (TensorRT's and Blackwell's math).

For the plugin nodes (contract: `qcompile.plugins.fp4_gemm.onnx_schema`) the `prepare` hook converts the
constant weight once to the engine layout (`format`: uint8 [N, K/2] codes, E4M3 or E8M0 scales, the NVFP4
global scale), so engines hold only the packed weight; MXFP4's FP32 power-of-two scales become E8M0 bits
exactly (anything else is an error naming the node).

Engine layout of the codes (`LoweringOptions.fp4_layout`): "planar" stores weights whose K is a multiple of 128 as
planar words (`format.to_planar_words`: the layout of the one-dot kernel, `plugins/fp4_gemm/one_dot.py`, and of the
planar GEMV), "pairs" those words in row pairs where N is even as well (`format.to_row_pairs`), "bytes" (the
default) keeps uint8 [N, K/2]. Engines take `LoweringOptions.for_engine(device)`: row pairs for CUDA, bytes for CPU.
"""
from __future__ import annotations

import torch
from onnx import TensorProto

from qcompile.lowering.registry import Prepared
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import as_tensor
from qcompile.plugins.fp4_gemm import format as F
from qcompile.plugins.fp4_gemm import onnx_schema

W_Q, W_SCALE, W_GLOBAL = 1, 2, 3  # input indices of the weight, its block scales and its global scale


@reg(onnx_schema.TRT_DYNAMIC_QUANTIZE, since=1, domain=onnx_schema.TRT_DOMAIN)
def trt_fp4_dynamic_quantize(ctx, x, global_scale):
    x, g = as_tensor(x), as_tensor(global_scale)
    block, axis = int(ctx.attr("block_size", 16)), int(ctx.attr("axis", 1))
    if block != F.NVFP4_BLOCK or ctx.attr("scale_type", TensorProto.FLOAT8E4M3FN) != TensorProto.FLOAT8E4M3FN:
        raise ctx.fail(f"only block_size=16 with FLOAT8E4M3FN scales is supported (TensorRT's rule), got "
                       f"block_size={block}, scale_type={ctx.attr('scale_type')}")
    if axis % x.dim() != x.dim() - 1:
        raise ctx.fail(f"only the last axis can be blocked, got axis={axis} for rank {x.dim()}")
    if g.numel() != 1:
        raise ctx.fail(f"the global scale must be a scalar, got shape {tuple(g.shape)}")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    codes, sx = F.nvfp4_dynamic_quantize(x, g.reshape(()))
    return F.e2m1_decode(codes).to(ctx.float_dtype(compute)), sx


def _engine_weight(ctx, w_q: torch.Tensor, w_scale: torch.Tensor, w_global: torch.Tensor | None, check: bool):
    """(w_packed uint8 [N, K/2], int32 planar words [N, K/8] or row pairs [N/2, K/128, 2, 16]
    (`ctx.options.fp4_layout`), w_scale float8_e4m3fn | uint8 E8M0 [N, K/B], w_global float32 scalar | None)."""
    w_packed, w_scale, w_global = _engine_bytes(ctx, w_q, w_scale, w_global, check)
    layout = ctx.options.fp4_layout
    if layout in ("planar", "pairs") and w_q.shape[1] % F.PLANAR_K_MULTIPLE == 0:
        w_packed = F.to_planar_words(w_packed, w_scale)
        if layout == "pairs" and w_q.shape[0] % 2 == 0:
            w_packed = F.to_row_pairs(w_packed)
    return w_packed, w_scale, w_global


def _engine_bytes(ctx, w_q: torch.Tensor, w_scale: torch.Tensor, w_global: torch.Tensor | None, check: bool):
    """(w_packed uint8 [N, K/2], w_scale float8_e4m3fn | uint8 E8M0 [N, K/B], w_global float32 scalar | None)."""
    block = int(ctx.attr("block_size", 0) or 0)
    if w_q.dim() != 2 or w_q.shape[1] % 2:
        raise ctx.fail(f"w_q must be [N, K] with K even, got shape {tuple(w_q.shape)}")
    n, k = w_q.shape
    nvfp4 = w_scale.dtype == torch.float8_e4m3fn
    if block != (F.NVFP4_BLOCK if nvfp4 else F.MXFP4_BLOCK) or k % block or tuple(w_scale.shape) != (n, k // block):
        raise ctx.fail(f"block_size {block} with w_scale {w_scale.dtype} {tuple(w_scale.shape)} does not fit w_q "
                       f"[{n}, {k}] (NVFP4: E4M3 scales, 16; MXFP4: FP32 powers of two, 32)")
    types = ctx.extra.get("input_types", [])
    if len(types) > W_Q and types[W_Q] not in (None, TensorProto.FLOAT4E2M1):
        raise ctx.fail(f"w_q must be FLOAT4E2M1, got ONNX type {TensorProto.DataType.Name(types[W_Q])}")
    codes = F.e2m1_encode(w_q)
    if check and not torch.equal(F.e2m1_decode(codes), w_q.to(torch.float32)):
        raise ctx.fail("w_q holds values off the E2M1 grid")
    if nvfp4:
        return F.pack_codes(codes), w_scale, w_global.to(torch.float32).reshape(())
    mantissa, exponent = torch.frexp(w_scale.to(torch.float32))
    if check and (bool((mantissa != 0.5).any()) or (w_global is not None and float(w_global) != 1.0)):
        raise ctx.fail("MXFP4 w_scale must hold powers of two (E8M0 values) and w_global must be 1.0")
    bits = torch.clamp(exponent - 1 + F.E8M0_BIAS, 0, 254).to(torch.uint8)
    return F.pack_codes(codes), bits, None


def _prepare(ctx, constants: dict[int, torch.Tensor]) -> Prepared | None:
    if not all(i in constants for i in (W_Q, W_SCALE, W_GLOBAL)):
        return None
    w_packed, w_scale, w_global = _engine_weight(ctx, constants[W_Q], constants[W_SCALE], constants[W_GLOBAL],
                                                 check=True)
    return Prepared({"w_packed": w_packed, "w_scale": w_scale, "w_global": w_global},
                    replaces=(W_Q, W_SCALE, W_GLOBAL))


def _gemm(ctx, x, w_q, w_scale, w_global, x_global, bias, prepared):
    import qcompile.plugins.fp4_gemm.op  # noqa: F401  (registers torch.ops.qcompile.fp4_gemm)

    if prepared is not None:
        w_packed, scale, glob = prepared["w_packed"], prepared["w_scale"], prepared.get("w_global")
    else:
        w_packed, scale, glob = _engine_weight(ctx, as_tensor(w_q), as_tensor(w_scale), as_tensor(w_global),
                                               check=False)
    x = as_tensor(x)
    if x.dtype == torch.float64:  # the float64 reference: the same math without the op's dtype rule
        from qcompile.plugins.fp4_gemm.reference import dequantize_weight

        xf = x if x_global is None else F.nvfp4_fake_quantize(x, as_tensor(x_global).reshape(())).double()
        y = xf @ dequantize_weight(w_packed, scale, glob, int(ctx.attr("block_size"))).double().t()
        return y if bias is None else y + as_tensor(bias).double()
    x_global = None if x_global is None else as_tensor(x_global).to(torch.float32).reshape(())
    bias = None if bias is None else as_tensor(bias)
    return torch.ops.qcompile.fp4_gemm(x, w_packed, scale, glob, x_global, bias, int(ctx.attr("block_size")),
                                       ctx.options.fp8_large_m)


@reg(onnx_schema.OP_TYPE, since=onnx_schema.VERSION, domain=onnx_schema.DOMAIN, prepare=_prepare)
def fp4_gemm(ctx, x, w_q, w_scale, w_global, bias=None, *, prepared=None):
    return _gemm(ctx, x, w_q, w_scale, w_global, None, bias, prepared)


@reg(onnx_schema.OP_TYPE_W4A4, since=onnx_schema.VERSION, domain=onnx_schema.DOMAIN, prepare=_prepare)
def fp4_gemm_w4a4(ctx, x, w_q, w_scale, w_global, x_global, bias=None, *, prepared=None):
    return _gemm(ctx, x, w_q, w_scale, w_global, x_global, bias, prepared)
