"""qcompile: lowers quantized models to fast AOTInductor inference engines.

Public API (imported lazily so `qcompile --help` stays fast):

- `build(source, recipe, *, calib=None, output, ...)` -> `BuildResult`: the whole pipeline.
- `load(path)` -> `Engine`: a built engine file, checked against this machine.
- `lower_onnx(model, options)` -> `torch.nn.Module`: an ONNX graph as a torch program (`LoweringOptions`: how).
- `load_recipe(name_or_path)` -> `Recipe`, `list_recipes()`.
"""
from qcompile.errors import (
    CalibrationError,
    EngineError,
    LintError,
    LoweringError,
    PassError,
    QCompileError,
    RecipeError,
    SourceError,
    ValidationError,
)

__version__ = "0.1.0"

_LAZY = {
    "build": ("qcompile.pipeline", "build"),
    "BuildResult": ("qcompile.pipeline", "BuildResult"),
    "load": ("qcompile.engine", "load"),
    "Engine": ("qcompile.engine", "Engine"),
    "lower_onnx": ("qcompile.lowering", "lower_onnx"),
    "LoweringOptions": ("qcompile.lowering", "LoweringOptions"),
    "load_recipe": ("qcompile.recipes", "load_recipe"),
    "list_recipes": ("qcompile.recipes", "list_recipes"),
    "Recipe": ("qcompile.recipes", "Recipe"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'qcompile' has no attribute {name!r}")


__all__ = [
    "__version__",
    *_LAZY,
    "QCompileError",
    "SourceError",
    "RecipeError",
    "CalibrationError",
    "PassError",
    "LintError",
    "LoweringError",
    "EngineError",
    "ValidationError",
]
