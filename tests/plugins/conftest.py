"""Fixtures of the plugin tests."""
import pytest
import torch


@pytest.fixture(autouse=True)
def fresh_dynamo_for_gpu_tests(request):
    """Each `gpu` test starts from a fresh torch._dynamo state, as an engine build does (compiler/engine/build.py).
    An export earlier in the same process can leave state that makes a later export of a `torch.cond` carry Python
    ints among its operands, which AOTInductor's lowering rejects (the H200 runs of benchmarks/gpu-tests-s16* and
    gpu-tests-s18.log: whichever plugin's package test ran second failed)."""
    if request.node.get_closest_marker("gpu"):
        torch._dynamo.reset()
    yield
