"""FP4 weight quantization choices (`qcompile.algorithms.fp4`) and their recipe keys: the NVFP4 MSE scale search
(`weight.scale_search = "mse"`) against amax, MXFP4's E8M0 shared exponent against an independent float64
implementation of OCP MX v1.0 §6.3, and the FP4 recipe keys' validation."""
import math

import numpy as np
import pytest
import torch

from qcompile.algorithms import fp4 as Q
from qcompile.errors import RecipeError
from qcompile.recipes.schema import Recipe

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def _outlier_weight(k=256, n=96, seed=0):
    """A [K, N] weight: N(0, 0.02) with 0.3% of the entries 10x larger and one entry 1000x larger."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(k, n, generator=g) * 0.02
    idx = torch.randperm(w.numel(), generator=g)[: w.numel() * 3 // 1000]
    w.view(-1)[idx] *= 10.0
    w[7, 3] = 20.0
    return w


def _sse(qw, w):
    return float(((qw.dequantize().double() - w.double().t()) ** 2).sum())


def test_mse_scale_search_beats_amax_on_a_weight_with_outliers():
    w = _outlier_weight()
    amax, mse = Q.quantize_nvfp4(w), Q.quantize_nvfp4(w, mse_search=True)
    e_amax, e_mse = _sse(amax, w), _sse(mse, w)
    assert e_mse < 0.9 * e_amax, (e_mse, e_amax)  # measured: 0.87
    # still a plain NVFP4 weight: E4M3 block scales (finite, >= 0), FP32 global, codes 0..15
    assert mse.scale.dtype == torch.float8_e4m3fn and torch.isfinite(mse.scale.float()).all()
    assert mse.scale.float().min() >= 0 and mse.global_scale.dtype == torch.float32
    assert int(mse.codes.max()) <= 15 and mse.codes.shape == amax.codes.shape
    # never worse than amax on ordinary weights either (the amax choice is a candidate)
    for seed in range(3):
        v = torch.randn(64, 48, generator=torch.Generator().manual_seed(seed))
        assert _sse(Q.quantize_nvfp4(v, mse_search=True), v) <= _sse(Q.quantize_nvfp4(v), v)


def test_mse_search_is_nvfp4_only():
    w = _outlier_weight(64, 16)
    assert torch.equal(Q.quantize_fp4(w, "mxfp4", mse_search=True).codes, Q.quantize_mxfp4(w).codes)


# ---------------------------------------------------------------- MXFP4 vs OCP MX v1.0, float64, written here

def _ocp_mx_reference(wt: np.ndarray, block=32):
    """OCP MX v1.0 §6.3 in float64 / exact integer math, per block of `block` along the last axis:
    shared_exp = floor(log2(max|V|)) - emax_elem (emax_elem = 2 for E2M1), clamped to E8M0's [-127, 127]
    (all-zero block: -127); P = E2M1(V / 2**shared_exp), round to nearest (ties to even mantissa), values
    beyond the largest normal clamped to +-6. Returns (E8M0 bits, P values)."""
    n, k = wt.shape
    bits = np.zeros((n, k // block), np.int64)
    vals = np.zeros_like(wt, dtype=np.float64)
    for r in range(n):
        for b in range(k // block):
            v = wt[r, b * block:(b + 1) * block].astype(np.float64)
            amax = float(np.abs(v).max())
            if amax == 0.0:
                e = -127
            else:
                mant, ex = math.frexp(amax)  # amax = mant * 2**ex, 0.5 <= mant < 1: floor(log2(amax)) = ex - 1
                e = min(max(ex - 1 - 2, -127), 127)
            bits[r, b] = e + 127
            for i, x in enumerate(v / 2.0 ** e):
                mag = min(abs(x), 6.0)
                dist = [abs(mag - g) for g in E2M1]
                best = min(dist)
                ties = [j for j, d in enumerate(dist) if d == best]
                j = ties[0] if len(ties) == 1 else next(t for t in ties if t % 2 == 0)
                vals[r, b * block + i] = math.copysign(E2M1[j], x) if E2M1[j] else 0.0
    return bits, vals


def test_mxfp4_matches_an_independent_ocp_mx_implementation():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(128, 12, generator=g) * torch.logspace(-30, 3, 12)  # columns from tiny to large
    w[:32, 0] = 0.0                                              # an all-zero block
    w[32:64, 1] = 0.0
    w[40, 1] = 1e-42                                             # a subnormal float32 amax
    below = np.nextafter(np.float32(1024.0), np.float32(0))      # just below powers of two: a float32 log2
    w[64:96, 2] = 0.01                                           # rounds these up to the power
    w[70, 2] = float(below)
    w[96:128, 3] = 2.0 ** -110
    w[100, 3] = float(np.nextafter(np.float32(2.0 ** -100), np.float32(0)))
    w[0, 4] = 7.99                                               # saturates to 6 * scale (spec clamping)
    w[64, 5] = 3.0e38                                            # huge: exponent 125
    w[0, 6] = 2.0 ** -140                                        # exponent clamps at -127
    w[1:32, 6] = 0.0
    qw = Q.quantize_mxfp4(w)
    bits, vals = _ocp_mx_reference(w.t().numpy())
    np.testing.assert_array_equal(qw.scale.numpy().astype(np.int64), bits)
    codes = qw.codes.numpy()
    mag = np.array(E2M1)[codes & 7]
    got = np.where(codes & 8, -mag, mag)
    np.testing.assert_array_equal(got, vals)
    deq = vals.reshape(12, 4, 32) * 2.0 ** (bits[..., None] - 127.0)
    np.testing.assert_allclose(qw.dequantize().double().numpy(), deq.reshape(12, 128), rtol=1e-7, atol=0)
    assert bits[2, 2] == 9 - 2 + 127 and bits[3, 3] == -101 - 2 + 127  # floor(log2(just below 2**k)) = k - 1
    assert bits[6, 0] == 0 and bits[0, 0] == 0                          # clamped / all-zero block


# ---------------------------------------------------------------- recipe keys

def _recipe(weight: dict, activation: dict | None = None) -> Recipe:
    rule = {"ops": ["MatMul"], "weight": weight}
    if activation is not None:
        rule["activation"] = activation
    return Recipe.from_dict({"name": "t", "opset": 23, "rules": [rule]})


def test_scale_search_key_parses_and_defaults_to_amax():
    nv = {"format": "nvfp4", "granularity": "group", "group_size": 16}
    assert _recipe(nv).rules[0].weight.scale_search == "amax"
    assert _recipe({**nv, "scale_search": "mse"}).rules[0].weight.scale_search == "mse"
    assert _recipe({**nv, "scale_search": "mse"}).content_hash() != _recipe(nv).content_hash()
    assert _recipe({**nv, "scale_search": "mse"}).to_dict()["rules"][0]["weight"]["scale_search"] == "mse"


@pytest.mark.parametrize("weight, activation, needle", [
    ({"format": "nvfp4", "scale_search": "l2"}, None,
     "bad value rules[0].weight.scale_search = 'l2'; expected one of: amax, mse"),
    ({"format": "mxfp4", "scale_search": "mse"}, None, "rules[0].weight.scale_search = 'mse' with format = 'mxfp4'"),
    ({"format": "int4", "granularity": "group", "group_size": 128, "scale_search": "mse"}, None,
     "rules[0].weight.scale_search"),
    ({"format": "nvfp4"}, {"format": "nvfp4", "scale_search": "mse"}, "unknown key rules[0].activation.scale_search"),
    ({"format": "nvfp4", "granularity": "group", "group_size": 32}, None,
     "rules[0].weight.group_size = 32; nvfp4 blocks are 16"),
    ({"format": "mxfp4", "granularity": "group", "group_size": 16}, None,
     "rules[0].weight.group_size = 16; mxfp4 blocks are 32"),
])
def test_bad_fp4_keys_name_the_key(weight, activation, needle):
    with pytest.raises(RecipeError) as info:
        _recipe(weight, activation)
    assert needle in str(info.value)
