"""Which pass quantizes, and which fusion fuses, the layers of a recipe rule: one answer, keyed from the rule.

A recipe hands each layer to one quantizing pass and one fusion; the others leave it alone without declining it
(a decline means "this pass should have taken the layer and could not", the answer to "why is this layer not
quantized / fused?"). `rule_form` names the form a rule's layers take:

| form                 | quantized by                                   | fused by              |
|----------------------|------------------------------------------------|-----------------------|
| "int4"               | QuantizeWeightsInt4Pass (+ InsertQDQPass: W4A8 activations) | FuseInt4GemmPass |
| "fp4"                | QuantizeWeightsFp4Pass (DQ -> Transpose kept)  | FuseFp4GemmPass       |
| "fp8_block"          | QuantizeFp8BlockPass                           | FuseFp8BlockGemmPass  |
| "int8_weight_only"   | InsertQDQPass (+ FoldWeightQDQPass)            | FuseInt8WoGemmPass    |
| "qdq"                | InsertQDQPass (+ FoldWeightQDQPass)            | FuseScaledGemmPass    |
"""
from __future__ import annotations

from qcompile.algorithms.fp4 import FORMATS as FP4_FORMATS
from qcompile.recipes.schema import Rule

INT4, FP4, FP8_BLOCK, INT8_WEIGHT_ONLY, QDQ = "int4", "fp4", "fp8_block", "int8_weight_only", "qdq"


def rule_form(rule: Rule) -> str:
    """The form of the layers `rule` selects (see the module docstring)."""
    weight = rule.weight
    if weight is None:
        return QDQ
    if weight.format == "int4":
        return INT4
    if weight.format in FP4_FORMATS:
        return FP4
    if weight.format == "fp8" and weight.granularity == "block":
        return FP8_BLOCK
    if weight.format == "int8" and rule.activation is None:
        return INT8_WEIGHT_ONLY
    return QDQ
