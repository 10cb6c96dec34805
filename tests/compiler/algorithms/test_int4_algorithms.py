"""RTN / AWQ / GPTQ 4-bit weight quantization (qcompile.algorithms), on CPU with fixed seeds.

The test layer: y = x @ W, K=256, N=128. Activations are correlated (a random mixing with a decaying
spectrum, like real hidden states) and 4 input channels are outliers (x30). Statistics come from
512 calibration tokens; errors are measured on 512 held-out tokens from the same distribution.
"""
import numpy as np
import pytest
import torch

from qcompile.algorithms import (ActAbsMeanObserver, ActivationSampleObserver, AwqResult, HessianObserver,
                                 QuantizedWeight, awq_search, gptq_quantize, output_error, quantize_rtn)
from qcompile.algorithms.int4 import MIN_SCALE

K, N = 256, 128
OUTLIERS = [3, 77, 150, 201]


def _layer(seed=1, correlated=True, n_calib=512, n_test=512):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.linalg.qr(torch.randn(K, K, generator=gen))[0] * torch.logspace(0, -1.5, K)[None, :]
    mix = mix / mix.pow(2).sum(1, keepdim=True).sqrt().mean()

    def acts(t):
        x = torch.randn(t, K, generator=gen)
        if correlated:
            x = x @ mix.T
        x[:, OUTLIERS] *= 30
        return x

    w = torch.randn(K, N, generator=gen)
    return w, acts(n_calib), acts(n_test)


@pytest.fixture(scope="module")
def layer():
    return _layer()


def _stats(x_calib):
    mean, sample, hess = ActAbsMeanObserver(), ActivationSampleObserver(512), HessianObserver()
    for obs in (mean, sample, hess):
        obs.update(x_calib)
    return mean.value(), sample.value(), hess.value()


def _rtn_error(w, x, g, symmetric=True):
    return output_error(x, w, x, quantize_rtn(w, g, symmetric).dequantize())


# ---------------------------------------------------------------------------------------------- RTN

def _ties(v):
    """Elements whose float64 quotient is within 1e-5 of a half-integer (float32 may round them apart)."""
    return np.abs(np.abs(v - np.floor(v)) - 0.5) < 1e-5


@pytest.mark.parametrize("g", [32, 64, 128, K])
def test_rtn_symmetric_matches_float64_reference(g):
    rng = np.random.default_rng(g)
    w = (rng.standard_normal((K, N)) * rng.uniform(0.01, 3, (1, N))).astype(np.float32)
    qw = quantize_rtn(torch.from_numpy(w), g)
    assert qw.q.dtype == torch.int8 and qw.q.shape == (K, N) and qw.zero is None and qw.group_size == g
    assert qw.scale.dtype == torch.float32 and qw.scale.shape == (K // g, N)

    w64 = w.astype(np.float64).reshape(K // g, g, N)
    scale64 = np.abs(w64).max(axis=1) / 7.0
    np.testing.assert_array_equal(qw.scale.numpy(), scale64.astype(np.float32))
    v = w64 / qw.scale.numpy().astype(np.float64)[:, None, :]
    q_ref = np.clip(np.rint(v), -8, 7).reshape(K, N)  # np.rint: half to even
    ok = (qw.q.numpy() == q_ref) | _ties(v).reshape(K, N)
    assert ok.all()
    assert qw.q.min() >= -7 and qw.q.max() <= 7  # amax / 7: -8 is unused without clipping
    # round trip: |w - w_hat| <= scale / 2 everywhere, and the group maxima are exact
    err = np.abs(qw.dequantize().numpy() - w).reshape(K // g, g, N)
    assert (err <= qw.scale.numpy()[:, None, :] * (0.5 + 1e-6)).all()
    requant = quantize_rtn(qw.dequantize(), g)
    assert torch.equal(requant.q, qw.q)
    torch.testing.assert_close(requant.scale, qw.scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("g", [32, 64, 128, K])
def test_rtn_asymmetric_matches_float64_reference_and_round_trips(g):
    rng = np.random.default_rng(100 + g)
    w = (rng.standard_normal((K, N)) + rng.uniform(-1, 1, (1, N))).astype(np.float32)
    w[:g, 0] = np.abs(w[:g, 0]) + 0.5  # an all-positive group: the range is widened to include 0
    qw = quantize_rtn(torch.from_numpy(w), g, symmetric=False)
    assert qw.zero is not None and qw.zero.dtype == torch.int8 and qw.zero.shape == (K // g, N)
    assert qw.q.min() >= 0 and qw.q.max() <= 15 and qw.zero.min() >= 0 and qw.zero.max() <= 15

    w64 = w.astype(np.float64).reshape(K // g, g, N)
    lo, hi = np.minimum(w64.min(axis=1), 0), np.maximum(w64.max(axis=1), 0)
    np.testing.assert_allclose(qw.scale.numpy(), (hi - lo) / 15, rtol=1e-6)
    s64 = qw.scale.numpy().astype(np.float64)
    zv = -lo / s64
    assert ((qw.zero.numpy() == np.clip(np.rint(zv), 0, 15)) | _ties(zv)).all()
    v = w64 / s64[:, None, :]
    q_ref = np.clip(np.rint(v) + qw.zero.numpy()[:, None, :], 0, 15).reshape(K, N)
    assert ((qw.q.numpy() == q_ref) | _ties(v).reshape(K, N)).all()
    assert qw.zero[0, 0] == 0  # all-positive group: zero point 0, scale max / 15
    err = np.abs(qw.dequantize().numpy() - w).reshape(K // g, g, N)
    assert (err <= s64[:, None, :] * (0.5 + 1e-5)).all()


def test_rtn_rounds_half_to_even_and_clips():
    col = torch.tensor([7.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.49, -6.5])  # amax 7 -> scale 1
    qw = quantize_rtn(col[:, None], group_size=8)
    assert qw.scale.item() == 1.0
    assert qw.q[:, 0].tolist() == [7, 0, 2, 2, 0, -2, 3, -6]
    clipped = quantize_rtn(col[:, None], group_size=8, clip_ratio=0.5)  # scale 0.5: 7 -> 14 -> clamp 7
    assert clipped.scale.item() == 0.5 and clipped.q[0, 0] == 7 and clipped.q[7, 0] == -8
    per_group = quantize_rtn(torch.ones(8, 2), 4, clip_ratio=torch.tensor([[1.0, 0.5], [1.0, 1.0]]))
    torch.testing.assert_close(per_group.scale, torch.tensor([[1 / 7, 0.5 / 7], [1 / 7, 1 / 7]]))


def test_rtn_zero_group_and_bad_group_size():
    w = torch.zeros(64, 4)
    w[32:, 1] = 1.0
    for sym in (True, False):
        qw = quantize_rtn(w, 32, symmetric=sym)
        assert (qw.scale > 0).all() and qw.scale.min() >= MIN_SCALE
        assert torch.isfinite(qw.dequantize()).all()
        torch.testing.assert_close(qw.dequantize(), w)
    with pytest.raises(ValueError, match="divide K"):
        quantize_rtn(w, 48)
    assert quantize_rtn(w, None).group_size == 64 == quantize_rtn(w, -1).group_size


def test_rtn_keeps_device_and_accepts_half():
    w = torch.randn(64, 16, dtype=torch.float16)
    qw = quantize_rtn(w, 32)
    assert qw.scale.dtype == torch.float32 and qw.q.device == w.device
    assert qw.dequantize(torch.float16).dtype == torch.float16


# ------------------------------------------------------------------------------------ observers

def _uneven_batches(x):
    """7 uneven batches, some 3-D, one empty."""
    cuts = [0, 5, 5, 64, 65, 200, 311, x.shape[0]]
    out = []
    for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
        part = x[a:b]
        if i == 4:  # 135 rows as [5, 27, K]
            part = part.reshape(5, 27, K)
        out.append(part)
    return out


def test_observers_are_streaming_invariant(layer):
    _, xc, _ = layer
    batches = _uneven_batches(xc)
    assert len(batches) == 7 and sum(b.reshape(-1, K).shape[0] for b in batches) == xc.shape[0]
    once = [ActAbsMeanObserver(), HessianObserver(), HessianObserver(torch.float64), ActivationSampleObserver(100)]
    streamed = [ActAbsMeanObserver(), HessianObserver(), HessianObserver(torch.float64), ActivationSampleObserver(100)]
    for obs in once:
        obs.update(xc)
    for obs in streamed:
        for b in batches:
            obs.update(b)
    x64 = xc.double()
    torch.testing.assert_close(once[0].value(), x64.abs().mean(0).float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(streamed[0].value(), once[0].value(), rtol=1e-6, atol=0)
    h_ref = 2.0 / xc.shape[0] * (x64.T @ x64)
    torch.testing.assert_close(once[1].value().double(), h_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(streamed[1].value(), once[1].value(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(streamed[2].value(), h_ref, rtol=1e-12, atol=1e-9)
    assert once[0].tokens == streamed[0].tokens == streamed[1].tokens == xc.shape[0]
    # the sample: same rows whatever the batching, uniform-ish over the stream, in stream order
    assert torch.equal(streamed[3].value(), once[3].value())
    idx = streamed[3].indices
    assert len(idx) == 100 and (np.diff(idx) > 0).all()
    assert torch.equal(streamed[3].value(), xc[torch.from_numpy(idx)])
    assert idx.min() < 100 and idx.max() > xc.shape[0] - 100  # not first-N
    small = ActivationSampleObserver(1000)
    for b in batches:
        small.update(b)
    assert torch.equal(small.value(), xc)  # fewer tokens than the cap: everything, in order


# ------------------------------------------------------------------------------------------ AWQ

@pytest.mark.parametrize("g,max_ratio", [(32, 0.6), (64, 0.6), (128, 0.7), (K, 0.75)])
def test_awq_beats_rtn_on_outlier_channels(layer, g, max_ratio):
    w, xc, xt = layer
    mean, sample, _ = _stats(xc)
    res = awq_search(w, sample, mean, g)
    assert isinstance(res, AwqResult) and isinstance(res.qweight, QuantizedWeight)
    assert res.scales.shape == (K,) and res.clip_ratio.shape == (K // g, N) and 0 < res.alpha < 1
    assert res.losses["final"] <= res.losses["scaled"] <= res.losses["rtn"]
    # outlier channels are scaled up (their weights quantize with less relative error)
    assert res.scales[OUTLIERS].min() > res.scales.median() * 2
    e_awq = output_error(xt, w, xt / res.scales, res.qweight.dequantize())
    e_rtn = _rtn_error(w, xt, g)
    assert e_awq < max_ratio * e_rtn, (e_awq, e_rtn, e_awq / e_rtn)
    # the same thing seen from the original space
    assert abs(output_error(xt, w, xt, res.dequantize()) - e_awq) < 1e-4


def test_awq_on_iid_activations_and_asymmetric():
    w, xc, xt = _layer(seed=2, correlated=False)
    mean, sample, _ = _stats(xc)
    res = awq_search(w, sample, mean, 128, symmetric=False)
    assert res.qweight.zero is not None
    assert res.qweight.q.min() >= 0 and res.qweight.q.max() <= 15
    e_awq = output_error(xt, w, xt / res.scales, res.qweight.dequantize())
    assert e_awq < 0.7 * _rtn_error(w, xt, 128, symmetric=False)
    no_clip = awq_search(w, sample, mean, 128, clip_grid=None)
    assert (no_clip.clip_ratio == 1).all() and no_clip.losses["final"] == no_clip.losses["scaled"]


# ----------------------------------------------------------------------------------------- GPTQ

def _reference_gptq(w, h, g, damp=0.01, act_order=False, symmetric=True):
    """Textbook GPTQ in float64: every row's error is applied to all later rows at once (no lazy
    blocks); a group's scale comes from its rows' current values when its first row comes up."""
    W, H = w.double().clone(), h.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(K)
    W, H = W[perm], H[perm][:, perm]
    H += damp * torch.diagonal(H).mean() * torch.eye(K, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.linalg.inv(H)).T  # inv(H) = U^T U, U upper
    pos_of = torch.argsort(perm)
    Q = torch.zeros_like(W)
    params = {}
    for i in range(K):
        gid = int(perm[i]) // g
        if gid not in params:
            vals = W[pos_of[gid * g:(gid + 1) * g]]
            if symmetric:
                params[gid] = (vals.abs().amax(0) / 7, None)
            else:
                lo, hi = vals.amin(0).clamp(max=0), vals.amax(0).clamp(min=0)
                s = (hi - lo) / 15
                params[gid] = (s, torch.round(-lo / s))
        s, z = params[gid]
        q = torch.round(W[i] / s).clamp(-8, 7) if z is None else (torch.round(W[i] / s) + z).clamp(0, 15)
        deq = q * s if z is None else (q - z) * s
        Q[i] = q
        err = (W[i] - deq) / U[i, i]
        W[i:] -= U[i, i:, None] * err[None, :]
    return Q[pos_of]


@pytest.mark.parametrize("g,block,act_order,sym", [(32, 128, False, True), (32, 48, True, True),
                                                   (64, 40, False, False), (K, 128, True, True)])
def test_gptq_matches_textbook_reference(layer, g, block, act_order, sym):
    """Lazy blocks (groups starting mid-block, groups straddling blocks, act_order) change nothing."""
    w, xc, _ = layer
    h = HessianObserver(torch.float64)
    h.update(xc)
    qw = gptq_quantize(w, h.value(), g, block_size=block, act_order=act_order, symmetric=sym)
    q_ref = _reference_gptq(w, h.value(), g, act_order=act_order, symmetric=sym)
    agree = (qw.q.double() == q_ref).double().mean().item()
    assert agree > 0.999, agree  # float32 vs float64 could flip a near-tie (measured: 1.0 on all four cases)


@pytest.mark.parametrize("g", [32, 64, 128, K])
def test_gptq_beats_rtn_and_act_order_is_not_worse(layer, g):
    w, xc, xt = layer
    _, _, hess = _stats(xc)
    e_rtn = _rtn_error(w, xt, g)
    e_gptq = output_error(xt, w, xt, gptq_quantize(w, hess, g).dequantize())
    e_act = output_error(xt, w, xt, gptq_quantize(w, hess, g, act_order=True).dequantize())
    assert e_gptq < 0.75 * e_rtn, (e_gptq, e_rtn)
    assert e_act <= 1.02 * e_gptq, (e_act, e_gptq)


def test_gptq_asymmetric_round_trips_and_beats_rtn(layer):
    w, xc, xt = layer
    _, _, hess = _stats(xc)
    qw = gptq_quantize(w, hess, 128, symmetric=False, act_order=True)
    assert qw.zero is not None and qw.zero.shape == (2, N) and qw.q.min() >= 0 and qw.q.max() <= 15
    assert qw.zero.min() >= 0 and qw.zero.max() <= 15
    w_hat = qw.dequantize()
    # the stored integers and scales are a valid RTN-style encoding: re-encoding w_hat is lossless
    again = QuantizedWeight(torch.round(w_hat.reshape(2, 128, N) / qw.scale[:, None, :] + qw.zero[:, None, :].float())
                            .clamp(0, 15).reshape(K, N).to(torch.int8), qw.scale, qw.zero, 128)
    assert torch.equal(again.q, qw.q)
    assert output_error(xt, w, xt, w_hat) < 0.75 * _rtn_error(w, xt, 128, symmetric=False)


def test_gptq_dead_column_gives_no_nan(layer):
    w, xc, xt = layer
    xc, xt = xc.clone(), xt.clone()
    xc[:, [10, 200]] = 0  # two channels that calibration never excites (one of them an outlier slot)
    hess = HessianObserver()
    hess.update(xc)
    h = hess.value()
    assert h[10, 10] == 0 and h[200, 200] == 0
    for act_order in (False, True):
        qw = gptq_quantize(w, h, 64, act_order=act_order)
        w_hat = qw.dequantize()
        assert torch.isfinite(w_hat).all() and torch.isfinite(qw.scale).all()
        xt0 = xt.clone()
        xt0[:, [10, 200]] = 0
        assert output_error(xt0, w, xt0, w_hat) < _rtn_error(w, xt0, 64)
        # dead rows are kept (rounded), not zeroed
        assert ((w_hat[10] - w[10]).abs() <= qw.scale[0] * 0.5 + 1e-6).all()
    with pytest.raises(ValueError, match="shape"):
        gptq_quantize(w, h[:-1, :-1], 64)


# ------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_algorithms_run_on_cuda_and_match_cpu(layer):
    w, xc, xt = layer
    dev = torch.device("cuda")
    stats_gpu = [ActAbsMeanObserver(), ActivationSampleObserver(512), HessianObserver()]
    for b in _uneven_batches(xc):
        for obs in stats_gpu:
            obs.update(b.to(dev))
    mean, sample, hess = (obs.value() for obs in stats_gpu)
    assert mean.device.type == sample.device.type == hess.device.type == "cuda"
    mean_c, sample_c, hess_c = _stats(xc)
    assert torch.equal(sample.cpu(), sample_c)
    wd = w.to(dev)
    rtn = quantize_rtn(wd, 128)
    assert rtn.q.device.type == "cuda" and torch.equal(rtn.q.cpu(), quantize_rtn(w, 128).q)
    res = awq_search(wd.half(), sample.half(), mean, 128)
    assert res.qweight.q.device.type == "cuda"
    e_awq = output_error(xt, w, xt / res.scales.cpu(), res.qweight.dequantize().cpu())
    assert e_awq < 0.7 * _rtn_error(w, xt, 128)
    for act_order in (False, True):
        qw = gptq_quantize(wd, hess, 128, act_order=act_order)
        assert qw.q.device.type == "cuda"
        q_cpu = gptq_quantize(w, hess_c, 128, act_order=act_order).q
        assert (qw.q.cpu() == q_cpu).float().mean() > 0.99  # TF32/accumulation order may flip near-ties
        assert output_error(xt, w, xt, qw.dequantize().cpu()) < 0.75 * _rtn_error(w, xt, 128)


def test_gptq_notes_layers_with_too_few_tokens_per_input_channel():
    """Fewer than GPTQ_TOKENS_PER_CHANNEL x K calibration tokens leave the Hessian estimate noisy (GPTQ then
    fits the calibration tokens): the build says so (a pass note), naming the fewest tokens and the K."""
    from qcompile.algorithms.plan import GPTQ_TOKENS_PER_CHANNEL, Int4Job, gptq_data_notes, observers_for

    jobs = [Int4Job("wide", "gptq", "x", np.zeros((64, 8), np.float32), 32, True),
            Int4Job("narrow", "gptq", "y", np.zeros((16, 8), np.float32), 16, True),
            Int4Job("awq", "awq", "z", np.zeros((64, 8), np.float32), 32, True)]
    watch = observers_for(jobs)
    rng = torch.Generator().manual_seed(0)
    need_wide, need_narrow = GPTQ_TOKENS_PER_CHANNEL * 64, GPTQ_TOKENS_PER_CHANNEL * 16
    for name, tokens in (("x", need_wide - 1), ("y", need_narrow), ("z", 1)):
        for obs in watch[name]:
            obs.update(torch.randn(tokens, 64 if name != "y" else 16, generator=rng))
    notes = gptq_data_notes(jobs, watch)
    assert len(notes) == 1 and "GPTQ: 1 layer saw" in notes[0]
    assert f"{need_wide - 1} tokens for K up to 64" in notes[0] and f"at least {need_wide} tokens" in notes[0]
    for obs in watch["x"]:
        obs.update(torch.randn(1, 64, generator=rng))  # now GPTQ_TOKENS_PER_CHANNEL x K
    assert gptq_data_notes(jobs, watch) == []
