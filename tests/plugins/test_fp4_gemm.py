"""`qcompile::fp4_gemm`: the op against a float64 numpy oracle (NVFP4 / MXFP4 weights, NVFP4 activation
fake-quantization, bias, fp16/bf16, any M), its checks, and export with a dynamic M."""
import ml_dtypes
import numpy as np
import pytest
import torch

from qcompile.algorithms.fp4 import nvfp4_global_scale, quantize_fp4
from qcompile.plugins.fp4_gemm import format as F
from qcompile.plugins.fp4_gemm import register

K, N = 64, 24


def _case(fmt, seed=0):
    w = torch.randn(K, N, generator=torch.Generator().manual_seed(seed)) * 0.1
    qw = quantize_fp4(w, fmt)
    glob = None if qw.global_scale is None else qw.global_scale.to(torch.float32)
    return F.pack_codes(qw.codes), qw.scale, glob, qw.block_size


def _oracle(x, w_packed, w_scale, w_global, block, x_global=None, bias=None):
    """float64 numpy: decode the bytes with ml_dtypes, scales with ml_dtypes, multiply."""
    b = w_packed.numpy()
    codes = np.stack([b & 0xF, b >> 4], -1).reshape(b.shape[0], -1)
    w = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float64)
    if w_scale.dtype == torch.uint8:
        s = w_scale.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
    else:
        s = w_scale.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    s = s * (1.0 if w_global is None else float(w_global))
    w = (w.reshape(N, -1, block) * s[..., None]).reshape(N, K)
    xd = x.double().numpy()
    if x_global is not None:
        xd = F.nvfp4_fake_quantize(x.float(), x_global).double().numpy()  # checked against numpy in test_fp4_format
    y = xd @ w.T
    return y if bias is None else y + bias.double().numpy()


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_weight_only_matches_float64_oracle(fmt, dtype, m):
    op = register()
    w_packed, w_scale, w_global, block = _case(fmt)
    x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).to(dtype)
    bias = torch.randn(N)
    y = op(x, w_packed, w_scale, w_global, None, bias, block)
    assert y.dtype == dtype and y.shape == (m, N)
    want = _oracle(x, w_packed, w_scale, w_global, block, bias=bias)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    np.testing.assert_allclose(y.double().numpy(), want, rtol=tol, atol=tol * np.abs(want).max())


def test_nvfp4_activation_quantization_and_leading_dims():
    op = register()
    w_packed, w_scale, w_global, block = _case("nvfp4", seed=3)
    x = torch.randn(2, 3, K, generator=torch.Generator().manual_seed(9))
    xg = nvfp4_global_scale(x.abs().amax())
    y = op(x, w_packed, w_scale, w_global, xg, None, block)
    want = _oracle(x.reshape(6, K), w_packed, w_scale, w_global, block, x_global=xg).reshape(2, 3, N)
    np.testing.assert_allclose(y.double().numpy(), want, rtol=1e-5, atol=1e-5)
    plain = op(x, w_packed, w_scale, w_global, None, None, block)
    assert not torch.allclose(plain, y)  # the activation quantization did something


def test_bad_arguments_name_what_is_wrong():
    op = register()
    w_packed, w_scale, w_global, block = _case("nvfp4")
    x = torch.randn(2, K)
    with pytest.raises(ValueError, match="block_size 32 must be 16"):
        op(x, w_packed, w_scale, w_global, None, None, 32)
    with pytest.raises(ValueError, match="w_global"):
        op(x, w_packed, w_scale, None, None, None, block)
    with pytest.raises(ValueError, match="K=32"):
        op(torch.randn(2, 32), w_packed, w_scale, w_global, None, None, block)


def test_export_with_dynamic_m():
    op = register()
    w_packed, w_scale, w_global, block = _case("mxfp4")

    class M(torch.nn.Module):
        def forward(self, x):
            return op(x, w_packed, w_scale, w_global, None, None, block)

    x = torch.randn(4, K)
    ep = torch.export.export(M(), (x,), dynamic_shapes={"x": {0: torch.export.Dim("m", min=1, max=64)}})
    torch.testing.assert_close(ep.module()(torch.randn(7, K).mul(0)), torch.zeros(7, N))
    torch.testing.assert_close(ep.module()(x), M()(x))
