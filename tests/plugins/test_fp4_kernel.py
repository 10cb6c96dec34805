"""The FP4 GEMM Triton kernels (`plugins/fp4_gemm/kernel.py`): exhaustive decode checks, every kernel path
vs a float64 oracle (NVFP4 / MXFP4, fp32 / fp16 / bf16, odd M, bias or not), the M dispatch traced with a
dynamic M, and the op on CUDA. Interpreter tests run with TRITON_INTERPRET=1 on CPU (skipped without triton: CI); the
interpreter's bf16 `tl.dot` is broken, so bf16 GEMMs run on the GPU only (bf16 decoding is checked here)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fp4_testutil import (FMTS, HAS_TRITON, aoti_fp4_linear, args, assert_rel_l2, cuda, make_case, needs_triton,
                          oracle, planar_case, triton_interp, weight64)
from qc_testutil import export_on_fake_cuda, fake_cuda_export, launch_spy
from qcompile.plugins.fp4_gemm import format as F

# ---------------------------------------------------------------- decoding, exhaustively (interpreter)

if HAS_TRITON:  # helper kernels over the kernel module's jit functions (module level: Triton reads globals)
    import triton
    import triton.language as tl

    from qcompile.plugins.fp4_gemm import kernel as K

    @triton.jit
    def _decode_words(w_ptr, m_ptr, out_ptr, W: tl.constexpr):
        """Every word of w_ptr decoded with multiplier m_ptr[0] (the tile's dtype), stored as fp32."""
        words = tl.load(w_ptr.to(tl.pointer_type(tl.uint32)) + tl.arange(0, W))
        mult = tl.load(m_ptr + tl.arange(0, 1))
        tile = K._e2m1_tile(tl.reshape(words, (1, W)), tl.reshape(mult, (1, 1)))
        tl.store(out_ptr + tl.arange(0, 8 * W), tl.reshape(tile, (8 * W,)).to(tl.float32))

    @triton.jit
    def _pairs16(w_ptr, out_ptr, W: tl.constexpr, EM_SHIFT: tl.constexpr, DT: tl.constexpr):
        """Nibble j of word i of w_ptr by `_pair16` (bit placement only), its 16 bits stored at out[j * W + i]."""
        i = tl.arange(0, W)
        words = tl.load(w_ptr.to(tl.pointer_type(tl.uint32)) + i)
        for j in tl.static_range(4):
            lo, hi = K._pair16(words, j, EM_SHIFT, DT)
            tl.store(out_ptr + j * W + i, lo.to(tl.uint16, bitcast=True).to(tl.int32))
            tl.store(out_ptr + (j + 4) * W + i, hi.to(tl.uint16, bitcast=True).to(tl.int32))

    @triton.jit
    def _scale_mult(s_ptr, out_ptr, MX: tl.constexpr, SHIFT: tl.constexpr, POW_SHIFT: tl.constexpr):
        bits = tl.load(s_ptr.to(tl.pointer_type(tl.uint8)) + tl.arange(0, 256))
        tl.store(out_ptr + tl.arange(0, 256), K._scale_multiplier(bits, MX, SHIFT, POW_SHIFT))

    @triton.jit
    def _tile(w_ptr, s_ptr, out_ptr, N, K_, DT: tl.constexpr, MX: tl.constexpr, B: tl.constexpr,
              SHIFT: tl.constexpr, POW_SHIFT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        w_rows, s_rows = K._tile_pointers(w_ptr, s_ptr, offs_n, K_, B, BLOCK_K)
        w = K._weight_tile(w_rows, s_rows, offs_n, 0, N, K_, DT, MX, B, SHIFT, POW_SHIFT, BLOCK_N, BLOCK_K)
        offs_k = tl.arange(0, BLOCK_K)
        tl.store(out_ptr + offs_n[:, None] * K_ + offs_k[None, :], w.to(tl.float32), mask=(offs_n < N)[:, None])


@triton_interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_e2m1_bit_placement_decodes_every_byte(dtype):
    from qcompile.plugins.fp4_gemm.kernel import TINY

    packed = torch.arange(256, dtype=torch.uint8)  # every (low, high) nibble pair
    out = torch.empty(512)
    want = F.e2m1_decode(F.unpack_codes(packed))
    if dtype != torch.float32:  # the bit placement alone (the interpreter's bf16 arithmetic is broken)
        bits = torch.empty(512, dtype=torch.int32)
        _pairs16[(1,)](packed, bits, W=64, EM_SHIFT=6 if dtype == torch.bfloat16 else 9,
                       DT=tl.bfloat16 if dtype == torch.bfloat16 else tl.float16)
        vals = bits.to(torch.int16).view(dtype).to(torch.float32) * 2.0 ** TINY[dtype]
        got = vals.reshape(8, 64).t().reshape(-1)
        assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))
    if dtype == torch.bfloat16:
        return
    _decode_words[(1,)](packed, torch.tensor([2.0 ** TINY[dtype]], dtype=dtype), out, W=64)
    assert torch.equal(out, want) and torch.equal(torch.signbit(out), torch.signbit(want))


@triton_interp
@pytest.mark.parametrize("mx", [False, True], ids=["e4m3", "e8m0"])
def test_scale_multiplier_of_every_scale_code(mx):
    bits = torch.arange(256, dtype=torch.uint8)
    scales = bits if mx else bits.view(torch.float8_e4m3fn)
    shift = 110 if mx else 117  # the largest shifts used (bf16 / fp32 tiles)
    out = torch.empty(256)
    _scale_mult[(1,)](scales, out, MX=mx, SHIFT=shift, POW_SHIFT=2.0 ** shift)
    want = F.decode_scales(scales).double() * 2.0 ** shift
    valid = (bits < 145) if mx else (bits & 0x7F) < 0x7F  # E8M0: the multiplier's range; E4M3: not NaN
    if not mx:
        valid &= bits < 0x80  # block scales are positive
    assert torch.equal(out.double()[valid], want[valid])
    if mx:
        assert torch.isnan(out[255])


@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_weight_tile_is_exact_for_every_code_and_scale(fmt, dtype):
    """The tile the MMA sees (`e2m1 * scale * 2**-X` in the MMA dtype) is exact: all 16 codes x every
    positive E4M3 scale (NVFP4), every E8M0 scale of the documented range (MXFP4)."""
    from qcompile.plugins.fp4_gemm import kernel

    if dtype == torch.bfloat16 and not torch.cuda.is_available():
        pytest.skip("the interpreter's bf16 arithmetic is broken; test_cuda_each_kernel_path covers bf16")
    mx = fmt == "mxfp4"
    block = F.MXFP4_BLOCK if mx else F.NVFP4_BLOCK
    if mx:
        lo, hi = (127 - 117, 127 + 17) if dtype != torch.float16 else (127 - 19, 127 + 5)
        scale_bits = torch.arange(lo, hi + 1, dtype=torch.uint8)
    else:
        scale_bits = torch.arange(0, 0x7F, dtype=torch.uint8)  # every positive finite E4M3
    n, k = scale_bits.numel(), kernel.BLOCK_K
    codes = torch.arange(k).remainder(16).to(torch.uint8).expand(n, k)  # every code in every block
    w_scale = scale_bits[:, None].expand(n, k // block).contiguous()
    w_scale = w_scale if mx else w_scale.view(torch.float8_e4m3fn)
    w_packed = F.pack_codes(codes).contiguous()
    fa = kernel._format_args(w_scale, None, block, dtype)
    out = torch.empty(n, k)
    tl_dt = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
    _tile[(triton.cdiv(n, 16),)](w_packed, w_scale, out, n, k, DT=tl_dt, MX=mx, B=block, SHIFT=fa["SHIFT"],
                                       POW_SHIFT=fa["POW_SHIFT"], BLOCK_N=16, BLOCK_K=k)
    case = {"w_packed": w_packed, "w_scale": w_scale, "w_global": None, "block": block}
    want = weight64(case) / fa["POW_ACC"]
    np.testing.assert_array_equal(out.double().numpy(), want)


# ---------------------------------------------------------------- kernel paths vs float64 (interpreter)

INTERP_DTYPES = [torch.float32, torch.float16]


@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("path", ["small", "mid", "wide"])
@pytest.mark.parametrize("m", [1, 3, 17, 70])
def test_gemm_kernel_paths_interpreter(fmt, dtype, path, m):
    from qcompile.plugins.fp4_gemm import kernel

    case = make_case(fmt, k=384, n=72, seed=m)  # 3 K steps (a partial last split), a partial N tile
    x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(72) if m % 2 else None
    cfg = getattr(kernel, path.upper())
    for sms in (1, 132) if dtype == torch.float16 else (132,):  # split_k = 1 (store in x.dtype), > 1 (atomics)
        y = kernel.launch_gemm(x, *args(case), bias, case["block"], cfg, num_sms=sms)
        assert y.shape == (m, 72) and y.dtype in (torch.float32, dtype)
        assert_rel_l2(y.to(dtype), oracle(x, case, bias), dtype)


@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("path", ["small", "mid", "wide"])
@pytest.mark.parametrize("m", [3, 17])
def test_gemm_kernel_whole_tiles_take_the_unmasked_loads(fmt, path, m):
    """N a multiple of the tile and K split evenly: the kernel runs with EVEN (no weight masks) and still
    matches float64, split K included."""
    from qcompile.plugins.fp4_gemm import kernel

    case = make_case(fmt, k=512, n=128, seed=m)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to(torch.float16)
    cfg = getattr(kernel, path.upper())
    seen = []
    spy = launch_spy(lambda grid, kw: seen.append((grid[1], kw["EVEN"])))
    for sms in (1, 132):
        y = kernel.launch_gemm(x, *args(case), None, case["block"], cfg, wrap=spy, num_sms=sms)
        assert_rel_l2(y.to(torch.float16), oracle(x, case), torch.float16)
    assert all(even for _, even in seen) and any(splits > 1 for splits, _ in seen), seen


@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequant_kernel_interpreter(fmt, dtype):
    from qcompile.plugins.fp4_gemm import kernel
    from qcompile.plugins.fp4_gemm.reference import dequantize_weight

    case = make_case(fmt, k=320, n=72)
    got = kernel.launch_dequant(*args(case), case["block"], dtype)
    want = dequantize_weight(*args(case), case["block"], dtype)
    if fmt == "mxfp4" or dtype != torch.float32:
        assert torch.equal(got, want)
    else:  # NVFP4 fp32: (e2m1 * scale) * global vs e2m1 * (scale * global): one fp32 rounding apart
        torch.testing.assert_close(got, want, rtol=2 ** -23, atol=0)


@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m", [1, 17, 70])
def test_triton_path_every_bucket_interpreter(fmt, m, monkeypatch):
    """`fp4_gemm_triton` end to end (leading dims, bias); LARGE_M_MIN lowered so M = 70 takes the dequantize +
    matmul path."""
    from qcompile.plugins.fp4_gemm import kernel

    monkeypatch.setattr(kernel, "LARGE_M_MIN", 64)
    case = make_case(fmt, k=256, n=48, seed=m)
    x = torch.randn(2, m, 256, generator=torch.Generator().manual_seed(m), dtype=torch.float16)
    bias = torch.randn(48)
    y = kernel.fp4_gemm_triton(x, *args(case), bias, case["block"])
    assert y.dtype == torch.float16 and y.shape == (2, m, 48)
    assert_rel_l2(y, oracle(x, case, bias), torch.float16)


def gemv_x(dtype, k: int, seed: int) -> torch.Tensor:
    """One row of x with a wide range: fp16 from 1e-4 to 1e4 with an outlier channel; bf16 also at 1e-6 and 1e6
    (outside fp16's range: the GEMV's per-column power of two must bring them in)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, k, generator=g) * torch.logspace(-4, 4, k)[torch.randperm(k, generator=g)]
    x[0, 7] = 9000.0
    if dtype == torch.bfloat16:
        x[0, : k // 4] *= 1e-2
        x[0, k // 4: k // 2] *= 100.0
    return x.to(dtype)


@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_gemv_interpreter(fmt, dtype, has_bias):
    """The M = 1 GEMV (`gemv.py`: x's pairs, then the fp16x2 arithmetic emulated) against float64: two rows of x
    (grid axis 1), x over eight decades, several K steps with a partial last one, a partial tile of weight rows."""
    from qcompile.plugins.fp4_gemm import gemv

    case = make_case(fmt, k=640, n=76, seed=3)
    x = torch.cat([gemv_x(dtype, 640, 1), gemv_x(dtype, 640, 2)])
    bias = torch.randn(76) if has_bias else None
    y = gemv.launch_gemv(x, *args(case), bias, case["block"], dict(gemv.GEMV, BLOCK_U=16))
    assert y.dtype == dtype and y.shape == (2, 76)
    assert_rel_l2(y, oracle(x, case, bias), dtype)


@triton_interp
def test_gemv_extreme_mxfp4_scales_interpreter():
    """E8M0 scales from 2**-127 (code 0) to 2**100 in one weight (bf16 x and output: the sums reach 1e31): the
    GEMV's 2**16 shift keeps code 0 a normal fp32."""
    from qcompile.plugins.fp4_gemm import gemv

    case = make_case("mxfp4", k=256, n=16, seed=4)
    case["w_scale"] = torch.randint(0, 228, case["w_scale"].shape, generator=torch.Generator().manual_seed(4),
                                    dtype=torch.uint8)
    case["w_scale"][:, 0] = 0
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    y = gemv.launch_gemv(x, *args(case), None, case["block"]).double().numpy()
    np.testing.assert_allclose(y, oracle(x, case), rtol=1e-2, atol=0)  # bf16 output: 2**-9 relative


# ---------------------------------------------------------------- dispatch with a dynamic M (CPU, no kernels)

@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_body_dispatch_traces_with_dynamic_rows(monkeypatch, dtype):
    """The M dispatch (nested torch.cond on a symbolic M) exported with a dynamic M; the kernel launches
    replaced by torch stand-ins that mark their bucket, so it runs on CPU. 16-bit x adds the M = 1 GEMV."""
    from qcompile.plugins.fp4_gemm import gemv, kernel
    from qcompile.plugins.fp4_gemm.reference import dequantize_weight

    def gemv_stand_in(x2d, w_packed, w_scale, w_global, bias, block, **_):  # marker: 7
        y = x2d.float() @ dequantize_weight(w_packed, w_scale, w_global, block).t() + 7.0
        return (y if bias is None else y + bias).to(x2d.dtype)

    def gemm(x2d, w_packed, w_scale, w_global, bias, block, cfg, **_):  # marker: the configuration's BLOCK_M
        y = x2d.float() @ dequantize_weight(w_packed, w_scale, w_global, block).t() + cfg["BLOCK_M"]
        return y if bias is None else y + bias

    def dequant(w_packed, w_scale, w_global, block, dtype, **_):  # dequantize + matmul: no marker
        return dequantize_weight(w_packed, w_scale, w_global, block, dtype)

    monkeypatch.setattr(kernel, "launch_gemm", gemm)
    monkeypatch.setattr(kernel, "launch_dequant", dequant)
    monkeypatch.setattr(gemv, "launch_gemv", gemv_stand_in)
    case = make_case("nvfp4", k=64, n=24)
    bias = torch.randn(24)

    class Body(torch.nn.Module):
        def forward(self, x):
            return kernel.fp4_gemm_triton(x, *args(case), bias, case["block"])

    rows = torch.export.Dim("rows", min=1, max=4096)
    ep = torch.export.export(Body(), (torch.randn(5, 64, dtype=dtype),), dynamic_shapes=({0: rows},))
    assert sum(n.target is torch.ops.higher_order.cond for n in ep.graph.nodes) == 1  # the outer cond
    small, mid, wide = kernel.SMALL["BLOCK_M"], kernel.MID["BLOCK_M"], kernel.WIDE["BLOCK_M"]
    large, mid_max = kernel.LARGE_M_MIN, kernel.MID_M_MAX
    want = {1: 7.0 if dtype == torch.float16 else small, 2: small, 16: small, 17: mid, mid_max: mid,
            mid_max + 1: wide, large - 1: wide, large: 0.0, 1500: 0.0}
    for m, marker in want.items():
        x = torch.randn(m, 64).to(dtype)
        got = ep.module()(x).double().numpy() - marker
        atol = 2e-4 if dtype == torch.float32 else 0.1  # fp16 outputs round; the markers are >= 7 apart
        np.testing.assert_allclose(got, oracle(x, case, bias), rtol=0, atol=atol)
    assert len(set(want.values())) == (5 if dtype == torch.float16 else 4)  # every bucket was reached


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 70, 128, 200])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_cuda_op_matches_float64(fmt, dtype, m, has_bias):
    case = make_case(fmt, k=512, n=320, seed=m)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(320) if has_bias else None
    dev = [t.cuda() if t is not None else None for t in (x, *args(case), bias)]
    y = torch.ops.qcompile.fp4_gemm(dev[0], *dev[1:4], None, dev[4], case["block"])
    assert y.dtype == dtype and y.device.type == "cuda" and y.shape == (m, 320)
    assert_rel_l2(y, oracle(x, case, bias), dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["small", "mid", "wide", "dequant"])
@pytest.mark.parametrize("m", [1, 3, 17, 70])
def test_cuda_each_kernel_path(fmt, dtype, path, m):
    from qcompile.plugins.fp4_gemm import kernel

    case = make_case(fmt, k=4096, n=384, seed=m)
    x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(384) if m % 2 else None
    dev = [t.cuda() if t is not None else None for t in (x, *args(case), bias)]
    if path == "dequant":
        w = kernel.launch_dequant(*dev[1:4], case["block"], dtype)
        y = dev[0] @ w.t() + (0 if bias is None else dev[4].to(dtype))
    else:
        cfg = getattr(kernel, path.upper())
        y = kernel.launch_gemm(dev[0], *dev[1:4], dev[4], case["block"], cfg, num_sms=132).to(dtype)
    assert_rel_l2(y, oracle(x, case, bias), dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
def test_cuda_gemv_wide_range_x(fmt, dtype, has_bias):
    """The op at M = 1 (the fp16x2 GEMV's inline PTX) on K = 4096 with x over eight decades (bf16 also beyond
    fp16's range) against float64."""
    case = make_case(fmt, k=4096, n=264, seed=6)
    x = gemv_x(dtype, 4096, 7)
    bias = torch.randn(264) if has_bias else None
    dev = [t.cuda() if t is not None else None for t in (x, *args(case), bias)]
    y = torch.ops.qcompile.fp4_gemm(dev[0], *dev[1:4], None, dev[4], case["block"])
    assert y.dtype == dtype and y.shape == (1, 264)
    assert_rel_l2(y, oracle(x, case, bias), dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", FMTS)
def test_cuda_aoti_package_dynamic_rows(tmp_path, fmt):
    """fp16 x with a dynamic row count through AOTInductor: the GEMV's inline PTX (M = 1) and the tile and
    dequantize paths compiled into one package, each against float64."""
    case = make_case(fmt, k=512, n=192, seed=8)
    weights = [t.cuda() if t is not None else None for t in args(case)]
    bias = torch.randn(192, device="cuda", dtype=torch.float16)

    class Fp4Linear(torch.nn.Module):
        def forward(self, x):
            return torch.ops.qcompile.fp4_gemm(x, *weights, None, bias, case["block"])

    rows = torch.export.Dim("rows", min=1, max=4096)
    ep = torch.export.export(Fp4Linear(), (torch.randn(4, 512, device="cuda", dtype=torch.float16),),
                             dynamic_shapes=({0: rows},))
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "fp4.pt2"))
    compiled = torch._inductor.aoti_load_package(path)
    for m in (1, 5, 40, 1100):
        x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to(torch.float16)
        assert_rel_l2(compiled(x.cuda()), oracle(x, case, bias.cpu()), torch.float16)


@pytest.mark.gpu
@cuda
def test_cuda_aoti_package_with_batch_and_sequence_dims_on_a_tma_layer(tmp_path):
    """x [batch, seq, K] with both dims dynamic and seq from 1, as every engine's x, on planar words with K = 8192,
    where 17-64 rows take the TMA tile (`kernel.MID_TMA`): the package compiles (the rows' stride was
    Min(K, K * seq), which AOTInductor wrote verbatim into C++ descriptors) and matches float64 in every bucket."""
    case = planar_case("nvfp4", k=8192, n=256, seed=4)
    weights = [t.cuda() if t is not None else None for t in args(case)]
    bias = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    compiled = aoti_fp4_linear(weights, bias, case["block"], 8192, tmp_path / "fp4_bs.pt2", batch_and_seq=True)
    for b, s in ((1, 1), (2, 5), (4, 10), (2, 50), (3, 100)):  # 1, 10, 40, 100, 300 rows
        x = torch.randn(b, s, 8192, generator=torch.Generator().manual_seed(s)).to(torch.bfloat16)
        y = compiled(x.cuda())
        assert y.shape == (b, s, 256)
        assert_rel_l2(y.reshape(b * s, 256), oracle(x.reshape(b * s, 8192), case, bias.cpu()), torch.bfloat16)


@pytest.mark.gpu
@cuda
def test_cuda_w4a4_goes_through_the_kernel():
    from qcompile.algorithms.fp4 import nvfp4_global_scale
    from qcompile.plugins.fp4_gemm.reference import fp4_gemm_reference

    case = make_case("nvfp4", k=512, n=256)
    x = torch.randn(5, 512, dtype=torch.bfloat16)
    xg = nvfp4_global_scale(x.float().abs().amax())
    y = torch.ops.qcompile.fp4_gemm(x.cuda(), *[t.cuda() for t in args(case)], xg.cuda(), None, case["block"])
    ref = fp4_gemm_reference(x.float(), *args(case), xg, None, case["block"]).double().numpy()
    assert_rel_l2(y, ref, torch.bfloat16)


@pytest.mark.gpu
@cuda
def test_cuda_w4a4_aoti_package_with_its_activation_scale_a_0d_constant(tmp_path):
    """W4A4 compiled as engines compile it: x_global a 0-d buffer of the module, which Inductor inlines as a scalar
    (the mlp-large nvfp4 engine failed with "'<=' not supported between instances of 'Constant' and 'int'"); every
    row bucket against the plain-torch reference in float32."""
    from qcompile.algorithms.fp4 import nvfp4_global_scale
    from qcompile.plugins.fp4_gemm.reference import fp4_gemm_reference

    case = make_case("nvfp4", k=512, n=256, seed=9)
    xg = nvfp4_global_scale(torch.tensor(4.0)).reshape(())
    weights = [t.cuda() for t in args(case)]
    compiled = aoti_fp4_linear(weights, None, case["block"], 512, tmp_path / "w4a4.pt2", x_global=xg.cuda())
    for m in (1, 5, 40, 300):
        x = torch.randn(m, 512, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        ref = fp4_gemm_reference(x.float(), *args(case), xg, None, case["block"]).double().numpy()
        assert_rel_l2(compiled(x.cuda()), ref, torch.bfloat16)


@fake_cuda_export
@pytest.mark.parametrize("dynamic_rows", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("fmt, w4a4", [("nvfp4", False), ("mxfp4", False), ("nvfp4", True)],
                         ids=["nvfp4", "mxfp4", "w4a4"])
def test_gpu_launches_export_on_fake_cuda_tensors(monkeypatch, fmt, w4a4, dynamic_rows):
    """The CUDA body as an engine's export traces it (dynamic: the M buckets in torch.cond; static, an engine with
    fixed shapes: one bucket's launches at the top of the graph, where AOTInductor would inline a 0-d scale), the
    Triton launches included, without a GPU: both weight formats, and W4A4's activation quantization."""
    case = make_case(fmt, k=512, n=256)
    x_global = torch.tensor(0.01) if w4a4 else None
    weights = (*args(case), x_global, torch.randn(256), case["block"])
    x = torch.randn(8, 512).to(torch.bfloat16)
    assert export_on_fake_cuda(monkeypatch, torch.ops.qcompile.fp4_gemm, weights, x,
                               dynamic_rows=dynamic_rows) == [torch.ops.qcompile.fp4_gemm.default]
