"""The M = 1 GEMV of `qcompile::int8_weight_only_gemm` (`_row_gemv_kernel` on the CUDA cores; CUDA only, imported
lazily) and the scale/bias store it shares with `kernel.py`'s row dot kernel. `kernel.int8_wo_gemm_triton` takes it
at one row of x where K is a multiple of 4 and no tensor-core path applies (see kernel.py's docstring). Opt-in:
"dp4a" in a configuration multiplies the weight bytes with x's int8 planes (`_row_gemv_step_dp4a`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qcompile.plugins.gemm_dispatch import cdiv, identity, optional_arg
from qcompile.plugins.int4_gemm.half2 import ptx_available
from qcompile.plugins.int8_wo_gemm.split_mma import Q_MAX, hi_lo

# M = 1: rows per program, int32 words per row and step, warps, Triton's load pipelining; `PREFETCH` loads the
# next step's words before this step's arithmetic (by hand). Chosen with tools/tune_w8a16_small_m.py on the H200
# (benchmarks/tune_w8a16_small_m_rows.json): 8 rows on 4 warps; 512-word steps while N <= NARROW_N (fewer programs,
# each needs more bytes in flight), 256 above: 1.58-1.67x cuBLAS bf16 on the four kernel-target shapes. `prmt`:
# bytes to floats by a byte permute each (`_bytes_as_floats`): on the H100 0.3-1.3 µs faster on both tiles and all
# four shapes (benchmarks/tune_w8a16_prmt-h100_s57.json; 4096 x 4096: 11.4 -> 11.1 µs on 512-word steps).
GEMV = dict(BLOCK_N=8, BLOCK_KW=256, num_warps=4, num_stages=2, PREFETCH=False, prmt=True)
GEMV_NARROW = dict(GEMV, BLOCK_KW=512)
NARROW_N = 4096
# "dp4a" (opt-in; on the H100 0.3-0.9 µs slower than "prmt" on the same tile at one row on all four kernel-target
# layers, benchmarks/tune_w8a16-m1-h100_s58b.json; not timed on the H200): words of x's int8 planes per scale
# (256 k, as `split_mma`'s chunks); a configuration's "group" (default 4): words whose integer sums are added
# before one conversion and scaling
DP4A_CHUNK_W = tl.constexpr(64)


@triton.jit
def _words(w_ptr, offs_n, mask_n, offs_w, KW, wanted):
    """Words [BLOCK_N, BLOCK_KW] of an int32 [N, KW] weight (0 past KW or where not `wanted`)."""
    return tl.load(w_ptr + offs_n.to(tl.int64)[:, None] * KW + offs_w[None, :],
                   mask=mask_n[:, None] & ((offs_w < KW) & wanted)[None, :], other=0, eviction_policy="evict_first")


@triton.jit
def scale_bias_store(y_ptrs, acc, s_ptr, b_ptr, offs_n, mask, mask_n, HAS_BIAS: tl.constexpr):
    """`acc * scale[n] + bias[n]` (acc rows are output features n) in float32, stored in y's dtype."""
    y = acc * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptrs, y.to(y_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _bytes_as_floats(words, PRMT: tl.constexpr):
    """The four int8 q of each int32 word as float32, exactly: each byte made the float 2^23 + 128 + q (or, bytes
    1 and 3 without PRMT, 2^15 + 128 + q in ulps of 2^8), minus that constant (see `_row_gemv_kernel`). PRMT (inline
    PTX, GPU only): one XOR of the word (q + 128 in each byte), then a byte permute per weight into 2^23's bits (the
    fp32 form of `mma_rows._fp16_pairs`); else AND, XOR (two LOP3s on sm_90: ptxas does not fuse them) and a shift
    per two bytes."""
    if PRMT:
        # a literal, not a global: AOTInductor copies the kernel's source into its generated code
        b0, b1, b2, b3 = tl.inline_asm_elementwise(
            "{ .reg .b32 u, m; xor.b32 u, $4, 0x80808080; mov.b32 m, 0x4B000000; "
            "prmt.b32 $0, u, m, 0x7540; prmt.b32 $1, u, m, 0x7541; "
            "prmt.b32 $2, u, m, 0x7542; prmt.b32 $3, u, m, 0x7543; }",
            "=r,=r,=r,=r,r", [words], dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
        return (b0.to(tl.float32, bitcast=True) - 8388736.0, b1.to(tl.float32, bitcast=True) - 8388736.0,
                b2.to(tl.float32, bitcast=True) - 8388736.0, b3.to(tl.float32, bitcast=True) - 8388736.0)
    high = words >> 16
    return (((words & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0,
            ((words & 0xFF00) ^ 0x47008000).to(tl.float32, bitcast=True) - 32896.0,
            ((high & 0xFF) ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0,
            ((high & 0xFF00) ^ 0x47008000).to(tl.float32, bitcast=True) - 32896.0)


@triton.jit
def _packed_bytes(b0, b1, b2, b3):
    """Four int32 in int8 range as the bytes of one int32 (b0 the lowest)."""
    return (b0 & 0xFF) | ((b1 & 0xFF) << 8) | ((b2 & 0xFF) << 16) | (b3 << 24)


@triton.jit
def _byte(words, i: tl.constexpr):
    """Byte i of each int32 as a signed int32."""
    return (words << (24 - 8 * i)) >> 24


@triton.jit
def _split_dots(words, hi, lo, ASM: tl.constexpr):
    """256 (w . hi) + (w . lo) per int32 word: its four int8 weights against the four int8 of hi's and lo's words
    (exact: at most 4 * 128 * 32639 in magnitude). ASM: two dp4a (inline PTX); else the same integers from the
    sign-extended bytes (the interpreter)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .s32 a, b; dp4a.s32.s32 a, $1, $2, 0; dp4a.s32.s32 b, $1, $3, 0; mad.lo.s32 $0, a, 256, b; }",
            "=r,r,r,r", [words, hi, lo], dtype=tl.int32, is_pure=True, pack=1)
    dots = _byte(words, 0) * (256 * _byte(hi, 0) + _byte(lo, 0))
    for i in tl.static_range(1, 4):
        dots += _byte(words, i) * (256 * _byte(hi, i) + _byte(lo, i))
    return dots


@triton.jit
def _row_gemv_step_dp4a(acc, words, x0, x1, x2, x3, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                        GROUP: tl.constexpr, ASM: tl.constexpr):
    """acc [BLOCK_N, BLOCK_KW // GROUP] plus x . q for the words [BLOCK_N, BLOCK_KW], x0..x3 [BLOCK_KW] float32
    (k = 4 word + i): x in two int8 planes, x ~= s * (256 hi + lo) with s = amax / Q_MAX per DP4A_CHUNK_W words
    (`split_mma.hi_lo`: the error is `split_mma`'s), four k of a plane packed in one int32, then `_split_dots`
    per word; GROUP adjacent words' integer sums are added, converted once and scaled by their chunk's s."""
    CHUNKS: tl.constexpr = BLOCK_KW // DP4A_CHUNK_W
    most = tl.maximum(tl.maximum(tl.abs(x0), tl.abs(x1)), tl.maximum(tl.abs(x2), tl.abs(x3)))
    amax_c = tl.max(tl.reshape(most, (CHUNKS, DP4A_CHUNK_W)), axis=1)
    amax = tl.reshape(tl.broadcast_to(amax_c[:, None], (CHUNKS, DP4A_CHUNK_W)), (BLOCK_KW,))
    h0, l0 = hi_lo(x0, amax)
    h1, l1 = hi_lo(x1, amax)
    h2, l2 = hi_lo(x2, amax)
    h3, l3 = hi_lo(x3, amax)
    hi = tl.broadcast_to(_packed_bytes(h0, h1, h2, h3)[None, :], (BLOCK_N, BLOCK_KW))
    lo = tl.broadcast_to(_packed_bytes(l0, l1, l2, l3)[None, :], (BLOCK_N, BLOCK_KW))
    dots = tl.sum(tl.reshape(_split_dots(words, hi, lo, ASM), (BLOCK_N, BLOCK_KW // GROUP, GROUP)), axis=2)
    s = tl.reshape(tl.broadcast_to((amax_c / Q_MAX)[:, None], (CHUNKS, DP4A_CHUNK_W // GROUP)), (BLOCK_KW // GROUP,))
    return acc + dots.to(tl.float32) * s[None, :]


@triton.jit
def _row_gemv_step(acc, words, x_ptr, offs_w, KW, PRMT: tl.constexpr, DP4A: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_KW: tl.constexpr, GROUP: tl.constexpr, ASM: tl.constexpr):
    """acc plus x . q for the int32 words [BLOCK_N, BLOCK_KW] (four k each) at word offsets offs_w: acc
    [BLOCK_N, BLOCK_KW] with the weights as floats (see `_row_gemv_kernel` for the byte-to-float trick), or with
    DP4A [BLOCK_N, BLOCK_KW // GROUP] with x in int8 planes (`_row_gemv_step_dp4a`)."""
    ok = offs_w < KW
    xw = x_ptr + 4 * offs_w
    x0 = tl.load(xw, mask=ok, other=0.0).to(tl.float32)
    x1 = tl.load(xw + 1, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(xw + 2, mask=ok, other=0.0).to(tl.float32)
    x3 = tl.load(xw + 3, mask=ok, other=0.0).to(tl.float32)
    if DP4A:
        acc = _row_gemv_step_dp4a(acc, words, x0, x1, x2, x3, BLOCK_N, BLOCK_KW, GROUP, ASM)
    else:
        q0, q1, q2, q3 = _bytes_as_floats(words, PRMT)
        acc += x0[None, :] * q0
        acc += x1[None, :] * q1
        acc += x2[None, :] * q2
        acc += x3[None, :] * q3
    return acc


@triton.jit
def _row_gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, KW, stride_xm, HAS_BIAS: tl.constexpr, K_STEPS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, PREFETCH: tl.constexpr, PIPELINE: tl.constexpr = 0,
    PRMT: tl.constexpr = False, DP4A: tl.constexpr = False, GROUP: tl.constexpr = 1, ASM: tl.constexpr = False,
):
    """y[n] = scale[n] * sum_k x[k] q[n, k] + bias[n] for BLOCK_N rows n, M = 1. The int8 [N, K] weight is read as
    int32 words [N, K/4], four consecutive k per word, multiplied in fp32 registers without tensor cores (at
    M = 1 the job is streaming the weight). Byte i becomes a float with one AND/XOR: bytes 0 and 2 (after a
    shift by 16) XOR 0x80 in the mantissa of 2^23 (ulp 1), bytes 1 and 3 in the mantissa of 2^15 (ulp 1 at bit
    8); one exact subtraction of the magic + 128 gives q. So a weight costs about 1.25 integer ops, a
    subtraction and an FMA, where `int8 -> float` conversions would cost four integer-op slots. One row of x
    per program column (grid axis 1). The int8 pointer is reinterpreted here (a `view(torch.int32)` of the
    weight in the graph broke AOTInductor's lowering of the torch.cond around this path on the H200).

    The plain loop's loads are not pipelined by Triton (no dot uses them; `num_stages` changes nothing).
    PREFETCH loads the next step's words before this step's arithmetic, by hand; PIPELINE > 0 makes the loop
    `tl.range(..., num_stages=PIPELINE)`, which stages the words through shared memory with asynchronous copies.
    No configuration sets it: in the H200 sweep (benchmarks/tune_w8a16_small_m_s16.json) it was the best GEMV
    only on 8192 x 28672, where the INT8 tensor-core path runs instead.
    PRMT (inline PTX; a configuration's "prmt", on in GEMV and GEMV_NARROW) turns bytes into floats with one byte
    permute each (`_bytes_as_floats`); without PTX (the interpreter) the AND/XOR form runs, with the same floats.
    DP4A (a configuration's "dp4a", 16-bit x; opt-in, see GEMV's comment): x split into int8 planes and multiplied with
    dp4a (`_row_gemv_step_dp4a`; ASM: PTX, else the same integers without it): 2.3 sm_90 instructions per weight
    for 32 rows x 128 words on 4 warps against 5.27 with PRMT (`tools/diag/sass_count.py w8a16_row_gemv_dp4a`)."""
    words_ptr = w_ptr.to(tl.pointer_type(tl.int32))
    row = tl.program_id(1)
    x_ptr += row * stride_xm
    y_ptr += row * N
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N, BLOCK_KW // GROUP if DP4A else BLOCK_KW), dtype=tl.float32)
    if PREFETCH:
        upcoming = _words(words_ptr, offs_n, mask_n, tl.arange(0, BLOCK_KW), KW, True)
        for step in range(0, K_STEPS):
            offs_w = step * BLOCK_KW + tl.arange(0, BLOCK_KW)
            words = upcoming
            upcoming = _words(words_ptr, offs_n, mask_n, offs_w + BLOCK_KW, KW, step + 1 < K_STEPS)
            acc = _row_gemv_step(acc, words, x_ptr, offs_w, KW, PRMT, DP4A, BLOCK_N, BLOCK_KW, GROUP, ASM)
    else:
        for step in tl.range(0, K_STEPS, num_stages=PIPELINE if PIPELINE else None):
            offs_w = step * BLOCK_KW + tl.arange(0, BLOCK_KW)
            words = _words(words_ptr, offs_n, mask_n, offs_w, KW, True)
            acc = _row_gemv_step(acc, words, x_ptr, offs_w, KW, PRMT, DP4A, BLOCK_N, BLOCK_KW, GROUP, ASM)
    scale_bias_store(y_ptr + offs_n[:, None], tl.sum(acc, axis=1)[:, None], s_ptr, b_ptr, offs_n, mask_n[:, None],
                     mask_n, HAS_BIAS)


def launch_gemv(x2d, w_q, w_scale, bias, cfg: dict | None = None, *, wrap=identity) -> torch.Tensor:
    """`x2d @ dequant(w_q)^T + bias` in x.dtype (K a multiple of 4), one launch; meant for one row of x (each
    row re-reads the weight). "dp4a" applies to 16-bit x only (its planes are coarser than float32)."""
    n, k = w_q.shape
    cfg = cfg or (GEMV_NARROW if n <= NARROW_N else GEMV)
    kw = k // 4
    m = x2d.shape[0]
    dp4a = cfg.get("dp4a", False) and x2d.dtype != torch.float32
    y = torch.empty((m, n), dtype=x2d.dtype, device=x2d.device)
    wrap(_row_gemv_kernel)[(cdiv(n, cfg["BLOCK_N"]), m)](
        x2d, w_q, w_scale, optional_arg(bias, w_scale), y, n, kw, x2d.stride(0), HAS_BIAS=bias is not None,
        K_STEPS=cdiv(kw, cfg["BLOCK_KW"]), BLOCK_N=cfg["BLOCK_N"], BLOCK_KW=cfg["BLOCK_KW"],
        PREFETCH=cfg.get("PREFETCH", False), PIPELINE=cfg.get("pipeline", 0),
        PRMT=cfg.get("prmt", False) and ptx_available(), DP4A=dp4a, GROUP=cfg.get("group", 4) if dp4a else 1,
        ASM=ptx_available(), num_warps=cfg["num_warps"], num_stages=cfg.get("num_stages", 1),
    )
    return y
