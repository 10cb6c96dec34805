"""Elementwise converters: arithmetic, comparisons, activations, Cast, Where.

Binary arithmetic on two `IntList`s (shape math) stays in Python; anything else is torch.
"""
from __future__ import annotations

import operator

import onnx
import torch
import torch.nn.functional as F

from qcompile.lowering.registry import read_float_constants
from qcompile.lowering.registry import register_converter as reg
from qcompile.lowering.values import IntList, as_tensor
from qcompile.lowering.ops.dtypes import FP8_MAX, onnx_to_torch_dtype


def _python_binary(a: IntList, b: IntList, fn) -> IntList:
    av, bv = list(a.values), list(b.values)
    if len(av) == 1 and len(bv) != 1:
        av = av * len(bv)
    if len(bv) == 1 and len(av) != 1:
        bv = bv * len(av)
    values = tuple(fn(x, y) for x, y in zip(av, bv))
    dtype = torch.bool if fn in (operator.eq, operator.lt, operator.gt, operator.le, operator.ge) else a.dtype
    return IntList(values, a.scalar and b.scalar, dtype)


def _binary(torch_fn, py_fn=None):
    def convert(ctx, a, b):
        if py_fn is not None and isinstance(a, IntList) and isinstance(b, IntList) \
                and not (a.dtype.is_floating_point or b.dtype.is_floating_point):
            return _python_binary(a, b, py_fn)
        a, b = promote(as_tensor(a), as_tensor(b))
        return torch_fn(a, b)
    return convert


def promote(a: torch.Tensor, b: torch.Tensor):
    """ONNX requires equal input types; mixed float precisions come from our compute dtype."""
    if a.dtype != b.dtype:
        if a.dtype.is_floating_point and b.dtype.is_floating_point:
            wide = a.dtype if a.dtype.itemsize >= b.dtype.itemsize else b.dtype
            return a.to(wide), b.to(wide)
        if a.dtype.is_floating_point:
            return a, b.to(a.dtype)
        if b.dtype.is_floating_point:
            return a.to(b.dtype), b
    return a, b


def _int_div(a, b):
    q = a // b
    return q + 1 if (q < 0 and q * b != a) else q  # ONNX Div truncates toward zero


def _div(a, b):
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


for _name, _fn, _py in [("Add", torch.add, operator.add), ("Sub", torch.sub, operator.sub),
                        ("Mul", torch.mul, operator.mul), ("Div", _div, _int_div),
                        ("Equal", torch.eq, operator.eq), ("Less", torch.lt, operator.lt),
                        ("Greater", torch.gt, operator.gt), ("LessOrEqual", torch.le, operator.le),
                        ("GreaterOrEqual", torch.ge, operator.ge), ("And", torch.logical_and, None),
                        ("Or", torch.logical_or, None), ("Xor", torch.logical_xor, None),
                        ("BitwiseAnd", torch.bitwise_and, None), ("BitwiseOr", torch.bitwise_or, None),
                        ("BitwiseXor", torch.bitwise_xor, None)]:
    reg(_name)(_binary(_fn, _py))


# A 0-d float exponent constant is read as a number when the graph is lowered: Inductor then writes `pow(x, 2.0)` as
# `x * x` and `pow(x, 0.5)` as a square root, as eager torch computes them, where an exponent tensor, even a 0-d
# constant, compiles to a libdevice `pow` call per element (RMSNorm's square, in every decoder layer's norms).
@reg("Pow", prepare=read_float_constants((1, "exponent"), scalar=True))
def pow_(ctx, a, b=None, prepared=None):
    a = as_tensor(a)
    if "exponent" in ctx.extra:
        (b,) = ctx.extra["exponent"]
        return torch.pow(a, b) if a.dtype.is_floating_point else torch.pow(a, torch.tensor(b))
    if isinstance(b, IntList) and b.scalar and isinstance(b.item(), int) and a.dtype.is_floating_point:
        return torch.pow(a, b.item())
    b = as_tensor(b)
    return torch.pow(a, b.to(a.dtype) if a.dtype.is_floating_point else b)


@reg("Mod")
def mod(ctx, a, b):
    a, b = as_tensor(a), as_tensor(b)
    return torch.fmod(a, b) if ctx.attr("fmod", 0) else torch.remainder(a, b)


def _variadic(fn):
    def convert(ctx, *xs):
        xs = [as_tensor(x) for x in xs]
        out = xs[0]
        for x in xs[1:]:
            out, x = promote(out, x)
            out = fn(out, x)
        return out
    return convert


reg("Max")(_variadic(torch.maximum))
reg("Min")(_variadic(torch.minimum))
reg("Sum")(_variadic(torch.add))


@reg("Mean")
def mean(ctx, *xs):
    return _variadic(torch.add)(ctx, *xs) / len(xs)


def _unary(fn):
    return lambda ctx, x: fn(as_tensor(x))


for _name, _fn in [("Neg", torch.neg), ("Abs", torch.abs), ("Sqrt", torch.sqrt), ("Exp", torch.exp),
                   ("Log", torch.log), ("Erf", torch.erf), ("Tanh", torch.tanh), ("Sigmoid", torch.sigmoid),
                   ("Relu", torch.relu), ("Sin", torch.sin), ("Cos", torch.cos), ("Floor", torch.floor),
                   ("Ceil", torch.ceil), ("Round", torch.round), ("Sign", torch.sign), ("Not", torch.logical_not),
                   ("IsNaN", torch.isnan), ("Reciprocal", torch.reciprocal), ("Softplus", F.softplus),
                   ("Softsign", F.softsign), ("Atan", torch.atan), ("Tan", torch.tan), ("Asin", torch.asin),
                   ("Acos", torch.acos), ("Sinh", torch.sinh), ("Cosh", torch.cosh), ("Mish", F.mish),
                   ("Asinh", torch.asinh), ("Acosh", torch.acosh), ("Atanh", torch.atanh)]:
    reg(_name)(_unary(_fn))


@reg("Identity")
def identity(ctx, x):
    return x


@reg("Dropout")
def dropout(ctx, x, *rest):
    x = as_tensor(x)
    return (x, torch.ones_like(x, dtype=torch.bool)) if ctx.num_outputs > 1 else x


@reg("IsInf")
def isinf(ctx, x):
    x = as_tensor(x)
    pos, neg = ctx.attr("detect_positive", 1), ctx.attr("detect_negative", 1)
    return (torch.isposinf(x) if pos else torch.zeros_like(x, dtype=torch.bool)) | (
        torch.isneginf(x) if neg else torch.zeros_like(x, dtype=torch.bool))


def with_alpha(fn, default: float):
    """The converter `fn(x, alpha)`, alpha from the node's `alpha` attribute (else `default`)."""
    return lambda ctx, x: fn(as_tensor(x), ctx.attr("alpha", default))


def sigmoid_gated(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """x * sigmoid(alpha * x): ONNX's Swish, ONNX Runtime's QuickGelu."""
    return x * torch.sigmoid(alpha * x)


for _name, _fn, _alpha in [("LeakyRelu", F.leaky_relu, 0.01), ("Elu", F.elu, 1.0), ("Celu", F.celu, 1.0)]:
    reg(_name)(with_alpha(_fn, _alpha))
reg("Swish", since=24)(with_alpha(sigmoid_gated, 1.0))


@reg("Selu")
def selu(ctx, x):
    x = as_tensor(x)
    alpha, gamma = ctx.attr("alpha", 1.67326319217681884765625), ctx.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


_SIGNED_VIEW = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


@reg("BitwiseNot")
def bitwise_not(ctx, x):
    """torch has no bitwise_not for the wide unsigned types: their bits are flipped as the signed type's."""
    x = as_tensor(x)
    if x.dtype in _SIGNED_VIEW:
        return torch.bitwise_not(x.view(_SIGNED_VIEW[x.dtype])).view(x.dtype)
    return torch.bitwise_not(x)


@reg("ThresholdedRelu")
def thresholded_relu(ctx, x):
    x = as_tensor(x)
    return torch.where(x > ctx.attr("alpha", 1.0), x, torch.zeros((), dtype=x.dtype))


@reg("Shrink")
def shrink(ctx, x):
    x = as_tensor(x)
    bias, lambd = ctx.attr("bias", 0.0), ctx.attr("lambd", 0.5)
    zero = torch.zeros((), dtype=x.dtype)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero)).to(x.dtype)


@reg("BitShift")
def bit_shift(ctx, a, b):
    """Shifts by the bit width or more give 0 (and -1 for negative values shifted right), as ONNX's reference."""
    a, b = as_tensor(a), as_tensor(b).to(as_tensor(a).dtype)
    bits = torch.iinfo(a.dtype).bits
    in_range = (b >= 0) & (b < bits)
    safe = torch.where(in_range, b, torch.zeros_like(b))
    if ctx.attr("direction") == "LEFT":
        return torch.where(in_range, torch.bitwise_left_shift(a, safe), torch.zeros_like(a))
    return torch.where(in_range, torch.bitwise_right_shift(a, safe), torch.where(a < 0, -1, 0).to(a.dtype))


@reg("Hardmax", since=13)
def hardmax(ctx, x):
    """1 at the first largest value along `axis`, 0 elsewhere."""
    x = as_tensor(x)
    axis = ctx.attr("axis", -1) % x.ndim
    return torch.zeros_like(x).scatter(axis, x.argmax(axis, keepdim=True), 1)


@reg("Gelu", since=20)
def gelu(ctx, x):
    return F.gelu(as_tensor(x), approximate=ctx.attr("approximate", "none"))


@reg("HardSigmoid")
def hard_sigmoid(ctx, x):
    x = as_tensor(x)
    return torch.clamp(ctx.attr("alpha", 0.2) * x + ctx.attr("beta", 0.5), 0, 1)


@reg("HardSwish")
def hard_swish(ctx, x):
    return F.hardswish(as_tensor(x))


@reg("PRelu")
def prelu(ctx, x, slope):
    x, slope = promote(as_tensor(x), as_tensor(slope))
    return torch.where(x < 0, x * slope, x)


@reg("Clip", since=11)
def clip(ctx, x, lo=None, hi=None):
    x = as_tensor(x)
    if lo is not None:
        x = torch.maximum(x, as_tensor(lo).to(x.dtype))
    if hi is not None:
        x = torch.minimum(x, as_tensor(hi).to(x.dtype))
    return x


@reg("Where")
def where(ctx, cond, a, b):
    if all(isinstance(v, IntList) for v in (cond, a, b)):
        n = max(len(cond.values), len(a.values), len(b.values))
        pick = [(cond.values * n)[i] if len(cond.values) == 1 else cond.values[i] for i in range(n)]
        av = a.values * n if len(a.values) == 1 else a.values
        bv = b.values * n if len(b.values) == 1 else b.values
        return IntList(tuple(x if c else y for c, x, y in zip(pick, av, bv)), cond.scalar and a.scalar, a.dtype)
    a, b = promote(as_tensor(a), as_tensor(b))
    return torch.where(as_tensor(cond), a, b)


_FP8_NAN_ABOVE = {torch.float8_e4m3fn: 464.0}  # halfway to the NaN code: larger values round to NaN
_INT4_CODES = {onnx.TensorProto.INT4: (-8, 16), onnx.TensorProto.UINT4: (0, 16)}


def _cast(x, code: int, dtype: torch.dtype, saturate: bool):
    """ONNX Cast of a tensor: float8 saturates (or overflows to NaN/inf), 4-bit integers wrap around."""
    if dtype in FP8_MAX:
        xf = x.float()
        if saturate:
            return torch.clamp(xf, -FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)
        if dtype in _FP8_NAN_ABOVE:  # e4m3fn has no inf: overflow and inf become NaN
            xf = torch.where(xf.abs() > _FP8_NAN_ABOVE[dtype], torch.full_like(xf, float("nan")), xf)
        return xf.to(dtype)
    if code in _INT4_CODES:
        lo, span = _INT4_CODES[code]
        v = torch.trunc(x.float()).to(torch.int64) if x.dtype.is_floating_point else x.to(torch.int64)
        return (torch.remainder(v - lo, span) + lo).to(dtype)
    return x.to(dtype)


@reg("Cast")
def cast(ctx, x):
    code = ctx.attr("to")
    dtype = ctx.float_dtype(onnx_to_torch_dtype(code))
    if isinstance(x, IntList) and code not in _INT4_CODES and dtype not in FP8_MAX:  # stays a Python value
        if dtype == torch.bool:
            values = tuple(bool(v) for v in x.values)
        elif not dtype.is_floating_point:
            values = tuple(int(v) if isinstance(v, float) else v for v in x.values)  # truncates, as ONNX
        else:
            values = x.values  # float-typed; SymInts stay symbolic (e.g. a sequence length for Range)
        return IntList(values, x.scalar, dtype)
    return _cast(as_tensor(x), code, dtype, bool(ctx.attr("saturate", 1)))


@reg("CastLike")
def cast_like(ctx, x, like):
    types = ctx.extra.get("input_types", [])
    code = types[1] if len(types) > 1 else None
    return _cast(as_tensor(x), code, as_tensor(like).dtype, bool(ctx.attr("saturate", 1)))


@reg("Softmax", since=13)
def softmax(ctx, x):
    return torch.softmax(as_tensor(x), dim=ctx.attr("axis", -1))


@reg("LogSoftmax", since=13)
def log_softmax(ctx, x):
    return torch.log_softmax(as_tensor(x), dim=ctx.attr("axis", -1))


@reg("Trilu")
def trilu(ctx, x, k=None):
    k = 0 if k is None else int(as_tensor(k).reshape(-1)[0]) if not isinstance(k, IntList) else k.item()
    x = as_tensor(x)
    return torch.triu(x, k) if ctx.attr("upper", 1) else torch.tril(x, k)


