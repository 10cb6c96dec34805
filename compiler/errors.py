"""The one exception hierarchy of qcompile.

Every message says what was asked, what was found and what to do. The CLI turns a
`QCompileError` into one line on stderr and exit code 2; a failed validation is exit 1.
"""


class QCompileError(Exception):
    """Base of every error qcompile raises on purpose (user or input errors)."""


class SourceError(QCompileError):
    """The model source (ONNX file, `file.py:factory`, built-in name) cannot be used."""


class RecipeError(QCompileError):
    """A recipe file or name is invalid; the message names the key or file."""


class CalibrationError(QCompileError):
    """Calibration data is missing or unusable; the message names the input or file."""


class PassError(QCompileError):
    """A graph pass failed; the message names the pass and the passes run before it."""


class LintError(PassError):
    """The Q/DQ linter found an invalid Q/DQ node; the message names the node."""


class LoweringError(QCompileError):
    """An ONNX node cannot be lowered to torch; the message names node, op, domain and opset."""


class EngineError(QCompileError):
    """An engine file cannot be built, loaded or run; the message says what does not match."""


class ValidationError(QCompileError):
    """Validation could not be carried out (not: validation failed)."""
