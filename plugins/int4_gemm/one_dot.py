"""INT4 W4A16 on the tensor cores, one MMA per K step, for 2-128 rows (Triton, CUDA only; imported lazily).

Reads the planar engine layout (`format.py`): in each 64 K of a column, word c holds in nibbles j and j + 4 the
weights at k = 16 j + 2 c and k + 1. One LOP3 `(w >> 4 j) & 0x000F000F ^ 0x43084308` (fp16: 0x64086408) makes
both as the 16-bit pair `(136 + q, 136 + q')` (fp16: 1032 + q), which is already the (k, k + 1) register pair of
the MMA's first operand. The four [BLOCK_N, 16] tiles of a 64-K block and the two blocks of a 128-K step are
joined in registers (`_cat_k`) into one [BLOCK_N, STEP] operand: one `tl.dot` per step and no layout conversion
of the decoded weight. Swapped operands, as `_int4_mm_t_kernel`: `y^T = dequant(W)^T @ x^T`, the few rows of x the
MMA's narrow side.

Why (tools/diag/int4_planar_probe.py, H200, benchmarks/int4_planar_probe_one_dot.json): the sequential-layout
tile kernel converts each decoded tile's layout through shared memory (8 STS, 5 barriers, 8 LDSM per step), and a
planar kernel with eight 16-deep dots per step waits for each (`wgmma.wait_group 0`). The probe's version of this
kernel issues the step's HGMMAs back to back (16 for a 128-K step on 128 x 16 tiles) with one wait; it ran
1.14-1.37x the sequential op at M = 16 and 1.05-1.25x at M = 64 on the four Llama-sized layers. Unmasked loads
when tiles and splits are whole (`EVEN`): the masks' predicates were 8-15% of the loop's SASS.

Scales: without `SCALE_W` each step's product is scaled (the step lies in one group) and the dot sees exact
small integers `q - zp`; with it the scale multiplies the weight tile (rounded to x's dtype, as a dequantized
weight is) and one accumulator runs through all steps, so the wgmmas stay in flight into the next step's
decoding; the first step is peeled off the loop (else ptxas serializes the wgmmas: its C7515 note). SCALE_W is
forced when a group is shorter than the step (64-K groups with 128-K steps). Split-K partial sums meet in fp32
atomics, as in the other INT4 kernels.

Loads: through pointers formed once, or (`TMA`, `use_tma`) through tensor descriptors made on the host. TMA's
zero fill past M, N and K stands in for the masks and the wrapped rows. The boxes have rows of 128 bytes (`launch`:
x in [BLOCK_M, 64] boxes, one dot per 64-K block; the words viewed as [K / 8, N / 32, 32]), so an AOTInductor
engine encodes them as Triton does. On the H200 (benchmarks/fp4_int4_gemm-tma128-s23.json, the op) the TMA tiles
were 1.17-1.18x faster than the pointer loads at 16 rows on 4096 x 14336 and 8192 x 28672, 1.10-1.12x at 40 and
64 rows on 8192 x 28672; wider boxes (which only Triton's launcher can encode) were a further 1.02-1.12x.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from qcompile.plugins.gemm_dispatch import (DEFAULT_SMS, cdiv, identity, optional_arg, split_for_waves, split_k_outputs,
                                            traced, whole_tiles)
from qcompile.plugins.int4_gemm.format import PLANAR_BLOCK, is_planar
from qcompile.plugins.triton_tiles import (finish_swapped_tile, jit_any_m, load_tile, load_xt_rows, store_tile,
                                           xt_columns)

@triton.jit
def _pair(w, FP16: tl.constexpr, ASM: tl.constexpr):
    """int32 holding the 16-bit float pair (c + q_lo, c + q_hi) of nibbles 0 and 4 of w (bf16: c = 136; fp16:
    c = 1032): one LOP3 (ASM), or the same bits in plain Triton (the CPU interpreter runs no PTX)."""
    if ASM:
        if FP16:
            return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x64086408, 0x6a;", "=r,r", [w],
                                             dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x43084308, 0x6a;", "=r,r", [w],
                                         dtype=tl.int32, is_pure=True, pack=1)
    return (w & 0x000F000F) ^ (0x64086408 if FP16 else 0x43084308)


@triton.jit
def _tile16(words, j: tl.constexpr, BLOCK_N: tl.constexpr, dt: tl.constexpr, ASM: tl.constexpr):
    """[BLOCK_N, 16] of `c + q` at k = 16 j .. 16 j + 15 of a 64-K block (words [BLOCK_N, 8]): nibbles j, j + 4."""
    p = _pair(words >> (4 * j), dt == tl.float16, ASM)
    lo = p.to(tl.int16).to(dt, bitcast=True)
    hi = (p >> 16).to(tl.int16).to(dt, bitcast=True)
    return tl.join(lo, hi).reshape(BLOCK_N, 16)


@triton.jit
def _cat_k(a, b, BLOCK_N: tl.constexpr, WIDTH: tl.constexpr):
    """[BLOCK_N, 2 WIDTH]: a's columns then b's (registers only: the pair index becomes a register bit)."""
    return tl.join(a, b).permute(0, 2, 1).reshape(BLOCK_N, 2 * WIDTH)


@triton.jit
def decode64(words, BLOCK_N: tl.constexpr, dt: tl.constexpr, ASM: tl.constexpr):
    """[BLOCK_N, 64] of `c + q` (dt) from the 8 planar words [BLOCK_N, 8] of a 64-K block, in the MMA operand's
    register order."""
    return _cat_k(_cat_k(_tile16(words, 0, BLOCK_N, dt, ASM), _tile16(words, 1, BLOCK_N, dt, ASM), BLOCK_N, 16),
                  _cat_k(_tile16(words, 2, BLOCK_N, dt, ASM), _tile16(words, 3, BLOCK_N, dt, ASM), BLOCK_N, 16),
                  BLOCK_N, 32)


@triton.jit
def _block64(w_src, s_ptr, z_ptr, kb, offs_n, mask_n, N, K, BLOCKS_PER_GROUP: tl.constexpr,
             HAS_ZERO: tl.constexpr, SCALE_W: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr,
             BLOCK_N: tl.constexpr, dt: tl.constexpr, ASM: tl.constexpr):
    """(weights [BLOCK_N, 64] of the 64-K block kb as dt: q - zp, times the scale when SCALE_W; fp32 scales
    [BLOCK_N]). w_src: the pointers of block 0's 8 word rows (loop-invariant; block kb adds one scalar), or with
    TMA the words' descriptor. BLOCKS_PER_GROUP: 64-K blocks per group, 0 for one group (per channel). Past N or
    K (a split's last steps) the words, scales and zero points load as 0 (TMA: its zero fill); EVEN (whole tiles
    and splits): no masks."""
    ok = mask_n & (kb * 64 < K)
    if TMA:  # w_src: the words as [K / 8, N / 32, 32] in [8, BLOCK_N / 32, 32] boxes (rows of 128 bytes, `launch`)
        box = w_src.load([kb * 8, tl.program_id(0) * (BLOCK_N // 32), 0])
        words = tl.trans(box.reshape(8, BLOCK_N))
    else:
        words = load_tile(w_src + (kb * 8).to(tl.int64) * N, ok[:, None], EVEN, True)
    a = decode64(words, BLOCK_N, dt, ASM)
    g = kb // BLOCKS_PER_GROUP if BLOCKS_PER_GROUP else 0
    s = load_tile(s_ptr + g * N + offs_n, ok, EVEN).to(tl.float32)
    offset: tl.constexpr = 1032.0 if dt == tl.float16 else 136.0
    if HAS_ZERO:  # c + z is exact in 16 bits (128..143 in bf16, 1024..1039 in fp16), so is (c + q) - (c + z)
        z = load_tile(z_ptr + g * N + offs_n, ok, EVEN).to(tl.float32)
        a = a - (offset + z).to(dt)[:, None]
    else:
        a = a - offset
    if SCALE_W:
        a = a * s.to(dt)[:, None]
    return a, s


@triton.jit
def _step(x_src, w_src, s_ptr, z_ptr, k0, offs_n, mask_n, N, K, acc, BLOCKS_PER_GROUP: tl.constexpr,
          HAS_ZERO: tl.constexpr, SCALE_W: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr,
          HALVES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr):
    """(acc + weights [BLOCK_N, 64 HALVES] @ x^T [64 HALVES, BLOCK_M] of the step at k0, fp32 scales [BLOCK_N] of
    its first block). x_src: the pointers of x^T at K 0 .. 64 HALVES - 1 (loop-invariant, as w_src), the two
    blocks' weights joined in registers for one dot; or with TMA x's descriptor ([BLOCK_M, 64] boxes, rows past M
    and K load as 0), one dot per block chained on the accumulator (each block's x^T is an MMA operand straight
    from its box in shared memory)."""
    if TMA:
        dt: tl.constexpr = x_src.dtype
    else:
        dt: tl.constexpr = x_src.dtype.element_ty
        xt = load_xt_rows(x_src, k0, K, EVEN, 64 * HALVES)
    a, s = _block64(w_src, s_ptr, z_ptr, k0 // 64, offs_n, mask_n, N, K, BLOCKS_PER_GROUP, HAS_ZERO, SCALE_W, EVEN,
                    TMA, BLOCK_N, dt, ASM)
    if TMA:
        acc = tl.dot(a, tl.trans(x_src.load([tl.program_id(2) * BLOCK_M, k0])), acc)
    if HALVES == 2:
        a1, _ = _block64(w_src, s_ptr, z_ptr, k0 // 64 + 1, offs_n, mask_n, N, K, BLOCKS_PER_GROUP, HAS_ZERO,
                         SCALE_W, EVEN, TMA, BLOCK_N, dt, ASM)
        if TMA:
            acc = tl.dot(a1, tl.trans(x_src.load([tl.program_id(2) * BLOCK_M, k0 + 64])), acc)
        else:
            a = _cat_k(a, a1, BLOCK_N, 64)
    if not TMA:
        acc = tl.dot(a, xt, acc)
    return acc, s


@jit_any_m
def _int4_one_dot_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, out_ptr, b_ptr, M, N, K, stride_xm, k_per_split,
    K_STEPS: tl.constexpr, BLOCKS_PER_GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, SCALE_W: tl.constexpr,
    HALVES: tl.constexpr, EVEN: tl.constexpr, TMA: tl.constexpr, ATOMIC: tl.constexpr, ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FINISH: tl.constexpr = False, HAS_BIAS: tl.constexpr = False,
):
    """y [M, N] (or its split-K part) from K_STEPS steps of 64 HALVES K, one dot each; grid (N tiles, K splits,
    M tiles). The weight and x pointers are formed once; a step adds scalars to them (per-step 64-bit address
    arithmetic and a division by the group size were about a quarter of the loop's SASS). TMA: x_ptr and w_ptr are
    tensor descriptors made on the host (`launch`, `use_tma`), and the words and x load through them. FINISH:
    out_ptr gets `y (+ bias)` in its dtype from `finish_swapped_tile` (split K: y_ptr is the zeroed fp32
    accumulator [M, N], then one count per tile)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    k_lo = tl.program_id(1) * k_per_split
    if TMA:  # x_ptr, w_ptr are the descriptors
        w_src = w_ptr
        x_src = x_ptr
    else:
        w_src = w_ptr + tl.arange(0, 8)[None, :] * N + offs_n[:, None]
        x_src = xt_columns(x_ptr, offs_m, M, stride_xm, 64 * HALVES)
    zero = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if SCALE_W:
        acc, s = _step(x_src, w_src, s_ptr, z_ptr, k_lo, offs_n, mask_n, N, K, zero, BLOCKS_PER_GROUP, HAS_ZERO,
                       True, EVEN, TMA, HALVES, BLOCK_M, BLOCK_N, ASM)
        for step in range(1, K_STEPS):
            acc, s = _step(x_src, w_src, s_ptr, z_ptr, k_lo + step * 64 * HALVES, offs_n, mask_n, N, K, acc,
                           BLOCKS_PER_GROUP, HAS_ZERO, True, EVEN, TMA, HALVES, BLOCK_M, BLOCK_N, ASM)
    else:
        acc = zero
        for step in range(0, K_STEPS):
            product, s = _step(x_src, w_src, s_ptr, z_ptr, k_lo + step * 64 * HALVES, offs_n, mask_n, N, K, zero,
                               BLOCKS_PER_GROUP, HAS_ZERO, False, EVEN, TMA, HALVES, BLOCK_M, BLOCK_N, ASM)
            acc += product * s[:, None]
    at = offs_m.to(tl.int64)[None, :] * N + offs_n[:, None]
    mask = mask_m[None, :] & mask_n[:, None]
    if FINISH:
        finish_swapped_tile(acc, at, mask, offs_m, offs_n, M, N, y_ptr, out_ptr, b_ptr, ATOMIC, HAS_BIAS)
    else:
        store_tile(y_ptr + at, acc, mask, ATOMIC)


def supports(x_dtype: torch.dtype, k: int, group_size: int) -> bool:
    """Whether this kernel takes the call: 16-bit x and a weight in the planar layout."""
    return x_dtype in (torch.float16, torch.bfloat16) and is_planar(k, group_size)


def scale_on_weight(scale_w, splits: int, group_size: int, step: int) -> bool:
    """The kernel's SCALE_W for a launch: cfg's True / False, or "unsplit" (on the weight only when K is not split:
    one accumulator then runs through the whole K; with 64-row tiles that was 8-14% faster on the H200, split or
    with 128-row tiles slower, benchmarks/int4_tune_one_dot-scale_w-s22.json); forced when a group is shorter than
    the step."""
    if scale_w not in (True, False, "unsplit"):
        raise ValueError(f"one-dot INT4 kernel: SCALE_W must be True, False or 'unsplit' (got {scale_w!r})")
    return (splits == 1 if scale_w == "unsplit" else scale_w) or group_size % step != 0


def tma_layer(cfg: dict, n: int, k: int) -> bool:
    """Whether cfg has a TMA tile for a layer N wide and K deep: N at least its min_n and a multiple of 32 (the
    words' view, `tma_words`), K at least its min_k (if it names one). The dispatcher makes that view where this
    holds; `use_tma` then checks the launch."""
    tma = cfg.get("tma")
    return bool(tma) and n >= tma["min_n"] and n % 32 == 0 and k >= tma.get("min_k", 0)


def use_tma(cfg: dict, x2d: torch.Tensor, n: int, on_cpu: bool) -> bool:
    """Whether this launch loads through TMA descriptors: cfg["tma"] names the smallest N it paid for (on the
    H200 they lost on 4096 x 4096: kernel.TMA_TILES) and optionally the smallest K (FP4's `kernel.MID_TMA`); the
    descriptors need 16-byte aligned rows and start (x's storage is taken to start aligned, as torch's allocators and
    AOTInductor's buffers do), and N a multiple of 32 (`tma_layer`). Not on CPU tensors (the interpreter), unless
    cfg["tma"]["interpret"] (tests).

    The descriptors are made on the host: an engine gets them through Dynamo (torch.cond's tracing), which
    AOTInductor turns into descriptors its wrapper makes per call. Descriptors made by the kernel
    (`tl.make_tensor_descriptor`) need Triton's global scratch, a slot per program, and torch 2.11's AOTInductor
    allocates one slot for the whole grid (its `cpp_scratch`; 2.12 scales it by the grid), so every other program
    would write past it."""
    if not tma_layer(cfg, n, x2d.shape[-1]) or (on_cpu and not cfg["tma"].get("interpret")):
        return False
    strides = (x2d.stride(0), x2d.stride(1))  # SymInts (traced views): pointers instead
    if not (all(isinstance(v, int) for v in strides) and strides[1] == 1 and strides[0] % 8 == 0):
        return False
    if torch.compiler.is_dynamo_compiling():  # torch.cond's branches (the op's M buckets): Dynamo captures host
        return True  # descriptors; it cannot read storage_offset, and an engine's x is a whole buffer of a node
    if traced(x2d):  # other tracing (an export with a concrete M) cannot
        return False
    return x2d.storage_offset() % 8 == 0


def with_tma_tile(cfg: dict) -> dict:
    """cfg with its TMA tile's keys (cfg["tma"] less the rule keys min_n, min_k, interpret and FP4's on_pairs) over
    the tile's."""
    rules = ("min_n", "min_k", "interpret", "on_pairs")
    return {**cfg, **{key: v for key, v in cfg["tma"].items() if key not in rules}}


def tma_words(w_packed: torch.Tensor) -> torch.Tensor:
    """The planar words [K / 8, N] as [K / 8, N / 32, 32], in rows of 128 bytes as the TMA boxes load them (N a
    multiple of 32, as `tma_layer` requires; the view itself as it is). The op makes this view outside its M
    buckets' torch.cond (`kernel.int4_gemm_triton`): AOTInductor's compile-time autotuning block (torch 2.11)
    writes a descriptor over a view made inside a branch with the C++ wrapper's expression of the view, which is
    not Python."""
    return w_packed if w_packed.dim() == 3 else w_packed.view(w_packed.shape[0], w_packed.shape[1] // 32, 32)


def planar_words(w_words: torch.Tensor) -> torch.Tensor:
    """The words [K / 8, N] of w_packed or of its `tma_words` view."""
    return w_words if w_words.dim() == 2 else w_words.reshape(w_words.shape[0], -1)


def launch(x2d, w_words, w_scale, w_zero, group_size: int, cfg: dict, *, asm: bool, out_dtype=torch.float32,
           bias=None, finish: bool = False, wrap=identity, num_sms: int = DEFAULT_SMS) -> torch.Tensor:
    """`x2d @ dequant(W)` [M, N] with `_int4_one_dot_kernel`: fp32 when split-K (atomics), else `out_dtype`;
    `finish`: `+ bias` in `out_dtype` either way, written by the kernel (the split tiles' counts follow the fp32
    accumulator in one zeroed buffer: a zero fill and the kernel, no cast after it).
    w_words: the planar words [K / 8, N] or their `tma_words` view. cfg: BLOCK_M, BLOCK_N, num_warps,
    num_stages, waves and resident (split-K target, `split_for_waves`), SCALE_W (`scale_on_weight`)."""
    w_packed = planar_words(w_words)
    m, k = x2d.shape
    n = w_packed.shape[1]
    if not supports(x2d.dtype, k, group_size):
        raise ValueError(f"one-dot INT4 kernel: needs fp16/bf16 x and K, group size multiples of {PLANAR_BLOCK} "
                         f"(got {x2d.dtype}, K = {k}, group {group_size})")
    halves = 2 if k % (2 * PLANAR_BLOCK) == 0 else 1
    step = PLANAR_BLOCK * halves
    tma = use_tma(cfg, x2d, n, x2d.device.type == "cpu")
    x_src, w_src = x2d, w_packed
    if tma:  # the TMA tile and split: cfg["tma"]'s keys (BLOCK_N, waves, ...) over the bucket's. Boxes with rows of
        # 128 bytes, the width of the 128-byte swizzle: Triton copies a wider box in 128-byte columns, but
        # AOTInductor's wrapper (torch 2.11 to 2.14) encodes the block as one box, which the driver refuses
        cfg = with_tma_tile(cfg)
        x_src = TensorDescriptor.from_tensor(x2d, [cfg["BLOCK_M"], PLANAR_BLOCK])
        w_src = TensorDescriptor.from_tensor(tma_words(w_words), [8, cfg["BLOCK_N"] // 32, 32])
    tiles_n = cdiv(n, cfg["BLOCK_N"])
    splits, per = split_for_waves(k, tiles_n, step, cfg["waves"], num_sms, cfg.get("resident", 0))
    tiles_m = cdiv(m, cfg["BLOCK_M"])
    y, out = split_k_outputs(m, n, splits, tiles_m * tiles_n, out_dtype, x2d.device, finish)
    wrap(_int4_one_dot_kernel)[(tiles_n, splits, tiles_m)](
        x_src, w_src, w_scale, optional_arg(w_zero, w_scale), y, optional_arg(out, w_scale),
        optional_arg(bias, w_scale), m, n, k, x2d.stride(0), per,
        K_STEPS=per // step, BLOCKS_PER_GROUP=0 if group_size == k else group_size // PLANAR_BLOCK,
        HAS_ZERO=w_zero is not None,
        SCALE_W=scale_on_weight(cfg.get("SCALE_W", False), splits, group_size, step), HALVES=halves,
        EVEN=whole_tiles(n, cfg["BLOCK_N"], splits, per, k), TMA=tma, ATOMIC=splits > 1, ASM=asm,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], FINISH=finish, HAS_BIAS=bias is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out if finish else y
