"""Does the W8A16 op export with a dynamic M and lower in AOTInductor, with and without its M = 1 GEMV bucket
(N = 512: GEMV; N = 508: no GEMV, N % 4 != 0)? Prints OK / FAILED per variant."""
import torch

from qcompile.plugins.int8_wo_gemm import register

op = register()
for n in (512, 508):
    w_q = torch.randint(-127, 128, (1024, n), dtype=torch.int8, device="cuda")
    w_scale = torch.rand(n, device="cuda") * 0.01
    b = torch.randn(n, device="cuda")

    class Layer(torch.nn.Module):
        def forward(self, x):
            return op(x, w_q, w_scale, b)

    try:
        x = torch.randn(4, 1024, device="cuda", dtype=torch.bfloat16)
        ep = torch.export.export(Layer(), (x,), dynamic_shapes={"x": {0: torch.export.Dim("m", min=1, max=4096)}})
        run = torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(ep))
        for m in (1, 17, 600):
            x = torch.randn(m, 1024, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ (w_q.float() * w_scale) + b
            err = ((run(x).float() - ref).norm() / ref.norm()).item()
            print(f"N={n} M={m} OK rel err {err:.2e}", flush=True)
    except Exception as exc:
        print(f"N={n} FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:300]}", flush=True)
