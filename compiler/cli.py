"""The `qcompile` command line: build, run, inspect, recipes, sample-inputs.

User and input errors (`QCompileError`) end in one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from qcompile.errors import QCompileError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="qcompile: %(levelname)s: %(message)s")
    if not args.verbose and args.command in ("build", "sample-inputs", "run"):
        _quiet_third_party()
    try:
        return args.func(args)
    except QCompileError as exc:
        print(f"qcompile: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcompile", description="Compile quantized models to fast inference engines.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging (and full tracebacks from libraries)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="build an engine from a model and a recipe")
    b.add_argument("source", help="an .onnx file, path/to/file.py:factory, or a built-in example (tiny-llama, small-cnn, mlp-large)")
    b.add_argument("--recipe", required=True, help="built-in recipe name (see `qcompile recipes`) or a .toml file")
    b.add_argument("--calib", help="calibration data: a .npz file, a directory of .npz files, file.py:fn, or 'random'")
    b.add_argument("-o", "--output", required=True, help="engine file to write")
    b.add_argument("--emit-onnx", metavar="PATH", help="also write the portable Q/DQ ONNX (TensorRT conventions)")
    b.add_argument("--device", choices=("cpu", "cuda"), help="device the engine runs on (default: cuda if available)")
    b.set_defaults(func=_cmd_build)

    r = sub.add_parser("run", help="run an engine on inputs from a .npz file")
    r.add_argument("engine")
    r.add_argument("--inputs", required=True, help=".npz file with one array per engine input")
    r.add_argument("--save-outputs", metavar="PATH", help="write the outputs to this .npz file")
    r.set_defaults(func=_cmd_run)

    i = sub.add_parser("inspect", help="show an engine's or ONNX model's I/O and per-layer table")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print JSON instead of tables")
    i.set_defaults(func=_cmd_inspect)

    rc = sub.add_parser("recipes", help="list the built-in recipes")
    rc.set_defaults(func=_cmd_recipes)

    s = sub.add_parser("sample-inputs", help="write random inputs for a model (for calibration or `qcompile run`)")
    s.add_argument("source", help="a model source, as for `build`")
    s.add_argument("-o", "--output", required=True, help=".npz file to write")
    s.add_argument("--samples", type=int, default=1,
                   help="stack this many samples along a new first axis (calibration format); 1 = one input batch")
    s.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                   help="size of a named dynamic dim, e.g. --dim batch=4 --dim seq=32")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_sample_inputs)
    return p


def _cmd_build(args) -> int:
    from qcompile.pipeline import build
    from qcompile.report import format_table, human_bytes, write_json_atomic

    result = build(args.source, args.recipe, output=args.output, calib=args.calib,
                   emit_onnx=args.emit_onnx, device=args.device)
    if result.layers:
        print(format_table(
            ["layer", "module", "format w/a", "granularity", "before", "after", "kernel"],
            [(r.node, r.module or "-", r.format, r.granularity, human_bytes(r.bytes_before),
              human_bytes(r.bytes_after), r.plugin) for r in result.layers],
            title="Quantized layers"))
        print()
    ratio = result.bytes_before / max(result.bytes_after, 1)
    summary_rows = [
        ("recipe", result.recipe.name),
        ("layers quantized", len(result.layers)),
        ("weights before", human_bytes(result.bytes_before)),
        ("weights after", f"{human_bytes(result.bytes_after)} ({ratio:.2f}x smaller)"),
        ("calibration", result.calibration["data"] if result.calibration else "not needed"),
        *[(f"time: {k}", f"{v:.1f} s") for k, v in result.stage_seconds.items()],
        ("engine", str(result.engine_path)),
    ]
    print(format_table(["item", "value"], summary_rows, title="Build summary"))
    report = Path(str(result.engine_path) + ".build.json")
    write_json_atomic(report, result.summary())
    print(f"\nbuild report: {report}")
    if result.calibration and result.calibration.get("random"):
        print("note: calibrated on RANDOM data (--calib random): scales are not representative of real inputs")
    return EXIT_OK


def _cmd_run(args) -> int:
    import numpy as np

    from qcompile.engine import load
    from qcompile.inputs import load_npz_inputs
    from qcompile.report import format_table

    engine = load(args.engine)
    feeds = load_npz_inputs(args.inputs)
    outputs = engine.run(feeds)
    rows = []
    for name, value in outputs.items():
        v = np.asarray(value, dtype=np.float64) if value.dtype.kind in "fiu" else None
        rows.append((name, str(value.dtype), "x".join(map(str, value.shape)),
                     None if v is None else float(v.mean()), None if v is None else float(v.std()),
                     None if v is None else float(np.abs(v).max())))
    print(format_table(["output", "dtype", "shape", "mean", "std", "max |x|"], rows))
    if args.save_outputs:
        from qcompile.inputs import save_npz_atomic

        save_npz_atomic(args.save_outputs, outputs)
        print(f"outputs saved to {args.save_outputs}")
    return EXIT_OK


def _cmd_inspect(args) -> int:
    import json

    from qcompile.describe import describe

    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return EXIT_OK
    from qcompile.report import format_table, human_bytes

    print(format_table(["item", "value"], info["header"], title=f"{info['kind']}: {args.path}"))
    print()
    print(format_table(["name", "io", "dtype", "shape", "dim ranges"],
                       [(t["name"], t["io"], t["dtype"], t["shape"], t.get("ranges", "")) for t in info["io"]],
                       title="I/O tensors"))
    print()
    if info["layers"]:
        print(format_table(
            ["layer", "op", "module", "format w/a", "granularity", "before", "after", "kernel"],
            [(r["node"], r["op"], r["module"] or "-", r["format"], r["granularity"],
              human_bytes(r["bytes_before"]), human_bytes(r["bytes_after"]), r["plugin"]) for r in info["layers"]],
            title="Quantized layers"))
    else:
        print("Quantized layers: none")
    return EXIT_OK


def _cmd_recipes(args) -> int:
    from qcompile.recipes import list_recipes
    from qcompile.report import format_table

    rows = []
    for r in list_recipes():
        rule = r.rules[0] if r.rules else None
        fmt = "-" if rule is None else (
            f"{rule.weight.format if rule.weight else 'fp'}/{rule.activation.format if rule.activation else 'fp'}")
        rows.append((r.name, fmt, r.description))
    print(format_table(["recipe", "w/a", "description"], rows))
    return EXIT_OK


def _cmd_sample_inputs(args) -> int:
    import numpy as np

    from qcompile.frontend import load_source
    from qcompile.inputs import parse_dim_sizes, save_npz_atomic

    src = load_source(args.source)
    sizes = parse_dim_sizes(args.dim)
    rng = np.random.default_rng(args.seed)
    if args.samples < 1:
        raise QCompileError(f"--samples must be at least 1, got {args.samples}")
    if args.samples == 1:
        arrays = src.random_inputs(rng, sizes)
    else:
        samples = [src.random_inputs(rng, sizes) for _ in range(args.samples)]
        arrays = {k: np.stack([s[k] for s in samples]) for k in samples[0]}
    save_npz_atomic(args.output, arrays)
    shapes = ", ".join(f"{k} {v.dtype}[{'x'.join(map(str, v.shape))}]" for k, v in arrays.items())
    print(f"wrote {args.output}: {shapes}")
    return EXIT_OK


def _quiet_third_party() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    import torch  # noqa: F401  (torch configures its loggers on import; quiet them afterwards)
    for name in ("torch", "onnxscript", "onnx_ir", "torch.onnx", "torch._inductor", "torch._export"):
        logging.getLogger(name).setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
