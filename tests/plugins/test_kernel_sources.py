"""The Triton kernels' source text survives AOTInductor's copy of it.

AOTInductor pastes the source of each user Triton kernel, and of every `@triton.jit` function it calls, into a string
literal of its generated autotuning code, so an escape inside one of their string literals (`"\\n"` in inline PTX)
turns into a real line break there and the engine build fails with "unterminated string literal" (the FP4 planar
GEMV's PTX on the H200, twenty-sixth session). Read from the source files, so this runs without triton.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


def _is_triton_jit(decorator: ast.expr) -> bool:
    """`@triton.jit`, `@triton.jit(...)` or our `@jit_any_m` (a `triton.jit` with M left unspecialized)."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    if isinstance(target, ast.Name):
        return target.id == "jit_any_m"
    return (isinstance(target, ast.Attribute) and target.attr == "jit"
            and isinstance(target.value, ast.Name) and target.value.id == "triton")


def _jit_functions(source: str) -> list[ast.FunctionDef]:
    return [fn for fn in ast.walk(ast.parse(source))
            if isinstance(fn, ast.FunctionDef) and any(_is_triton_jit(d) for d in fn.decorator_list)]


def _escaped_literals(path: Path) -> list[str]:
    """`file:line function: literal` for each string literal with a backslash inside a `@triton.jit` function."""
    source = path.read_text()
    found = []
    for fn in _jit_functions(source):
        for node in ast.walk(fn):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = ast.get_source_segment(source, node) or ""
                if "\\" in text:
                    found.append(f"{path.name}:{node.lineno} {fn.name}: {text[:60]}")
    return found


def test_plugins_have_triton_kernels_to_check():
    """The scan finds the kernels (guards the check below against matching nothing)."""
    kernels = [fn.name for p in PLUGINS.rglob("*.py") for fn in _jit_functions(p.read_text())]
    assert {"_fp4_gemv_planar_kernel", "_fp4_one_dot_kernel", "_int4_gemv_kernel"} <= set(kernels)


@pytest.mark.parametrize("path", sorted(PLUGINS.rglob("*.py")), ids=lambda p: str(p.relative_to(PLUGINS)))
def test_no_escapes_in_kernel_string_literals(path):
    assert _escaped_literals(path) == [], "write PTX statements on one line, separated by '; ', without escapes"


def test_the_check_catches_an_escaped_ptx_string(tmp_path):
    """The form that broke the build is found."""
    bad = tmp_path / "k.py"
    bad.write_text('import triton\n\n\n@triton.jit\ndef f(x):\n    return asm("mov.b32 $0, $1;\\n", x)\n')
    assert len(_escaped_literals(bad)) == 1
