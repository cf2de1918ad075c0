"""tools/cuda_check.py, the GPU-less machine-code evidence of issue 4 (steps 1 and 2).

The project's kernels are compiled once per session (tools/cuda_check.py run as a script, every
arch of csrc/build_flags.json in one nvcc call, with the nvcc flags the extension ships with) and
must pass: spill gate, 128-bit global loads and stores in every flat kernel, no local memory.
The element-wise mode kernel (csrc/cuda/elementwise_kernel.cuh) must show, for each mode, the
16-byte accesses of its arrays (master weights, stochastic rounding, bf16 momentum, fp16 master
weights: every array, all four for the last); the int8 momentum_dtype kernel (csrc/cuda/
qmom_kernel.cuh) its 8-byte accesses to a lane's int8 codes and its shuffles.
Planted bad kernels show the checks FAIL when they should:
  (a) scalar-only flat kernels -> "no 128-bit global load (LDG.E.128)";
  (b) an indexed local array and a register-starved kernel -> the spill gate stops nvcc, and
      without the gate the SASS check still sees the LDL/STL.
Skipped only where nvcc is missing; cuobjdump (a pinned pip dependency) must be there.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("cuda_check",
                                               os.path.join(ROOT, "tools", "cuda_check.py"))
cc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cc)

if cc.find_nvcc() is None:
    pytest.skip("nvcc is not installed (set NVCC or CUDA_HOME to run the CUDA build checks)",
                allow_module_level=True)

ARCHS = [f"sm_{a}" for a in cc.ARCHS]
FLAT = ["sgd_flat_kernel<float>", "sgd_flat_kernel<double>", "sgd_flat_kernel<bf16_t>",
        "sgd_flat_kernel<fp16_t>"]

# (a) Same names as the project's flat kernels, but one element per thread: scalar accesses only.
SCALAR_FLAT = r"""
namespace momentum_cuda { namespace cuda {
struct bf16_t { unsigned short x; };
struct fp16_t { unsigned short x; };
template <class T>
__global__ void sgd_flat_kernel(T* p, const T* g, long long n) {
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) p[i] = g[i];
}
template __global__ void sgd_flat_kernel<float>(float*, const float*, long long);
template __global__ void sgd_flat_kernel<double>(double*, const double*, long long);
template __global__ void sgd_flat_kernel<bf16_t>(bf16_t*, const bf16_t*, long long);
template __global__ void sgd_flat_kernel<fp16_t>(fp16_t*, const fp16_t*, long long);
}}
"""
# (b) An array indexed at run time cannot live in registers: local memory (STL/LDL).
LOCAL_ARRAY = r"""
__global__ void lmem_kernel(const float4* x, const int* idx, float4* out) {
  float4 a[64];
  for (int i = 0; i < 64; ++i) a[i] = x[i * blockDim.x + threadIdx.x];
  out[threadIdx.x] = a[idx[threadIdx.x] & 63];
}
"""
# (b) 96 live values, but __launch_bounds__(1024, 2) allows 32 registers a thread: spills.
SPILL = r"""
__global__ void __launch_bounds__(1024, 2) spill_kernel(const float* x, float* out) {
  float v[96];
#pragma unroll
  for (int i = 0; i < 96; ++i) v[i] = x[i * 1024 + threadIdx.x];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 96; ++i) s += v[i] * v[95 - i] * v[(i * 7) % 96];
  out[threadIdx.x] = s;
}
"""


@pytest.fixture(scope="session")
def cuobjdump():
    path = cc.find_cuobjdump()
    assert path, ("cuobjdump not found: the Makefile's DEPS pin nvidia-cuda-cuobjdump and "
                  "nvidia-cuda-nvdisasm (the local toolkit has no cuobjdump)")
    return path


@pytest.fixture(scope="session")
def project(tmp_path_factory, cuobjdump):
    """tools/cuda_check.py run once on csrc/cuda/sgd_cuda.cu; its artifacts parsed once."""
    keep = tmp_path_factory.mktemp("cuda_check")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "cuda_check.py"),
                        "--keep", str(keep)], capture_output=True, text=True, timeout=300)
    if not (keep / "sgd_cuda.fatbin").exists():  # nvcc itself failed: show why
        pytest.fail(f"tools/cuda_check.py built nothing:\n{r.stdout}\n{r.stderr}")
    ops, _ = cc.sass(str(keep / "sgd_cuda.fatbin"), cuobjdump)
    names = cc.demangle({fn for _, fn in ops})
    log = (keep / "ptxas.log").read_text()
    return dict(run=r, log=log, info=cc.ptxas_info(log),
                ops={(arch, names[fn]): o for (arch, fn), o in ops.items()})


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- the project's kernels pass ------------------------------------------------------------
def test_project_passes(project):
    r = project["run"]
    assert r.returncode == 0, f"tools/cuda_check.py failed:\n{r.stdout}\n{r.stderr}"
    for arch in ARCHS:  # the report lists each flat kernel with its register count
        for k in FLAT:
            assert any(line.startswith(f"{arch:6} {k:52}") and line.split()[2].isdigit()
                       for line in r.stdout.splitlines()), f"no register count for {arch} {k}"


def test_project_compiled_with_shipped_flags(project):
    """The evidence is about the code that ships: ptxas.log's first line is nvcc's command, which
    must carry csrc/build_flags.json's nvcc flags in order, its archs, and the gate."""
    cmd = project["log"].splitlines()[0].split()
    flags = list(cc.NVCC_FLAGS)
    assert any(cmd[i:i + len(flags)] == flags for i in range(len(cmd))), (flags, cmd)
    for a in cc.ARCHS:
        assert f"arch=compute_{a},code=sm_{a}" in cmd, cmd
    assert cmd[-len(cc.GATE):] == list(cc.GATE), cmd


def test_blocks_per_sm_units():
    """The register-limited occupancy printed next to each kernel (256-thread blocks)."""
    assert [cc.blocks_per_sm(r) for r in (16, 32, 33, 40, 41, 48, 64, 128, 255)] == \
        [8, 8, 6, 6, 5, 5, 4, 2, 1]
    assert cc.blocks_per_sm(32, threads=128) == 16 and cc.blocks_per_sm(16, threads=32) == 32
    kernel = open(os.path.join(ROOT, "csrc", "cuda", "sgd_kernel.cuh")).read()
    assert f"constexpr int kThreads = {cc.THREADS};" in kernel, "cuda_check.THREADS != kThreads"


def test_project_no_stack_or_spills(project):
    info = project["info"]
    # flat + list kernel, 4 dtypes, 2 archs; the two bf16, two momentum_dtype and the fp16
    # master kernels, 2 archs
    assert len(info) == (2 * len(ARCHS) * len(FLAT)
                         + (len(cc.BF16_KERNELS) + len(cc.QMOM_KERNELS)
                            + len(cc.FP16_MASTER_KERNELS)) * len(ARCHS))
    for key, i in info.items():
        assert (i["stack"], i["spill_stores"], i["spill_loads"]) == (0, 0, 0), key
        assert 0 < i["registers"] <= 64, key  # 256-thread blocks: room for 4+ blocks an SM


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", FLAT)
def test_flat_kernel_128bit(project, arch, kernel):
    ops = project["ops"][(arch, kernel)]
    assert cc.access_problems(ops) == [], cc.summary(cc.memory_ops(ops))


# the bf16 modes' 16-byte accesses per group of 8: (loads, stores) at least
BF16_ACCESSES = {cc.BF16_KERNELS[0]: (5, 4),  # master: param, grad, remainder, two buffer halves
                 cc.BF16_KERNELS[1]: (3, 2)}  # stochastic rounding: param, grad, buffer


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", cc.BF16_KERNELS)
def test_bf16_kernel_128bit(project, arch, kernel):
    """The master-weights and stochastic-rounding kernels move a group of 8 elements with
    16-byte accesses (all but the gradient stored back), no local memory."""
    found = [o for k, o in project["ops"].items() if k[0] == arch and k[1].startswith(kernel)]
    assert len(found) == 1
    assert cc.access_problems(found[0]) == [], cc.summary(cc.memory_ops(found[0]))
    ops = cc.memory_ops(found[0])
    loads, stores = BF16_ACCESSES[kernel]
    assert sum(n for op, n in ops.items() if op.startswith("LDG.E.128")) >= loads, cc.summary(ops)
    assert sum(n for op, n in ops.items() if op.startswith("STG.E.128")) >= stores, cc.summary(ops)


# the momentum_dtype kernels' accesses at least: (16-byte loads, 16-byte stores, 8-byte loads,
# 8-byte stores, butterfly shuffles)
QMOM_ACCESSES = {
    # a group of 8: param and grad two 16-byte loads each, the bf16 buffer one
    cc.QMOM_KERNELS[0]: (5, 3, 0, 0, 0),
    # a lane's 8 elements of an int8 block: param and grad as above, the codes one 8-byte
    # access each way; the block's absmax by a 5-step butterfly over the 32 lanes
    cc.QMOM_KERNELS[1]: (4, 2, 1, 1, 5),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", cc.QMOM_KERNELS)
def test_qmom_kernel_vector_accesses(project, arch, kernel):
    """The momentum_dtype kernels' vector path: 16-byte accesses for the fp32 param and grad
    and the bf16 buffer, 8-byte ones for a lane's int8 codes, the int8 absmax reduced with warp
    shuffles (SHFL.BFLY), no local memory."""
    found = [o for k, o in project["ops"].items() if k[0] == arch and k[1].startswith(kernel)]
    assert len(found) == 1
    ops = found[0]
    assert cc.access_problems(ops) == [], cc.summary(cc.memory_ops(ops))
    mem = cc.memory_ops(ops)
    count = lambda prefix: sum(n for op, n in mem.items() if op.startswith(prefix))  # noqa: E731
    ld128, st128, ld64, st64, shfl = QMOM_ACCESSES[kernel]
    assert count("LDG.E.128") >= ld128 and count("STG.E.128") >= st128, cc.summary(mem)
    assert count("LDG.E.64") >= ld64 and count("STG.E.64") >= st64, cc.summary(mem)
    assert sum(o.startswith("SHFL.BFLY") for o in ops) >= shfl, sorted(set(ops))


@pytest.mark.parametrize("arch", ARCHS)
def test_fp16_master_kernel_vector_accesses(project, arch):
    """The fp16 master-weights kernel's vector path moves a group of 8 with 16-byte accesses:
    loads of the grad (one), master and buffer (two each; the parameter is not read), stores of
    the parameter (one), master and buffer (two each); no local memory."""
    found = [o for k, o in project["ops"].items()
             if k[0] == arch and k[1].startswith(cc.FP16_MASTER_KERNELS[0])]
    assert len(found) == 1
    assert cc.access_problems(found[0]) == [], cc.summary(cc.memory_ops(found[0]))
    mem = cc.memory_ops(found[0])
    count = lambda prefix: sum(n for op, n in mem.items() if op.startswith(prefix))  # noqa: E731
    assert count("LDG.E.128") >= 5 and count("STG.E.128") >= 5, cc.summary(mem)


def test_list_kernel_report(project):
    """Reported, not required by the tool; today every multi-tensor kernel has them too."""
    lists = {k: o for k, o in project["ops"].items() if k[1].startswith("sgd_list_kernel<")}
    assert len(lists) == len(ARCHS) * len(FLAT)
    for k, o in lists.items():
        assert cc.access_problems(o) == [], (k, cc.summary(cc.memory_ops(o)))


# ---- the checks themselves -----------------------------------------------------------------
def test_access_problems_units():
    good = ["LDG.E.128", "LDG.E.128.CONSTANT", "FFMA", "STG.E.128", "EXIT"]
    assert cc.access_problems(good) == []
    bad = cc.access_problems(["LDG.E", "LDG.E.64", "STG.E.U16", "STL.128", "LDL"])
    assert bad == ["no 128-bit global load (LDG.E.128)", "no 128-bit global store (STG.E.128)",
                   "local memory instructions ['LDL', 'STL.128']"]


def test_planted_scalar_flat_kernels_fail(tmp_path, capsys, cuobjdump):
    """(a) The tool, run on flat kernels without vector accesses, names each one and fails."""
    src = _write(tmp_path, "scalar_flat.cu", SCALAR_FLAT)
    assert cc.main(["--source", src, "--keep", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    for arch in ARCHS:
        for k in FLAT:
            assert f"{arch} {k}: no 128-bit global load (LDG.E.128)" in err
            assert f"{arch} {k}: no 128-bit global store (STG.E.128)" in err


def test_planted_local_array_fails(tmp_path, capsys, cuobjdump):
    """(b) Local memory stops the build at the gate; without the gate the SASS shows LDL/STL."""
    src = _write(tmp_path, "local_array.cu", LOCAL_ARRAY)
    assert cc.main(["--source", src]) == 1
    out = capsys.readouterr()
    assert "Local memory used for function" in out.out and "spill gate" in out.err

    b = cc.compile_cu(src, str(tmp_path / "lmem.fatbin"), includes=(), gate=False)
    assert b.ok, b.log
    ops, _ = cc.sass(b.out, cuobjdump)
    assert {a for a, _ in ops} == set(ARCHS)
    for key, o in ops.items():
        assert any("local memory" in p for p in cc.access_problems(o)), key


def test_planted_spill_fails_gate(tmp_path):
    """(b) Register spills stop the build at the gate."""
    src = _write(tmp_path, "spill.cu", SPILL)
    b = cc.compile_cu(src, str(tmp_path / "spill.fatbin"), includes=())
    assert not b.ok
    assert "Registers are spilled to local memory" in b.log, b.log
    assert any(i["spill_stores"] > 0 for i in cc.ptxas_info(b.log).values())
