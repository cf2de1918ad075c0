"""How torch's CUDA add(x, y, alpha=a) rounds, for the hypotheses the CUDA kernel is built on
(csrc/include/momentum_cuda/sgd_math.h, MC_CUDA_ADD_IS_FMA):
  * fp32: one fma(y, a, x) (one rounding), not round(x + round(a * y));
  * bf16/fp16: alpha kept in fp32 (not narrowed to bf16/fp16 as torch's CPU path does), the
    result fma'd in fp32 and rounded once to the storage dtype.

    python3 tools/gpu_rounding_probe.py               # on the GPU
    python3 tools/gpu_rounding_probe.py --device cpu  # the same comparison on the CPU (dry run)

The fma reference is torch's own CPU add, which is fma(y, a, x) (pinned by
tests/test_torch_numerics.py) on a CPU with FMA; the script checks that on a few values first.
Prints mismatch counts against each candidate and a verdict line; exits 1 if the kernel's
hypotheses do not hold on this device (the bitwise GPU tests would then fail too: this says why).
"""
import argparse
import sys

import torch

N = 1 << 20
ALPHA = 0.1


def mismatches(device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, generator=g), torch.randn(N, generator=g)
    a32 = torch.tensor(ALPHA, dtype=torch.float32)
    out = x.to(device).add(y.to(device), alpha=ALPHA).cpu()
    fma = x.add(y, alpha=ALPHA)  # CPU: one fma (checked in main)
    res = {"fp32 vs fma": int((out != fma).sum()),
           "fp32 vs mul-then-add": int((out != x + y * a32).sum())}
    for dt in (torch.bfloat16, torch.float16):
        xs, ys = x.to(dt), y.to(dt)
        o = xs.to(device).add(ys.to(device), alpha=ALPHA).cpu()
        keep = xs.float().add(ys.float(), alpha=ALPHA).to(dt)
        narrowed = xs.float().add(ys.float(), alpha=float(torch.tensor(ALPHA, dtype=dt))).to(dt)
        name = str(dt).replace("torch.", "")
        res[f"{name} vs fp32 alpha"] = int((o != keep).sum())
        res[f"{name} vs alpha narrowed to {name}"] = int((o != narrowed).sum())
    return res


def cpu_add_is_fma() -> bool:
    """(1 + 2^-12)^2 = 1 + 2^-11 + 2^-24: fp32 rounds the product to 1 + 2^-11 (a tie, to
    even), so x = -(1 + 2^-11) gives 0 after mul-then-add and 2^-24 after an fma."""
    a = 1.0 + 2.0**-12
    x = torch.tensor([-(1.0 + 2.0**-11)], dtype=torch.float32)
    y = torch.tensor([a], dtype=torch.float32)
    return float(x.add(y, alpha=a)) == 2.0**-24 and float(x + y * a) == 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_rounding_probe: FAILED: no GPU visible")
        return 1
    if not cpu_add_is_fma():
        print("gpu_rounding_probe: FAILED: this CPU's add_ is not an fma (no FMA unit, or "
              "ATEN_CPU_CAPABILITY=default): no exact fma reference")
        return 1
    res = mismatches(args.device)
    for k, v in res.items():
        print(f"  {k}: {v} of {N} differ")
    holds = (res["fp32 vs fma"] == 0 and res["bfloat16 vs fp32 alpha"] == 0
             and res["float16 vs fp32 alpha"] == 0)
    print(f"gpu_rounding_probe ({args.device}): the kernel's hypotheses "
          f"{'HOLD' if holds else 'DO NOT HOLD'} (fp32 add_ is one fma; bf16/fp16 alpha in fp32)")
    return 0 if holds else 1


if __name__ == "__main__":
    sys.exit(main())
