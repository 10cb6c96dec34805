"""Converters, one module per op family; importing this package registers them all."""
from qcompile.lowering.ops import attention, control_flow, dynamic, elementwise, nn, quant  # noqa: F401
from qcompile.lowering.ops import recurrent, reduce, resize, rotary, sampling, shape, signal  # noqa: F401
from qcompile.lowering.ops import plugin, int4_plugin, matmul_nbits, ort_contrib, qoperator  # noqa: F401
from qcompile.lowering.ops import fp8_block_plugin, int8_wo_plugin  # noqa: F401
from qcompile.lowering.ops import fp4_plugin  # noqa: F401
