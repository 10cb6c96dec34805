"""INT4 weight formats of the groupwise INT4 GEMM plugin: the ONNX layout and the engine layout.

ONNX layout (what an ONNX INT4/UINT4 initializer stores, and TensorRT's convention):
  the weight `W[K, N]` is flattened row-major and packed two values per byte, the first (even flat
  index) in the low nibble, the second in the high nibble; an odd count pads the last high nibble with 0.
  Signed INT4 holds [-8, 7] (two's complement nibble), UINT4 holds [0, 15].

Engine layout (what the kernel loads; `torch.int32` `[K/8, N]`, N contiguous):
  word `P[i, n]` packs 8 values `q[k(i, j), n]`, j = 0..7, nibble j in bits `4*j .. 4*j+3` (j = 0 in the
  lowest bits), each as a signed two's complement nibble ([-8, 7]). The int32 is the bit pattern of the
  uint32 word (words with bit 31 set are negative). K must be a multiple of 8. Two orders of K:
  - sequential: `k(i, j) = 8 i + j` (8 K-consecutive values per word);
  - planar (`is_planar`: K and the group size multiples of 64): within each 64 K, word c (0..7) holds
    `k = 16 (j % 4) + 2 c + j // 4`, so nibbles j and j + 4 are the pair (k, k + 1). One LOP3
    `(P >> 4 j) & 0x000F000F` then puts both, as 16-bit floats, in the register pair that the tensor-core
    MMA's operand holds (`one_dot.py`: no layout conversion before the MMA). A group stays whole in each 64 K, so
    scales and zero points keep their rows. The planar words are the sequential packing of the weight with
    its rows in `planar_order` (the GEMVs and the dequantization read it with that map).
  Unsigned (UINT4) weights are stored as `q - 8` with zero points
  `zp - 8` (so `q - zp` is unchanged) and a UINT4 weight without zero point gets `zp = -8`.

Zero points in the engine: `torch.int8` `[K/g, N]` (one value per byte, not packed: 1/g of the
weight count); None means symmetric (zero point 0).
Scales: float32 / float16 / bfloat16 `[K/g, N]`, strictly positive. Group size g divides K:
32, 64, 128, or K (per output channel).
"""
from __future__ import annotations

import numpy as np
import torch

PACK = 8  # int4 values per engine int32 word, along K
GROUP_SIZES = (32, 64, 128)
UINT4_OFFSET = 8
PLANAR_BLOCK = 64  # K per planar block: 8 words, 4 MMA k-tiles of 16


# ------------------------------------------------------------------ ONNX layout (numpy)

def pack_int4(values: np.ndarray) -> np.ndarray:
    """Pack int4/uint4 values (any int dtype, any shape) to the ONNX layout: uint8 [ceil(size/2)]."""
    v = np.asarray(values).reshape(-1).astype(np.int16)
    if v.size and (v.min() < -8 or v.max() > 15):
        raise ValueError(f"int4 values must lie in [-8, 7] (signed) or [0, 15] (unsigned), got [{v.min()}, {v.max()}]")
    nib = (v & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, np.uint8)])
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, shape, signed: bool = True) -> np.ndarray:
    """Inverse of `pack_int4`: int8 values of `shape` ([-8, 7] if signed else [0, 15])."""
    b = np.asarray(packed, dtype=np.uint8).reshape(-1)
    nib = np.empty(b.size * 2, np.int16)
    nib[0::2] = b & 0xF
    nib[1::2] = b >> 4
    size = int(np.prod(shape)) if len(shape) else 1
    if nib.size < size:
        raise ValueError(f"{b.size} packed bytes hold {nib.size} int4 values, need {size}")
    nib = nib[:size]
    if signed:
        nib = np.where(nib >= 8, nib - 16, nib)
    return nib.astype(np.int8).reshape(shape)


# ------------------------------------------------------------------ engine layout (torch, traceable)

def is_planar(k: int, group_size: int) -> bool:
    """Whether the engine words of a [K, N] weight with this group size use the planar K order."""
    return k % PLANAR_BLOCK == 0 and group_size % PLANAR_BLOCK == 0


def planar_order(k: int, device=None) -> torch.Tensor:
    """int64 [K]: the K index that position `8 i + j` (word row i, nibble j) of the planar layout holds."""
    pos = torch.arange(k, dtype=torch.int64, device=device)
    i, j = pos // PACK, pos % PACK
    return (i // 8) * PLANAR_BLOCK + 16 * (j % 4) + 2 * (i % 8) + j // 4


def columns_in_words_order(x2d: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] with its columns in the K order of the engine words (`planar_order` when `is_planar`, else x
    itself): what kernels that read the words' K sequentially multiply them by. FP8 x is gathered as bytes (not every
    index kernel takes FP8)."""
    if not is_planar(x2d.shape[1], group_size):
        return x2d
    order = planar_order(x2d.shape[1], x2d.device)
    if x2d.dtype == torch.float8_e4m3fn:
        return x2d.view(torch.uint8)[:, order].view(x2d.dtype)
    return x2d[:, order]


def to_engine(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """int4 values `q[K, N]` (any int dtype, signed [-8, 7]) -> engine words int32 [K/8, N], in the planar K
    order when `is_planar(K, group_size)`.

    Plain torch ops, traceable (used by the lowering converter)."""
    if q.dim() != 2 or q.shape[0] % PACK:
        raise ValueError(f"int4 weight must be [K, N] with K a multiple of {PACK}, got {tuple(q.shape)}")
    if is_planar(q.shape[0], group_size):
        q = q[planar_order(q.shape[0], q.device)]
    return pack_sequential(q)


def pack_sequential(q: torch.Tensor) -> torch.Tensor:
    """int4 values `q[K, N]` -> int32 words [K/8, N] in the sequential K order (word i: rows 8 i .. 8 i + 7)."""
    k, n = q.shape
    nib = (q.to(torch.int64) & 0xF).reshape(k // PACK, PACK, n)
    shifts = torch.arange(0, 4 * PACK, 4, dtype=torch.int64, device=q.device).reshape(1, PACK, 1)
    words = (nib << shifts).sum(dim=1)  # disjoint bits: sum == or; uint32 value in int64
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def from_engine(words: torch.Tensor, group_size: int) -> torch.Tensor:
    """Engine words int32 [K/8, N] of a weight with this group size -> signed int4 values int8 [K, N]."""
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"engine int4 weight must be int32 [K/8, N], got {words.dtype} {tuple(words.shape)}")
    kw, n = words.shape
    shifts = torch.arange(0, 4 * PACK, 4, dtype=torch.int32, device=words.device).reshape(1, PACK, 1)
    nib = (words.unsqueeze(1) >> shifts) & 0xF
    q = torch.where(nib >= 8, nib - 16, nib).reshape(kw * PACK, n).to(torch.int8)
    if not is_planar(kw * PACK, group_size):
        return q
    out = torch.empty_like(q)
    out[planar_order(kw * PACK, q.device)] = q
    return out


def onnx_to_engine(q: torch.Tensor, zero: torch.Tensor | None, signed: bool, group_size: int):
    """ONNX int4 values (as the lowering holds them: int8/uint8 value tensors [K, N], [K/g, N])
    -> (engine words int32 [K/8, N], engine zero points int8 [K/g, N] or None).

    Unsigned: weights and zero points are shifted by -8 (a UINT4 weight without zero point gets -8)."""
    if signed:
        return to_engine(q, group_size), (None if zero is None else zero.to(torch.int8))
    qs = q.to(torch.int16) - UINT4_OFFSET
    if zero is None:
        raise ValueError("onnx_to_engine: unsigned weights need the zero point tensor (pass zeros if absent)")
    return to_engine(qs, group_size), (zero.to(torch.int16) - UINT4_OFFSET).to(torch.int8)


def onnx_bytes_to_engine(packed: np.ndarray, k: int, n: int, group_size: int, signed: bool = True) -> torch.Tensor:
    """ONNX-layout bytes of `W[K, N]` -> engine words (unsigned values shifted by -8, see module doc)."""
    q = unpack_int4(packed, (k, n), signed).astype(np.int16)
    if not signed:
        q = q - UINT4_OFFSET
    return to_engine(torch.from_numpy(q), group_size)
