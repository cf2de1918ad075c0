"""`momentum-cuda bench`: time ONE optimizer step of every implementation that can run here.

    momentum-cuda bench                          # CPU: 1 M, 10 M, 100 M params; fp32 and bf16
    momentum-cuda bench --quick                  # 1 M params, 5 rounds: about a minute on 2 cores
    momentum-cuda bench --device cuda --params 10M 100M 1B --dtypes float32
    momentum-cuda bench --layouts resnet50 gpt2 --impls mc-flat-cpu torch-fused

Implementations: momentum_cuda flat and per-tensor on every backend that runs on the device
(cpu; cuda and triton on a GPU), torch.optim.SGD's for-loop, foreach and fused steps, and Apex
FusedSGD when it is installed. Layouts (each scaled to the total size, sizes kept in proportion):
few-large (8 tensors), many-small (2000 tensors), resnet50 (ResNet-50's 161 parameter tensors) and
gpt2 (GPT-2 small's 148), built from shapes, no download.

Method, the same for every implementation:
  * Correctness before timing: on copies of one random data set (gradients never zero), every
    momentum_cuda implementation takes 2 steps next to torch's for-loop, and every parameter and
    momentum buffer must be torch.equal; a flat optimizer must make one kernel call per step. Any
    difference fails the run (exit 1). torch foreach/fused and Apex are compared too, and whether
    they agree with the for-loop is reported, not enforced (torch does not promise it).
  * Timing: fresh optimizers, warm-up steps, then R rounds; each round times one opt.step() of
    every implementation (synchronized before each step) in an order rotated by one each round.
    CPU: time.perf_counter; GPU: CUDA events. Median and p10-p90 per implementation, and per-round
    paired ratios. On a GPU, each implementation is also captured in a CUDA graph (one replay =
    one step) for cases up to --graph-max params, where launch overhead matters.
  * Bandwidth in the same run: an in-place torch `a.add_(b)` over the same number of elements
    (reads a and b, writes a) is timed in the same rounds; "BW share" is an implementation's
    effective GB/s (5 element reads+writes per parameter: read p, g, buf; write p, buf) over that.
  * One extra, untimed step per implementation counts its kernels and the memory it allocates:
    CPU: aten ops seen by a TorchDispatchMode plus momentum_cuda's own kernel calls, and the bytes
    of fresh tensors those ops return; GPU: CUDA kernels in the profiler and the bytes the caching
    allocator handed out.
Results: a table on stdout, and <out>/bench-<device>-<date>.{json,csv,png}.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import momentum_cuda

from ._backends import resolve_backend

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
LAYOUTS = ("few-large", "many-small", "resnet50", "gpt2")
NOISY_CORES = 0.1  # CPU used by other processes while timing above which a case is flagged
BW_PROBE = "bandwidth-probe"  # the in-place a.add_(b) timed in the same rounds


class BenchFailure(RuntimeError):
    """An implementation gave other bits than torch's for-loop, or could not run."""


# ---- layouts ------------------------------------------------------------------------------
def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter shapes of torchvision's resnet50() (25,557,032 parameters)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    inp = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, inp, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (4 * width, width, 1, 1), (4 * width,), (4 * width,)]
            if b == 0:  # projection shortcut
                shapes += [(4 * width, inp, 1, 1), (4 * width,), (4 * width,)]
            inp = 4 * width
    return shapes + [(1000, 2048), (1000,)]


def gpt2_shapes(layers: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024):
    """The 148 parameter shapes of GPT-2 small (124,439,808 parameters, lm_head tied to wte)."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),  # ln_1, attn
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp
    return shapes + [(d,), (d,)]


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def scale_sizes(sizes: list[int], total: int) -> list[int]:
    """sizes rescaled to sum to total, in proportion, each >= 1 (needs total >= len(sizes))."""
    if total < len(sizes):
        raise ValueError(f"--params {total} is smaller than the layout's {len(sizes)} tensors")
    s = np.maximum(1, np.floor(np.asarray(sizes, dtype=np.float64) * total / sum(sizes)))
    s = s.astype(np.int64)
    diff = total - int(s.sum())  # the rounding remainder: onto (or off) the largest tensors
    for j in np.argsort(-s, kind="stable"):
        if diff >= 0:
            s[j] += diff
            break
        take = min(-diff, int(s[j]) - 1)
        s[j] -= take
        diff += take
    return [int(x) for x in s]


def layout_sizes(layout: str, total: int, seed: int) -> list[int]:
    """Tensor sizes of a layout at `total` parameters (few-large / many-small vary +-50 %, so
    most sizes are not multiples of a vector width: tails and padding are measured too)."""
    if layout in ("few-large", "many-small"):
        count = 8 if layout == "few-large" else 2000
        w = np.random.default_rng(seed).uniform(0.5, 1.5, count)
        return scale_sizes([float(x) for x in w * 1e6], total)
    shapes = resnet50_shapes() if layout == "resnet50" else gpt2_shapes()
    return scale_sizes([_numel(s) for s in shapes], total)


# ---- implementations ----------------------------------------------------------------------
@dataclasses.dataclass
class Impl:
    name: str
    label: str
    make: object  # (params, hyper) -> optimizer
    ours: bool  # momentum_cuda: must be bitwise equal to torch's for-loop
    flat: bool = False


def implementations(device: torch.device) -> tuple[list[Impl], dict[str, str]]:
    """(the implementations that run on `device`, {name: why not} for the others)."""
    impls, missing = [], {}
    for backend in ("cpu", "cuda", "triton"):
        try:
            resolve_backend(backend, device)
        except RuntimeError as e:
            missing[f"mc-*-{backend}"] = str(e)
            continue
        for flat in (True, False):
            kind = "flat" if flat else "per-tensor"
            impls.append(Impl(f"mc-{'flat' if flat else 'list'}-{backend}",
                              f"momentum_cuda {kind} ({backend})",
                              lambda ps, h, b=backend, f=flat: momentum_cuda.SGD(
                                  ps, backend=b, flat=f, **h), ours=True, flat=flat))
    for name, kw in (("forloop", dict(foreach=False)), ("foreach", dict(foreach=True)),
                     ("fused", dict(fused=True))):
        impls.append(Impl(f"torch-{name}", f"torch {name.replace('forloop', 'for-loop')}",
                          lambda ps, h, kw=kw: torch.optim.SGD(ps, **h, **kw), ours=False))
    try:
        from apex.optimizers import FusedSGD  # optional; GPU only
        if device.type != "cuda":
            missing["apex-fused-sgd"] = "Apex FusedSGD runs on CUDA tensors only"
        else:
            impls.append(Impl("apex-fused-sgd", "Apex FusedSGD",
                              lambda ps, h: FusedSGD(ps, **h), ours=False))
    except ImportError as e:
        missing["apex-fused-sgd"] = f"apex is not installed ({e})"
    return impls, missing


def random_tensors(sizes, dtype, device, gen, nonzero=False) -> list[torch.Tensor]:
    flat = torch.randn(sum(sizes), generator=gen, dtype=torch.float32)
    flat = flat.to(device=device, dtype=dtype)
    if nonzero:  # includes fp32 values that round to 0 in a narrower dtype
        flat[flat == 0] = 1.0
    return [t.clone() for t in flat.split(sizes)]


def build(impl: Impl, init, grads, hyper):
    """(optimizer, params) over fresh copies of init, with .grad set once (never zero)."""
    params = []
    for x, g in zip(init, grads):
        p = x.clone().requires_grad_(True)
        p.grad = g.clone()
        params.append(p)
    return impl.make(params, hyper), params


def _check_flat(impl: Impl, opt, numel: int) -> None:
    calls = opt.last_step
    if impl.flat and (len(calls) != 1 or calls[0]["path"] != "flat"
                      or calls[0]["numel"] != numel):
        raise BenchFailure(f"{impl.label} did not make exactly one flat kernel call over {numel} "
                           f"elements; last_step = {calls}")


def differences(opt, params, ref_opt, ref_params, momentum: float) -> list[str]:
    """Where (opt, params) and the reference differ bitwise (parameters and momentum buffers)."""
    bad = []
    for i, (p, q) in enumerate(zip(params, ref_params)):
        if not torch.equal(p, q):
            bad.append(f"param {i}: max |diff| {(p.double() - q.double()).abs().max().item():.3g}")
        if momentum != 0:
            b = opt.state[p].get("momentum_buffer")
            r = ref_opt.state[q].get("momentum_buffer")
            if b is None or r is None or not torch.equal(b, r):
                bad.append(f"momentum buffer {i} differs")
        if len(bad) >= 4:
            break
    return bad


def bitwise_check(impls: list[Impl], init, grads, grads2, hyper) -> tuple[dict, dict]:
    """2 steps of every implementation next to torch's for-loop, on copies. Returns
    ({name: equal to the for-loop}, {name: error}) for those that could not run; raises
    BenchFailure when a momentum_cuda implementation differs or fails."""
    ref = next(i for i in impls if i.name == "torch-forloop")
    made, errors = {}, {}
    for impl in impls:
        try:
            made[impl.name] = build(impl, init, grads, hyper)
        except Exception as e:  # noqa: BLE001 - torch impls may not support a dtype/device
            if impl.ours:
                raise BenchFailure(f"{impl.label} could not be built: {e}") from e
            errors[impl.name] = f"{type(e).__name__}: {e}"
    numel = sum(t.numel() for t in init)
    for step in (1, 2):
        for impl in impls:
            if impl.name not in made:
                continue
            opt, params = made[impl.name]
            if step == 2:
                with torch.no_grad():
                    for p, g in zip(params, grads2):
                        p.grad.copy_(g)
            try:
                opt.step()
            except Exception as e:  # noqa: BLE001
                if impl.ours:
                    raise BenchFailure(f"{impl.label} failed: {e}") from e
                errors[impl.name] = f"{type(e).__name__}: {e}"
                del made[impl.name]
                continue
            if impl.ours:
                _check_flat(impl, opt, numel)
    equal = {}
    for impl in impls:
        if impl.name in made and impl is not ref:
            bad = differences(*made[impl.name], *made[ref.name], hyper["momentum"])
            if bad and impl.ours:
                raise BenchFailure(f"{impl.label} is NOT bitwise equal to torch for-loop after "
                                   f"2 steps: " + "; ".join(bad))
            equal[impl.name] = not bad
    equal[ref.name] = True
    return equal, errors


# ---- measuring one step -------------------------------------------------------------------
class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that run a kernel (not views, not the profiler's record_function markers of
    Optimizer.step) and the bytes of fresh storages they return (not aliases of inputs)."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.namespace == "profiler" or func.is_view:
            return out
        self.ops += 1
        seen = {t.untyped_storage().data_ptr()
                for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                self.bytes += t.untyped_storage().nbytes()
        return out


def step_cost(impl: Impl, init, grads, hyper, device) -> dict:
    """Kernels and allocated bytes of one steady-state step (the second), untimed."""
    opt, _ = build(impl, init, grads, hyper)
    opt.step()
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_stats(device).get("allocated_bytes.all.allocated", 0)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize(device)
        after = torch.cuda.memory_stats(device).get("allocated_bytes.all.allocated", 0)
        kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                      and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
        return {"kernels": kernels, "alloc_bytes": after - before, "kernels_counted": "cuda"}
    counter = _OpCounter()
    with counter:
        opt.step()
    ours = len(opt.last_step) if impl.ours else 0  # pybind calls bypass the dispatcher
    return {"kernels": counter.ops + ours, "alloc_bytes": counter.bytes,
            "kernels_counted": "aten ops + momentum_cuda kernel calls"}


# ---- timing -------------------------------------------------------------------------------
def _cpu_snapshot():
    """(busy CPU seconds of the machine, steal seconds, this process's CPU seconds, wall) or None
    where /proc/stat cannot be read."""
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


def is_noisy(busy: dict | None) -> bool:
    return busy is not None and busy["other_processes_cores"] + busy["steal_cores"] > NOISY_CORES


def wait_for_idle(max_wait_s: float) -> float | None:
    """Sleep until other processes use < NOISY_CORES over 1 s, at most max_wait_s. Returns the
    seconds waited, or None if the machine never went quiet."""
    t0 = time.perf_counter()
    while True:
        before = _cpu_snapshot()
        time.sleep(1.0)
        busy = contention(before, _cpu_snapshot())
        if busy is None or not is_noisy(busy):
            return time.perf_counter() - t0
        if time.perf_counter() - t0 >= max_wait_s:
            return None


class Clock:
    """Times one call: perf_counter on CPU, CUDA events on a GPU; synchronized before each call
    so that a step's launch overhead is inside its own time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn) -> float:
        self.sync()
        if self.cuda:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def cuda_graph_step(opt, device):
    """A CUDA graph of one opt.step() (after a warm-up step on a side stream, as torch's docs
    ask); returns graph.replay. Raises if the step cannot be captured."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def timed_rounds(steps: dict, warmup: int, rounds: int, clock: Clock):
    """Warm-up, then `rounds` rounds timing one call of each step function in a rotated order.
    Returns ({name: [ms]}, CPU contention while timing)."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    clock.sync()
    times = {name: [] for name in names}
    gc.collect()
    gc.disable()
    before = _cpu_snapshot()
    try:
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(clock.time_ms(steps[name]))
    finally:
        gc.enable()
    return times, contention(before, _cpu_snapshot())


def summarize(ts: list[float]) -> dict:
    a = np.asarray(ts)
    p10, q1, med, q3, p90 = (float(x) for x in np.percentile(a, [10, 25, 50, 75, 90]))
    return {"median_ms": med, "p10_ms": p10, "p90_ms": p90, "iqr_ms": q3 - q1,
            "min_ms": float(a.min()), "times_ms": [round(t, 6) for t in ts]}


def paired(times: dict, name: str, base: str) -> dict:
    """Per-round ratio base/name (> 1: name faster), both timed in the same round."""
    r = np.asarray(times[base]) / np.asarray(times[name])
    p10, med, p90 = (float(x) for x in np.percentile(r, [10, 50, 90]))
    return {"median": med, "p10": p10, "p90": p90, "rounds_faster": int((r > 1).sum()),
            "rounds": len(r)}


# ---- one case -----------------------------------------------------------------------------
def run_case(layout, total, dtype, impls, hyper, args, device, clock) -> dict:
    seed = args.seed + total % 9973 + LAYOUTS.index(layout) * 7
    sizes = layout_sizes(layout, total, seed)
    gen = torch.Generator().manual_seed(seed)
    init = random_tensors(sizes, dtype, device, gen)
    grads = random_tensors(sizes, dtype, device, gen, nonzero=True)
    grads2 = random_tensors(sizes, dtype, device, gen, nonzero=True)
    esize = init[0].element_size()
    case = {"layout": layout, "numel": total, "tensors": len(sizes), "sizes_min": min(sizes),
            "sizes_max": max(sizes), "dtype": str(dtype).replace("torch.", ""),
            "bytes_per_param": 5 * esize}
    equal, errors = bitwise_check(impls, init, grads, grads2, hyper)
    del grads2
    runnable = [i for i in impls if i.name not in errors]
    case["bitwise_vs_forloop"], case["errors"] = equal, errors

    discarded = []
    for attempt in range(args.retries + 1):
        if args.wait_idle > 0 and device.type == "cpu":
            wait_for_idle(args.wait_idle)
        made = {i.name: build(i, init, grads, hyper) for i in runnable}
        steps = {name: opt.step for name, (opt, _) in made.items()}
        bw_a, bw_b = init[0].new_empty(total), grads[0].new_empty(total)
        bw_a.copy_(torch.cat(init)), bw_b.copy_(torch.cat(grads))
        steps[BW_PROBE] = lambda: bw_a.add_(bw_b, alpha=-1e-3)
        if device.type == "cuda" and total <= args.graph_max:
            graph_made = {i.name: build(i, init, grads, hyper) for i in runnable}
            for name, (opt, _) in graph_made.items():
                try:
                    steps[name + "+graph"] = cuda_graph_step(opt, device)
                except Exception as e:  # noqa: BLE001 - report what cannot be captured
                    case["errors"][name + "+graph"] = f"not capturable: {type(e).__name__}: {e}"
        times, busy = timed_rounds(steps, args.warmup, args.rounds, clock)
        if not is_noisy(busy) or attempt == args.retries or device.type != "cpu":
            break
        discarded.append({"contention": busy,
                          "median_ms": {k: float(np.median(v)) for k, v in times.items()}})
        del made, steps
    # Every implementation took warmup + rounds steps (after the 2 checked above, on their own
    # copies): momentum_cuda must still be bitwise equal to the for-loop.
    ref = made.get("torch-forloop")
    for impl in runnable:
        if impl.ours and ref is not None:
            bad = differences(*made[impl.name], *ref, hyper["momentum"])
            if bad:
                raise BenchFailure(f"{impl.label} drifted from torch for-loop while timing: "
                                   + "; ".join(bad))
    del made, steps, init, grads, bw_a, bw_b
    gc.collect()

    bw_ms = float(np.median(times[BW_PROBE]))
    case["bandwidth_probe"] = {"op": "a.add_(b, alpha)", "bytes_per_element": 3 * esize,
                               "gbps": total * 3 * esize / (bw_ms * 1e-3) / 1e9,
                               **summarize(times.pop(BW_PROBE))}
    results = {}
    for name, ts in times.items():
        r = summarize(ts)
        r["gbps"] = total * 5 * esize / (r["median_ms"] * 1e-3) / 1e9
        r["bw_share"] = r["gbps"] / case["bandwidth_probe"]["gbps"]
        results[name] = r
    for name, r in results.items():
        for base in ("torch-foreach", "torch-fused"):
            if base in results:
                r["vs_" + base.split("-")[1]] = results[base]["median_ms"] / r["median_ms"]
                r["paired_vs_" + base.split("-")[1]] = paired(times, name, base)
    for impl in runnable:
        results[impl.name].update(step_cost(impl, *_regen(sizes, dtype, device, seed), hyper,
                                            device))
    case.update(results=results, contention=busy, discarded_noisy_attempts=discarded,
                steps_timed=args.warmup + args.rounds)
    return case


def _regen(sizes, dtype, device, seed):
    """The case's init and grads again (freed while timing, to keep the peak memory down)."""
    gen = torch.Generator().manual_seed(seed)
    init = random_tensors(sizes, dtype, device, gen)
    return init, random_tensors(sizes, dtype, device, gen, nonzero=True)


# ---- report -------------------------------------------------------------------------------
COLUMNS = ("implementation", "median ms", "p10-p90 ms", "GB/s", "BW share", "vs foreach",
           "vs fused", "kernels", "alloc MB", "== for-loop")


def table_rows(case: dict, labels: dict) -> list[list[str]]:
    rows = []
    for name, r in case["results"].items():
        base = name.removesuffix("+graph")
        eq = case["bitwise_vs_forloop"].get(base)
        vs = lambda k: f"{r[k]:.2f}x" if k in r else "-"  # noqa: E731
        rows.append([labels.get(base, base) + (" +graph" if name != base else ""),
                     f"{r['median_ms']:.3f}", f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}",
                     f"{r['gbps']:.1f}", f"{100 * r['bw_share']:.0f}%", vs("vs_foreach"),
                     vs("vs_fused"), str(r.get("kernels", "-")),
                     f"{r['alloc_bytes'] / 1e6:.1f}" if "alloc_bytes" in r else "-",
                     "-" if name != base else ("yes" if eq else "NO")])
    return rows


def print_case(case: dict, labels: dict, out=sys.stdout) -> None:
    rows = table_rows(case, labels)
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    bw = case["bandwidth_probe"]
    print(f"\n== {case['layout']}: {case['numel']:,} {case['dtype']} params in {case['tensors']} "
          f"tensors ({case['sizes_min']:,}..{case['sizes_max']:,}); bandwidth probe "
          f"{bw['gbps']:.1f} GB/s", file=out)
    print(fmt(COLUMNS), file=out)
    print("-" * len(fmt(COLUMNS)), file=out)
    for row in rows:
        print(fmt(row), file=out)
    for name, err in case["errors"].items():
        print(f"  {labels.get(name, name)}: not timed ({err})", file=out)
    busy = case["contention"]
    if is_noisy(busy):
        print(f"  WARNING: other processes used {busy['other_processes_cores']:.2f} cores while "
              f"timing: these numbers are not clean", file=out)


CSV_FIELDS = ("device", "dtype", "layout", "numel", "tensors", "implementation", "cuda_graph",
              "median_ms", "p10_ms", "p90_ms", "iqr_ms", "gbps", "bw_share", "vs_foreach",
              "vs_fused", "kernels", "alloc_bytes", "bitwise_vs_forloop",
              "bandwidth_probe_gbps")


def csv_rows(doc: dict):
    for case in doc["cases"]:
        for name, r in case["results"].items():
            base = name.removesuffix("+graph")
            yield {"device": doc["machine"]["device"], "dtype": case["dtype"],
                   "layout": case["layout"], "numel": case["numel"], "tensors": case["tensors"],
                   "implementation": base, "cuda_graph": name != base,
                   **{k: r.get(k, "") for k in ("median_ms", "p10_ms", "p90_ms", "iqr_ms",
                                                "gbps", "bw_share", "vs_foreach", "vs_fused",
                                                "kernels", "alloc_bytes")},
                   "bitwise_vs_forloop": case["bitwise_vs_forloop"].get(base, ""),
                   "bandwidth_probe_gbps": case["bandwidth_probe"]["gbps"]}


def plot(doc: dict, path: Path, labels: dict) -> None:
    """GB/s (log) against total size, one panel per (dtype, layout), one line per
    implementation (dotted: its CUDA-graph replay), the bandwidth probe dashed."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = doc["cases"]
    dtypes = [d for d in DTYPES if any(c["dtype"] == d for c in cases)]
    layouts = [lay for lay in LAYOUTS if any(c["layout"] == lay for c in cases)]
    fig, axes = plt.subplots(len(dtypes), len(layouts), squeeze=False,
                             figsize=(4.2 * len(layouts), 3.6 * len(dtypes) + 0.9))
    names = list(dict.fromkeys(n for c in cases for n in c["results"]))
    colors = {n: plt.cm.tab10(i % 10) for i, n in enumerate(names)}
    for row, dtype in enumerate(dtypes):
        for col, layout in enumerate(layouts):
            ax = axes[row][col]
            cs = sorted((c for c in cases if c["dtype"] == dtype and c["layout"] == layout),
                        key=lambda c: c["numel"])
            x = [c["numel"] for c in cs]
            for name in names:
                pts = [(c["numel"], c["results"][name]["gbps"]) for c in cs
                       if name in c["results"]]
                if pts:
                    base = name.removesuffix("+graph")
                    ax.plot(*zip(*pts), marker="o", color=colors[name],
                            linestyle=":" if name != base else "-",
                            label=labels.get(base, base) + (" (CUDA graph)" if name != base
                                                            else ""))
            if cs:
                ax.plot(x, [c["bandwidth_probe"]["gbps"] for c in cs], "k--", marker="x",
                        label="memory bandwidth (in-place a.add_(b))")
            ax.set_xscale("log")
            ax.set_yscale("log")  # launch-bound and bandwidth-bound cases differ by 100x
            plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)
            ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.set_title(f"{layout}, {dtype}", fontsize=10)
            ax.set_xlabel("total parameters")
            ax.set_ylabel("effective GB/s (5 accesses/param)")
            ax.grid(True, which="both", alpha=0.3)
    handles, lab = axes[0][0].get_legend_handles_labels()
    m = doc["machine"]
    fig.suptitle(f"One optimizer step (SGD momentum): effective bandwidth, higher is better\n"
                 f"{m.get('gpu') or m['cpu']['model']} | torch {m['torch']['version']} | "
                 f"{m['torch']['threads']} threads | {m['date'][:10]}", fontsize=11)
    fig.legend(handles, lab, loc="lower center", ncol=min(4, len(lab)), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * ((len(lab) + 3) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- machine ------------------------------------------------------------------------------
def _git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(device: torch.device) -> dict:
    from .info import collect

    dirty = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    info = collect()
    info.update(date=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                device=str(device), commit=_git("rev-parse", "HEAD"),
                worktree_dirty=None if dirty is None else bool(dirty),
                loadavg_at_start=list(os.getloadavg()))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def host_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda-" + re.sub(r"[^a-z0-9]+", "-",
                                torch.cuda.get_device_name(device).lower()).strip("-")
    return device.type


class Progress:
    """A progress bar on stderr (a line per case where stderr is not a terminal)."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def show(self, what: str) -> None:
        n = 24 * self.done // max(1, self.total)
        line = (f"[{'#' * n}{'.' * (24 - n)}] {self.done}/{self.total} cases, "
                f"{time.perf_counter() - self.t0:5.0f} s  {what}")
        print(("\r" + line.ljust(100)) if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


# ---- main ---------------------------------------------------------------------------------
def parse_count(text: str) -> int:
    """'1M', '2.5m', '1B', '1e6' or '1000000' -> int."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMbBgG]?)\s*", text)
    mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
    try:
        value = float(m.group(1)) * mult[m.group(2).lower()] if m else -1
    except ValueError:
        value = -1
    if not (value >= 1 and value == int(value)):
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r} (e.g. 1M, 25000000, "
                                         "1e8, 1B)")
    return int(value)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="momentum-cuda bench", description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None,
                    help="cpu or cuda[:N] (default: cuda when a GPU is visible, else cpu)")
    ap.add_argument("--params", type=parse_count, nargs="+", default=None, metavar="N",
                    help="total parameter counts, one case each (default: CPU 1M 10M 100M; GPU "
                         "1M 10M 100M 1B)")
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
    ap.add_argument("--impls", nargs="+", default=None, metavar="NAME",
                    help="only these implementations (torch-forloop, the reference, is always "
                         "run); names as printed, e.g. mc-flat-cpu torch-fused")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds (>= 20 unless --quick)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps of each first")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--dampening", type=float, default=0.0)
    ap.add_argument("--nesterov", action="store_true")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--graph-max", type=parse_count, default=parse_count("10M"), metavar="N",
                    help="GPU: also time CUDA-graph replays for cases up to N params (default 10M)")
    ap.add_argument("--wait-idle", type=float, default=None, metavar="S",
                    help="CPU: before timing a case wait up to S s for other processes to leave "
                         "the CPU idle (default 60; 0 with --quick)")
    ap.add_argument("--retries", type=int, default=None,
                    help="CPU: time a case again when other processes used the CPU meanwhile "
                         "(default 2; 0 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="1M params, 5 rounds, 1 warm-up step (under 2 minutes on 2 cores)")
    ap.add_argument("--out", type=Path, default=Path("momentum-cuda-out"),
                    help="folder for the JSON, CSV and PNG (default ./momentum-cuda-out)")
    ap.add_argument("--no-files", action="store_true", help="print only")
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        ap.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no GPU here (torch.cuda.is_available() is "
                 "False)")
    if args.params is None:
        args.params = [10**6] if args.quick else (
            [10**6, 10**7, 10**8] + ([10**9] if device.type == "cuda" else []))
    if args.quick:
        args.rounds, args.warmup = min(args.rounds, 5), min(args.warmup, 1)
    args.wait_idle = (0.0 if args.quick else 60.0) if args.wait_idle is None else args.wait_idle
    args.retries = (0 if args.quick else 2) if args.retries is None else args.retries
    if args.rounds < 1 or args.warmup < 0 or args.retries < 0:
        ap.error(f"--rounds must be >= 1, --warmup and --retries >= 0 (got {args.rounds}, "
                 f"{args.warmup}, {args.retries})")
    if not args.quick and args.rounds < 20:
        ap.error(f"--rounds must be >= 20 for a median worth reporting (got {args.rounds}); "
                 "use --quick for a smoke run")
    if args.threads is not None and args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    return args, device


def select(impls, missing, wanted) -> list[Impl]:
    if wanted is None:
        return impls
    known = {i.name for i in impls}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        why = "; ".join(f"{k}: {v}" for k, v in missing.items())
        raise SystemExit(f"momentum-cuda bench: --impls {' '.join(unknown)}: not available here "
                         f"(available: {' '.join(sorted(known))}; missing: {why})")
    return [i for i in impls if i.name in wanted or i.name == "torch-forloop"]


def fits(total, dtype, n_impls, device) -> tuple[bool, str]:
    """Whether a case's buffers fit in memory: p, g, buf per implementation, plus at most 4 more
    (params, grads and the second step's grads while checking; params, grads and the bandwidth
    probe's two buffers while timing)."""
    need = total * torch.tensor([], dtype=dtype).element_size() * (3 * n_impls + 4)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return need < 0.85 * free, f"needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free"


def main(argv=None) -> int:
    args, device = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    impls, missing = implementations(device)
    impls = select(impls, missing, args.impls)
    labels = {i.name: i.label for i in impls}
    hyper = dict(lr=args.lr, momentum=args.momentum, dampening=args.dampening,
                 weight_decay=args.weight_decay, nesterov=args.nesterov)
    machine = machine_info(device)
    clock = Clock(device)
    print(f"momentum_cuda {momentum_cuda.__version__} @ {(machine['commit'] or '?')[:12]}"
          f"{' (dirty worktree)' if machine['worktree_dirty'] else ''} | torch {torch.__version__}"
          f" | {machine.get('gpu') or machine['cpu']['model']} | {torch.get_num_threads()} threads "
          f"| {args.rounds} rounds after {args.warmup} warm-up, order rotated each round")
    print("timed: " + ", ".join(i.label for i in impls))
    for name, why in missing.items():
        print(f"not timed: {name}: {why}")
    print(f"hyper-parameters: {hyper}")

    cases, skipped, error = [], [], None
    todo = [(dt_, lay, n) for dt_ in args.dtypes for lay in args.layouts for n in args.params]
    progress = Progress(len(todo))
    try:
        for dtype_name, layout, total in todo:
            progress.show(f"{layout} {total:,} {dtype_name}")
            graphs = device.type == "cuda" and total <= args.graph_max  # a second set each
            ok, why = fits(total, DTYPES[dtype_name], len(impls) * (2 if graphs else 1), device)
            if not ok:
                skipped.append({"layout": layout, "numel": total, "dtype": dtype_name,
                                "why": why})
                print(f"\n== {layout}: {total:,} {dtype_name} params: SKIPPED ({why})")
            else:
                cases.append(run_case(layout, total, DTYPES[dtype_name], impls, hyper, args,
                                      device, clock))
                print_case(cases[-1], labels)
            progress.done += 1
    except BenchFailure as e:
        error = str(e)
    progress.close()
    if error:
        print(f"\nFAILED: {error}", file=sys.stderr)
    print("\n(GB/s: 5 element reads+writes per parameter; BW share: of the in-place a.add_(b) "
          "probe timed in the same rounds; vs X: X's median / this median, > 1 is faster; "
          f"kernels: {'CUDA kernels' if device.type == 'cuda' else 'aten ops + momentum_cuda kernel calls'}"
          " per step; alloc: bytes allocated by one step)")
    if not args.no_files:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = args.out / f"bench-{host_kind(device)}-{'quick-' if args.quick else ''}{stamp}"
        machine["loadavg_at_end"] = list(os.getloadavg())
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        doc = {"schema": "momentum-cuda-bench/1", "machine": machine, "config": config,
               "hyper": hyper, "implementations": labels, "not_available": missing,
               "cases": cases, "skipped": skipped, "error": error}
        base.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        with base.with_suffix(".csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            w.writeheader()
            w.writerows(csv_rows(doc))
        if cases:
            plot(doc, base.with_suffix(".png"), labels)
        print(f"wrote {base}.json, .csv" + (", .png" if cases else ""))
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
