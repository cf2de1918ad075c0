"""Builds momentum_cuda._C: the C++ CPU kernel always; the CUDA kernel too when torch is a CUDA
build and nvcc is found. Install with `pip install --no-build-isolation -e .` (an isolated build
pulls another torch: docs/numerics.md). MOMENTUM_CUDA_NO_CUDA=1 forces a CPU-only build.
The compiler flags and the CUDA arch list come from csrc/build_flags.json (why each one is there
is written next to it)."""
import glob
import json
import os
import shutil

import torch
from setuptools import setup
from torch.utils import cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "csrc", "build_flags.json")) as f:
    FLAGS = json.load(f)
CXX_FLAGS = FLAGS["cxx"]
NVCC_FLAGS = FLAGS["nvcc"]
CUDA_ARCH_LIST = ";".join(FLAGS["cuda_archs"])  # TORCH_CUDA_ARCH_LIST's notation: "8.0;9.0"


def cuda_toolkit():
    """The toolkit root when this torch can take a CUDA extension, else (None, reason)."""
    if os.environ.get("MOMENTUM_CUDA_NO_CUDA") == "1":
        return None, "MOMENTUM_CUDA_NO_CUDA=1"
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "nvcc not found"
    # The nvcc on PATH may be a wrapper script; torch guesses a wrong root from it
    # (docs/numerics.md).
    has_headers = lambda r: os.path.exists(os.path.join(r, "include", "cuda_runtime_api.h"))
    root = os.environ.get("CUDA_HOME") or os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if not has_headers(root):
        cands = [r for r in sorted(glob.glob("/usr/local/cuda*")) if has_headers(r)]
        if not cands:
            return None, f"no CUDA toolkit with headers found (nvcc at {nvcc}); set CUDA_HOME"
        root = cands[-1]
    return root, None


root, why_not = cuda_toolkit()
sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
include_dirs = [os.path.join(HERE, "csrc"), os.path.join(HERE, "csrc", "include")]
kwargs = dict(extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])
if root is None:
    print(f"momentum_cuda: building the CPU kernel only ({why_not})")
    Extension = cpp_extension.CppExtension
else:
    os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = root
    # Unset, torch's arch detection needs a GPU and fails without one (docs/numerics.md).
    # A TORCH_CUDA_ARCH_LIST already in the environment wins; the line below says which.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCH_LIST)
    print(f"momentum_cuda: building the CPU and CUDA kernels (toolkit {root}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    kwargs["extra_compile_args"] = {"cxx": CXX_FLAGS + ["-DMOMENTUM_CUDA_WITH_CUDA"],
                                    "nvcc": NVCC_FLAGS}
    Extension = cpp_extension.CUDAExtension

setup(
    name="momentum_cuda",
    ext_modules=[Extension("momentum_cuda._C", sources, include_dirs=include_dirs, **kwargs)],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
