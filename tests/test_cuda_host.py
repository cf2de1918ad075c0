"""The CUDA kernels (csrc/cuda/sgd_kernel.cuh) run on the host, without a GPU.

tests/cuda/host_shim.h lets g++ compile the SAME kernel header as host code (threadIdx & co. as
thread_local, CUDA's own vector_types.h, a serial grid runner with forward / reverse / shuffled
thread orders), and tests/cuda/host_kernel_test.cpp checks the flat and multi-tensor kernels bit
for bit against a naive per-element reference written in the test (every dtype, sizes 0..1025 and
2**20 + 3, element offsets 0..7, all 20 flag sets, several grids, plan_list with ListLimits4K,
ListLimits32K and tiny limits, canaries around every span). tests/cuda/flat_grid_test.cpp checks
the flat launcher's grid size (cuda::flat_grid) up to 2**63 - 1 elements.
tests/cuda/host_bf16_test.cpp does the same for the master-weights mode
(csrc/cuda/master_kernel.cuh) against fp32 masters stepped and split by its own reference, and
for the stochastic-rounding mode (csrc/cuda/sr_kernel.cuh) against its own random bits; these
and the bf16-momentum and fp16 master modes below run through the one element-wise kernel of
csrc/cuda/elementwise_kernel.cuh (tests/cuda/host_elementwise.h launches it).
tests/cuda/host_qmom_test.cpp does it for the momentum_dtype kernels (csrc/cuda/qmom_kernel.cuh:
bf16 and int8 blockwise buffers) against the naive element / block loops of momentum_dtype.h;
the int8 kernel's warp shuffles run under the shim's warp runner (the 32 lanes as fibers in
lock step). The same program checks the fp16 master-weights kernel (csrc/cuda/
fp16_master_kernel.cuh) against fp16_master_elem one element at a time, and every parameter
against the compiler's own fp16 rounding of its new master (`--only qmom|fp16m` picks one part;
the two tests share one build).

Three builds of the driver, with the C++ flags of csrc/build_flags.json and -O1 (see COMPILE_FLAGS):
  * plain      every case;
  * sanitized  the same under ASan + UBSan (no recovery), fewer cases (--quick);
  * planted    patched copies of the REAL sgd_kernel.cuh (exact lines replaced) that must FAIL:
               a wrong grid stride, a tail past the end, a head that leaves the vector loads
               misaligned, an unchecked grad alignment, a lost span in plan_list's batching,
               a flat grid not capped at what is resident, a grid size that overflows int64
               (these two in flat_grid_test.cpp); the master, stochastic-rounding and
               momentum_dtype and fp16 master kernels' own (MASTER_PLANTS, QMOM_PLANTS,
               FP16M_PLANTS; the last built with only the fp16 master cases, 4 s each; the
               element-wise walker's alignment test, partial group and buffer store planted
               once per mode, caught by that mode's cases).
               A line that is no longer in the header fails the test (update the plant).

What this cannot see: performance, coalescing, the GPU memory model, nvcc's own code generation
(tests/test_cuda_build.py and a GPU do that). Needs only g++ and the CUDA headers (no nvcc run,
no GPU); skipped when the headers are missing.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ROOT / "csrc" / "cuda" / "sgd_kernel.cuh"
DRIVER = ROOT / "tests" / "cuda" / "host_kernel_test.cpp"
GRID_DRIVER = ROOT / "tests" / "cuda" / "flat_grid_test.cpp"
MASTER_DRIVER = ROOT / "tests" / "cuda" / "host_bf16_test.cpp"
QMOM_DRIVER = ROOT / "tests" / "cuda" / "host_qmom_test.cpp"


def _cuda_include() -> Path | None:
    candidates = [Path(os.environ[v]) / "include" for v in ("CUDA_HOME", "CUDA_PATH")
                  if os.environ.get(v)]
    candidates += [Path("/usr/local/cuda-13.0/include"), Path("/usr/local/cuda/include")]
    for inc in candidates:
        if all((inc / h).is_file() for h in ("cuda_bf16.h", "cuda_fp16.h", "vector_types.h")):
            return inc
    return None


CUDA_INC = _cuda_include()
pytestmark = pytest.mark.skipif(CUDA_INC is None,
                                reason="CUDA headers (cuda_bf16.h, vector_types.h) not found")

CXX = shutil.which("g++") or "g++"  # a missing g++ is a failure, not a skip
# The extension's C++ flags (-std, -ffp-contract=off, ...), then what differs here: -O1 after the
# shared -O3 (the last -O wins): the driver takes 52 s to compile at -O1 against 93 s at -O3
# (2 cores, two builds at once) and runs about as fast (23 s against 19 s), and this file builds
# it once per plant too. The warnings are the driver's own.
SHARED_CXX_FLAGS = json.loads((ROOT / "csrc" / "build_flags.json").read_text())["cxx"]
COMPILE_FLAGS = [*SHARED_CXX_FLAGS, "-O1", "-Wall", "-Wextra", "-Wno-unknown-pragmas"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
RUN_ENV = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")

# name -> (exact line of sgd_kernel.cuh, its replacement, a regex the failing output must match)
PLANTS = {
    # every block walks with the stride of one block: elements updated several times
    "grid_stride": (
        "  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;",
        "  const int64_t nthreads = static_cast<int64_t>(blockDim.x);",
        r"MISMATCH"),
    # the scalar tail runs one element past the span
    "tail_past_end": (
        "  for (int64_t i = head + packs * kN + tid; i < n; i += nthreads) {",
        "  for (int64_t i = head + packs * kN + tid; i <= n; i += nthreads) {",
        r"AddressSanitizer: heap-buffer-overflow|canary"),
    # GradScaler's found_inf is not read: an overflowed step updates the parameters
    "amp_found_inf_ignored": (
        "  return {a.found_inf != nullptr && *a.found_inf != 0.f,",
        "  return {false,",
        r"amp .*found_inf=1"),
    # first_step in device memory is not read: buffers already stepped take a first step
    "device_first_step_ignored": (
        "  return a.first_step != nullptr && !*a.first_step ? flags & ~kFirstStep : flags;",
        "  return flags;",
        r"amp .*first=device-false"),
    # an fp32 hyper-parameter in device memory is not read: the host's scalar (garbage in the
    # test) is used
    "device_hyper_f32_ignored": (
        "  if (p.f32 != nullptr) *v = static_cast<double>(*p.f32);",
        "",
        r"amp .*=fp32"),
    # a zero momentum in device memory still updates the buffer
    "device_zero_momentum": (
        "    if (v == 0) flags &= ~(kMomentum | kNesterov | kFirstStep);",
        "",
        r"amp .* m=fp(32|64) \(0\)"),
    # a momentum in device memory multiplies the buffer unrounded to bf16/fp16 (as torch's CPU
    # scalar would, not its 0-dim CUDA tensor)
    "device_momentum_unrounded": (
        "    s.momentum_mul = St::load(St::store(static_cast<O>(v)));",
        "    s.momentum_mul = static_cast<O>(v);",
        r"amp (bf16|fp16) .* m=fp(32|64)"),
    # a float32 dampening in device memory: 1 - d computed in double, not float32
    "device_dampening_in_double": (
        "    s.one_minus_dampening = static_cast<O>(mc_add(1.0f, -*d.dampening.f32));",
        "    s.one_minus_dampening = static_cast<O>(1.0 - static_cast<double>(*d.dampening.f32));",
        r"amp .* d=fp32"),
    # the clip coefficient is not applied: the unclipped gradient is stepped and written back
    "clip_ignored": (
        "  if (amp.clip) g = clip_scale(g, amp.coef, typename St::Round{});",
        "",
        r"amp .*clip=[0-9]"),
    # the unscaled gradient is not written back (the scalar path)
    "amp_grad_not_written": (
        "    g[i] = St::store(gi);",
        "",
        r"amp .*gradient"),
    # the head is computed wrong: the 16-byte packs start at a misaligned address
    "head_misaligned": (
        "  const int64_t head = static_cast<int64_t>((16 - mis) % 16 / sizeof(T));",
        "  const int64_t head = static_cast<int64_t>(mis / sizeof(T));",
        r"misaligned address"),
    # grad's alignment is not compared with param's: misaligned pack loads of grad
    "grad_alignment_unchecked": (
        "  if (reinterpret_cast<uintptr_t>(g) % 16 != mis) return -1;",
        "",
        r"misaligned address"),
    # plan_chunks: a span continued in the next batch keeps the pointers of the previous
    # batch's entry 0
    "list_continuation": (
        "          fill(a, 0, k);",
        "",
        r"MISMATCH|AddressSanitizer"),
}
# The same for cuda::flat_grid (the launcher's grid size), checked by tests/cuda/flat_grid_test.cpp
GRID_PLANTS = {
    # the grid is not capped at the resident blocks (a partial last wave on the GPU)
    "grid_uncapped": (
        "  return want < resident ? want : resident;",
        "  return want;",
        r"MISMATCH flat_grid"),
    # the round-up overflows int64 for spans near 2^63 elements
    "grid_overflow": (
        "  const int64_t want = numel / per_block + (numel % per_block != 0);  "
        "// no overflow near 2^63",
        "  const int64_t want = (numel + per_block - 1) / per_block;",
        r"signed integer overflow|MISMATCH flat_grid"),
}
# Lines of the walker all element-wise modes share (csrc/cuda/elementwise_kernel.cuh), where a
# mode's alignment test, partial group and buffer store now live: planted once per mode, each
# caught by that mode's cases
_EW = "cuda/elementwise_kernel.cuh"
_EW_ALIGNED = ("  MC_HD bool aligned() const { return (U == Use::kBuffer && ptr == nullptr) || "
               "aligned16(ptr); }")
_EW_GROUPS = "    const int64_t full = n / 8, groups = full + (n % 8 != 0);"
_EW_STORE = ("      if (U != Use::kBuffer || (flags & kMomentum)) "
             "*reinterpret_cast<Group*>(ptr + i) = v;")
# The same for the master kernel (host_bf16_test.cpp): name -> (file under csrc, line, its
# replacement, regex)
MASTER_PLANTS = {
    # the tie bit is not read: a master halfway between two bf16 values joins to the wrong one
    "master_tie_ignored": (
        "include/momentum_cuda/bf16_split.h",
        "  float m = mc_bf16_join(p[j], r[j], tie != 0u);",
        "  float m = mc_bf16_join(p[j], r[j], false);",
        r"MISMATCH"),
    # a span's last partial group of 8 is not stepped (the walker all element-wise modes share)
    "master_partial_group": (
        _EW,
        _EW_GROUPS,
        "    const int64_t full = n / 8, groups = full;",
        r"MISMATCH"),
    # the remainder's (and the parameter's: both are kReadWrite arrays) alignment is not checked
    # before their 16-byte accesses
    "master_rem_alignment": (
        _EW,
        _EW_ALIGNED,
        "  MC_HD bool aligned() const { return U == Use::kReadWrite || ptr == nullptr || "
        "aligned16(ptr); }",
        r"misaligned address"),
    # a chunk's tie bytes counted from the wrong byte
    "master_chunk_ties": (
        "cuda/master_kernel.cuh",
        "            {a.rem[t] + start}, a.ties[t] + start / 8};",
        "            {a.rem[t] + start}, a.ties[t] + start / 16};",
        r"MISMATCH"),
    # stochastic rounding: the key does not enter the random bits
    "sr_key_ignored": (
        "include/momentum_cuda/stochastic.h",
        "  return mc_lowbias32(key ^ static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32));",
        "  return mc_lowbias32(static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32));",
        r"MISMATCH"),
    # stochastic rounding: the parameter rounded to nearest
    "sr_round_to_nearest": (
        "include/momentum_cuda/stochastic.h",
        "  p[j] = mc_float_to_bf16_sr(m, rnd);",
        "  p[j] = mc_float_to_bf16_bits(m);",
        r"MISMATCH"),
    # stochastic rounding: a chunk's random bits counted from 0, not from its start
    "sr_chunk_index": (
        "cuda/sr_kernel.cuh",
        "            a.offset[t] + start, a.key[t]};",
        "            a.offset[t], a.key[t]};",
        r"MISMATCH"),
    # stochastic rounding: a shard's offset left out of the random bits' index
    "sr_offset_ignored": (
        "cuda/sr_kernel.cuh",
        "            a.offset[t] + start, a.key[t]};",
        "            start, a.key[t]};",
        r"MISMATCH"),
    # GradScaler's found_inf is not read (the walker all element-wise modes share): the
    # overflowed fourth step updates the parameters
    "master_found_inf_ignored": (
        _EW,
        "  if (amp_skips(a.found_inf)) return;",
        "",
        r"MISMATCH .*step=3"),
    # the hyper-parameters in device memory are not read (the walker all element-wise modes
    # share): the NaN scalars of step 1 are stepped with
    "ew_device_hyper_ignored": (
        _EW,
        "  const DeviceStep<float> d = device_step<float>(a.s, a.flags, a.dev);",
        "  const DeviceStep<float> d{a.s, a.flags};",
        r"MISMATCH .*step=1"),
    # the host's flags walk the chunk: a zero momentum in device memory still writes the buffer
    "ew_device_flags_ignored": (
        _EW,
        "  elementwise_span(Mode::chunk(a, t, start), n, d.s, d.flags, "
        "static_cast<int64_t>(threadIdx.x),",
        "  elementwise_span(Mode::chunk(a, t, start), n, d.s, a.flags, "
        "static_cast<int64_t>(threadIdx.x),",
        r"MISMATCH .*step=1"),
    # every table entry gets the first span's tie bytes
    "master_table_ties": (
        "cuda/master_kernel.cuh",
        "    x.ties[slot] = spans[k].ties;",
        "    x.ties[slot] = spans[0].ties;",
        r"MISMATCH|AddressSanitizer"),
}
# The same for the momentum_dtype kernels (host_qmom_test.cpp); a "line" may span several lines
QMOM_PLANTS = {
    # the int8 absmax reduced over half the warp: lanes 0-15 and 16-31 get different scales
    "q8_half_warp": (
        "cuda/qmom_kernel.cuh",
        "  for (int o = kWarp / 2; o > 0; o /= 2) {",
        "  for (int o = kWarp / 4; o > 0; o /= 2) {",
        r"MISMATCH int8"),
    # int8 chunks that are not whole blocks: a block straddles two chunks, the second one's
    # blocks and scales are counted from the wrong element
    "q8_chunk_not_whole_blocks": (
        "cuda/qmom_kernel.cuh",
        "constexpr int64_t kQChunk = kChunk;\n"
        'static_assert(kQChunk % kQBlock == 0, "an int8 chunk must be whole blocks");',
        "constexpr int64_t kQChunk = kChunk - kQBlock / 2;",
        r"MISMATCH int8"),
    # the new scale is never stored
    "q8_scale_not_written": (
        "cuda/qmom_kernel.cuh",
        "  if (lane == 0) *scale = ns;  // every lane has read the old one before warp_max",
        "",
        r"MISMATCH int8 .*scales\["),
    # the first step reads the old codes and scales (kFirstStep lost on the way to the kernel)
    "q8_first_step_reads_codes": (
        "cuda/qmom_kernel.cuh",
        "  a.flags = flags;\n  a.found_inf = found_inf;\n  a.dev = dev;\n"
        "  plan_chunks<Limits, kQChunk>(",
        "  a.flags = flags & ~kFirstStep;\n  a.found_inf = found_inf;\n  a.dev = dev;\n"
        "  plan_chunks<Limits, kQChunk>(",
        r"MISMATCH int8 .*step=0"),
    # the int8 kernel steps with the host's scalars and flags, not those read from device
    # memory (step 1: NaN scalars; a zero momentum there)
    "q8_device_hyper_ignored": (
        "cuda/qmom_kernel.cuh",
        "                  m, vec, d.s, d.flags, lane);",
        "                  m, vec, a.s, a.flags, lane);",
        r"MISMATCH int8 .*step=1"),
    # a span's last partial block is not stepped
    "q8_partial_block": (
        "cuda/qmom_kernel.cuh",
        "  const int64_t blocks = (n + kQBlock - 1) / kQBlock;",
        "  const int64_t blocks = n / kQBlock;",
        r"MISMATCH int8"),
    # the codes' alignment is not checked before their 8-byte accesses
    "q8_codes_alignment": (
        "cuda/qmom_kernel.cuh",
        "  const bool vec = aligned16(p) && aligned16(g) && (q == nullptr || aligned8(q));",
        "  const bool vec = aligned16(p) && aligned16(g);",
        r"misaligned address"),
    # without kMomentum the kernel still quantizes and writes codes and scales
    "q8_no_momentum_writes": (
        "cuda/qmom_kernel.cuh",
        "  if (!(flags & kMomentum)) return;  // the same in every lane",
        "",
        r"AddressSanitizer|runtime error|MISMATCH|canary"),
    # GradScaler's found_inf is not read by the int8 kernel: the overflowed fourth step
    # updates the parameters, codes and scales
    "q8_found_inf_ignored": (
        "cuda/qmom_kernel.cuh",
        "  if (amp_skips(a.found_inf)) return;",
        "",
        r"MISMATCH int8 .*step=3"),
    # every table entry gets the first span's scales
    "q8_table_scales": (
        "cuda/qmom_kernel.cuh",
        "        x.scales[slot] = mom ? spans[k].scales : nullptr;",
        "        x.scales[slot] = mom ? spans[0].scales : nullptr;",
        r"MISMATCH|AddressSanitizer"),
    # the bf16 buffer's alignment is not checked before its 16-byte accesses (a kBuffer array of
    # the walker all element-wise modes share)
    "bf16mom_buf_alignment": (
        _EW,
        _EW_ALIGNED,
        "  MC_HD bool aligned() const { return U == Use::kBuffer || aligned16(ptr); }",
        r"misaligned address"),
    # a span's last partial group of 8 is not stepped
    "bf16mom_partial_group": (
        _EW,
        _EW_GROUPS,
        "    const int64_t full = n / 8, groups = full;",
        r"MISMATCH bf16"),
    # the vector path does not store the new bf16 buffer (no kBuffer group is stored)
    "bf16mom_buffer_not_stored": (
        _EW,
        _EW_STORE,
        "      if (U != Use::kBuffer) *reinterpret_cast<Group*>(ptr + i) = v;",
        r"MISMATCH bf16 .*bf16 buffer"),
}
# The same for the fp16 master-weights kernel (host_qmom_test.cpp built with -DHQT_ONLY_FP16M)
FP16M_PLANTS = {
    # the parameter rounded from the old master (in the contract itself, so the kernel and the
    # naive loop agree: the test's independent rounding of the new master catches it)
    "fp16m_param_from_old_master": (
        "include/momentum_cuda/fp16_master.h",
        "  m[j] = mj;\n  p[j] = mc_float_to_fp16_bits(mj);",
        "  p[j] = mc_float_to_fp16_bits(m[j]);\n  m[j] = mj;",
        r"MISMATCH fp16m .*param \(not the new master's rounding\)"),
    # the vector path does not store the new buffer (no kBuffer group is stored)
    "fp16m_buffer_not_stored": (
        _EW,
        _EW_STORE,
        "      if (U != Use::kBuffer) *reinterpret_cast<Group*>(ptr + i) = v;",
        r"MISMATCH fp16m .*buffer\["),
    # a span's last partial group of 8 is not stepped
    "fp16m_partial_group": (
        _EW,
        _EW_GROUPS,
        "    const int64_t full = n / 8, groups = full;",
        r"MISMATCH fp16m"),
    # the master's alignment (its mode's only kReadWrite array) is not checked before its
    # 16-byte accesses
    "fp16m_master_alignment": (
        _EW,
        _EW_ALIGNED,
        "  MC_HD bool aligned() const { return U == Use::kReadWrite || ptr == nullptr || "
        "aligned16(ptr); }",
        r"misaligned address"),
}
FILE_PLANTS = {**MASTER_PLANTS, **QMOM_PLANTS, **FP16M_PLANTS}  # planted in a file under csrc
ALL_PLANTS = {**PLANTS, **GRID_PLANTS, **FILE_PLANTS}
# HKT_DTYPES of a plant's build (default 1: fp32 only, the fastest), for bugs fp32 cannot show
PLANT_DTYPES = {"device_momentum_unrounded": 4, "device_dampening_in_double": 2}


def _include_flags(first: Path | None = None) -> list[str]:
    dirs = ([first] if first else []) + [ROOT / "tests" / "cuda", ROOT / "csrc" / "cuda",
                                         ROOT / "csrc", ROOT / "csrc" / "include", CUDA_INC]
    return [f"-I{d}" for d in dirs]


def compile_command(out: Path, extra: list[str], first_include: Path | None = None,
                    driver: Path = DRIVER) -> list[str]:
    return [CXX, *COMPILE_FLAGS, *extra, *_include_flags(first_include), str(driver),
            "-o", str(out)]


def _compile(out: Path, extra: list[str], first_include: Path | None = None,
             driver: Path = DRIVER) -> tuple[Path, float]:
    cmd = compile_command(out, extra, first_include, driver)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"compile failed ({' '.join(cmd)}):\n{proc.stderr[-6000:]}")
    return out, time.monotonic() - t0


def _plant(tmp: Path, name: str) -> Path:
    """A copy of the real header (sgd_kernel.cuh, or a FILE_PLANTS file) with one bug planted,
    in a folder that goes first on the include path (at the header's path under csrc/cuda or
    csrc/include; a csrc/cuda header with copies of its siblings); returns the folder."""
    if name in FILE_PLANTS:
        rel, old, new, _ = FILE_PLANTS[name]
        header, dest = ROOT / "csrc" / rel, Path(*Path(rel).parts[1:])
    else:
        old, new, _ = ALL_PLANTS[name]
        header, dest = KERNEL, Path(KERNEL.name)
    src = header.read_text()
    n = src.count(old + "\n")
    assert n == 1, (f"planted bug {name!r}: the line {old!r} occurs {n} times in {header} "
                    "(expected exactly once): the kernel changed, update the plants")
    folder = tmp / name
    (folder / dest).parent.mkdir(parents=True)
    if header.parent == KERNEL.parent:
        # the kernel headers include each other with quotes, which look beside the including
        # file first: the patched header's siblings go beside it, so that every one of them
        # (sr_kernel.cuh including elementwise_kernel.cuh, ...) includes the patched copy
        for sibling in KERNEL.parent.iterdir():
            if sibling.suffix in (".cuh", ".h"):
                shutil.copy(sibling, folder / sibling.name)
    patched = src.replace(old + "\n", new + "\n")
    assert patched != src
    patched += f'\n#define HKT_PLANTED_BUG "{name}"\n'
    (folder / dest).write_text(patched)
    return folder


def _plant_and_compile(tmp: Path, name: str):
    folder = _plant(tmp, name)
    if name in GRID_PLANTS:
        return _compile(folder / "flat_grid_test", SANITIZE, folder, GRID_DRIVER)
    if name in MASTER_PLANTS:
        return _compile(folder / "host_bf16_test", SANITIZE, folder, MASTER_DRIVER)
    if name in QMOM_PLANTS:
        return _compile(folder / "host_qmom_test", SANITIZE, folder, QMOM_DRIVER)
    if name in FP16M_PLANTS:
        return _compile(folder / "host_qmom_test", [*SANITIZE, "-DHQT_ONLY_FP16M"], folder,
                        QMOM_DRIVER)
    dtypes = PLANT_DTYPES.get(name, 1)
    return _compile(folder / "host_kernel_test", [*SANITIZE, f"-DHKT_DTYPES={dtypes}"],
                    first_include=folder)


# test function -> the builds it runs (the plant tests: the build named by their parameter)
TEST_BUILDS = {
    "test_host_kernels_bitwise": ("plain",), "test_host_kernels_sanitized": ("sanitized",),
    "test_flat_grid": ("grid",), "test_host_master_kernel": ("master",),
    "test_host_master_kernel_sanitized": ("master_sanitized",),
    "test_host_qmom_kernels": ("qmom",), "test_host_qmom_kernels_sanitized": ("qmom_sanitized",),
    "test_host_fp16_master_kernel": ("qmom",),
    "test_host_fp16_master_kernel_sanitized": ("qmom_sanitized",),
}


def _selected_builds(session) -> set[str] | None:
    """The builds the selected tests of this module run (-k picks a few), or None for all."""
    wanted = set()
    for item in session.items:
        if Path(str(item.path)).resolve() != Path(__file__).resolve():
            continue
        fn = getattr(item, "originalname", item.name)
        if fn == "test_planted_bug_is_caught":
            wanted.add(item.callspec.params["name"])
        elif fn in TEST_BUILDS:
            wanted.update(TEST_BUILDS[fn])
        else:
            return None
    return wanted


@pytest.fixture(scope="module")
def builds(tmp_path_factory, request):
    """Starts every build the selected tests need at once (as many in parallel as there are
    cores); each test waits only for the build it runs."""
    tmp = tmp_path_factory.mktemp("cuda_host")
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    jobs = {
        "plain": (_compile, tmp / "plain", []),
        "sanitized": (_compile, tmp / "sanitized", [*SANITIZE, "-DHKT_DTYPES=7"]),
        "grid": (_compile, tmp / "flat_grid_test", SANITIZE, None, GRID_DRIVER),
        "master": (_compile, tmp / "host_bf16_test", [], None, MASTER_DRIVER),
        "master_sanitized": (_compile, tmp / "host_bf16_sanitized", SANITIZE, None,
                             MASTER_DRIVER),
        "qmom": (_compile, tmp / "host_qmom_test", [], None, QMOM_DRIVER),
        "qmom_sanitized": (_compile, tmp / "host_qmom_sanitized", SANITIZE, None, QMOM_DRIVER),
    }
    for name in ALL_PLANTS:
        jobs[name] = (_plant_and_compile, tmp, name)
    selected = _selected_builds(request.session)
    futures = {name: pool.submit(*job) for name, job in jobs.items()
               if selected is None or name in selected}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=600,
                          env=RUN_ENV)


def _cases(out: str) -> int:
    m = re.search(r"cases checked: (\d+)", out)
    assert m, f"no case count in the output:\n{out[-3000:]}"
    return int(m.group(1))


def _summary(proc, build_s, run_s) -> str:
    return (f"build {build_s:.1f} s, run {run_s:.1f} s, rc={proc.returncode}\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _built_run(builds, name: str, *args):
    """Runs build `name` (waiting for it) with args: (process, a report for failures)."""
    exe, build_s = builds[name].result()
    t0 = time.monotonic()
    proc = _run(exe, *args)
    return proc, _summary(proc, build_s, time.monotonic() - t0)


def test_host_kernels_bitwise(builds):
    proc, info = _built_run(builds, "plain")
    assert proc.returncode == 0, info
    assert "mismatches: 0" in proc.stdout, info
    assert _cases(proc.stdout) >= 25000, info  # a silently shrunk suite fails too
    print(info)


def test_host_kernels_sanitized(builds):
    proc, info = _built_run(builds, "sanitized", "--quick")
    assert proc.returncode == 0, info
    assert "runtime error" not in proc.stderr and "Sanitizer" not in proc.stderr, info
    assert "mismatches: 0" in proc.stdout, info
    assert _cases(proc.stdout) >= 5000, info
    print(info)


def test_flat_grid(builds):
    """The launcher's grid size (cuda::flat_grid) against its definition, under ASan + UBSan."""
    proc, info = _built_run(builds, "grid")
    assert proc.returncode == 0, info
    assert "runtime error" not in proc.stderr and "Sanitizer" not in proc.stderr, info
    m = re.search(r"flat_grid checks: (\d+), mismatches: 0$", proc.stdout, re.M)
    assert m and int(m.group(1)) >= 4 * 14 * 6, info
    print(info)


def test_host_master_kernel(builds):
    """The master-weights and stochastic-rounding kernels, bitwise against their references
    (host_bf16_test.cpp)."""
    proc, info = _built_run(builds, "master")
    assert proc.returncode == 0, info
    m = re.search(r"bf16 cases checked: (\d+) \(elements compared (\d+)", proc.stdout)
    assert m and int(m.group(1)) >= 160 and int(m.group(2)) >= 30_000_000, info
    assert "mismatches: 0" in proc.stdout, info
    print(info)


def test_host_master_kernel_sanitized(builds):
    proc, info = _built_run(builds, "master_sanitized", "--quick")
    assert proc.returncode == 0, info
    assert "runtime error" not in proc.stderr and "Sanitizer" not in proc.stderr, info
    assert "mismatches: 0" in proc.stdout, info
    print(info)


def test_host_qmom_kernels(builds):
    """The momentum_dtype kernels (bf16 and int8 buffers), bitwise against the element and block
    loops of momentum_dtype.h (host_qmom_test.cpp)."""
    proc, info = _built_run(builds, "qmom", "--only", "qmom")
    assert proc.returncode == 0, info
    m = re.search(r"qmom cases checked: (\d+) \(elements compared (\d+)", proc.stdout)
    assert m and int(m.group(1)) >= 200 and int(m.group(2)) >= 30_000_000, info
    assert "mismatches: 0" in proc.stdout, info
    print(info)


def test_host_qmom_kernels_sanitized(builds):
    proc, info = _built_run(builds, "qmom_sanitized", "--quick", "--only", "qmom")
    assert proc.returncode == 0, info
    assert "runtime error" not in proc.stderr and "Sanitizer" not in proc.stderr, info
    m = re.search(r"qmom cases checked: (\d+)", proc.stdout)
    assert m and int(m.group(1)) >= 120, info
    assert "mismatches: 0" in proc.stdout, info
    print(info)


def test_host_fp16_master_kernel(builds):
    """The fp16 master-weights kernel, bitwise against fp16_master_elem element by element, each
    parameter the compiler's fp16 rounding of its new master (host_qmom_test.cpp, its build)."""
    proc, info = _built_run(builds, "qmom", "--only", "fp16m")
    assert proc.returncode == 0, info
    m = re.search(r"fp16m cases checked: (\d+) \(elements compared (\d+)", proc.stdout)
    assert m and int(m.group(1)) >= 100 and int(m.group(2)) >= 12_000_000, info
    assert "mismatches: 0" in proc.stdout, info
    # the range edges were reached: fp16 overflow of a finite master, subnormals, NaN
    m = re.search(r"fp16m params seen: (\d+) inf with a finite master, (\d+) subnormal, (\d+) NaN",
                  proc.stdout)
    assert m and min(int(x) for x in m.groups()) >= 100, info
    print(info)


def test_host_fp16_master_kernel_sanitized(builds):
    proc, info = _built_run(builds, "qmom_sanitized", "--quick", "--only", "fp16m")
    assert proc.returncode == 0, info
    assert "runtime error" not in proc.stderr and "Sanitizer" not in proc.stderr, info
    m = re.search(r"fp16m cases checked: (\d+)", proc.stdout)
    assert m and int(m.group(1)) >= 60, info
    assert "mismatches: 0" in proc.stdout, info
    print(info)


@pytest.mark.parametrize("name", list(ALL_PLANTS))
def test_planted_bug_is_caught(builds, name):
    exe, build_s = builds[name].result()  # raises if the line to replace is gone
    t0 = time.monotonic()
    args = () if name in GRID_PLANTS else ("--quick", "--fail-fast")
    proc = _run(exe, *args)
    info = _summary(proc, build_s, time.monotonic() - t0)
    assert f"planted bug: {name}" in proc.stdout, "the patched header was not the one compiled\n" + info
    assert proc.returncode != 0, f"planted bug {name!r} was NOT caught\n" + info
    assert re.search(ALL_PLANTS[name][-1], proc.stdout + proc.stderr), (
        f"planted bug {name!r} failed, but not in the expected way\n" + info)
    print(info)
