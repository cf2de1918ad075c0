"""Every kernel path once, for compute-sanitizer memcheck (the GPU check's memcheck stage).

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python3 tools/gpu_smoke.py
    python3 tools/gpu_smoke.py --device cpu      # the same calls on the CPU kernel (dry run)

Flat and multi-tensor, both GPU backends (cuda, triton), every dtype, odd sizes, element offsets
that break 16-byte alignment, empty tensors, several launches. Every tensor is allocated with
EXACTLY the elements it needs (a view at an offset ends where its allocation ends), and with the
caching allocator off each is its own cudaMalloc: one element read or written past a span's end
is outside any allocation, which memcheck reports.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import momentum_cuda  # noqa: E402
from momentum_cuda._ops import step_ops  # noqa: E402

H = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
FLAT_CASES = ((0, 0), (1, 0), (3, 1), (97, 3), (2**20 + 3, 5), (70000, 7))  # (numel, offset)
# 405 tensors: more than one multi-tensor launch holds (320 in the CUDA kernel's argument).
LIST_SIZES = [0, 1, 3, 97, 65536 * 3 + 1] + [17] * 400


def exact(n: int, off: int, dtype, device) -> torch.Tensor:
    """n random elements at element offset `off` of an allocation of exactly off + n."""
    return torch.randn(off + n, device=device).to(dtype)[off:]


def run(backend: str, device: str) -> int:
    flat_step, list_step = step_ops(backend)
    calls = 0
    for dt in DTYPES:
        for n, off in FLAT_CASES:
            p, g, b = (exact(n, off, dt, device) for _ in range(3))
            for first in (True, False):
                flat_step(p, g, b, torch.tensor([[0, n]]), first_step=first, **H)
                calls += 1
        ps, gs, bs = ([exact(s, 0, dt, device) for s in LIST_SIZES] for _ in range(3))
        for first in (True, False):
            list_step(ps, gs, bs, first_step=first, **H)
            calls += 1
    return calls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--backends", nargs="+", default=None,
                    help="default: cuda and triton on a GPU, cpu on the CPU")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    backends = args.backends or (["cuda", "triton"] if args.device == "cuda" else ["cpu"])
    for name in backends:
        ok, why = momentum_cuda.available_backends()[name]
        if not ok:
            print(f"gpu_smoke: FAILED: backend {name!r} is not available: {why}")
            return 1
        calls = run(name, args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        print(f"gpu_smoke: {name}: {calls} calls ran on {args.device}", flush=True)
    print("gpu_smoke: every kernel path ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
