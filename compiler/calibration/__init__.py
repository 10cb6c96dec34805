"""Calibration: stream the user's data through the FP graph and measure activation ranges.

Public API:
- `load_calibration_data(spec, inputs, *, source=None, random_samples=RANDOM_SAMPLES, seed=0) -> CalibrationData`
- `calibrate(model, tensors, data, options, *, device="cpu", progress=None) -> CalibrationResult`
- observers: `MaxObserver`, `PercentileObserver`, `make_observer(options)`
"""
from qcompile.calibration.calibrate import CalibrationResult, calibrate
from qcompile.calibration.data import RANDOM_SAMPLES, CalibrationData, check_sample, load_calibration_data
from qcompile.calibration.observers import MaxObserver, PercentileObserver, make_observer

__all__ = ["load_calibration_data", "RANDOM_SAMPLES", "CalibrationData", "check_sample", "calibrate",
           "CalibrationResult", "MaxObserver", "PercentileObserver", "make_observer"]
