"""Count the instructions of a Triton kernel's main loop, compiled for sm_90 on any machine (no GPU needed).

Triton's wheel carries ptxas and cuobjdump, so a kernel can be compiled ahead of time for the H200 here and its
SASS read: the loop's instruction histogram divided by the weights each thread handles per step tells whether a
weight-streaming kernel can keep up with HBM (the H200 issues about 33 T thread-instructions/s: 132 SMs x 4
schedulers x 32 lanes x ~1.98 GHz; 235 M weights at 3 instructions each is 21 µs, at 6.7 it is 47 µs).

    python3 tools/diag/sass_count.py [int4_mm_t int4_gemv_fp32 int4_gemv_half2 int4_gemv_half2_planar
                                      int4_gemv_half2_planar_finish int4_gemv_half2_planar_pairs int4_gemv_mma
                                      int4_gemv_mma_paired
                                      int4_one_dot_16_tma_finish
                                      int4_dequant_t_fp8
                                      int4_one_dot_16 int4_one_dot_64 int4_one_dot_128 (each also _scale_w, _tma,
                                      _scale_w_tma) fp4_gemm fp4_gemm_64 fp4_one_dot_16 fp4_one_dot_64
                                      fp4_one_dot_128 (each also _mx, _tma, _mx_tma, and _rw8 / _rw16 / _rw32: the
                                      words of each row a copy reads, where not the shipped setting)
                                      fp4_one_dot_16_tma_finish
                                      fp4_gemv fp4_gemv_planar (each
                                      also _mx) w8a16_row_gemv (also _prmt) w8a16_row_gemv_dp4a
                                      (also _16x256, _8x256) w8a16_row_dot
                                      w8a16_row_dot_32x256_w2 w8a16_row_dot_16x256_w1 w8a16_row_dot_64x256_w4 (each
                                      also _plain; each of those also _ldsm: x_ldmatrix)
                                      w8a16_row_dot_plain_part16 (and _part32, _part64)
                                      w8a16_mma_rows w8a16_mma_rows_two]
                                      [--dtype fp16] [--block-n 128] [--all-loops] [--loads]
                                      # default: all, bf16 x, each case's tile, its first loop

The first backward branch is taken as the main loop; --all-loops reports each (a kernel may run one of two loops,
e.g. the INT4 GEMVs' loops on x 4- or 2-byte aligned). Not part of the product.

A low count is necessary, not sufficient: the INT4 pair kernel (commit 84a741e, 3.6 instructions per weight against
mm_t's 7.2 and the GEMV's 5.3) was slower than both on every H200 cell (benchmarks/int4_pair_dot.json).
"""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_sass(fn, signature: dict, constexprs: dict, divisible: list[str], num_warps: int, num_stages: int) -> str:
    """SASS of `fn` for sm_90; `divisible`: arguments specialized as multiples of 16 (as Triton does at launch)."""
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=fn, signature=dict(signature, **{c: "constexpr" for c in constexprs}),
                    constexprs={(fn.arg_names.index(c),): v for c, v in constexprs.items()}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def instructions(sass: str) -> list[tuple[int, str]]:
    """(address, text) of each instruction in cuobjdump's SASS listing, in address order."""
    return [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.+?);", sass)]


def loop_texts(sass: str) -> list[list[str]]:
    """The instructions (with operands) between each backward branch's target and the branch, in address order (a
    kernel may run one of two loops, e.g. the INT4 GEMV's x pairs as int32 words or as fp16 values); the whole
    kernel when it has no loop (a kernel unrolled whole, e.g. the FP8 path's `dequant_fp8._int4_dequant_t_kernel`)."""
    lines = instructions(sass)
    bodies = []
    for addr, text in lines:
        branch = re.search(r"BRA (0x[0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < addr:
            start = int(branch.group(1), 16)
            bodies.append([t for a, t in lines if start <= a <= addr])
    return bodies or [[t for _, t in lines]]


def opcodes(body: list[str]) -> list[str]:
    """A `loop_texts` body as opcodes with their modifiers (guard predicates dropped)."""
    return [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in body]


def mma_issue_cycles(body: list[str], latency: int = 33, mma_issue: int = 2) -> int:
    """Cycles a warp takes for one loop body issued in order, one instruction a cycle (an HMMA `mma_issue`), where
    an HMMA waits for the HMMA that wrote its accumulator (`latency` cycles) and nothing else waits: the cost of the
    MMA chains with one warp per scheduler (no other warp runs in their latency). A model, not a measurement, and
    one the H100 did not bear out for the W8A16 row dot tile: its part_k variants, modelled 13-25% fewer cycles a
    step, ran no faster or slower in proportion to their instructions (BENCHMARKS.md, fifty-ninth session)."""
    t, ready, end = 0, {}, 0
    for text in body:
        mma = re.search(r"HMMA\S*\s+R(\d+), R\d+, R\d+, R(\d+)", text)
        if mma:
            start = max(t, ready.get(mma.group(2), 0))
            ready[mma.group(1)] = start + latency
            end = max(end, start + latency)
            t = start + mma_issue
        else:
            t += 1
    return max(t, end)


def global_loads(body: list[str]) -> collections.Counter:
    """The global loads of a loop body by opcode and width (e.g. LDGSTS.E.BYPASS.128: 16-byte asynchronous copies
    that skip L1; LDGSTS.E: 4 bytes a thread), and TMA loads (UTMALDG)."""
    return collections.Counter(op for op in body if op.split(".")[0] in ("LDG", "LDGSTS", "UTMALDG"))


def report(name: str, sass: str, weights_per_thread: int, all_loops: bool = False, loads: bool = False,
           mma_chains: bool = False) -> None:
    texts = loop_texts(sass)[:None if all_loops else 1]
    bodies = [opcodes(text) for text in texts]
    spills = collections.Counter(op.split(".")[0] for op in opcodes([text for _, text in instructions(sass)]))
    for i, body in enumerate(bodies):
        hist = collections.Counter(op.split(".")[0] for op in body)
        top = " ".join(f"{op}:{c}" for op, c in hist.most_common(10))
        label = f"{name} (loop {i + 1} of {len(bodies)})" if len(bodies) > 1 else name
        print(f"{label}: {len(body)} instructions per step, {len(body) / weights_per_thread:.2f} per weight | {top}")
        if loads:
            print("    global loads: " + " ".join(f"{op}:{c}" for op, c in sorted(global_loads(body).items()))
                  + " | shared: " + " ".join(f"{op}:{hist[op]}" for op in ("LDS", "LDSM", "STS"))
                  + " | spills in the kernel: " + " ".join(f"{op}:{spills[op]}" for op in ("LDL", "STL")))
        if mma_chains:
            print(f"    in-order issue with 33-cycle HMMA chains: {mma_issue_cycles(texts[i])} cycles a step")


def _cases():
    sys.path.insert(0, os.path.dirname(__file__))
    from qcompile.plugins.int4_gemm import gemv as g4, kernel as k4

    ptrs = lambda names, t: {n: t for n in names}  # noqa: E731
    mm_sig = dict(ptrs(["x_ptr"], "*bf16"), w_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", rs_ptr="*fp32",
                  y_ptr="*fp32", **ptrs(["M", "N", "K", "stride_xm", "group_size", "k_per_split"], "i32"))
    div = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "rs_ptr", "y_ptr", "N", "K", "stride_xm", "group_size", "k_per_split"]
    yield ("int4_mm_t", k4._int4_mm_t_kernel, mm_sig,
           dict(K_STEPS=8, HAS_ZERO=False, ROW_SCALE=False, ATOMIC=True, SCALE_ACC=False, MAGIC_BITS=0x4308,
                MAGIC_VALUE=136.0, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128), div, 4, 3, 64 * 128 // 128)
    gemv_sig = dict({k: v for k, v in mm_sig.items() if k not in ("rs_ptr", "M")}, out_ptr="*bf16", b_ptr="*bf16")
    for half2, planar, finish, pairs in ((False, False, False, False), (True, False, False, False),
                                         (True, True, False, False), (True, True, True, False),
                                         (True, True, False, True)):
        # finish: the cast and bias in the kernel (engine variant); pairs: x's fp16 as the pairs (fp16 x only)
        yield ("int4_gemv" + ("_half2" if half2 else "_fp32") + ("_planar" if planar else "")
               + ("_finish" if finish else "") + ("_pairs" if pairs else ""), g4._int4_gemv_kernel,
               dict(gemv_sig, x_ptr="*fp16" if pairs else "*bf16" if half2 else "*fp32"),
               dict(K_STEPS=8, HAS_ZERO=False, ATOMIC=True, HALF2=half2, ASM=True, BLOCK_N=512, BLOCK_K=32,
                    PIPELINE=0, PLANAR=planar, FINISH=finish, HAS_BIAS=finish, PAIRS=pairs,
                    X_SPAN=512 if pairs else 1),
               [d for d in div if d != "rs_ptr"], 2, 3, 512 * 32 // 64)
    from qcompile.plugins.int4_gemm import mma_gemv, one_dot
    # the tensor-core GEMV (fp16 x): 4 warps, one 64-K block a step, 64 columns a warp (4096 weights, 128 a thread)
    for paired in (False, True):  # _paired: a tile's two rows in adjacent columns, int64 word loads
        yield ("int4_gemv_mma" + ("_paired" if paired else ""),
               mma_gemv._int4_gemv_mma_kernel,
               dict(x_ptr="*fp16", w_ptr="*i32", s_ptr="*bf16", y_ptr="*fp32",
                    **ptrs(["N", "K", "stride_xm", "k_per_split"], "i32")),
               dict(BLOCKS=8, GROUP_BLOCKS=2, WARPS=4, ATOMIC=True, EVEN=True, PAIRED=paired),
               ["x_ptr", "w_ptr", "s_ptr", "y_ptr", "N", "K", "stride_xm", "k_per_split"], 4, 1, 128)
    od_sig = dict({k: v for k, v in mm_sig.items() if k not in ("rs_ptr", "group_size")}, out_ptr="*bf16",
                  b_ptr="*bf16")
    for bm, scale_w, tma, finish in itertools.chain(  # the shipped buckets' tiles (64 weight rows), the scale on the
            # product (or on the weight: _scale_w), pointer or TMA loads, g128; 32 steps: with 8 the 16-row loop is
            # unrolled whole (no backward branch); _finish: split K, the cast and bias in the kernel (as shipped)
            itertools.product((16, 64, 128), (False, True), (False, True), (False,)), [(16, False, True, True)]):
        descriptors = dict(x_ptr=f"tensordesc<bf16[{bm}, 64]>", w_ptr="tensordesc<i32[8, 2, 32]>") if tma else {}
        yield (f"int4_one_dot_{bm}" + ("_scale_w" if scale_w else "") + ("_tma" if tma else "")
               + ("_finish" if finish else ""),
               one_dot._int4_one_dot_kernel, dict(od_sig, y_ptr="*fp32" if finish else "*bf16", **descriptors),
               dict(K_STEPS=32, BLOCKS_PER_GROUP=2, HAS_ZERO=False, SCALE_W=scale_w, HALVES=2, EVEN=True, TMA=tma,
                    ATOMIC=finish, ASM=True, BLOCK_M=bm, BLOCK_N=64, FINISH=finish, HAS_BIAS=finish),
               [d for d in div if d not in ("rs_ptr", "group_size") and not (tma and d in descriptors)], 4, 3,
               64 * 128 // 128)
    from qcompile.plugins.fp4_gemm import kernel as f4
    fp4_sig = dict(x_ptr="*bf16", w_ptr="*u8", s_ptr="*u8", g_ptr="*fp32", b_ptr="*bf16", y_ptr="*fp32",
                   **ptrs(["M", "N", "K", "stride_xm"], "i32"))
    for name, cfg in (("fp4_gemm", f4.SMALL), ("fp4_gemm_64", f4.MID)):  # the op's 16- and 64-row tiles, NVFP4
        yield (name, f4._fp4_gemm_kernel, fp4_sig,
               dict(K_STEPS=8, MX=False, B=16, SHIFT=9, POW_SHIFT=512.0, POW_ACC=1 / 512, HAS_GLOBAL=True,
                    HAS_BIAS=False, ATOMIC=True, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=128,
                    EVEN=True),
               ["x_ptr", "w_ptr", "s_ptr", "g_ptr", "b_ptr", "y_ptr", "N", "K", "stride_xm"], cfg["num_warps"],
               cfg["num_stages"], cfg["BLOCK_N"] * 128 // (32 * cfg["num_warps"]))
    from qcompile.plugins.fp4_gemm import one_dot as f4o
    od4_sig = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*u8", g_ptr="*fp32", b_ptr="*bf16", y_ptr="*fp32",
                   out_ptr="*bf16", **ptrs(["M", "N", "K", "stride_xm", "k_per_split"], "i32"))
    for (_, cfg), mx, tma, finish in itertools.chain(itertools.product(f4.ONE_DOT, (False, True), (False, True),
                                                                       (False,)), [(f4.ONE_DOT[0], False, True, True)]):
        # the op's one-dot tiles on planar words (16, 64 and 128 rows), NVFP4 or MXFP4 (_mx), pointer or TMA loads
        # (_tma: x in [BLOCK_M, 64] boxes, the words in [BLOCK_N, row_words]); 32 steps; _finish: y + bias written
        # by the kernel (as shipped); _rw8 / _rw16 / _rw32: the row_words settings other than the bucket's; _pairs:
        # the words in row pairs (`format.to_row_pairs`; the shipped row_words, 16 for 32)
        cfg = one_dot.with_tma_tile(cfg) if tma and "tma" in cfg else cfg  # the bucket's TMA tile, where it has one
        bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
        shipped = cfg.get("row_words", 8)
        variants = [(rw, False) for rw in [shipped] + ([] if finish else sorted({8, 16, 32} - {shipped}))]
        for row_words, pairs in variants + ([] if finish or mx else [(f4o.row_words_for(cfg, 1024, True), True)]):
            box = f"{bn // 2}, 1, 2, {row_words}" if pairs else f"{bn}, {row_words}"
            descriptors = dict(x_ptr=f"tensordesc<bf16[{bm}, 64]>", w_ptr=f"tensordesc<i32[{box}]>") if tma else {}
            yield (f"fp4_one_dot_{bm}" + ("_mx" if mx else "") + ("_tma" if tma else "") + ("_finish" if finish else "")
                   + ("" if row_words == shipped or pairs else f"_rw{row_words}") + ("_pairs" if pairs else ""),
                   f4o._fp4_one_dot_kernel, dict(od4_sig, **descriptors),
                   dict(K_STEPS=32, MX=mx, POW_ACC=512.0, HAS_GLOBAL=not mx, HAS_BIAS=finish, EVEN=True, TMA=tma,
                        ATOMIC=True, ASM=True, BLOCK_M=bm, BLOCK_N=bn, FINISH=finish, ROW_WORDS=row_words,
                        PAIRED=pairs),
                   [d for d in ("x_ptr", "w_ptr", "s_ptr", "g_ptr", "b_ptr", "y_ptr", "N", "K", "stride_xm",
                                "k_per_split") if d not in descriptors],
                   cfg["num_warps"], cfg["num_stages"], bn * f4o.step_k(row_words) // (32 * cfg["num_warps"]))
    from qcompile.plugins.fp4_gemm import gemv as g1, gemv_planar as gp
    gemv_sig = dict(pairs_ptr="*i32", down_ptr="*fp32", w_ptr="*u8", s_ptr="*u8", g_ptr="*fp32", b_ptr="*bf16",
                    y_ptr="*bf16", N="i32", KU="i32")
    planar_sig = dict(gemv_sig, xs_ptr="*fp16", w_ptr="*i32", KC="i32")
    del planar_sig["pairs_ptr"], planar_sig["KU"]
    for mx in (False, True):  # the M = 1 GEMVs: engine bytes (uint64 units) and planar words, NVFP4 / MXFP4
        fmt = dict(MX=mx, HAS_GLOBAL=not mx, HAS_BIAS=False, ASM=True)
        cfg = g1.GEMV
        yield ("fp4_gemv" + ("_mx" if mx else ""), g1._fp4_gemv_kernel, gemv_sig,
               dict(fmt, U_STEPS=8, B=32 if mx else 16, BLOCK_N=cfg["BLOCK_N"], BLOCK_U=cfg["BLOCK_U"]),
               list(gemv_sig), cfg["num_warps"], 3, cfg["BLOCK_N"] * cfg["BLOCK_U"] * 16 // (32 * cfg["num_warps"]))
        cfg = gp.GEMV_PLANAR
        # _pairs: the words in row pairs (`format.to_row_pairs`), in the same planar tile for a like-for-like count
        # (row pairs ship `gemv_planar.gemv_tile`'s tiles)
        for pairs in (False, True):
            yield ("fp4_gemv_planar" + ("_mx" if mx else "") + ("_pairs" if pairs else ""), gp._fp4_gemv_planar_kernel,
                   planar_sig, dict(fmt, C_STEPS=8, EVEN=True, BLOCK_N=cfg["BLOCK_N"], BLOCK_C=cfg["BLOCK_C"],
                                    PAIRED=pairs),
                   list(planar_sig), cfg["num_warps"], 3,
                   cfg["BLOCK_N"] * cfg["BLOCK_C"] * 64 // (32 * cfg["num_warps"]))
    from qcompile.plugins.int4_gemm import dequant_fp8
    cfg = dequant_fp8.DEQUANT_T
    yield ("int4_dequant_t_fp8", dequant_fp8._int4_dequant_t_kernel,  # the FP8 path's INT4 weight (whole kernel)
           dict(w_ptr="*i32", s_ptr="*bf16", z_ptr="*bf16", mul_ptr="*fp32", out_ptr="*fp8e4nv",
                **ptrs(["N", "K", "group_size"], "i32")),
           dict(HAS_ZERO=False, GROUP_ALIGNED=True, BLOCK_N=cfg["BLOCK_N"], BLOCKS=cfg["BLOCKS"]),
           ["w_ptr", "s_ptr", "z_ptr", "mul_ptr", "out_ptr", "N", "K", "group_size"], cfg["num_warps"], 1,
           cfg["BLOCK_N"] * 64 * cfg["BLOCKS"] // (32 * cfg["num_warps"]))
    from qcompile.plugins.int8_wo_gemm import kernel as w8
    w8_sig = dict(x_ptr="*bf16", w_ptr="*i8", s_ptr="*fp32", b_ptr="*bf16", y_ptr="*bf16",
                  **ptrs(["M", "N", "K", "stride_xm", "k_per_split"], "i32"))
    dot = w8.DOT  # the shipped tile, then tiles with one warp per 16 weight rows (`_w<warps>`), each also `_plain`
    # (x as the MMA's first operand: PLAIN); then DOT's tile as dots of part_k K into two alternating accumulators;
    # then each of the first with `_ldsm` (X_LDMATRIX: the weight converted in PTX, x through ldmatrix)
    tiles = [(name + ("_plain" if plain else ""), bn, bk, warps, plain, bk, False)
             for name, bn, bk, warps in (("w8a16_row_dot", dot["BLOCK_N"], dot["BLOCK_K"], dot["num_warps"]),
                                         ("w8a16_row_dot_32x256_w2", 32, 256, 2),
                                         ("w8a16_row_dot_16x256_w1", 16, 256, 1),
                                         ("w8a16_row_dot_64x256_w4", 64, 256, 4))
             for plain in (False, True)]
    parts = [(f"w8a16_row_dot_plain_part{part_k}", dot["BLOCK_N"], dot["BLOCK_K"], dot["num_warps"], True, part_k,
              False) for part_k in (16, 32, 64)]
    ldsm = [(name + "_ldsm", bn, bk, warps, plain, part_k, True) for name, bn, bk, warps, plain, part_k, _ in tiles]
    dot_tiles = tiles + parts + ldsm
    for name, bn, bk, warps, plain, part_k, x_ldmatrix in dot_tiles:
        yield (name, w8._row_dot_kernel, dict(w8_sig, out_ptr="*bf16"),
               dict(HAS_BIAS=False, ATOMIC=False, FP32_DOT=False, K_STEPS=16, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
                    PART_K=part_k, EVEN=True, PLAIN=plain, X_LDMATRIX=x_ldmatrix),
               ["x_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr", "N", "K", "stride_xm", "k_per_split"], warps,
               dot["num_stages"], bn * bk // (32 * warps))
    from qcompile.plugins.int8_wo_gemm import gemv as w8_gemv
    gemv_sig = dict({a: t for a, t in w8_sig.items() if a in ("x_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr")},
                    **ptrs(["N", "KW", "stride_xm"], "i32"))
    gemv_args = ["x_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr", "N", "KW", "stride_xm"]
    cfg = w8_gemv.GEMV  # the one-row GEMV's shipped tile (int32 words of 4 weights; 64 weights a thread a step)
    for prmt in (False, True):  # _prmt: a byte permute per weight (the "prmt" configuration key)
        yield ("w8a16_row_gemv" + ("_prmt" if prmt else ""), w8_gemv._row_gemv_kernel, gemv_sig,
               dict(HAS_BIAS=False, K_STEPS=16, BLOCK_N=cfg["BLOCK_N"], BLOCK_KW=cfg["BLOCK_KW"], PREFETCH=False,
                    PRMT=prmt),
               gemv_args, cfg["num_warps"], cfg["num_stages"],
               cfg["BLOCK_N"] * cfg["BLOCK_KW"] * 4 // (32 * cfg["num_warps"]))
    for bn, bkw, warps in ((32, 128, 4), (16, 256, 4), (8, 256, 4)):  # the opt-in dp4a GEMV (x in int8 planes)
        yield ("w8a16_row_gemv_dp4a" + ("" if bn == 32 else f"_{bn}x{bkw}"), w8_gemv._row_gemv_kernel, gemv_sig,
               dict(HAS_BIAS=False, K_STEPS=16, BLOCK_N=bn, BLOCK_KW=bkw, PREFETCH=False, DP4A=True, GROUP=4,
                    ASM=True),
               gemv_args, warps, 1, bn * bkw * 4 // (32 * warps))
    from qcompile.plugins.int8_wo_gemm import mma_rows
    for two in (False, True):  # the fp16 MMA kernel at <= 8 rows of x (one MMA per K tile) and <= 16 (`_two`)
        yield ("w8a16_mma_rows" + ("_two" if two else ""), mma_rows._w8_mma_rows_kernel,
               dict({a: t for a, t in w8_sig.items() if a != "k_per_split"}, x_ptr="*fp16", y_ptr="*fp16"),
               dict(STEPS=8, WARPS=4, U=2, TWO=two, ONE_ROW=False, HAS_BIAS=True, EVEN=True),
               ["x_ptr", "w_ptr", "s_ptr", "b_ptr", "y_ptr", "N", "K", "stride_xm"], 4, 1, 64)


def main() -> None:
    ap = argparse.ArgumentParser(description="sm_90 SASS instruction counts of kernel main loops")
    ap.add_argument("cases", nargs="*", help="case names (default: all)")
    ap.add_argument("--dtype", default="bf16", help="x (and its tiles) in this type: the kernels whose x is *bf16")
    ap.add_argument("--block-n", type=int, help="every case's BLOCK_N (weight rows or columns per program)")
    ap.add_argument("--loads", action="store_true", help="also each loop's global loads by width (LDG, LDGSTS, "
                    "TMA), its shared-memory loads and stores (a layout conversion shows as STS), and the kernel's "
                    "local loads and stores (spills)")
    ap.add_argument("--mma-chains", action="store_true", help="also a model of each loop's cycles a step for one "
                    "warp issuing in order, each HMMA waiting 33 cycles for the one that wrote its accumulator")
    ap.add_argument("--all-loops", action="store_true",
                    help="every loop, not only the first (e.g. the INT4 GEMVs' x pairs as int32 words or fp16 values)")
    args = ap.parse_args()
    for name, fn, sig, const, div, warps, stages, per_thread in _cases():
        if not args.cases or name in args.cases:
            sig = {a: t.replace("bf16", args.dtype) if a == "x_ptr" else t for a, t in sig.items()}
            if args.block_n:  # a thread's weights per step scale with BLOCK_N in every case here
                block_n = args.block_n
                per_thread = per_thread * block_n // const["BLOCK_N"]
                const = dict(const, BLOCK_N=block_n)
                sig = {a: re.sub(r"i32\[(\d+), 8\]", f"i32[{block_n}, 8]",
                                 re.sub(r"i32\[8, \d+, 32\]", f"i32[8, {block_n // 32}, 32]", t))
                       for a, t in sig.items()}
                name = f"{name} (BLOCK_N {block_n})"
            report(name, compile_sass(fn, sig, const, div, warps, stages), per_thread, args.all_loops, args.loads,
                   args.mma_chains)

if __name__ == "__main__":
    main()
