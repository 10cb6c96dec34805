"""FP4 weight quantization choices (`qcompile.algorithms.fp4`) and their recipe keys: the NVFP4 MSE scale search
(`weight.scale_search = "mse"`) against amax, and the FP4 recipe keys' validation."""
import pytest
import torch

from qcompile.algorithms import fp4 as Q
from qcompile.errors import RecipeError
from qcompile.recipes.schema import Recipe


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
