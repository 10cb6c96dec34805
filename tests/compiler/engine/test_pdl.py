"""Programmatic dependent launch for an engine's Inductor kernels (`engine/pdl.py`): the C++ launcher it writes,
the context's clean-up, and on a Hopper GPU an engine built with it that gives the same bits as one built without."""
from __future__ import annotations

import io
import shutil
import subprocess
import zipfile

import pytest
import torch

from qcompile.describe import describe
from qcompile.engine import GraphReplay, IOSpec, build_engine, load
from qcompile.engine import pdl
from qcompile.engine.manifest import PACKAGE_NAME
from qcompile.errors import EngineError


def _driver() -> str:
    from torch._inductor.codegen.common import get_device_op_overrides
    return get_device_op_overrides("cuda").kernel_driver()


# The CUDA driver API's declarations that AOTInductor's launcher and ours use, for a syntax check without CUDA.
_DRIVER_API_STUB = r"""
#include <cstdint>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <vector>
typedef int CUresult; enum { CUDA_SUCCESS = 0 };
typedef struct CUfunc_st* CUfunction; typedef struct CUmod_st* CUmodule; typedef struct CUstream_st* CUstream;
typedef CUstream cudaStream_t;
enum CUfunction_attribute { CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES };
enum CUlaunchAttributeID { CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 3 };
typedef union { int programmaticStreamSerializationAllowed; char pad[64]; } CUlaunchAttributeValue;
typedef struct { CUlaunchAttributeID id; char pad[4]; CUlaunchAttributeValue value; } CUlaunchAttribute;
typedef struct {
    unsigned gridDimX, gridDimY, gridDimZ, blockDimX, blockDimY, blockDimZ, sharedMemBytes;
    CUstream hStream; CUlaunchAttribute* attrs; unsigned numAttrs;
} CUlaunchConfig;
CUresult cuGetErrorString(CUresult, const char**);
CUresult cuModuleLoad(CUmodule*, const char*);
CUresult cuModuleLoadData(CUmodule*, const void*);
CUresult cuModuleGetFunction(CUfunction*, CUmodule, const char*);
CUresult cuFuncSetAttribute(CUfunction, CUfunction_attribute, int);
CUresult cuLaunchKernel(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, CUstream,
                        void**, void**);
CUresult cuLaunchKernelEx(const CUlaunchConfig*, CUfunction, void**, void**);
"""


def test_pdl_driver_adds_a_pdl_launcher_and_keeps_aotinductors():
    base = _driver()
    driver = pdl.pdl_kernel_driver(base)
    assert driver.startswith(base)
    added = driver[len(base):]
    assert added.count("static inline void qcLaunchKernelPdl(") == 1 and "launchKernel(" not in added.replace(
        "qcLaunchKernelPdl(", "")
    assert added.index("CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION") < added.index("cuLaunchKernelEx(")


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_pdl_driver_compiles_with_both_launches(tmp_path):
    """The driver with a generated wrapper's two kinds of launch line, as C++ (CUDA's declarations stubbed)."""
    calls = """
void qcCall(CUfunction plain, CUfunction waiting, cudaStream_t stream_) {
    void* kernel_args_[] = {nullptr};
    launchKernel(plain, 1, 1, 1, 4, 0, kernel_args_, stream_);
    qcLaunchKernelPdl(waiting, 1, 1, 1, 4, 0, kernel_args_, stream_);
}
"""
    source = tmp_path / "driver.cpp"
    source.write_text(_DRIVER_API_STUB + pdl.pdl_kernel_driver(_driver()) + calls)
    done = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_pdl_launch_lines_change_only_launch_lines():
    from torch._inductor.utils import IndentedBuffer

    buffer = IndentedBuffer()
    lines = pdl.PdlLaunchLines(buffer)
    lines.writeline("void* kernel_args_[] = {&var_0};")
    with lines.indent():
        lines.writelines(["// launchKernel(k) in a comment", "launchKernel(kernels_.k, grid_0, grid_1, grid_2, "
                          "4, 0, kernel_args_, stream_);"])
    assert lines.launches == 1
    assert buffer.getvalue().splitlines() == [
        "void* kernel_args_[] = {&var_0};", "    // launchKernel(k) in a comment",
        "    qcLaunchKernelPdl(kernels_.k, grid_0, grid_1, grid_2, 4, 0, kernel_args_, stream_);"]


def test_launches_sends_only_waiting_kernels_to_the_pdl_launcher(monkeypatch):
    """Inside `launches()`, a kernel noted as waiting gets the PDL launch line and any other the plain one; a
    generated launch without the expected launch line is refused."""
    from torch._inductor.codegen.cpp_wrapper_gpu import DeferredTritonCallWrapper
    from torch._inductor.utils import IndentedBuffer

    def fake_launch(self, prefix, wrapper, kernel_var_name, params):
        prefix.writeline("void* kernel_args_[] = {};")
        if params.get("launch", True):
            prefix.writeline(f"launchKernel({kernel_var_name}, grid_0, grid_1, grid_2, 4, 0, kernel_args_, stream_);")

    monkeypatch.setattr(DeferredTritonCallWrapper, "generate_launch_kernel", fake_launch)
    with pdl.launches() as kernels:
        kernels.waiting.add("waits")
        generated = {}
        for name in ("waits", "plain"):
            buffer = IndentedBuffer()
            DeferredTritonCallWrapper.generate_launch_kernel(None, buffer, None, f"kernels_.{name}",
                                                             {"mangled_name": name})
            generated[name] = buffer.getvalue().splitlines()[-1]
        with pytest.raises(EngineError, match="kernel launcher is not the one qcompile knows"):
            DeferredTritonCallWrapper.generate_launch_kernel(None, IndentedBuffer(), None, "kernels_.waits",
                                                             {"mangled_name": "waits", "launch": False})
    assert generated == {"waits": "qcLaunchKernelPdl(kernels_.waits, grid_0, grid_1, grid_2, 4, 0, kernel_args_, "
                                  "stream_);",
                         "plain": "launchKernel(kernels_.plain, grid_0, grid_1, grid_2, 4, 0, kernel_args_, stream_);"}
    assert kernels.launched == {"waits"}
    assert DeferredTritonCallWrapper.generate_launch_kernel is fake_launch


def test_pdl_driver_of_another_launcher_is_refused():
    with pytest.raises(EngineError, match="kernel launcher is not the one qcompile knows"):
        pdl.pdl_kernel_driver(_driver().replace("static inline void launchKernel(", "static void launch("))


def test_pdl_is_refused_below_compute_capability_9(monkeypatch):
    """A GPU older than Hopper is named with its compute capability; a Hopper one passes."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    with pytest.raises(EngineError, match=r"for Some GPU \(compute capability 8\.9\): build without --pdl"):
        pdl.check_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    pdl.check_device(torch.device("cuda"))


def test_launches_restores_inductor_on_exit_and_on_error():
    import torch._inductor.config as inductor_config
    from torch._inductor.codecache import CudaKernelParamCache
    from torch._inductor.codegen.cpp_wrapper_gpu import DeferredTritonCallWrapper

    before = (_driver(), CudaKernelParamCache.__dict__["set"], DeferredTritonCallWrapper.generate_launch_kernel,
              inductor_config.triton.enable_pdl)
    with pytest.raises(RuntimeError, match="inside"):
        with pdl.launches() as kernels:
            assert kernels == pdl.PdlKernels()
            assert inductor_config.triton.enable_pdl is True
            assert "qcLaunchKernelPdl(" in _driver()
            assert DeferredTritonCallWrapper.generate_launch_kernel is not before[2]
            raise RuntimeError("inside")
    after = (_driver(), CudaKernelParamCache.__dict__["set"], DeferredTritonCallWrapper.generate_launch_kernel,
             inductor_config.triton.enable_pdl)
    assert after == before


def test_inspect_names_the_pdl_launches(tmp_path):
    """`qcompile inspect` says how many kernels take the PDL launch; an engine that predates the count still says
    that it was built with --pdl, and one built without says nothing."""
    from qcompile.engine.build import write_engine_file
    from qcompile.engine.manifest import Manifest

    package = tmp_path / "package.pt2"
    package.write_bytes(b"")
    rows = []
    for extra in ({}, {"pdl": True}, {"pdl": True, "pdl_kernels": 7}):
        man = Manifest(qcompile_version="0", torch_version="0", cuda_version="13.0", device="cuda", device_name="GPU",
                       compute_capability="9.0", cpu_isa=None, inputs=[], outputs=[], extra=extra)
        path = tmp_path / f"engine{len(rows)}.engine"
        write_engine_file(path, man, package)
        rows.append(dict(describe(path)["header"]).get("kernel launches"))
    assert rows == [None, "Inductor's kernels with programmatic dependent launch (--pdl)",
                    "7 of Inductor's kernels with programmatic dependent launch (--pdl)"]


class _NormChain(torch.nn.Module):
    """Four RMSNorm -> Linear -> SiLU -> residual blocks: a chain of small dependent Inductor kernels around cuBLAS."""

    def __init__(self, width=256, blocks=4):
        super().__init__()
        torch.manual_seed(0)
        self.linears = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(blocks))

    def forward(self, x):
        for linear in self.linears:
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
            x = x + torch.nn.functional.silu(linear(h))
        return x


def _pdl_launches(engine_path) -> int:
    """How many kernel launches in the engine's generated source take the PDL launcher."""
    with zipfile.ZipFile(engine_path) as engine, zipfile.ZipFile(io.BytesIO(engine.read(PACKAGE_NAME))) as package:
        sources = [package.read(name).decode() for name in package.namelist() if name.endswith(".cpp")]
    assert sources, "the AOTInductor package holds no generated C++ source"
    return sum(source.count("qcLaunchKernelPdl(kernels_.") for source in sources)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a CUDA GPU of compute capability 9.0 or more")
def test_cuda_pdl_engine_gives_the_plain_engines_bits(tmp_path):
    """Built with and without PDL, the same program gives bit-identical outputs, run directly and replayed from a CUDA
    graph on fresh inputs (a kernel that read its input before the kernel writing it finished would not), and both
    match eager torch."""
    net = _NormChain().cuda().eval()
    inputs = [IOSpec("x", "float32", ["batch", 256], {"batch": (1, 64)})]
    outputs = [IOSpec("y", "float32", ["batch", 256])]
    example = (torch.randn(4, 256, device="cuda"),)
    plain, with_pdl = tmp_path / "plain.engine", tmp_path / "pdl.engine"
    mans = [build_engine(net, inputs=inputs, outputs=outputs, example_inputs=example, manifest={}, output_path=path,
                         device="cuda", pdl=path == with_pdl) for path in (plain, with_pdl)]
    assert [man.extra.get("pdl", False) for man in mans] == [False, True]
    launched = _pdl_launches(with_pdl)
    assert launched >= len(net.linears) and _pdl_launches(plain) == 0
    assert mans[1].extra["pdl_kernels"] == launched
    assert [dict(describe(path)["header"]).get("kernel launches", "") for path in (plain, with_pdl)] == [
        "", f"{launched} of Inductor's kernels with programmatic dependent launch (--pdl)"]
    engines = [load(path, run_single_threaded=True) for path in (plain, with_pdl)]
    for batch in (1, 37):
        x = torch.randn(batch, 256, device="cuda")
        got = [engine.run_torch({"x": x})["y"] for engine in engines]
        torch.testing.assert_close(got[1], got[0], rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(got[1], net(x), rtol=1e-4, atol=1e-4)
    x = torch.randn(1, 256, device="cuda")
    replays = [GraphReplay(engine, {"x": x}) for engine in engines]
    for seed in range(20):
        torch.manual_seed(seed)
        x = torch.randn(1, 256, device="cuda")
        got = [replay.run({"x": x})["y"].clone() for replay in replays]
        torch.testing.assert_close(got[1], got[0], rtol=0, atol=0)
