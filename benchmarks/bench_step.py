#!/usr/bin/env python3
"""Time ONE optimizer step: momentum_cuda.SGD (flat and per-tensor) against torch.optim.SGD's
for-loop (foreach=False), foreach (foreach=True) and fused (fused=True) implementations.

    python benchmarks/bench_step.py                      # 25 M fp32 params as 8 and as 2000 tensors
    python benchmarks/bench_step.py --quick              # CI smoke: 1 M params, 5 rounds
    python benchmarks/bench_step.py --numel 10000000 --tensors 1 64 --nesterov --weight-decay 1e-4

Method (the same for every implementation):
  * One random data set (params and gradients, gradients never zero) per case; every
    implementation gets its own copy of it, and the gradients are set once, before timing.
  * Before timing, momentum_cuda (flat and per-tensor) runs 2 steps on a copy next to torch's
    for-loop (the bitwise reference) and every parameter and momentum buffer must be torch.equal;
    the flat optimizer must make exactly one kernel call per step. Any failure exits non-zero.
  * Warm-up steps, then R rounds; each round times one step (time.perf_counter around
    opt.step()) of every implementation, in an order rotated by one each round. The garbage
    collector is off while timing. After the rounds, momentum_cuda must still be bitwise equal
    to the for-loop (all took the same steps on the same data).
  * Shared machines: CPU time used by other processes while timing is measured (/proc/stat) and
    reported. Before each case the script waits (--wait-idle) for the CPU to be idle, and a case
    timed while others used more than 0.1 core is timed again (--retries), with fresh optimizers
    for every implementation; the discarded attempts are kept in the JSON.
  * Reported: median, p10-p90 and IQR in ms per step, effective GB/s at 5 element reads+writes
    per parameter (p, g, buf read; p, buf written: 20 bytes for fp32), median ratios against
    foreach and fused (> 1: faster than that one), and the per-round paired ratio of the flat step
    against each of them (median and p10-p90).
Results go to a table on stdout and to <out>/<host kind>-<date>.json with machine information.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import momentum_cuda

REPO = Path(__file__).resolve().parent.parent
IMPLS = ("mc_flat", "mc_list", "forloop", "foreach", "fused")
LABELS = {
    "mc_flat": "momentum_cuda flat",
    "mc_list": "momentum_cuda per-tensor",
    "forloop": "torch for-loop",
    "foreach": "torch foreach",
    "fused": "torch fused",
}
# The targets for the flat step (25 M fp32 params, 2 threads): (tensors, against, ratio).
TARGETS = ((8, "foreach", 1.5), (2000, "foreach", 2.0), (None, "fused", 1.0))
NOISY_CORES = 0.1  # CPU used by others while timing above which a case is flagged as noisy
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


class BenchFailure(RuntimeError):
    pass


# ---- machine ------------------------------------------------------------------------------
def _cpuinfo() -> dict:
    info = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    m = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    if m:
        info["model"] = m.group(1).strip()
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    if m:
        wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16")
        have = set(m.group(1).split())
        info["flags"] = [f for f in wanted if f in have]
    return info


def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(device: torch.device) -> dict:
    cpu = _cpuinfo()
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")  # results files are not code
    info = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "cpu_model": cpu["model"],
        "cpu_flags": cpu["flags"],
        "nproc": os.cpu_count(),
        "nproc_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "momentum_cuda_version": momentum_cuda.__version__,
        "momentum_cuda_commit": _git("rev-parse", "HEAD"),
        "momentum_cuda_worktree_dirty": None if status is None else bool(status),
        "device": str(device),
        "loadavg_at_start": list(os.getloadavg()),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def host_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return device.type


# ---- data and optimizers ------------------------------------------------------------------
def split_sizes(numel: int, tensors: int, seed: int) -> list[int]:
    """numel split into `tensors` sizes that vary by +-50 % (so most are not multiples of a
    vector width: tails and alignment padding are part of the measurement)."""
    if not 1 <= tensors <= numel:
        raise SystemExit(f"--tensors {tensors} must be between 1 and --numel {numel}")
    w = np.random.default_rng(seed).uniform(0.5, 1.5, tensors)
    sizes = np.maximum(1, np.floor(w / w.sum() * numel).astype(np.int64))
    sizes[-1] += numel - int(sizes.sum())
    while sizes[-1] < 1:  # only for tiny numel: take from the largest
        i = int(np.argmax(sizes[:-1]))
        sizes[i] -= 1
        sizes[-1] += 1
    return [int(s) for s in sizes]


def random_tensors(sizes, dtype, device, gen, nonzero=False) -> list[torch.Tensor]:
    flat = torch.randn(sum(sizes), generator=gen, dtype=torch.float32)
    if nonzero:
        flat[flat == 0] = 1.0
    flat = flat.to(device=device, dtype=dtype)
    if nonzero and (flat == 0).any():  # an fp32 value that rounds to 0 in a narrower dtype
        flat[flat == 0] = 1.0
    return [t.clone() for t in flat.split(sizes)]


def make_optimizer(impl: str, init, grads, hyper: dict):
    params = []
    for x, g in zip(init, grads):
        p = x.clone().requires_grad_(True)
        p.grad = g.clone()
        params.append(p)
    if impl == "mc_flat":
        opt = momentum_cuda.SGD(params, flat=True, **hyper)
    elif impl == "mc_list":
        opt = momentum_cuda.SGD(params, flat=False, **hyper)
    else:
        kind = {"forloop": dict(foreach=False), "foreach": dict(foreach=True),
                "fused": dict(fused=True)}[impl]
        opt = torch.optim.SGD(params, **hyper, **kind)
    return opt, params


def check_flat_call(opt, numel: int) -> None:
    calls = opt.last_step
    if len(calls) != 1 or calls[0]["path"] != "flat" or calls[0]["numel"] != numel:
        raise BenchFailure(f"momentum_cuda flat did not make exactly one flat kernel call over "
                           f"{numel} elements; last_step = {calls}")


def compare(name: str, opt, params, ref_opt, ref_params, hyper) -> None:
    """torch.equal on every parameter and momentum buffer, or BenchFailure."""
    bad = []
    for i, (p, q) in enumerate(zip(params, ref_params)):
        if not torch.equal(p, q):
            bad.append(f"param {i}: max |diff| {(p.double() - q.double()).abs().max().item():.3g}")
        if hyper["momentum"] != 0:
            b = opt.state[p].get("momentum_buffer")
            r = ref_opt.state[q].get("momentum_buffer")
            if b is None or r is None or not torch.equal(b, r):
                bad.append(f"momentum buffer {i} differs")
        if len(bad) >= 5:
            break
    if bad:
        raise BenchFailure(f"{LABELS[name]} is NOT bitwise equal to torch for-loop: "
                           + "; ".join(bad))


def bitwise_check(init, grads, sizes, hyper, gen) -> dict:
    """2 steps (different gradients) of momentum_cuda flat and per-tensor next to torch's for-loop,
    on copies. Returns a summary; raises BenchFailure on any difference."""
    grads2 = random_tensors(sizes, init[0].dtype, init[0].device, gen)
    made = {name: make_optimizer(name, init, grads, hyper) for name in ("forloop", "mc_flat", "mc_list")}
    for step in (1, 2):
        if step == 2:
            for opt, params in made.values():
                with torch.no_grad():
                    for p, g in zip(params, grads2):
                        p.grad.copy_(g)
        for opt, _ in made.values():
            opt.step()
        check_flat_call(made["mc_flat"][0], sum(sizes))
    ref_opt, ref_params = made["forloop"]
    for name in ("mc_flat", "mc_list"):
        compare(name, *made[name], ref_opt, ref_params, hyper)
    return {"steps": 2, "equal": True, "compared": ["mc_flat", "mc_list"], "reference": "forloop"}


# ---- timing -------------------------------------------------------------------------------
def _cpu_snapshot():
    """(busy CPU seconds of the whole machine, steal seconds, this process's CPU seconds, wall)
    or None where /proc/stat cannot be read."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    busy = sum(fields[:8]) - idle - steal  # guest time is already inside user
    return busy / hz, steal / hz, time.process_time(), time.perf_counter()


def contention(before, after) -> dict | None:
    """CPU used by OTHER processes (and stolen by the hypervisor) while timing, in cores."""
    if before is None or after is None:
        return None
    wall = after[3] - before[3]
    others = max(0.0, (after[0] - before[0]) - (after[2] - before[2]))
    return {"other_processes_cores": others / wall, "steal_cores": (after[1] - before[1]) / wall,
            "this_process_cores": (after[2] - before[2]) / wall, "wall_s": wall}


def wait_for_idle(max_wait_s: float) -> float | None:
    """Sleep until other processes use < NOISY_CORES over a 1 s window, at most max_wait_s.
    Returns the seconds waited, or None if the machine never went quiet."""
    t0 = time.perf_counter()
    while True:
        before = _cpu_snapshot()
        time.sleep(1.0)
        busy = contention(before, _cpu_snapshot())
        if busy is None or busy["other_processes_cores"] + busy["steal_cores"] < NOISY_CORES:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 >= max_wait_s:
            return None


def timed_rounds(opts: dict, warmup: int, rounds: int, sync) -> tuple[dict, dict | None]:
    """Warm-up, then `rounds` rounds timing one step of each optimizer in a rotated order.
    Returns ({name: [ms per step]}, CPU contention while timing)."""
    names = list(opts)
    for _ in range(warmup):
        for name in names:
            opts[name].step()
    sync()
    times = {name: [] for name in names}
    gc.collect()
    gc.disable()
    before = _cpu_snapshot()
    try:
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                opt = opts[name]
                sync()
                t0 = time.perf_counter()
                opt.step()
                sync()
                times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        gc.enable()
    return times, contention(before, _cpu_snapshot())


def summarize(times: dict[str, list[float]], numel: int, bytes_per_param: int) -> dict:
    res = {}
    for name, ts in times.items():
        a = np.asarray(ts)
        p10, q1, med, q3, p90 = np.percentile(a, [10, 25, 50, 75, 90])
        res[name] = {"times_ms": [round(t, 6) for t in ts], "median_ms": med, "p10_ms": p10,
                     "p90_ms": p90, "q1_ms": q1, "q3_ms": q3, "min_ms": float(a.min()),
                     "mean_ms": float(a.mean()),
                     "gbps": numel * bytes_per_param / (med * 1e-3) / 1e9}
    for name in res:
        for base in ("foreach", "fused"):
            if base in res:
                res[name][f"vs_{base}"] = res[base]["median_ms"] / res[name]["median_ms"]
    return res


def paired(times: dict, name: str, base: str) -> dict:
    """Per-round ratio base/name (> 1: name faster), both timed in the same round."""
    r = np.asarray(times[base]) / np.asarray(times[name])
    p10, med, p90 = np.percentile(r, [10, 50, 90])
    return {"median": med, "p10": p10, "p90": p90, "rounds_faster": int((r > 1).sum()),
            "rounds": len(r)}


def time_case(args, init, grads, hyper: dict, numel: int, sync):
    """Fresh optimizers of every implementation, timed; then the bitwise check against the
    for-loop (all took the same steps on the same data). Returns (times, contention, checked)."""
    made = {name: make_optimizer(name, init, grads, hyper) for name in args.impls}
    opts = {name: opt for name, (opt, _) in made.items()}
    gc.collect()
    times, busy = timed_rounds(opts, args.warmup, args.rounds, sync)
    if "mc_flat" in opts:
        check_flat_call(opts["mc_flat"], numel)
    post = []
    if "forloop" in made:
        for name in ("mc_flat", "mc_list"):
            if name in made:
                compare(name, *made[name], *made["forloop"], hyper)
                post.append(name)
    del made, opts
    gc.collect()
    return times, busy, post


def is_noisy(busy: dict | None) -> bool:
    return busy is not None and busy["other_processes_cores"] + busy["steal_cores"] > NOISY_CORES


def run_case(tensors: int, args, hyper: dict, dtype, device, sync) -> dict:
    sizes = split_sizes(args.numel, tensors, args.seed + tensors)
    gen = torch.Generator().manual_seed(args.seed * 1000 + tensors)
    init = random_tensors(sizes, dtype, device, gen)
    grads = random_tensors(sizes, dtype, device, gen, nonzero=True)
    numel = sum(sizes)
    bytes_per_param = 5 * init[0].element_size()
    case_dtype = str(dtype).replace("torch.", "")
    print(f"\n== {numel:,} {case_dtype} params as {tensors} tensors (sizes {min(sizes):,}..{max(sizes):,})"
          f"  momentum={hyper['momentum']} nesterov={hyper['nesterov']} "
          f"weight_decay={hyper['weight_decay']}", flush=True)

    t0 = time.perf_counter()
    check = bitwise_check(init, grads, sizes, hyper, gen)
    gc.collect()
    print(f"bitwise check: momentum_cuda flat and per-tensor == torch for-loop after 2 steps "
          f"(torch.equal on every param and buffer), flat = 1 kernel call  "
          f"[{time.perf_counter() - t0:.1f} s]", flush=True)

    discarded = []  # attempts timed while other processes used the CPU (all implementations)
    for attempt in range(args.retries + 1):
        if args.wait_idle > 0:
            waited = wait_for_idle(args.wait_idle)
            print(f"waited {waited:.0f} s for an idle machine" if waited is not None else
                  f"the machine stayed busy for {args.wait_idle:.0f} s; timing anyway", flush=True)
        times, busy, post = time_case(args, init, grads, hyper, numel, sync)
        if not is_noisy(busy) or attempt == args.retries:
            break
        summary = {name: float(np.median(ts)) for name, ts in times.items()}
        discarded.append({"contention": busy, "median_ms": summary})
        print(f"attempt {attempt + 1} discarded: other processes used "
              f"{busy['other_processes_cores']:.2f} cores while timing (medians ms: "
              + ", ".join(f"{k} {v:.2f}" for k, v in summary.items()) + "); timing again",
              flush=True)
    del init, grads
    gc.collect()
    steps = args.warmup + args.rounds
    if post:
        print(f"after {steps} steps: {', '.join(LABELS[n] for n in post)} still == torch for-loop",
              flush=True)

    results = summarize(times, numel, bytes_per_param)
    case = {"tensors": tensors, "numel": numel, "sizes_min": min(sizes), "sizes_max": max(sizes),
            "dtype": str(dtype).replace("torch.", ""), "bytes_per_param": bytes_per_param,
            "bitwise_check": check, "post_timing_equal": post, "steps_per_impl": steps,
            "results": results, "paired": {}, "contention": busy,
            "discarded_noisy_attempts": discarded}
    if "mc_flat" in times:
        for base in ("foreach", "fused", "forloop"):
            if base in times:
                case["paired"][f"flat_vs_{base}"] = paired(times, "mc_flat", base)
    print_case(case)
    return case


# ---- report -------------------------------------------------------------------------------
def print_case(case: dict) -> None:
    res = case["results"]
    head = (f"{'implementation':<26}{'median ms':>10}{'p10 ms':>9}{'p90 ms':>9}{'IQR ms':>9}"
            f"{'GB/s':>8}{'vs foreach':>12}{'vs fused':>10}")
    print(head)
    print("-" * len(head))
    for name, r in res.items():
        vs = lambda k: f"{r[k]:.2f}x" if k in r else "-"  # noqa: E731
        print(f"{LABELS[name]:<26}{r['median_ms']:>10.2f}{r['p10_ms']:>9.2f}{r['p90_ms']:>9.2f}"
              f"{r['q3_ms'] - r['q1_ms']:>9.2f}{r['gbps']:>8.1f}{vs('vs_foreach'):>12}"
              f"{vs('vs_fused'):>10}")
    for key, p in case["paired"].items():
        print(f"  paired per round, {key.replace('_', ' ')}: median {p['median']:.2f}x "
              f"(p10 {p['p10']:.2f}x, p90 {p['p90']:.2f}x), flat faster in "
              f"{p['rounds_faster']}/{p['rounds']} rounds")
    print(f"  (GB/s at {case['bytes_per_param']} bytes/param; 'vs X' = X's median / this median, "
          f"> 1 is faster than X)")
    busy = case["contention"]
    if busy is not None:
        noisy = is_noisy(busy)
        print(f"  while timing: this process {busy['this_process_cores']:.2f} cores, other processes "
              f"{busy['other_processes_cores']:.2f} cores, steal {busy['steal_cores']:.2f} cores"
              + ("  << WARNING: the machine was busy, these numbers are not clean" if noisy else ""))


def evaluate_targets(cases: list[dict]) -> list[dict]:
    out = []
    for case in cases:
        res = case["results"]
        if "mc_flat" not in res:
            continue
        for tensors, base, want in TARGETS:
            if (tensors is not None and case["tensors"] != tensors) or base not in res:
                continue
            got = res["mc_flat"][f"vs_{base}"]
            p = case["paired"].get(f"flat_vs_{base}", {})
            out.append({"tensors": case["tensors"], "numel": case["numel"], "against": base,
                        "target": want, "median_ratio": got,
                        "paired_p10": p.get("p10"), "paired_p90": p.get("p90"),
                        "met": bool(got >= want),
                        "noisy_run": is_noisy(case["contention"]),
                        # the target lies inside the per-round spread: a tie at this noise level
                        "within_noise": bool(p and p["p10"] <= want <= p["p90"])})
    return out


def print_targets(targets: list[dict], args) -> None:
    if not targets:
        return
    print(f"\n== issue targets for the flat step (stated for 25 M fp32 params, 2 threads; this "
          f"run: {args.numel:,} params, {torch.get_num_threads()} threads)")
    for t in targets:
        verdict = "MET" if t["met"] else "NOT MET"
        if t["within_noise"]:
            verdict += " (target inside the paired p10-p90: within noise)"
        if t["noisy_run"]:
            verdict += " [NOT VALID: other processes used the CPU while timing]"
        extra = (f" (paired p10-p90 {t['paired_p10']:.2f}x-{t['paired_p90']:.2f}x)"
                 if t["paired_p10"] is not None else "")
        print(f"  {t['tensors']:>5} tensors: flat vs {t['against']:<8} {t['median_ratio']:.3f}x, "
              f"target >= {t['target']:.1f}x{extra}: {verdict}")


# ---- main ---------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--numel", type=int, default=25_000_000, help="parameters per case")
    ap.add_argument("--tensors", type=int, nargs="+", default=[8, 2000],
                    help="tensor counts, one case each (default: 8 2000)")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds (>= 20 unless --quick)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each first")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--nesterov", action="store_true")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wait-idle", type=float, default=None, metavar="S",
                    help="before timing each case, wait up to S seconds for other processes to "
                         "leave the CPU idle (default 120; 0 with --quick)")
    ap.add_argument("--retries", type=int, default=None,
                    help="time a case again (fresh optimizers) up to this many times when other "
                         "processes used the CPU while it was timed; discarded attempts are kept "
                         "in the JSON (default 3; 0 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke: 1 M params, 5 rounds, 1 warm-up step")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                    help="folder for the JSON results")
    ap.add_argument("--no-json", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.quick:
        args.numel = min(args.numel, 1_000_000)
        args.rounds = min(args.rounds, 5)
        args.warmup = min(args.warmup, 1)
    if args.wait_idle is None:
        args.wait_idle = 0.0 if args.quick else 120.0
    if args.retries is None:
        args.retries = 0 if args.quick else 3
    if not args.quick and args.rounds < 20:
        ap.error("--rounds must be >= 20 (or use --quick)")
    if args.rounds < 1 or args.warmup < 0:
        ap.error("--rounds must be >= 1 and --warmup >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    hyper = dict(lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                 nesterov=args.nesterov)
    machine = machine_info(device)
    print(f"momentum_cuda {machine['momentum_cuda_version']} @ "
          f"{(machine['momentum_cuda_commit'] or '?')[:12]}"
          f"{' (dirty worktree)' if machine['momentum_cuda_worktree_dirty'] else ''} | "
          f"torch {machine['torch']} | {machine['cpu_model']} | nproc {machine['nproc']} | "
          f"threads {machine['torch_num_threads']} | cpu capability "
          f"{machine['torch_cpu_capability']} | device {device} | load average "
          f"{machine['loadavg_at_start'][0]:.2f}")
    print(f"{args.rounds} rounds (order rotated each round) after {args.warmup} warm-up steps; "
          f"one opt.step() timed per implementation per round")

    cases, error = [], None
    try:
        for tensors in args.tensors:
            cases.append(run_case(tensors, args, hyper, dtype, device, sync))
    except BenchFailure as e:
        error = str(e)
        print(f"\nFAILED: {error}", file=sys.stderr)

    targets = evaluate_targets(cases)
    print_targets(targets, args)
    if not args.no_json:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = args.out / f"{host_kind(device)}-{'quick-' if args.quick else ''}{stamp}.json"
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        machine["loadavg_at_end"] = list(os.getloadavg())
        doc = {"machine": machine, "config": config, "hyper": hyper, "cases": cases,
               "targets": targets, "error": error}
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"\nwrote {path}")
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
