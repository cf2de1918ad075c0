#!/usr/bin/env python3
"""Machine-code checks of the CUDA kernels, without a GPU (issue 4, evidence steps 1 and 2).

    python tools/cuda_check.py [--keep DIR] [--source FILE]

1. Compiles csrc/cuda/sgd_cuda.cu with nvcc for every arch of csrc/build_flags.json in ONE call
   (device code only, -fatbin), with the nvcc flags the extension ships with (the same file),
   plus the spill gate `-Xptxas -v,-warn-spills,-warn-lmem-usage,-Werror`: any register spill or
   any local memory fails the build. Prints each kernel's register count (ptxas -v) and the
   blocks per SM its registers allow.
2. Disassembles the fatbin with cuobjdump -sass (PyPI wheels nvidia-cuda-cuobjdump and
   nvidia-cuda-nvdisasm; the local toolkit has neither) and, for each dtype's flat kernel
   sgd_flat_kernel<float|double|bf16_t|fp16_t>, for the element-wise mode kernel
   (csrc/cuda/elementwise_kernel.cuh) of each mode: sgd_elementwise_kernel<MasterMode> (master
   weights), <SrMode> (stochastic rounding), <Bf16MomMode> (momentum_dtype bf16),
   <Fp16MasterMode> (fp16 master weights), for the int8 momentum_dtype kernel sgd_q8_kernel, and
   each arch, requires 128-bit global loads and stores (LDG.E.128 / STG.E.128) and no local
   memory (LDL / STL). The multi-tensor kernel's
   accesses are reported, not required.
Exits non-zero with a message naming each failure. tests/test_cuda_build.py imports this module
and shows that the gate and the SASS checks fail on planted bad kernels.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "sgd_cuda.cu")
INCLUDES = (os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include"))
FLAGS_FILE = os.path.join(ROOT, "csrc", "build_flags.json")
with open(FLAGS_FILE) as _f:
    _FLAGS = json.load(_f)
# What setup.py and CMake give nvcc for the .cu files. setup.py's nvcc also gets torch's own
# -D__CUDA_NO_HALF*_OPERATORS__/_CONVERSIONS__ and --expt-relaxed-constexpr: the kernels use
# nothing they switch off (the SASS is byte-identical with and without them, nvcc 13.0).
NVCC_FLAGS = tuple(_FLAGS["nvcc"])
ARCHS = tuple(a.replace(".", "") for a in _FLAGS["cuda_archs"])  # "8.0" -> "80"
# Added to the shipped flags, and only here: -v for the register counts; the warnings made
# errors are the spill gate (named here too, so the gate does not rest on the shipped flags
# keeping them). gate=False (to look at bad SASS) keeps only -v.
GATE = ("-Xptxas=-v,-warn-spills,-warn-lmem-usage,-Werror",)
NO_GATE = ("-Xptxas=-v",)
THREADS = 256  # threads a block of both kernels (kThreads in csrc/cuda/sgd_kernel.cuh)
FLAT_DTYPES = ("float", "double", "bf16_t", "fp16_t")  # as demangle() names them
# the element-wise mode kernel (csrc/cuda/elementwise_kernel.cuh) of each mode, any batch limits
ELEMENTWISE = "sgd_elementwise_kernel<"
# the bf16 per-tensor modes (csrc/cuda/master_kernel.cuh, sr_kernel.cuh)
BF16_KERNELS = (ELEMENTWISE + "MasterMode,", ELEMENTWISE + "SrMode,")
# the momentum_dtype kernels (csrc/cuda/qmom_kernel.cuh): bf16 and int8 buffers
QMOM_KERNELS = (ELEMENTWISE + "Bf16MomMode,", "sgd_q8_kernel<")
# the fp16 master-weights mode (csrc/cuda/fp16_master_kernel.cuh)
FP16_MASTER_KERNELS = (ELEMENTWISE + "Fp16MasterMode,",)


# ---- tools ---------------------------------------------------------------------------------
def find_nvcc() -> str | None:
    """$NVCC, $CUDA_HOME/bin/nvcc, nvcc on PATH, or /usr/local/cuda*/bin/nvcc; None if absent."""
    cands = [os.environ.get("NVCC", "")]
    cands += [os.path.join(os.environ[v], "bin", "nvcc")
              for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    cands += [shutil.which("nvcc") or ""] + sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def find_cuobjdump() -> str | None:
    """$CUOBJDUMP, or the binary of the nvidia-cuda-cuobjdump wheel (site-packages/nvidia/*/bin),
    or the one the triton wheel ships (with nvdisasm beside it: a GPU machine that cannot
    download has triton), or cuobjdump on PATH. cuobjdump -sass also needs nvdisasm: see sass()."""
    if os.environ.get("CUOBJDUMP"):
        return os.environ["CUOBJDUMP"]
    for pattern in (("nvidia", "*", "bin", "cuobjdump"),
                    ("triton", "backends", "nvidia", "bin", "cuobjdump")):
        for d in sys.path:
            hits = sorted(glob.glob(os.path.join(d, *pattern)))
            if hits:
                return hits[-1]
    return shutil.which("cuobjdump")


# ---- step 1: compile under the spill gate, registers from ptxas -v --------------------------
class Build:
    def __init__(self, cmd, returncode, log, out, seconds):
        self.cmd, self.returncode, self.log, self.out, self.seconds = cmd, returncode, log, out, seconds

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def nvcc_command(nvcc: str, src: str, out: str, archs=ARCHS, includes=INCLUDES,
                 gate=True) -> list[str]:
    """nvcc -fatbin (device code only; host code is not this check's business) for every arch
    in one call, with the shipped nvcc flags and the gate (or only -v with gate=False)."""
    cmd = [nvcc, *NVCC_FLAGS, "-fatbin", src, "-o", out]
    for a in archs:  # code=sm_XX only, as torch's TORCH_CUDA_ARCH_LIST gives (no PTX)
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    cmd += [f"-I{i}" for i in includes]
    return cmd + list(GATE if gate else NO_GATE)


def compile_cu(src: str, out: str, archs=ARCHS, includes=INCLUDES, gate=True, nvcc=None) -> Build:
    """Runs nvcc_command(); gate=False keeps -v and the shipped warnings but not -Werror (to look
    at bad SASS)."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set NVCC or CUDA_HOME)")
    cmd = nvcc_command(nvcc, src, out, archs, includes, gate)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    return Build(cmd, r.returncode, r.stdout + r.stderr, out, time.perf_counter() - t0)


def ptxas_info(log: str) -> dict:
    """{(arch, mangled kernel): {registers, stack, spill_stores, spill_loads}} from ptxas -v."""
    info, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            cur = (m.group(2), m.group(1))
            info[cur] = {}
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m and cur:
            info[cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                             spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur:
            info[cur]["registers"] = int(m.group(1))
    return info


def blocks_per_sm(registers: int, threads: int = THREADS) -> int:
    """Blocks of `threads` an SM of sm_80/sm_90 holds at once, as limited by `registers` a thread
    (65536 registers an SM, allocated per warp in units of 256; at most 64 warps and 32 blocks).
    What the occupancy API should report on the GPU for a kernel without shared memory."""
    per_warp = -(-registers * 32 // 256) * 256
    warps = 65536 // per_warp if per_warp else 64
    warps_per_block = -(-threads // 32)
    return min(min(warps, 64) // warps_per_block, 32)


# ---- step 2: SASS -----------------------------------------------------------------------------
def sass(binary: str, cuobjdump=None) -> tuple[dict, str]:
    """({(arch, mangled kernel): [opcode with modifiers, ...]}, raw listing) of cuobjdump -sass."""
    cuobjdump = cuobjdump or find_cuobjdump()
    if cuobjdump is None:
        raise FileNotFoundError("cuobjdump not found: pip install nvidia-cuda-cuobjdump "
                                "nvidia-cuda-nvdisasm (or set CUOBJDUMP)")
    # cuobjdump runs nvdisasm, which the wheels put next to it.
    env = dict(os.environ, PATH=os.path.dirname(cuobjdump) + os.pathsep + os.environ["PATH"])
    r = subprocess.run([cuobjdump, "-sass", binary], capture_output=True, text=True, env=env)
    if r.returncode != 0 or "fatal" in r.stderr:
        raise RuntimeError(f"cuobjdump -sass {binary} failed:\n{r.stderr}")
    ops, arch, fn = collections.defaultdict(list), None, None
    for line in r.stdout.splitlines():
        m = re.match(r"\s*arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = m.group(1)
        # e.g. "/*0440*/   @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;"
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and fn:
            ops[(arch, fn)].append(m.group(1))
    return dict(ops), r.stdout


def demangle(names) -> dict:
    """mangled -> demangled name without namespaces or arguments (sgd_flat_kernel<bf16_t>);
    names stay mangled where c++filt is missing."""
    names = list(names)
    out = dict(zip(names, names))
    if names and shutil.which("c++filt"):
        r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        for mangled, full in zip(names, r.stdout.splitlines()):
            out[mangled] = re.sub(r"^void |\(.*$|\w+::", "", full)
    return out


def memory_ops(opcodes) -> collections.Counter:
    """Count of global (LDG/STG) and local (LDL/STL) memory instructions, by full opcode."""
    return collections.Counter(o for o in opcodes if o.split(".")[0] in ("LDG", "STG", "LDL", "STL"))


def access_problems(opcodes) -> list[str]:
    """What a kernel lacks to pass: 128-bit global loads and stores, and no local memory."""
    parts = [o.split(".") for o in opcodes]
    problems = []
    if not any(p[0] == "LDG" and "128" in p for p in parts):
        problems.append("no 128-bit global load (LDG.E.128)")
    if not any(p[0] == "STG" and "128" in p for p in parts):
        problems.append("no 128-bit global store (STG.E.128)")
    local = sorted({o for o, p in zip(opcodes, parts) if p[0] in ("LDL", "STL")})
    if local:
        problems.append(f"local memory instructions {local}")
    return problems


def summary(counts: collections.Counter) -> str:
    return ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())) or "no global memory ops"


# ---- the check of the project's kernels -------------------------------------------------------
def check(source=SOURCE, workdir=None) -> list[str]:
    """Runs steps 1 and 2 on `source`, prints the report, returns the failures (empty: pass)."""
    workdir = workdir or tempfile.mkdtemp(prefix="cuda_check_")
    os.makedirs(workdir, exist_ok=True)
    fatbin = os.path.join(workdir, "sgd_cuda.fatbin")
    b = compile_cu(source, fatbin)
    with open(os.path.join(workdir, "ptxas.log"), "w") as f:
        f.write(" ".join(b.cmd) + "\n" + b.log)
    print(f"nvcc sm_{'/sm_'.join(ARCHS)}: {b.seconds:.1f} s, exit {b.returncode}")
    if not b.ok:  # the gate (spills, local memory) or a compile error
        print(b.log)
        return [f"nvcc failed (spill gate or compile error), exit {b.returncode}; see above"]
    info = ptxas_info(b.log)
    ops, listing = sass(fatbin)
    with open(os.path.join(workdir, "sgd_cuda.sass"), "w") as f:
        f.write(listing)
    names = demangle({fn for _, fn in set(info) | set(ops)})

    failures = []
    print(f"{'arch':6} {'kernel':52} {'regs':>4} {'stack':>5} {'blk/SM':>6}  "
          f"global/local memory instructions")
    for arch, fn in sorted(ops, key=lambda k: (k[0], names[k[1]])):
        i = info.get((arch, fn), {})
        name = names[fn]
        bps = blocks_per_sm(i["registers"]) if "registers" in i else "?"
        print(f"{arch:6} {name:52} {i.get('registers', '?'):>4} {i.get('stack', '?'):>5} "
              f"{bps:>6}  {summary(memory_ops(ops[(arch, fn)]))}")
        if i.get("stack", 0) or i.get("spill_stores", 0) or i.get("spill_loads", 0):
            failures.append(f"{arch} {name}: ptxas reports stack/spills {i}")
    # the requirement: every flat kernel, the bf16, momentum_dtype and fp16 master kernels,
    # every arch
    wanted = ([f"sgd_flat_kernel<{dt}>" for dt in FLAT_DTYPES] + list(BF16_KERNELS)
              + list(QMOM_KERNELS) + list(FP16_MASTER_KERNELS))
    for arch in ARCHS:
        for want in wanted:
            found = [k for k in ops if k[0] == f"sm_{arch}" and names[k[1]].startswith(want)]
            if not found:
                failures.append(f"sm_{arch} {want}: not in the SASS (renamed? c++filt missing?)")
            for k in found:
                failures += [f"sm_{arch} {want}: {p}" for p in access_problems(ops[k])]
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", metavar="DIR", help="write the artifacts here and keep them")
    ap.add_argument("--source", default=SOURCE, help="the .cu file (default: %(default)s)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cuda_check_") as tmp:
        failures = check(args.source, args.keep or tmp)
    if args.keep:
        print(f"artifacts (ptxas.log, sgd_cuda.fatbin, sgd_cuda.sass) in {args.keep}")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print(f"OK: sgd_flat_kernel (all {len(FLAT_DTYPES)} dtypes), sgd_elementwise_kernel "
          f"(MasterMode, SrMode, Bf16MomMode, Fp16MasterMode) and sgd_q8_kernel have "
          f"128-bit global loads and stores and no local memory on sm_{', sm_'.join(ARCHS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
