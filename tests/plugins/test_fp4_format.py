"""FP4 formats: exhaustive E2M1 / E4M3 / E8M0 encode-decode against ml_dtypes, packing round-trips, and
the NVFP4 / MXFP4 quantizers against float64 numpy references."""
import ml_dtypes
import numpy as np
import pytest
import torch

from qcompile.algorithms import fp4 as Q
from qcompile.plugins.fp4_gemm import format as F


def test_e2m1_decode_all_codes_matches_ml_dtypes():
    codes = np.arange(16, dtype=np.uint8)
    want = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float64)
    got = F.e2m1_decode(torch.from_numpy(codes)).double().numpy()
    np.testing.assert_array_equal(got, want)


def test_e2m1_encode_matches_ml_dtypes_on_a_dense_grid():
    # every code, every midpoint (ties), points around them, saturation and zero signs
    grid = np.unique(np.concatenate([np.linspace(-8, 8, 6401), np.array(F._MIDPOINTS), -np.array(F._MIDPOINTS),
                                     np.array(F.E2M1_VALUES), [-0.0, 1e-30, -1e-30, 7.0, 1e9, -1e9, np.inf, -np.inf]]))
    x = grid.astype(np.float32)
    want = x.astype(ml_dtypes.float4_e2m1fn).view(np.uint8) & 0xF
    got = F.e2m1_encode(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, want)


def test_e2m1_round_matches_ml_dtypes_with_signed_zeros_and_nan():
    """The arithmetic rounding equals a cast to FLOAT4E2M1 and back on every tie, around each midpoint and value,
    on a dense grid of fp32 values and at the extremes; the sign of zero results follows x; NaN saturates to 6
    (as e2m1_encode defines it)."""
    near = np.concatenate([np.array(F._MIDPOINTS + F.E2M1_VALUES, dtype=np.float32)[:, None]
                           + np.array([-2e-6, -6e-8, 0.0, 6e-8, 2e-6], dtype=np.float32)]).ravel()
    rng = np.random.default_rng(3)
    grid = np.concatenate([np.linspace(-8, 8, 64001, dtype=np.float32), near, -near,
                           rng.standard_normal(20000).astype(np.float32) * 3,
                           np.array([-0.0, 1e-30, -1e-30, 7.0, 1e9, -1e9, np.inf, -np.inf], dtype=np.float32)])
    want = grid.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
    got = F.e2m1_round(torch.from_numpy(grid)).numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
    assert float(F.e2m1_round(torch.tensor(float("nan")))) == 6.0


def test_fake_quantize_equals_the_codes_path():
    """`nvfp4_fake_quantize` (rounded values) is the codes of `nvfp4_dynamic_quantize` decoded and scaled, bit for
    bit, with zero blocks, outliers and a global scale that saturates some block scales."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 128, generator=gen) * torch.exp(torch.randn(6, 128, generator=gen) * 2)
    x[1, :16] = 0.0
    x[2, 5] = 1e4
    for g in (torch.tensor(x.abs().max() / (6 * 448)), torch.tensor(1e-3)):
        codes, sx = F.nvfp4_dynamic_quantize(x, g)
        want = F.dequantize_blocks(codes, sx.to(torch.float32) * g, F.NVFP4_BLOCK)
        got = F.nvfp4_fake_quantize(x, g)
        assert torch.equal(got, want) and torch.equal(torch.signbit(got), torch.signbit(want))


def test_e2m1_encode_decode_round_trips_every_code():
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(F.e2m1_encode(F.e2m1_decode(codes)), codes)


def test_e4m3_all_codes_round_trip_and_encode_matches_ml_dtypes():
    bits = np.arange(256, dtype=np.uint8)
    vals = bits.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    finite = np.isfinite(vals)
    got = F.e4m3_encode(torch.from_numpy(vals[finite])).view(torch.uint8).numpy()
    np.testing.assert_array_equal(got, bits[finite])
    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 100
    x = np.concatenate([x, (vals[finite][:-1] + vals[finite][1:]) / 2])  # ties between neighbours
    x = x[np.isfinite(x) & (np.abs(x) <= 448)]
    np.testing.assert_array_equal(F.e4m3_encode(torch.from_numpy(x)).view(torch.uint8).numpy(),
                                  x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))
    assert float(F.e4m3_encode(torch.tensor(1e6)).float()) == 448.0  # saturates


def test_e8m0_decode_all_codes_matches_ml_dtypes():
    bits = np.arange(256, dtype=np.uint8)
    want = bits.view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
    got = F.e8m0_decode(torch.from_numpy(bits)).double().numpy()
    np.testing.assert_array_equal(got, want)  # (NaN == NaN under assert_array_equal)


def test_e8m0_shared_exponent_follows_the_ocp_mx_rule():
    amax = np.array([6.0, 4.0, 7.99, 8.0, 0.75, 1e-3, 3.0e38, 1e-45], np.float32)
    want = np.clip(np.floor(np.log2(amax.astype(np.float64))) - 2 + 127, 0, 254)
    np.testing.assert_array_equal(F.e8m0_from_amax(torch.from_numpy(amax)).numpy(), want)
    assert int(F.e8m0_from_amax(torch.tensor([0.0]))[0]) == 0


def test_pack_unpack_round_trip_and_onnx_nibble_order():
    codes = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    packed = F.pack_codes(codes)
    assert packed.shape == (5, 6)
    assert torch.equal(F.unpack_codes(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | int(codes[0, 1]) << 4  # first element in the low nibble
    # the same bytes ONNX writes for a row-major FLOAT4E2M1 tensor
    from onnx import numpy_helper
    raw = numpy_helper.from_array(F.codes_to_float4(codes.numpy())).raw_data
    assert np.frombuffer(raw, np.uint8).tolist() == packed.reshape(-1).tolist()
    assert np.array_equal(F.float4_to_codes(F.codes_to_float4(codes.numpy())), codes.numpy())
    with pytest.raises(ValueError):
        F.pack_codes(torch.zeros(3, dtype=torch.uint8))


def _np_e2m1(y):
    """float64 reference cast to E2M1 (round half to even code, saturate)."""
    grid = np.array(F.E2M1_VALUES)
    mag = np.minimum(np.abs(y), 6.0)
    d = np.abs(mag[..., None] - grid)
    best = d.min(-1, keepdims=True)
    cand = np.where(np.isclose(d, best, rtol=0, atol=0), np.arange(8), 99)
    even = np.where(cand % 2 == 0, cand, 99).min(-1)
    idx = np.where((cand < 99).sum(-1) > 1, even, cand.min(-1))
    return np.sign(y) * grid[idx]


@pytest.mark.parametrize("mse", [False, True])
def test_nvfp4_weight_quantization_matches_float64_reference(mse):
    w = torch.randn(64, 24, generator=torch.Generator().manual_seed(1)) * 0.05
    w[3, 5] = 0.9  # an outlier
    qw = Q.quantize_nvfp4(w, mse_search=mse)
    assert qw.codes.shape == (24, 64) and qw.scale.shape == (24, 4) and qw.scale.dtype == torch.float8_e4m3fn
    wt = w.double().t().numpy()
    g = float(qw.global_scale)
    if not mse:
        assert g == np.float32(np.abs(wt).max() / (6 * 448))
    amax = np.abs(wt.reshape(24, 4, 16)).max(-1)
    bs = (amax / 6 / np.float32(g)).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    if mse:  # the MSE search picks each block's E4M3 scale itself: check the codes against the scales it chose
        bs = qw.scale.float().double().numpy()
    np.testing.assert_array_equal(qw.scale.float().double().numpy(), bs)
    eff = (bs.astype(np.float32) * np.float32(g)).astype(np.float64)
    want = _np_e2m1((wt.reshape(24, 4, 16).astype(np.float32) / eff[..., None].astype(np.float32)).astype(np.float64))
    np.testing.assert_array_equal(F.e2m1_decode(qw.codes).double().numpy().reshape(24, 4, 16), want)
    np.testing.assert_allclose(qw.dequantize().double().numpy(), (want * eff[..., None]).reshape(24, 64), rtol=1e-6)
    err = float(((qw.dequantize() - w.t()) ** 2).sum())
    if mse:
        assert err <= float(((Q.quantize_nvfp4(w).dequantize() - w.t()) ** 2).sum())


def test_mxfp4_weight_quantization_matches_float64_reference():
    w = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    w[:32, 0] = 0.0  # an all-zero block
    qw = Q.quantize_mxfp4(w)
    assert qw.global_scale is None and qw.scale.dtype == torch.uint8 and qw.scale.shape == (8, 2)
    wt = w.double().t().numpy().reshape(8, 2, 32)
    amax = np.abs(wt).max(-1)
    exp = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, -127)
    np.testing.assert_array_equal(qw.scale.numpy(), exp + 127)
    scale = 2.0 ** exp
    want = _np_e2m1(wt / scale[..., None]) * scale[..., None]
    np.testing.assert_array_equal(qw.dequantize().double().numpy(), want.reshape(8, 64))


def test_nvfp4_dynamic_quantize_matches_reference_and_handles_zero_blocks():
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    x[1, :16] = 0
    g = Q.nvfp4_global_scale(x.float().abs().amax())
    codes, sx = F.nvfp4_dynamic_quantize(x, g)
    xd = x.double().numpy().reshape(3, 2, 16)
    gs = np.float32(float(g))
    bs = (np.abs(xd).max(-1) / 6 / gs).astype(np.float32).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(sx.float().numpy(), bs)
    eff = bs * gs
    safe = np.where(eff > 0, eff, 1)
    want = np.where(eff[..., None] > 0, _np_e2m1((xd.astype(np.float32) / safe[..., None]).astype(np.float64)), 0)
    np.testing.assert_array_equal(F.e2m1_decode(codes).double().numpy().reshape(3, 2, 16), want)
    assert not torch.isnan(F.nvfp4_fake_quantize(x, g)).any()
    assert Q.activation_global_scale(0.0) == 1.0 and Q.activation_global_scale(None) == 1.0
