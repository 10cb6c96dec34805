"""Engine files: build (`build_engine`), inspect (`read_manifest`) and run (`load` -> `Engine`).

An engine file is a zip (stored) with `manifest.json` (see `Manifest`) and `model.pt2` (an AOTInductor
package). It is tied to the torch major.minor and the device kind (and GPU compute capability) that built it.
"""
from qcompile.engine.build import build_engine
from qcompile.engine.load import Engine, check_compatible, load, read_manifest
from qcompile.engine.manifest import FORMAT_VERSION, IOSpec, Manifest

__all__ = ["build_engine", "load", "read_manifest", "check_compatible", "Engine", "IOSpec", "Manifest", "FORMAT_VERSION"]
