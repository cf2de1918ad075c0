#!/usr/bin/env python3
"""The GPU check: one command on a GPU machine, in stages, under one deadline, its evidence
written as it goes.

    bash tools/gpu_check.sh              # on a GPU machine (python3 with a CUDA torch, nvcc)
    bash tools/gpu_check.sh --dry        # anywhere: each GPU stage in its dry form (make test)
    options: --deadline-s S (default 540), --out DIR, --stages NAME[,NAME...]

Evidence: under $OUT when it is set (a rented GPU machine returns only that folder), else
benchmarks/results/gpu-<UTC date and time>/. At most 8 files (FILES below): check.log (every
stage's output, appended line by line as it runs) and summary.txt (a verdict line per stage,
rewritten after each stage, at most ~4,000 characters, printed last), plus the benchmarks' files
(the headline's JSON, CSV and plot; the AMP+clip, overhead and other runs' JSON), each rewritten
after every benchmark case. A run cut at any point leaves everything that finished before the
cut, and the cut stage's output up to it.

Stages, in the order of what they prove. Each runs under its own timeout, min(budget, time left
before the deadline); the first two stop the run if they fail (nothing after them would mean
anything). Budgets are for the GPU machine (16 cores, H200) and sum to the default deadline of
540 s, 60 s under the 10-minute command limit; a stage that finishes early leaves its time to
the last stage, the rest of the benchmark.

  stage          budget  GPU form                                 dry form (no GPU)
  preflight        20 s  versions, Python.h, nvcc, sanitizer, GPU  the same, GPU not required
  build           100 s  build_ext --inplace for the visible GPU's  the same for sm_90 (2 cores)
                         arch only; the CUDA kernel must be built
                         (or, if that fails, a module carried in
                         build/carried/ must pass its checks: the
                         verdict says so) and a GPU visible, else
                         FAIL and stop                            and a copy of the module
                                                                  left in build/carried/
  probe            20 s  torch's CUDA add_ rounding (fma? alpha)   the same comparison on CPU
  tests-cuda       75 s  tests/test_gpu.py, cuda backend, bitwise, collection, and each test
                         4 processes at once (CUDA_JOBS: the       in exactly one job
                         compiled steps and inductor's
                         reduce-overhead apart)
  tests-triton    120 s  tests/test_gpu.py, triton backend, one    collection, and Triton's real
                         process per dtype and one for the modes   JIT on a stand-in driver
                         (JIT compilations)
  distributed      40 s  momentum_cuda/examples/fsdp.py under      2 processes on gloo (CPU)
                         torchrun: FSDP2 and DDP bitwise vs torch,
                         a dcp checkpoint round trip; NCCL, one
                         process per GPU, default and triton
                         backends; with 1 GPU also 2 processes on
                         gloo (CPU); the runs at once
  bench-headline   85 s  few-large and gpt2 at 100M and 1B, fp32   the same command at 100K on
                         and bf16: flat CUDA and Triton, torch      the CPU
                         for-loop, foreach, fused; copy bandwidth
  memcheck         80 s  compute-sanitizer memcheck on exact-size  tools/gpu_smoke.py on the CPU
                         tensors, caching allocator off
  bench-rest     (rest)  first --ampclip (GradScaler unscale_,    --ampclip: 148 tiny tensors
                         clip_grad_norm_, step, update vs torch's; and 100K; --overhead: 148
                         cases started within 40 s), --overhead    tensors, 20 rounds; then
                         (host time of a step of 148 and 2000      tiny, on the CPU, many-small,
                         tiny tensors, CUDA events; 30 s), then    ddp-gpt2 and fsdp2-gpt2
                         every layout (ddp-gpt2: DDP bucket
                         views; fsdp2-gpt2, DTensors, last) and
                         implementation, 10M, 1M, 100M, while
                         time is left

Why the budgets fit. Measured here (2 cores shared with other work, the dry run): the build
took 188 s for three translation units, about 40-60 s of one core each, which ninja compiles in
parallel on the GPU machine's 16 cores; tests/test_gpu.py's Triton
calls make 407 JIT compilations (tests/test_triton_jit.py counts them: 60 per dtype, plus 8
for opcheck, 16 for the tensor hyper-parameters and 12 for GradScaler and clip in fp32 and
bf16; 131 for the modes' kernels (master weights, stochastic rounding, momentum_dtype, fp16
masters; 85 of them for GradScaler's found_inf and hyper-parameters in tensors), whose cases
no dtype names, in a fifth process; 56 s for all of them on these 2 cores, so about 18 s for
the largest process), so five processes of 60-131 each fit 120 s; the CUDA tests move a few
MB per test,
and the two inductor reduce-overhead cases (22 s on these 2 cores, where inductor makes C++)
have a process of their own, as do the other compiled and graph-captured tests;
the headline benchmark's 8 cases each draw their data on the GPU once and run a bitwise check
plus 30 rounds of steps of at most 20 GB (about 5 ms at H200 bandwidth); memcheck slows
kernels 10-100x on tensors of at most 2^20 elements. The FSDP2/DDP example (a 26 k-parameter
MLP, 15 steps per setup) took 13-25 s per torchrun here, mostly imports and process start-up; the
GPU form runs its two or three torchruns at once on 16 cores. Its 40 s came from the build (its
three translation units in parallel: about 60 s) and the headline benchmark (whose --budget-s
only stops starting cases: the most important run first), which also gave 15 s to tests-cuda
when the inductor cases came. The dry budgets are for these 2 cores.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ("summary.txt", "check.log", "bench-headline.json", "bench-headline.csv",
         "bench-headline.png", "bench-ampclip.json", "bench-overhead.json", "bench-rest.json")
MAX_FILES = 8  # what a rented machine returns from $OUT
SUMMARY_MAX = 4000  # characters; the command's output keeps its last 12,000
RESERVE_S = 10  # kept back from the deadline for the summary
AMPCLIP_CAP_S = 40  # bench-rest's first part, the AMP+clip cases (3 small ones by default)
OVERHEAD_CAP_S = 30  # its second, --overhead (148 and 2000 tiny tensors: host time per step)
MIN_STAGE_S = 5  # a stage given less than this is skipped, not started
DTYPE_IDS = ("torch.float32", "torch.float64", "torch.bfloat16", "torch.float16")
HEADLINE_IMPLS = ("mc-flat-cuda", "mc-flat-triton", "torch-forloop", "torch-foreach",
                  "torch-fused")
PASS, FAIL, TIMEOUT, SKIP = "PASS", "FAIL", "TIMEOUT", "SKIP"


class Log:
    """check.log: lines appended and flushed as they come, from several threads."""

    def __init__(self, path: Path):
        self.f = path.open("a", buffering=1)
        self.lock = threading.Lock()

    def write(self, line: str) -> None:
        with self.lock:
            self.f.write(line if line.endswith("\n") else line + "\n")
            self.f.flush()


@dataclasses.dataclass
class Proc:
    rc: int | None  # None: killed at the stage's timeout
    out: str


class Ctx:
    """What a stage needs: the interpreter, the mode, the log, its own end time."""

    def __init__(self, out: Path, dry: bool, log: Log):
        self.out, self.dry, self.log = out, dry, log
        self.py = sys.executable
        self.facts: dict = {}  # preflight's findings, for later stages and the summary
        self.end = 0.0  # monotonic time at which the running stage is killed
        self.timed_out = False

    def left(self) -> float:
        return self.end - time.monotonic()

    def env(self, **extra) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, cmd: list, env: dict | None = None, label: str = "") -> Proc:
        return self.run_many([(label, cmd)], env)[0]

    def run_many(self, jobs: list, env: dict | None = None) -> list[Proc]:
        """Runs the (label, cmd) jobs at once in the repo root, each line of their output into
        check.log as it comes (prefixed by the label); kills every process group that is still
        running at the stage's end."""
        procs, outs, threads = [], [], []
        for label, cmd in jobs:
            self.log.write(f"$ {' '.join(map(str, cmd))}")
            p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, env=env or self.env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace", start_new_session=True)
            lines: list[str] = []
            prefix = f"[{label}] " if label and len(jobs) > 1 else ""

            def pump(p=p, lines=lines, prefix=prefix):
                for line in p.stdout:
                    lines.append(line)
                    self.log.write(prefix + line)

            t = threading.Thread(target=pump, daemon=True)
            t.start()
            procs.append(p)
            outs.append(lines)
            threads.append(t)
        rcs = []
        for p in procs:
            try:
                rcs.append(p.wait(timeout=max(0.0, self.left())))
            except subprocess.TimeoutExpired:
                rcs.append(None)
        if any(rc is None for rc in rcs):
            self.timed_out = True
            for p in procs:
                _kill(p)
            self.log.write(f"-- killed at the stage's timeout")
        for t in threads:
            t.join(timeout=5)
        return [Proc(rc, "".join(lines)) for rc, lines in zip(rcs, outs)]


def _kill(p: subprocess.Popen) -> None:
    """SIGTERM to p's process group, SIGKILL 5 s later if it is still there; then SIGKILL to
    every descendant of p that outlived it: those that started their own session, which a
    signal to p's group misses (torchrun starts each worker so, and stops them on SIGTERM)."""
    family = _descendants(p.pid)  # now: once p is gone they are re-parented, out of sight
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        try:
            p.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            continue
    for pid in family:
        try:
            if os.getpgid(pid) == pid:  # a group of its own: its children with it
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _descendants(pid: int) -> list[int]:
    """The live descendants of pid, from /proc (empty where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # the command name (2nd field) may hold spaces and ')': split after the last ')'
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _tail(text: str, n: int = 2, width: int = 160) -> str:
    """The last n lines, each cut to `width` characters: verdict details stay one short line."""
    return " | ".join(line[:width] for line in text.rstrip().splitlines()[-n:])


def _pytest_counts(out: str) -> dict:
    """{'passed': n, 'failed': n, ...} from pytest's closing line."""
    return {k: int(v) for v, k in re.findall(
        r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", out)}


# ---- stages ---------------------------------------------------------------------------------
def preflight(ctx: Ctx) -> tuple[str, str]:
    code = ("import json, sys, torch\n"
            "try:\n import triton; tv = triton.__version__\n"
            "except Exception as e: tv = f'not importable: {e}'\n"
            "gpu = torch.cuda.is_available()\n"
            "d = dict(python=sys.version.split()[0], torch=torch.__version__,\n"
            "         torch_cuda=torch.version.cuda, triton=tv, gpu=gpu, cpus=__import__('os')"
            ".cpu_count())\n"
            "if gpu:\n"
            " p = torch.cuda.get_device_properties(0)\n"
            " d.update(gpu_name=p.name, capability=f'{p.major}.{p.minor}', sms=p.multi_processor_count,\n"
            "          memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count())\n"
            "print('FACTS ' + json.dumps(d))\n")
    r = ctx.run([ctx.py, "-c", code])
    m = re.search(r"^FACTS (.*)$", r.out, re.M)
    if r.rc != 0 or not m:
        return FAIL, f"torch does not import: {_tail(r.out, 3)}"
    f = ctx.facts
    f.update(json.loads(m.group(1)))
    inc = Path(sysconfig.get_paths()["include"]) / "Python.h"
    f["python_h"] = inc.is_file()
    nvcc = _find_tool("nvcc")
    f["nvcc"] = _version_line([nvcc, "--version"]) if nvcc else None
    san = _find_tool("compute-sanitizer")
    f["sanitizer"] = san
    smi = shutil.which("nvidia-smi")
    if smi:
        f["driver"] = _version_line([smi, "--query-gpu=driver_version", "--format=csv,noheader"])
    f["arch"] = f.get("capability", "9.0")  # dry: the H200's
    ctx.log.write("facts: " + json.dumps(f))
    problems, notes = [], []
    # Either stops the build; the build stage can then run a carried module instead.
    carried = not ctx.dry and (CARRIED / _module_name()).is_file()
    for missing, what in ((not f["python_h"], f"no Python.h at {inc}"),
                          (not nvcc, "nvcc not found (PATH, CUDA_HOME, /usr/local/cuda*)")):
        if missing:
            (notes if carried else problems).append(what)
    if f["torch_cuda"] is None:
        problems.append(f"torch {f['torch']} is a CPU build")
    if not ctx.dry and not f["gpu"]:
        problems.append("torch sees no GPU")
    what = (f"python {f['python']}, torch {f['torch']}, triton {f['triton']}, "
            f"{f.get('gpu_name', 'no GPU')}" + (f" (sm_{f['arch'].replace('.', '')}, "
                                                 f"{f.get('sms')} SMs)" if f["gpu"] else "")
            + f", sanitizer {'found' if san else 'MISSING'}"
            + "".join(f"; {n} (a module is carried in)" for n in notes))
    return (FAIL, "; ".join(problems) + f" | {what}") if problems else (PASS, what)


def _find_tool(name: str) -> str | None:
    cands = [shutil.which(name)]
    cands += [os.path.join(os.environ[v], "bin", name) for v in ("CUDA_HOME", "CUDA_PATH")
              if os.environ.get(v)]
    cands += sorted(str(p) for p in Path("/usr/local").glob(f"cuda*/bin/{name}"))
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def _version_line(cmd: list) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (r.stdout.strip().splitlines() or ["?"])[-1]
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"? ({e})"


def build(ctx: Ctx) -> tuple[str, str]:
    arch = ctx.facts.get("arch", "9.0")
    env = ctx.env(TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=os.cpu_count() or 2)
    t0 = time.monotonic()
    r = ctx.run([ctx.py, "setup.py", "build_ext", "--inplace"], env=env)
    took = time.monotonic() - t0
    why = None
    if r.rc != 0:
        why = f"build failed (exit {r.rc}) after {took:.0f} s: {_tail(r.out, 2)}"
    elif "building the CPU and CUDA kernels" not in r.out:
        why = "setup.py built the CPU kernel only (see check.log for why)"
    carried = None
    if why is not None:
        carried = None if ctx.dry else _use_carried(ctx)
        if carried is None:
            return FAIL, why
    r = ctx.run([ctx.py, "tools/cuda_ext_check.py", "--installed"])
    if r.rc != 0:
        return FAIL, f"the built module fails its checks: {_tail(r.out, 2)}" + (
            f" (the carried module, after: {why})" if carried else "")
    gpu = "" if ctx.dry else ", GPU visible"
    if ctx.dry:  # ready to carry to the GPU machine: `run` with carry=["build/carried"]
        name = _module_name()
        CARRIED.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / "momentum_cuda" / name, CARRIED / name)
    if carried:
        return PASS, (f"NOT BUILT HERE: {why}; running the module built on the dev machine "
                      f"against the same torch, carried in ({carried}){gpu}")
    return PASS, f"CPU and CUDA kernels built for sm_{arch.replace('.', '')} in {took:.0f} s{gpu}"


CARRIED = ROOT / "build" / "carried"  # a module built by the dry run, carried to the GPU machine


def _module_name() -> str:
    return f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"


def _use_carried(ctx: Ctx) -> str | None:
    """When the build on the GPU machine fails (no Python.h, say), the module the dry run built
    against the same torch (2.11.0+cu130, sm_90) may be carried in build/carried/: copied into
    the package, and named in the build's verdict. It lives outside the package so that
    build_ext never finds it up to date and skips the build it is meant to stand in for."""
    name = _module_name()
    src = CARRIED / name
    if not src.is_file():
        ctx.log.write(f"no carried module at {src}")
        return None
    shutil.copy2(src, ROOT / "momentum_cuda" / name)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    ctx.log.write(f"copied the carried module {src} (sha256 {digest}) into momentum_cuda/")
    return f"{name}, sha256 {digest}"


def probe(ctx: Ctx) -> tuple[str, str]:
    r = ctx.run([ctx.py, "tools/gpu_rounding_probe.py", "--device", "cpu" if ctx.dry else "cuda"])
    m = re.search(r"^gpu_rounding_probe \((\w+)\): (.*)$", r.out, re.M)
    if not m:
        return FAIL, f"no verdict (exit {r.rc}): {_tail(r.out, 2)}"
    if ctx.dry:  # the CPU narrows bf16/fp16 alphas: the verdict itself is not the point here
        return PASS, f"dry: ran on the CPU and printed its verdict ({m.group(2)[:40]}...)"
    return (PASS if r.rc == 0 else FAIL), m.group(2)


def _pytest(ctx: Ctx, kexpr: str, jobs: list[str] | None = None) -> tuple[str, str]:
    """tests/test_gpu.py selected by -k; on the GPU one process per job (an extra -k term),
    all at once. Dry: collection, and the jobs must split the selection exactly (every test in
    one job), so that none is left out on the GPU."""
    base = [ctx.py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"]
    parts = [(j, base + ["-k", f"({kexpr}) and ({j})"]) for j in jobs] if jobs else [
        ("", base + ["-k", kexpr])]
    if ctx.dry:
        procs = ctx.run_many([(label, cmd + ["--collect-only"])
                              for label, cmd in [("all", base + ["-k", kexpr])] + parts])
        ids = [set(re.findall(r"^(tests/\S+::\S+)$", p.out, re.M)) for p in procs]
        bad = next((p for p in procs if p.rc != 0), None)
        if bad is not None or not ids[0]:
            return FAIL, f"collection failed or empty (exit {bad.rc if bad else 0}): " + _tail(
                (bad or procs[0]).out, 2)
        if jobs:
            chosen = [t for got in ids[1:] for t in got]
            if len(chosen) != len(set(chosen)) or set(chosen) != ids[0]:
                return FAIL, (f"the jobs {jobs} do not split the {len(ids[0])} tests: "
                              f"{len(ids[0] - set(chosen))} in none, "
                              f"{len(chosen) - len(set(chosen))} twice")
        return PASS, f"dry: {len(ids[0])} tests collected" + (
            f" in {len(jobs)} jobs ({', '.join(str(len(i)) for i in ids[1:])})" if jobs else "")
    env = ctx.env(MOMENTUM_CUDA_REQUIRE_GPU=1)
    procs = ctx.run_many(parts, env)
    counts: dict = {}
    for p in procs:
        for k, v in _pytest_counts(p.out).items():
            counts[k] = counts.get(k, 0) + v
    what = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no pytest summary"
    failed = [t for p in procs for t in re.findall(r"^(?:FAILED|ERROR) \S+::(\S+)", p.out, re.M)]
    if failed:  # the first few by name; check.log has them all, with their tracebacks
        what += "; first: " + ", ".join(failed[:3])
    if ctx.timed_out:
        return TIMEOUT, what
    ok = all(p.rc == 0 for p in procs) and counts.get("passed", 0) > 0 and not counts.get(
        "skipped")
    return (PASS if ok else FAIL), what


# tests-cuda's processes: the compiled steps (inductor and its code generation for the GPU)
# and the CUDA graphs apart from the rest, so that each runs beside the others
CUDA_JOBS = ("reduce_overhead", "not reduce_overhead and (compile or graph)",
             "bitwise_vs_torch_forloop",
             "not (reduce_overhead or compile or graph or bitwise_vs_torch_forloop)")


def tests_cuda(ctx: Ctx) -> tuple[str, str]:
    return _pytest(ctx, "not triton", jobs=list(CUDA_JOBS))


def tests_triton(ctx: Ctx) -> tuple[str, str]:
    # one process per dtype, and one for the cases named by no dtype (the modes' ops: master
    # weights, stochastic rounding, momentum_dtype, fp16 masters), which no dtype job selects
    others = "not (" + " or ".join(DTYPE_IDS) + ")"
    verdict, what = _pytest(ctx, "triton", jobs=[*DTYPE_IDS, others])
    if not ctx.dry or verdict != PASS:
        return verdict, what
    # Dry: Triton's real binder, specialization and compiler for every call of the stage.
    r = ctx.run([ctx.py, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                 "tests/test_triton_jit.py"])
    m = re.search(r"(\d+) (?:JIT )?compilations?[^\n]*", r.out)
    if r.rc != 0:
        return FAIL, f"{what}; tests/test_triton_jit.py failed: {_tail(r.out, 2)}"
    return PASS, f"{what}; stand-in JIT: {_tail(m.group(0), 1, 120) if m else 'passed'}"


FSDP_STEPS = 10  # the example's steps before its checkpoint (then 5 more)


def distributed_jobs(ctx: Ctx) -> list[tuple[str, list]]:
    """(label, command) of each torchrun of the distributed stage. GPU: NCCL, one process per
    GPU, with the default backend and (when triton imports) with triton; with fewer than 2 GPUs
    also 2 processes on gloo (CPU), so that more than one process runs. Dry: 2 on gloo."""
    def job(label: str, nproc: int, *args) -> tuple[str, list]:
        return label, [ctx.py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                       nproc, "-m", "momentum_cuda.examples.fsdp", "--steps", FSDP_STEPS, *args]
    gpus = 0 if ctx.dry else int(ctx.facts.get("gpus") or 0)
    jobs = []
    if gpus:
        jobs.append(job(f"nccl x{gpus}", gpus, "--device", "cuda"))
        if not str(ctx.facts.get("triton", "")).startswith("not importable"):
            jobs.append(job(f"nccl x{gpus} triton", gpus, "--device", "cuda", "--backend",
                            "triton"))
    if gpus < 2:
        jobs.append(job("gloo x2 cpu", 2, "--device", "cpu"))
    return jobs


def distributed(ctx: Ctx) -> tuple[str, str]:
    """momentum_cuda/examples/fsdp.py under torchrun (distributed_jobs, all at once): FSDP2 and
    DDP, bitwise against torch, through a torch.distributed.checkpoint round trip."""
    jobs = distributed_jobs(ctx)
    procs = ctx.run_many(jobs)
    verdicts = [fsdp_verdict(label, p) for (label, _), p in zip(jobs, procs)]
    failed = [what for ok, what in verdicts if not ok]
    if ctx.timed_out:
        return TIMEOUT, "; ".join(what for _, what in verdicts)
    if failed:
        return FAIL, "; ".join(failed)
    return PASS, (("dry: " if ctx.dry else "") + "FSDP2 and DDP bitwise equal to torch, through "
                  "a dcp checkpoint: " + ", ".join(label for label, _ in jobs))


def fsdp_verdict(label: str, p: Proc) -> tuple[bool, str]:
    """(passed, in words) from one run of the example: exit 0, `RESULT: PASS` and a VERDICT
    line per setup; else its MISMATCH lines or its last lines."""
    verdicts = re.findall(r"^VERDICT (\w+): (BITWISE EQUAL|MISMATCH)", p.out, re.M)
    if (p.rc == 0 and re.search(r"^RESULT: PASS", p.out, re.M) and verdicts
            and all(v == "BITWISE EQUAL" for _, v in verdicts)):
        return True, f"{label}: " + ", ".join(s for s, _ in verdicts) + " bitwise equal"
    why = "killed at the timeout" if p.rc is None else f"exit {p.rc}"
    bad = [s for s, v in verdicts if v == "MISMATCH"]
    first = re.search(r"^\s+rank \d+: .*differ.*$", p.out, re.M)
    return False, (f"{label}: {why}, " + (f"MISMATCH in {', '.join(bad)}: "
                                         f"{first.group(0).strip()[:120] if first else ''}"
                                         if bad else _tail(p.out, 2, 120)))


def _bench(ctx: Ctx, name: str, gpu_args: list, dry_args: list,
           cap: float | None = None) -> tuple[str, str]:
    # --budget-s only stops new cases from starting; a running 1 B case must still finish.
    margin = 30
    budget = max(1, int(min(ctx.left() - margin, cap if cap is not None else ctx.left())))
    args = dry_args if ctx.dry else gpu_args
    r = ctx.run([ctx.py, "-m", "momentum_cuda", "bench", *args, "--out", ctx.out, "--name", name,
                 "--budget-s", budget])
    doc = _load(ctx.out / f"{name}.json")
    if doc is None:
        return (TIMEOUT if ctx.timed_out else FAIL), f"no {name}.json (exit {r.rc})"
    cases, skipped = doc.get("cases", []), doc.get("skipped", [])
    failures = doc.get("failures", [])
    what = f"{len(cases)} cases, {len(skipped)} skipped" + (
        f", {len(failures)} failures ({_tail(doc.get('error') or '', 1, 120)})"
        if failures else "")
    if ctx.timed_out:
        return TIMEOUT, what
    return (PASS if r.rc == 0 and cases else FAIL), what


def bench_headline(ctx: Ctx) -> tuple[str, str]:
    bw = ctx.run([ctx.py, "tools/gpu_bandwidth.py", "--device", "cpu" if ctx.dry else "cuda"]
                 + (["--numel", "1000000"] if ctx.dry else []))
    m = re.search(r"^BANDWIDTH (.*)$", bw.out, re.M)
    if m:
        ctx.facts["copy"] = json.loads(m.group(1))
    gpu = ["--device", "cuda", "--params", "100M", "1B", "--layouts", "few-large", "gpt2",
           "--dtypes", "float32", "bfloat16", "--impls", *HEADLINE_IMPLS,
           "--formats", "json", "csv", "png"]
    dry = ["--device", "cpu", "--params", "100K", "--layouts", "few-large", "gpt2", "--dtypes",
           "float32", "bfloat16", "--impls", "mc-flat-cpu", "torch-forloop", "torch-foreach",
           "torch-fused", "--quick", "--formats", "json", "csv", "png"]
    verdict, what = _bench(ctx, "bench-headline", gpu, dry)
    if "copy" not in ctx.facts:
        return FAIL, f"{what}; the copy bandwidth probe failed: {_tail(bw.out, 2)}"
    return verdict, f"{what}; copy {ctx.facts['copy']['gbps']:.0f} GB/s"


def memcheck(ctx: Ctx) -> tuple[str, str]:
    smoke = [ctx.py, "tools/gpu_smoke.py"]
    if ctx.dry:
        r = ctx.run(smoke + ["--device", "cpu"])
        san = ctx.facts.get("sanitizer")
        ok = r.rc == 0 and "every kernel path ran" in r.out
        return (PASS if ok else FAIL), (f"dry: smoke ran on the CPU kernel; compute-sanitizer "
                                        f"{'at ' + san if san else 'not installed here'}")
    san = ctx.facts.get("sanitizer")
    if not san:
        return SKIP, "compute-sanitizer not found"
    # API errors are reported, not fatal: torch itself triggers and handles some (e.g. probing
    # peer access); memory errors are what this stage is for.
    r = ctx.run([san, "--tool", "memcheck", "--report-api-errors", "all", "--leak-check", "no",
                 *smoke], env=ctx.env(PYTORCH_NO_CUDA_MEMORY_CACHING=1))
    if ctx.timed_out:
        return TIMEOUT, "killed at the stage's timeout"
    return sanitizer_verdict(r.out, r.rc)


def sanitizer_verdict(out: str, rc: int | None) -> tuple[str, str]:
    """PASS when the program ran to its end and every error memcheck counted is an API error."""
    total = re.search(r"ERROR SUMMARY: (\d+) error", out)
    api = len(re.findall(r"^=+ Program hit \w+", out, re.M))
    if total is None:
        return FAIL, f"no compute-sanitizer summary (exit {rc})"
    memory = int(total.group(1)) - api
    ran = "every kernel path ran" in out and rc == 0
    what = f"{memory} memory errors, {api} API errors (reported, not fatal)"
    return (PASS if ran and memory == 0 else FAIL), what + ("" if ran else f"; smoke exit {rc}")


def bench_rest(ctx: Ctx) -> tuple[str, str]:
    """First the AMP+clip step (bench --ampclip: GradScaler.unscale_, clip_grad_norm_, step,
    update, against torch's; at most AMPCLIP_CAP_S of starting cases), then the host time of a
    step of tiny tensors (bench --overhead, issue 13's targets, CUDA events spanning the
    launches; OVERHEAD_CAP_S), then the other layouts while time is left."""
    amp_gpu = ["--ampclip", "--device", "cuda", "--formats", "json"]
    amp_dry = ["--ampclip", "--device", "cpu", "--tensors", "148", "--params", "100K", "--quick",
               "--formats", "json"]
    v_amp, what_amp = _bench(ctx, "bench-ampclip", amp_gpu, amp_dry, cap=AMPCLIP_CAP_S)
    ov_gpu = ["--overhead", "--device", "cuda", "--formats", "json"]
    ov_dry = ["--overhead", "--device", "cpu", "--tensors", "148", "--rounds", "20", "--warmup",
              "3", "--formats", "json"]
    v_ov, what_ov = _bench(ctx, "bench-overhead", ov_gpu, ov_dry, cap=OVERHEAD_CAP_S)
    gpu = ["--device", "cuda", "--params", "10M", "1M", "100M", "--layouts", "many-small",
           "resnet50", "few-large", "gpt2", "ddp-gpt2", "fsdp2-gpt2", "--formats", "json"]
    dry = ["--device", "cpu", "--params", "100K", "--layouts", "many-small", "ddp-gpt2",
           "fsdp2-gpt2",
           "--dtypes", "float32", "--quick", "--formats", "json"]
    v_rest, what_rest = _bench(ctx, "bench-rest", gpu, dry)
    verdict = next((v for v in (v_amp, v_ov) if v != PASS), v_rest)
    return verdict, f"ampclip: {what_amp}; overhead: {what_ov}; rest: {what_rest}"


@dataclasses.dataclass
class Stage:
    name: str
    budget: float | None  # seconds on the GPU machine; None: whatever is left
    dry_budget: float | None  # seconds of the dry form on a 2-core machine
    fn: object
    required: bool = False


STAGES = (Stage("preflight", 20, 30, preflight, required=True),
          Stage("build", 100, 420, build, required=True),
          Stage("probe", 20, 30, probe),
          Stage("tests-cuda", 75, 60, tests_cuda),
          Stage("tests-triton", 120, 240, tests_triton),
          Stage("distributed", 40, 120, distributed),
          Stage("bench-headline", 85, 120, bench_headline),
          Stage("memcheck", 80, 60, memcheck),
          Stage("bench-rest", None, None, bench_rest))
DEADLINE_S, DRY_DEADLINE_S = 540, 1200


# ---- the run --------------------------------------------------------------------------------
def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def headline_table(out: Path, copy: dict | None) -> list[str]:
    """The headline benchmark from its JSON, one short line per (case, implementation); the
    for-loop (the bitwise reference) is left to the JSON and CSV to keep the summary short."""
    doc = _load(out / "bench-headline.json")
    if not doc or not doc.get("cases"):
        return []
    lines = ["", "headline: median ms, GB/s, % of the add_ probe" + (", % of copy" if copy else "")
             + ", x foreach, x fused (> 1: faster)"]
    for c in doc["cases"]:
        probe_gbps = c.get("bandwidth_probe", {}).get("gbps") or 0
        lines.append(f"  {c['layout']} {c['numel']:,} {c['dtype']} (add_ probe "
                     f"{probe_gbps:.0f} GB/s)")
        for impl, m in c.get("mismatches", {}).items():
            lines.append(f"    {impl:14} BITWISE MISMATCH ({m.get('phase')}), not timed: "
                         f"{_tail(str(m.get('summary')), 1, 70)}")
        for impl, r in c.get("results", {}).items():
            if impl == "torch-forloop":
                continue
            gbps = r.get("gbps") or 0
            of_copy = f" {gbps / copy['gbps']:4.0%}" if copy else ""
            lines.append(f"    {impl:14} {r.get('median_ms', float('nan')):8.3f} {gbps:5.0f} "
                         f"{r.get('bw_share') or 0:4.0%}{of_copy} "
                         f"{r.get('vs_foreach', float('nan')):5.2f} "
                         f"{r.get('vs_fused', float('nan')):5.2f}")
    return lines


def overhead_lines(out: Path) -> list[str]:
    """bench --overhead's targets (issue 13), one line: before the headline table, which the
    summary's length limit may cut."""
    doc = _load(out / "bench-overhead.json")
    targets = [t for c in (doc or {}).get("cases", []) for t in c.get("targets", [])]
    if not targets:
        return []
    return ["", "overhead, host time of a step of tiny tensors (ratio of medians): " + "; ".join(
        f"{t['tensors']}: {t['implementation']} / {t['base']} {t['ratio']:.3f} "
        f"{'met' if t['met'] else 'NOT met'}" for t in targets)]


def write_summary(out: Path, header: list[str], results: list, ctx: Ctx) -> str:
    lines = list(header)
    for r in results:
        budget = "rest" if r["budget"] is None else f"{r['budget']:.0f}"
        lines.append(f"[{r['verdict']:7}] {r['stage']:14} {r['seconds']:5.0f} s / {budget:>4} s"
                     f"  {r['detail']}")
    lines += overhead_lines(out) + headline_table(out, ctx.facts.get("copy"))
    text = "\n".join(lines)
    if len(text) > SUMMARY_MAX:
        text = text[:SUMMARY_MAX - 40] + "\n... (cut; the rest is in check.log)"
    (out / "summary.txt").write_text(text + "\n")
    return text


def check_out(out: Path) -> list[str]:
    """What a rented machine would fail to return, or what breaks the file plan."""
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    # The bench writes .NAME.tmp then renames it: one left by a kill mid-write is no error,
    # but it counts towards the limit.
    problems = [f"unexpected file {f}" for f in files
                if f not in FILES and not (f.startswith(".") and f.endswith(".tmp"))]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files > {MAX_FILES}")
    if "summary.txt" not in files:
        problems.append("no summary.txt")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="no GPU: each stage's dry form")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help=f"default {DEADLINE_S} s; dry {DRY_DEADLINE_S} s")
    ap.add_argument("--out", type=Path, default=None, help="default: $OUT, else "
                    "benchmarks/results/gpu-<date>")
    ap.add_argument("--stages", default=None, help="comma-separated subset, in the fixed order")
    args = ap.parse_args(argv)
    if args.deadline_s is None:
        args.deadline_s = DRY_DEADLINE_S if args.dry else DEADLINE_S
    t0 = time.monotonic()
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else
                       ROOT / "benchmarks" / "results" / f"gpu-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    stale = [p for p in out.iterdir() if p.name in FILES]
    for p in stale:  # a rerun into the same folder starts clean
        p.unlink()
    log = Log(out / "check.log")
    ctx = Ctx(out, args.dry, log)
    wanted = set(args.stages.split(",")) if args.stages else None
    unknown = (wanted or set()) - {s.name for s in STAGES}
    if unknown:
        ap.error(f"--stages: unknown {sorted(unknown)}; stages: {[s.name for s in STAGES]}")
    commit = _version_line(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"])
    header = [f"momentum_cuda GPU check{' (DRY RUN, no GPU)' if args.dry else ''} "
              f"{stamp} UTC, commit {commit}, deadline {args.deadline_s:.0f} s"]
    log.write(header[0])
    results, stopped = [], None
    for st in STAGES:
        if wanted is not None and st.name not in wanted:
            continue
        left = args.deadline_s - (time.monotonic() - t0) - RESERVE_S
        budget = st.dry_budget if args.dry else st.budget
        timeout = left if budget is None else min(budget, left)
        s0 = time.monotonic()
        if stopped:
            verdict, detail = SKIP, f"not run: {stopped} failed"
        elif left < MIN_STAGE_S:
            verdict, detail = SKIP, f"not run: {max(0, left):.0f} s left before the deadline"
        else:
            print(f"== {st.name} (timeout {timeout:.0f} s)", flush=True)
            log.write(f"\n== {st.name}: budget {budget or 'rest'} s, timeout {timeout:.0f} s")
            ctx.end, ctx.timed_out = s0 + timeout, False
            try:
                verdict, detail = st.fn(ctx)
            except Exception:  # noqa: BLE001 - a broken stage is a FAIL with its traceback
                log.write(traceback.format_exc())
                verdict, detail = FAIL, "the stage raised: " + traceback.format_exc(
                    ).strip().splitlines()[-1]
            if ctx.timed_out and verdict in (PASS, FAIL):
                verdict = TIMEOUT
            if verdict != PASS and st.required:
                stopped = st.name
        results.append(dict(stage=st.name, verdict=verdict, seconds=time.monotonic() - s0,
                            budget=budget, detail=detail))
        log.write(f"-- {st.name}: {verdict} {detail}")
        print(f"   {verdict}: {detail}", flush=True)
        write_summary(out, header, results, ctx)
    total = time.monotonic() - t0
    header.append(f"total {total:.0f} s of {args.deadline_s:.0f} s; files in {out}")
    text = write_summary(out, header, results, ctx)
    problems = check_out(out)
    if problems:
        results.append(dict(stage="files", verdict=FAIL, seconds=0, budget=0,
                            detail="; ".join(problems)))
        text = write_summary(out, header, results, ctx)
    failed = [r["stage"] for r in results if r["verdict"] in (FAIL, TIMEOUT)]
    verdict = f"RESULT: {'FAIL (' + ', '.join(failed) + ')' if failed else 'PASS'}"
    (out / "summary.txt").write_text(text + "\n" + verdict + "\n")
    print("\n" + text + "\n" + verdict, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
