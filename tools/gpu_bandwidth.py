"""The GPU's measured device-to-device copy bandwidth (read + write bytes per second), against
which the flat step's effective bandwidth (20 bytes per fp32 parameter) is judged: issue 4 asks
for >= 90 %. CUDA events, warm-up, median of 20."""
import statistics

import torch

assert torch.cuda.is_available(), "needs a GPU"
n = 100_000_000  # fp32 elements: 400 MB each way
src = torch.randn(n, device="cuda")
dst = torch.empty_like(src)
for _ in range(3):
    dst.copy_(src)
times = []
for _ in range(20):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    dst.copy_(src)
    e.record()
    e.synchronize()
    times.append(s.elapsed_time(e) / 1e3)
med = statistics.median(times)
print(f"device-to-device copy of {n * 4 / 1e9:.1f} GB: median {med * 1e3:.3f} ms, "
      f"{2 * n * 4 / med / 1e9:.1f} GB/s (read + write); p10-p90 "
      f"{sorted(times)[2] * 1e3:.3f}-{sorted(times)[17] * 1e3:.3f} ms")
