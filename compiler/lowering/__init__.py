"""Lowering: an ONNX graph as a torch program (`lower_onnx`), for calibration, references and engines."""
from qcompile.lowering.interpreter import OnnxProgram, lower_onnx
from qcompile.lowering.options import LoweringOptions
from qcompile.lowering.registry import NodeContext, register_converter, supported_ops
from qcompile.lowering.values import IntList

__all__ = ["lower_onnx", "LoweringOptions", "OnnxProgram", "register_converter", "NodeContext", "IntList",
           "supported_ops"]
