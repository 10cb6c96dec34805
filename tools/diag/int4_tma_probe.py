"""Diagnostic (H200): the INT4 one-dot kernel with x and the weight words loaded through TMA tensor descriptors,
next to the shipped one-dot kernel and cuBLAS bf16 (kernel alone, CUDA-graph replay, rotating weights; every
configuration checked against float64 first). Not part of the product.

Why: at 16-128 rows the shipped kernel (`int4_gemm/one_dot.py`) runs at 0.5-0.6 of the weight's HBM time and
spends 220 / 262 / 299 sm_90 instructions per 128-K step at 16 / 64 / 128 rows (`tools/diag/sass_count.py`).
Only about 90 of them decode the weight (LOP3, SHF, HADD2) and 8 are the MMAs; most of the rest forms and issues
the cp.async loads of the weight and x tiles and their predicates. A TMA load is one instruction from one
thread for a whole tile, and its zero fill past the tensor's edges replaces x's row masks (or the wrapped rows
of `triton_tiles.xt_columns`) and the weight's N masks. The descriptors are host-side
(`triton.tools.tensor_descriptor.TensorDescriptor`), which torch's user-kernel support can pass through
AOTInductor ("stable" TMA metadata in `torch/_higher_order_ops/triton_kernel_wrap.py`).

sm_90 SASS (`--sass`, twenty-first session, Triton 3.6.0): 239 / 276 / 296 instructions per step at 16 / 64 / 128
rows, against the shipped kernel's 220 / 262 / 299. The shipped kernel already forms its addresses once, so TMA
saves no issue slots: the copies become one TMA per tile, but the mbarrier waits, the shared-memory reads of the
words (LDS) and the scale's mask take their place. Timed on the H200 all the same (twenty-second session,
benchmarks/int4_tma_probe-s22.json), TMA was 1.2-1.3x faster on the wide layers at 16 and 64 rows (8192 x 28672:
47.6 / 71.0 against 61.8 / 85.6 µs): the copies hide latency that the instruction count does not show.

This probe's host descriptors cannot go into its `--aoti` package: torch.export's tracing of a `triton_op` outside
torch.cond does not capture them (AOTInductor:
"TypeError: '<=' not supported between instances of 'TensorDescriptor' and 'int'"). Descriptors the kernel makes
itself (`--descriptors device`, `tl.make_tensor_descriptor` in Triton's global scratch) compile into an
AOTInductor package with a dynamic M and matched float64 there (`--aoti`). But torch 2.11's AOTInductor allocates
that scratch for one program only, so the other programs wrote past it: the match shows nothing about safety
(from torch 2.12 the allocation covers the grid). They cost each program about 1-3 µs more (52.5 / 72.5 µs on
8192 x 28672). The op's one-dot kernel takes host descriptors (`one_dot.use_tma`, `kernel.TMA_TILES`): its M
buckets are torch.cond branches, which Dynamo traces, and Dynamo captures them. This probe's blocks are wider
than 128 bytes, which only Triton's launcher can encode; the op's have rows of 128 bytes (see one_dot.launch).

Scope: symmetric g128 weights in the planar layout, 16-bit x, K a multiple of 128, fp32 output (split-K
atomics), the scale on each step's product (as the shipped `SCALE_W=False`).

    OUT=... python3 tools/diag/int4_tma_probe.py [--shapes KxN ...] [--ms 16 64 100]
                                                 [--stages 3 4 5] [--waves 1 2 4 8] [--aoti]
                                                 [--descriptors host device persistent]
    python3 tools/diag/int4_tma_probe.py --sass      # sm_90 loop instruction counts, compiled on any machine
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from qcompile.plugins.gemm_dispatch import cdiv, split_for_waves  # noqa: E402
from qcompile.plugins.int4_gemm.one_dot import _cat_k, decode64  # noqa: E402
from qcompile.plugins.triton_tiles import store_tile  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from int4_gemv_pairs_probe import against_shipped, best_of_each, int4_weight_sets  # noqa: E402

GROUP = 128
STEP = 128  # K per step: two 64-K planar blocks, one MMA


@triton.jit
def _tma_steps(x_desc, w_desc, s_ptr, y_ptr, M, N, K, k_per_split, K_STEPS: tl.constexpr,
               BLOCKS_PER_GROUP: tl.constexpr, ATOMIC: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """The tile of this program's ids (N tile, K split, M tile): `_tma_tile`."""
    _tma_tile(x_desc, w_desc, s_ptr, y_ptr, M, N, K, tl.program_id(0) * BLOCK_N, tl.program_id(1) * k_per_split,
              tl.program_id(2) * BLOCK_M, K_STEPS, BLOCKS_PER_GROUP, ATOMIC, ASM, BLOCK_M, BLOCK_N)


@triton.jit
def _tma_tile(x_desc, w_desc, s_ptr, y_ptr, M, N, K, n0, k_lo, m0, K_STEPS: tl.constexpr,
              BLOCKS_PER_GROUP: tl.constexpr, ATOMIC: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """y [M, N] (or its split-K part) = x @ dequant(W) on the tile at columns n0, rows m0, K from k_lo, swapped
    operands as the one-dot kernel; x_desc: x [M, K] in [BLOCK_M, 128] boxes; w_desc: the planar words [K/8, N]
    int32 in [8, BLOCK_N] boxes (one 64-K block)."""
    dt: tl.constexpr = x_desc.dtype
    offset: tl.constexpr = 1032.0 if dt == tl.float16 else 136.0
    offs_n = n0 + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, K_STEPS):
        k0 = k_lo + step * 128
        kb = k0 // 64
        a0 = decode64(tl.trans(w_desc.load([kb * 8, n0])), BLOCK_N, dt, ASM)
        a1 = decode64(tl.trans(w_desc.load([kb * 8 + 8, n0])), BLOCK_N, dt, ASM)
        a = _cat_k(a0, a1, BLOCK_N, 64) - offset  # past K (a split's last steps) x loads as 0
        xt = tl.trans(x_desc.load([m0, k0]))
        s = tl.load(s_ptr + (kb // BLOCKS_PER_GROUP) * N + offs_n, mask=(offs_n < N) & (k0 < K), other=0.0)
        acc += tl.dot(a, xt) * s.to(tl.float32)[:, None]
    offs_m = m0 + tl.arange(0, BLOCK_M)
    store_tile(y_ptr + offs_m.to(tl.int64)[None, :] * N + offs_n[:, None], acc,
               (offs_m < M)[None, :] & (offs_n < N)[:, None], ATOMIC)


@triton.jit(do_not_specialize=["M"])
def _int4_tma_kernel(x_desc, w_desc, s_ptr, y_ptr, M, N, K, k_per_split,
                     K_STEPS: tl.constexpr, BLOCKS_PER_GROUP: tl.constexpr, ATOMIC: tl.constexpr,
                     ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_tma_steps` on descriptors made on the host (`TensorDescriptor`)."""
    _tma_steps(x_desc, w_desc, s_ptr, y_ptr, M, N, K, k_per_split, K_STEPS, BLOCKS_PER_GROUP, ATOMIC, ASM,
               BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["M"])
def _int4_tma_device_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, k_per_split,
                            K_STEPS: tl.constexpr, BLOCKS_PER_GROUP: tl.constexpr, ATOMIC: tl.constexpr,
                            ASM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_tma_steps` on descriptors each program makes itself (`tl.make_tensor_descriptor`: plain pointers in the
    signature, as torch's non-dynamo tracing of a `triton_op` can pass them; needs Triton's global scratch)."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, 128])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K // 8, N], strides=[N, 1], block_shape=[8, BLOCK_N])
    _tma_steps(x_desc, w_desc, s_ptr, y_ptr, M, N, K, k_per_split, K_STEPS, BLOCKS_PER_GROUP, ATOMIC, ASM,
               BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["M"])
def _int4_tma_persistent_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, k_per_split, TILES_N, SPLITS,
                                TILES, K_STEPS: tl.constexpr, BLOCKS_PER_GROUP: tl.constexpr,
                                ATOMIC: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr):
    """Device descriptors made once per program, which then takes every num_programs-th of the TILES tiles (N tile
    fastest, then K split, then M tile), so their cost is paid once per SM slot rather than once per tile."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, 128])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K // 8, N], strides=[N, 1], block_shape=[8, BLOCK_N])
    t = tl.program_id(0)
    while t < TILES:
        rest = t // TILES_N
        _tma_tile(x_desc, w_desc, s_ptr, y_ptr, M, N, K, (t % TILES_N) * BLOCK_N, (rest % SPLITS) * k_per_split,
                  (rest // SPLITS) * BLOCK_M, K_STEPS, BLOCKS_PER_GROUP, ATOMIC, ASM, BLOCK_M, BLOCK_N)
        t += tl.num_programs(0)


def launch(x2d, w_packed, w_scale, cfg: dict, *, asm: bool = True, num_sms: int = 132, wrap=lambda k: k) -> torch.Tensor:
    """fp32 `x2d @ dequant(W)` [M, N] through `_int4_tma_kernel`, `_int4_tma_device_kernel` when cfg["device"], or
    `_int4_tma_persistent_kernel` when cfg["persistent"] (`wrap`: `torch.library.wrap_triton` inside a
    `triton_op`)."""
    m, k = x2d.shape
    n = w_packed.shape[1]
    if x2d.dtype not in (torch.float16, torch.bfloat16) or k % STEP:
        raise ValueError(f"TMA probe: needs fp16/bf16 x and K a multiple of {STEP} (got {x2d.dtype}, K = {k})")
    tiles_n = cdiv(n, cfg["BLOCK_N"])
    splits, per = split_for_waves(k, tiles_n, STEP, cfg["waves"], num_sms, cfg.get("resident", 0))
    y = (torch.zeros if splits > 1 else torch.empty)((m, n), dtype=torch.float32, device=x2d.device)
    grid = (tiles_n, splits, cdiv(m, cfg["BLOCK_M"]))
    meta = dict(K_STEPS=per // STEP, BLOCKS_PER_GROUP=GROUP // 64, ATOMIC=splits > 1, ASM=asm,
                BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
                num_stages=cfg["num_stages"])
    if cfg.get("persistent"):  # cfg["persistent"] programs per SM, at most one per tile
        tiles = grid[0] * grid[1] * grid[2]
        programs = min(tiles, num_sms * cfg["persistent"])
        wrap(_int4_tma_persistent_kernel)[(programs,)](
            x2d, w_packed, w_scale, y, m, n, k, x2d.stride(0), per, grid[0], grid[1], tiles, **meta)
    elif cfg.get("device"):
        wrap(_int4_tma_device_kernel)[grid](x2d, w_packed, w_scale, y, m, n, k, x2d.stride(0), per, **meta)
    else:
        x_desc = TensorDescriptor.from_tensor(x2d, [cfg["BLOCK_M"], STEP])
        w_desc = TensorDescriptor.from_tensor(w_packed, [8, cfg["BLOCK_N"]])
        wrap(_int4_tma_kernel)[grid](x_desc, w_desc, w_scale, y, m, n, k, per, **meta)
    return y


KINDS = {"host": {}, "device": dict(device=True), "persistent": dict(persistent=3)}  # persistent: 3 programs/SM


def configs(m: int, stages=(3, 4, 5), waves=(1, 2, 4, 8), kinds=("host",)):
    """Candidate tiles for m rows: the shipped bucket's BLOCK_M, 64- or 128-column tiles, `stages`, split-K
    targets around the shipped ones, for each kind of descriptor (`KINDS`: made on the host, by each program,
    or once by each persistent program)."""
    block_m = shipped(m)["BLOCK_M"]
    for kind, bn, st, wv in itertools.product(kinds, (64, 128), stages, waves):
        tag = {"host": "tma", "device": "tma-dev", "persistent": "tma-pers"}[kind]
        yield (f"{tag} {block_m}x{bn} s{st} waves{wv}",
               dict(BLOCK_M=block_m, BLOCK_N=bn, num_warps=4, num_stages=st, waves=wv, **KINDS[kind]))


def shipped(m: int) -> dict:
    """The configuration the INT4 op runs at m rows, which must be a one-dot bucket (2-128 rows)."""
    from qcompile.plugins.gemm_dispatch import bucket_for
    from qcompile.plugins.int4_gemm.kernel import CONFIGS
    cfg = bucket_for(CONFIGS, m)
    if cfg["kernel"] != "one_dot":
        raise SystemExit(f"int4_tma_probe: M = {m} runs the {cfg['kernel']} path, not a one-dot tile; "
                         "pick --ms between 2 and 128")
    return cfg


def cell(k: int, n: int, m: int, candidates) -> dict:
    from qcompile.plugins.int4_gemm import one_dot
    from qcompile.plugins.int4_gemm.reference import dequantize_weight
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    sets = int4_weight_sets(k, n)
    ref = x.double() @ dequantize_weight(*sets[0], None, GROUP).double().to(x.device)
    res = {"K": k, "N": n, "M": m}
    ship = shipped(m)
    timed = against_shipped(x, sets, ref, lambda w, sc: one_dot.launch(x, w, sc, None, GROUP, ship, asm=True),
                            candidates(m), lambda w, sc, cfg: launch(x, w, sc, cfg), res, "shipped one_dot")
    line = f"{k}x{n} M={m}: bf16 {res['cublas bf16']:.1f} | shipped one_dot {res['shipped one_dot']:.1f}"
    if timed:
        res["best"] = min(timed, key=timed.get)
        line += best_of_each(timed, ("tma ", "tma-dev ", "tma-pers "), res["shipped one_dot"])
    else:
        line += " | no TMA configuration ran: " + str(next(v for kk, v in res.items() if kk.startswith("tma")))
    print(line, flush=True)
    return res


def sass() -> None:
    """Loop instruction counts of the TMA kernel at the shipped tiles, sm_90, compiled here (no GPU needed)."""
    from sass_count import compile_sass, report  # tools/diag, this script's folder
    sig = dict(x_desc="tensordesc<bf16[BM, 128]>", w_desc="tensordesc<i32[8, 64]>", s_ptr="*bf16", y_ptr="*fp32",
               M="i32", N="i32", K="i32", k_per_split="i32")
    for bm in (16, 64, 128):
        s = dict(sig, x_desc=f"tensordesc<bf16[{bm}, 128]>")
        report(f"int4_tma_{bm}", compile_sass(_int4_tma_kernel, s,
                                              dict(K_STEPS=32, BLOCKS_PER_GROUP=2, ATOMIC=True, ASM=True, BLOCK_M=bm,
                                                   BLOCK_N=64),
                                              ["s_ptr", "y_ptr", "N", "K", "k_per_split"], 4, 3),
               64 * 128 // 128)
    ptr_sig = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", y_ptr="*fp32", M="i32", N="i32", K="i32",
                   stride_xm="i32", k_per_split="i32")
    for name, fn, extra in (("int4_tma_device_16", _int4_tma_device_kernel, {}),
                            ("int4_tma_persistent_16", _int4_tma_persistent_kernel,
                             dict(TILES_N="i32", SPLITS="i32", TILES="i32"))):  # the first backward branch: the
        # persistent kernel's K loop (its tile loop encloses it)
        report(name, compile_sass(fn, dict(ptr_sig, **extra),
                                  dict(K_STEPS=32, BLOCKS_PER_GROUP=2, ATOMIC=True, ASM=True, BLOCK_M=16, BLOCK_N=64),
                                  ["x_ptr", "w_ptr", "s_ptr", "y_ptr", "N", "K", "stride_xm", "k_per_split"], 4, 3),
               64 * 128 // 128)


def aoti_check(kinds, k: int = 1024, n: int = 2048) -> dict:
    """Each descriptor kind (`KINDS`) in a `triton_op` compiled by AOTInductor with a dynamic M, loaded and run at a few M
    against float64: whether an engine can carry the TMA kernel. Returns {kind: max relative error or why not}."""
    import tempfile

    import torch._inductor
    from torch.export import Dim, export

    from qcompile.plugins.int4_gemm.reference import dequantize_weight
    from bench_fp4_gemm import make_int4
    w_packed, w_scale = make_int4(k, n)
    w_ref = dequantize_weight(w_packed, w_scale, None, GROUP).double()
    out = {}
    for kind in kinds:
        cfg = dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3, waves=8, **KINDS[kind])
        name = f"qcompile_diag::int4_tma_{kind}"

        def define(cfg):
            @torch.library.triton_op(name, mutates_args={})
            def op(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                return launch(x, w, s, cfg, wrap=torch.library.wrap_triton)
        define(cfg)

        class Gemm(torch.nn.Module):
            def __init__(self, name=name):
                super().__init__()
                self.register_buffer("w", w_packed)
                self.register_buffer("s", w_scale)
                self.fn = getattr(torch.ops.qcompile_diag, name.split("::")[1])

            def forward(self, x):
                return self.fn(x, self.w, self.s)
        try:
            x = torch.randn(8, k, device="cuda", dtype=torch.bfloat16)
            ep = export(Gemm(), (x,), dynamic_shapes={"x": {0: Dim("m", min=2, max=4096)}})
            with tempfile.TemporaryDirectory() as tmp:
                path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(tmp, "tma.pt2"))
                runner = torch._inductor.aoti_load_package(path)
                errs = []
                for m in (3, 16, 64, 300):
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    ref = x.double() @ w_ref
                    y = runner(x)
                    y = y[0] if isinstance(y, (list, tuple)) else y
                    errs.append(float((y.double() - ref).norm() / ref.norm()))
            out[kind] = max(errs)
        except Exception as e:  # noqa: BLE001  (what AOTInductor could not carry)
            out[kind] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        print(f"AOTInductor package, dynamic M, {kind}: {out[kind]}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="*", default=["4096x4096", "4096x14336", "14336x4096", "8192x28672"])
    ap.add_argument("--ms", type=int, nargs="*", default=[16, 64, 100])
    ap.add_argument("--stages", type=int, nargs="*", default=[3, 4, 5])
    ap.add_argument("--waves", type=float, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--descriptors", nargs="*", choices=sorted(KINDS), default=["host"],
                    help="where the TMA descriptors are made (device: by each program, in Triton's global scratch; "
                         "persistent: once by each of 3 programs per SM, which loop over the tiles)")
    ap.add_argument("--aoti", action="store_true", help="also compile each kind of --descriptors into an "
                    "AOTInductor package")
    ap.add_argument("--sass", action="store_true", help="only the sm_90 loop instruction counts (no GPU)")
    args = ap.parse_args()
    if args.sass:
        return sass()
    from gpu_timing import MODE
    MODE["graph"] = True
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    def candidates(m):
        return configs(m, args.stages, args.waves, args.descriptors)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    result["rows"] = [cell(int(s.split("x")[0]), int(s.split("x")[1]), m, candidates)
                      for s in args.shapes for m in args.ms]
    out = os.path.join(os.environ.get("OUT", "."), "int4_tma_probe.json")

    def write():
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
    write()  # the timings are kept even if the package below crashes the process
    if args.aoti:
        result["aoti"] = aoti_check(args.descriptors)
        write()
    print("wrote", out)


if __name__ == "__main__":
    main()
