"""Recipe schema: frozen dataclasses built from TOML, validated on load.

A recipe is a list of rules. Each rule selects nodes (op types, node-name globs, module-name
globs, exclusions) and says how their weight and activation are quantized. The schema already
carries what later formats need (group size, 2-D blocks, dynamic per-token activations,
algorithms), so new recipes are new TOML files, not new code.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from qcompile.errors import RecipeError

WEIGHT_FORMATS = ("int8", "fp8", "int4", "nvfp4", "mxfp4")
ACTIVATION_FORMATS = ("int8", "fp8", "nvfp4", "mxfp4")
GRANULARITIES = ("tensor", "channel", "group", "block", "token")
ACTIVATION_MODES = ("static", "dynamic")
ALGORITHMS = ("rtn", "smoothquant", "awq", "gptq")
CALIBRATION_METHODS = ("max", "percentile")
RESIDUAL_ADD_POLICIES = ("keep", "quantize")
SCALE_SEARCHES = ("amax", "mse")  # weights: how the NVFP4 scales are chosen (amax, or least squared error)
FP4_BLOCKS = {"nvfp4": 16, "mxfp4": 32}  # elements per block scale along K, fixed by the format


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise RecipeError(
            f"unknown key {where}.{unknown[0]!s}; allowed keys in {where}: {', '.join(sorted(allowed))}"
        )


def _choice(table: dict, key: str, choices: tuple, where: str, default: Any = None) -> Any:
    value = table.get(key, default)
    if value not in choices:
        raise RecipeError(f"bad value {where}.{key} = {value!r}; expected one of: {', '.join(map(str, choices))}")
    return value


def _typed(table: dict, key: str, kind: type | tuple, where: str, default: Any = None) -> Any:
    value = table.get(key, default)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RecipeError(f"bad value {where}.{key} = {value!r}; expected {names}")
    return value


def _positive(table: dict, key: str, where: str, default: Any = None) -> Any:
    value = _typed(table, key, int, where, default)
    if value is not None and value <= 0:
        raise RecipeError(f"bad value {where}.{key} = {value!r}; expected a positive integer")
    return value


def _globs(table: dict, key: str, where: str, default: tuple = ()) -> tuple[str, ...]:
    value = table.get(key, list(default))
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise RecipeError(f"bad value {where}.{key} = {value!r}; expected a list of non-empty strings")
    return tuple(value)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (a weight or an activation) is quantized.

    Attributes:
        format: "int8", "fp8" (E4M3), "int4", "nvfp4" or "mxfp4".
        granularity: "tensor", "channel" (weights: per output channel), "group" (along K, with
            `group_size`), "block" (2-D `block` shape) or "token" (activations: per row).
        group_size: elements per group along the reduction dim (granularity "group").
        block: (rows, cols) block shape (granularity "block").
        symmetric: symmetric quantization (zero point 0); TensorRT accepts only symmetric.
        mode: activations only: "static" (calibrated scale) or "dynamic" (computed at run time).
        scale_search: weights only: "amax" (scales from the absolute max) or "mse" (NVFP4: the per-tensor
            global scale and each block's E4M3 scale searched for the least squared weight error; slower).
    """

    format: str
    granularity: str = "tensor"
    group_size: int | None = None
    block: tuple[int, int] | None = None
    symmetric: bool = True
    mode: str = "static"
    scale_search: str = "amax"

    @classmethod
    def from_table(cls, table: Any, where: str, *, activation: bool) -> "QuantSpec":
        if not isinstance(table, dict):
            raise RecipeError(f"bad value {where} = {table!r}; expected a table such as {{ format = \"int8\" }}")
        allowed = {"format", "granularity", "group_size", "block", "symmetric"} | (
            {"mode"} if activation else {"scale_search"})
        _check_keys(table, allowed, where)
        formats = ACTIVATION_FORMATS if activation else WEIGHT_FORMATS
        fmt = _choice(table, "format", formats, where)
        default_gran = "tensor" if activation else "channel"
        gran = _choice(table, "granularity", GRANULARITIES, where, default_gran)
        group_size = _positive(table, "group_size", where)
        if (gran == "group") != (group_size is not None):
            raise RecipeError(f"{where}.group_size goes with granularity = \"group\" (and only with it)")
        block = table.get("block")
        if block is not None:
            if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
                raise RecipeError(f"bad value {where}.block = {block!r}; expected two positive integers, e.g. [128, 128]")
            block = (block[0], block[1])
        if (gran == "block") != (block is not None):
            raise RecipeError(f"{where}.block goes with granularity = \"block\" (and only with it)")
        if gran == "token" and not activation:
            raise RecipeError(f"bad value {where}.granularity = \"token\"; per-token granularity is for activations")
        if gran == "channel" and activation:
            raise RecipeError(
                f"bad value {where}.granularity = \"channel\"; activations cannot be quantized per channel "
                "(TensorRT rule); use \"tensor\" or \"token\""
            )
        symmetric = _typed(table, "symmetric", bool, where, True)
        mode = _choice(table, "mode", ACTIVATION_MODES, where, "static") if activation else "static"
        if activation and gran == "token" and mode != "dynamic":
            raise RecipeError(f"{where}: granularity = \"token\" needs mode = \"dynamic\"")
        if fmt in FP4_BLOCKS and group_size is not None and group_size != FP4_BLOCKS[fmt]:
            raise RecipeError(f"bad value {where}.group_size = {group_size}; {fmt} blocks are "
                              f"{FP4_BLOCKS[fmt]} elements along K (use group_size = {FP4_BLOCKS[fmt]})")
        search = "amax" if activation else _choice(table, "scale_search", SCALE_SEARCHES, where, "amax")
        if search != "amax" and fmt != "nvfp4":
            raise RecipeError(f"bad value {where}.scale_search = {search!r} with format = {fmt!r}; the scale search "
                              "is for nvfp4 weights (their FP32 global and E4M3 block scales); use \"amax\"")
        return cls(fmt, gran, group_size, block, symmetric, mode, search)


@dataclass(frozen=True)
class Rule:
    """Selects nodes and says how to quantize them.

    A node matches when its op type is in `ops`, its name matches one of `names` and its module
    name (the torch module it came from, when known) matches one of `modules`, and neither name
    matches any `exclude` glob.
    """

    ops: tuple[str, ...]
    weight: QuantSpec | None
    activation: QuantSpec | None
    names: tuple[str, ...] = ("*",)
    modules: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    algorithm: str = "rtn"
    alpha: float | str | None = None  # a number in [0, 1], or "auto" (SmoothQuant: searched per layer)

    def matches(self, op_type: str, node_name: str, module_name: str | None = None) -> bool:
        if op_type not in self.ops:
            return False
        module_name = module_name or ""
        if not any(fnmatch.fnmatchcase(node_name, g) for g in self.names):
            return False
        if self.modules != ("*",) and not any(fnmatch.fnmatchcase(module_name, g) for g in self.modules):
            return False
        return not any(fnmatch.fnmatchcase(node_name, g) or fnmatch.fnmatchcase(module_name, g) for g in self.exclude)

    @classmethod
    def from_table(cls, table: Any, where: str) -> "Rule":
        if not isinstance(table, dict):
            raise RecipeError(f"bad value {where}; expected a [[rules]] table")
        _check_keys(table, {"ops", "names", "modules", "exclude", "weight", "activation", "algorithm", "alpha"}, where)
        ops = _globs(table, "ops", where)
        if not ops:
            raise RecipeError(f"missing key {where}.ops; name the op types this rule quantizes, e.g. [\"MatMul\"]")
        weight = QuantSpec.from_table(table["weight"], f"{where}.weight", activation=False) if "weight" in table else None
        act = table.get("activation")
        activation = QuantSpec.from_table(act, f"{where}.activation", activation=True) if act is not None else None
        if weight is None and activation is None:
            raise RecipeError(f"{where} quantizes nothing; give it a weight and/or activation table")
        algorithm = _choice(table, "algorithm", ALGORITHMS, where, "rtn")
        alpha = table.get("alpha")
        if alpha != "auto":  # "auto": SmoothQuant searches alpha per layer
            alpha = _typed(table, "alpha", (int, float), where)
        if algorithm == "smoothquant" and alpha is None:
            alpha = 0.5
        if alpha not in (None, "auto") and not 0.0 <= alpha <= 1.0:
            raise RecipeError(f"bad value {where}.alpha = {alpha!r}; expected a number in [0, 1] or \"auto\"")
        return cls(ops, weight, activation, _globs(table, "names", where, ("*",)),
                   _globs(table, "modules", where, ("*",)), _globs(table, "exclude", where), algorithm,
                   alpha if alpha in (None, "auto") else float(alpha))


@dataclass(frozen=True)
class PlacementOptions:
    """Where Q/DQ nodes go (TensorRT placement rules, made configurable).

    Attributes:
        min_k: do not quantize a GEMM/Conv whose reduction size K is below this.
        min_n: do not quantize a GEMM/Conv whose output size N is below this.
        skip_gemv: do not quantize GEMV-shaped MatMuls (a static 1-row or 1-column operand).
        residual_add: "keep" leaves residual Adds in high precision (transformer accuracy;
            see accuracy-notes); "quantize" quantizes the skip input (TensorRT's CNN speed rule).
        quantize_output: also quantize the op's output (TensorRT: by default do not).
    """

    min_k: int = 16
    min_n: int = 16
    skip_gemv: bool = True
    residual_add: str = "keep"
    quantize_output: bool = False

    @classmethod
    def from_table(cls, table: dict, where: str, base: "PlacementOptions | None" = None) -> "PlacementOptions":
        base = base or cls()
        return cls(
            _positive(table, "min_k", where, base.min_k),
            _positive(table, "min_n", where, base.min_n),
            _typed(table, "skip_gemv", bool, where, base.skip_gemv),
            _choice(table, "residual_add", RESIDUAL_ADD_POLICIES, where, base.residual_add),
            _typed(table, "quantize_output", bool, where, base.quantize_output),
        )


_PLACEMENT_KEYS = {f.name for f in dataclasses.fields(PlacementOptions)}


@dataclass(frozen=True)
class Placement:
    """Placement defaults plus per-op-type overrides (`[placement.op.Conv]`)."""

    default: PlacementOptions = field(default_factory=PlacementOptions)
    per_op: tuple[tuple[str, PlacementOptions], ...] = ()

    def for_op(self, op_type: str) -> PlacementOptions:
        return dict(self.per_op).get(op_type, self.default)

    @classmethod
    def from_table(cls, table: Any, where: str = "placement") -> "Placement":
        if not isinstance(table, dict):
            raise RecipeError(f"bad value {where}; expected a table")
        _check_keys(table, _PLACEMENT_KEYS | {"op"}, where)
        default = PlacementOptions.from_table(table, where)
        per_op = []
        for op_type, sub in (table.get("op") or {}).items():
            sub_where = f"{where}.op.{op_type}"
            if not isinstance(sub, dict):
                raise RecipeError(f"bad value {sub_where}; expected a table")
            _check_keys(sub, _PLACEMENT_KEYS, sub_where)
            per_op.append((op_type, PlacementOptions.from_table(sub, sub_where, default)))
        return cls(default, tuple(per_op))


@dataclass(frozen=True)
class CalibrationOptions:
    """How activation ranges are measured.

    Attributes:
        method: "max" (absolute max over all samples) or "percentile" (of |x|, per sample, averaged).
        percentile: the percentile for method "percentile", in (0, 100].
        max_samples: stop after this many samples (None: use all).
    """

    method: str = "max"
    percentile: float = 99.99
    max_samples: int | None = None

    @classmethod
    def from_table(cls, table: Any, where: str = "calibration") -> "CalibrationOptions":
        if not isinstance(table, dict):
            raise RecipeError(f"bad value {where}; expected a table")
        _check_keys(table, {"method", "percentile", "max_samples"}, where)
        method = _choice(table, "method", CALIBRATION_METHODS, where, "max")
        pct = float(_typed(table, "percentile", (int, float), where, 99.99))
        if not 0.0 < pct <= 100.0:
            raise RecipeError(f"bad value {where}.percentile = {pct!r}; expected a number in (0, 100]")
        return cls(method, pct, _positive(table, "max_samples", where))


@dataclass(frozen=True)
class ValidationThresholds:
    """Pass/fail limits when comparing the engine with its FP reference graph, per output.

    Attributes:
        min_cosine: cosine similarity of each output with the reference's.
        min_sqnr_db: signal-to-quantization-noise ratio in dB (None: not checked).
        min_top1: for logits outputs, the fraction of positions whose arg-max agrees (None: not checked).
    """

    min_cosine: float = 0.99
    min_sqnr_db: float | None = None
    min_top1: float | None = None

    @classmethod
    def from_table(cls, table: Any, where: str = "validation") -> "ValidationThresholds":
        if not isinstance(table, dict):
            raise RecipeError(f"bad value {where}; expected a table")
        _check_keys(table, {"min_cosine", "min_sqnr_db", "min_top1"}, where)
        cos = float(_typed(table, "min_cosine", (int, float), where, 0.99))
        if not -1.0 <= cos <= 1.0:
            raise RecipeError(f"bad value {where}.min_cosine = {cos!r}; expected a number in [-1, 1]")
        sqnr = _typed(table, "min_sqnr_db", (int, float), where)
        top1 = _typed(table, "min_top1", (int, float), where)
        if top1 is not None and not 0.0 <= top1 <= 1.0:
            raise RecipeError(f"bad value {where}.min_top1 = {top1!r}; expected a fraction in [0, 1]")
        return cls(cos, None if sqnr is None else float(sqnr), None if top1 is None else float(top1))

    def override(self, **limits: float | None) -> "ValidationThresholds":
        """A copy with the limits given (not None) replaced, checked like the recipe's."""
        given = {k: v for k, v in limits.items() if v is not None}
        table = {k: v for k, v in {**dataclasses.asdict(self), **given}.items() if v is not None}
        return ValidationThresholds.from_table(table, "threshold")


@dataclass(frozen=True)
class Recipe:
    """A validated quantization recipe. Build with `qcompile.recipes.load_recipe`."""

    name: str
    description: str
    rules: tuple[Rule, ...] = ()
    opset: int = 21
    placement: Placement = field(default_factory=Placement)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    validation: ValidationThresholds = field(default_factory=ValidationThresholds)
    source: str = "<memory>"

    @property
    def quantizes(self) -> bool:
        return bool(self.rules)

    @property
    def needs_calibration(self) -> bool:
        """Static activation scales, or algorithms that read activation statistics (SmoothQuant, AWQ, GPTQ)."""
        return any((r.activation is not None and r.activation.mode == "static")
                   or r.algorithm in ("smoothquant", "awq", "gptq")
                   for r in self.rules)

    def rule_for(self, op_type: str, node_name: str, module_name: str | None = None) -> Rule | None:
        """The first rule that matches the node, or None (the node stays in high precision)."""
        return next((r for r in self.rules if r.matches(op_type, node_name, module_name)), None)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data.pop("source")
        return data

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()

    @classmethod
    def from_dict(cls, data: dict, source: str = "<memory>") -> "Recipe":
        _check_keys(data, {"name", "description", "opset", "rules", "placement", "calibration", "validation"}, "recipe")
        name = _typed(data, "name", str, "recipe")
        if not name:
            raise RecipeError(f"missing key recipe.name in {source}; every recipe needs a name")
        opset = _typed(data, "opset", int, "recipe", 21)
        if opset < 21:
            raise RecipeError(f"bad value recipe.opset = {opset}; qcompile emits opset 21 or newer")
        rules = data.get("rules", [])
        if not isinstance(rules, list):
            raise RecipeError("bad value recipe.rules; expected [[rules]] tables")
        return cls(
            name=name,
            description=_typed(data, "description", str, "recipe", ""),
            rules=tuple(Rule.from_table(r, f"rules[{i}]") for i, r in enumerate(rules)),
            opset=opset,
            placement=Placement.from_table(data.get("placement", {})),
            calibration=CalibrationOptions.from_table(data.get("calibration", {})),
            validation=ValidationThresholds.from_table(data.get("validation", {})),
            source=source,
        )
