"""What this machine is (device kind, name, compute capability, CPU ISA), as the manifest records it."""
from __future__ import annotations

import platform

import torch


def parse_device(device: str | torch.device) -> torch.device:
    """`"cpu"`, `"cuda"`, `"cuda:1"` -> torch.device (only cpu and cuda engines exist)."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        from qcompile.errors import EngineError

        raise EngineError(f"engine device must be 'cpu' or 'cuda[:index]', got {str(device)!r}")
    return dev


def cpu_isa() -> str:
    """The best vector ISA torch uses here (e.g. "AVX512"), with the machine ("x86_64")."""
    try:
        isa = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch
        isa = "unknown"
    return f"{platform.machine()} {isa}"


def describe(device: str | torch.device) -> dict:
    """Manifest fields describing `device` on this machine."""
    dev = parse_device(device)
    info = {"device": dev.type, "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
            "cpu_isa": cpu_isa(), "compute_capability": None, "device_name": platform.processor() or platform.machine()}
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        info["compute_capability"] = f"{major}.{minor}"
        info["device_name"] = torch.cuda.get_device_name(dev)
    return info


def torch_major_minor(version: str) -> str:
    """"2.11.0+cu130" -> "2.11"."""
    return ".".join(version.split("+")[0].split(".")[:2])
