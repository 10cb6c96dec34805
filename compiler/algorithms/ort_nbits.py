"""ONNX Runtime's `com.microsoft::MatMulNBits` weight format, read into ONNX MatMul layout ([K, N]).

MatMulNBits(A, B, scales, zero_points?, g_idx?, bias?; K, N, bits, block_size) computes A @ W (+ bias) with W's
column n, block j (rows j * block_size ...) = (q - zero) * scale. B is uint8 [N, blocks, block_size * bits / 8],
codes packed along K, the first in the low bits; scales [N * blocks] (or [N, blocks]) in A's float type;
zero_points either packed like B ([N * ceil(blocks * bits / 8)] uint8) or one float per block; absent: 2^(bits-1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DOMAIN, OP_TYPE = "com.microsoft", "MatMulNBits"


@dataclass
class NBitsWeight:
    """A MatMulNBits weight in MatMul layout: `codes` uint8 [K, N] in [0, 2^bits), `scale` float32 [blocks, N],
    `zero` float32 [blocks, N] (integers when the checkpoint stored packed zero points)."""

    codes: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    block_size: int

    def dequantize(self) -> np.ndarray:
        """W [K, N] in float32."""
        k = self.codes.shape[0]
        rows = lambda t: np.repeat(t, self.block_size, axis=0)[:k]  # noqa: E731
        return ((self.codes.astype(np.float32) - rows(self.zero)) * rows(self.scale)).astype(np.float32)


def read(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *, k: int, n: int, bits: int,
         block_size: int) -> NBitsWeight:
    """The weight of one MatMulNBits node from its constant inputs and attributes."""
    if bits not in (2, 4, 8):
        raise ValueError(f"bits={bits} (MatMulNBits packs 2, 4 or 8 bits)")
    blocks = -(-k // block_size)
    codes = _unpack(b.reshape(n, -1), bits)[:, :k].T
    scale = scales.reshape(n, blocks).T.astype(np.float32)
    if zero_points is None:
        zero = np.full_like(scale, 2 ** (bits - 1))
    elif zero_points.dtype == np.uint8:
        zero = _unpack(zero_points.reshape(n, -1), bits)[:, :blocks].T.astype(np.float32)
    else:
        zero = zero_points.reshape(n, blocks).T.astype(np.float32)
    return NBitsWeight(np.ascontiguousarray(codes), scale, zero, block_size)


def _unpack(packed: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [rows, bytes] -> the codes [rows, bytes * 8 / bits], the first of each byte in its low bits."""
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1).astype(np.uint8)
