"""Programmatic dependent launch (PDL) for an engine's Triton kernels (Hopper and later; opt-in, `launches()`).

A decode step is a chain of short kernels. Each one waits for the previous one to finish before the GPU even
starts launching it. With PDL a kernel may be launched while the one before it still runs. It must then execute
`griddepcontrol.wait` before it touches anything that kernel writes or reads.

Inductor writes that wait into its own kernels when `triton.enable_pdl` is on. Inductor's Python launcher then sets
the launch attribute, but AOTInductor's C++ launcher (`launchKernel` in the package's generated source) ignores it and
launches every kernel plainly. Inside `launches()`:
- Inductor writes the waits (`triton.enable_pdl`);
- every compiled kernel whose PTX has a `griddepcontrol.wait` is noted by its name as it is compiled;
- each noted kernel's generated launch line calls `qcLaunchKernelPdl`, a launcher added to the package's C++ kernel
  driver that sets `CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION` (`cuLaunchKernelEx`); every other kernel
  keeps AOTInductor's `launchKernel`. The choice is made in the generated source, so a launch costs no look-up.

A kernel without the wait (our plugins' Triton kernels, Inductor's templates) keeps the plain launch, so it still
starts only after everything before it has finished. cuBLAS and cuDNN launch their own kernels. Every kernel that
takes the PDL launch waits, and Inductor lets the next kernel launch only after its own wait, so a kernel that
starts early can overlap only the one kernel before it. An engine is compiled for one GPU, and this is only used
where that GPU has compute capability 9.0 or more. `launches()` patches Inductor's classes while it is open: one
build at a time per process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import re

from qcompile.errors import EngineError

WAIT_PTX = "griddepcontrol.wait"

LAUNCHER = "launchKernel"
PDL_LAUNCHER = "qcLaunchKernelPdl"

# The PDL launcher added to the package's C++ kernel driver, next to AOTInductor's own `launchKernel` (same arguments).
_PDL_LAUNCH_CPP = r"""
static inline void qcLaunchKernelPdl(
        CUfunction func,
        uint32_t gridX,
        uint32_t gridY,
        uint32_t gridZ,
        uint32_t numWarps,
        uint32_t sharedMemBytes,
        void* args[],
        cudaStream_t stream) {
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

_LAUNCH_SIGNATURE = re.compile(
    r"static inline void launchKernel\(\s*CUfunction func,\s*uint32_t gridX,\s*uint32_t gridY,\s*uint32_t gridZ,"
    r"\s*uint32_t numWarps,\s*uint32_t sharedMemBytes,\s*void\* args\[\],\s*cudaStream_t stream\)")
_UNKNOWN_LAUNCHER = ("--pdl: this torch's AOTInductor kernel launcher is not the one qcompile knows; "
                     "build without --pdl")


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
    """AOTInductor's CUDA kernel driver source (`loadKernel`, `launchKernel`) with the PDL launcher added after it.

    Raises:
        EngineError: the driver's launcher is not the one this was written against (a torch whose launcher changed).
    """
    if len(_LAUNCH_SIGNATURE.findall(driver)) != 1:
        raise EngineError(_UNKNOWN_LAUNCHER)
    return driver + _PDL_LAUNCH_CPP


class PdlLaunchLines:
    """A generated wrapper's source buffer, seen through which a kernel's `launchKernel(...)` line calls the PDL
    launcher instead; every other line and method passes through. `launches` counts the lines it changed."""

    def __init__(self, buffer):
        self._buffer = buffer
        self.launches = 0

    def writeline(self, line) -> None:
        if isinstance(line, str) and line.startswith(LAUNCHER + "("):
            line = PDL_LAUNCHER + line[len(LAUNCHER):]
            self.launches += 1
        self._buffer.writeline(line)

    def writelines(self, lines) -> None:
        for line in lines:
            self.writeline(line)

    def __getattr__(self, name):
        return getattr(self._buffer, name)


@dataclasses.dataclass
class PdlKernels:
    """What `launches()` saw: the compiled kernels (by name) that wait for the kernel before them, and those whose
    generated launch code calls the PDL launcher."""

    waiting: set[str] = dataclasses.field(default_factory=set)
    launched: set[str] = dataclasses.field(default_factory=set)


@contextlib.contextmanager
def launches():
    """A context in which AOTInductor packages launch their waiting Triton kernels with PDL (see the module); it
    yields the `PdlKernels` it found."""
    import torch._inductor.config as inductor_config
    from torch._inductor.codecache import CudaKernelParamCache
    from torch._inductor.codegen import common
    from torch._inductor.codegen.cpp_wrapper_gpu import DeferredTritonCallWrapper

    if not hasattr(inductor_config.triton, "enable_pdl"):
        raise EngineError("--pdl needs a torch whose Inductor has the option triton.enable_pdl; build without --pdl")
    kernels = PdlKernels()
    base = common.get_device_op_overrides("cuda")
    pdl_driver = pdl_kernel_driver(base.kernel_driver())
    overrides = type("PdlDeviceOpOverrides", (type(base),), {"kernel_driver": lambda self: pdl_driver})()
    original_set = CudaKernelParamCache.__dict__["set"]
    original_launch = DeferredTritonCallWrapper.generate_launch_kernel

    def note_set(cls, key, params, *args, **kwargs):
        asm = kwargs.get("asm", args[2] if len(args) > 2 else None)
        if asm and WAIT_PTX in asm:
            kernels.waiting.add(params["mangled_name"])
        return original_set.__func__(cls, key, params, *args, **kwargs)

    def generate_launch_kernel(self, prefix, wrapper, kernel_var_name, params):
        if params["mangled_name"] not in kernels.waiting:
            return original_launch(self, prefix, wrapper, kernel_var_name, params)
        lines = PdlLaunchLines(prefix)
        original_launch(self, lines, wrapper, kernel_var_name, params)
        if lines.launches != 1:
            raise EngineError(_UNKNOWN_LAUNCHER)
        kernels.launched.add(params["mangled_name"])

    common.register_device_op_overrides("cuda", overrides)
    CudaKernelParamCache.set = classmethod(note_set)
    DeferredTritonCallWrapper.generate_launch_kernel = generate_launch_kernel
    try:
        with inductor_config.patch({"triton.enable_pdl": True}):
            yield kernels
    finally:
        common.register_device_op_overrides("cuda", base)
        CudaKernelParamCache.set = original_set
        DeferredTritonCallWrapper.generate_launch_kernel = original_launch
