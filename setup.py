"""Builds momentum_cuda._C: the C++ CPU kernel always; the CUDA kernel when torch is a CUDA build
and nvcc is found (csrc/cuda/, a later issue). Install with
`pip install --no-build-isolation -e .` (FACTS.md: an isolated build pulls another torch)."""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
# -ffp-contract=off: no a*b+c contraction; every fma is written explicitly (sgd_math.h).
# -fopenmp: at::parallel_for is inline OpenMP code; libgomp resolves to torch's own copy.
# -g0: Python's own CFLAGS bring -g, which costs compile time (FACTS.md: 57 s vs 41 s a file).
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp", "-std=c++17", "-g0"]

sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
print("momentum_cuda: building the CPU kernel (CUDA kernel: not part of this version)")

setup(
    name="momentum_cuda",
    ext_modules=[
        CppExtension(
            "momentum_cuda._C",
            sources,
            include_dirs=[os.path.join(HERE, "csrc"), os.path.join(HERE, "csrc", "include")],
            extra_compile_args=CXX_FLAGS,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
