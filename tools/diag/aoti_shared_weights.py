"""Can one AOTInductor package hold a dynamic-row model and a one-row (decode) model that share one copy of the
weights? The question behind an engine that decodes without `torch.cond` (BENCHMARKS.md, thirty-eighth session).

Two Linear layers are exported twice, with a dynamic row count and with one row. Each export is compiled with its
constants kept out of the .so (`aot_inductor.package_constants_in_so=False`, pickled weights). Both go into one
.pt2 (`package_aoti`). The script then checks four things:
1. how many weight files the package holds, against the tensors of one model;
2. that both models match the eager module after `load_constants(..., user_managed=True)` hands both the same
   tensors (a model run before its constants are loaded crashed with torch 2.14.1 on the CPU);
3. that an in-place change to those tensors reaches both models, so both use one copy;
4. the package's size.

    python3 tools/diag/aoti_shared_weights.py [--device cuda]

Not part of the product. On the GPU image, run it with LD_PRELOAD (see README).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import zipfile

import torch
from torch._inductor.package import load_package, package_aoti


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(256, 512)
        self.down = torch.nn.Linear(512, 128)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def compile_files(module, x, dynamic: bool):
    """AOTInductor's files for `module` on x (rows dynamic or fixed), its weights kept out of the .so."""
    shapes = ({0: torch.export.Dim("rows", min=1, max=4096)},) if dynamic else None
    ep = torch.export.export(module, (x,), dynamic_shapes=shapes)
    options = {"aot_inductor.package": True, "aot_inductor.package_constants_in_so": False,
               "aot_inductor.package_constants_on_disk_format": "pickle_weights"}
    return torch._inductor.aot_compile(ep.module(), (x,), options=options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    device = parser.parse_args().device
    torch.manual_seed(0)
    module = TwoLayers().to(device).eval()
    x1, x5 = torch.randn(1, 256, device=device), torch.randn(5, 256, device=device)
    path = os.path.join(tempfile.mkdtemp(), "two_models.pt2")
    package_aoti(path, {"dynamic": compile_files(module, x5, True), "decode": compile_files(module, x1, False)})
    with zipfile.ZipFile(path) as archive:
        weight_files = [n for n in archive.namelist() if "/data/weights/" in n]
    print(f"1. weight files in the package: {len(weight_files)} (one model has {len(module.state_dict())} tensors)")

    shared = module.state_dict()
    runners = {name: load_package(path, name) for name in ("dynamic", "decode")}
    for runner in runners.values():
        runner.load_constants({k: shared[k] for k in runner.get_constant_fqns()}, check_full_update=True,
                              user_managed=True)

    def agree() -> dict:
        with torch.no_grad():
            return {name: torch.allclose(runner(x), module(x), atol=1e-5)
                    for (name, runner), x in zip(runners.items(), (x5, x1))}

    print(f"2. both models match the module: {agree()}")
    with torch.no_grad():
        module.up.weight.mul_(2.0)
    print(f"3. after an in-place change to the shared tensors, still matching: {agree()}")
    weight_bytes = sum(t.numel() * t.element_size() for t in shared.values())
    print(f"4. package {os.path.getsize(path)} bytes; the weights are {weight_bytes} bytes")


if __name__ == "__main__":
    main()
