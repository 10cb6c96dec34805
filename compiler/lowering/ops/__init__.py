"""Converters, one module per op family; importing this package registers them all."""
from qcompile.lowering.ops import attention, elementwise, nn, plugin, quant, reduce, resize, rotary, shape  # noqa: F401
from qcompile.lowering.ops import int4_plugin  # noqa: F401
from qcompile.lowering.ops import fp8_block_plugin, int8_wo_plugin  # noqa: F401
from qcompile.lowering.ops import fp4_plugin  # noqa: F401
