"""`momentum-cuda bench`: time ONE optimizer step of every implementation that can run here.

    momentum-cuda bench                          # CPU: 1 M, 10 M, 100 M params; fp32 and bf16
    momentum-cuda bench --quick                  # 1 M params, 5 rounds: about a minute on 2 cores
    momentum-cuda bench --device cuda --params 10M 100M 1B --dtypes float32
    momentum-cuda bench --layouts resnet50 gpt2 --impls mc-flat-cpu torch-fused
    momentum-cuda bench --out DIR --name bench-headline --formats json csv --budget-s 170
    momentum-cuda bench --overhead               # host time per step: tiny tensors, 148 and 2000
    momentum-cuda bench --ampclip                # GradScaler + clip_grad_norm_ + step, per step
    momentum-cuda bench --master                 # bf16 + exact fp32 masters vs torch's recipe
    momentum-cuda bench --modes                  # every mode: time, bytes moved, bytes held

Implementations: momentum_cuda flat and per-tensor on every backend that runs on the device
(cpu; cuda and triton on a GPU), torch.optim.SGD's for-loop, foreach and fused steps, and Apex
FusedSGD when it is installed. Layouts (each scaled to the total size, sizes kept in proportion):
few-large (8 tensors), many-small (2000 tensors), resnet50 (ResNet-50's 161 parameter tensors) and
gpt2 (GPT-2 small's 148), built from shapes, no download. An --impls name that exists but cannot
run on this device is reported and left out (exit status 1 at the end); an unknown one stops.

fsdp2-gpt2 (only when asked for: --layouts fsdp2-gpt2): GPT-2's 148 tensors as FSDP2 hands them to
the optimizer, each an nn.Parameter holding a DTensor, Shard(0), with a DTensor gradient sharded
alike, on a DeviceMesh of this one process (an in-process gloo group of one; NCCL for CUDA
tensors; no step communicates, and each local shard is its whole tensor). At N params it stands
for one rank of an FSDP2 job whose shards hold N elements in all. momentum_cuda per tensor
(mc-list-*: its kernels on the local shards, DTensor momentum buffers), torch's for-loop and
foreach step the DTensors; momentum_cuda flat is left out (DTensors never move into a flat
buffer: flat=True steps them per tensor). torch's fused SGD has no DTensor rule (aten._fused_sgd_
has no sharding strategy; tried on each case): it steps the same values as plain local tensors,
marked "[local]" (column "params" of the CSV: "local tensors"), the cost of a fused step that
FSDP2 cannot run as it is. Apex likewise.

ddp-gpt2 (only when asked for: --layouts ddp-gpt2): GPT-2's 148 tensors (plain tensors) as DDP
with gradient_as_bucket_view=True hands them to the optimizer: every .grad is a view of a DDP-style
gradient bucket, one contiguous tensor of the case's dtype per bucket, filled in reverse
parameter order with no padding, a bucket closed once it reaches its cap (the first 1 MiB,
torch.distributed's _DEFAULT_FIRST_BUCKET_BYTES; the others 25 MiB, bucket_cap_mb's default).
No process group: each implementation gets buckets of its own holding the case's gradients.
Every implementation runs; momentum_cuda flat lays the group out at its gradients' offsets on
the first step and reads them in place, one call over the spans of all buckets (checked on every
step; the JSON's "mc_calls" is len(opt.last_step) of a step, next to torch's "kernels").

--overhead: the HOST time of one step, where the arithmetic is nothing: --tensors N (default 148
2000; GPT-2's count and many-small's) parameters of 1 to 16 elements each (drawn once per
count, most not a multiple of any vector width), float32, 1 thread (torch.set_num_threads(1)
unless --threads), 100 rounds after 10 warm-up steps (--rounds, --warmup). Same method as below:
every implementation that runs here, the bitwise check before and after timing, interleaved
rounds, CPU contention flagged (on a GPU: CUDA tensors, CUDA events, which span the host's
launches when the step is launch-bound). Reported in microseconds, median and p10-p90, against
torch's foreach and fused steps; the bandwidth probe stands for one aten op. The targets of
issue 13 are evaluated and written into the JSON ("targets"): momentum_cuda flat <= torch fused / 3
at 148 tensors and <= torch fused / 5 at 2000, per tensor <= torch foreach at every count (a
ratio of medians of the same rounds). --evict MB writes MB MiB before each timed call, untimed,
so that every step starts with cold caches, as after a training step's forward and backward
(default 0: the rounds only interleave). A target not met is a measurement, not a failure: the exit
status is 1 only for a bitwise mismatch or an implementation that could not run, as elsewhere.
--ddp-grads gives every .grad as a view of a DDP-style bucket, as ddp-gpt2 does (tiny
tensors: one bucket): the step momentum_cuda flat replays is then the list call over the bucket's
spans, read in place. --assigned-grads gives every parameter a gradient tensor of its own before
each timed step (p.grad = g, untimed; 2 sets of the same values used in turn), as a loop that
computes gradients outside autograd does: never momentum_cuda's flat views, so flat steps them
per tensor. --unused-grads leaves every UNUSED_EVERY-th parameter (from the fourth) without a
gradient, as an unused branch does: every bucket of momentum_cuda flat is stepped in part, by
one flat call over its runs of parameters with a gradient.
Files: json and csv (no png); <name> defaults to bench-overhead-<device>-<date>
(bench-overhead-ddp-... with --ddp-grads, bench-overhead-assigned-... with --assigned-grads,
bench-overhead-unused-... with --unused-grads).

--ampclip: one AMP+clip training step after backward, per contender. momentum_cuda (each
implementation that runs here): scaler.unscale_(opt); opt.clip_grad_norm_(max_norm);
scaler.step(opt); scaler.update(), where the clip is applied inside the step (on CUDA in the
kernel's pass; on the CPU the C++ op multiplies with torch's mul_ before its kernel: no fusion).
torch's for-loop, foreach and fused SGD: scaler.unscale_(opt); torch.nn.utils.clip_grad_norm_(
params, max_norm); scaler.step(opt); scaler.update(). torch.amp.GradScaler(device type), scale
2^16; --max-norm (default 1.0, below every case's total norm: the clip is active, checked).
Cases: --tensors N (default 148 2000) tiny tensors as in --overhead, then --params (default
2^24 = 16777216) in --layouts (default few-large: 8 tensors), fp32; giving --tensors alone, or
--params / --layouts alone, runs only those cases. Before each sequence, warm-up and timed, the
contender's gradients are refilled UNTIMED from a pool of 2 scaled gradient sets drawn once per
case (step k of every contender gets set k % 2), so every contender steps the same gradients:
momentum_cuda must equal the for-loop bitwise (parameters, buffers, clipped gradients, total
norms) before and after timing, as above. 30 rounds after 3 warm-up steps (--rounds, --warmup),
torch's thread count (--threads), interleaved, CPU contention flagged, the a.add_(b) probe in the
same rounds. Reported in microseconds, median, p10-p90 and IQR, and each contender's ratio to
torch's for-loop, foreach and fused (their median / this median, > 1: faster), its ops per
sequence, and a "gradient passes" model (GRAD_PHASES: the gradient's element reads and writes
per parameter that each sequence's ops make, not a measurement). Files: json and csv; <name>
defaults to bench-ampclip-<device>-<date>.

--master: bf16 parameters with exact fp32 master weights (issue 14), one step per contender, for
--params (default as below) in --layouts (default few-large many-small; plain tensors), no
--dtypes (the model is bf16; fp32 contenders step the same values widened, exactly).
Contenders: momentum_cuda's master weights, SGD(bf16 params, master_weights=True), on every
backend that runs here and has the master op (mc-master-<backend>; one named that cannot run is
reported with the reason); momentum_cuda flat on fp32 and on bf16 parameters
(mc-flat-<backend>-fp32, -bf16); torch's fp32 master recipe, what users write without
momentum_cuda (Apex O2 style: fp32 copies stepped by torch.optim.SGD, the bf16 gradients copied
into the copies' fp32 .grad and the copies back into the bf16 parameters each step;
torch-master-forloop, -foreach, -fused); torch.optim.SGD on fp32 parameters (torch-fp32-forloop,
-foreach, -fused) and on bf16 ones (torch-bf16-forloop). Every momentum_cuda step must be one
call of its path (opt.last_step: "master" or "flat", on its backend), and the masters
(opt.master_weight(p)), fp32 momentum buffers and bf16 parameters must equal an fp32 torch
for-loop twin's (torch-fp32-forloop; plain bf16: torch-bf16-forloop) bitwise, before timing
(2 steps) and after it (all steps). Reported: median, p10-p90, ratios to torch-master-foreach,
torch-master-fused and torch-fp32-fused, the bytes moved per parameter (a model: step_passes),
its GB/s and share of an fp32 a.add_(b) probe, and the bytes held per parameter (weights,
optimizer state, gradients), measured from the tensors and compared with memory_formula().
Files: json, csv and png; <name> defaults to bench-master-<device>-<date>.

--modes: every momentum_cuda mode next to fp32 and torch (issue 14), one step per contender, in
ONE run (interleaved rounds), for --params (default 1M 10M) in --layouts (default few-large
many-small; plain tensors), no --dtypes (bf16 data drawn once; fp32 contenders step it widened,
exactly). Contenders, on every backend that runs here and has the mode's op (one named that
cannot run is reported with the reason): momentum_cuda flat on fp32 parameters
(mc-flat-<backend>-fp32); momentum_dtype=torch.bfloat16 and torch.int8 on fp32 parameters
(mc-mdtype-<backend>-bf16, -int8: bf16 buffers, or int8 codes with one fp32 scale per 256
elements); master weights on bf16 parameters (mc-master-<backend>); stochastic_rounding=True,
sr_seed=0 on bf16 parameters (mc-sr-<backend>: bf16 buffers); flat on bf16 parameters
(mc-flat-<backend>-bf16); torch.optim.SGD on fp32 parameters (torch-fp32-forloop, -foreach,
-fused) and on bf16 ones (torch-bf16-forloop). Every momentum_cuda step must be one call of its
path (opt.last_step: flat, momentum-dtype, master, stochastic-rounding, on its backend), and it
must equal its reference bitwise before timing (2 steps, every element) and after it (all
steps): fp32 weights and masters torch-fp32-forloop's (as --master), plain bf16
torch-bf16-forloop's, stochastic rounding and momentum_dtype (parameters, momentum buffers, int8
scales) a twin's, not timed, stepped by momentum_cuda.reference (sgd_sr_reference_step with
sr_key(seed, step, position); sgd_momentum_dtype_reference_step). After timing a twin steps
a sample: at most TWIN_TENSORS (64) parameters, evenly spaced, the first elements of each,
about TWIN_ELEMENTS (2^19) in all, whole int8 blocks (twin_sample(); the plain-torch references
take seconds per step at 10M elements or 2000 tensors; a parameter's step, its random bits and
its int8 blocks depend on nothing after its elements, nor on the other parameters). Reported
as --master: median, p10-p90, ratios to torch-fp32-foreach and torch-fp32-fused, bytes moved
per parameter (a model: step_passes), its GB/s and share of an fp32 a.add_(b) probe, and the
bytes held per parameter (weights, optimizer state, gradients and their sum), measured from the
tensors and compared with memory_formula().
Files: json, csv and png; <name> defaults to bench-modes-<device>-<date>.

Order of the cases: the first value given to each of --params, --layouts and --dtypes is the most
important. Cases run sorted by the sum of their values' positions in those three lists (ties:
the earlier --params value, then --layouts), so every value given is reached early and a time
budget (--budget-s) cuts the combinations of the later values first.

Method, the same for every implementation:
  * Data: per case, the initial parameters and two sets of gradients (never zero) are drawn ONCE,
    on the device itself (a torch.Generator of that device, directly in the case's dtype); every
    implementation steps its own clones of that one set.
  * Correctness before timing: each implementation takes 2 steps next to torch's for-loop, and
    every parameter and momentum buffer must be torch.equal; a flat optimizer must make one
    kernel call per step. A momentum_cuda implementation that differs or fails is recorded in
    the case (which one; the first differing parameter and element, the max |diff|) and is not
    timed in that case; the other implementations and cases go on and the exit status is 1 at
    the end. torch foreach/fused and Apex are compared too, and whether they agree with the
    for-loop is reported, not enforced (torch does not promise it).
  * Timing: fresh optimizers, warm-up steps, then R rounds; each round times one opt.step() of
    every implementation (synchronized before each step) in an order rotated by one each round.
    CPU: time.perf_counter; GPU: CUDA events. Median and p10-p90 per implementation, and per-round
    paired ratios. On a GPU, each implementation is also captured in a CUDA graph (one replay =
    one step) for cases up to --graph-max params, where launch overhead matters. After timing,
    every momentum_cuda optimizer and every graph replay must still equal the for-loop bitwise
    (all took the same number of steps), or it is recorded as above and its times dropped.
  * Bandwidth in the same run: an in-place torch `a.add_(b)` over the same number of elements
    (reads a and b, writes a) is timed in the same rounds; "BW share" is an implementation's
    effective GB/s (5 element reads+writes per parameter: read p, g, buf; write p, buf) over that.
  * One extra, untimed step per implementation counts its kernels and the memory it allocates:
    CPU: aten ops seen by a TorchDispatchMode plus momentum_cuda's own kernel calls, and the bytes
    of fresh tensors those ops return; GPU: CUDA kernels in the profiler and the bytes the caching
    allocator handed out.
Results: a line per case as it finishes, a table at the end, and <out>/<name>.json and .csv,
rewritten after every case (atomically: a run killed at any point leaves valid files holding
every finished case, with "complete": false), and <name>.png at the end. <name> defaults to
bench-<device>-<date>.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import functools
import gc
import itertools
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
from ._ops import master_op, qmom_op, sr_op
from .optim import ALIGN_BYTES  # momentum_cuda's flat layout: each parameter padded to it
from .optim import _local  # a DTensor's local shard; any other tensor itself
from .reference import QBLOCK, sgd_momentum_dtype_reference_step, sgd_sr_reference_step, sr_key

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch built without distributed: no DTensor case can run
    DTensor, Shard = (), None

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
LAYOUTS = ("few-large", "many-small", "resnet50", "gpt2", "fsdp2-gpt2", "ddp-gpt2")
DEFAULT_LAYOUTS = LAYOUTS[:4]  # --layouts' default; fsdp2-gpt2 and ddp-gpt2 when asked for
# Parameters as FSDP2 hands them to the optimizer: nn.Parameter(DTensor), Shard(0), on a mesh of
# this one process (its local shard is the whole tensor). Sizes: GPT-2's 148 tensors, scaled.
DTENSOR_LAYOUTS = ("fsdp2-gpt2",)
# What runs on the local tensors of a DTensor case, not the DTensors: torch's fused SGD has no
# DTensor rule (checked per case, see fused_takes_dtensors), nor has Apex (not a torch op).
LOCAL_ONLY = ("torch-fused", "apex-fused-sgd")
# Gradients as DDP (gradient_as_bucket_view=True) hands them over: views of its buckets. Sizes:
# GPT-2's 148 tensors, scaled. Bucket caps in bytes: DDP's defaults (first bucket, the others).
DDP_LAYOUTS = ("ddp-gpt2",)
DDP_FIRST_BUCKET_BYTES = 1 << 20  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES
DDP_BUCKET_BYTES = 25 << 20  # DistributedDataParallel(bucket_cap_mb=25)
FORMATS = ("json", "csv", "png")
# --overhead: tiny tensors, as many as --tensors asks; a layout name per count ("tiny-148").
TINY_PREFIX = "tiny-"
TINY_MAX = 16  # elements per tiny tensor: 1..TINY_MAX
OVERHEAD_TENSORS = (148, 2000)  # --tensors' default: GPT-2's count and many-small's
# Issue 13's targets: momentum_cuda flat's host time <= torch fused's / k at these tensor counts
# (no flat target at other counts); per tensor <= torch foreach's at every count.
FLAT_TARGETS = {148: 3, 2000: 5}
SCHEMA = "momentum-cuda-bench/2"
NOISY_CORES = 0.1  # CPU used by other processes while timing above which a case is flagged
BW_PROBE = "bandwidth-probe"  # the in-place a.add_(b) timed in the same rounds
GRAPH_WARMUP = 3  # eager steps before a CUDA-graph capture (torch's docs warm up 3 iterations)
CHUNK = 1 << 24  # elements per piece where a whole-size temporary would cost a tensor set
REFERENCE = "torch-forloop"


class BenchFailure(RuntimeError):
    """An implementation gave other bits than torch's for-loop, or could not run."""


def _now() -> float:
    """Seconds on a monotonic clock (the time budget's; a test replaces it)."""
    return time.monotonic()


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


def tiny_layout(count: int) -> str:
    return f"{TINY_PREFIX}{count}"


def tiny_count(layout: str) -> int | None:
    """The tensor count of an --overhead layout ("tiny-148": 148); None for any other layout."""
    m = re.fullmatch(re.escape(TINY_PREFIX) + r"(\d+)", layout)
    return int(m.group(1)) if m else None


def tiny_sizes(count: int, seed: int) -> list[int]:
    """`count` sizes of 1..TINY_MAX elements, drawn from `seed`."""
    return [int(x) for x in np.random.default_rng(seed).integers(1, TINY_MAX + 1, count)]


def layout_sizes(layout: str, total: int, seed: int) -> list[int]:
    """Tensor sizes of a layout at `total` parameters (few-large / many-small vary +-50 %, so
    most sizes are not multiples of a vector width: tails and padding are measured too). A tiny
    layout (--overhead) has its own sizes: `total` must be their sum, or None."""
    count = tiny_count(layout)
    if count is not None:
        sizes = tiny_sizes(count, seed)
        if total is not None and total != sum(sizes):
            raise ValueError(f"{layout}: {total} elements asked for, its sizes sum to "
                             f"{sum(sizes)}")
        return sizes
    if layout in ("few-large", "many-small"):
        count = 8 if layout == "few-large" else 2000
        w = np.random.default_rng(seed).uniform(0.5, 1.5, count)
        return scale_sizes([float(x) for x in w * 1e6], total)
    shapes = resnet50_shapes() if layout == "resnet50" else gpt2_shapes()  # gpt2, fsdp2-, ddp-
    return scale_sizes([_numel(s) for s in shapes], total)


# ---- implementations ----------------------------------------------------------------------
@dataclasses.dataclass
class Impl:
    name: str
    label: str
    make: object  # (params, hyper) -> optimizer
    ours: bool  # momentum_cuda: must be bitwise equal to torch's for-loop
    flat: bool = False
    # --master and --modes only: the model's parameter dtype (None: the case's), how the
    # weights are kept ("master": momentum_cuda's master weights; "recipe": torch's fp32 master
    # copy; "sr": stochastic rounding; "qmom": a narrow momentum_dtype buffer; "plain") and the
    # backend every momentum_cuda step must report in opt.last_step.
    model: torch.dtype | None = None
    kind: str = "plain"
    backend: str | None = None
    momentum_dtype: torch.dtype | None = None  # kind "qmom": the buffer's dtype (bf16, int8)
    timed: bool = True  # False: a reference twin, stepped next to the contenders, never timed


BACKENDS = ("cpu", "cuda", "triton")
TORCH_STEPS = {"forloop": dict(foreach=False), "foreach": dict(foreach=True),
               "fused": dict(fused=True)}
# Every implementation name on any device (those that cannot run here are reported, not unknown).
KNOWN = tuple([f"mc-{kind}-{b}" for b in BACKENDS for kind in ("flat", "list")]
              + [f"torch-{n}" for n in TORCH_STEPS] + ["apex-fused-sgd"])


def runnable_backends(device: torch.device, missing: dict) -> list[str]:
    """momentum_cuda's backends that run on `device`; why each other one cannot goes into
    missing["mc-*-<backend>"]."""
    out = []
    for backend in BACKENDS:
        try:
            resolve_backend(backend, device)
        except RuntimeError as e:
            missing[f"mc-*-{backend}"] = str(e)
        else:
            out.append(backend)
    return out


def implementations(device: torch.device) -> tuple[list[Impl], dict[str, str]]:
    """(the implementations that run on `device`, {name: why not} for the others)."""
    impls, missing = [], {}
    for backend in runnable_backends(device, missing):
        for flat in (True, False):
            kind = "flat" if flat else "per-tensor"
            impls.append(Impl(f"mc-{'flat' if flat else 'list'}-{backend}",
                              f"momentum_cuda {kind} ({backend})",
                              lambda ps, h, b=backend, f=flat: momentum_cuda.SGD(
                                  ps, backend=b, flat=f, **h), ours=True, flat=flat))
    for name, kw in TORCH_STEPS.items():
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


def select(impls, missing, wanted, known=KNOWN, always=(REFERENCE,)) -> tuple[list[Impl],
                                                                            dict[str, str]]:
    """(the implementations to run, {asked-for name: why it cannot run on this device}). The
    reference, torch-forloop (--master: `always`, its two references), always runs. An unknown
    name (not in `known`) stops the run (exit 1)."""
    if wanted is None:
        return impls, {}
    have = {i.name for i in impls}
    unknown = [w for w in wanted if w not in have and w not in known]
    if unknown:
        raise SystemExit(f"momentum-cuda bench: --impls {' '.join(unknown)}: no such "
                         f"implementation (names: {' '.join(sorted(have | set(known)))}; "
                         f"available here: {' '.join(sorted(have))})")
    backend_of = r"^mc-(flat|list|master|sr|mdtype)-(\w+?)(-.*)?$"  # -> missing's mc-*-<backend>
    unavailable = {w: missing.get(w, missing.get(re.sub(backend_of, r"mc-*-\2", w),
                                                 "not available on this device"))
                   for w in dict.fromkeys(wanted) if w not in have}
    return [i for i in impls if i.name in wanted or i.name in always], unavailable


# ---- data ---------------------------------------------------------------------------------
@dataclasses.dataclass
class CaseData:
    """One case's data as flat 1-D tensors on the device; `split` gives a view per parameter."""
    sizes: list
    init: torch.Tensor
    grads: torch.Tensor
    grads2: torch.Tensor  # the check's second step; then the bandwidth probe's `a`
    mesh: object = None  # a DTensor case's one-process DeviceMesh; None: plain tensors
    local: tuple = ()  # in a DTensor case, the implementations that step the local tensors
    buckets: list | None = None  # a DDP case's buckets: parameter indices, in bucket order
    bare: frozenset = frozenset()  # --unused-grads: the parameters given no gradient

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(flat.split(self.sizes))

    def as_dtensors(self, impl: "Impl") -> bool:
        return self.mesh is not None and impl.name not in self.local


def ddp_buckets(sizes, element_size: int, first: int = DDP_FIRST_BUCKET_BYTES,
                cap: int = DDP_BUCKET_BYTES) -> list[list[int]]:
    """DDP's bucket assignment: parameter indices in reverse order, a bucket closed as soon as
    it holds >= its cap in bytes (the first bucket's `first`, then `cap`), as
    torch.distributed's compute_bucket_assignment_by_size does; within a bucket, in the order
    listed (the first at offset 0, no padding)."""
    buckets, cur, nbytes, limit = [], [], 0, first
    for i in reversed(range(len(sizes))):
        cur.append(i)
        nbytes += sizes[i] * element_size
        if nbytes >= limit:
            buckets.append(cur)
            cur, nbytes, limit = [], 0, cap
    return buckets + ([cur] if cur else [])


def case_seed(seed: int, layout: str, total: int) -> int:
    count = tiny_count(layout)
    if count is not None:  # the sizes come from the seed: it cannot depend on their sum
        return seed + count * 7 + 1
    return seed + total % 9973 + LAYOUTS.index(layout) * 7


def overhead_total(count: int, seed: int) -> int:
    """The elements of --overhead's case of `count` tiny tensors."""
    layout = tiny_layout(count)
    return sum(layout_sizes(layout, None, case_seed(seed, layout, 0)))


def case_data(sizes, dtype, device, seed) -> CaseData:
    """The initial parameters, the gradients and the second step's gradients of a case, drawn
    once on `device` by a generator of that device, directly in `dtype`: no host-side draw and
    no fp32 copy (at 1 B parameters the host would draw 3 G samples)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    total = sum(sizes)

    def draw(nonzero: bool) -> torch.Tensor:
        flat = torch.randn(total, generator=gen, dtype=dtype, device=device)
        if nonzero:  # a zero gradient would hide a kernel that ignores the gradient
            for piece in flat.split(CHUNK):  # the mask in pieces: no whole-size temporary
                piece.masked_fill_(piece == 0, 1.0)
        return flat

    return CaseData(list(sizes), draw(False), draw(True), draw(True))


def build(impl: Impl, data: CaseData, hyper):
    """(optimizer, params) over fresh clones of the case's data, .grad set once. In a DTensor
    case each parameter is an nn.Parameter holding a DTensor, Shard(0) on the case's mesh, and
    its gradient a DTensor sharded alike, as FSDP2 makes them (unless the implementation steps
    the local tensors). In a DDP case every gradient is a view of a bucket (data.buckets) of
    this implementation's own, as DDP's gradient_as_bucket_view=True makes them. The
    parameters data.bare name get none (--unused-grads)."""
    params = []
    dtensors = data.as_dtensors(impl)
    grads = data.split(data.grads)
    views = {}
    for bucket in data.buckets or ():
        flat = torch.empty(sum(data.sizes[i] for i in bucket), dtype=data.grads.dtype,
                           device=data.grads.device)
        for i, view in zip(bucket, flat.split([data.sizes[i] for i in bucket])):
            view.copy_(grads[i])
            views[i] = view
    for k, (x, g) in enumerate(zip(data.split(data.init), grads)):
        if k in views:
            p = x.clone().requires_grad_(True)
            p.grad = views[k]
        elif dtensors:
            p = torch.nn.Parameter(DTensor.from_local(x.clone(), data.mesh, [Shard(0)],
                                                      run_check=False))
            p.grad = DTensor.from_local(g.clone(), data.mesh, [Shard(0)], run_check=False)
        else:
            p = x.clone().requires_grad_(True)
            p.grad = None if k in data.bare else g.clone()
        params.append(p)
    return impl.make(params, hyper), params


_MESHES: dict = {}  # device type: the DeviceMesh of one_process_mesh
_OWN_GROUP: list = []  # [True] once one_process_mesh has made the default process group


def one_process_mesh(device: torch.device):
    """A DeviceMesh of this process alone, made once per device type: a process group of one
    (gloo; NCCL for CUDA tensors) over an in-memory store, no network. No step communicates:
    on one process every Shard(0) holds its whole parameter. Raises when this process is one of
    several (under torchrun): the benchmark times one process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if device.type not in _MESHES:
        if not dist.is_available():
            raise BenchFailure("torch.distributed is not available in this torch build")
        if not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo",
                                    store=dist.HashStore(), rank=0, world_size=1)
            _OWN_GROUP.append(True)
        elif dist.get_world_size() != 1:
            raise BenchFailure(f"DTensor layouts run in a process of their own; this one is rank "
                               f"{dist.get_rank()} of {dist.get_world_size()}")
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the mesh's device (else it picks one)
        _MESHES[device.type] = init_device_mesh(device.type, (1,))
    return _MESHES[device.type]


def release_meshes() -> None:
    """Forgets the meshes and destroys the process group one_process_mesh made (main's end: a
    caller in the same process, a test or the demo, finds torch.distributed as it was)."""
    import torch.distributed as dist
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _MESHES.clear()
    _OWN_GROUP.clear()


def fused_takes_dtensors(mesh, dtype, device) -> bool:
    """Whether torch.optim.SGD(fused=True) steps DTensor parameters (torch 2.11 and 2.13: no,
    aten._fused_sgd_ has no sharding strategy), tried on one 2-element parameter."""
    p = torch.nn.Parameter(DTensor.from_local(torch.ones(2, dtype=dtype, device=device), mesh,
                                              [Shard(0)], run_check=False))
    p.grad = DTensor.from_local(torch.ones(2, dtype=dtype, device=device), mesh, [Shard(0)],
                                run_check=False)
    try:
        torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True).step()
    except (NotImplementedError, RuntimeError):
        return False
    return True


# ---- correctness --------------------------------------------------------------------------
def _one_call(impl: Impl, calls: list, numel: int, path: str) -> None:
    """Raises unless `calls` (opt.last_step's entries) are one kernel call of `path` over all
    `numel` elements (on impl.backend, where it names one): no silent fallback."""
    if (len(calls) != 1 or calls[0]["path"] != path or calls[0]["numel"] != numel
            or impl.backend not in (None, calls[0]["backend"])):
        raise BenchFailure(f"{impl.label} did not make exactly one {path} kernel call over "
                           f"{numel} elements" + (f" on backend {impl.backend}" if impl.backend
                                                  else "") + f"; last_step = {calls}")


# The path in opt.last_step of each momentum_cuda mode (--master, --modes): one call per step.
MODE_PATHS = {"master": "master", "sr": "stochastic-rounding", "qmom": "momentum-dtype"}


def _check_flat(impl: Impl, opt, numel: int, runs: bool = False) -> None:
    """A flat optimizer's step: one flat kernel call over `numel` elements (a DDP case too:
    one call over the spans of all buckets; `runs`, --unused-grads: flat calls over runs of
    parameters, `numel` elements in all, one per bucket); a mode's (--master, --modes: master weights,
    stochastic rounding, momentum_dtype): one call of its path over all, on its backend."""
    if runs and impl.flat:
        calls = opt.last_step
        if (not calls or any(c["path"] != "flat" for c in calls)
                or sum(c["numel"] for c in calls) != numel):
            raise BenchFailure(f"{impl.label} did not make flat kernel calls over {numel} "
                               f"elements in all; last_step = {calls}")
    elif impl.kind in MODE_PATHS or impl.flat:
        _one_call(impl, opt.last_step, numel, MODE_PATHS.get(impl.kind, "flat"))


def _pieces(t: torch.Tensor):
    return t.reshape(-1).split(CHUNK)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return max((x.double() - y.double()).abs().max().item()
               for x, y in zip(_pieces(a), _pieces(b)))


def _first_difference(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float, float]:
    """(index, value in a, value in b) of the first element where a and b differ."""
    for k, (x, y) in enumerate(zip(_pieces(a), _pieces(b))):
        ne = x != y
        if ne.any():
            j = int(ne.nonzero()[0, 0])
            return k * CHUNK + j, x[j].item(), y[j].item()
    return -1, float("nan"), float("nan")


def _buffers(opt, params, momentum: float) -> list:
    if momentum == 0:
        return []
    return [opt.state.get(p, {}).get("momentum_buffer") for p in params]


def _placements(t):
    return tuple(t.placements) if isinstance(t, DTensor) else None


def differences(opt, params, ref_opt, ref_params, momentum: float) -> dict | None:
    """None when every parameter and momentum buffer is bitwise equal to the reference's; else,
    per kind ("param", "momentum_buffer"): how many differ, the first one (its index, its first
    differing element and both values there) and the max |diff| over all that differ."""
    # Both on DTensors (a DTensor case, not an implementation on the local tensors): each
    # buffer must be a DTensor sharded like the reference's. The elements: the local shards.
    same_kind = bool(params) and (isinstance(params[0], DTensor)
                                  == isinstance(ref_params[0], DTensor))
    return compare_lists((("param", params, ref_params),
                          ("momentum_buffer", _buffers(opt, params, momentum),
                           _buffers(ref_opt, ref_params, momentum))), same_kind)


def compare_lists(triples, same_kind: bool = False) -> dict | None:
    """differences() of (what, ours, reference) tensor lists: None when all are bitwise equal
    or absent on both sides (a parameter never given a gradient has no buffer; same_kind:
    also placed alike, DTensors), else per `what` as differences() says."""
    out = {}
    for what, ours, ref in triples:
        unmatched, differ = [], []
        kinds = [_placements(a) for a in ours], [_placements(b) for b in ref]
        ours, ref = [_local(a) for a in ours], [_local(b) for b in ref]
        for i, (a, b) in enumerate(zip(ours, ref)):
            if a is None and b is None:
                continue
            if (a is None or b is None or a.shape != b.shape
                    or (same_kind and kinds[0][i] != kinds[1][i])):
                unmatched.append(i)
            elif not torch.equal(a, b):
                differ.append(i)
        if not unmatched and not differ:
            continue
        entry = {"differing": len(unmatched) + len(differ), "of": len(ref)}
        if differ:
            j, value, expected = _first_difference(ours[differ[0]], ref[differ[0]])
            entry.update(first=differ[0], first_element=j, value=value, reference=expected,
                         max_abs_diff=max(_max_abs_diff(ours[i], ref[i]) for i in differ))
        if unmatched:
            entry["missing_or_misshapen"] = unmatched[:20]
        out[what] = entry
    return out or None


def mode_state(impl: Impl, opt, params, momentum: float, sample=None) -> list[tuple[str, list]]:
    """What a stochastic-rounding or momentum_dtype step keeps (--modes), as (what, one tensor
    or None per parameter): the parameters, the momentum buffers and, for int8 buffers, their
    scales (state "momentum_scales"). sample ({parameter index: n}, twin_sample()): only those
    parameters, each its first n elements (its scales: the first ceil(n / QBLOCK)), the part a
    twin steps after timing."""
    if sample is not None:
        params = [params[i] for i in sample]
    keys = (["momentum_buffer"] + (["momentum_scales"] if impl.momentum_dtype == torch.int8
                                   else [])) if momentum else []
    out = [("param", [p.detach() for p in params])]
    out += [(k, [opt.state.get(p, {}).get(k) for p in params]) for k in keys]
    if sample is None:
        return out
    cut = lambda t, n: None if t is None else t.reshape(-1)[:n]  # noqa: E731
    return [(what, [cut(t, -(-n // QBLOCK) if what == "momentum_scales" else n)
                    for t, n in zip(ts, sample.values())]) for what, ts in out]


def versus_reference(impl: Impl, opt, params, ref_opt, ref_params, momentum: float,
                     sample=None):
    """differences() from the reference; for weights kept through an fp32 master (--master:
    impl.kind "master" or "recipe", the reference an fp32 for-loop twin): the masters
    (opt.master_weight(p)) and the fp32 momentum buffers must equal the twin's parameters and
    buffers, and each bf16 parameter the twin's rounded to nearest even (.to(bfloat16)); for
    stochastic rounding and momentum_dtype (--modes, the reference a twin of
    momentum_cuda.reference's step): mode_state()'s tensors, each equal to the twin's (sample:
    the twin holds only the first sample[i] elements of each parameter i in it)."""
    if impl.kind in ("sr", "qmom"):
        return compare_lists([(what, ours, ref) for (what, ours), (_, ref) in zip(
            mode_state(impl, opt, params, momentum, sample),
            mode_state(impl, ref_opt, ref_params, momentum))])
    if impl.kind == "plain":
        return differences(opt, params, ref_opt, ref_params, momentum)
    return compare_lists((("master", [opt.master_weight(p) for p in params], ref_params),
                          ("momentum_buffer", _buffers(opt, params, momentum),
                           _buffers(ref_opt, ref_params, momentum)),
                          ("param", params, [r.detach().to(p.dtype)
                                             for r, p in zip(ref_params, params)])))


def describe(diff: dict) -> str:
    """One line for a differences() result."""
    parts = []
    for what, e in diff.items():
        s = f"{e['differing']} of {e['of']} {what}s differ"
        if "first" in e:
            s += (f"; first: {what} {e['first']}, element {e['first_element']} "
                  f"({e['value']:.9g}, for-loop {e['reference']:.9g}); max |diff| "
                  f"{e['max_abs_diff']:.3g}")
        if "missing_or_misshapen" in e:
            s += (f"; missing, misshapen or not sharded like the for-loop's: "
                  f"{e['missing_or_misshapen']}")
        parts.append(s)
    return " | ".join(parts)


def _two_steps(impl: Impl, data: CaseData, hyper):
    numel = sum(n for i, n in enumerate(data.sizes) if i not in data.bare)
    opt, params = build(impl, data, hyper)
    opt.step()
    if impl.ours:
        _check_flat(impl, opt, numel, bool(data.bare))
    with torch.no_grad():
        for p, g in zip(params, data.split(data.grads2)):
            if p.grad is not None:
                _local(p.grad).copy_(g)
    opt.step()
    if impl.ours:
        _check_flat(impl, opt, numel, bool(data.bare))
    return opt, params


def bitwise_check(impls: list[Impl], data, hyper, ref_of=None) -> tuple[dict, dict, dict]:
    """2 steps of each implementation on its own clones, one implementation at a time next to
    the for-loop (only those two alive: memory). Returns ({name: equal to the for-loop},
    {name: error} for those that could not run, {name: how it differs} for momentum_cuda
    implementations that differ). Raises BenchFailure when the for-loop itself fails.
    --master: `data` is {dtype: CaseData} (each implementation steps the one of its
    impl.model), ref_of(impl) names its reference among `impls` (the references stay alive
    together) and versus_reference() compares."""
    ref_of = ref_of or (lambda impl: REFERENCE)
    data_of = (lambda impl: data[impl.model]) if isinstance(data, dict) else (lambda impl: data)
    refs = {}
    for ref in [i for i in impls if i.name in {ref_of(j) for j in impls}]:
        try:
            refs[ref.name] = _two_steps(ref, data_of(ref), hyper)
        except Exception as e:  # noqa: BLE001 - nothing to check against: the case cannot run
            raise BenchFailure(f"{ref.label}, the reference, failed: {type(e).__name__}: "
                               f"{e}") from e
    equal, errors, mismatches = {name: True for name in refs}, {}, {}
    for impl in impls:
        if impl.name in refs:
            continue
        try:
            opt, params = _two_steps(impl, data_of(impl), hyper)
        except Exception as e:  # noqa: BLE001 - torch impls may not support a dtype/device
            errors[impl.name] = f"{type(e).__name__}: {e}"
            continue
        diff = versus_reference(impl, opt, params, *refs[ref_of(impl)], hyper["momentum"])
        equal[impl.name] = diff is None
        if diff is not None and impl.ours:
            mismatches[impl.name] = {"phase": "check", "steps": 2, "summary": describe(diff),
                                     **diff}
        del opt, params
    return equal, errors, mismatches


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
        # A DTensor's op counts once (its local op runs inside it, unseen); its memory is its
        # local tensor's.
        seen = {_local(t).untyped_storage().data_ptr()
                for t in torch.utils._pytree.tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = _local(t).untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                self.bytes += storage.nbytes()
        return out


def count_device_events(events) -> dict:
    """CUDA kernels, and memory copies/sets apart, among the profiler's events."""
    kernels = copies = 0
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.name.lower()
        if "memcpy" in name or "memset" in name:
            copies += 1
        else:
            kernels += 1
    return {"kernels": kernels, "memcpy_memset": copies}


def measure_cost(fn, device) -> dict:
    """Kernels and allocated bytes of one call of fn, untimed. GPU: CUDA kernels (and copies
    apart) in the profiler and the caching allocator's bytes; CPU: the aten ops and
    momentum_cuda's ops (dispatcher ops, counted among them) and the bytes they return."""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_stats(device).get("allocated_bytes.all.allocated", 0)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        after = torch.cuda.memory_stats(device).get("allocated_bytes.all.allocated", 0)
        return {**count_device_events(prof.events()), "alloc_bytes": after - before,
                "kernels_counted": "cuda"}
    counter = _OpCounter()
    with counter:
        fn()
    return {"kernels": counter.ops, "alloc_bytes": counter.bytes,
            "kernels_counted": "aten and momentum_cuda ops"}


def step_cost(impl: Impl, data: CaseData, hyper, device) -> dict:
    """Kernels and allocated bytes of one steady-state step (the second), untimed."""
    opt, _ = build(impl, data, hyper)
    opt.step()
    return {**measure_cost(opt.step, device),
            **({"mc_calls": len(opt.last_step)} if impl.ours else {})}


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


def use_graphs(device: torch.device, total: int, args) -> bool:
    """Whether a case also times CUDA-graph replays: on a GPU, up to --graph-max params."""
    return device.type == "cuda" and total <= args.graph_max


def cuda_graph_step(opt, device, warmup: int = GRAPH_WARMUP):
    """A CUDA graph of one opt.step(); returns graph.replay. First `warmup` eager steps on a side
    stream, as torch's docs ask before a capture: they allocate the momentum buffers and load
    every kernel a later step runs (Triton compiles the first step and the later ones
    separately), so the captured step allocates and compiles nothing. Raises if the step cannot
    be captured."""
    with torch.cuda.device(device):  # torch.cuda.graph captures on the current device
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(warmup):
                opt.step()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
    return graph.replay


def evicting(steps: dict, mb: int) -> dict | None:
    """--evict: {name: fn} for timed_rounds' prepare, each writing `mb` MiB of host memory
    (untimed), so that every timed call starts with none of its objects in the CPU's caches:
    a training loop's forward and backward run between two steps. None for 0."""
    if not mb:
        return None
    junk = torch.empty(mb << 20, dtype=torch.uint8)
    return {name: functools.partial(junk.add_, 1) for name in steps}


UNUSED_EVERY, UNUSED_FROM = 8, 3  # --unused-grads: the parameters 3, 11, 19, ... get none


def assigning(made: dict, data, prepare: dict | None) -> dict:
    """--assigned-grads: {name: fn} for timed_rounds' prepare, giving each parameter of that
    contender (made: name -> (optimizer, params)) a gradient tensor of its own, untimed, before
    each call: 2 sets per contender, both the case's gradients, used in turn (every contender
    steps the same values as without it). Composed after prepare's function (--evict)."""
    out = dict(prepare or {})
    for name, (_, params) in made.items():
        turn = itertools.cycle([[None if k in data.bare else g.clone()
                                 for k, g in enumerate(data.split(data.grads))]
                                for _ in range(2)])

        def give(params=params, turn=turn, before=out.get(name)):
            if before is not None:
                before()
            for p, g in zip(params, next(turn)):
                p.grad = g
        out[name] = give
    return out


def timed_rounds(steps: dict, warmup: int, rounds: int, clock: Clock, prepare=None):
    """Warm-up, then `rounds` rounds timing one call of each step function in a rotated order.
    prepare (--ampclip): {name: fn} called, untimed, right before each call of that step (the
    gradients' refill). Returns ({name: [ms]}, CPU contention while timing)."""
    names = list(steps)
    prepare = prepare or {}
    for _ in range(warmup):
        for name in names:
            if name in prepare:
                prepare[name]()
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
                if name in prepare:
                    prepare[name]()  # untimed: time_ms synchronizes after it, then starts
                times[name].append(clock.time_ms(steps[name]))
    finally:
        gc.enable()
    return times, contention(before, _cpu_snapshot())


def timed_attempts(case: dict, setup, args, device, clock: Clock, deadline):
    """timed_rounds() of fresh contenders, again (up to --retries more times, on a CPU) while
    other processes used the CPU meanwhile: before each attempt, a wait of up to --wait-idle s
    for an idle CPU (none past `deadline`; no retry past it either: case["retry_skipped"]).
    setup() builds the contenders of an attempt: (made, {name: step fn}, prepare or None).
    Returns (made, times, contention, the discarded attempts) of the last attempt."""
    discarded = []
    for attempt in range(args.retries + 1):
        left = float("inf") if deadline is None else deadline - _now()
        if args.wait_idle > 0 and device.type == "cpu" and left > 0:
            wait_for_idle(min(args.wait_idle, left))
        made, steps, prepare = setup()
        times, busy = timed_rounds(steps, args.warmup, args.rounds, clock, prepare)
        if not is_noisy(busy) or attempt == args.retries or device.type != "cpu":
            break
        if deadline is not None and _now() >= deadline:
            case["retry_skipped"] = "time budget"  # noisy, and no time left to time it again
            break
        discarded.append({"contention": busy,
                          "median_ms": {k: float(np.median(v)) for k, v in times.items()}})
    return made, times, busy, discarded


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
def case_start(layout, total, dtype, args, device) -> tuple[float, CaseData, dict]:
    """A case's start, in every mode: (its start time, its data drawn once, its record: layout,
    sizes, dtype, seed)."""
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seed = case_seed(args.seed, layout, total)
    sizes = layout_sizes(layout, total, seed)
    data = case_data(sizes, dtype, device, seed)
    return t0, data, {"layout": layout, "numel": total, "tensors": len(sizes),
                      "sizes_min": min(sizes), "sizes_max": max(sizes),
                      "dtype": str(dtype).replace("torch.", ""), "data_seed": seed,
                      "params": "tensor"}


def probe_result(times: dict, total: int, esize: int) -> dict:
    """The bandwidth probe's entry (its times taken out of `times`): an in-place a.add_(b) of
    `total` elements of `esize` bytes reads 2 and writes 1."""
    ms = float(np.median(times[BW_PROBE]))
    return {"op": "a.add_(b, alpha)", "bytes_per_element": 3 * esize,
            "gbps": total * 3 * esize / (ms * 1e-3) / 1e9, **summarize(times.pop(BW_PROBE))}


def ratio_key(base: str) -> str:
    """The key of the ratios to a base: torch-foreach -> foreach, torch-master-fused ->
    master_fused (results' "vs_<key>" and "paired_vs_<key>")."""
    return base.removeprefix("torch-").replace("-", "_")


def add_ratios(results: dict, times: dict, bases) -> None:
    """Each result's ratio to every base timed in the case: the base's median / this median
    (> 1: faster), and the per-round paired ratio."""
    for name, r in results.items():
        for base in bases:
            if base in results:
                r["vs_" + ratio_key(base)] = results[base]["median_ms"] / r["median_ms"]
                r["paired_vs_" + ratio_key(base)] = paired(times, name, base)


def add_costs(results: dict, costs: dict) -> None:
    """results[name].update(costs[name]()) (kernels and allocations of one untimed step) for
    every timed name; a failure is recorded, the times kept."""
    for name, cost in costs.items():
        if name in results:
            try:
                results[name].update(cost())
            except Exception as e:  # noqa: BLE001 - a profiler problem must not lose the times
                results[name]["cost_error"] = f"{type(e).__name__}: {e}"


def case_end(case: dict, t0: float, device, **fields) -> None:
    """A case's results and timing facts, its duration and (GPU) the device's peak memory."""
    case.update(**fields, seconds=time.perf_counter() - t0)
    if device.type == "cuda":
        case["device_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)


def run_case(layout, total, dtype, impls, hyper, args, device, clock, deadline=None) -> dict:
    """One case, all of it; `deadline` (a _now() time, the time budget's end): past it, no more
    waiting for an idle CPU and no retry of a noisy timing."""
    t0, data, case = case_start(layout, total, dtype, args, device)
    sizes, esize = data.sizes, data.init.element_size()
    case["bytes_per_param"] = 5 * esize
    if layout in DTENSOR_LAYOUTS:
        impls = dtensor_case(case, data, impls, dtype, device)
    if args.overhead and args.unused_grads:
        data.bare = frozenset(range(UNUSED_FROM, len(sizes), UNUSED_EVERY))
        case.update(params=f"grads: none for every {UNUSED_EVERY}th parameter from index "
                           f"{UNUSED_FROM} ({len(data.bare)} of {len(sizes)})")
    if layout in DDP_LAYOUTS or (args.overhead and args.ddp_grads):
        data.buckets = ddp_buckets(sizes, esize)
        case.update(params="grads: views of DDP buckets",
                    buckets=[sum(sizes[i] for i in b) for b in data.buckets])
    equal, errors, mismatches = bitwise_check(impls, data, hyper)
    case.update(bitwise_vs_forloop=equal, errors=errors, mismatches=mismatches)
    runnable = [i for i in impls if i.name not in errors and i.name not in mismatches]
    graphs = use_graphs(device, total, args)
    times, busy, discarded = _timed_and_checked(case, runnable, data, hyper, args, device, clock,
                                                graphs, deadline)

    case["bandwidth_probe"] = probe_result(times, total, esize)
    results = {}
    for name, ts in times.items():
        r = summarize(ts)
        r["gbps"] = total * 5 * esize / (r["median_ms"] * 1e-3) / 1e9
        r["bw_share"] = r["gbps"] / case["bandwidth_probe"]["gbps"]
        results[name] = r
    add_ratios(results, times, ("torch-foreach", "torch-fused"))
    add_costs(results, {i.name: functools.partial(step_cost, i, data, hyper, device)
                        for i in runnable})
    case_end(case, t0, device, results=results, contention=busy,
             discarded_noisy_attempts=discarded,
             steps_per_optimizer=(GRAPH_WARMUP if graphs else 0) + args.warmup + args.rounds)
    if tiny_count(layout) is not None:
        for r in [*results.values(), case["bandwidth_probe"]]:
            r.update({k.replace("_ms", "_us"): r[k] * 1e3 for k in ("median_ms", "p10_ms",
                                                                    "p90_ms")})
        case["targets"] = overhead_targets(case, times)
    return case


def overhead_targets(case: dict, times: dict) -> list[dict]:
    """Issue 13's targets for an --overhead case: every momentum_cuda flat implementation's
    median <= torch fused's / FLAT_TARGETS[tensors] (where the count has one), every per-tensor
    one's <= torch foreach's. "ratio": this median / the base's median (both of the same
    rounds); "paired": the per-round ratio's median and p10-p90; "met": ratio <= max_ratio, or
    None where either did not run or was not timed."""
    res, n = case["results"], case["tensors"]
    out = []
    for name in res:
        m = re.fullmatch(r"mc-(flat|list)-\w+", name)
        if not m:
            continue
        flat = m.group(1) == "flat"
        if flat and n not in FLAT_TARGETS:
            continue
        base, k = ("torch-fused", FLAT_TARGETS[n]) if flat else ("torch-foreach", 1)
        t = {"tensors": n, "implementation": name, "base": base, "max_ratio": 1 / k,
             "target": f"{name} <= {base}" + (f" / {k}" if k != 1 else ""),
             "ratio": None, "paired": None, "met": None}
        if base in res:
            t["ratio"] = res[name]["median_ms"] / res[base]["median_ms"]
            r = np.asarray(times[name]) / np.asarray(times[base])
            p10, med, p90 = (float(x) for x in np.percentile(r, [10, 50, 90]))
            t["paired"] = {"median": med, "p10": p10, "p90": p90}
            t["met"] = bool(t["ratio"] <= t["max_ratio"])
        else:
            t["why_not_evaluated"] = f"{base} was not timed in this case"
        out.append(t)
    return out


def target_line(t: dict) -> str:
    """One line for an overhead_targets() entry."""
    head = f"{t['tensors']} tensors: {t['target']}: "
    if t["met"] is None:
        return head + f"not evaluated ({t.get('why_not_evaluated', '?')})"
    return (head + f"{t['ratio']:.3f} of {t['base']} (needs <= {t['max_ratio']:.3f}; paired "
            f"p10-p90 {t['paired']['p10']:.3f}-{t['paired']['p90']:.3f}): "
            + ("target met" if t["met"] else "NOT met"))


FLAT_DTENSOR = ("DTensor parameters never move into a flat buffer (FSDP2 owns their storage): "
                "flat=True steps them per tensor, as mc-list does")


def dtensor_case(case: dict, data: CaseData, impls: list, dtype, device) -> list:
    """Makes a case's parameters DTensors (data.mesh) and returns the implementations it runs:
    not momentum_cuda's flat ones (recorded in case["left_out"]). Those that cannot take
    DTensors step the same values as plain local tensors (case["local_tensors"])."""
    data.mesh = one_process_mesh(device)
    data.local = tuple(n for n in LOCAL_ONLY
                       if n != "torch-fused" or not fused_takes_dtensors(data.mesh, dtype, device))
    case.update(params="DTensor Shard(0), 1-process mesh",
                local_tensors=[i.name for i in impls if i.name in data.local],
                left_out={i.name: FLAT_DTENSOR for i in impls if i.flat})
    return [i for i in impls if not i.flat]


def _timed_and_checked(case, runnable, data, hyper, args, device, clock, graphs, deadline):
    """Times the runnable implementations (and their graph replays) and the bandwidth probe,
    then checks momentum_cuda's optimizers against the for-loop again; a mismatch is recorded
    in the case and its times dropped. Returns (times, CPU contention, discarded attempts); the
    optimizers die with this call."""
    pre = GRAPH_WARMUP if graphs else 0  # eager steps of every optimizer before timing

    def setup():
        made = {i.name: build(i, data, hyper) for i in runnable}
        for opt, _ in made.values():  # as many steps as a graph copy's warm-up: comparable
            for _ in range(pre):
                opt.step()
        steps = {name: opt.step for name, (opt, _) in made.items()}
        # grads2 is no longer needed: it is the probe's `a` (written), grads its `b` (read).
        bw_a, bw_b = data.grads2, data.grads
        steps[BW_PROBE] = lambda: bw_a.add_(bw_b, alpha=-1e-3)
        graph_made = {}
        for impl in runnable if graphs else ():
            graph_made[impl.name] = build(impl, data, hyper)
            try:
                steps[impl.name + "+graph"] = cuda_graph_step(graph_made[impl.name][0], device,
                                                              pre)
            except Exception as e:  # noqa: BLE001 - report what cannot be captured
                case["errors"][impl.name + "+graph"] = f"not capturable: {type(e).__name__}: {e}"
                del graph_made[impl.name]
                clock.sync()  # a capture that broke the device fails here, not in a later case
        prepare = evicting(steps, args.evict)
        if args.overhead and args.assigned_grads:
            prepare = assigning(made, data, prepare)
        return (made, graph_made), steps, prepare

    (made, graph_made), times, busy, discarded = timed_attempts(case, setup, args, device,
                                                                clock, deadline)
    clock.sync()
    ref_opt, ref_params = made[REFERENCE]
    ours = {i.name for i in runnable if i.ours}
    checked = [(n, m) for n, m in made.items() if n in ours]
    checked += [(n + "+graph", m) for n, m in graph_made.items()]
    for name, (opt, params) in checked:
        base = name.removesuffix("+graph")
        diff = differences(opt, params, ref_opt, ref_params, hyper["momentum"])
        if name != base or diff is not None:
            case["bitwise_vs_forloop"][name] = diff is None
        if diff is not None and base in ours:
            drop_mismatch(case, times, name, "cuda-graph replay" if name != base
                          else "after timing", pre + args.warmup + args.rounds, diff)
    return times, busy, discarded


def drop_mismatch(case: dict, times: dict, name: str, phase: str, steps: int, diff=None,
                  summary: str | None = None) -> None:
    """Records an implementation that differs from its reference (`diff`) or failed its call
    check (`summary`) in case["mismatches"], and drops its times: the time of wrong arithmetic
    is not a result."""
    case["mismatches"][name] = {"phase": phase, "steps": steps,
                                "summary": summary or describe(diff), **(diff or {})}
    times.pop(name, None)


# ---- --ampclip: GradScaler's unscale_, clip_grad_norm_, step, update ---------------------------
GRAD_SCALE = 2.0 ** 16  # GradScaler's default init_scale; the gradient pool is scaled by it
AMPCLIP_MAX_NORM = 1.0  # --max-norm's default: randn gradients have a norm of ~sqrt(numel) >> 1
AMPCLIP_TENSORS = OVERHEAD_TENSORS  # --ampclip's tiny cases (--tensors): 148 and 2000 tensors
AMPCLIP_PARAMS = 1 << 24  # --ampclip's bandwidth case (--params): 2^24 elements ...
AMPCLIP_LAYOUTS = ("few-large",)  # ... in few-large's 8 tensors (--layouts)
AMPCLIP_BASES = ("torch-forloop", "torch-foreach", "torch-fused")  # the ratios' denominators
AMPCLIP_POOL = 2  # pre-drawn gradient sets, used in turn: step k of every contender gets set k % 2
# The "gradient passes" model: element reads and writes of the GRADIENT per parameter element
# that each phase of the sequence makes, from what its op does (not a measurement):
#   unscale_   GradScaler.unscale_ (torch._amp_foreach_non_finite_check_and_unscale_): reads g,
#              writes g * (1 / scale)                                          1 read, 1 write
#   norm       clip_grad_norm_'s total norm (torch.nn.utils.get_total_norm): reads g   1 read
#   clip       torch's multiply by the clip coefficient (clip_grads_with_norm_'s mul_): reads g,
#              writes it                                                       1 read, 1 write
#   step       the SGD update reads g (its p and buf traffic: STATE_ACCESSES)          1 read
#   step+clip  momentum_cuda's CUDA kernel: reads g once, multiplies it by the coefficient in
#              registers, steps, and writes the clipped g back (as torch's clip leaves .grad)
#                                                                              1 read, 1 write
GRAD_PHASES = {"unscale_": (1, 1), "norm": (1, 0), "clip": (1, 1), "step": (1, 0),
               "step+clip": (1, 1)}
# The phases of each sequence. torch (every torch.optim.SGD, and momentum_cuda wherever its clip
# falls back to torch's clip_grads_with_norm_, path "torch-clip"): 4 reads + 2 writes of g.
# mc-cuda-kernel: 3 reads + 2 writes. mc-cpu-op: the CPU op multiplies with torch's mul_ on the
# host before its kernel reads g: the same phases as torch, nothing saved in memory traffic.
AMPCLIP_SEQUENCES = {"torch": ("unscale_", "norm", "clip", "step"),
                     "mc-cuda-kernel": ("unscale_", "norm", "step+clip"),
                     "mc-cpu-op": ("unscale_", "norm", "clip", "step")}
STATE_ACCESSES = 4  # the step's other traffic, the same in every sequence: read p, buf; write both


def gradient_passes(sequence: str, element_size: int) -> dict:
    """The model's numbers for one sequence (AMPCLIP_SEQUENCES) and gradient element size."""
    phases = AMPCLIP_SEQUENCES[sequence]
    reads = sum(GRAD_PHASES[p][0] for p in phases)
    writes = sum(GRAD_PHASES[p][1] for p in phases)
    return {"sequence": sequence, "phases": list(phases), "grad_reads": reads,
            "grad_writes": writes, "grad_passes": reads + writes,
            "grad_bytes_per_element": (reads + writes) * element_size,
            "total_bytes_per_element": (reads + writes + STATE_ACCESSES) * element_size}


def sequence_of(impl: Impl, paths) -> str:
    """Which AMPCLIP_SEQUENCES entry an implementation ran, from the paths its steps reported
    (opt.last_step): torch's clip for torch's optimizers and wherever momentum_cuda fell back
    to it ("torch-clip", e.g. the Triton backend); else its backend's."""
    if not impl.ours or "torch-clip" in paths:
        return "torch"
    return {"cuda": "mc-cuda-kernel", "cpu": "mc-cpu-op"}.get(impl.name.rsplit("-", 1)[1],
                                                              "torch")


def ampclip_peak_sets(n_optimizers: int) -> int:
    """The most whole-size tensor sets alive at once in an --ampclip case: the data (init and the
    2 pooled gradient sets), the probe's `a`, p, g, buf per optimizer, one more (a flat
    optimizer's clones while it is made; temporaries). The check holds the data, the for-loop's
    and one other's: fewer from 2 optimizers on."""
    return max(3 + 1 + 3 + 3 + 1, 3 + 1 + 3 * n_optimizers + 1)


@dataclasses.dataclass
class Contender:
    """One implementation's optimizer, parameters and GradScaler, and the sequence timed."""
    impl: Impl
    opt: object
    params: list
    scaler: object
    max_norm: float
    steps: int = 0
    norm: object = None  # the last total norm clip_grad_norm_ returned

    def refill(self, pool) -> None:
        """The next pooled set of scaled gradients into .grad (copy_: a flat optimizer's .grad
        are views of its buffer); every contender's step k gets set k % len(pool)."""
        torch._foreach_copy_([_local(p.grad) for p in self.params],
                             pool[self.steps % len(pool)])
        self.steps += 1

    def sequence(self) -> None:
        """One AMP+clip step: GradScaler.unscale_, the clip (momentum_cuda's opt.clip_grad_norm_,
        else torch's), GradScaler.step, GradScaler.update."""
        self.scaler.unscale_(self.opt)
        if self.impl.ours:
            self.norm = self.opt.clip_grad_norm_(self.max_norm)
        else:
            self.norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.scaler.step(self.opt)
        self.scaler.update()


def make_contender(impl: Impl, data: CaseData, hyper, max_norm: float, device) -> Contender:
    opt, params = build(impl, data, hyper)
    scaler = torch.amp.GradScaler(device.type, init_scale=GRAD_SCALE)
    scaler.scale(torch.ones((), device=device))  # makes its scale tensor, as scale(loss) does
    return Contender(impl, opt, params, scaler, max_norm)


def _kernel_paths(impl: Impl, opt, numel: int) -> set:
    """The paths of a momentum_cuda step (opt.last_step); a flat optimizer's kernel must be one
    flat call over all `numel` elements (a "torch-clip" entry, torch's clip first, aside)."""
    if impl.flat:
        _one_call(impl, [e for e in opt.last_step if e["path"] != "torch-clip"], numel, "flat")
    return {e["path"] for e in opt.last_step}


def ampclip_differences(c: Contender, ref: Contender, momentum: float, norms=None,
                        ref_norms=None) -> dict | None:
    """differences() of the parameters and momentum buffers, and of the gradients (both left
    clipped) and, given, of the total norms: None when all are bitwise equal."""
    out = differences(c.opt, c.params, ref.opt, ref.params, momentum) or {}
    for what, ours, theirs in (("grad", [_local(p.grad) for p in c.params],
                                [_local(p.grad) for p in ref.params]),
                               ("total_norm", norms or [], ref_norms or [])):
        differ = [i for i, (a, b) in enumerate(zip(ours, theirs)) if not torch.equal(a, b)]
        if differ:
            j, value, expected = _first_difference(ours[differ[0]], theirs[differ[0]])
            out[what] = {"differing": len(differ), "of": len(theirs), "first": differ[0],
                         "first_element": j, "value": value, "reference": expected,
                         "max_abs_diff": max(_max_abs_diff(ours[i], theirs[i]) for i in differ)}
    return out or None


def ampclip_check(impls, data: CaseData, pool, hyper, max_norm, device):
    """2 sequences of each implementation on its own clones next to the for-loop's, as
    bitwise_check: parameters, buffers, clipped gradients and total norms must equal the
    for-loop's for momentum_cuda (reported for torch's others). Returns (equal, errors,
    mismatches, {name: {"paths", "sequence"}}, the for-loop's total norms as floats)."""
    numel = sum(data.sizes)

    def two(impl):
        c = make_contender(impl, data, hyper, max_norm, device)
        norms, paths = [], set()
        for _ in range(2):
            c.refill(pool)
            c.sequence()
            norms.append(c.norm.detach().clone())
            if impl.ours:
                paths |= _kernel_paths(impl, c.opt, numel)
        return c, norms, paths

    ref_impl = next(i for i in impls if i.name == REFERENCE)
    try:
        ref, ref_norms, _ = two(ref_impl)
    except Exception as e:  # noqa: BLE001 - nothing to check against: the case cannot run
        raise BenchFailure(f"{ref_impl.label}, the reference, failed: {type(e).__name__}: "
                           f"{e}") from e
    equal, errors, mismatches = {REFERENCE: True}, {}, {}
    info = {REFERENCE: {"paths": [], "sequence": "torch"}}
    for impl in impls:
        if impl is ref_impl:
            continue
        try:
            c, norms, paths = two(impl)
        except Exception as e:  # noqa: BLE001 - recorded; the others still run
            errors[impl.name] = f"{type(e).__name__}: {e}"
            continue
        info[impl.name] = {"paths": sorted(paths), "sequence": sequence_of(impl, paths)}
        diff = ampclip_differences(c, ref, hyper["momentum"], norms, ref_norms)
        equal[impl.name] = diff is None
        if diff is not None and impl.ours:
            mismatches[impl.name] = {"phase": "check", "steps": 2, "summary": describe(diff),
                                     **diff}
        del c
    return equal, errors, mismatches, info, [float(n) for n in ref_norms]


def sequence_cost(impl: Impl, data: CaseData, pool, hyper, max_norm, device) -> dict:
    """Ops (CPU: aten and momentum_cuda ops; GPU: CUDA kernels) and allocated bytes of one
    steady-state sequence (the second), untimed; the refill before it is not counted."""
    c = make_contender(impl, data, hyper, max_norm, device)
    c.refill(pool)
    c.sequence()
    c.refill(pool)
    return measure_cost(c.sequence, device)


def run_ampclip_case(layout, total, dtype, impls, hyper, args, device, clock,
                     deadline=None) -> dict:
    """One --ampclip case: the check, the timed rounds (each contender's gradients refilled,
    untimed, before each of its sequences), the check again, the costs and the model."""
    t0, data, case = case_start(layout, total, dtype, args, device)
    for g in (data.grads, data.grads2):  # scaled, as backward leaves them under GradScaler
        g.mul_(GRAD_SCALE)  # a power of 2: exact
    pool = [data.split(data.grads), data.split(data.grads2)][:AMPCLIP_POOL]
    esize = data.init.element_size()
    case.update(grad_scale=GRAD_SCALE, grad_pool_sets=len(pool), max_norm=args.max_norm)
    equal, errors, mismatches, info, norms = ampclip_check(impls, data, pool, hyper,
                                                           args.max_norm, device)
    case.update(bitwise_vs_forloop=equal, errors=errors, mismatches=mismatches,
                clip={"max_norm": args.max_norm, "total_norms_checked": norms,
                      "clip_coef": [min(args.max_norm / (n + 1e-6), 1.0) for n in norms],
                      "active": all(n > args.max_norm for n in norms)})
    runnable = [i for i in impls if i.name not in errors and i.name not in mismatches]
    times, busy, discarded, scales = _ampclip_timed(case, runnable, data, pool, hyper, args,
                                                    device, clock, deadline)
    case["bandwidth_probe"] = probe_result(times, total, esize)
    results = {}
    for name, ts in times.items():
        r = summarize(ts)
        r["passes"] = gradient_passes(info[name]["sequence"], esize)
        r["kernel_paths"] = info[name]["paths"]
        r["model_gbps"] = (total * r["passes"]["total_bytes_per_element"]
                           / (r["median_ms"] * 1e-3) / 1e9)
        r["bw_share"] = r["model_gbps"] / case["bandwidth_probe"]["gbps"]
        r["final_scale"] = scales.get(name)
        results[name] = r
    add_ratios(results, times, AMPCLIP_BASES)
    add_costs(results, {i.name: functools.partial(sequence_cost, i, data, pool, hyper,
                                                  args.max_norm, device) for i in runnable})
    for r in [*results.values(), case["bandwidth_probe"]]:
        r.update({k.replace("_ms", "_us"): r[k] * 1e3
                  for k in ("median_ms", "p10_ms", "p90_ms", "iqr_ms", "min_ms")})
    case_end(case, t0, device, results=results, contention=busy,
             discarded_noisy_attempts=discarded, steps_per_optimizer=args.warmup + args.rounds)
    return case


def _ampclip_timed(case, runnable, data, pool, hyper, args, device, clock, deadline):
    """Times every runnable implementation's sequence and the bandwidth probe in interleaved
    rounds, each sequence after its contender's untimed refill, then checks momentum_cuda's
    against the for-loop's again (all took the same steps on the same gradients); a mismatch
    is recorded and its times dropped. Returns (times, contention, discarded attempts,
    {name: GradScaler's scale at the end})."""
    bw_a, bw_b = torch.zeros_like(data.init), data.grads  # the pool is only read

    def setup():
        made = {i.name: make_contender(i, data, hyper, args.max_norm, device) for i in runnable}
        steps = {name: c.sequence for name, c in made.items()}
        prepare = {name: (lambda c=c: c.refill(pool)) for name, c in made.items()}
        steps[BW_PROBE] = lambda: bw_a.add_(bw_b, alpha=-1e-3)
        return made, steps, prepare

    made, times, busy, discarded = timed_attempts(case, setup, args, device, clock, deadline)
    clock.sync()
    ref = made[REFERENCE]
    for name, c in made.items():
        if name == REFERENCE or not c.impl.ours:
            continue
        diff = ampclip_differences(c, ref, hyper["momentum"])
        if diff is not None:
            case["bitwise_vs_forloop"][name] = False
            drop_mismatch(case, times, name, "after timing", c.steps, diff)
    return times, busy, discarded, {name: c.scaler.get_scale() for name, c in made.items()}


def ampclip_notes(device: torch.device, args) -> list[str]:
    """What the --ampclip numbers are, written into the JSON and printed under the table."""
    notes = [
        "Per step, timed: momentum_cuda: scaler.unscale_(opt); opt.clip_grad_norm_(max_norm); "
        "scaler.step(opt); scaler.update(). torch.optim.SGD (for-loop, foreach, fused): "
        "scaler.unscale_(opt); torch.nn.utils.clip_grad_norm_(params, max_norm); "
        "scaler.step(opt); scaler.update(). torch.amp.GradScaler(device_type) with its default "
        f"init_scale 2^16; max_norm {args.max_norm:g} (the clip is active when every checked "
        "total norm is above it: case['clip']['active']).",
        f"Gradients: before every sequence (warm-up and timed) each contender's .grad are "
        f"refilled UNTIMED (torch._foreach_copy_, outside the timed call; the clock "
        f"synchronizes after it) from a pool of {AMPCLIP_POOL} gradient sets drawn once per "
        "case and multiplied by 2^16 (scaled, as backward leaves them under GradScaler); step k "
        "of every contender gets set k % 2, so all see the same gradients and momentum_cuda is "
        "checked bitwise against the for-loop (parameters, buffers, clipped gradients, total "
        "norms) before and after timing. The copy leaves part of the gradients in the CPU "
        "caches for the unscale_ that follows, alike for every contender.",
        "Gradient passes: a model, not a measurement (GRAD_PHASES in momentum_cuda/bench.py): "
        "element reads+writes of the gradient per parameter per step. torch: unscale_ (1r+1w), "
        "norm (1r), clip multiply (1r+1w), step (1r) = 4r+2w. momentum_cuda's CUDA kernel: "
        "unscale_ (1r+1w), norm (1r), step reading g and writing the clipped g back (1r+1w) = "
        "3r+2w. model GB/s = numel x (gradient + 4 p/buf accesses) x element size / median; "
        "BW share: of the in-place a.add_(b) probe timed in the same rounds.",
    ]
    if device.type == "cpu":
        notes.append(
            "CPU: momentum_cuda's C++ op does NOT fuse the clip: it multiplies the gradients by "
            "the clip coefficient with torch's mul_ (on the host, before its kernel), so its "
            "gradient traffic is torch's (sequence mc-cpu-op, 4r+2w, as torch). What it can save "
            "on the CPU is host overhead (one op per step instead of torch's per-tensor ops), not "
            "memory traffic; the fused clip is the CUDA kernel's, not measured here.")
    return notes


# ---- --master: bf16 parameters with exact fp32 master weights (issue 14) -------------------------
MASTER_LAYOUTS = ("few-large", "many-small")  # --layouts' default with --master
MASTER_REF32 = "torch-fp32-forloop"  # the fp32 twin: every master, and every fp32 contender
MASTER_REF16 = "torch-bf16-forloop"  # the reference of momentum_cuda's plain bf16 step
MASTER_BASES = ("torch-master-foreach", "torch-master-fused", "torch-fp32-fused")  # ratios
MASTER_KNOWN = tuple([f"mc-master-{b}" for b in BACKENDS]
                     + [f"mc-flat-{b}-{w}" for b in BACKENDS for w in ("fp32", "bf16")]
                     + [f"torch-{m}-{n}" for m in ("master", "fp32") for n in TORCH_STEPS]
                     + [MASTER_REF16])
# The "bytes moved" model: bytes read and written per parameter element by one steady-state
# step (a count of what each op reads and writes, not a measurement: caches, the flat layout's
# padding and the host's work are left out). Element bytes: bf16 2, fp32 4, a tie bit 1/8.
# p: the parameter, g: its gradient, buf: the momentum buffer, rem: master_remainder.
#   One pass (momentum_cuda's kernels, torch's fused SGD): reads p, g, buf; writes p, buf.
#     mc-master-* (sgd_step_master_list_): also reads and writes rem and the tie bits:
#       reads p 2 + rem 2 + ties 1/8 + g 2 + buf 4 (fp32) = 10.125,
#       writes p 2 + rem 2 + ties 1/8 + buf 4 = 8.125: 18.25 bytes
#     mc-flat-*-fp32, torch-fp32-fused: 5 x 4 = 20; mc-flat-*-bf16: 5 x 2 = 10 (buf in bf16)
#   torch's for-loop and foreach (_single_tensor_sgd, _multi_tensor_sgd): a pass per op:
#     buf.mul_(momentum) r buf, w buf; buf.add_(g, alpha=1-dampening) r buf, g, w buf;
#     p.add_(buf, alpha=-lr) r p, buf, w p: 8 accesses: 32 bytes in fp32, 16 in bf16
#     (weight decay: g + wd * p into a temporary first, 3 more; nesterov: g + momentum * buf
#     into a temporary, 3 more)
#   torch-master-* (MasterRecipe): copy g into the master's fp32 grad (r 2, w 4) + the fp32
#     step above on the master + copy the master into p (r 4, w 2): 6 + 32 + 6 = 44 (for-loop,
#     foreach), 6 + 20 + 6 = 32 (fused)
# Without momentum there is no buffer: a pass reads p, g and writes p (the master op with rem
# and the tie bits: 10.25); torch's for-loop is p.add_(g, alpha=-lr), 3 accesses.
# --modes' one-pass steps (sgd_step_sr_list_, sgd_step_qmom_list_):
#   mc-sr-* (bf16 p, g, buf): 5 x 2 = 10, as mc-flat-*-bf16 (the random bits are computed)
#   mc-mdtype-*-bf16 (fp32 p, g; bf16 buf): reads 4 + 4 + 2, writes 4 + 2 = 16
#   mc-mdtype-*-int8 (fp32 p, g; int8 codes q8 and an fp32 scale per QBLOCK = 256 elements,
#     4/256 bytes per element): reads 4 + 4 + 1 + 4/256, writes 4 + 1 + 4/256 = 14.03125
MASTER_BYTES = {"p16": 2, "g16": 2, "buf16": 2, "tmp16": 2, "rem16": 2, "ties": 0.125,
                "p32": 4, "g32": 4, "buf32": 4, "tmp32": 4, "q8": 1, "scales": 4 / QBLOCK}
MASTER_DATA_BYTES = 3 * 2 + 3 * 4  # per parameter: a case's bf16 data and its fp32 widening


class MasterRecipe:
    """torch's fp32 master weights as users write them without momentum_cuda (Apex's O2
    recipe; --master's baseline): an fp32 copy of every bf16 parameter, stepped by
    torch.optim.SGD(**kw), with a preallocated fp32 .grad each. step(): the bf16 gradients
    are copied (widened, exact) into the masters' .grad, the masters stepped, and the masters
    copied (rounded to nearest even, as .to(bfloat16)) into the bf16 parameters; the copies
    are per-tensor copy_ for the for-loop, torch._foreach_copy_ for foreach and fused."""

    def __init__(self, params, kw: dict, **hyper):
        self.params = list(params)
        self.masters = [p.detach().to(torch.float32).requires_grad_(True) for p in self.params]
        for m in self.masters:
            m.grad = torch.empty_like(m)
        self.opt = torch.optim.SGD(self.masters, **hyper, **kw)
        self.foreach = bool(kw.get("foreach") or kw.get("fused"))
        self._index = {id(p): k for k, p in enumerate(self.params)}
        self._state: dict = {}

    @property
    def state(self) -> dict:
        """The masters' optimizer state (torch's dicts), keyed by their bf16 parameters; made
        again only when torch's has new entries (callers look it up once per parameter)."""
        if len(self._state) != len(self.opt.state):
            self._state = {p: self.opt.state[m] for p, m in zip(self.params, self.masters)
                           if m in self.opt.state}
        return self._state

    def master_weight(self, p) -> torch.Tensor:
        return self.masters[self._index[id(p)]].detach()

    def _copy(self, dst: list, src: list) -> None:
        if self.foreach:
            torch._foreach_copy_(dst, src)
        else:
            for d, s in zip(dst, src):
                d.copy_(s)

    @torch.no_grad()
    def step(self) -> None:
        self._copy([m.grad for m in self.masters], [p.grad for p in self.params])
        self.opt.step()
        self._copy(self.params, self.masters)


def master_implementations(device: torch.device) -> tuple[list[Impl], dict[str, str]]:
    """--master's contenders that run on `device`, and {name: why not} for the others:
    momentum_cuda on every backend that runs here (master weights on bf16 parameters, where
    the backend has the master op; flat on fp32 and on bf16 parameters), torch's fp32 master
    recipe (MasterRecipe: for-loop, foreach, fused), torch.optim.SGD on fp32 parameters
    (for-loop: the fp32 twin; foreach; fused) and on bf16 ones (for-loop: the reference of
    momentum_cuda's plain bf16 step)."""
    bf16, fp32 = torch.bfloat16, torch.float32
    impls, missing = [], {}
    for backend in runnable_backends(device, missing):
        try:
            master_op(backend)
        except (AttributeError, RuntimeError) as e:  # e.g. a Triton twin not in this build
            missing[f"mc-master-{backend}"] = (f"backend {backend!r} has no master-weights op in "
                                               f"this build ({type(e).__name__}: {e})")
        else:
            impls.append(Impl(f"mc-master-{backend}", f"momentum_cuda master weights ({backend})",
                              lambda ps, h, b=backend: momentum_cuda.SGD(
                                  ps, backend=b, master_weights=True, **h),
                              ours=True, model=bf16, kind="master", backend=backend))
        for dtype, w in ((fp32, "fp32"), (bf16, "bf16")):
            impls.append(Impl(f"mc-flat-{backend}-{w}", f"momentum_cuda flat {w} ({backend})",
                              lambda ps, h, b=backend: momentum_cuda.SGD(ps, backend=b, **h),
                              ours=True, flat=True, model=dtype, backend=backend))
    for name, kw in TORCH_STEPS.items():
        impls.append(Impl(f"torch-master-{name}", f"torch fp32 master recipe ({name})",
                          lambda ps, h, kw=kw: MasterRecipe(ps, kw, **h), ours=False,
                          model=bf16, kind="recipe"))
    for name, kw in [*TORCH_STEPS.items(), ("bf16-forloop", TORCH_STEPS["forloop"])]:
        bf = name.startswith("bf16")
        impls.append(Impl(MASTER_REF16 if bf else f"torch-fp32-{name}",
                          "torch for-loop bf16 (no master)" if bf else f"torch fp32 {name}",
                          lambda ps, h, kw=kw: torch.optim.SGD(ps, **h, **kw), ours=False,
                          model=bf16 if bf else fp32))
    return impls, missing


def master_reference(impl: Impl) -> str:
    """The contender whose weights `impl` must equal: the fp32 for-loop twin for masters and
    fp32 weights, the bf16 for-loop for plain bf16 weights."""
    return MASTER_REF16 if impl.kind == "plain" and impl.model == torch.bfloat16 else MASTER_REF32


def step_passes(impl: Impl, hyper) -> list[tuple[str, tuple, tuple]]:
    """The ops of one steady-state step of a --master contender, as (op, tensors read, tensors
    written) with MASTER_BYTES' names: the model in the comment above it."""
    use_buf = hyper["momentum"] != 0
    w = "32" if impl.model == torch.float32 or impl.kind == "recipe" else "16"
    p, g, tmp = "p" + w, "g" + w, "tmp" + w
    buf = "buf" + (w if impl.kind == "plain" else "16" if impl.kind in ("sr", "qmom") else "32")
    kept = (p, *(("rem16", "ties") if impl.kind == "master" else ()))
    if impl.ours or impl.name.endswith("-fused"):  # one pass
        narrow = ("q8", "scales") if impl.momentum_dtype == torch.int8 else (buf,)
        bufs = narrow if use_buf else ()
        ops = [("step (one pass)", (*kept, g, *bufs), (*kept, *bufs))]
    else:
        ops = []
        if hyper["weight_decay"]:
            ops.append(("g + weight_decay * p", (g, p), (tmp,)))
            g = tmp
        d = g
        if use_buf:
            ops += [("buf.mul_(momentum)", (buf,), (buf,)), ("buf.add_(g)", (buf, g), (buf,))]
            d = buf
            if hyper["nesterov"]:
                ops.append(("g + momentum * buf", (g, buf), (tmp,)))
                d = tmp
        ops.append(("p.add_(d, alpha=-lr)", (p, d), (p,)))
    if impl.kind == "recipe":
        ops = [("copy g into the master's fp32 grad", ("g16",), ("g32",)), *ops,
               ("copy the master into p", ("p32",), ("p16",))]
    return ops


def moved_bytes(impl: Impl, hyper) -> dict:
    """step_passes() counted: bytes read, written and both, per parameter element."""
    ops = step_passes(impl, hyper)
    read = sum(MASTER_BYTES[t] for _, r, _ in ops for t in r)
    written = sum(MASTER_BYTES[t] for _, _, wr in ops for t in wr)
    return {"ops": [{"op": op, "reads": list(r), "writes": list(wr)} for op, r, wr in ops],
            "read": read, "written": written, "total": read + written}


def _storage_bytes(tensors) -> int:
    """Bytes of the storages under `tensors`, each storage once (views share theirs)."""
    seen = {}
    for t in tensors:
        s = _local(t).untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def held_memory(opt, params) -> dict:
    """Bytes held, measured from the tensors: "weights" (the parameters' storages, and the
    recipe's fp32 masters), "state" (every tensor in opt.state: momentum buffers, master
    remainders and tie bits) and "grads" (the gradients' storages, the masters' too)."""
    weights = [*params, *getattr(opt, "masters", ())]
    state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return {"weights": _storage_bytes(weights), "state": _storage_bytes(state),
            "grads": _storage_bytes(w.grad for w in weights if w.grad is not None)}


def memory_formula(impl: Impl, sizes, momentum: float) -> dict:
    """What held_memory() must find, from the parameters' sizes: elements x element bytes;
    momentum_cuda's flat layout rounds every parameter up to a multiple of ALIGN_BYTES in its
    flat weights, gradients and buffers; a master-weights parameter's state is an fp32 buffer,
    an int16 remainder and ceil(numel / 8) bytes of tie bits; the recipe holds fp32 copies of
    the bf16 weights and gradients, and fp32 buffers; stochastic rounding a bf16 buffer;
    momentum_dtype a bf16 buffer, or int8 codes and ceil(numel / QBLOCK) fp32 scales."""
    esize = torch.tensor([], dtype=impl.model).element_size()
    align = max(1, ALIGN_BYTES // esize) if impl.flat else 1
    n = sum(-(-s // align) * align for s in sizes)
    if not momentum:
        buf = 0
    elif impl.momentum_dtype == torch.int8:
        buf = n + 4 * sum(-(-s // QBLOCK) for s in sizes)
    elif impl.kind in ("sr", "qmom"):
        buf = 2 * n
    else:
        buf = n * esize if impl.kind == "plain" else 4 * n
    wide = 4 * n if impl.kind == "recipe" else 0
    ties = sum(-(-s // 8) for s in sizes) if impl.kind == "master" else 0
    return {"weights": n * esize + wide,
            "state": buf + (2 * n + ties if impl.kind == "master" else 0),
            "grads": n * esize + wide}


def master_peak_bytes(impls: list, total: int, momentum: float) -> int:
    """Bytes per parameter alive at once in a --master case (fits()' `sets` with 1-byte
    elements): the data, every contender's weights, state and gradients (timing holds all),
    and an fp32 set for temporaries (a contender's clones while it is built)."""
    return MASTER_DATA_BYTES + 4 + -(-sum(sum(memory_formula(i, [total], momentum).values())
                                          for i in impls) // total)


def run_master_case(layout, total, dtype, impls, hyper, args, device, clock,
                    deadline=None, ref_of=master_reference, bases=MASTER_BASES) -> dict:
    """One --master case (--modes: ref_of=modes_reference, bases=MODES_BASES): the bf16 data
    drawn once (the fp32 contenders step it widened, exactly), the check (2 steps next to each
    contender's reference, ref_of(impl)), the timed rounds, the check again after them, the
    memory held (measured), the bytes model, the ratios to `bases` and the costs."""
    t0, data, case = case_start(layout, total, dtype, args, device)
    datas = {dtype: data, torch.float32: CaseData(
        data.sizes, *(t.to(torch.float32) for t in (data.init, data.grads, data.grads2)))}
    case["references"] = {i.name: ref_of(i) for i in impls if i.timed}
    equal, errors, mismatches = bitwise_check(impls, datas, hyper, ref_of)
    case.update(bitwise_vs_forloop=equal, errors=errors, mismatches=mismatches)
    runnable = [i for i in impls if i.name not in errors and i.name not in mismatches]
    times, busy, discarded, held = _master_timed(case, runnable, datas, hyper, args, device,
                                                 clock, deadline, ref_of)
    case["bandwidth_probe"] = probe_result(times, total, 4)
    results = {}
    for impl in runnable:
        if impl.name not in times:
            continue
        r = summarize(times[impl.name])
        r.update(model_dtype=str(impl.model).replace("torch.", ""), kind=impl.kind,
                 reference=ref_of(impl), moved=moved_bytes(impl, hyper))
        if impl.momentum_dtype is not None:
            r["momentum_dtype"] = str(impl.momentum_dtype).replace("torch.", "")
        r["bytes_per_param"] = r["moved"]["total"]
        r["gbps"] = total * r["bytes_per_param"] / (r["median_ms"] * 1e-3) / 1e9
        r["bw_share"] = r["gbps"] / case["bandwidth_probe"]["gbps"]
        formula = memory_formula(impl, data.sizes, hyper["momentum"])
        r.update(memory_bytes=held[impl.name], memory_formula_bytes=formula,
                 memory_matches_formula=held[impl.name] == formula,
                 memory_per_param={k: v / total for k, v in held[impl.name].items()})
        r["memory_per_param"]["weights_state"] = (r["memory_per_param"]["weights"]
                                                  + r["memory_per_param"]["state"])
        r["memory_per_param"]["total"] = sum(held[impl.name].values()) / total
        results[impl.name] = r
    add_ratios(results, times, bases)
    add_costs(results, {i.name: functools.partial(step_cost, i, datas[i.model], hyper, device)
                        for i in runnable if i.timed})
    case_end(case, t0, device, results=results, contention=busy,
             discarded_noisy_attempts=discarded, steps_per_optimizer=args.warmup + args.rounds)
    return case


def _master_timed(case, runnable, datas, hyper, args, device, clock, deadline,
                  ref_of=master_reference):
    """Times every runnable contender's step and the bandwidth probe (an fp32 a.add_(b)) in
    interleaved rounds, then checks each against its reference again (all took the same steps
    on the same gradients): a momentum_cuda step must still be one call of its path (master,
    flat, stochastic-rounding, momentum-dtype) on its backend, and its weights (masters) and
    state equal the reference's bitwise, or it is recorded and its times dropped; torch's are
    reported. A reference twin (--modes: impl.timed False) is not timed: it is made after the
    rounds over twin_sample()'s parameters and elements and takes as many steps.
    Returns (times, contention, discarded attempts, {name: held_memory() after timing})."""
    data32 = datas[torch.float32]
    bw_a, bw_b = data32.grads2, data32.grads  # grads2 is no longer needed after the check

    def setup():
        made = {i.name: build(i, datas[i.model], hyper) for i in runnable if i.timed}
        steps = {name: opt.step for name, (opt, _) in made.items()}
        steps[BW_PROBE] = lambda: bw_a.add_(bw_b, alpha=-1e-3)
        return made, steps, None

    made, times, busy, discarded = timed_attempts(case, setup, args, device, clock, deadline)
    clock.sync()
    steps = args.warmup + args.rounds
    sample = twin_sample(data32.sizes)
    twins = {}
    for twin in [i for i in runnable if not i.timed]:
        # the reference steps are slow (plain torch ops, several per tensor and element): a
        # twin steps a sample, exactly as it would within the whole (each parameter alone,
        # elementwise, the random bits and the int8 blocks numbered from its start)
        twins[twin.name] = build(twin, sample_data(datas[twin.model], sample), hyper)
        twins[twin.name][0].positions = list(sample)  # the sr keys' parameter numbers
        for _ in range(steps):
            twins[twin.name][0].step()
    case["twin_check"] = {"tensors": len(sample), "of_tensors": len(data32.sizes),
                          "elements": sum(sample.values()), "of": sum(data32.sizes),
                          "per_parameter_max": max(sample.values())} if twins else None
    for impl in runnable:
        if not impl.timed:
            continue
        opt, params = made[impl.name]
        ref = ref_of(impl)
        if impl.name == ref:
            continue
        try:
            if impl.ours:
                _check_flat(impl, opt, sum(data32.sizes))
        except BenchFailure as e:
            drop_mismatch(case, times, impl.name, "after timing", steps, summary=str(e))
            continue
        diff = (versus_reference(impl, opt, params, *twins[ref], hyper["momentum"], sample)
                if ref in twins else
                versus_reference(impl, opt, params, *made[ref], hyper["momentum"]))
        case["bitwise_vs_forloop"][impl.name] = diff is None
        if diff is not None and impl.ours:
            drop_mismatch(case, times, impl.name, "after timing", steps, diff)
    return times, busy, discarded, {name: held_memory(*m) for name, m in made.items()}


def sample_data(data: CaseData, sample: dict) -> CaseData:
    """`data` cut to twin_sample()'s parameters, each its first sample[i] elements."""
    def cut(flat):
        pieces = data.split(flat)
        return torch.cat([pieces[i][:n] for i, n in sample.items()])
    return CaseData(list(sample.values()), cut(data.init), cut(data.grads), cut(data.grads2))


def master_notes(device: torch.device, args) -> list[str]:
    """What the --master numbers are, written into the JSON and printed under the table."""
    notes = [
        "Timed: one step. mc-master-<backend>: momentum_cuda.SGD(bf16 params, master_weights=True,"
        " backend=<backend>).step(); each step checked to be ONE call of path 'master' on that "
        "backend over all parameters (opt.last_step), mc-flat-<backend>-<dtype>: one 'flat' call. "
        "torch-master-*: the fp32 master recipe users write without momentum_cuda (Apex O2 "
        "style, MasterRecipe): copy the bf16 grads into the fp32 masters' preallocated .grad, "
        "torch.optim.SGD(masters, for-loop / foreach / fused).step(), copy the masters into "
        "the bf16 params (per-tensor copy_ for the for-loop, torch._foreach_copy_ otherwise). "
        "torch-fp32-*: torch.optim.SGD on fp32 params; torch-bf16-forloop: on bf16 params, no "
        "master.",
        "Data: bf16 parameters and gradients drawn once per case; the fp32 contenders get them "
        "widened (exact), so every fp32 master starts from the same values. The gradients stay "
        "the same over the timed steps. Checked before timing (2 steps, 2 gradient sets) and "
        "after it (every contender took the same warm-up + timed steps): each master "
        "(opt.master_weight(p)), fp32 momentum buffer and bf16 parameter (the master rounded "
        "to nearest even) must equal the fp32 for-loop twin's (torch-fp32-forloop), bitwise; "
        "plain fp32 / bf16 weights that for-loop's / torch-bf16-forloop's. Enforced for "
        "momentum_cuda, reported for torch ('== ref').",
        "moved B/p: a MODEL, not a measurement (step_passes, MASTER_BYTES in "
        "momentum_cuda/bench.py): bytes each implementation's ops read and write per parameter "
        "per steady-state step. One pass (momentum_cuda, torch fused): master 18.25 (reads p 2 "
        "+ remainder 2 + ties 1/8 + g 2 + fp32 buf 4, writes p 2 + remainder 2 + ties 1/8 + buf "
        "4), fp32 20, bf16 10. torch for-loop/foreach: 3 ops, 8 accesses (fp32 32, bf16 16). "
        "Recipe: + grad copy (2 + 4) + weight copy (4 + 2): 44 (for-loop, foreach), 32 (fused). "
        "GB/s: that model's bytes / median; BW share: of the fp32 a.add_(b) probe timed in the "
        "same rounds.",
        "weights / state / grads B/p: MEASURED after timing from the tensors held, each "
        "storage once: the parameters (and the recipe's fp32 masters), every tensor in "
        "opt.state, the gradients (and the masters'); momentum_cuda's flat layout includes its "
        "padding (each parameter rounded up to 64 bytes). Compared with memory_formula() "
        "(JSON: memory_matches_formula). The gradients are not optimizer state; they are "
        "listed because the recipe needs a second, fp32 set of them.",
        "vs X: X's median / this median (> 1: faster), both of the same interleaved rounds.",
    ]
    if device.type == "cpu":
        notes.append(
            "CPU: these are the C++ ops on this host's cores, caches and memory, not a GPU's; "
            "on a shared machine other processes' load makes them noisy (see 'contention' per "
            "case). CUDA and Triton rows run only on a GPU.")
    else:
        notes.append("No CUDA-graph replays in --master (the step mode times those).")
    return notes


# ---- --modes: every momentum_cuda mode next to fp32 and torch (issue 14) ------------------------
MODES_PARAMS = (10**6, 10**7)  # --params' default with --modes
MODES_BASES = ("torch-fp32-foreach", "torch-fp32-fused")  # the ratios' denominators
SR_SEED = 0  # the stochastic-rounding contenders' sr_seed (their twin draws the same bits)
# A reference twin (plain torch ops: seconds per step at 10M elements, or at 2000 tensors, on a
# CPU) steps a sample after timing: at most TWIN_TENSORS parameters and about TWIN_ELEMENTS
# elements (twin_sample; the 2-step check before timing steps all).
TWIN_TENSORS = 64
TWIN_ELEMENTS = 1 << 19


def twin_sample(sizes: list) -> dict:
    """{parameter index: leading elements} a twin steps after timing: every parameter where
    there are at most TWIN_TENSORS, else TWIN_TENSORS of them evenly spaced (the first and the
    last among them); all their elements where they hold at most TWIN_ELEMENTS, else the same
    share of each, whole int8 blocks (a multiple of QBLOCK, at least one block)."""
    n = len(sizes)
    picked = (range(n) if n <= TWIN_TENSORS else
              sorted({round(k * (n - 1) / (TWIN_TENSORS - 1)) for k in range(TWIN_TENSORS)}))
    if sum(sizes[i] for i in picked) <= TWIN_ELEMENTS:
        return {i: sizes[i] for i in picked}
    head = max(QBLOCK, TWIN_ELEMENTS // len(picked) // QBLOCK * QBLOCK)
    return {i: min(sizes[i], head) for i in picked}


TWIN_SR = "ref-sr"


def twin_name(impl: Impl) -> str | None:
    """The reference twin of a stochastic-rounding or momentum_dtype contender (or twin)."""
    if impl.kind == "sr":
        return TWIN_SR
    if impl.kind == "qmom":
        return "ref-mdtype-" + {torch.bfloat16: "bf16", torch.int8: "int8"}[impl.momentum_dtype]
    return None


class SrTwin:
    """stochastic_rounding=True's reference as an optimizer: each step() is
    momentum_cuda.reference.sgd_sr_reference_step over its parameters' .grad, with the keys
    momentum_cuda.SGD(params, stochastic_rounding=True, sr_seed=seed) uses for one group:
    sr_key(seed, step, the parameter's position); state "momentum_buffer" (bf16), as it keeps
    it."""

    def __init__(self, params, seed: int, **hyper):
        self.params, self.seed, self.hyper = list(params), seed, hyper
        self.steps, self.state = 0, {}
        # each parameter's place among the contender's (a twin of a sample: twin_sample's)
        self.positions = list(range(len(self.params)))

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        keys = [sr_key(self.seed, self.steps, k) for k in self.positions]
        bufs = sgd_sr_reference_step(self.params, [p.grad for p in self.params],
                                     [self.state.get(p, {}).get("momentum_buffer")
                                      for p in self.params], keys, **self.hyper)
        for p, b in zip(self.params, bufs):
            if b is not None:
                self.state.setdefault(p, {})["momentum_buffer"] = b


class MomentumDtypeTwin:
    """momentum_dtype's reference as an optimizer: each step() is
    momentum_cuda.reference.sgd_momentum_dtype_reference_step over its fp32 parameters' .grad;
    state "momentum_buffer" (bf16, or int8 codes) and, for int8, "momentum_scales", as
    momentum_cuda.SGD(params, momentum_dtype=dtype) keeps them."""

    def __init__(self, params, dtype: torch.dtype, **hyper):
        self.params, self.int8, self.hyper = list(params), dtype == torch.int8, hyper
        self.state = {}

    @torch.no_grad()
    def step(self) -> None:
        st = [self.state.get(p, {}) for p in self.params]
        # a list (of None on the first step) asks the reference for int8 buffers, None for bf16
        bufs, scales = sgd_momentum_dtype_reference_step(
            self.params, [p.grad for p in self.params], [s.get("momentum_buffer") for s in st],
            [s.get("momentum_scales") for s in st] if self.int8 else None, **self.hyper)
        for k, (p, b) in enumerate(zip(self.params, bufs)):
            if b is not None:
                self.state.setdefault(p, {})["momentum_buffer"] = b
                if self.int8:
                    self.state[p]["momentum_scales"] = scales[k]


# The order of --modes' rows: momentum_cuda's modes from the widest state to the narrowest
# (plain fp32, narrow buffers, bf16 with masters, stochastic rounding, plain bf16), then torch.
MODES_ORDER = ("mc-flat-{b}-fp32", "mc-mdtype-{b}-bf16", "mc-mdtype-{b}-int8", "mc-master-{b}",
               "mc-sr-{b}", "mc-flat-{b}-bf16")
MODES_TORCH = ("torch-fp32-forloop", "torch-fp32-foreach", "torch-fp32-fused", MASTER_REF16)
MODES_KNOWN = tuple([n.format(b=b) for b in BACKENDS for n in MODES_ORDER] + list(MODES_TORCH))


def modes_implementations(device: torch.device) -> tuple[list[Impl], dict[str, str]]:
    """--modes' contenders that run on `device`, and {name: why not} for the others: per
    backend that runs here, momentum_cuda flat on fp32 parameters, momentum_dtype bf16 and int8
    (fp32 parameters), master weights, stochastic rounding and flat on bf16 parameters (each
    mode where the backend has its op); torch.optim.SGD on fp32 parameters (for-loop: the
    reference of fp32 weights and masters; foreach; fused) and on bf16 ones (for-loop: the
    reference of plain bf16); the reference twins (not timed) of stochastic rounding and
    momentum_dtype."""
    bf16, fp32 = torch.bfloat16, torch.float32
    found, missing = master_implementations(device)
    found = {i.name: i for i in found if i.kind != "recipe"}  # the recipe is --master's
    backends = [b for b in BACKENDS if f"mc-flat-{b}-fp32" in found]
    for b in backends:
        try:
            sr_op(b)
        except (AttributeError, RuntimeError) as e:
            missing[f"mc-sr-{b}"] = (f"backend {b!r} has no stochastic-rounding op in this build "
                                     f"({type(e).__name__}: {e})")
        else:
            found[f"mc-sr-{b}"] = Impl(
                f"mc-sr-{b}", f"momentum_cuda stochastic rounding ({b})",
                lambda ps, h, b=b: momentum_cuda.SGD(ps, backend=b, stochastic_rounding=True,
                                                     sr_seed=SR_SEED, **h),
                ours=True, model=bf16, kind="sr", backend=b)
        for w, mdtype in (("bf16", bf16), ("int8", torch.int8)):
            name = f"mc-mdtype-{b}-{w}"
            try:
                qmom_op(b)
            except (AttributeError, RuntimeError) as e:
                missing[name] = (f"backend {b!r} has no momentum_dtype op in this build "
                                 f"({type(e).__name__}: {e})")
            else:
                found[name] = Impl(name, f"momentum_cuda momentum_dtype={w} ({b})",
                                   lambda ps, h, b=b, d=mdtype: momentum_cuda.SGD(
                                       ps, backend=b, momentum_dtype=d, **h),
                                   ours=True, model=fp32, kind="qmom", backend=b,
                                   momentum_dtype=mdtype)
    order = [n.format(b=b) for b in backends for n in MODES_ORDER] + list(MODES_TORCH)
    impls = [found[n] for n in order if n in found]
    twins = [Impl(TWIN_SR, "reference twin: sgd_sr_reference_step",
                  lambda ps, h: SrTwin(ps, SR_SEED, **h), ours=False, model=bf16, kind="sr",
                  timed=False)]
    for w, mdtype in (("bf16", bf16), ("int8", torch.int8)):
        twins.append(Impl(f"ref-mdtype-{w}",
                          f"reference twin: sgd_momentum_dtype_reference_step ({w})",
                          lambda ps, h, d=mdtype: MomentumDtypeTwin(ps, d, **h), ours=False,
                          model=fp32, kind="qmom", momentum_dtype=mdtype, timed=False))
    return impls + twins, missing


def modes_reference(impl: Impl) -> str:
    """The contender (or twin) whose weights and state `impl` must equal: stochastic rounding
    and momentum_dtype their twin, the others as in --master (fp32 weights and masters: the
    fp32 for-loop; plain bf16: the bf16 for-loop)."""
    return twin_name(impl) or master_reference(impl)


def run_modes_case(layout, total, dtype, impls, hyper, args, device, clock,
                   deadline=None) -> dict:
    """One --modes case: --master's machinery (run_master_case) with --modes' references
    (modes_reference: the twins for stochastic rounding and momentum_dtype) and bases."""
    return run_master_case(layout, total, dtype, impls, hyper, args, device, clock, deadline,
                           ref_of=modes_reference, bases=MODES_BASES)


def needed_twins(impls: list) -> list:
    """impls less the twins that no timed contender refers to (--impls without them)."""
    refs = {modes_reference(i) for i in impls if i.timed}
    return [i for i in impls if i.timed or i.name in refs]


def modes_notes(device: torch.device, args) -> list[str]:
    """What the --modes numbers are, written into the JSON and printed under the table."""
    notes = [
        "Timed: one opt.step() of momentum_cuda.SGD(params, backend=<backend>) with: "
        "mc-flat-<b>-fp32: fp32 params (flat); mc-mdtype-<b>-bf16 / -int8: fp32 params, "
        "momentum_dtype=torch.bfloat16 / torch.int8 (int8 codes + one fp32 scale per 256 "
        "elements); mc-master-<b>: bf16 params, master_weights=True (exact fp32 masters); "
        f"mc-sr-<b>: bf16 params, stochastic_rounding=True, sr_seed={SR_SEED} (bf16 momentum); "
        "mc-flat-<b>-bf16: bf16 params (flat, bf16 momentum). Each momentum_cuda step checked "
        "to be ONE call of its path (flat, momentum-dtype, master, stochastic-rounding) on its "
        "backend over all parameters (opt.last_step). torch-fp32-*: torch.optim.SGD on fp32 "
        "params (for-loop, foreach, fused); torch-bf16-forloop: on bf16 params.",
        "Data: bf16 parameters and gradients drawn once per case; the fp32 contenders get "
        "them widened (exact). The gradients stay the same over the timed steps. Checked "
        "before timing (2 steps, 2 gradient sets, every element) and after it (every contender "
        "took the same warm-up + timed steps), bitwise: fp32 weights and masters (and bf16 "
        "params = masters rounded to nearest even) against torch-fp32-forloop, plain bf16 "
        "against torch-bf16-forloop, stochastic rounding and momentum_dtype (parameters, "
        "momentum buffers, int8 scales) against a twin stepped by momentum_cuda.reference "
        "(sgd_sr_reference_step with sr_key(seed, step, position); "
        "sgd_momentum_dtype_reference_step), not timed; after timing the twins step a sample: "
        f"at most {TWIN_TENSORS} parameters, evenly spaced, and the first elements of each, "
        f"about {TWIN_ELEMENTS} in all, whole int8 blocks (twin_sample; per case: twin_check), "
        "since the plain-torch references are slow. Enforced for momentum_cuda, reported for "
        "torch.",
        "moved B/p: a MODEL, not a measurement (step_passes, MASTER_BYTES in "
        "momentum_cuda/bench.py): bytes each implementation's ops read and write per parameter "
        "per steady-state step. One pass: fp32 20 (p, g, buf 4 each, read; p, buf written); "
        "momentum_dtype bf16 16 (buf 2); int8 14.03125 (codes 1, plus a 4-byte scale per 256 "
        "elements read and written); master 18.25 (bf16 p, remainder, tie bit, bf16 g, fp32 "
        "buf); stochastic rounding and bf16 flat 10. torch for-loop/foreach: 3 ops, 8 "
        "accesses (fp32 32, bf16 16); fused: one pass (20). GB/s: that model's bytes / median; "
        "BW share: of the fp32 a.add_(b) probe timed in the same rounds.",
        "weights / state / grads / held B/p: MEASURED after timing from the tensors held, each "
        "storage once: the parameters, every tensor in opt.state (momentum buffers, int8 "
        "scales, master remainders and tie bits), the gradients; held = their sum. "
        "momentum_cuda's flat layout includes its padding (each parameter rounded up to 64 "
        "bytes); the modes' parameters are not laid out flat. Compared with memory_formula() "
        "(JSON: memory_matches_formula).",
        "vs X: X's median / this median (> 1: faster), both of the same interleaved rounds.",
    ]
    if device.type == "cpu":
        notes.append(
            "CPU: these are the C++ ops on this host's cores, caches and memory, not a GPU's; "
            "on a shared machine other processes' load makes them noisy (see 'contention' per "
            "case). CUDA and Triton rows run only on a GPU.")
    return notes


# ---- report -------------------------------------------------------------------------------
def count_text(n: int) -> str:
    """1000000 -> '1M', 1500 -> '1.5k', 1234567 -> '1,234,567'."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale and (n * 10) % scale == 0:
            return f"{n / scale:g}{unit}"
    return f"{n:,}"


def case_name(c: dict) -> str:
    count = tiny_count(c["layout"])
    if count is not None:
        return f"{count} tiny tensors ({c['numel']:,} elements) {c['dtype']}"
    return f"{c['layout']} {count_text(c['numel'])} {c['dtype']}"


def _us(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _ms(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def impl_name(case: dict, name: str) -> str:
    """The implementation's name, marked where a DTensor case ran it on the local tensors."""
    local = name.removesuffix("+graph") in case.get("local_tensors", ())
    return name + (" [local]" if local else "")


def case_line(case: dict) -> str:
    """The one line printed when a case is done."""
    if "targets" in case:  # --overhead: microseconds, one op as the floor
        parts = [f"{case['seconds']:.1f} s",
                 f"one op {_us(case['bandwidth_probe']['median_us'])} us"]
        parts.append(", ".join(f"{name} {_us(r['median_us'])} us"
                               for name, r in case["results"].items()))
    else:
        parts = [f"{case['seconds']:.1f} s", f"probe {case['bandwidth_probe']['gbps']:.1f} GB/s"]
        parts.append(", ".join(f"{impl_name(case, name)} {_ms(r['median_ms'])} ms "
                               f"{100 * r['bw_share']:.0f}%"
                               for name, r in case["results"].items()))
    if case["mismatches"]:
        parts.append("BITWISE MISMATCH (not timed): " + ", ".join(case["mismatches"]))
    if case["errors"]:
        parts.append("could not run: " + ", ".join(case["errors"]))
    return " | ".join(parts)


COLUMNS = ("case", "implementation", "median ms", "p10-p90 ms", "GB/s", "BW share",
           "vs foreach", "vs fused", "kernels", "alloc MB", "== for-loop")


def table_rows(case: dict) -> list[list[str]]:
    bw = case["bandwidth_probe"]
    rows = [[case_name(case), "bandwidth probe", _ms(bw["median_ms"]),
             f"{_ms(bw['p10_ms'])}-{_ms(bw['p90_ms'])}", f"{bw['gbps']:.1f}", "100%"]
            + ["-"] * 5]
    for name, r in case["results"].items():
        eq = case["bitwise_vs_forloop"].get(name)
        vs = lambda k: f"{r[k]:.2f}x" if k in r else "-"  # noqa: E731
        rows.append(["", impl_name(case, name), _ms(r["median_ms"]),
                     f"{_ms(r['p10_ms'])}-{_ms(r['p90_ms'])}",
                     f"{r['gbps']:.1f}", f"{100 * r['bw_share']:.0f}%", vs("vs_foreach"),
                     vs("vs_fused"), str(r.get("kernels", "-")),
                     f"{r['alloc_bytes'] / 1e6:.1f}" if "alloc_bytes" in r else "-",
                     "-" if eq is None else ("yes" if eq else "NO")])
    return rows


OVERHEAD_COLUMNS = ("case", "implementation", "median us", "p10-p90 us", "vs foreach",
                    "vs fused", "kernels", "== for-loop")


def overhead_rows(case: dict) -> list[list[str]]:
    """--overhead's rows: microseconds; the bandwidth probe is one aten op, the floor."""
    bw = case["bandwidth_probe"]
    rows = [[f"{case['tensors']} tensors", "one op: a.add_(b)", _us(bw["median_us"]),
             f"{_us(bw['p10_us'])}-{_us(bw['p90_us'])}"] + ["-"] * 4]
    for name, r in case["results"].items():
        eq = case["bitwise_vs_forloop"].get(name)
        vs = lambda k: f"{r[k]:.2f}x" if k in r else "-"  # noqa: E731
        rows.append(["", name, _us(r["median_us"]), f"{_us(r['p10_us'])}-{_us(r['p90_us'])}",
                     vs("vs_foreach"), vs("vs_fused"), str(r.get("kernels", "-")),
                     "-" if eq is None else ("yes" if eq else "NO")])
    return rows


def print_summary(doc: dict, out=None) -> None:
    """The final table (a row per case and implementation, the probe first) and what did not
    run or failed; in --overhead mode microseconds, and issue 13's targets."""
    out = out or sys.stdout
    if doc.get("mode") in ("ampclip", "master", "modes"):
        {"ampclip": print_ampclip_summary, "master": print_master_summary,
         "modes": print_modes_summary}[doc["mode"]](doc, out)
        return
    overhead = doc.get("mode") == "overhead"
    columns = OVERHEAD_COLUMNS if overhead else COLUMNS
    print_rows(columns, [row for case in doc["cases"]
                         for row in (overhead_rows(case) if overhead else table_rows(case))], out)
    for case in doc["cases"]:
        print_case_lines(case, out)
    for s in doc["skipped"]:
        print(f"  skipped: {case_name(s)} ({s['why']})", file=out)
    if overhead:
        m = doc["machine"]
        print(f"\n(host time of one opt.step(), microseconds, {doc['config']['rounds']} "
              f"interleaved rounds; {m['torch']['threads']} thread(s); each tensor 1-{TINY_MAX} "
              f"elements, {doc['config']['dtypes'][0]}; one op: an in-place a.add_(b) over all "
              "the elements, timed in the same rounds; vs X: X's median / this median, > 1 is "
              "faster; kernels: "
              + ("CUDA kernels" if m["device"].startswith("cuda")
                 else "aten and momentum_cuda ops") + " per step)", file=out)
        if doc["config"].get("ddp_grads"):
            print("(--ddp-grads: each .grad a view of a DDP-style gradient bucket, reverse "
                  "parameter order, as DDP's gradient_as_bucket_view=True hands them over; "
                  "mc-flat reads the bucket in place, one call)", file=out)
        if doc["config"].get("unused_grads"):
            print(f"(--unused-grads: every {UNUSED_EVERY}th parameter from index {UNUSED_FROM} "
                  "has no gradient; mc-flat makes one flat call over the runs of the others)", file=out)
        if doc["config"].get("assigned_grads"):
            print("(--assigned-grads: before each timed step, untimed, p.grad = a gradient "
                  "tensor of its own, 2 sets in turn; mc-flat steps them per tensor)", file=out)
        print("targets (issue 13; a ratio of medians, this / base):", file=out)
        for t in doc["targets"]["list"]:
            print("  " + target_line(t), file=out)
        if any(is_noisy(c["contention"]) for c in doc["cases"]):
            print("  (other processes used the CPU while timing: see the warnings above)",
                  file=out)
        return
    kernels = kernels_text(doc)
    print("\n(mc-: momentum_cuda; GB/s: 5 element reads+writes per parameter (the probe: 3); BW "
          "share: of the in-place a.add_(b) probe timed in the same rounds; vs X: X's median / "
          f"this median, > 1 is faster; kernels: {kernels} per step; alloc: bytes allocated by "
          "one step)", file=out)
    if any(c.get("local_tensors") for c in doc["cases"]):
        print("(fsdp2-gpt2: parameters and gradients are DTensors, Shard(0) on a mesh of this one "
              "process, as FSDP2 hands them to the optimizer; [local]: stepped the same values as "
              "plain local tensors, since it has no DTensor rule (torch's fused SGD: "
              "aten._fused_sgd_ has no sharding strategy): what a DTensor-aware fused step "
              "could reach, not what FSDP2 can run)", file=out)
    if any(c["layout"] in DDP_LAYOUTS for c in doc["cases"]):
        print("(ddp-gpt2: each .grad a view of a DDP-style gradient bucket (reverse parameter "
              "order, 1 MiB first bucket, then 25 MiB), as DDP's gradient_as_bucket_view=True "
              "hands them over; mc-flat reads them in place, one call over all buckets)", file=out)


CSV_FIELDS = ("device", "dtype", "layout", "numel", "tensors", "implementation", "cuda_graph",
              "median_ms", "p10_ms", "p90_ms", "iqr_ms", "gbps", "bw_share", "vs_foreach",
              "vs_fused", "kernels", "alloc_bytes", "bitwise_vs_forloop",
              "bandwidth_probe_gbps", "params")


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
                   "bitwise_vs_forloop": case["bitwise_vs_forloop"].get(name, ""),
                   "bandwidth_probe_gbps": case["bandwidth_probe"]["gbps"],
                   "params": ("local tensors" if base in case.get("local_tensors", ())
                              else case.get("params", "tensor"))}


def ampclip_case_line(case: dict) -> str:
    """The one line printed when an --ampclip case is done."""
    parts = [f"{case['seconds']:.1f} s", "clip active" if case["clip"]["active"]
             else "CLIP NOT ACTIVE (every total norm <= max_norm)",
             ", ".join(f"{name} {_us(r['median_us'])} us" for name, r in case["results"].items())]
    if case["mismatches"]:
        parts.append("BITWISE MISMATCH (not timed): " + ", ".join(case["mismatches"]))
    if case["errors"]:
        parts.append("could not run: " + ", ".join(case["errors"]))
    return " | ".join(parts)


AMPCLIP_COLUMNS = ("case", "implementation", "median us", "p10-p90 us", "IQR us", "vs for-loop",
                   "vs foreach", "vs fused", "grad r+w", "grad B/elem", "kernels", "== for-loop")


def ampclip_rows(case: dict) -> list[list[str]]:
    bw = case["bandwidth_probe"]
    rows = [[case_name(case), "one op: a.add_(b)", _us(bw["median_us"]),
             f"{_us(bw['p10_us'])}-{_us(bw['p90_us'])}", _us(bw["iqr_us"])] + ["-"] * 7]
    for name, r in case["results"].items():
        eq = case["bitwise_vs_forloop"].get(name)
        vs = lambda k: f"{r[k]:.2f}x" if k in r else "-"  # noqa: E731
        m = r["passes"]
        rows.append(["", name, _us(r["median_us"]), f"{_us(r['p10_us'])}-{_us(r['p90_us'])}",
                     _us(r["iqr_us"]), vs("vs_forloop"), vs("vs_foreach"), vs("vs_fused"),
                     f"{m['grad_reads']}r+{m['grad_writes']}w", str(m["grad_bytes_per_element"]),
                     str(r.get("kernels", "-")), "-" if eq is None else ("yes" if eq else "NO")])
    return rows


def print_rows(columns, rows, out) -> None:
    """A table: the first two columns left-aligned, the others right-aligned."""
    if not rows:
        return
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    print("\n" + fmt(columns), file=out)
    print("-" * len(fmt(columns)), file=out)
    for row in rows:
        print(fmt(row), file=out)


def print_case_lines(case: dict, out) -> None:
    """A case's implementations that were not timed, and its contention warning."""
    for name, err in case["errors"].items():
        print(f"  {case_name(case)}: {name} not timed ({err})", file=out)
    for name, why in case.get("left_out", {}).items():
        print(f"  {case_name(case)}: {name} left out ({why})", file=out)
    busy = case["contention"]
    if is_noisy(busy):
        print(f"  {case_name(case)}: WARNING: other processes used "
              f"{busy['other_processes_cores']:.2f} cores while timing: these numbers are "
              "not clean", file=out)


def kernels_text(doc: dict) -> str:
    """What the "kernels" column counts on the run's device."""
    return ("CUDA kernels" if doc["machine"]["device"].startswith("cuda")
            else "aten and momentum_cuda ops")


def print_mode_summary(doc: dict, out, columns, rows, legend: str, case_lines=None) -> None:
    """A mode's table (rows(case): a case's rows), then per case its own lines (case_lines(case))
    and what did not run, the cases skipped, the legend and the notes."""
    print_rows(columns, [row for case in doc["cases"] for row in rows(case)], out)
    for case in doc["cases"]:
        for line in case_lines(case) if case_lines else ():
            print(line, file=out)
        print_case_lines(case, out)
    for s in doc["skipped"]:
        print(f"  skipped: {case_name(s)} ({s['why']})", file=out)
    print(f"\n({legend})", file=out)
    for note in doc.get("notes", ()):
        print("  * " + note, file=out)


def print_ampclip_summary(doc: dict, out) -> None:
    """--ampclip's table (microseconds per sequence, ratios, the passes model) and notes."""
    def inactive(case):
        return [] if case["clip"]["active"] else [
            f"  {case_name(case)}: the clip was NOT active (total norms "
            f"{case['clip']['total_norms_checked']} <= max_norm {case['max_norm']:g})"]

    print_mode_summary(doc, out, AMPCLIP_COLUMNS, ampclip_rows, (
        f"one AMP+clip step, microseconds, {doc['config']['rounds']} interleaved rounds after "
        f"{doc['config']['warmup']} warm-up; {doc['machine']['torch']['threads']} thread(s); vs "
        "X: X's median / this median, > 1 is faster; grad r+w, grad B/elem: the gradient passes "
        "model, reads and writes of the gradient per element, and their bytes; kernels: "
        + kernels_text(doc) + " per sequence"), inactive)


AMPCLIP_CSV_FIELDS = ("device", "dtype", "layout", "numel", "tensors", "implementation",
                      "sequence", "median_us", "p10_us", "p90_us", "iqr_us", "min_us",
                      "vs_forloop", "vs_foreach", "vs_fused", "grad_reads", "grad_writes",
                      "grad_bytes_per_element", "total_bytes_per_element", "model_gbps",
                      "bw_share", "kernels", "alloc_bytes", "bitwise_vs_forloop",
                      "bandwidth_probe_gbps", "max_norm", "clip_active")


def ampclip_csv_rows(doc: dict):
    for case in doc["cases"]:
        for name, r in case["results"].items():
            m = r["passes"]
            yield {"device": doc["machine"]["device"], "dtype": case["dtype"],
                   "layout": case["layout"], "numel": case["numel"], "tensors": case["tensors"],
                   "implementation": name, "sequence": m["sequence"],
                   **{k: r.get(k, "") for k in ("median_us", "p10_us", "p90_us", "iqr_us",
                                                "min_us", "vs_forloop", "vs_foreach",
                                                "vs_fused", "model_gbps", "bw_share",
                                                "kernels", "alloc_bytes")},
                   **{k: m[k] for k in ("grad_reads", "grad_writes", "grad_bytes_per_element",
                                        "total_bytes_per_element")},
                   "bitwise_vs_forloop": case["bitwise_vs_forloop"].get(name, ""),
                   "bandwidth_probe_gbps": case["bandwidth_probe"]["gbps"],
                   "max_norm": case["max_norm"], "clip_active": case["clip"]["active"]}


MASTER_COLUMNS = ("case", "implementation", "median ms", "p10-p90 ms", "vs m-foreach",
                  "vs m-fused", "vs fp32-fused", "moved B/p", "GB/s", "BW share",
                  "weights B/p", "state B/p", "grads B/p", "kernels", "== ref")


MODES_COLUMNS = ("case", "implementation", "median ms", "p10-p90 ms", "vs fp32-foreach",
                 "vs fp32-fused", "moved B/p", "GB/s", "BW share", "weights B/p", "state B/p",
                 "grads B/p", "held B/p", "= formula", "kernels", "== ref")
MEMORY_KINDS = ("weights", "state", "grads")


def master_rows(case: dict, bases=MASTER_BASES, held: bool = False) -> list[list[str]]:
    """--master's rows (--modes: its bases, and held: the total bytes held per parameter and
    whether they are memory_formula()'s)."""
    bw = case["bandwidth_probe"]
    rows = [[case_name(case), "bandwidth probe (fp32)", _ms(bw["median_ms"]),
             f"{_ms(bw['p10_ms'])}-{_ms(bw['p90_ms'])}", *("-" for _ in bases), "12",
             f"{bw['gbps']:.1f}", "100%"] + ["-"] * (5 + 2 * held)]
    for name, r in case["results"].items():
        eq = case["bitwise_vs_forloop"].get(name)
        vs = lambda k: f"{r[k]:.2f}x" if k in r else "-"  # noqa: E731
        m = r["memory_per_param"]
        rows.append(["", name, _ms(r["median_ms"]), f"{_ms(r['p10_ms'])}-{_ms(r['p90_ms'])}",
                     *(vs("vs_" + ratio_key(b)) for b in bases),
                     f"{r['bytes_per_param']:g}", f"{r['gbps']:.1f}",
                     f"{100 * r['bw_share']:.0f}%",
                     *(f"{m[k]:.3f}" for k in MEMORY_KINDS),
                     *((f"{m['total']:.3f}", "yes" if r["memory_matches_formula"] else "NO")
                       if held else ()),
                     str(r.get("kernels", "-")), "-" if eq is None else ("yes" if eq else "NO")])
    return rows


def print_modes_summary(doc: dict, out) -> None:
    """--modes' table (per case: the probe, then every contender) and notes."""
    print_mode_summary(doc, out, MODES_COLUMNS, functools.partial(
        master_rows, bases=MODES_BASES, held=True), (
        f"one optimizer step, milliseconds, {doc['config']['rounds']} interleaved rounds after "
        f"{doc['config']['warmup']} warm-up; vs fp32-foreach / fp32-fused: "
        "torch-fp32-foreach's / torch-fp32-fused's median / this median, > 1 is faster; "
        "moved B/p: the bytes model per parameter; weights, state, grads, held B/p: measured "
        "bytes held per parameter (held: their sum); = formula: equal to memory_formula(); "
        "kernels: " + kernels_text(doc) + " per step; == ref: bitwise equal to its reference "
        "after timing (fp32 and masters: torch-fp32-forloop; bf16: torch-bf16-forloop; "
        "stochastic rounding, momentum_dtype: the reference twins)"))


def print_master_summary(doc: dict, out) -> None:
    """--master's table (per case: the probe, then every contender) and notes."""
    print_mode_summary(doc, out, MASTER_COLUMNS, master_rows, (
        f"one optimizer step, milliseconds, {doc['config']['rounds']} interleaved rounds after "
        f"{doc['config']['warmup']} warm-up; vs m-foreach / m-fused / fp32-fused: "
        "torch-master-foreach's / torch-master-fused's / torch-fp32-fused's median / this "
        "median, > 1 is faster; moved B/p: the bytes model per parameter; weights, state, "
        "grads B/p: measured bytes held per parameter; kernels: " + kernels_text(doc)
        + " per step; == ref: bitwise equal to its reference (masters: the fp32 for-loop "
        "twin)"))


def _mode_csv_fields(bases, modes: bool = False) -> tuple:
    """--master's CSV columns (modes: --modes', with the momentum dtype and the total held)."""
    return ("device", "dtype", "layout", "numel", "tensors", "implementation", "model_dtype",
            *(("momentum_dtype",) if modes else ()), "kind", "median_ms", "p10_ms", "p90_ms",
            "iqr_ms", "min_ms", *("vs_" + ratio_key(b) for b in bases), "bytes_per_param",
            "bytes_read_per_param", "bytes_written_per_param", "gbps", "bw_share",
            *(k + "_bytes_per_param" for k in MEMORY_KINDS + (("total",) if modes else ())),
            "memory_matches_formula", "kernels", "alloc_bytes", "reference",
            "bitwise_vs_reference", "bandwidth_probe_gbps")


MASTER_CSV_FIELDS = _mode_csv_fields(MASTER_BASES)
MODES_CSV_FIELDS = _mode_csv_fields(MODES_BASES, modes=True)


def master_csv_rows(doc: dict, bases=MASTER_BASES, modes: bool = False):
    """--master's CSV rows (--modes: its bases, modes: the momentum dtype and total held)."""
    for case in doc["cases"]:
        for name, r in case["results"].items():
            m = r["memory_per_param"]
            yield {"device": doc["machine"]["device"], "dtype": case["dtype"],
                   "layout": case["layout"], "numel": case["numel"], "tensors": case["tensors"],
                   "implementation": name,
                   **{k: r.get(k, "") for k in ("model_dtype", "kind", "median_ms", "p10_ms",
                                                "p90_ms", "iqr_ms", "min_ms", "bytes_per_param",
                                                "gbps", "bw_share",
                                                *("vs_" + ratio_key(b) for b in bases))},
                   **({"momentum_dtype": r.get("momentum_dtype", ""),
                       "total_bytes_per_param": m["total"]} if modes else {}),
                   "bytes_read_per_param": r["moved"]["read"],
                   "bytes_written_per_param": r["moved"]["written"],
                   **{k + "_bytes_per_param": m[k] for k in MEMORY_KINDS},
                   **{k: r.get(k, "") for k in ("memory_matches_formula", "kernels",
                                                "alloc_bytes", "reference")},
                   "bitwise_vs_reference": case["bitwise_vs_forloop"].get(name, ""),
                   "bandwidth_probe_gbps": case["bandwidth_probe"]["gbps"]}


def plot_master(doc: dict, path: Path, labels: dict) -> None:
    """--master's (and --modes') picture: a panel per case, a bar per contender: its median
    step time (p10-p90 whiskers), labelled with its modelled bytes moved and its measured
    weights + state per parameter."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = doc["cases"]
    ncol = min(2, len(cases))
    nrow = -(-len(cases) // ncol)
    most = max(len(c["results"]) for c in cases)
    fig, axes = plt.subplots(nrow, ncol, squeeze=False,
                             figsize=(7.5 * ncol, (0.32 * most + 1.2) * nrow + 1.0))
    colors = {"master": "tab:red", "recipe": "tab:blue", "plain": "tab:gray", "sr": "tab:purple",
              "qmom": "tab:green"}
    for ax, case in zip(axes.flat, cases):
        res = case["results"]
        names = list(res)
        med = np.asarray([res[n]["median_ms"] for n in names])
        err = [med - [res[n]["p10_ms"] for n in names], [res[n]["p90_ms"] for n in names] - med]
        ax.barh(range(len(names)), med, xerr=err, capsize=2,
                color=[colors[res[n]["kind"]] if not n.startswith("mc-flat") else "tab:orange"
                       for n in names])
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        for k, n in enumerate(names):  # right of the whisker
            ax.text(res[n]["p90_ms"], k, f"  {res[n]['bytes_per_param']:g} B moved, "
                    f"{res[n]['memory_per_param']['weights_state']:.2f} B weights+state",
                    va="center", fontsize=7)
        ax.set_xlim(0, 1.6 * float(np.max(np.concatenate([med, err[1] + med]))))
        ax.set_xlabel("ms per step (median, p10-p90)")
        ax.set_title(case_name(case) + " parameters", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(cases):]:
        ax.set_visible(False)
    m = doc["machine"]
    title = ("One SGD-momentum step per mode, lower is better (orange: momentum_cuda flat fp32 / "
             "bf16; green: momentum_dtype bf16 / int8; red: master weights; purple: stochastic "
             "rounding; gray: torch)" if doc.get("mode") == "modes" else
             "One SGD-momentum step, bf16 parameters with fp32 master weights, lower is better "
             "(red: momentum_cuda master weights; orange: momentum_cuda flat; blue: torch's "
             "fp32 master recipe; gray: torch)")
    fig.suptitle(f"{title}\n{m.get('gpu') or m['cpu']['model']} | torch "
                 f"{m['torch']['version']} | {m['torch']['threads']} threads | {m['date'][:10]}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # path may be a temporary name
    plt.close(fig)


def _atomic_write(path: Path, write) -> None:
    """write(tmp) then rename onto path: a reader, or a run killed while writing, sees the old
    file or the new one, never part of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_files(doc: dict, base: Path, formats, labels: dict, png: bool) -> list[Path]:
    """The JSON and CSV (as asked), and the PNG when `png` (the run's end) and cases exist."""
    written = []
    if "json" in formats:
        path = base.with_name(base.name + ".json")
        _atomic_write(path, lambda p: p.write_text(json.dumps(doc, indent=1) + "\n"))
        written.append(path)
    if "csv" in formats:
        def write_csv(p: Path) -> None:
            with p.open("w", newline="") as f:
                fields, rows = {"ampclip": (AMPCLIP_CSV_FIELDS, ampclip_csv_rows),
                                "master": (MASTER_CSV_FIELDS, master_csv_rows),
                                "modes": (MODES_CSV_FIELDS, functools.partial(
                                    master_csv_rows, bases=MODES_BASES, modes=True))}.get(
                    doc.get("mode"), (CSV_FIELDS, csv_rows))
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(rows(doc))
        path = base.with_name(base.name + ".csv")
        _atomic_write(path, write_csv)
        written.append(path)
    if png and "png" in formats and doc["cases"]:
        path = base.with_name(base.name + ".png")
        _atomic_write(path, lambda p: (plot_master if doc.get("mode") in ("master", "modes")
                                       else plot)(doc, p, labels))
        written.append(path)
    return written


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
            ax.set_title(f"{layout}, {dtype}" + (" (DTensors; fused: local)" if layout in
                                                 DTENSOR_LAYOUTS else ""), fontsize=10)
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
    fig.savefig(path, dpi=110, format="png")  # path may be a temporary name
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
                    help="total parameter counts, most important first (default: CPU 1M 10M "
                         "100M; GPU 1M 10M 100M 1B)")
    ap.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=None,
                    help="most important first (default: " + " ".join(DEFAULT_LAYOUTS) + "; "
                         "fsdp2-gpt2: GPT-2's tensors as FSDP2 hands them over, DTensors; "
                         "ddp-gpt2: GPT-2's tensors, gradients views of DDP buckets)")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                    help="most important first (default: float32 bfloat16; --overhead: float32)")
    ap.add_argument("--impls", nargs="+", default=None, metavar="NAME",
                    help="only these implementations (torch-forloop, the reference, is always "
                         f"run); any of: {' '.join(KNOWN)}; --master: any of "
                         f"{' '.join(MASTER_KNOWN)} ({MASTER_REF32} and {MASTER_REF16} always "
                         f"run); --modes: any of {' '.join(MODES_KNOWN)} (the same two always "
                         "run)")
    ap.add_argument("--overhead", action="store_true",
                    help="time the host overhead of a step: tiny tensors (1-16 elements each), "
                         "as many as --tensors says; microseconds, issue 13's targets")
    ap.add_argument("--tensors", type=int, nargs="+", default=None, metavar="N",
                    help="--overhead, --ampclip: tiny-tensor counts, most important first "
                         "(default: " + " ".join(map(str, OVERHEAD_TENSORS)) + ")")
    ap.add_argument("--evict", type=int, default=0, metavar="MB",
                    help="--overhead: before each timed step, untimed, write MB MiB of host "
                         "memory (more than the last-level cache: every step starts cold, as "
                         "after a forward and backward); default 0")
    ap.add_argument("--ddp-grads", action="store_true",
                    help="--overhead: every .grad a view of a DDP-style gradient bucket, as "
                         "DDP's gradient_as_bucket_view=True hands them over (as ddp-gpt2)")
    ap.add_argument("--assigned-grads", action="store_true",
                    help="--overhead: before each timed step, untimed, every parameter gets a "
                         "gradient tensor of its own (p.grad = g), as a loop computing "
                         "gradients outside autograd hands them over")
    ap.add_argument("--unused-grads", action="store_true",
                    help=f"--overhead: every {UNUSED_EVERY}th parameter (from index "
                         f"{UNUSED_FROM}) has no gradient, as an unused branch leaves it")
    ap.add_argument("--ampclip", action="store_true",
                    help="time one AMP+clip step: GradScaler.unscale_, clip_grad_norm_, "
                         "GradScaler.step, update; tiny tensors (--tensors) and a bandwidth "
                         "case (--params, --layouts; default 2^24 elements, few-large)")
    ap.add_argument("--max-norm", type=float, default=None, metavar="X",
                    help=f"--ampclip: clip_grad_norm_'s max_norm (default {AMPCLIP_MAX_NORM:g}, "
                         "below every case's total norm: the clip is active)")
    ap.add_argument("--master", action="store_true",
                    help="bf16 parameters with exact fp32 master weights (issue 14): momentum_cuda "
                         "master_weights=True next to torch's fp32 master recipe and fp32 and "
                         "bf16 steps; bytes moved (a model) and memory held (measured) per "
                         "parameter; --params, --layouts (default " + " ".join(MASTER_LAYOUTS)
                         + ")")
    ap.add_argument("--modes", action="store_true",
                    help="every mode (issue 14): momentum_cuda fp32, momentum_dtype bf16 and "
                         "int8, master weights, stochastic rounding and bf16, next to "
                         "torch.optim.SGD fp32 (for-loop, foreach, fused) and bf16; step time, "
                         "bytes moved (a model) and memory held (measured) per parameter; "
                         "--params (default " + " ".join(count_text(n) for n in MODES_PARAMS)
                         + "), --layouts (default " + " ".join(MASTER_LAYOUTS) + ")")
    ap.add_argument("--rounds", type=int, default=None,
                    help="timed rounds (>= 20 unless --quick; default 30, --overhead 100)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed steps of each first (default 3, --overhead 10)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's; --overhead: 1)")
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
    ap.add_argument("--budget-s", type=float, default=None, metavar="S",
                    help="start no case once S seconds have passed since the start (a case "
                         "already running finishes, without waiting for an idle CPU or "
                         "retrying); the cases not started are listed as skipped, 'time budget'")
    ap.add_argument("--out", type=Path, default=Path("momentum-cuda-out"),
                    help="folder for the result files (default ./momentum-cuda-out)")
    ap.add_argument("--name", default=None, metavar="STEM",
                    help="file name stem: <out>/<STEM>.json etc. (default "
                         "bench-<device>-[quick-]<date>)")
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=None,
                    help="files to write (default: json csv png; json and csv after every case, "
                         "png at the end; --overhead: json csv, no png)")
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
    if args.master or args.modes:
        flag = "--master" if args.master else "--modes"
        if args.master and args.modes:
            ap.error("--master and --modes are two modes: one at a time")
        if args.overhead or args.ampclip:
            ap.error(f"{flag} is a mode of its own: not with --overhead or --ampclip")
        if args.dtypes is not None:
            ap.error(f"{flag} steps bfloat16 models (fp32 ones next to them); it takes no "
                     "--dtypes")
        odd = [lay for lay in args.layouts or () if lay in DTENSOR_LAYOUTS + DDP_LAYOUTS]
        if odd:
            ap.error(f"{flag} times plain tensors; it takes no --layouts {' '.join(odd)}")
        args.layouts = list(MASTER_LAYOUTS) if args.layouts is None else args.layouts
        args.dtypes = ["bfloat16"]
        if args.modes and args.params is None and not args.quick:
            args.params = list(MODES_PARAMS)
    if args.overhead:
        given = [o for o in ("params", "layouts") if getattr(args, o) is not None]
        if given:
            ap.error(f"--overhead times tiny tensors (--tensors N); it takes no "
                     f"{' '.join('--' + o for o in given)}")
        if args.formats is not None and "png" in args.formats:
            ap.error("--overhead writes json and csv; it has no png")
        args.tensors = list(OVERHEAD_TENSORS) if args.tensors is None else args.tensors
        if min(args.tensors) < 1:
            ap.error(f"--tensors must be >= 1, got {min(args.tensors)}")
        args.threads = 1 if args.threads is None else args.threads
        if args.evict < 0:
            ap.error(f"--evict must be >= 0 MiB, got {args.evict}")
    elif args.ampclip:
        if args.formats is not None and "png" in args.formats:
            ap.error("--ampclip writes json and csv; it has no png")
        odd = [lay for lay in args.layouts or () if lay in DTENSOR_LAYOUTS + DDP_LAYOUTS]
        if odd:
            ap.error(f"--ampclip times plain tensors; it takes no --layouts {' '.join(odd)}")
        if args.tensors is None and args.params is None and args.layouts is None:
            args.tensors, args.params = list(AMPCLIP_TENSORS), [AMPCLIP_PARAMS]
        elif args.params is None and args.layouts is not None:
            args.params = [AMPCLIP_PARAMS]  # --layouts alone: at the default size
        args.tensors = [] if args.tensors is None else args.tensors
        args.params = [] if args.params is None else args.params
        args.layouts = list(AMPCLIP_LAYOUTS) if args.layouts is None else args.layouts
        if args.tensors and min(args.tensors) < 1:
            ap.error(f"--tensors must be >= 1, got {min(args.tensors)}")
        args.max_norm = AMPCLIP_MAX_NORM if args.max_norm is None else args.max_norm
        if not 0 < args.max_norm < float("inf"):
            ap.error(f"--max-norm must be > 0 and finite, got {args.max_norm}")
    elif args.tensors is not None:
        ap.error("--tensors is for --overhead and --ampclip (the other cases take --params and "
                 "--layouts)")
    if args.overhead and args.ampclip:
        ap.error("--overhead and --ampclip are two modes: one at a time")
    if args.evict and not args.overhead:
        ap.error("--evict is for --overhead")
    if args.ddp_grads and not args.overhead:
        ap.error("--ddp-grads is for --overhead (the step mode's DDP case: --layouts ddp-gpt2)")
    if args.assigned_grads and not args.overhead:
        ap.error("--assigned-grads is for --overhead")
    if args.assigned_grads and args.ddp_grads:
        ap.error("--assigned-grads and --ddp-grads are two ways to hand gradients over: one "
                 "at a time")
    if args.unused_grads and not args.overhead:
        ap.error("--unused-grads is for --overhead")
    if args.unused_grads and args.ddp_grads:
        ap.error("--unused-grads and --ddp-grads: one at a time")
    if args.max_norm is not None and not args.ampclip:
        ap.error("--max-norm is for --ampclip")
    args.rounds = ((100 if args.overhead else 30)
                   if args.rounds is None else args.rounds)
    args.warmup = ((10 if args.overhead else 3)
                   if args.warmup is None else args.warmup)
    args.layouts = (None if args.overhead else list(DEFAULT_LAYOUTS)) \
        if args.layouts is None else args.layouts
    args.dtypes = (["float32"] if args.overhead or args.ampclip else ["float32", "bfloat16"]) \
        if args.dtypes is None else args.dtypes
    args.formats = ((["json", "csv"] if args.overhead or args.ampclip else list(FORMATS))
                    if args.formats is None else args.formats)
    if args.params is None and not args.overhead:
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
    if args.budget_s is not None and not args.budget_s > 0:
        ap.error(f"--budget-s must be > 0, got {args.budget_s}")
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", args.name):
        ap.error(f"--name must be a file name stem (letters, digits, '.', '_', '-'; no folder), "
                 f"got {args.name!r}")
    for opt in ("params", "layouts", "dtypes", "formats", "tensors"):  # a repeated value: once
        if getattr(args, opt) is not None:
            setattr(args, opt, list(dict.fromkeys(getattr(args, opt))))
    return args, device


def case_order(params, layouts, dtypes) -> list[tuple[int, str, str]]:
    """(total, layout, dtype) of every case, most important first: by the sum of the three
    values' positions in their lists (ties: earlier params, then layouts), so the first value of
    each list comes first and every value is reached early."""
    keyed = [((ip + il + id_, ip, il, id_), (total, layout, dtype))
             for ip, total in enumerate(params) for il, layout in enumerate(layouts)
             for id_, dtype in enumerate(dtypes)]
    return [case for _, case in sorted(keyed)]


def overhead_order(tensors, dtypes, seed: int) -> list[tuple[int, str, str]]:
    """--overhead's cases, (elements, tiny layout, dtype), most important first as case_order
    does (ties: the earlier --tensors value)."""
    keyed = [((it + id_, it, id_), (overhead_total(n, seed), tiny_layout(n), dtype))
             for it, n in enumerate(tensors) for id_, dtype in enumerate(dtypes)]
    return [case for _, case in sorted(keyed)]


def peak_sets(n_optimizers: int) -> int:
    """The most whole-size tensor sets (a case's `total` elements of its dtype each) alive at
    once in a case. Checking: the data (init, grads, grads2), the for-loop's p, g, buf and the
    implementation under test's p, g, buf, plus one while a step makes temporaries (nesterov or
    weight decay: the for-loop one tensor's worth, foreach a whole set) or while a flat optimizer
    is made (the clones of p and g live until its flat buffers are filled): 10. Timing: the data
    (grads2 becomes the bandwidth probe's `a`), p, g, buf per optimizer (a CUDA-graph copy is one
    more) and the same one extra. The kernel and allocation count afterwards holds the data and
    one optimizer: less."""
    return max(3 + 3 + 3 + 1, 3 + 3 * n_optimizers + 1)


def fits(total, dtype, n_optimizers, device, sets=None) -> tuple[bool, int, str]:
    """(whether the case's peak fits in 85 % of the free memory, the peak in bytes, why);
    `sets`: the peak in whole-size tensor sets where not peak_sets(n_optimizers) (--ampclip)."""
    sets = peak_sets(n_optimizers) if sets is None else sets
    need = total * torch.tensor([], dtype=dtype).element_size() * sets
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks cached by earlier cases are free for this one
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return need < 0.85 * free, need, (f"needs about {need / 1e9:.1f} GB, {free / 1e9:.1f} GB "
                                      "free")


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> int:
    start = _now()
    args, device = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    impls, missing = (master_implementations if args.master else modes_implementations
                      if args.modes else implementations)(device)
    impls, unavailable = select(impls, missing, args.impls, *(
        (MASTER_KNOWN, (MASTER_REF32, MASTER_REF16)) if args.master else
        (MODES_KNOWN, (MASTER_REF32, MASTER_REF16, *(i.name for i in impls if not i.timed)))
        if args.modes else ()))
    if args.modes:
        impls = needed_twins(impls)
    labels = {i.name: i.label for i in impls if i.timed}
    hyper = dict(lr=args.lr, momentum=args.momentum, dampening=args.dampening,
                 weight_decay=args.weight_decay, nesterov=args.nesterov)
    machine = machine_info(device)
    clock = Clock(device)
    print(f"momentum_cuda {momentum_cuda.__version__} @ {(machine['commit'] or '?')[:12]}"
          f"{' (dirty worktree)' if machine['worktree_dirty'] else ''} | torch {torch.__version__}"
          f" | {machine.get('gpu') or machine['cpu']['model']} | {torch.get_num_threads()} threads "
          f"| {args.rounds} rounds after {args.warmup} warm-up, order rotated each round")
    print("timed: " + ", ".join(i.label for i in impls if i.timed))
    for name, why in unavailable.items():
        print(f"ASKED FOR BUT NOT AVAILABLE on {device}: {name}: {why}")
    if args.impls is None:
        for name, why in missing.items():
            print(f"not timed: {name}: {why}")
    print(f"hyper-parameters: {hyper}")

    if args.ampclip:  # the tiny cases first (host overhead), then the bandwidth cases
        print(f"max_norm {args.max_norm:g}; gradients scaled by 2^16, refilled untimed before "
              "each sequence")
        todo = (overhead_order(args.tensors, args.dtypes, args.seed)
                + case_order(args.params, args.layouts, args.dtypes))
    else:
        todo = (overhead_order(args.tensors, args.dtypes, args.seed) if args.overhead
                else case_order(args.params, args.layouts, args.dtypes))
    base = None
    if not args.no_files:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        base = args.out / (args.name or
                           f"bench-{'overhead-' if args.overhead else ''}"
                           f"{'ddp-' if args.ddp_grads else ''}"
                           f"{'assigned-' if args.assigned_grads else ''}"
                           f"{'unused-' if args.unused_grads else ''}"
                           f"{'ampclip-' if args.ampclip else ''}"
                           f"{'master-' if args.master else ''}"
                           f"{'modes-' if args.modes else ''}{host_kind(device)}-"
                           f"{'quick-' if args.quick else ''}{stamp}")
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    cases, skipped, failures = [], [], []
    mode = ("overhead" if args.overhead else "ampclip" if args.ampclip
            else "master" if args.master else "modes" if args.modes else "step")
    doc = {"schema": SCHEMA, "mode": mode,
           "complete": False, "stopped_early": None, "elapsed_s": 0.0,
           "machine": machine, "config": config, "hyper": hyper, "implementations": labels,
           "not_available": missing, "asked_for_not_available": unavailable,
           "case_order": "most important first: by the sum of the positions of the case's "
                         "values in --params, --layouts, --dtypes (ties: params, then layouts)",
           "planned": [{"layout": lay, "numel": n, "dtype": d} for n, lay, d in todo],
           "cases": cases, "skipped": skipped, "failures": failures, "error": None}
    if args.overhead:
        doc["case_order"] = "most important first: by the sum of the positions of the case's " \
                            "values in --tensors, --dtypes (ties: tensors)"
        doc["targets"] = {}
    if args.ampclip:
        doc["case_order"] = "--tensors' tiny cases (as --overhead orders them), then the cases " \
                            "of --params, --layouts, --dtypes (as the step mode orders them)"
        doc["passes_model"] = {
            "what": "element reads and writes of the gradient per parameter element per step, "
                    "from what each op does (a model, not a measurement)",
            "phases": {k: {"grad_reads": r, "grad_writes": w} for k, (r, w) in
                       GRAD_PHASES.items()},
            "sequences": {k: list(v) for k, v in AMPCLIP_SEQUENCES.items()},
            "state_accesses": STATE_ACCESSES}
        doc["notes"] = ampclip_notes(device, args)
    if args.master:
        doc["default_backend"] = resolve_backend(None, device)
        doc["references"] = {"masters and fp32 weights": MASTER_REF32,
                             "plain bf16 weights": MASTER_REF16}
        doc["bytes_model"] = {
            "what": "bytes read and written per parameter element by one steady-state step, "
                    "from what each op reads and writes (a model, not a measurement)",
            "element_bytes": MASTER_BYTES,
            "implementations": {i.name: moved_bytes(i, hyper) for i in impls}}
        doc["notes"] = master_notes(device, args)
    if args.modes:
        doc["default_backend"] = resolve_backend(None, device)
        doc["references"] = {"fp32 weights and masters": MASTER_REF32,
                             "plain bf16 weights": MASTER_REF16,
                             **{f"{i.label} (not timed)": i.name for i in impls if not i.timed}}
        doc["twin_sample"] = {"tensors": TWIN_TENSORS, "elements": TWIN_ELEMENTS}
        doc["bytes_model"] = {
            "what": "bytes read and written per parameter element by one steady-state step, "
                    "from what each op reads and writes (a model, not a measurement)",
            "element_bytes": MASTER_BYTES,
            "implementations": {i.name: moved_bytes(i, hyper) for i in impls if i.timed}}
        doc["notes"] = modes_notes(device, args)

    def save(final: bool = False) -> list[Path]:
        doc["elapsed_s"] = round(_now() - start, 3)
        doc["error"] = "; ".join(f"{f['case']}: {f['implementation']}: {f['detail']}"
                                 for f in failures) or None
        if final:
            machine["loadavg_at_end"] = list(os.getloadavg())
        if args.overhead:
            ts = [t for c in cases for t in c["targets"]]
            judged = [t["met"] for t in ts if t["met"] is not None]
            doc["targets"] = {
                "source": "issue 13: momentum_cuda flat <= torch fused / k (k per tensor count), "
                          "per tensor <= torch foreach; ratio = median / base median",
                "flat_vs_fused_divisor": {str(n): k for n, k in FLAT_TARGETS.items()},
                "list": ts, "met": sum(judged), "not_met": len(judged) - sum(judged),
                "not_evaluated": len(ts) - len(judged),
                "all_met": (all(judged) and len(judged) == len(ts)) if ts else None}
        return [] if base is None else write_files(doc, base, args.formats, labels, png=final)

    save()
    budget = f"; time budget {args.budget_s:g} s" if args.budget_s else ""
    print(f"{len(todo)} cases, most important first{budget}", flush=True)
    for k, (total, layout, dtype_name) in enumerate(todo, 1):
        key = {"layout": layout, "numel": total, "dtype": dtype_name}
        elapsed = _now() - start
        if args.budget_s is not None and elapsed >= args.budget_s:
            skipped.extend({"layout": lay, "numel": n, "dtype": d, "why": "time budget"}
                           for n, lay, d in todo[k - 1:])
            doc["stopped_early"] = (f"time budget: {args.budget_s:g} s had passed after "
                                    f"{len(cases)} cases")
            print(f"time budget: {elapsed:.0f} s of {args.budget_s:g} s passed; not starting "
                  f"the {len(todo) - k + 1} cases left", flush=True)
            break
        print(f"[{k}/{len(todo)} {elapsed:4.0f} s] {case_name(key)}: ", end="", flush=True)
        modes = args.master or args.modes
        graphs = use_graphs(device, total, args) and not args.ampclip and not modes
        ok, need, why = (fits(total, torch.uint8, 0, device, master_peak_bytes(
                                  impls, total, hyper["momentum"])) if modes else
                         fits(total, DTYPES[dtype_name], len(impls) * (2 if graphs else 1),
                              device, ampclip_peak_sets(len(impls)) if args.ampclip else None))
        if not ok:
            skipped.append({**key, "why": why})
            print(f"SKIPPED ({why})", flush=True)
            save()
            continue
        try:
            case = (run_ampclip_case if args.ampclip else run_master_case if args.master
                    else run_modes_case if args.modes else run_case)(
                layout, total, DTYPES[dtype_name], impls, hyper, args, device, clock,
                None if args.budget_s is None else start + args.budget_s)
        except KeyboardInterrupt:
            doc["stopped_early"] = f"interrupted (KeyboardInterrupt) during {case_name(key)}"
            print("INTERRUPTED", flush=True)
            break
        except Exception as e:  # noqa: BLE001 - recorded; the other cases still run
            failures.append({"case": case_name(key), **key, "implementation": None,
                             "kind": "case error", "detail": f"{type(e).__name__}: {e}"})
            print(f"FAILED: {type(e).__name__}: {e}", flush=True)
        else:
            case["estimated_peak_bytes"] = need
            cases.append(case)
            for name, m in case["mismatches"].items():
                failures.append({"case": case_name(key), **key, "implementation": name,
                                 "kind": "bitwise mismatch", "detail": f"{m['phase']}: "
                                 f"{m['summary']}"})
            ours = {i.name for i in impls if i.ours}
            for name, err in case["errors"].items():
                if name in ours:
                    failures.append({"case": case_name(key), **key, "implementation": name,
                                     "kind": "error", "detail": err})
            print((ampclip_case_line if args.ampclip else case_line)(case), flush=True)
        _release(device)
        save()
    release_meshes()
    interrupted = bool(doc["stopped_early"]) and doc["stopped_early"].startswith("interrupted")
    doc["complete"] = not interrupted  # every planned case ran, failed or is listed as skipped
    written = save(final=True)
    print_summary(doc)
    for f in failures:
        print(f"FAILED: {f['case']}: {f['implementation'] or 'the case'}: {f['kind']}: "
              f"{f['detail']}", file=sys.stderr)
    for name, why in unavailable.items():
        print(f"NOT RUN: {name} was asked for but is not available on {device}: {why}",
              file=sys.stderr)
    if written:
        print("wrote " + ", ".join(str(p) for p in written))
    if interrupted:
        return 130
    return 1 if failures or unavailable else 0


if __name__ == "__main__":
    sys.exit(main())
