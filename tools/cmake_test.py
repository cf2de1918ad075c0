#!/usr/bin/env python3
"""Configure, build and test the CMake build of momentum_cuda in BUILD_DIR (default build/cmake).

    python tools/cmake_test.py [BUILD_DIR]

1. cmake configure (Release; Ninja when found), pointing CMake at THIS interpreter's torch
   (torch.utils.cmake_prefix_path), pybind11 (python -m pybind11 --cmakedir) and Python, then
   checks the configured compile_commands.json: every C++ source is compiled with the "cxx" flags
   of csrc/build_flags.json, and, where nvcc is on PATH (CMake then finds it too), every
   csrc/cuda/*.cu with its "nvcc" flags for each of its "cuda_archs".
2. cmake --build with 2 jobs (the module _C, the CUDA kernels' objects when nvcc is there, the
   C++ tests; all inside BUILD_DIR).
3. ctest --output-on-failure (tests/cpp/).
4. Imports the CMake-built _C from BUILD_DIR in a fresh interpreter (never the package's
   momentum_cuda/_C*.so), calls cpu_isa(), and runs two steps of the op it registers,
   torch.ops.momentum_cuda.sgd_step_list_, against
   torch.optim.SGD (for-loop) bit for bit, to show the module loads and works.
Exits non-zero on the first failure. Prints each command and how long it took.
"""
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS_FILE = os.path.join(ROOT, "csrc", "build_flags.json")

IMPORT_CHECK = r"""
import os, sys
build = sys.argv[1]
sys.path.insert(0, build)
import torch
import _C
where = os.path.realpath(_C.__file__)
assert where.startswith(os.path.realpath(build) + os.sep), f"_C came from {where}, not {build}"
print(f"imported {where}")
print(f"cpu_isa() = {_C.cpu_isa()!r}")

torch.manual_seed(0)
p0 = torch.randn(1037, dtype=torch.float32)
grads = [torch.randn(1037, dtype=torch.float32) for _ in range(2)]
ref = p0.clone().requires_grad_(True)
opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-4,
                      foreach=False)
p, buf = p0.clone(), torch.empty_like(p0)
for step, g in enumerate(grads):
    ref.grad = g.clone()
    opt.step()
    torch.ops.momentum_cuda.sgd_step_list_([p], [g], [buf], lr=0.1, momentum=0.9, dampening=0.1,
                                           weight_decay=1e-4, nesterov=False, maximize=False,
                                           first_step=(step == 0))
same = torch.equal(p.view(torch.int32), ref.detach().view(torch.int32))
print(f"2 steps of sgd_step_list_ vs torch.optim.SGD (fp32, 1037 elements): "
      f"{'bitwise equal' if same else 'DIFFERENT'}")
sys.exit(0 if same else 1)
"""


def run(cmd, show=None, **kw):
    print("+ " + (show or " ".join(cmd)), flush=True)
    t0 = time.monotonic()
    rc = subprocess.call(cmd, **kw)
    dt = time.monotonic() - t0
    print(f"  ({dt:.1f} s, exit {rc})", flush=True)
    if rc != 0:
        print(f"cmake_test: FAILED: {' '.join(cmd)} exited with {rc}", flush=True)
        sys.exit(rc if 0 < rc < 256 else 1)
    return dt


def has_run(cmd, flags):
    """True if `flags` occur in `cmd` as one contiguous run, in order."""
    return any(cmd[i:i + len(flags)] == flags for i in range(len(cmd) - len(flags) + 1))


def flag_problems(build, want_cuda):
    """What compile_commands.json shows against csrc/build_flags.json: [] when every project
    source is compiled with the shared flags (and the .cu sources are there when want_cuda)."""
    with open(FLAGS_FILE) as f:
        flags = json.load(f)
    with open(os.path.join(build, "compile_commands.json")) as f:
        commands = {os.path.realpath(c["file"]): shlex.split(c["command"]) for c in json.load(f)}
    def files(*patterns):
        return [os.path.join(ROOT, p) for pattern in patterns
                for p in sorted(glob.glob(pattern, root_dir=ROOT))]

    sources = files("csrc/*.cpp", "csrc/cpu/*.cpp", "tests/cpp/*.cpp")
    cuda_sources = files("csrc/cuda/*.cu")
    problems = []
    for src in sources + (cuda_sources if want_cuda else []):
        cmd = commands.get(os.path.realpath(src))
        rel = os.path.relpath(src, ROOT)
        if cmd is None:
            problems.append(f"{rel}: not compiled by the CMake build")
            continue
        shared = flags["nvcc"] if src.endswith(".cu") else flags["cxx"]
        if not has_run(cmd, shared):
            problems.append(f"{rel}: compiled without {shared}: {' '.join(cmd)}")
        if src.endswith(".cu"):
            for arch in flags["cuda_archs"]:
                a = arch.replace(".", "")
                if f"--generate-code=arch=compute_{a},code=[sm_{a}]" not in cmd:
                    problems.append(f"{rel}: not compiled for sm_{a}: {' '.join(cmd)}")
    return problems


def cache_generator(build):
    """The generator an existing CMakeCache.txt was configured with, or None."""
    try:
        with open(os.path.join(build, "CMakeCache.txt")) as f:
            for line in f:
                if line.startswith("CMAKE_GENERATOR:INTERNAL="):
                    return line.split("=", 1)[1].strip()
    except OSError:
        pass
    return None


def main():
    build = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build", "cmake"))
    import pybind11  # noqa: F401  (fail early and clearly if missing)
    import torch

    prefix = torch.utils.cmake_prefix_path
    pybind11_dir = subprocess.check_output(
        [sys.executable, "-m", "pybind11", "--cmakedir"], text=True).strip()
    # Ninja from PATH or next to this interpreter (the pip wheel), else CMake's default.
    # The venv's own cmake and ninja first (pinned in the Makefile): a fresh machine has neither.
    venv_bin = os.path.dirname(sys.executable)
    cmake = shutil.which("cmake", path=venv_bin) or shutil.which("cmake")
    if cmake is None:
        sys.exit("cmake_test: no cmake found (make installs it into .venv)")
    ninja = shutil.which("ninja", path=venv_bin) or shutil.which("ninja")
    generator = "Ninja" if ninja else "Unix Makefiles"
    print(f"cmake_test: python {sys.executable}, torch {torch.__version__}\n"
          f"  torch cmake: {prefix}\n  pybind11 cmake: {pybind11_dir}\n"
          f"  generator: {generator}\n  build dir: {build}", flush=True)

    old = cache_generator(build)
    if old is not None and old != generator:  # CMake refuses to switch generators in place
        print(f"  build dir was configured for {old!r}: removing its CMake cache", flush=True)
        os.remove(os.path.join(build, "CMakeCache.txt"))
        shutil.rmtree(os.path.join(build, "CMakeFiles"), ignore_errors=True)

    t_start = time.monotonic()
    configure = [cmake, "-S", ROOT, "-B", build, "-G", generator,
                 "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={prefix}",
                 f"-Dpybind11_DIR={pybind11_dir}",
                 f"-DPython_EXECUTABLE={sys.executable}",
                 "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON"]
    if ninja and generator == "Ninja":
        configure.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
    t_conf = run(configure)
    want_cuda = shutil.which("nvcc") is not None
    problems = flag_problems(build, want_cuda)
    if problems:
        print("cmake_test: FAILED: the CMake build does not use csrc/build_flags.json:\n  "
              + "\n  ".join(problems), flush=True)
        sys.exit(1)
    print(f"  compile commands carry csrc/build_flags.json's flags "
          f"({'C++ and CUDA' if want_cuda else 'C++; no nvcc on PATH, so no CUDA'})", flush=True)
    t_build = run([cmake, "--build", build, "--parallel", "2"])
    ctest = os.path.join(os.path.dirname(cmake), "ctest")  # the ctest of the same cmake
    t_test = run([ctest, "--output-on-failure"], cwd=build)
    t_imp = run([sys.executable, "-c", IMPORT_CHECK, build],
                show=f"{sys.executable} -c <import _C from {build}, call cpu_isa(), 2 steps vs torch>")
    print(f"cmake_test: OK (configure {t_conf:.1f} s, build {t_build:.1f} s, ctest {t_test:.1f} s, "
          f"import {t_imp:.1f} s, total {time.monotonic() - t_start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
