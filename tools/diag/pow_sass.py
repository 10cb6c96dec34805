"""What a libdevice `pow` costs an Inductor kernel: SASS instruction counts for sm_90, on a machine without a GPU.

Reads a wrapper written by `engine_kernels.py --code DIR` and compiles each of its Triton kernels that call
`libdevice.pow(x, e)` three ways: as written (the exponent a tensor loaded from memory, as qcompile's lowering gave
Inductor before it read a 0-d exponent as a number), with the exponent a literal 2.0 (what Inductor writes where it
inlines a 0-d constant), and as `x * x` (what Inductor writes for a Python-number exponent of 2). RMSNorm's square
is such a pow, in every norm of a decoder layer.

    python3 tools/diag/engine_kernels.py llama3-8b-layers --recipes fp16:pow-tensor --code /tmp/wrappers
    python3 tools/diag/pow_sass.py /tmp/wrappers/fp16:pow-tensor.py

Not part of the product.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import tempfile
from pathlib import Path

from sass_count import compile_sass, instructions  # tools/diag, this script's folder

_KERNEL = re.compile(r"= async_compile\.triton\('(\w+)', '''(.*?)''', device_str='cuda'\)", re.S)
_POW = re.compile(r"libdevice\.pow\((\w+), (\w+)\)")
_HEADER = ("import triton\nimport triton.language as tl\nfrom torch._inductor.runtime import triton_helpers\n"
           "from torch._inductor.runtime.triton_helpers import libdevice, math as tl_math\n")
FORMS = {"exponent tensor": lambda src: src,
         "literal 2.0": lambda src: _POW.sub(r"libdevice.pow(\1, 2.0)", src),
         "x * x": lambda src: _POW.sub(r"\1 * \1", src)}


def pow_kernels(wrapper: str):
    """(name, Triton source of the jitted function, its non-constexpr signature) of each kernel calling pow."""
    for name, source in _KERNEL.findall(wrapper):
        if _POW.search(source):
            signature = ast.literal_eval(re.search(r"'signature': (\{[^}]*\})", source).group(1))
            yield name, source[source.index("@triton.jit"):], {k: v for k, v in signature.items() if v != "constexpr"}


def sass_count(name: str, source: str, signature: dict, num_warps: int, r0_block: int, folder: Path) -> int:
    """SASS instructions of kernel `name` (one row a program, `r0_block` elements a step) compiled for sm_90."""
    path = folder / f"{name}_{abs(hash(source))}.py"
    path.write_text(_HEADER + source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sass = compile_sass(getattr(module, name), signature, {"XBLOCK": 1, "R0_BLOCK": r0_block},
                        [k for k in signature if "ptr" in k], num_warps, 1)
    return len(instructions(sass))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wrapper", type=Path, help="a wrapper from engine_kernels.py --code")
    ap.add_argument("--tiles", nargs="+", default=["8x2048", "4x1024"], help="warps x R0_BLOCK, e.g. 8x2048")
    args = ap.parse_args()
    kernels = list(pow_kernels(args.wrapper.read_text()))
    if not kernels:
        raise SystemExit(f"{args.wrapper}: no kernel calls libdevice.pow")
    print(f"{'kernel':60s} {'warps x R0_BLOCK':>16s} " + " ".join(f"{form:>15s}" for form in FORMS))
    with tempfile.TemporaryDirectory() as tmp:
        for name, source, signature in kernels:
            for tile in args.tiles:
                warps, r0_block = (int(v) for v in tile.split("x"))
                counts = [sass_count(name, form(source), signature, warps, r0_block, Path(tmp))
                          for form in FORMS.values()]
                print(f"{name[-60:]:60s} {tile:>16s} " + " ".join(f"{c:15d}" for c in counts))


if __name__ == "__main__":
    main()
