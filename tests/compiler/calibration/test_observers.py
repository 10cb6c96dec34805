"""Observers against numpy on the concatenated data."""
import numpy as np
import pytest
import torch

from qcompile.calibration import MaxObserver, PercentileObserver, make_observer
from qcompile.calibration.observers import MAX_QUANTILE_ELEMENTS
from qcompile.recipes.schema import CalibrationOptions


def _batches(seed=0, n=5):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((3, 7, 11)) * (i + 1)).astype(np.float32) for i in range(n)]


def test_max_observer_is_exact():
    obs = MaxObserver()
    batches = _batches()
    for b in batches:
        obs.update(torch.from_numpy(b))
    want = np.abs(np.concatenate([b.ravel() for b in batches])).max()
    assert obs.amax() == obs.true_max() == float(want)
    assert obs.stats() == {"amax": float(want), "max": float(want), "samples": 5}


@pytest.mark.parametrize("pct", [50.0, 99.0, 99.99, 100.0])
def test_percentile_observer_matches_numpy(pct):
    obs = PercentileObserver(pct)
    batches = _batches(1)
    for b in batches:
        obs.update(torch.from_numpy(b))
    want = np.mean([np.percentile(np.abs(b), pct) for b in batches])
    assert obs.amax() == pytest.approx(want, rel=1e-5)
    assert obs.true_max() == float(np.abs(np.concatenate([b.ravel() for b in batches])).max())
    stats = obs.stats()
    assert stats["samples"] == 5 and stats["percentile"] == pct and 0.0 <= stats["clipped_samples"] <= 1.0


def test_percentile_subsamples_huge_tensors():
    x = torch.randn(2 * MAX_QUANTILE_ELEMENTS + 7, generator=torch.Generator().manual_seed(0))
    obs = PercentileObserver(99.0)
    obs.update(x)
    want = np.percentile(np.abs(x.numpy()), 99.0)
    assert obs.amax() == pytest.approx(want, rel=0.02)
    assert obs.true_max() == float(x.abs().max())


def test_empty_and_integer_tensors():
    obs = MaxObserver()
    obs.update(torch.zeros(0))
    obs.update(torch.tensor([-3, 2]))
    assert obs.amax() == 3.0
    assert PercentileObserver(99).amax() == 0.0


def test_make_observer():
    assert isinstance(make_observer(CalibrationOptions("max")), MaxObserver)
    obs = make_observer(CalibrationOptions("percentile", 99.5))
    assert isinstance(obs, PercentileObserver) and obs.percentile == 99.5
