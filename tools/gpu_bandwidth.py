"""The device's measured copy bandwidth (bytes read + bytes written per second), the ceiling the
flat step's effective bandwidth (20 bytes per fp32 parameter: read p, g, buf; write p, buf) is
judged against. CUDA events on a GPU (the host clock after a sync elsewhere), 3 warm-up copies,
median and p10-p90 of 20.

    python3 tools/gpu_bandwidth.py [--device cuda|cpu] [--numel N]

Prints a line for people and one `BANDWIDTH {json}` line for tools/gpu_check.py.
"""
import argparse
import json
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--numel", type=int, default=500_000_000,
                    help="fp32 elements (default: 2 GB each way, many times the H200's L2)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("gpu_bandwidth: FAILED: no GPU visible")
        return 1
    src = torch.randn(args.numel, device=args.device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            dst.copy_(src)
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    times.sort()
    med = statistics.median(times)
    nbytes = 2 * args.numel * src.element_size()
    res = dict(device=args.device, bytes=nbytes, median_ms=med * 1e3, p10_ms=times[2] * 1e3,
               p90_ms=times[17] * 1e3, gbps=nbytes / med / 1e9)
    print(f"copy of {nbytes / 2e9:.2f} GB on {args.device}: median {res['median_ms']:.3f} ms, "
          f"{res['gbps']:.1f} GB/s (read + write); p10-p90 {res['p10_ms']:.3f}-"
          f"{res['p90_ms']:.3f} ms")
    print("BANDWIDTH " + json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
