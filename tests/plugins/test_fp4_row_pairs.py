"""FP4 planar words in row pairs (`format.to_row_pairs`, CUDA engines' layout "pairs"): the layout against its
definition, round trips, the op's CPU path, the lowering's layout, and every CUDA path of the op reading it (the
one-dot tiles through pointers and TMA, the planar GEMV, the fp32 tile kernel, the dequantize kernel) against
float64 and bit for bit against the same kernels on plain planar words. Interpreter tests run with TRITON_INTERPRET=1
on CPU (skipped without triton: CI); the CUDA tests carry the `gpu` marker."""
from __future__ import annotations

import pytest
import torch

from fp4_testutil import (FMTS, aoti_fp4_linear, args, assert_rel_l2, cuda, fused_fp4_model, make_case, oracle,
                          planar_case, triton_interp)
from qc_testutil import fake_cuda_export, launch_spy
from qcompile.plugins.fp4_gemm import format as F
from qcompile.plugins.fp4_gemm.reference import fp4_gemm_reference


def pairs_case(fmt: str, k: int, n: int, seed: int = 0) -> tuple[dict, dict]:
    """(the case on planar words, the same weights in row pairs)."""
    case = planar_case(fmt, k, n, seed)
    return case, dict(case, w_packed=F.to_row_pairs(case["w_packed"]))


# ---------------------------------------------------------------- the layout (CPU)

def test_row_pairs_place_each_word_as_defined():
    """Word w of row n lands at flat word (n // 2) * K/4 + (n % 2) * 16 + (w // 16) * 32 + w % 16 (the format's
    definition, written out here independently of `to_row_pairs`)."""
    n, k = 6, 384
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (n, k // 8), generator=torch.Generator().manual_seed(0),
                          dtype=torch.int32)
    pairs = F.to_row_pairs(words)
    assert pairs.shape == (3, 3, 2, 16) and pairs.is_contiguous() and F.is_row_pairs(pairs) and F.is_planar(pairs)
    flat = pairs.reshape(-1)
    for row in range(n):
        for w in range(k // 8):
            assert flat[(row // 2) * (k // 4) + (row % 2) * 16 + (w // 16) * 32 + w % 16] == words[row, w], (row, w)


@pytest.mark.parametrize("fmt", FMTS)
def test_row_pairs_round_trip_and_shapes(fmt):
    case, paired = pairs_case(fmt, 640, 24, seed=1)
    assert torch.equal(F.from_row_pairs(paired["w_packed"]), case["w_packed"])
    assert torch.equal(F.engine_bytes(paired["w_packed"]), F.engine_bytes(case["w_packed"]))
    assert F.weight_nk(paired["w_packed"]) == F.weight_nk(case["w_packed"]) == (24, 640)
    assert not F.is_row_pairs(case["w_packed"]) and F.weight_nk(make_case(fmt, 640, 24)["w_packed"]) == (24, 640)


def test_row_pairs_need_an_even_n_and_k_a_multiple_of_128():
    with pytest.raises(ValueError, match="even N and K a multiple of 128"):
        F.to_row_pairs(torch.zeros(5, 16, dtype=torch.int32))
    with pytest.raises(ValueError, match="even N and K a multiple of 128"):
        F.to_row_pairs(torch.zeros(4, 24, dtype=torch.int32))


@pytest.mark.parametrize("fmt", FMTS)
def test_reference_takes_row_pairs(fmt):
    """The op's CPU path on row pairs gives the same bits as on the ONNX bytes."""
    bytes_case = make_case(fmt, k=256, n=40, seed=3)
    pairs = F.to_row_pairs(F.to_planar_words(bytes_case["w_packed"], bytes_case["w_scale"]))
    x, bias = torch.randn(3, 256), torch.randn(40)
    want = torch.ops.qcompile.fp4_gemm(x, *args(bytes_case), None, bias, bytes_case["block"])
    got = torch.ops.qcompile.fp4_gemm(x, pairs, *args(bytes_case)[1:], None, bias, bytes_case["block"])
    assert torch.equal(got, want)


def test_op_rejects_a_pairs_tensor_of_the_wrong_shape():
    case, paired = pairs_case("mxfp4", 256, 8)
    wrong = paired["w_packed"].reshape(4, 2, 32)  # 3-D: neither planar words nor row pairs
    with pytest.raises(ValueError, match=r"row pairs\), got torch.int32 \(4, 2, 32\)"):
        fp4_gemm_reference(torch.randn(2, 256), wrong, case["w_scale"], None, None, None, 32)


def test_lowering_stores_row_pairs_when_asked():
    """fp4_layout="pairs": the weight as int32 [N/2, K/128, 2, 16], the same outputs as the byte engine; N odd
    keeps planar words, K not a multiple of 128 bytes."""
    from qcompile.lowering import lower_onnx

    fused = fused_fp4_model(k=256, n=32)
    x = torch.randn(2, 256)
    pairs = lower_onnx(fused, fp4_layout="pairs")
    assert [tuple(b.shape) for b in pairs.buffers() if b.dtype == torch.int32] == [(16, 2, 2, 16)]
    assert torch.equal(pairs(x)[0], lower_onnx(fused)(x)[0])
    odd = lower_onnx(fused_fp4_model(k=256, n=33), fp4_layout="pairs")
    assert [tuple(b.shape) for b in odd.buffers() if b.dtype == torch.int32] == [(33, 32)]
    short = lower_onnx(fused_fp4_model(k=192, n=32), fp4_layout="pairs")
    assert not any(b.dtype == torch.int32 for b in short.buffers())


# ---------------------------------------------------------------- kernel paths (interpreter)

@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("row_words", [8, 16, 32])
def test_one_dot_on_row_pairs_interpreter(fmt, tma, row_words):
    """The one-dot kernel on row pairs, through pointers or TMA boxes ([BLOCK_N / 2, 1, 2, 16]): a partial N tile
    with K split unevenly, and whole tiles (EVEN), each against float64 and bit for bit against planar words; row
    pairs read each row's 16-word run of a step whatever "row_words" asks."""
    from qcompile.plugins.fp4_gemm import one_dot

    for n, k, block_n, even in ((96, 1152, 64, False), (64, 1024, 32, True)):
        case, paired = pairs_case(fmt, k, n, seed=n)
        x = torch.randn(5, k, generator=torch.Generator().manual_seed(n)).to(torch.float16)
        bias = torch.randn(n)
        cfg = dict(BLOCK_M=16, BLOCK_N=block_n, num_warps=4, num_stages=2, waves=4, row_words=row_words)
        if tma:
            cfg["tma"] = dict(min_n=0, interpret=True)
        seen = []
        spy = launch_spy(lambda grid, kw: seen.append((grid[1], kw["TMA"], kw["EVEN"], kw["ROW_WORDS"], kw["PAIRED"])))
        y = one_dot.launch(x, *args(paired), bias, cfg, asm=False, num_sms=2, wrap=spy)
        assert seen[0][0] > 1 and seen[0][1:] == (tma, even, 16, True), seen  # split K
        assert_rel_l2(y.to(torch.float16), oracle(x, case, bias), torch.float16)
        cfg16 = dict(cfg, row_words=16)
        assert torch.equal(y, one_dot.launch(x, *args(case), bias, cfg16, asm=False, num_sms=2))


@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype,m", [(torch.float16, 1), (torch.float16, 17), (torch.float16, 200),
                                     (torch.float32, 3), (torch.float32, 70)])
def test_op_gpu_body_on_row_pairs_interpreter(fmt, dtype, m):
    """`fp4_gemm_triton` on row pairs: the planar GEMV at M = 1, the one-dot tiles, the fp32 tile kernel and the
    dequantize kernel + matmul from LARGE_M_MIN, each against float64 and bit for bit against planar words."""
    from qcompile.plugins.fp4_gemm import kernel

    case, paired = pairs_case(fmt, 384, 72, seed=m)
    x = torch.randn(m, 384, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(72)
    y = kernel.fp4_gemm_triton(x, *args(paired), bias, case["block"], num_sms=4)
    assert y.dtype == dtype and y.shape == (m, 72)
    assert_rel_l2(y, oracle(x, case, bias), dtype)
    assert torch.equal(y, kernel.fp4_gemm_triton(x, *args(case), bias, case["block"], num_sms=4))


def check_gemv_tiles_on_row_pairs(fmt: str, k: int, n: int, device: str):
    """Each shipped GEMV tile (`gemv_planar`'s GEMV_PLANAR, GEMV_PAIRS, GEMV_PAIRS_MX_DEEP) on row pairs against
    float64, and bit for bit against the same tile on planar words: a bf16 row of x with a bias, N rows (a partial
    last program where N is not a multiple of the tile's rows)."""
    from qcompile.plugins.fp4_gemm import gemv_planar as G

    case, paired = pairs_case(fmt, k, n, seed=n)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(k)).to(torch.bfloat16)
    bias = torch.randn(n).to(torch.bfloat16)
    on = [t.to(device) if t is not None else None for t in (x, *args(case), *args(paired), bias)]
    for tile in (G.GEMV_PLANAR, G.GEMV_PAIRS, G.GEMV_PAIRS_MX_DEEP):
        y = G.launch_gemv_planar(on[0], *on[4:7], on[7], case["block"], tile)
        assert_rel_l2(y.cpu(), oracle(x, case, bias.float()), torch.bfloat16)
        assert torch.equal(y, G.launch_gemv_planar(on[0], *on[1:4], on[7], case["block"], tile))


@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
def test_gemv_tiles_on_row_pairs_interpreter(fmt):
    """(`check_gemv_tiles_on_row_pairs`) 70 rows: the 4-row tile's last program half past N."""
    check_gemv_tiles_on_row_pairs(fmt, 384, 70, "cpu")


@triton_interp
@pytest.mark.parametrize("fmt", FMTS)
def test_dequant_on_row_pairs_equals_the_byte_layouts_interpreter(fmt):
    from qcompile.plugins.fp4_gemm import kernel

    bytes_case = make_case(fmt, k=640, n=40, seed=5)
    pairs = F.to_row_pairs(F.to_planar_words(bytes_case["w_packed"], bytes_case["w_scale"]))
    for dtype in (torch.float32, torch.float16):
        want = kernel.launch_dequant(*args(bytes_case), bytes_case["block"], dtype)
        assert torch.equal(kernel.launch_dequant(pairs, *args(bytes_case)[1:], bytes_case["block"], dtype), want)
    with pytest.raises(ValueError, match="row pairs need BLOCK_K a multiple of 128"):
        kernel.launch_dequant(pairs, *args(bytes_case)[1:], bytes_case["block"], torch.float32,
                              cfg=dict(kernel.DEQUANT, BLOCK_K=64))


@triton_interp
def test_gemv_tile_on_row_pairs_follows_the_layer_width_and_depth():
    """Row pairs take `GEMV_PAIRS` up to GEMV_PAIRS_MAX_N weight rows (MXFP4 deeper than GEMV_MX_DEEP_K
    `GEMV_PAIRS_MX_DEEP`) and the planar tile above; planar words the planar tile (the launches are recorded, not
    run)."""
    from qcompile.plugins.fp4_gemm import gemv_planar as G

    class Stop(Exception):
        """Raised at the GEMV's launch with its tile (after x's scaling kernel ran): the GEMV itself does not run."""

    def record(grid, kw):
        if "BLOCK_C" in kw:
            raise Stop((kw["BLOCK_N"], kw["BLOCK_C"], kw["num_warps"]))

    def tile_for(n: int, pairs: bool, k: int = 128, mx: bool = False) -> tuple:
        words = torch.zeros(n, k // 8, dtype=torch.int32)
        words = F.to_row_pairs(words) if pairs else words
        block = 32 if mx else 16
        scale = torch.full((n, k // block), 127, dtype=torch.uint8) if mx else torch.ones(n, k // 16).to(
            torch.float8_e4m3fn)
        with pytest.raises(Stop) as stop:
            G.launch_gemv_planar(torch.randn(1, k).to(torch.bfloat16), words, scale, None, None, block,
                                 wrap=launch_spy(record))
        return stop.value.args[0]

    def as_tile(cfg: dict) -> tuple:
        return cfg["BLOCK_N"], cfg["BLOCK_C"], cfg["num_warps"]

    assert as_tile(G.GEMV_PAIRS) != as_tile(G.GEMV_PLANAR)
    assert tile_for(G.GEMV_PAIRS_MAX_N - 1, pairs=True) == as_tile(G.GEMV_PAIRS)
    assert tile_for(G.GEMV_PAIRS_MAX_N + 1, pairs=True) == as_tile(G.GEMV_PLANAR)
    assert tile_for(G.GEMV_PAIRS_MAX_N - 1, pairs=False) == as_tile(G.GEMV_PLANAR)
    deep = G.GEMV_MX_DEEP_K + 128
    assert as_tile(G.GEMV_PAIRS_MX_DEEP) not in (as_tile(G.GEMV_PAIRS), as_tile(G.GEMV_PLANAR))
    assert tile_for(64, pairs=True, k=deep, mx=True) == as_tile(G.GEMV_PAIRS_MX_DEEP)
    assert tile_for(64, pairs=True, k=G.GEMV_MX_DEEP_K, mx=True) == as_tile(G.GEMV_PAIRS)
    assert tile_for(64, pairs=True, k=deep, mx=False) == as_tile(G.GEMV_PAIRS)  # NVFP4 keeps its tile
    assert tile_for(64, pairs=False, k=deep, mx=True) == as_tile(G.GEMV_PLANAR)


@fake_cuda_export
@pytest.mark.parametrize("tma", [False, True])
def test_row_pairs_launches_export_on_fake_cuda_tensors(monkeypatch, tma):
    """The CUDA body on row pairs as an engine's export traces it (the M buckets in torch.cond, the Triton launches
    with PAIRED, the one-dot tiles' 4-D host descriptors with TMA), without a GPU."""
    from qc_testutil import expect_tma, export_on_fake_cuda
    from qcompile.plugins.fp4_gemm import kernel, one_dot

    if tma:
        monkeypatch.setattr(kernel, "ONE_DOT", [(limit, dict(cfg, tma=dict(min_n=0))) for limit, cfg in kernel.ONE_DOT])
    expect_tma(monkeypatch, lambda cfg: tma, one_dot)
    case, paired = pairs_case("nvfp4", 512, 256)
    weights = (*args(paired), None, torch.randn(256), case["block"])
    assert export_on_fake_cuda(monkeypatch, torch.ops.qcompile.fp4_gemm, weights,
                               torch.randn(8, 512).to(torch.bfloat16)) == [torch.ops.qcompile.fp4_gemm.default]


@fake_cuda_export
@pytest.mark.parametrize("pairs", [False, True])
def test_shipped_tma_rules_on_a_deep_wide_layer_export_on_fake_cuda_tensors(monkeypatch, pairs):
    """With the shipped tiles on a layer 16384 wide and 8192 deep, 16 rows load through TMA on planar words and
    through pointers on row pairs (`kernel.SMALL_TMA`'s on_pairs); 17-64 rows through TMA on both (`MID_TMA`), 65-128
    rows through pointers."""
    from qc_testutil import expect_tma, export_on_fake_cuda
    from qcompile.plugins.fp4_gemm import one_dot

    k, n = 8192, 16384
    expect_tma(monkeypatch, lambda cfg: {16: not pairs, 64: True, 128: False}[cfg["BLOCK_M"]], one_dot)
    words = torch.zeros(n, k // 8, dtype=torch.int32)  # the values do not matter: nothing runs
    words = F.to_row_pairs(words) if pairs else words
    weights = (words, torch.ones(n, k // 16).to(torch.float8_e4m3fn), torch.tensor(1.0), None, torch.randn(n), 16)
    assert export_on_fake_cuda(monkeypatch, torch.ops.qcompile.fp4_gemm, weights,
                               torch.randn(8, k).to(torch.bfloat16)) == [torch.ops.qcompile.fp4_gemm.default]


# ---------------------------------------------------------------- CUDA

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 70, 128, 200])
def test_cuda_op_on_row_pairs_matches_float64(fmt, dtype, m):
    """The op on row pairs against float64 at every M bucket, and (16-bit x up to 128 rows) with the TMA tiles
    forced on (`kernel.SMALL_TMA` / `MID_TMA` at any N and K)."""
    from qcompile.plugins.fp4_gemm import kernel

    case, paired = pairs_case(fmt, 1024, 320, seed=m)
    x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(320) if m % 2 else None
    dev = [t.cuda() if t is not None else None for t in (x, *args(paired), bias)]
    y = torch.ops.qcompile.fp4_gemm(dev[0], *dev[1:4], None, dev[4], case["block"])
    assert y.dtype == dtype and y.shape == (m, 320)
    assert_rel_l2(y, oracle(x, case, bias), dtype)
    tma = [(limit, dict(cfg, tma={**cfg.get("tma", {}), "min_n": 0, "min_k": 0, "on_pairs": True}))
           for limit, cfg in kernel.ONE_DOT]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel, "ONE_DOT", tma)
        y_tma = torch.ops.qcompile.fp4_gemm(dev[0], *dev[1:4], None, dev[4], case["block"])
    assert_rel_l2(y_tma, oracle(x, case, bias), dtype)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", FMTS)
def test_cuda_gemv_tiles_on_row_pairs_match_float64(fmt):
    """(`check_gemv_tiles_on_row_pairs`) K deeper than GEMV_MX_DEEP_K (where MXFP4 takes the 4-row tile), 1002 rows
    (the 4-row tile's last program half past N), the PTX dot products."""
    check_gemv_tiles_on_row_pairs(fmt, 8320, 1002, "cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fmt", FMTS)
def test_cuda_aoti_package_on_row_pairs(tmp_path, monkeypatch, fmt):
    """bf16 x with a dynamic row count through AOTInductor on row pairs (the GEMV, the one-dot tiles with their TMA
    boxes forced on, dequantize + cuBLAS), each against float64."""
    from qcompile.plugins.fp4_gemm import kernel

    monkeypatch.setattr(kernel, "ONE_DOT", [(limit, dict(cfg, tma=dict(min_n=0))) for limit, cfg in kernel.ONE_DOT])
    case, paired = pairs_case(fmt, 1024, 256, seed=8)
    weights = [t.cuda() if t is not None else None for t in args(paired)]
    bias = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    compiled = aoti_fp4_linear(weights, bias, case["block"], 1024, tmp_path / "fp4_pairs.pt2")
    for m in (1, 5, 40, 100, 1100):
        x = torch.randn(m, 1024, generator=torch.Generator().manual_seed(m)).to(torch.bfloat16)
        assert_rel_l2(compiled(x.cuda()), oracle(x, case, bias.cpu()), torch.bfloat16)
