"""Which hypothesis holds for torch's CUDA add(x, y, alpha=a): one fma (what sgd_math.h assumes,
MC_CUDA_ADD_IS_FMA=1) or mul-then-add? And is alpha kept in fp32 for bf16/fp16 (unlike torch's
CPU path)? Prints mismatch counts against each candidate; run on a GPU (make gpu-check)."""
import torch

assert torch.cuda.is_available(), "needs a GPU"
n = 1 << 20
g = torch.Generator().manual_seed(0)
x, y = torch.randn(n, generator=g), torch.randn(n, generator=g)
a = 0.1
out = x.cuda().add(y.cuda(), alpha=a).cpu()
a32 = torch.tensor(a, dtype=torch.float32)
# fp32 x fp32 is exact in fp64; rounding the fp64 sum to fp32 can double-round in rare ties,
# so the fma candidate may show a handful of false mismatches, the mul-add one thousands.
fma = (y.double() * a32.double() + x.double()).float()
muladd = x + y * a32
print(f"fp32 add_: mismatches vs fma {int((out != fma).sum())}, "
      f"vs mul-then-add {int((out != muladd).sum())} (of {n})")
for dt in (torch.bfloat16, torch.float16):
    xs, ys = x.to(dt), y.to(dt)
    o = xs.cuda().add(ys.cuda(), alpha=a).cpu()
    keep = (ys.double() * a32.double() + xs.double()).float().to(dt)
    narrow_a = torch.tensor(a, dtype=dt).double()
    narrow = (ys.double() * narrow_a + xs.double()).float().to(dt)
    print(f"{dt} add_: mismatches vs fp32 alpha {int((o != keep).sum())}, "
          f"vs alpha narrowed to {dt} {int((o != narrow).sum())} (of {n})")
