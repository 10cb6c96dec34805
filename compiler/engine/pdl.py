"""Programmatic dependent launch (PDL) for an engine's Triton kernels (Hopper and later; opt-in, `launches()`).

A decode step is a chain of short kernels. Each one waits for the previous one to finish before the GPU even
starts launching it. With PDL a kernel may be launched while the one before it still runs. It must then execute
`griddepcontrol.wait` before it touches anything that kernel writes or reads.

Inductor writes that wait into its own kernels when `triton.enable_pdl` is on. Inductor's Python launcher then sets
the launch attribute, but AOTInductor's C++ launcher (`launchKernel` in the package's generated source) ignores it and
launches every kernel plainly. Inside `launches()`:
- Inductor writes the waits (`triton.enable_pdl`);
- every compiled kernel whose PTX has a `griddepcontrol.wait` is noted by its name as it is compiled;
- each noted kernel's launch code registers that name with the package's C++ launcher, which launches registered
  kernels with `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION` (`cuLaunchKernelEx`) and all others as before.

A kernel without the wait (our plugins' Triton kernels, Inductor's templates) keeps the plain launch, so it still
starts only after everything before it has finished. cuBLAS and cuDNN launch their own kernels. Every kernel that
takes the PDL launch waits, and Inductor lets the next kernel launch only after its own wait, so a kernel that
starts early can overlap only the one kernel before it. An engine is compiled for one GPU, and this is only used
where that GPU has compute capability 9.0 or more. `launches()` patches Inductor's classes while it is open: one
build at a time per process.
"""
from __future__ import annotations

import contextlib
import re

from qcompile.errors import EngineError

WAIT_PTX = "griddepcontrol.wait"

# The C++ launcher's additions: a registry of kernel names whose launch may overlap the previous kernel, filled by
# static initializers next to each registered kernel's launch code, and the CUfunctions loaded under those names.
_REGISTRY_CPP = r"""
#include <mutex>
#include <string>
#include <unordered_set>
static inline std::mutex& qcPdlMutex() {
    static std::mutex mutex;
    return mutex;
}
static inline std::unordered_set<std::string>& qcPdlNames() {
    static std::unordered_set<std::string> names;
    return names;
}
static inline std::unordered_set<CUfunction>& qcPdlFunctions() {
    static std::unordered_set<CUfunction> functions;
    return functions;
}
static inline bool qcPdlName(const char* name) {
    std::lock_guard<std::mutex> lock(qcPdlMutex());
    qcPdlNames().insert(name);
    return true;
}
static inline void qcPdlNote(CUfunction func, const std::string& name) {
    std::lock_guard<std::mutex> lock(qcPdlMutex());
    if (qcPdlNames().count(name)) qcPdlFunctions().insert(func);
}
static inline bool qcPdlLaunch(CUfunction func) {
    std::lock_guard<std::mutex> lock(qcPdlMutex());
    return qcPdlFunctions().count(func) > 0;
}
"""

_LAUNCH_CPP = r"""
static inline void launchKernel(
        CUfunction func,
        uint32_t gridX,
        uint32_t gridY,
        uint32_t gridZ,
        uint32_t numWarps,
        uint32_t sharedMemBytes,
        void* args[],
        cudaStream_t stream) {
    if (!qcPdlLaunch(func)) {
        qcLaunchKernelPlain(func, gridX, gridY, gridZ, numWarps, sharedMemBytes, args, stream);
        return;
    }
    CUlaunchAttribute attribute;
    attribute.id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attribute.value.programmaticStreamSerializationAllowed = 1;
    CUlaunchConfig launch = {};
    launch.gridDimX = gridX;
    launch.gridDimY = gridY;
    launch.gridDimZ = gridZ;
    launch.blockDimX = 32 * numWarps;
    launch.blockDimY = 1;
    launch.blockDimZ = 1;
    launch.sharedMemBytes = sharedMemBytes;
    launch.hStream = stream;
    launch.attrs = &attribute;
    launch.numAttrs = 1;
    CUDA_DRIVER_CHECK(cuLaunchKernelEx(&launch, func, args, nullptr));
}
"""

_GET_FUNCTION = "CUDA_DRIVER_CHECK(cuModuleGetFunction(&func, mod, funcName.c_str()));"
_LAUNCH_SIGNATURE = re.compile(
    r"static inline void launchKernel\(\s*CUfunction func,\s*uint32_t gridX,\s*uint32_t gridY,\s*uint32_t gridZ,"
    r"\s*uint32_t numWarps,\s*uint32_t sharedMemBytes,\s*void\* args\[\],\s*cudaStream_t stream\)")


def check_device(device) -> None:
    """Raise EngineError unless `device` (a torch.device) is a CUDA GPU of compute capability 9.0 or more."""
    import torch

    if device.type != "cuda":
        where = "the CPU"
    else:
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 9:
            return
        where = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
    raise EngineError(f"--pdl (programmatic dependent launch) needs a CUDA engine on a GPU of compute capability "
                      f"9.0 or more; this build is for {where}: build without --pdl")


def pdl_kernel_driver(driver: str) -> str:
    """AOTInductor's CUDA kernel driver source (`loadKernel`, `launchKernel`) with the PDL registry added.

    Raises:
        EngineError: the driver is not the one this was written against (a torch whose launcher changed).
    """
    launchers = _LAUNCH_SIGNATURE.findall(driver)
    if len(launchers) != 1 or _GET_FUNCTION not in driver:
        raise EngineError("--pdl: this torch's AOTInductor kernel launcher is not the one qcompile knows; "
                          "build without --pdl")
    driver = driver.replace(_GET_FUNCTION, _GET_FUNCTION + "\n    qcPdlNote(func, funcName);")
    driver = _LAUNCH_SIGNATURE.sub(lambda m: m.group(0).replace("launchKernel", "qcLaunchKernelPlain"), driver)
    return _REGISTRY_CPP + driver + _LAUNCH_CPP


def registration_line(wrapper_name: str, kernel_name: str) -> str:
    """The generated C++ line that registers `kernel_name` (a Triton kernel's name) for PDL launches."""
    return f'static const bool {wrapper_name}_pdl = qcPdlName("{kernel_name}");'


@contextlib.contextmanager
def launches():
    """A context in which AOTInductor packages launch their waiting Triton kernels with PDL (see the module)."""
    import torch._inductor.config as inductor_config
    from torch._inductor.codecache import CudaKernelParamCache
    from torch._inductor.codegen import common
    from torch._inductor.codegen.cpp_wrapper_gpu import DeferredTritonCallWrapper

    if not hasattr(inductor_config.triton, "enable_pdl"):
        raise EngineError("--pdl needs a torch whose Inductor has the option triton.enable_pdl; build without --pdl")
    waiting: set[str] = set()
    base = common.get_device_op_overrides("cuda")
    pdl_driver = pdl_kernel_driver(base.kernel_driver())
    overrides = type("PdlDeviceOpOverrides", (type(base),), {"kernel_driver": lambda self: pdl_driver})()
    original_set = CudaKernelParamCache.__dict__["set"]
    original_generate = DeferredTritonCallWrapper.generate

    def note_set(cls, key, params, *args, **kwargs):
        asm = kwargs.get("asm", args[2] if len(args) > 2 else None)
        if asm and WAIT_PTX in asm:
            waiting.add(params["mangled_name"])
        return original_set.__func__(cls, key, params, *args, **kwargs)

    def generate(self, wrapper):
        original_generate(self, wrapper)
        name = CudaKernelParamCache.get(self.kernel_name)["mangled_name"]
        if name in waiting:
            wrapper.prefix.writeline(registration_line(self.wrapper_name, name))

    common.register_device_op_overrides("cuda", overrides)
    CudaKernelParamCache.set = classmethod(note_set)
    DeferredTritonCallWrapper.generate = generate
    try:
        with inductor_config.patch({"triton.enable_pdl": True}):
            yield waiting
    finally:
        common.register_device_op_overrides("cuda", base)
        CudaKernelParamCache.set = original_set
        DeferredTritonCallWrapper.generate = original_generate
