"""Inductor heuristics changed for an A/B of an engine's non-GEMM kernels (`bench_engines.py` variants,
`diag/engine_kernels.py --inductor persistent=N`). Experiments, not part of the product.

`persistent_reductions_up_to(n)`: row reductions (RMSNorm, LayerNorm, softmax over a static length) of up to n
elements become persistent: one program loads its whole row once, instead of looping over it twice (once to reduce,
once to normalize) as Inductor does above 1024 elements. At a decode step (one row per norm) a looped reduction is
one program waiting on its loads in turn: about 4 µs per RMSNorm of 4096 on the H200 (BENCHMARKS.md, decode profile).
"""
from __future__ import annotations

from torch._inductor import config
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.virtualized import V


class PersistentUpTo(InductorChoices):
    """Inductor's choices, with inner reductions of a static length up to `n` made persistent."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def should_use_persistent_reduction(self, features, cooperative_reduction) -> bool:
        if (config.triton.persistent_reductions and not cooperative_reduction
                and features.get_reduction_hint() == ReductionHint.INNER
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, self.n)):
            return True
        return super().should_use_persistent_reduction(features, cooperative_reduction)


def persistent_reductions_up_to(n: int):
    """A context in which Inductor compiles with `PersistentUpTo(n)`."""
    return V.set_choices_handler(PersistentUpTo(n))
