"""Calibration: stream the user's data through the FP graph and measure activation ranges.

Public API:
- `load_calibration_data(spec, inputs, *, source=None, random_samples=16, seed=0) -> CalibrationData`
- `calibrate(model, tensors, data, options, *, device="cpu", progress=None) -> CalibrationResult`
- observers: `MaxObserver`, `PercentileObserver`, `make_observer(options)`
"""
from qcompile.calibration.calibrate import CalibrationResult, calibrate
from qcompile.calibration.data import CalibrationData, check_sample, load_calibration_data
from qcompile.calibration.observers import MaxObserver, PercentileObserver, make_observer

__all__ = ["load_calibration_data", "CalibrationData", "check_sample", "calibrate", "CalibrationResult",
           "MaxObserver", "PercentileObserver", "make_observer"]
