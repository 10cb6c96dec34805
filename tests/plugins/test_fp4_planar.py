"""FP4 planar words (`format.to_planar_words`) and the kernels that read them (`planar.py`, `one_dot.py`, the tile and
dequantize kernels with PLANAR): the layout against its definition, round trips, every code's decoding and every
scale's multiplier, each path against float64, the lowering's opt-in layout, and the op on CUDA. Interpreter tests
run with TRITON_INTERPRET=1 on CPU (skipped without triton: CI); bf16 arithmetic runs on the GPU only."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fp4_testutil import (FMTS, HAS_TRITON, aoti_fp4_linear, args, assert_rel_l2, cuda, fused_fp4_model, make_case,
                          oracle, planar_case, triton_interp)
from qc_testutil import exported_op_arg, fake_cuda_export, launch_spy
from qcompile.plugins.fp4_gemm import format as F
from qcompile.plugins.fp4_gemm.reference import fp4_gemm_reference


def random_bytes_and_scales(fmt: str, n: int, k: int, seed: int = 0, zero_scales: bool = False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    if fmt == "mxfp4":
        return w, torch.randint(100, 140, (n, k // 32), generator=g, dtype=torch.uint8)
    bits = torch.randint(0 if zero_scales else 1, 0x7F, (n, k // 16), generator=g, dtype=torch.uint8)
    return w, bits.view(torch.float8_e4m3fn)


# ---------------------------------------------------------------- the layout (CPU)

def test_planar_words_place_each_code_as_defined():
    """One nonzero code at a time: k = 64 b + 16 j + 2 c + t lands in word 8 b + c, its bits (m, e0, e1, s) at
    PLANAR_BITS[j] + 16 t (the format's definition, written out independently of `to_planar_words`)."""
    n, k = 1, 128
    scale = torch.ones(n, k // 32, dtype=torch.uint8) * 127  # MXFP4: no codes zeroed
    for kk in range(k):
        for code in (1, 2, 4, 8, 15):
            codes = torch.zeros(n, k, dtype=torch.uint8)
            codes[0, kk] = code
            words = F.to_planar_words(F.pack_codes(codes), scale).to(torch.int64) & 0xFFFFFFFF
            b, j, c, t = kk // 64, (kk % 64) // 16, (kk % 16) // 2, kk % 2
            want = torch.zeros(k // 8, dtype=torch.int64)
            want[8 * b + c] = sum(((code >> bit) & 1) << (pos + 16 * t) for bit, pos in enumerate(F.PLANAR_BITS[j]))
            assert torch.equal(words[0], want), (kk, code)


@pytest.mark.parametrize("fmt", FMTS)
def test_planar_words_round_trip_bit_exact(fmt):
    w, s = random_bytes_and_scales(fmt, 24, 384, seed=1)
    words = F.to_planar_words(w, s)
    assert words.dtype == torch.int32 and words.shape == (24, 48) and F.is_planar(words)
    assert torch.equal(F.from_planar_words(words), w) and torch.equal(F.engine_bytes(words), w)
    assert torch.equal(F.engine_bytes(w), w) and not F.is_planar(w)


def test_zero_scale_blocks_get_zero_codes_and_the_same_weights():
    from qcompile.plugins.fp4_gemm.reference import dequantize_weight

    w, s = random_bytes_and_scales("nvfp4", 16, 256, seed=2, zero_scales=True)
    assert bool((s.view(torch.uint8) == 0).any())
    back = F.from_planar_words(F.to_planar_words(w, s))
    zero_k = (s.view(torch.uint8) == 0).repeat_interleave(16, dim=1)
    codes, back_codes = F.unpack_codes(w), F.unpack_codes(back)
    assert torch.equal(back_codes[~zero_k], codes[~zero_k]) and not bool(back_codes[zero_k].any())
    g = torch.tensor(0.01)
    assert torch.equal(dequantize_weight(back, s, g, 16), dequantize_weight(w, s, g, 16))


def test_planar_words_need_k_multiple_of_64_and_the_op_128():
    with pytest.raises(ValueError, match="multiple of 64"):
        F.to_planar_words(torch.zeros(2, 48, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8))
    w, s = random_bytes_and_scales("mxfp4", 8, 192)
    with pytest.raises(ValueError, match="multiple of 128"):
        fp4_gemm_reference(torch.randn(2, 192), F.to_planar_words(w, s), s, None, None, None, 32)


@pytest.mark.parametrize("fmt", FMTS)
def test_reference_takes_planar_words(fmt):
    """The op's CPU path on planar words gives the same bits as on the ONNX bytes."""
    case = make_case(fmt, k=256, n=40, seed=3)
    x, bias = torch.randn(3, 256), torch.randn(40)
    words = F.to_planar_words(case["w_packed"], case["w_scale"])
    want = torch.ops.qcompile.fp4_gemm(x, *args(case), None, bias, case["block"])
    got = torch.ops.qcompile.fp4_gemm(x, words, *args(case)[1:], None, bias, case["block"])
    assert torch.equal(got, want)


def test_nvfp4_bf16_multiplier_formula_every_scale():
    """The integer steps of the NVFP4 bf16 multiplier's PTX (`planar._asm_nv_bf16`: fp16 bits of the E4M3 value
    >> 3, + 0x7280) give s * 2**117 for every positive E4M3 scale (E4M3 values leave the low 3 fp16 bits 0)."""
    s = torch.arange(1, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn)
    f16 = s.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    assert not bool((f16 & 7).any())
    bf = ((f16 >> 3) + 0x7280).to(torch.int16).view(torch.bfloat16).double()
    assert torch.equal(bf, s.double() * 2.0 ** 117)


# ---------------------------------------------------------------- the lowering's opt-in layout (CPU)

def test_lowering_stores_planar_words_when_asked():
    from qcompile.lowering import lower_onnx

    fused = fused_fp4_model()
    assert [n.op_type for n in fused.graph.node] == ["Fp4Gemm"]
    x = torch.randn(2, 128)
    plain = lower_onnx(fused)
    planar = lower_onnx(fused, fp4_layout="planar")
    assert {tuple(b.shape) for b in plain.buffers() if b.dtype == torch.uint8} == {(32, 64)}
    assert [tuple(b.shape) for b in planar.buffers() if b.dtype == torch.int32] == [(32, 16)]
    assert not any(b.dtype == torch.uint8 for b in planar.buffers())
    assert torch.equal(planar(x)[0], plain(x)[0])


@pytest.mark.parametrize("flag", [False, True])
def test_lowering_hands_fp8_large_m_to_the_op(flag):
    """`lower_onnx(fp8_large_m=...)` reaches the op call that engines export (`qcompile build --fp8-large-m`)."""
    from qcompile.lowering import lower_onnx

    prog = lower_onnx(fused_fp4_model(), fp8_large_m=flag)
    assert exported_op_arg(prog, torch.randn(2, 128), torch.ops.qcompile.fp4_gemm, "fp8_large_m") is flag


def test_engine_options_are_row_pairs_fp16_for_cuda_unless_forced():
    from qcompile.lowering import LoweringOptions

    cuda, cuda1, cpu = (LoweringOptions.for_engine(d) for d in ("cuda", "cuda:1", "cpu"))
    assert (cuda.fp4_layout, cuda1.fp4_layout, cpu.fp4_layout) == ("pairs", "pairs", "bytes")
    assert (cuda.compute_dtype, cpu.compute_dtype) == (torch.float16, None)
    assert LoweringOptions.for_engine("cuda", fp4_layout="bytes").fp4_layout == "bytes"
    assert LoweringOptions.for_engine("cpu", fp4_layout="planar", fp8_large_m=True) == \
        LoweringOptions(compute_dtype=None, fp8_large_m=True, fp4_layout="planar")
    with pytest.raises(ValueError, match="fp4_layout 'nibbles' is not an FP4 engine layout"):
        LoweringOptions(fp4_layout="nibbles")


@pytest.mark.parametrize("layout", [None, "planar", "pairs"])
def test_pipeline_lowers_in_the_devices_layout_or_the_one_asked(monkeypatch, tmp_path, layout):
    """A CPU engine gets byte codes unless `build(fp4_layout=...)` asks for planar words or row pairs (then the
    layers whose K is a multiple of 128 hold int32 words, 4-D for row pairs), and its manifest says which (the
    engine compile is stubbed out: the lowered program is what is checked)."""
    import qcompile.engine
    from qcompile.pipeline import build

    class Lowered(Exception):
        pass

    def stop(program, *args, manifest, **kwargs):
        raise Lowered(sorted({str(b.dtype) for b in program.buffers()}), manifest["fp4_layout"],
                      {b.dim() for b in program.buffers() if b.dtype == torch.int32})

    monkeypatch.setattr(qcompile.engine, "build_engine", stop)
    with pytest.raises(Lowered) as lowered:
        build("tiny-llama", "w4a16_nvfp4", output=tmp_path / "e.engine", device="cpu", calib="random",
              fp4_layout=layout)
    dtypes, recorded, word_ranks = lowered.value.args
    assert "torch.uint8" in dtypes and ("torch.int32" in dtypes) == (layout is not None)
    assert word_ranks == {None: set(), "planar": {2}, "pairs": {4}}[layout]
    assert recorded == (layout or "bytes")
    assert not (tmp_path / "e.engine").exists()


def test_build_rejects_an_unknown_fp4_layout_before_any_work(tmp_path):
    from qcompile.errors import QCompileError
    from qcompile.pipeline import build

    with pytest.raises(QCompileError, match="fp4_layout 'nibbles'"):
        build("tiny-llama", "w4a16_nvfp4", output=tmp_path / "e.engine", device="cpu", fp4_layout="nibbles")
    assert list(tmp_path.iterdir()) == []


def test_lowering_keeps_bytes_when_k_is_not_a_multiple_of_128():
    from qcompile.lowering import lower_onnx

    program = lower_onnx(fused_fp4_model(k=192), fp4_layout="planar")
    assert [tuple(b.shape) for b in program.buffers() if b.dtype == torch.uint8] == [(32, 96)]


# ---------------------------------------------------------------- decoding, exhaustively (interpreter)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from qcompile.plugins.fp4_gemm import planar as P

    @triton.jit
    def _pairs(w_ptr, out_ptr, W: tl.constexpr, FP16: tl.constexpr):
        """Pair j of word i by `planar.pair_bits`, its int32 stored at out[j * W + i]."""
        i = tl.arange(0, W)
        words = tl.load(w_ptr + i)
        for j in tl.static_range(4):
            tl.store(out_ptr + j * W + i, P.pair_bits(words, j, FP16))

    @triton.jit
    def _mx_multipliers(out_ptr, FP16: tl.constexpr):
        """`planar._mx_pair` of every E8M0 byte (byte 1 of a word: the shift is exercised)."""
        e = tl.arange(0, 256)
        tl.store(out_ptr + e, P._mx_pair(e << 8, 1, FP16))


@triton_interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pair_bits_decode_every_code(dtype):
    """Every code in every pair position and half of a word: bf16 `e2m1 * 2**-126`, fp16 `e2m1 * 2**-14` (the bits
    read back in torch, subnormals included)."""
    n, k = 16, 256
    codes = (torch.arange(n * k) % 16).reshape(n, k).to(torch.uint8)
    codes = codes[:, torch.randperm(k, generator=torch.Generator().manual_seed(0))]
    words = F.to_planar_words(F.pack_codes(codes), torch.full((n, k // 32), 127, dtype=torch.uint8)).reshape(-1)
    out = torch.empty(4 * words.numel(), dtype=torch.int32)
    _pairs[(1,)](words, out, W=words.numel(), FP16=dtype == torch.float16)
    tiny = 126 if dtype == torch.bfloat16 else 14
    pairs = out.reshape(4, n, k // 64, 8)  # [j, row, chunk, c]
    for t in range(2):
        got = ((pairs >> (16 * t)) & 0xFFFF).to(torch.int16).view(dtype).double() * 2.0 ** tiny
        want = F.e2m1_decode(codes.reshape(n, k // 64, 4, 8, 2)[..., t]).double()  # [row, chunk, j, c]
        got = got.permute(1, 2, 0, 3)
        assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want)), t


@triton_interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mx_multiplier_of_every_scale_code(dtype):
    """E8M0 e as a pair multiplier 2**(e - 127) * 2**(TINY - X) in both halves: exact in the documented range (bf16
    e <= 144, fp16 103..132), +Inf above it, and 0 below it in fp16."""
    out = torch.empty(256, dtype=torch.int32)
    fp16 = dtype == torch.float16
    _mx_multipliers[(1,)](out, FP16=fp16)
    lo = (out & 0xFFFF).to(torch.int16).view(dtype).double()
    hi = ((out >> 16) & 0xFFFF).to(torch.int16).view(dtype).double()
    assert torch.equal(lo, hi)
    e = torch.arange(256).double()
    tiny, x = (14, 4) if fp16 else (126, 16)
    want = 2.0 ** (e - 127 + tiny - x)
    exact = (e >= 103) & (e <= 132) if fp16 else e <= 144
    assert torch.equal(lo[exact], want[exact])
    assert bool(torch.isinf(lo[e > (132 if fp16 else 144)]).all())
    if fp16:
        assert not bool(lo[e < 103].any())


# ---------------------------------------------------------------- kernel paths vs float64 (interpreter)

@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("m", [1, 5, 20])
def test_one_dot_kernel_interpreter(fmt, m):
    """`one_dot.launch` in fp16: a partial N tile (masks) with K split unevenly (the last split's steps past K), and
    whole tiles and splits (EVEN, no masks), each against float64; with "finish" (the kernel writes fp16 y + bias,
    `kernel.finished`) within one fp16 rounding of the fp32 result cast."""
    from qcompile.plugins.fp4_gemm import one_dot

    for n, k, cfg, even in ((80, 1152, dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2, waves=4), False),
                            (64, 1024, dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=2, waves=4), True)):
        case = planar_case(fmt, k, n, seed=m)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.float16)
        bias = torch.randn(n) if m % 2 else None
        seen = []
        spy = launch_spy(lambda grid, kw: seen.append((grid[1], kw["EVEN"], kw["FINISH"])))
        y = one_dot.launch(x, *args(case), bias, cfg, asm=False, wrap=spy, num_sms=2)
        y_out = one_dot.launch(x, *args(case), bias, cfg, asm=False, finish=True, wrap=spy, num_sms=2)
        assert seen[0][0] > 1 and seen[0][1] == even and seen[1][2] and not seen[0][2], seen  # split K
        assert_rel_l2(y.to(torch.float16), oracle(x, case, bias), torch.float16)
        assert y_out.dtype == torch.float16  # the bias after the splits' total, not with the first split
        torch.testing.assert_close(y_out, y.to(torch.float16), rtol=2.0 ** -10, atol=1e-5 * y.abs().max().item())


@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("row_words", [16, 32])
def test_one_dot_row_copies_interpreter(fmt, row_words):
    """"row_words": a row's words of a step in one copy, split into 64-K blocks in registers (32: 256-K steps), on a
    partial N tile with K split unevenly (steps past K), whole tiles and splits (EVEN), and K an odd number of 128-K
    steps (32 falls back to 16), each against float64."""
    from qcompile.plugins.fp4_gemm import one_dot

    for n, k, block_n, even, words in ((80, 1280, 64, False, row_words), (64, 1024, 32, True, row_words),
                                       (48, 1152, 16, False, 16)):
        cfg = dict(BLOCK_M=16, BLOCK_N=block_n, num_warps=4, num_stages=2, waves=4, row_words=row_words)
        case = planar_case(fmt, k, n, seed=n)
        x = torch.randn(5, k, generator=torch.Generator().manual_seed(n)).to(torch.float16)
        bias = torch.randn(n)
        seen = []
        y = one_dot.launch(x, *args(case), bias, cfg, asm=False, num_sms=2,
                           wrap=launch_spy(lambda grid, kw: seen.append((grid[1], kw["EVEN"], kw["ROW_WORDS"]))))
        assert seen[0][0] > 1 and seen[0][1:] == (even, words), seen  # split K
        assert_rel_l2(y.to(torch.float16), oracle(x, case, bias), torch.float16)


@triton_interp
@pytest.mark.filterwarnings("error::RuntimeWarning")  # an unmasked scale load past the weight reads garbage: NaN
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("row_words, k", [(8, 1152), (32, 1280)])
def test_one_dot_tma_loads_interpreter(fmt, row_words, k):
    """The TMA loads (the interpreter's descriptors) on a partial N tile with K split unevenly: zero fill past N and
    K for x and the words, the scales masked (no NaN from bytes past the weight), against float64; the words in
    [BLOCK_N, 8] boxes, or in [BLOCK_N, 32] with 256-K steps ("row_words" 32)."""
    from qcompile.plugins.fp4_gemm import one_dot

    case = planar_case(fmt, k, 96, seed=7)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(7)).to(torch.float16)
    cfg = dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2, waves=4, tma=dict(min_n=0, interpret=True),
               row_words=row_words)
    seen = []
    y = one_dot.launch(x, *args(case), None, cfg, asm=False, num_sms=2,
                       wrap=launch_spy(lambda grid, kw: seen.append((grid[1], kw["TMA"], kw["EVEN"], kw["ROW_WORDS"]))))
    assert seen[0][0] > 1 and seen[0][1:] == (True, False, row_words), seen
    assert_rel_l2(y.to(torch.float16), oracle(x, case), torch.float16)


@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype,m", [(torch.float16, 1), (torch.float16, 17), (torch.float16, 70),
                                     (torch.float16, 200), (torch.float32, 3), (torch.float32, 70)])
def test_op_gpu_body_on_planar_words_interpreter(fmt, dtype, m):
    """`fp4_gemm_triton` on planar words: 16-bit x takes the planar GEMV at M = 1 and the one-dot tiles above, fp32 x
    the tile kernel with PLANAR, and M from LARGE_M_MIN the planar dequantize kernel + matmul."""
    from qcompile.plugins.fp4_gemm import kernel

    case = planar_case(fmt, k=384, n=72, seed=m)
    x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(72)
    y = kernel.fp4_gemm_triton(x, *args(case), bias, case["block"], num_sms=4)
    assert y.dtype == dtype and y.shape == (m, 72)
    assert_rel_l2(y, oracle(x, case, bias), dtype)


@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
def test_planar_dequant_equals_the_byte_layouts(fmt):
    from qcompile.plugins.fp4_gemm import kernel

    case = make_case(fmt, k=640, n=40, seed=5)
    words = F.to_planar_words(case["w_packed"], case["w_scale"])
    for dtype in (torch.float32, torch.float16):
        want = kernel.launch_dequant(*args(case), case["block"], dtype)
        assert torch.equal(kernel.launch_dequant(words, *args(case)[1:], case["block"], dtype), want)


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 70, 128, 200])
@pytest.mark.parametrize("shape", [(1024, 320), (4096, 384)], ids=["1024x320", "4096x384"])
def test_cuda_planar_op_matches_float64(fmt, dtype, m, shape):
    """The op on planar words against float64, every M bucket."""
    k, n = shape
    case = planar_case(fmt, k, n, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(n) if m % 2 else None
    dev = [t.cuda() if t is not None else None for t in (x, *args(case), bias)]
    y = torch.ops.qcompile.fp4_gemm(dev[0], *dev[1:4], None, dev[4], case["block"])
    assert y.dtype == dtype and y.shape == (m, n)
    assert_rel_l2(y, oracle(x, case, bias), dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tile", [(16, 128), (64, 128), (128, 64)])
@pytest.mark.parametrize("row_words", [8, 16, 32])
def test_cuda_one_dot_tma_tiles(fmt, dtype, tile, row_words):
    """The one-dot kernel with TMA loads (rows past M and N zero-filled) against float64; the words in [BLOCK_N, 8]
    or [BLOCK_N, 16] boxes (the shipped TMA tiles', `kernel.SMALL_TMA` and `MID_TMA`), or [BLOCK_N, 32] with 256-K
    steps."""
    from qcompile.plugins.fp4_gemm import one_dot

    bm, bn = tile
    case = planar_case(fmt, 2048, 352, seed=bm)
    x = torch.randn(bm - 3, 2048, generator=torch.Generator().manual_seed(bm)).to(dtype)
    dev = [t.cuda() if t is not None else None for t in (x, *args(case))]
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=3, waves=2, tma=dict(min_n=0), row_words=row_words)
    seen = []
    y = one_dot.launch(*dev, None, cfg, asm=True,
                       wrap=launch_spy(lambda grid, kw: seen.append((kw["TMA"], kw["ROW_WORDS"]))))
    assert seen == [(True, row_words)]
    assert_rel_l2(y.to(dtype), oracle(x, case), dtype)
    y_out = one_dot.launch(*dev, None, cfg, asm=True, finish=True)  # the kernel writes y (`kernel.finished`)
    assert y_out.dtype == dtype
    assert_rel_l2(y_out, oracle(x, case), dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("row_words", [16, 32])
@pytest.mark.parametrize("tile", [(16, 128), (16, 64), (64, 64)])
def test_cuda_one_dot_row_copies(fmt, dtype, row_words, tile):
    """The one-dot kernel copying 16 or 32 words of each weight row a step (32: 256-K steps), split K, a partial N
    tile, fp32 partial sums and the finished y + bias, against float64."""
    from qcompile.plugins.fp4_gemm import one_dot

    bm, bn = tile
    case = planar_case(fmt, 2560, 352, seed=bm + row_words)
    x = torch.randn(bm - 3, 2560, generator=torch.Generator().manual_seed(bm)).to(dtype)
    bias = torch.randn(352)
    dev = [t.cuda() if t is not None else None for t in (x, *args(case))]
    cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=3, waves=4, row_words=row_words)
    seen = []
    y = one_dot.launch(*dev, bias.cuda(), cfg, asm=True, num_sms=132,
                       wrap=launch_spy(lambda grid, kw: seen.append((grid[1], kw["ROW_WORDS"]))))
    assert seen[0][0] > 1 and seen[0][1] == row_words, seen
    assert_rel_l2(y.to(dtype), oracle(x, case, bias), dtype)
    y_out = one_dot.launch(*dev, bias.cuda(), cfg, asm=True, finish=True)
    assert y_out.dtype == dtype
    assert_rel_l2(y_out, oracle(x, case, bias), dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt, k, finish", [("nvfp4", 1024, True), ("mxfp4", 1024, True), ("nvfp4", 8192, True),
                                            ("nvfp4", 1024, False)],
                         ids=["nvfp4", "mxfp4", "nvfp4-k8192", "nvfp4-unfinished"])
def test_cuda_aoti_package_planar_dynamic_rows(tmp_path, monkeypatch, fmt, k, finish):
    """bf16 x with a dynamic row count through AOTInductor on planar words: the planar GEMV, the one-dot tiles and
    the planar dequantize path in one package, each against float64. At K = 8192 the 2-16- and 17-64-row buckets
    load through their TMA tiles (`kernel.SMALL_TMA`, its N bound lowered to this layer's; `kernel.MID_TMA`). The
    one-dot tiles write y + bias themselves as shipped; unfinished: fp32 partial sums and a cast kernel
    (`kernel.finished`)."""
    from qcompile.plugins.fp4_gemm import kernel

    configs = [(limit, dict(cfg, tma=dict(cfg["tma"], min_n=0)) if "tma" in cfg else cfg)
               for limit, cfg in kernel.finished(finish=finish)]
    monkeypatch.setattr(kernel, "ONE_DOT", configs)
    case = planar_case(fmt, k=k, n=256, seed=8)
    weights = [t.cuda() if t is not None else None for t in args(case)]
    bias = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    compiled = aoti_fp4_linear(weights, bias, case["block"], k, tmp_path / "fp4_planar.pt2")
    for m in (1, 5, 40, 100, 1100):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        assert_rel_l2(compiled(x.cuda()), oracle(x, case, bias.cpu()), torch.bfloat16)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_planar_dispatch_traces_with_dynamic_rows(monkeypatch):
    """The M buckets on planar words exported with a dynamic M (kernel launches replaced by torch stand-ins that mark
    their bucket, so it runs on CPU): the planar GEMV at M = 1, every one-dot tile up to LARGE_M_MIN - 1, then
    dequantize + matmul."""
    from qcompile.plugins.fp4_gemm import gemv_planar, kernel, one_dot
    from qcompile.plugins.fp4_gemm.reference import dequantize_weight

    def one_dot_stand_in(x2d, words, w_scale, w_global, bias, cfg, **_):  # marker: the tile's BLOCK_M
        y = x2d.float() @ dequantize_weight(words, w_scale, w_global, 16).t() + cfg["BLOCK_M"]
        return y if bias is None else y + bias

    def gemv_stand_in(x2d, words, w_scale, w_global, bias, block, **_):  # marker: 7
        return one_dot_stand_in(x2d, words, w_scale, w_global, bias, dict(BLOCK_M=7)).to(x2d.dtype)

    monkeypatch.setattr(one_dot, "launch", one_dot_stand_in)
    monkeypatch.setattr(gemv_planar, "launch_gemv_planar", gemv_stand_in)
    monkeypatch.setattr(kernel, "launch_dequant", lambda w, s, g, block, dtype, **_: dequantize_weight(w, s, g, block,
                                                                                                        dtype))
    case = planar_case("nvfp4", k=128, n=24)
    bias = torch.randn(24)

    class Body(torch.nn.Module):
        def forward(self, x):
            return kernel.fp4_gemm_triton(x, *args(case), bias, case["block"])

    rows = torch.export.Dim("rows", min=1, max=4096)
    ep = torch.export.export(Body(), (torch.randn(5, 128, dtype=torch.float16),), dynamic_shapes=({0: rows},))
    (m16, c16), (m64, c64), (m128, c128) = kernel.ONE_DOT
    want = {1: 7.0, 2: c16["BLOCK_M"], m16: c16["BLOCK_M"], m16 + 1: c64["BLOCK_M"], m64: c64["BLOCK_M"],
            m64 + 1: c128["BLOCK_M"], m128: c128["BLOCK_M"], m128 + 1: 0.0, 1500: 0.0}
    assert m128 == kernel.LARGE_M_MIN - 1 and len(set(want.values())) == 5
    for m, marker in want.items():
        x = torch.randn(m, 128).to(torch.float16)
        got = ep.module()(x).double().numpy() - marker
        np.testing.assert_allclose(got, oracle(x, case, bias), rtol=0, atol=0.1)  # fp16 output; markers >= 7 apart


@fake_cuda_export
@pytest.mark.parametrize("fmt, w4a4, tma, finish", [
    ("nvfp4", False, False, True), ("mxfp4", False, False, True), ("nvfp4", True, False, True),
    ("nvfp4", False, True, True), ("nvfp4", False, True, False)],
    ids=["nvfp4", "mxfp4", "w4a4", "nvfp4-tma", "nvfp4-tma-unfinished"])
def test_planar_launches_export_on_fake_cuda_tensors(monkeypatch, fmt, w4a4, tma, finish):
    """The CUDA body on planar words as an engine's export traces it (the one-dot buckets in torch.cond, the Triton
    launches included; with TMA tiles, their host descriptors; the kernels of up to 64 rows writing y + bias
    themselves as shipped, and none when unfinished, `kernel.finished`), without a GPU."""
    from qc_testutil import expect_launch_keyword, expect_tma, export_on_fake_cuda, up_to_64_rows
    from qcompile.plugins.fp4_gemm import kernel, one_dot

    if tma:
        monkeypatch.setattr(kernel, "ONE_DOT", [(limit, dict(cfg, tma=dict(min_n=0))) for limit, cfg in kernel.ONE_DOT])
    if not finish:
        monkeypatch.setattr(kernel, "ONE_DOT", kernel.finished(kernel.ONE_DOT, finish=False))
    expect_tma(monkeypatch, lambda cfg: tma, one_dot)
    expect_launch_keyword(monkeypatch, one_dot, "launch", "finish", up_to_64_rows if finish else False)
    case = planar_case(fmt, k=512, n=256)
    x_global = torch.tensor(0.01) if w4a4 else None
    weights = (*args(case), x_global, torch.randn(256), case["block"])
    assert export_on_fake_cuda(monkeypatch, torch.ops.qcompile.fp4_gemm, weights,
                               torch.randn(8, 512).to(torch.bfloat16)) == [torch.ops.qcompile.fp4_gemm.default]
