"""Does an AOTInductor package with F.scaled_mm block-wise scaling run (sm90)? With and without contraction_dim."""
import sys, torch
from torch.nn.functional import ScalingType, SwizzleType, scaled_mm

class M(torch.nn.Module):
    def __init__(self, cdim):
        super().__init__(); self.cdim = cdim
    def forward(self, xq, w, sx, sw):
        return scaled_mm(xq, w.t(), sx, ScalingType.BlockWise1x128, sw, ScalingType.BlockWise128x128,
                         swizzle_a=SwizzleType.NO_SWIZZLE, swizzle_b=SwizzleType.NO_SWIZZLE,
                         output_dtype=torch.bfloat16, contraction_dim=self.cdim)

m, k, n = 16, 256, 256
xq = torch.randn(m, k, device="cuda").to(torch.float8_e4m3fn); w = torch.randn(n, k, device="cuda").to(torch.float8_e4m3fn)
sx = torch.rand(k // 128, m, device="cuda").t(); sw = torch.rand(n // 128, 4, device="cuda").t()
ref = (xq.float() * sx.repeat_interleave(128, 1)) @ (w.float() * sw[:2].t().repeat_interleave(128, 0).repeat_interleave(128, 1)).t()
for cdim in sys.argv[1:]:
    c = tuple(int(v) for v in cdim.split(",")) if cdim != "none" else ()
    try:
        ep = torch.export.export(M(c), (xq, w, sx, sw))
        run = torch._inductor.aoti_load_package(torch._inductor.aoti_compile_and_package(ep))
        y = run(xq, w, sx, sw)
        print(cdim, "OK rel err", ((y.float() - ref).norm() / ref.norm()).item(), flush=True)
    except Exception as exc:
        print(cdim, "FAILED", type(exc).__name__, str(exc).splitlines()[0][:200], flush=True)
