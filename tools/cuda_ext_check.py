"""The full extension (CPU + CUDA kernels) built against a CUDA build of torch: it imports (on a
machine without a GPU too), its ops have CPU and CUDA kernels, the CUDA one rejects CPU tensors
with a clear error and changes nothing, and its CPU kernel gives this torch's SGD bits.

    python tools/cuda_ext_check.py              # builds into build/cuda-ext, then checks it
    python tools/cuda_ext_check.py --installed  # checks momentum_cuda._C as built in place

Run it with the interpreter of a CUDA build of torch. The GPU check's build stage
(tools/gpu_check.py, dry in `make test` with torch 2.11 cu130) uses --installed after
`setup.py build_ext --inplace`. Exits non-zero on failure.
"""
import argparse
import glob
import importlib.util
import os
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "cuda-ext")


def fail(msg: str) -> None:
    sys.exit(f"cuda_ext_check: FAILED: {msg}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--installed", action="store_true",
                    help="check momentum_cuda._C as built in place instead of building")
    args = ap.parse_args(argv)
    print(f"cuda_ext_check: torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"GPU visible: {torch.cuda.is_available()}")
    if torch.version.cuda is None:
        fail("this interpreter's torch is a CPU build; run it with a CUDA build of torch")
    if args.installed:
        sys.path.insert(0, ROOT)
        from momentum_cuda import _C as C
        print(f"  checking {C.__file__}")
        return check(C)
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        # The project's machines and CI have nvcc; elsewhere say so instead of failing, but
        # never in CI, where a missing toolkit must not pass unnoticed.
        if os.environ.get("CI"):
            fail("nvcc not found (CI must build the CUDA kernel)")
        print("cuda_ext_check: SKIPPED: nvcc not found (install a CUDA toolkit to run it)")
        return 0
    t0 = time.time()
    # --build-lib: never overwrite the package's own _C (built against the CPU torch).
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-lib", OUT,
                        "--build-temp", OUT + "-tmp"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-6000:], r.stderr[-6000:])
        fail("the build failed")
    if "building the CPU and CUDA kernels" not in r.stdout:
        print(r.stdout[-3000:])
        fail("setup.py did not build the CUDA kernel")
    print(f"  built in {time.time() - t0:.1f} s")

    so = glob.glob(os.path.join(OUT, "momentum_cuda", "_C*.so"))
    if len(so) != 1:
        fail(f"expected one built module under {OUT}, found {so}")
    spec = importlib.util.spec_from_file_location("momentum_cuda._C", so[0])
    C = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(C)
    print(f"  imported {so[0]}")
    return check(C)


def check(C) -> int:
    if C.built_with_cuda is not True:
        fail("built_with_cuda is not True")
    for op in ("sgd_step_flat_", "sgd_step_list_"):
        for key in ("CPU", "CUDA"):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"momentum_cuda::{op}", key):
                fail(f"momentum_cuda::{op} has no {key} kernel")
    print("  torch.ops.momentum_cuda.sgd_step_flat_ and sgd_step_list_ have CPU and CUDA kernels")

    p, g, b = torch.randn(10), torch.randn(10), torch.randn(10)
    before = p.clone()
    cuda_only = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    try:
        torch.ops.momentum_cuda.sgd_step_flat_.default.redispatch(
            cuda_only, p, g, b, torch.tensor([[0, 10]]), lr=0.1, momentum=0.9, dampening=0.0,
            weight_decay=0.0, nesterov=False, maximize=False, first_step=False)
        fail("the CUDA kernel accepted CPU tensors")
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        if "param must be on a cuda device" not in msg:
            fail(f"unclear error for CPU tensors: {msg!r}")
        print(f"  CUDA kernel on CPU tensors: {msg!r}")
    if not torch.equal(p, before):
        fail("the rejected call changed the parameter")

    # The CPU kernel of this build against this torch's for-loop SGD (fp32, 3 steps).
    q = before.clone().requires_grad_()
    opt = torch.optim.SGD([q], lr=0.1, momentum=0.9, foreach=False)
    for step in range(3):
        q.grad = g.clone()
        opt.step()
        torch.ops.momentum_cuda.sgd_step_list_([p], [g], [b], lr=0.1, momentum=0.9,
                                               dampening=0.0, weight_decay=0.0, nesterov=False,
                                               maximize=False, first_step=step == 0)
    if not torch.equal(p, q.detach()):
        fail("the CPU kernel of the CUDA build differs from this torch's SGD")
    print("  CPU kernel of this build == torch.optim.SGD(foreach=False), fp32, 3 steps")
    print("cuda_ext_check: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
