"""Launch plumbing shared by the GEMM plugins' GPU paths (INT4, FP4, W8A16, FP8 block): the split-K launch
configuration of the weight-streaming small-M kernels, the run-time choice of a path by the row count M, scalar
arguments and the bias epilogue.

Plain Python and torch (no Triton), so it imports anywhere.
"""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import is_fake

DEFAULT_SMS = 132  # the H100 / H200 SXM's SMs: the launches' default (the ops pass the device's count)
SMALL_M_MAX = 16  # rows up to which the split-K weight-streaming kernel runs; dequantize + cuBLAS above


def cdiv(a, b):
    return (a + b - 1) // b


def identity(kernel):
    """The `wrap` of raw Triton launches (the ops pass `torch.library.wrap_triton`)."""
    return kernel


def scalar_buffer(t: torch.Tensor) -> torch.Tensor:
    """A 1-element tensor (a scale) as a [1] tensor that a kernel can take as an argument.

    Inductor inlines 0-d graph constants as scalars (`ir.Constant`), which neither an extern kernel nor a Triton
    launch can take as a tensor argument (a Triton launch fails with "'<=' not supported between instances of
    'Constant' and 'int'"); while tracing, a copy turns the scalar into a real buffer. Eager calls stay copy-free
    (a view).
    """
    t = t.reshape(1)
    return t.clone() if is_fake(t) else t


def traced(t: torch.Tensor) -> bool:
    """Whether t is being traced (torch.compile, torch.export, an engine build) rather than computed. (Under Dynamo,
    which traces `torch.cond`'s branches, `is_fake` itself cannot be traced, so `is_compiling` is asked first.)"""
    return torch.compiler.is_compiling() or is_fake(t)


def address_aligned(t: torch.Tensor, nbytes: int) -> bool:
    """Whether t's data starts on an `nbytes` boundary, for a kernel's wide loads. A traced tensor has no address yet
    and counts as aligned: engines allocate their weights whole."""
    return traced(t) or t.data_ptr() % nbytes == 0


def optional_arg(t, stand_in):
    """A kernel's pointer argument for an optional tensor: `t`, or `stand_in` when t is None (never read: the
    kernel's HAS_* flag is off)."""
    return stand_in if t is None else t


def split_k_config(k: int, n: int, block_k: int, max_block_n: int, num_sms: int) -> dict:
    """Static launch configuration of a split-K kernel for a K x N weight (does not depend on M): N tiles
    of up to `max_block_n` columns, K split until there are about 4 programs per SM (at most 32 splits)."""
    block_n = max_block_n if n >= max_block_n else max(16, 1 << max(n - 1, 0).bit_length())
    n_tiles = cdiv(n, block_n)
    k_steps = cdiv(k, block_k)
    split = 1
    while split * 2 <= k_steps and n_tiles * split * 2 <= 4 * num_sms and split < 32:
        split *= 2
    k_per_split = cdiv(k_steps, split) * block_k
    return {"BLOCK_N": block_n, "split_k": cdiv(k, k_per_split), "k_per_split": k_per_split, "n_tiles": n_tiles}


def split_for_waves(k: int, tiles: int, block_k: int, waves: float, num_sms: int,
                    resident: int = 0) -> tuple[int, int]:
    """(number of K splits, K per split): enough programs for `waves` waves of SMs, each split at
    least 2 steps long (waves = 0: no split).

    `resident` (programs that fit on one SM at once, from the kernel's registers; 0: unknown): when the
    programs overflow one resident wave, K is split once more if that shortens the run counted in whole
    waves of full-length programs (`ceil(programs / slots) / split`). E.g. 448 tiles on 3 x 132 slots run as
    2 waves of full-K programs; split in two, 896 programs run as 3 waves of half length (1.5)."""
    steps = cdiv(k, block_k)
    split = 1
    while waves and tiles * split * 2 <= waves * num_sms and split * 4 <= steps:
        split *= 2
    slots = resident * num_sms
    programs = tiles * split
    if slots and programs > slots and split * 4 <= steps and cdiv(2 * programs, slots) < 2 * cdiv(programs, slots):
        split *= 2
    per = cdiv(steps, split) * block_k
    return cdiv(k, per), per


def split_k_outputs(m, n: int, splits: int, counts, out_dtype, device, finish: bool):
    """(y, out) for a split-K kernel's launch. `finish` (the kernel writes out [M, N] in out_dtype itself,
    `triton_tiles.finish_split_tile`): y is the zeroed fp32 accumulator [M * N] followed by `counts` tile counts
    when K is split, else an unused empty buffer. Otherwise out is None and y the result: zeroed fp32 [M, N] when K
    is split (partial sums meet in atomics), else [M, N] in out_dtype."""
    if finish:
        y = torch.zeros(m * n + counts if splits > 1 else 0, dtype=torch.float32, device=device)
        return y, torch.empty((m, n), dtype=out_dtype, device=device)
    if splits > 1:
        return torch.zeros((m, n), dtype=torch.float32, device=device), None
    return torch.empty((m, n), dtype=out_dtype, device=device), None


def whole_tiles(n: int, block_n: int, splits: int, k_per_split: int, k: int) -> bool:
    """Whether a kernel's tiles lie inside the weight: N in whole BLOCK_N tiles and the K splits covering exactly
    K (the `EVEN` specialization: its loads carry no N or K masks)."""
    return n % block_n == 0 and splits * k_per_split == k


def from_rows(buckets: list, m_min: int, value) -> list:
    """`buckets` (`(limit, value)`, the last limit None) with every M >= m_min taken by `value`."""
    head = []
    for limit, v in buckets:
        if limit is None or limit >= m_min - 1:
            head.append((m_min - 1, v))
            break
        head.append((limit, v))
    return head + [(None, value)]


def bucket_for(buckets: list, m: int):
    """The value of the first `(limit, value)` of `buckets` with m <= limit (limit None: any m)."""
    return next(value for limit, value in buckets if limit is None or m <= limit)


def run_by_buckets(x, k: int, n: int, buckets: list, weights: tuple) -> torch.Tensor:
    """The first bucket `(limit, fn)` with M <= limit (limit None: any M) run on x as contiguous rows [M, k],
    reshaped back to [..., n].

    Each `fn` takes `(x2d, *weights)` (weights: tensors only; absent optionals left out by the caller). A
    concrete M is a Python branch; a symbolic M (torch.export, AOTInductor with a dynamic row count) is a
    chain of `torch.cond(M <= limit, ...)`, so every bucket is compiled and chosen at run time (no guard on M)."""
    lead = x.shape[:-1]
    x2d = rows(x, k)
    m = x2d.shape[0]
    operands = (x2d, *weights)
    if isinstance(m, int):
        y = bucket_for(buckets, m)(*operands)
    else:
        y = _cond_chain(m, buckets, operands)
    return y.reshape(*lead, n)


def rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., k] as contiguous rows [M, k] whose row stride is the plain k (a copy only where x's last dim is not
    contiguous).

    A reshape would do, but with two dynamic dims (batch and a sequence that may be 1) torch gives the merged
    rows the symbolic stride `Min(k, k * seq)`, and AOTInductor writes a TMA descriptor's strides into its C++
    wrapper as those expressions, verbatim (torch 2.11-2.14), where `Min` is not C++: the INT4 engine of
    llama3-8b-layers failed to compile ("'Min' was not declared", benchmarks/cli-build-llama3-min-stride_s31.log).
    On a contiguous x, `as_strided` states the stride it has."""
    if x.is_contiguous():
        return x.as_strided((x.numel() // k, k), (k, 1))
    x2d = x.reshape(-1, k)
    return x2d if x2d.stride(1) == 1 else x2d.contiguous()


def _cond_chain(m, buckets, operands):
    (limit, fn), rest = buckets[0], buckets[1:]
    if limit is None or not rest:
        return fn(*operands)
    return torch.cond(m <= limit, fn, lambda *ops: _cond_chain(m, rest, ops), operands)


def add_bias(y: torch.Tensor, bias, dtype) -> torch.Tensor:
    """`y + bias` as the float32 sum rounded once to `dtype` (bias None: y cast). When y and bias already are
    `dtype` this is one add of that dtype: torch adds 16-bit floats in float32 and rounds once, so the values
    are the same, in one kernel instead of three in eager calls (Inductor fuses either form). Otherwise a 16-bit
    bias is widened inside the float32 add (type promotion, exact), not by a cast kernel of its own: two eager
    kernels on a float32 accumulator (the split-K ops at one row), not three."""
    if bias is None:
        return y.to(dtype)
    if y.dtype == dtype and bias.dtype == dtype:
        return y + bias
    if bias.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        bias = bias.to(torch.float32)  # e.g. float64: promotion would add in float64
    return (y.to(torch.float32) + bias).to(dtype)


def linear_bias(x2d: torch.Tensor, w_kn: torch.Tensor, bias, dtype) -> torch.Tensor:
    """`x2d @ w_kn + bias` in `dtype` for the dequantize + cuBLAS paths, the bias added in the GEMM's epilogue
    (`torch.addmm`: cuBLASLt's float32 sum, rounded once; w_kn may be a transposed view). The bias is first
    rounded to x's dtype, as a Linear layer of that dtype holds it. A separate bias kernel re-reads and rewrites
    the whole output: in eager calls at M >= 1024 that is a few % of the op (bias None: the matmul alone)."""
    if bias is None:
        return (x2d @ w_kn).to(dtype)
    return torch.addmm(bias.to(x2d.dtype), x2d, w_kn).to(dtype)


def unpack_optional(rest, *present: bool) -> list:
    """The optional tensors a bucket function received after its required ones, None where absent."""
    rest = list(rest)
    return [rest.pop(0) if p else None for p in present]
