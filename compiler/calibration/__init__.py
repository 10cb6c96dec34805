"""Calibration: stream the user's data through the FP graph and measure activation ranges.

Public API:
- `load_calibration_data(spec, inputs, *, source=None, random_samples=RANDOM_SAMPLES, seed=0) -> CalibrationData`
- `check_calibration_spec(spec)`: a spec's files exist and are .npz archives (before the model is loaded)
- `calibrate(model, tensors, data, options, *, device="cpu", progress=None) -> CalibrationResult`
- observers: `MaxObserver`, `PercentileObserver`, `make_observer(options)`
"""
from qcompile.calibration.calibrate import CalibrationResult, calibrate
from qcompile.calibration.data import (RANDOM_SAMPLES, CalibrationData, check_calibration_spec, check_sample,
                                      load_calibration_data)
from qcompile.calibration.observers import MaxObserver, PercentileObserver, make_observer

__all__ = ["load_calibration_data", "check_calibration_spec", "RANDOM_SAMPLES", "CalibrationData", "check_sample",
           "calibrate", "CalibrationResult", "MaxObserver", "PercentileObserver", "make_observer"]
