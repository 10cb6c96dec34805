"""The `qcompile` command line: build, validate, run, inspect, recipes, sample-inputs.

User and input errors (`QCompileError`) end in one line on stderr and exit code 2; a validation that does
not meet its thresholds exits 1 (the engine and the report are kept).
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
    if not args.verbose and args.command in ("build", "validate", "sample-inputs", "run"):
        _quiet_third_party()
    try:
        return args.func(args)
    except QCompileError as exc:
        print(f"qcompile: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `qcompile inspect e.engine | head`: the reader left, nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        return EXIT_OK


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
    b.add_argument("--no-validate", action="store_true", help="skip the validation against the FP16 graph")
    b.add_argument("--no-sibling-fusion", action="store_true",
                   help="keep GEMMs that share an input (Q/K/V, gate/up) as separate kernels in the engine")
    b.add_argument("--no-attention-fusion", action="store_true",
                   help="keep attention written out (MatMul, Softmax, MatMul) instead of one fused attention kernel")
    b.add_argument("--fp8-large-m", action="store_true",
                   help="run the INT4/FP4 GEMMs above 128 rows (prefill) on FP8 tensor cores, weights and "
                        "activations rounded to FP8 there: faster on CUDA, slightly less accurate; CPU engines "
                        "emulate it (README)")
    b.add_argument("--fp4-layout", choices=("bytes", "planar", "pairs"),
                   help="how the engine stores FP4 plugin weights: uint8 bytes, planar int32 words, or planar words "
                        "in row pairs (default: pairs on CUDA, bytes on CPU; README, FP4 kernel paths)")
    b.add_argument("--one-row-model", action="store_true",
                   help="experimental: also compile the engine with every dynamic dim at 1, run when a call has them "
                        "all at 1 (a decode step of one token): no dispatch by row count there, more fusion; both "
                        "models share the weights; doubles the compile")
    b.add_argument("--pdl", action="store_true",
                   help="launch the engine's Inductor kernels with programmatic dependent launch: each may start "
                        "while the kernel before it finishes (CUDA, compute capability 9.0 or more; README)")
    b.add_argument("--holdout", type=float, default=0.2, metavar="FRACTION",
                   help="fraction of the calibration samples kept for validation when no --val-data (default 0.2)")
    _add_validation_args(b, data_flag="--val-data")
    b.set_defaults(func=_cmd_build)

    v = sub.add_parser("validate", help="compare an engine with its FP16 reference graph (Polygraphy)")
    v.add_argument("engine")
    v.add_argument("--reference", metavar="MODEL",
                   help="the FP model the engine was built from: an .onnx file, file.py:factory or a built-in "
                        "(default: the source recorded in the engine)")
    v.add_argument("--per-layer", action="store_true",
                   help="rank the quantized layers by their contribution to the error (local error, clip rate)")
    v.add_argument("--top", type=int, default=10, help="layers shown by --per-layer (default 10)")
    _add_validation_args(v, data_flag="--data")
    v.set_defaults(func=_cmd_validate)

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


def _add_validation_args(p: argparse.ArgumentParser, data_flag: str) -> None:
    p.add_argument(data_flag, dest="val_data", metavar="DATA",
                   help="validation inputs: a .npz file (first axis = samples), a directory of them or file.py:fn "
                        "(default: held-out calibration samples, else seeded random data)")
    p.add_argument("--reference-precision", choices=("fp16", "fp32"), default="fp16",
                   help="run the reference graph in FP16 (default) or FP32")
    p.add_argument("--min-cosine", type=float, help="override the recipe's cosine threshold")
    p.add_argument("--min-sqnr-db", type=float, help="override the recipe's SQNR threshold (dB)")
    p.add_argument("--min-top1", type=float, help="override the recipe's top-1 agreement threshold (logits)")


def _cmd_build(args) -> int:
    from qcompile.pipeline import build
    from qcompile.report import write_json_atomic

    result = build(args.source, args.recipe, output=args.output, calib=args.calib,
                   emit_onnx=args.emit_onnx, device=args.device,
                   holdout=0.0 if args.no_validate or args.val_data else args.holdout,
                   fuse_siblings=not args.no_sibling_fusion,
                   fuse_attention=not args.no_attention_fusion, fp8_large_m=args.fp8_large_m,
                   fp4_layout=args.fp4_layout, one_row_model=args.one_row_model, pdl=args.pdl)
    print(format_build_summary(result))
    report = Path(str(result.engine_path) + ".build.json")
    write_json_atomic(report, result.summary())
    print(f"\nbuild report: {report}")
    if result.calibration and result.calibration.get("random"):
        print("note: calibrated on RANDOM data (--calib random): scales are not representative of real inputs")
    if args.no_validate:
        return EXIT_OK
    print()
    report = _validate(args, result.engine_path, result.source_model, args.source, held_out=result.validation_data)
    return EXIT_OK if report.passed else EXIT_FAILED


def format_build_summary(result) -> str:
    """The terminal summary of a build: the quantized-layer table, then the summary table (pass notes included)."""
    from qcompile.report import format_table, human_bytes

    parts = []
    if result.layers:
        parts.append(format_table(
            ["layer", "module", "format w/a", "granularity", "before", "after", "kernel"],
            [(r.node, r.module or "-", r.format, r.granularity, human_bytes(r.bytes_before),
              human_bytes(r.bytes_after), r.plugin) for r in result.layers],
            title="Quantized layers"))
        parts.append("")
    ratio = result.bytes_before / max(result.bytes_after, 1)
    summary_rows = [
        ("recipe", result.recipe.name),
        ("layers quantized", len(result.layers)),
        ("weights before", human_bytes(result.bytes_before)),
        ("weights after", f"{human_bytes(result.bytes_after)} ({ratio:.2f}x smaller)"),
        ("calibration", result.calibration["data"] if result.calibration else "not needed"),
        *[("pass note", note) for note in result.pass_notes],  # e.g. where AWQ / SmoothQuant scales went
        *[(f"time: {k}", f"{v:.1f} s") for k, v in result.stage_seconds.items()],
        ("engine", str(result.engine_path) if result.engine_path is not None else "(not built)"),
    ]
    parts.append(format_table(["item", "value"], summary_rows, title="Build summary"))
    return "\n".join(parts)


def _cmd_validate(args) -> int:
    from qcompile.engine import read_manifest
    from qcompile.frontend import load_source

    spec = args.reference or ((read_manifest(args.engine).extra.get("source") or {}).get("spec"))
    if not spec:
        raise QCompileError(f"{args.engine} does not record the model it was built from; "
                            "give it with --reference MODEL.onnx")
    reference = load_source(spec)
    report = _validate(args, args.engine, reference.model, spec, per_layer=args.per_layer, top=args.top)
    return EXIT_OK if report.passed else EXIT_FAILED


def _validate(args, engine_path, reference_model, reference_name, *, held_out=None, per_layer=False, top=10):
    """Run the validation the CLI options ask for; print the tables; return the report."""
    from qcompile.calibration import load_calibration_data
    from qcompile.engine import read_manifest
    from qcompile.validation.report import format_report, report_path_for
    from qcompile.validation.validate import recipe_thresholds, validate_engine

    manifest = read_manifest(engine_path)
    data, description = None, None
    if args.val_data:
        data = load_calibration_data(args.val_data, manifest.inputs)
        description = f"{data.description} (validation data)"
    elif held_out is not None:
        data, description = held_out, held_out.description
    thresholds = recipe_thresholds(manifest).override(min_cosine=args.min_cosine, min_sqnr_db=args.min_sqnr_db,
                                                      min_top1=args.min_top1)
    report = validate_engine(engine_path, reference_model, reference_name=str(reference_name), data=data,
                             data_description=description, thresholds=thresholds,
                             precision=args.reference_precision, per_layer=per_layer)
    print(format_report(report))
    if report.layers is not None:
        from qcompile.validation.localize import format_layer_table

        print()
        print(format_layer_table(report.layers, top=top))
    print(f"validation report: {report_path_for(engine_path)}")
    return report


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
