"""ONNX form of the engine's fused attention node: `qcompile::ScaledDotProductAttention` (version 1).

Contract (what `FuseAttentionPass` writes and the lowering reads):

    y = Softmax(Q @ K^T * scale + mask, axis=-1) @ V

inputs (in order):
  0 q     float [B, H, L, E]
  1 k     float [B, H, S, E]      (not transposed)
  2 v     float [B, H, S, Ev]
  3 mask  (optional) float, broadcastable to [B, H, L, S]; added to the scaled scores
attributes: scale (float).
output: y, [B, H, L, Ev], the dtype of q.

An engine-internal node: only the graph the engine is lowered from holds it (the pass runs in
`prepare_for_engine`), never the plugin graph that engines store and validation reads, so it has no function
body. The lowering maps it to `torch.nn.functional.scaled_dot_product_attention`.
"""
from __future__ import annotations

DOMAIN = "qcompile"
OP_TYPE = "ScaledDotProductAttention"
VERSION = 1  # the qcompile domain's opset version (shared by every qcompile node)
INPUTS = ("q", "k", "v", "mask")
