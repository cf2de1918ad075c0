"""Distributed scenarios: momentum_cuda against torch's optimizer in the SAME distributed setting.

Run by tests/dist_harness.py as one process per rank (`python tests/dist_scenarios.py --results
FILE --shared DIR name...`), never imported for its scenarios by pytest (which imports it only
for the scenario names: nothing here imports torch.distributed at import time).

Every scenario builds the same model twice from one seed: one twin is stepped by momentum_cuda
(SGD, or Momentum), the other by torch.optim.SGD(foreach=False) (or momentum_cuda.reference.
MomentumReference), both wrapped the same way (FSDP2 fully_shard, DTensor parameters, DDP,
ZeroRedundancyOptimizer). Both see the same fresh random inputs, which differ per rank, and
after every step they are compared bit for bit on every rank (Checker): parameters (the local
shard of a DTensor, whose type, placements, mesh and global shape must match too), .grad (None
exactly where torch's is, else the same bits), momentum buffers (a DTensor with torch's
placements wherever torch's is one: the parameter's, or Partial where the gradient is Partial,
see dtensor_train) and optimizer.state_dict(). A difference is
recorded, not raised, and the scenario runs on, so every rank makes the same collectives; an
exception ends the scenario on that rank (recorded with its traceback).

Each scenario runs on its own process group (made at start-up, in the same order on every
rank; device meshes come from it with DeviceMesh.from_group): a rank whose scenario failed
half-way cannot pair its next collectives with a peer still waiting in the failed scenario's
(that peer times out, gloo's timeout, and joins the next scenario at the barrier every rank
passes between scenarios, on a control group with a longer timeout).

Scenario names are "<kind>/<options>"; LAUNCHES[w] lists those run by a launch of w ranks,
in order. The 2-rank launch writes checkpoints that the 3-rank launch loads (a change of
world size), through the shared directory the harness gives both launches.
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

# ---- hyper-parameters ------------------------------------------------------------------------
# SGD sets (momentum_cuda.SGD vs torch.optim.SGD(foreach=False)) and EMA sets ("ema...":
# momentum_cuda.Momentum vs MomentumReference).
HYPERS = {
    "mom": dict(lr=0.1, momentum=0.9),
    "nest-wd": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "damp-max-wd": dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=1e-2, maximize=True),
    "plain-wd": dict(lr=0.1, momentum=0.0, weight_decay=1e-2),
    "ema": dict(lr=0.1, momentum=0.9),
    "ema-wd-max": dict(lr=0.1, momentum=0.8, weight_decay=1e-2, maximize=True),
    # capturable-style hyper-parameters: 0-dim tensors (each optimizer its own copies), read
    # by the kernels, torch's for-loop taking them as its ops do
    "tensors": dict(lr=torch.tensor(0.05), momentum=torch.tensor(0.9),
                    dampening=torch.tensor(0.2, dtype=torch.float64),
                    weight_decay=torch.tensor(1e-2)),
    "ema-tensors": dict(lr=torch.tensor(0.1), momentum=0.8, weight_decay=torch.tensor(1e-2)),
}


def hypers(hk: str) -> dict:
    """HYPERS[hk] with each tensor a copy of its own (an optimizer's in-place edits stay its
    own)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in HYPERS[hk].items()}


def optimizer_classes(hk: str):
    """(ours, torch's twin, extra kwargs for both) for a hyper-parameter key."""
    import momentum_cuda
    from momentum_cuda.reference import MomentumReference
    if hk.startswith("ema"):
        return momentum_cuda.Momentum, MomentumReference, {}
    # foreach=False in both, so that the param_groups of the state_dicts compare equal
    return momentum_cuda.SGD, torch.optim.SGD, dict(foreach=False)


def make_ours(params, hk: str, flat: bool):
    ours_cls, _, extra = optimizer_classes(hk)
    return ours_cls(params, flat=flat, **hypers(hk), **extra)


def schedule_lr(*opts) -> None:
    """A scheduler's in-place edit of every tensor lr (the capturable use: the same tensor,
    new value), on each optimizer alike."""
    for o in opts:
        for g in o.param_groups:
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].mul_(0.75)


def make_opts(params_ours, params_ref, hk: str, flat: bool):
    """(ours, torch's twin) with the hyper-parameters `hk`."""
    _, ref_cls, extra = optimizer_classes(hk)
    return make_ours(params_ours, hk, flat), ref_cls(params_ref, **hypers(hk), **extra)


def paths(opt) -> list:
    """The kernel paths of the last step (opt.last_step), as [path, tensors] pairs."""
    return [[e["path"], e["tensors"]] for e in getattr(opt, "last_step", [])]


# ---- bitwise comparison ----------------------------------------------------------------------
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _dtensor_cls():
    from torch.distributed.tensor import DTensor
    return DTensor


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return t.view(_INT[t.element_size()]) if t.is_floating_point() else t


def buffer_of(opt, p):
    st = opt.state.get(p)
    return None if st is None else st.get("momentum_buffer")


class Checker:
    """Collects differences between ours and torch's twin (the first LIMIT are described)."""

    LIMIT = 10

    def __init__(self):
        self.problems: list[str] = []
        self.count = 0

    def fail(self, msg: str) -> None:
        self.count += 1
        if len(self.problems) < self.LIMIT:
            self.problems.append(msg)

    def tensor(self, a, b, what: str) -> None:
        """a (ours) and b (torch's) are both None, or tensors of the same type (DTensor or
        not; a DTensor with the same placements, mesh and global shape), dtype, shape and
        bits (the local shard's, for a DTensor)."""
        if a is None or b is None:
            if not (a is None and b is None):
                self.fail(f"{what}: ours is {'None' if a is None else 'set'}, torch's is "
                          f"{'None' if b is None else 'set'}")
            return
        DTensor = _dtensor_cls()
        da, db = isinstance(a, DTensor), isinstance(b, DTensor)
        if da != db:
            self.fail(f"{what}: ours is a {type(a).__name__}, torch's a {type(b).__name__}"
                      + (f" with placements {b.placements}" if db else ""))
            return
        with torch.no_grad():
            if da:
                if tuple(a.placements) != tuple(b.placements):
                    self.fail(f"{what}: placements {a.placements} vs torch's {b.placements}")
                    return
                if a.device_mesh != b.device_mesh:
                    self.fail(f"{what}: mesh {a.device_mesh} vs torch's {b.device_mesh}")
                    return
                if a.shape != b.shape:
                    self.fail(f"{what}: global shape {tuple(a.shape)} vs {tuple(b.shape)}")
                    return
                a, b = a.to_local(), b.to_local()
            if (a.dtype, a.shape, a.layout, a.device) != (b.dtype, b.shape, b.layout, b.device):
                self.fail(f"{what}: {a.dtype} {tuple(a.shape)} {a.layout} {a.device} vs "
                          f"torch's {b.dtype} {tuple(b.shape)} {b.layout} {b.device}")
                return
            if a.layout != torch.strided:
                a, b = a.to_dense(), b.to_dense()
            if not torch.equal(bits(a), bits(b)):
                diff = (bits(a) != bits(b)).sum().item()
                dmax = (a.double() - b.double()).abs().max().item()
                self.fail(f"{what}: differs in {diff} of {a.numel()} elements "
                          f"(max |diff| {dmax:.3g})")

    def same(self, a, b, what: str) -> None:
        """Nested dicts/lists/tuples of tensors and Python values (a state_dict)."""
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            self.tensor(a, b, what)
        elif isinstance(a, dict) and isinstance(b, dict):
            if set(a) != set(b):
                self.fail(f"{what}: keys {sorted(map(str, a))} vs torch's {sorted(map(str, b))}")
            for k in sorted(set(a) & set(b), key=str):
                self.same(a[k], b[k], f"{what}[{k!r}]")
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            if len(a) != len(b):
                self.fail(f"{what}: length {len(a)} vs torch's {len(b)}")
            for i, (x, y) in enumerate(zip(a, b)):
                self.same(x, y, f"{what}[{i}]")
        elif type(a) is not type(b) or a != b:
            self.fail(f"{what}: {a!r} vs torch's {b!r}")

    def params(self, ours, ref, what: str, grads: bool = True) -> None:
        """Two lists of (name, parameter): values and, with grads, .grad."""
        if len(ours) != len(ref):
            self.fail(f"{what}: {len(ours)} parameters vs torch's {len(ref)}")
        for (n, p), (_, q) in zip(ours, ref):
            self.tensor(p, q, f"{what} {n}")
            if grads:
                self.tensor(p.grad, q.grad, f"{what} {n}.grad")

    def optims(self, opt, ours, topt, ref, what: str, state_dict: bool = True) -> None:
        """Momentum buffers by parameter, and state_dict()."""
        for (n, p), (_, q) in zip(ours, ref):
            self.tensor(buffer_of(opt, p), buffer_of(topt, q), f"{what} momentum_buffer of {n}")
        if state_dict:
            self.same(opt.state_dict(), topt.state_dict(), f"{what} state_dict")

    def twins(self, model, opt, tmodel, topt, what: str) -> None:
        ours, ref = list(model.named_parameters()), list(tmodel.named_parameters())
        self.params(ours, ref, what)
        self.optims(opt, ours, topt, ref, what)


class Skip(Exception):
    """The scenario cannot run here; its message says why."""


# ---- context ---------------------------------------------------------------------------------
@dataclass
class Ctx:
    rank: int
    world: int
    group: object  # this scenario's process group
    shared: Path
    check: Checker = field(default_factory=Checker)
    info: dict = field(default_factory=dict)
    _mesh: object = None

    @property
    def mesh(self):
        """A 1-D CPU device mesh over this scenario's process group."""
        if self._mesh is None:
            from torch.distributed.device_mesh import DeviceMesh
            self._mesh = DeviceMesh.from_group(self.group, "cpu")
        return self._mesh

    def gen(self, seed: int, step: int) -> torch.Generator:
        """Inputs of one step: different on every rank."""
        return torch.Generator().manual_seed(seed * 1_000_003 + self.rank * 10_007 + step)

    def record(self, key: str, value) -> None:
        self.info.setdefault(key, []).append(value)


# ---- models ----------------------------------------------------------------------------------
class MLP(nn.Module):
    """5 -> 7 -> 3 -> 4 (no bias) -> 2: odd sizes; on 3 ranks the 4-row weight's shards are
    2, 2, 0 rows and the 2-row layer's 1, 1, 0 (a rank with empty local shards)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 7)
        self.l2 = nn.Linear(7, 3)
        self.l3 = nn.Linear(3, 4, bias=False)
        self.l4 = nn.Linear(4, 2)

    def forward(self, x):
        return self.l4(torch.tanh(self.l3(torch.relu(self.l2(torch.tanh(self.l1(x)))))))


def mlp(seed: int) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def mlp_data(ctx: Ctx, seed: int, step: int, batch: int = 3):
    g = ctx.gen(seed, step)
    return torch.randn(batch, 5, generator=g), torch.randn(batch, 2, generator=g)


def fsdp2(model, ctx: Ctx, **kw):
    from torch.distributed.fsdp import fully_shard
    for layer in (model.l1, model.l2, model.l3, model.l4):
        fully_shard(layer, mesh=ctx.mesh, **kw)
    return fully_shard(model, mesh=ctx.mesh, **kw)


def local_shapes(model) -> dict:
    DTensor = _dtensor_cls()
    return {n: list(p.to_local().shape) if isinstance(p, DTensor) else list(p.shape)
            for n, p in model.named_parameters()}


# ---- 1, 3, 5. FSDP2 training -----------------------------------------------------------------
CLIP = (0.25, None, 1e6, 0.25, None, 0.25)  # max_norm per step (None: no clipping)


def fsdp2_steps(ctx: Ctx, pairs, *, seed: int, steps: int, first_step: int = 0, what=""):
    """`steps` training steps of each (model, opt) in `pairs`: forward on this rank's fresh
    inputs, backward, clip_grad_norm_ (some steps; ours' own opt.clip_grad_norm_ on every other
    one of those: DTensor gradients, so torch's clip runs inside its step), step, compare every
    later pair with the first (pairs[0] is torch's twin), then zero_grad, set_to_none True and
    False in turn."""
    (tm, topt), rest = pairs[0], pairs[1:]
    for k in range(first_step, first_step + steps):
        x, y = mlp_data(ctx, seed, k)
        norms = []
        for i, (m, o) in enumerate(pairs):
            F.mse_loss(m(x), y).backward()
            max_norm = CLIP[k % len(CLIP)]
            if max_norm is not None and i > 0 and k % 2 == 0:
                norms.append(o.clip_grad_norm_(max_norm))
            elif max_norm is not None:
                norms.append(nn.utils.clip_grad_norm_(m.parameters(), max_norm))
            o.step()
        for i, (m, o) in enumerate(rest):
            label = f"{what}step {k + 1}{f' (ours #{i + 1})' if len(rest) > 1 else ''}:"
            if norms:  # same gradients in: the same total norm (a sanity check of the twins)
                ctx.check.tensor(norms[i + 1], norms[0], f"{label} clip_grad_norm_ total norm")
            ctx.check.twins(m, o, tm, topt, label)
            ctx.record("paths", paths(o))
        schedule_lr(*(o for _, o in pairs))
        set_to_none = k % 2 == 0
        for m, o in pairs:
            o.zero_grad(set_to_none=set_to_none)
        for i, (m, o) in enumerate(rest):
            ctx.check.params(list(m.named_parameters()), list(tm.named_parameters()),
                             f"{what}after zero_grad(set_to_none={set_to_none}) of step {k + 1}:")


def fsdp2_train(ctx: Ctx, *, flat: bool, hk: str, mp: bool = False, offload: bool = False,
                steps: int = 4):
    """fully_shard on each layer and the root; `steps` steps (fsdp2_steps). mp: MixedPrecision-
    Policy(param_dtype=bf16, reduce_dtype=fp32): bf16 compute, fp32 sharded parameters and
    gradients. offload: CPUOffloadPolicy(pin_memory=False), which runs on a CPU-only machine
    (torch 2.13: the device is the CPU, so its host-device copies are plain CPU copies; the
    sharded parameters, gradients and optimizer state are CPU tensors either way)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
    kw = {}
    if mp:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                               reduce_dtype=torch.float32)
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=False)
    m, tm = fsdp2(mlp(1), ctx, **kw), fsdp2(mlp(1), ctx, **kw)
    ctx.info["local_shapes"] = local_shapes(m)
    try:  # what FSDP2 made of the policies (private attributes: recorded only)
        fp = m.l1._get_fsdp_state()._fsdp_param_group.fsdp_params[0]
        ctx.info["fsdp_param"] = dict(param_dtype=str(fp.param_dtype),
                                      reduce_dtype=str(fp.reduce_dtype),
                                      offload_to_cpu=fp.offload_to_cpu)
    except Exception as e:
        ctx.info["fsdp_param"] = f"unknown ({type(e).__name__}: {e})"
    opt, topt = make_opts(m.parameters(), tm.parameters(), hk, flat)
    ctx.check.twins(m, opt, tm, topt, "before any step:")
    fsdp2_steps(ctx, [(tm, topt), (m, opt)], seed=2, steps=steps)
    if ctx.world == 3:  # the uneven case must really be uneven, with an empty shard on rank 2
        want = {"l3.weight": [[2, 3], [2, 3], [0, 3]], "l4.weight": [[1, 4], [1, 4], [0, 4]]}
        for n, shapes in want.items():
            if ctx.info["local_shapes"][n] != shapes[ctx.rank]:
                ctx.check.fail(f"test set-up: {n} has local shape "
                               f"{ctx.info['local_shapes'][n]}, expected {shapes[ctx.rank]}")


def fsdp2_gradscaler(ctx: Ctx, *, flat: bool, hk: str, capturable: bool, steps: int = 8,
                     opt_kw=None):
    """FSDP2 under torch.amp.GradScaler (DTensor gradients: GradScaler hands ours grad_scale
    and found_inf, torch's twin takes GradScaler's unscale_ and skip): overflows on steps 1
    and 2 (the first step must leave torch's "never stepped" state), on step 5, and on step 7
    on rank 0 only; opt.clip_grad_norm_ after scaler.unscale_ on steps 3 and 4. Bits and state
    every step; with capturable=True no step() reads a tensor on the host (_LooseFirst over
    the DTensors' shards), and the flags are read late (the CPU run as a GPU whose copies
    have not come back: _Unsure.host_ready False) by the state_dict() of the checks, which
    come after steps 4 and 8 (parameters and gradients every step)."""
    from conftest import no_host_reads
    from momentum_cuda.optim import _Unsure
    if capturable:
        _Unsure.host_ready = False
        try:
            return fsdp2_gradscaler(ctx, flat=flat, hk=hk, capturable=False, steps=steps,
                                    opt_kw=dict(capturable=True))
        finally:
            _Unsure.host_ready = True
    m, tm = fsdp2(mlp(1), ctx), fsdp2(mlp(1), ctx)
    ours_cls, ref_cls, extra = optimizer_classes(hk)
    opt = ours_cls(m.parameters(), flat=flat, **(opt_kw or {}), **hypers(hk), **extra)
    topt = ref_cls(tm.parameters(), **hypers(hk), **extra)
    late = opt._capturable
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
               for _ in range(2)]
    for k in range(steps):
        x, y = mlp_data(ctx, 17, k)
        inf = k in (0, 1, 4) or (k == 6 and ctx.rank == 0)
        norms = []
        for model, o, scaler in ((m, opt, scalers[0]), (tm, topt, scalers[1])):
            o.zero_grad(set_to_none=k % 2 == 0)
            loss = F.mse_loss(model(x), y) * (float("inf") if inf else 1.0)
            scaler.scale(loss).backward()
            if k in (2, 3):
                scaler.unscale_(o)
                norms.append(o.clip_grad_norm_(0.5) if o is opt
                             else nn.utils.clip_grad_norm_(model.parameters(), 0.5))
            # capturable: no step reads the host (the first ones are decided on the device)
            with no_host_reads() if o is opt and late else contextlib.nullcontext():
                scaler.step(o)
            scaler.update()
        label = f"step {k + 1}{' (overflow)' if inf else ''}:"
        if norms:
            ctx.check.tensor(norms[0], norms[1], f"{label} clip_grad_norm_ total norm")
        if scalers[0].get_scale() != scalers[1].get_scale():
            ctx.check.fail(f"{label} scale {scalers[0].get_scale()} vs torch's "
                           f"{scalers[1].get_scale()}")
        if late and k not in (3, steps - 1):
            ctx.record("undecided", len(opt._unsure))
            ctx.check.params(list(m.named_parameters()), list(tm.named_parameters()), label)
        else:
            ctx.check.twins(m, opt, tm, topt, label)
        ctx.record("paths", paths(opt))


# ---- 2. FSDP2 checkpoints (torch.distributed.checkpoint) -------------------------------------
def dcp_state(model, opt, full: bool = False):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True) if full else None
    return {"model": get_model_state_dict(model, options=options),
            "optim": get_optimizer_state_dict(model, opt, options=options)}


def dcp_save(ctx: Ctx, model, opt, path: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    sd = dcp_state(model, opt)
    dcp.save(sd, checkpoint_id=str(path), process_group=ctx.group)
    return sd


def dcp_load(ctx: Ctx, model, opt, path: Path) -> dict:
    """A fresh model and optimizer take the checkpoint, as a training script resumes:
    get_*_state_dict (which gives a fresh optimizer its state with one zero-lr step on zero
    gradients, torch's _init_optim_state), dcp.load into it, set_*_state_dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"no checkpoint at {path} (the scenario that writes it failed or "
                                "did not run)")
    sd = dcp_state(model, opt)
    dcp.load(sd, checkpoint_id=str(path), process_group=ctx.group)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    return sd


def fsdp2_checkpoint(ctx: Ctx, *, flat: bool, hk: str):
    """Train 3 steps, save both twins with dcp.save, load each into a FRESH model+optimizer
    (other initial weights) with dcp.load, and train on: ours resumed must give the bits of
    torch's resumed twin (and the checkpoint state dicts must agree before the save)."""
    base = ctx.shared / f"ckpt-{'flat' if flat else 'pertensor'}-{hk}"
    m, tm = fsdp2(mlp(1), ctx), fsdp2(mlp(1), ctx)
    opt, topt = make_opts(m.parameters(), tm.parameters(), hk, flat)
    fsdp2_steps(ctx, [(tm, topt), (m, opt)], seed=3, steps=3)
    sd = dcp_save(ctx, m, opt, base / "ours")
    tsd = dcp_save(ctx, tm, topt, base / "torch")
    ctx.check.same(sd, tsd, "get_model/optimizer_state_dict (sharded) at the save:")
    ctx.check.same(dcp_state(m, opt, full=True), dcp_state(tm, topt, full=True),
                   "get_model/optimizer_state_dict (full_state_dict, cpu_offload):")
    # the fresh pair: other weights, no optimizer state yet
    m2, tm2 = fsdp2(mlp(99), ctx), fsdp2(mlp(99), ctx)
    opt2, topt2 = make_opts(m2.parameters(), tm2.parameters(), hk, flat)
    dcp_load(ctx, m2, opt2, base / "ours")
    dcp_load(ctx, tm2, topt2, base / "torch")
    ctx.check.twins(m2, opt2, tm2, topt2, "after dcp.load:")
    # the resumed twins against each other, and ours resumed against torch's uninterrupted one
    fsdp2_steps(ctx, [(tm2, topt2), (m2, opt2)], seed=3, steps=3, first_step=3, what="resumed ")
    fsdp2_steps(ctx, [(tm, topt)], seed=3, steps=3, first_step=3)
    # recorded, not asserted: is a round trip through dcp exact? (ours resumed against torch's
    # twin that never stopped)
    uninterrupted = Checker()
    uninterrupted.params(list(m2.named_parameters()), list(tm.named_parameters()), "", False)
    ctx.info["ours_resumed_equals_torch_uninterrupted"] = not uninterrupted.count
    if uninterrupted.count:
        ctx.info["uninterrupted_differences"] = uninterrupted.problems


XWORLD = "xworld"  # the 2-rank launch's checkpoints for the 3-rank launch


def fsdp2_xworld_save(ctx: Ctx, *, flat: bool, hk: str):
    """2 ranks: ours and torch's twin train 3 steps and are saved, for the 3-rank launch
    (fsdp2_xworld_load)."""
    m, tm = fsdp2(mlp(1), ctx), fsdp2(mlp(1), ctx)
    opt, topt = make_opts(m.parameters(), tm.parameters(), hk, flat)
    fsdp2_steps(ctx, [(tm, topt), (m, opt)], seed=4, steps=3)
    base = ctx.shared / XWORLD / hk
    dcp_save(ctx, tm, topt, base / f"{_flat_id(flat)}-torch")
    dcp_save(ctx, m, opt, base / f"{_flat_id(flat)}-ours")


def fsdp2_xworld_load(ctx: Ctx, *, flat: bool, hk: str, source: str):
    """3 ranks load what 2 ranks saved, then train on. source="own": ours loads its own
    checkpoint, torch's twin torch's (both saved by the 2-rank scenario of the same `flat`);
    source="torch": ours loads the checkpoint torch's optimizer wrote (per-tensor scenario's),
    as torch's twin does."""
    base = ctx.shared / XWORLD / hk
    m, tm = fsdp2(mlp(98), ctx), fsdp2(mlp(98), ctx)
    opt, topt = make_opts(m.parameters(), tm.parameters(), hk, flat)
    if source == "own":
        ours_ckpt, torch_ckpt = f"{_flat_id(flat)}-ours", f"{_flat_id(flat)}-torch"
    else:
        ours_ckpt = torch_ckpt = "pertensor-torch"
    dcp_load(ctx, m, opt, base / ours_ckpt)
    dcp_load(ctx, tm, topt, base / torch_ckpt)
    ctx.info["local_shapes"] = local_shapes(m)
    ctx.check.twins(m, opt, tm, topt, "after dcp.load on 3 ranks:")
    fsdp2_steps(ctx, [(tm, topt), (m, opt)], seed=4, steps=3, first_step=3, what="resumed ")


# ---- 4, 5. plain DTensor parameters ----------------------------------------------------------
def dtensor_params(ctx: Ctx, spec: dict) -> dict:
    """name -> a Parameter made by distribute_tensor of a seeded random tensor: spec maps each
    name to its (global shape, placement)."""
    from torch.distributed.tensor import distribute_tensor
    g = torch.Generator().manual_seed(5)
    return {n: nn.Parameter(distribute_tensor(torch.randn(shape, generator=g), ctx.mesh, [pl]))
            for n, (shape, pl) in spec.items()}


def dtensor_train(ctx: Ctx, *, flat: bool, hk: str, grads: str = "placements",
                  init_mesh: bool = False, steps: int = 4):
    """Parameters made by distribute_tensor with Shard(0), Shard(1) and Replicate() on a 1-D
    mesh (sizes not divisible by 2 or 3; on 3 ranks `d` has 2 rows: rank 2's shard is empty),
    gradients from backward of a loss over a batch-sharded input (different on every rank).

    grads="placements": the loss uses each parameter redistributed to Replicate(), so that
    backward (Redistribute's) gives every gradient the parameter's placements, as tensor
    parallelism does. grads="partial": the parameters are used as they are; DTensor's
    autograd then leaves every gradient Partial(sum) (a local tensor of the full shape), torch's
    SGD keeps Partial momentum buffers, and its in-place update of the parameter reduces them.
    (Only on 2 ranks: on 3, torch's own step fails there: grad.add(p, alpha=wd) of the Partial
    gradient of the 2-row Shard(0) `d` comes out Shard(1), and param.add_ cannot change the
    parameter's placement.)

    init_mesh: the mesh is init_device_mesh("cpu", (world,)), over the default process group
    (used by no other scenario), instead of one over this scenario's group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    if init_mesh:
        ctx._mesh = init_device_mesh("cpu", (ctx.world,))
    spec = {"a": ((7, 5), Shard(0)), "b": ((5, 5), Shard(1)), "c": ((5,), Replicate()),
            "d": ((2, 5), Shard(0))}

    def make():
        return dtensor_params(ctx, spec)

    ours, ref = make(), make()
    ctx.info["local_shapes"] = {n: list(p.to_local().shape) for n, p in ours.items()}
    opt, topt = make_opts(list(ours.values()), list(ref.values()), hk, flat)

    def loss(ps, x):
        if grads == "placements":
            ps = {n: p.redistribute(ctx.mesh, [Replicate()]) for n, p in ps.items()}
        h = torch.tanh(x @ ps["a"])
        y = h @ ps["b"] + ps["c"]
        return ((y @ ps["d"].t()) ** 2).mean()

    for k in range(steps):
        g = ctx.gen(6, k)
        x = DTensor.from_local(torch.randn(3, 7, generator=g), ctx.mesh, [Shard(0)])
        for ps, o in ((ours, opt), (ref, topt)):
            loss(ps, x).backward()
            o.step()
        label = f"step {k + 1}:"
        if k == 0:
            ctx.info["grad_placements"] = {n: str(p.grad.placements) for n, p in ref.items()}
            for n, p in ref.items():
                if grads == "placements" and p.grad.placements != p.placements:
                    ctx.check.fail(f"test set-up: torch's {n}.grad has placements "
                                   f"{p.grad.placements}, its parameter {p.placements}")
        ctx.check.params(list(ours.items()), list(ref.items()), label)
        ctx.check.optims(opt, list(ours.items()), topt, list(ref.items()), label)
        ctx.record("paths", paths(opt))
        for o in (opt, topt):
            o.zero_grad(set_to_none=k % 2 == 1)


# edit name -> edit(opt, params, mesh): made between two replayed steps (ours and torch's alike)
def _redistributed_grad(o, ps, mesh):
    from torch.distributed.tensor import Replicate
    ps["a"].grad = ps["a"].grad.redistribute(mesh, [Replicate()])  # other placements


def _partial_grad(o, ps, mesh):
    from torch.distributed.tensor import DTensor, Partial
    # the Replicate parameter's gradient as a Partial(sum) of this rank's values: the same local
    # shape, other placements (its step must sum the ranks' values)
    ps["c"].grad = DTensor.from_local(ps["c"].grad.to_local(), mesh, [Partial()])


def _dropped_buffer(o, ps, mesh):
    o.state[ps["b"]].pop("momentum_buffer")


DTENSOR_EDITS = {
    "none": lambda o, ps, mesh: None,
    "lr": lambda o, ps, mesh: o.param_groups[0].__setitem__("lr", 0.03),
    "grad-none": lambda o, ps, mesh: setattr(ps["c"], "grad", None),
    "grad-replaced": lambda o, ps, mesh: setattr(ps["b"], "grad", ps["b"].grad.clone()),
    "grad-redistributed": _redistributed_grad,
    "grad-partial": _partial_grad,
    "buffer-clone": lambda o, ps, mesh: o.state[ps["a"]].__setitem__(
        "momentum_buffer", o.state[ps["a"]]["momentum_buffer"].clone()),
    "buffer-dropped": _dropped_buffer,
    "state-dropped": lambda o, ps, mesh: o.state.pop(ps["d"]),
    # FSDP2 replaces a sharded parameter's local tensor this way (FSDPParam.reset_sharded_param)
    "local-shard-replaced": lambda o, ps, mesh: setattr(ps["d"], "_local_tensor",
                                                        ps["d"]._local_tensor.clone()),
    "load-state-dict": lambda o, ps, mesh: o.load_state_dict(o.state_dict()),
    "zero-grad-keep": lambda o, ps, mesh: o.zero_grad(set_to_none=False),
}


def dtensor_replay_edits(ctx: Ctx, *, flat: bool):
    """The replayed list call over DTensor shards (optim._ShardCheck): Shard(0), Shard(1) and
    Replicate() parameters trained against torch's twin, each edit of DTENSOR_EDITS made
    between two replayed steps (the replay checked live first), bits torch's after it."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    # (b's columns split evenly on 2 ranks: an uneven last shard gets a strided gradient, which
    # the step copies to its parameter's layout: planned every time)
    spec = {"a": ((7, 5), Shard(0)), "b": ((5, 4), Shard(1)), "c": ((4,), Replicate()),
            "d": ((2, 4), Shard(0))}

    def make():
        return dtensor_params(ctx, spec)

    def loss(ps, x):
        ps = {n: p.redistribute(ctx.mesh, [Replicate()]) for n, p in ps.items()}
        y = torch.tanh(x @ ps["a"]) @ ps["b"] + ps["c"]
        return ((y @ ps["d"].t()) ** 2).mean()

    for edit, fn in DTENSOR_EDITS.items():
        ours, ref = make(), make()
        opt, topt = make_opts(list(ours.values()), list(ref.values()), "nest-wd", flat)
        _count_planning(opt)
        for k in range(6):
            g = ctx.gen(7, k)
            x = DTensor.from_local(torch.randn(3, 7, generator=g), ctx.mesh, [Shard(0)])
            for ps, o in ((ours, opt), (ref, topt)):
                o.zero_grad()
                loss(ps, x).backward()
                if k == 3:
                    fn(o, ps, ctx.mesh)
                if k == 2 and o is opt:  # the replay is live before the edit
                    _replayed(ctx, o, o.step, f"{edit} step 3:")
                else:
                    o.step()
            label = f"{edit} step {k + 1}:"
            ctx.check.params(list(ours.items()), list(ref.items()), label)
            ctx.check.optims(opt, list(ours.items()), topt, list(ref.items()), label)
        ctx.record("paths", paths(opt))


# ---- 6. DDP ----------------------------------------------------------------------------------
class Branchy(nn.Module):
    """5 -> 7 -> 3 (+ a 7 -> 3 branch, used or not per step and rank) -> 2 (no bias)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 3)
        self.branch = nn.Linear(7, 3)
        self.c = nn.Linear(3, 2, bias=False)

    def forward(self, x, use_branch: bool):
        h = torch.tanh(self.a(x))
        y = self.b(h)
        if use_branch:
            y = y + self.branch(h)
        return self.c(y)


def branchy(seed: int) -> Branchy:
    torch.manual_seed(seed)
    return Branchy()


# A step: (patterns, set_to_none) — one pattern per backward of the step: all but the last run
# under no_sync() (gradient accumulation), the last one synchronises. A pattern says where the
# branch is used: "all" ranks, "none", or "some" (rank 0 only). set_to_none: the zero_grad()
# before the step's first backward (None: no zero_grad, the first step).
#
# What DDP itself rejects (checked with torch's optimizer alone, torch 2.13), and so is not run:
# - find_unused_parameters=False, static_graph=False, a parameter unused on every rank: the next
#   forward raises "Expected to have finished reduction in the prior iteration before starting
#   a new one. This error indicates that your module has parameters that were not used in
#   producing loss"; unused on some ranks only: those ranks raise that and the others wait in
#   the bucket's allreduce until gloo's timeout. Those scenarios use the "all-used" schedule.
# - static_graph=True with a set of used parameters that changes between iterations: "Your
#   training graph has changed in this iteration ... not compatible with static_graph set to
#   True" (or the "Expected to have finished reduction" error). Those use one fixed pattern.
# No combination of find_unused_parameters, gradient_as_bucket_view and static_graph is
# refused at construction (static_graph with find_unused_parameters=True only warns), and
# no_sync() runs with all of them.
SCHEDULES = {
    # find_unused_parameters=True, dynamic graph: the branch unused on every rank (torch's .grad
    # stays None: torch skips it), or on some ranks only (DDP brings the others' gradient to
    # it), with and without accumulation, after both zero_grad forms. Step 2 is the known case:
    # find_unused_parameters=True, gradient_as_bucket_view=True, unused on every rank after
    # zero_grad(set_to_none=True): torch's .grad stays None and torch does not step it.
    "dynamic": [(["all"], None), (["none"], True), (["some"], True), (["all", "all"], False),
                (["none"], False), (["some", "some"], True), (["all", "none"], True),
                (["none", "none"], True), (["all"], True)],
    "all-used": [(["all"], None), (["all"], True), (["all", "all"], False), (["all"], True),
                 (["all", "all", "all"], True)],
    # static_graph=True: the branch used on rank 0 only in every backward, or on no rank.
    "static-some": [(["some"], None), (["some"], True), (["some", "some"], False),
                    (["some"], True), (["some", "some"], True)],
    "static-none": [(["none"], None), (["none"], True), (["none", "none"], False),
                    (["none"], True), (["none", "none"], True)],
}


def _uses(pattern: str, rank: int) -> bool:
    return pattern == "all" or (pattern == "some" and rank == 0)


def ddp_train(ctx: Ctx, *, find_unused: bool, bucket_view: bool, static: bool, flat: bool,
              hk: str, schedule: str):
    import contextlib

    from torch.nn.parallel import DistributedDataParallel as DDP
    kw = dict(process_group=ctx.group, find_unused_parameters=find_unused,
              gradient_as_bucket_view=bucket_view, static_graph=static)
    d, td = DDP(branchy(7), **kw), DDP(branchy(7), **kw)
    opt, topt = make_opts(d.parameters(), td.parameters(), hk, flat)
    for k, (patterns, set_to_none) in enumerate(SCHEDULES[schedule]):
        if set_to_none is not None:
            opt.zero_grad(set_to_none=set_to_none)
            topt.zero_grad(set_to_none=set_to_none)
        for j, pattern in enumerate(patterns):
            x, y = mlp_data(ctx, 8, 10 * k + j)
            for model in (d, td):
                sync = j == len(patterns) - 1
                with contextlib.nullcontext() if sync else model.no_sync():
                    F.mse_loss(model(x, _uses(pattern, ctx.rank)), y).backward()
        label = f"step {k + 1} ({'+'.join(patterns)}, zero_grad(set_to_none={set_to_none})):"
        if k % 2:  # opt.clip_grad_norm_: the clip inside the step, DDP's gradients in its buckets
            ctx.check.tensor(opt.clip_grad_norm_(0.3),
                             nn.utils.clip_grad_norm_(td.parameters(), 0.3),
                             f"{label} clip_grad_norm_ total norm")
        opt.step()
        topt.step()
        ctx.check.twins(d, opt, td, topt, label)
        ctx.record("paths", paths(opt))
        ctx.record("torch_grad_none", [n for n, p in td.named_parameters() if p.grad is None])
        schedule_lr(opt, topt)


def ddp_steady(ctx: Ctx, *, bucket_view: bool, flat: bool, hk: str, steps: int = 7,
               unused: bool = False):
    """DDP's usual loop (zero_grad, forward, backward, step; every parameter used, or with
    `unused` the branch in the middle of the model unused on every rank, under
    find_unused_parameters=True: its parameters get no gradient, a bucket stepped in part):
    from the
    third step on (DDP rebuilds its buckets after the first iteration, and the layout follows)
    each step is replayed (optim._step_steady: no planning; with tensor hyper-parameters,
    filled in place at every step, no host read either), with the bits of torch's twin. With
    gradient_as_bucket_view=True and flat=True the kernels read DDP's buckets in place (lent
    buckets), and their list call is what replays (_LentCall)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    kw = dict(process_group=ctx.group, gradient_as_bucket_view=bucket_view,
              find_unused_parameters=unused)
    d, td = DDP(branchy(17), **kw), DDP(branchy(17), **kw)
    opt, topt = make_opts(d.parameters(), td.parameters(), hk, flat)
    _count_planning(opt)
    for k in range(steps):
        x, y = mlp_data(ctx, 19, k)
        for model, o in ((d, opt), (td, topt)):
            o.zero_grad()
            F.mse_loss(model(x, not unused), y).backward()
        label = f"step {k + 1}:"
        if k >= 2:
            _replayed(ctx, opt, opt.step, label)
        else:
            opt.step()
        topt.step()
        ctx.check.twins(d, opt, td, topt, label)
        ctx.record("paths", paths(opt))
        schedule_lr(opt, topt)
    lent = [b.lent for lay in opt._layouts.values() for b in lay.buckets]
    if unused:  # (flat=True; the branch's parameters, given no bucket view, in one of ours)
        wrong = not lent or any(lent) != bucket_view
    else:
        wrong = lent != ([bucket_view] * len(lent) if flat else []) or (flat and not lent)
    if wrong:
        ctx.check.fail(f"buckets lent {lent}, bucket_view={bucket_view} (flat={flat}, "
                       f"unused={unused})")


def ddp_gradscaler_capturable(ctx: Ctx, *, flat: bool, hk: str, steps: int = 8):
    """DDP with gradient_as_bucket_view=True under torch.amp.GradScaler, ours with
    capturable=True: the steps that create the momentum buffers (the first two overflow, and
    DDP rebuilds its buckets after the first iteration) are decided on the device, by the lent
    bucket's flag (flat) or the list call's (per-tensor), without a host read in step(), and
    give the bits and state of torch's for-loop, which GradScaler skips."""
    import momentum_cuda
    from torch.nn.parallel import DistributedDataParallel as DDP

    from conftest import no_host_reads
    kw = dict(process_group=ctx.group, gradient_as_bucket_view=True)
    d, td = DDP(branchy(11), **kw), DDP(branchy(11), **kw)
    ours_cls, ref_cls, extra = optimizer_classes(hk)
    opt = ours_cls(d.parameters(), flat=flat, capturable=True, **hypers(hk), **extra)
    topt = ref_cls(td.parameters(), **hypers(hk), **extra)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
               for _ in range(2)]
    overflow = (0, 1, 5)
    for k in range(steps):
        x, y = mlp_data(ctx, 13, k)
        for model, o, scaler in ((d, opt, scalers[0]), (td, topt, scalers[1])):
            o.zero_grad()
            loss = F.mse_loss(model(x, True), y) * (float("inf") if k in overflow else 1.0)
            scaler.scale(loss).backward()
            with contextlib.nullcontext() if o is topt else no_host_reads():
                scaler.step(o)
            scaler.update()
        label = f"step {k + 1}{' (overflow)' if k in overflow else ''}:"
        if flat:
            ctx.record("device_first", [bool(b.lent and b.first_flag is not None)
                                        for lay in opt._layouts.values() for b in lay.buckets])
        ctx.record("undecided", len(opt._unsure))
        if scalers[0].get_scale() != scalers[1].get_scale():
            ctx.check.fail(f"{label} scale {scalers[0].get_scale()} vs torch's "
                           f"{scalers[1].get_scale()}")
        ctx.check.twins(d, opt, td, topt, label)
        ctx.record("paths", paths(opt))
    if flat and not all(all(x) and x for x in ctx.info["device_first"]):
        ctx.check.fail(f"the buckets were not lent ones with a flag: {ctx.info['device_first']}")


# ---- 7. ZeroRedundancyOptimizer --------------------------------------------------------------
def _without(sd: dict, keys) -> dict:
    """A state_dict whose param groups lack `keys`."""
    return dict(sd, param_groups=[{k: v for k, v in g.items() if k not in keys}
                                  for g in sd["param_groups"]])


def zero_train(ctx: Ctx, *, flat: bool, grad_views: bool, param_views: bool, hk: str,
               steps: int = 4):
    """ZeroRedundancyOptimizer(optimizer_class=ours) against ZeroRedundancyOptimizer(
    optimizer_class=torch's), over DDP models: parameters on every rank, the local optimizer's
    buffers and state_dict, and the consolidated state_dict on rank 0. grad_views: DDP's
    gradient_as_bucket_view (every .grad a view of DDP's bucket); param_views: ZeRO's
    parameters_as_bucket_view.

    With flat=True the local optimizer (zero.optim) must step all its parameters in one call
    at every step: the flat path, with DDP's gradients in DDP's buckets (grad_views) read
    there, and with param_views the parameters (views of ZeRO's own bucket, which ZeRO
    broadcasts after each step, so they cannot move) stepped where they are; with param_views,
    gradients in a storage DDP holds are read where they are by the per-tensor path (the two
    buckets' offsets differ; moving them would end the aliasing torch keeps)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    ours_cls, ref_cls, extra = optimizer_classes(hk)
    h = dict(HYPERS[hk], **extra)
    d, td = (DDP(branchy(9), process_group=ctx.group, gradient_as_bucket_view=grad_views)
             for _ in range(2))
    # ZeRO puts every keyword into its param groups, which it hands to the local optimizer:
    # `flat` is passed only when it is not the default, and then left out of the comparison
    # of the param groups (torch's twin has no such key).
    kw = {} if flat else dict(flat=False)
    zero = ZeroRedundancyOptimizer(d.parameters(), optimizer_class=ours_cls,
                                   process_group=ctx.group,
                                   parameters_as_bucket_view=param_views, **kw, **h)
    tzero = ZeroRedundancyOptimizer(td.parameters(), optimizer_class=ref_cls,
                                    process_group=ctx.group,
                                    parameters_as_bucket_view=param_views, **h)
    names = {p: n for n, p in d.named_parameters()}
    local = [(names[p], p) for g in zero.optim.param_groups for p in g["params"]]
    tnames = {p: n for n, p in td.named_parameters()}
    tlocal = [(tnames[p], p) for g in tzero.optim.param_groups for p in g["params"]]
    ctx.info["local_params"] = [n for n, _ in local]
    for k in range(steps):
        for z in (zero, tzero):
            z.zero_grad(set_to_none=k % 2 == 0)
        x, y = mlp_data(ctx, 10, k)
        for model in (d, td):
            F.mse_loss(model(x, True), y).backward()
        zero.step()
        tzero.step()
        label = f"step {k + 1}:"
        ctx.check.params(list(d.named_parameters()), list(td.named_parameters()), label)
        ctx.check.optims(zero.optim, local, tzero.optim, tlocal, f"{label} zero.optim",
                         state_dict=False)
        ctx.check.same(_without(zero.optim.state_dict(), kw), tzero.optim.state_dict(),
                       f"{label} zero.optim.state_dict()")
        steps_paths = paths(zero.optim)
        ctx.record("paths", steps_paths)
        if flat and local:
            taken = {p for p, _ in steps_paths}
            # with param_views, gradients in a storage others hold (DDP's) are read where
            # they are (per tensor); after a zero_grad(set_to_none=True) without grad_views
            # they are the flat layout's own again
            want = ({"flat"} if not param_views or (not grad_views and k >= 2)
                    else {"flat", "per-tensor"})
            if (not taken <= want or sum(t for _, t in steps_paths) != len(local)
                    or len(steps_paths) != 1):
                ctx.check.fail(f"{label} zero.optim.last_step took paths {steps_paths} "
                               f"([path, tensors] per call) for its {len(local)} parameters; "
                               f"expected one call ({' or '.join(sorted(want))}) for all "
                               f"of them")
    for z in (zero, tzero):
        z.consolidate_state_dict(to=0)
    if ctx.rank == 0:
        ctx.check.same(_without(zero.state_dict(), kw), tzero.state_dict(),
                       "consolidated ZeroRedundancyOptimizer.state_dict() on rank 0:")


# ---- 8. momentum_dtype on FSDP2 shards (issue 14) --------------------------------------------
def _narrow_buffers(dtype):
    """momentum_dtype's contract on torch's SGD (a step post-hook): after its fp32 step every
    momentum buffer holds its value stored narrow and read back (kept in fp32 here, which the
    next step reads exactly as ours widens its narrow buffer): bf16 rounded to nearest even;
    int8 quantized in blocks counted from the start of each rank's local shard (the tensor the
    op steps), reference.quantize_momentum."""
    from momentum_cuda.reference import dequantize_momentum, quantize_momentum

    def hook(opt, *_) -> None:
        with torch.no_grad():
            for st in opt.state.values():
                buf = st.get("momentum_buffer")
                if buf is None:
                    continue
                if dtype is torch.bfloat16:
                    buf.copy_(buf.to(torch.bfloat16).float())
                else:
                    local = buf._local_tensor
                    local.copy_(dequantize_momentum(*quantize_momentum(local)))
    return hook


def _narrow_momentum_opt(model, hk: str, flat: bool, dtype):
    import momentum_cuda
    return _count_planning(momentum_cuda.SGD(model.parameters(), flat=flat,
                                             momentum_dtype=dtype, **hypers(hk)))


def _count_planning(opt):
    """opt, its planned list calls (_step_modes, _step_tensors) counted in opt.planned: a step
    replayed from the last (_replay_list) plans none."""
    opt.planned = 0

    def counted(plan):
        def run(*args, **kw):
            opt.planned += 1
            return plan(*args, **kw)
        return run
    opt._step_modes, opt._step_tensors = counted(opt._step_modes), counted(opt._step_tensors)
    return opt


def _replayed(ctx: Ctx, opt, step, label: str) -> None:
    """Runs opt.step() and fails unless it was replayed (no mode step planned); with
    hyper-parameters in tensors ("tensors", which the kernels read) also unless it read nothing
    on the host."""
    from conftest import no_host_reads
    tensors = any(isinstance(g[k], torch.Tensor) for g in opt.param_groups
                  for k in ("lr", "momentum", "dampening", "weight_decay") if k in g)
    before = opt.planned
    with no_host_reads() if tensors else contextlib.nullcontext():
        step()
    if opt.planned != before:
        ctx.check.fail(f"{label} the step was planned, not replayed")


def _narrow_momentum_steps(ctx: Ctx, pairs, dtype, *, first_step: int, steps: int,
                           what: str = ""):
    """Steps of (model, opt) pairs on the same data (clipping every other step); every later
    pair compared with the first, whose buffers may be fp32 holding narrow values (torch's
    twin) while ours are `dtype` DTensors sharded like their parameters (read back in fp32 by
    opt.momentum_buffer)."""
    (tm, topt), rest = pairs[0], pairs[1:]
    for k in range(first_step, first_step + steps):
        x, y = mlp_data(ctx, 4, k)
        label = f"{what}step {k + 1}:"
        for m, o in pairs:
            F.mse_loss(m(x), y).backward()
            if k % 2:
                nn.utils.clip_grad_norm_(m.parameters(), 0.25)
            if k >= first_step + 2 and o is not topt:  # (it replays from step 3)
                _replayed(ctx, o, o.step, label)
            else:
                o.step()
        ref = list(tm.named_parameters())
        for m, o in rest:
            ours = list(m.named_parameters())
            ctx.check.params(ours, ref, label)
            for (n, p), (_, q) in zip(ours, ref):
                b = buffer_of(o, p)
                if b is not None and (b.dtype != dtype or not isinstance(b, _dtensor_cls())
                                      or b.placements != p.placements):
                    ctx.check.fail(f"{label} the momentum_buffer of {n} is a {type(b).__name__} "
                                   f"of {b.dtype}, not a {dtype} DTensor sharded like it")
                ctx.check.tensor(o.momentum_buffer(p), buffer_of(topt, q),
                                 f"{label} momentum_buffer of {n} (widened)")
            ctx.record("paths", paths(o))
        for m, o in pairs:
            o.zero_grad(set_to_none=k % 2 == 0)


class Wide(MLP):
    """5 -> 300 -> 7 -> 260 (no bias) -> 2: local shards of several int8 blocks of 256, their
    last one partial (on 3 ranks the 2-row weight's shards are 300, 300 and 0 elements)."""

    def __init__(self):
        nn.Module.__init__(self)
        self.l1 = nn.Linear(5, 300)
        self.l2 = nn.Linear(300, 7)
        self.l3 = nn.Linear(7, 260, bias=False)
        self.l4 = nn.Linear(260, 2)


def wide(seed: int) -> Wide:
    torch.manual_seed(seed)
    return Wide()


def _narrow_momentum_twins(ctx: Ctx, hk: str, flat: bool, dtype):
    """(model, ours, torch's twin model, its torch.optim.SGD whose buffers are stored narrow
    after each step, _narrow_buffers): FSDP2 on the small MLP (bf16) or Wide (int8)."""
    make = mlp if dtype is torch.bfloat16 else wide
    m, tm = fsdp2(make(1), ctx), fsdp2(make(1), ctx)
    opt = _narrow_momentum_opt(m, hk, flat, dtype)
    _, ref_cls, extra = optimizer_classes(hk)
    topt = ref_cls(tm.parameters(), **hypers(hk), **extra)
    topt.register_step_post_hook(_narrow_buffers(dtype))
    return m, opt, tm, topt


def fsdp2_narrow_momentum(ctx: Ctx, *, flat: bool, hk: str, dtype=torch.bfloat16):
    """momentum_dtype (bf16, or int8 on the Wide model) on FSDP2 shards: the local shards
    stepped by the op, the buffers `dtype` DTensors sharded like their parameters (int8: the
    block scales of each local shard in its state), bits those of torch.optim.SGD
    (foreach=False) whose buffers are stored narrow and read back after each step
    (_narrow_buffers); on 2 ranks also a dcp.save / dcp.load into a fresh model and optimizer
    (torch's _init_optim_state step included; int8 scales through state_dict's per-element
    form) that trains on with the bits of the uninterrupted one."""
    m, opt, tm, topt = _narrow_momentum_twins(ctx, hk, flat, dtype)
    _narrow_momentum_steps(ctx, [(tm, topt), (m, opt)], dtype, first_step=0, steps=4)
    # torch's format, for a checkpoint that leaves momentum_cuda: fp32 DTensor buffers
    for (n, p), (_, q) in zip(m.named_parameters(), tm.named_parameters()):
        ctx.check.tensor(opt.momentum_buffer(p), buffer_of(topt, q), f"momentum_buffer({n})")
    ctx.check.same(opt.torch_state_dict()["state"], topt.state_dict()["state"],
                   "torch_state_dict()['state']")
    if ctx.world != 2:
        return
    base = ctx.shared / f"ckpt-{str(dtype)[6:]}-momentum-{_flat_id(flat)}-{hk}"
    dcp_save(ctx, m, opt, base)
    m2 = fsdp2((mlp if dtype is torch.bfloat16 else wide)(99), ctx)
    opt2 = _narrow_momentum_opt(m2, hk, flat, dtype)
    dcp_load(ctx, m2, opt2, base)
    ours, ref = list(m2.named_parameters()), list(m.named_parameters())
    ctx.check.params(ours, ref, "after dcp.load:", grads=False)  # (m's are zeroed, not None)
    ctx.check.optims(opt2, ours, opt, ref, "after dcp.load:")
    for (n, p), (_, q) in zip(ours, ref):
        ctx.check.tensor(opt2.state[p].get("momentum_scales"), opt.state[q].get(
            "momentum_scales"), f"after dcp.load: momentum_scales of {n} (per shard)")
    _narrow_momentum_steps(ctx, [(tm, topt), (m, opt), (m2, opt2)], dtype, first_step=4,
                           steps=3, what="resumed ")


def fsdp2_narrow_momentum_gradscaler(ctx: Ctx, *, flat: bool, hk: str, dtype):
    """momentum_dtype on FSDP2 shards under torch.amp.GradScaler: from step 3 on ours replays
    its kept calls with no host read (the local shards' gradients unscaled by torch's op,
    GradScaler's found_inf handed to the op, which skips on the device); overflows on step 4
    and, on rank 0 only, on step 6. Bits those of torch.optim.SGD (foreach=False) under its own
    GradScaler (unscale_, skip) whose buffers are stored narrow after each step it takes
    (_narrow_buffers): parameters, gradients, buffers (widened), the scale."""
    from conftest import no_host_reads
    m, opt, tm, topt = _narrow_momentum_twins(ctx, hk, flat, dtype)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=2)
               for _ in range(2)]
    for k in range(7):
        x, y = mlp_data(ctx, 4, k)
        inf = k == 3 or (k == 5 and ctx.rank == 0)
        label = f"step {k + 1}{' (overflow)' if inf else ''}:"
        for model, o, scaler in ((tm, topt, scalers[1]), (m, opt, scalers[0])):
            o.zero_grad(set_to_none=k % 2 == 0)
            loss = F.mse_loss(model(x), y) * (float("inf") if inf else 1.0)
            scaler.scale(loss).backward()
            if o is opt and k >= 2:
                with no_host_reads():
                    _replayed(ctx, o, lambda: scaler.step(o), label)
            else:
                scaler.step(o)
            scaler.update()
        if scalers[0].get_scale() != scalers[1].get_scale():
            ctx.check.fail(f"{label} scale {scalers[0].get_scale()} vs torch's "
                           f"{scalers[1].get_scale()}")
        ours, ref = list(m.named_parameters()), list(tm.named_parameters())
        ctx.check.params(ours, ref, label)
        for (n, p), (_, q) in zip(ours, ref):
            ctx.check.tensor(opt.momentum_buffer(p), buffer_of(topt, q),
                             f"{label} momentum_buffer of {n} (widened)")
        ctx.record("paths", paths(opt))


def fsdp2_int8_xworld(ctx: Ctx, *, flat: bool, hk: str):
    """momentum_dtype=torch.int8 across world sizes: on 2 ranks ours and torch's twin (its
    buffers stored narrow per local shard by _narrow_buffers) train 3 steps and are saved; on
    3 ranks both load (ours: the codes with their per-element scales, read back in fp32 and
    quantized again in the blocks of the new local shards, as the twin's buffers are once by
    its hook) and train on with the same bits."""
    base = ctx.shared / XWORLD / f"int8-{_flat_id(flat)}-{hk}"
    seed = 1 if ctx.world == 2 else 98
    m, tm = fsdp2(wide(seed), ctx), fsdp2(wide(seed), ctx)
    opt = _narrow_momentum_opt(m, hk, flat, torch.int8)
    _, ref_cls, extra = optimizer_classes(hk)
    topt = ref_cls(tm.parameters(), **hypers(hk), **extra)
    hook = _narrow_buffers(torch.int8)
    topt.register_step_post_hook(hook)
    if ctx.world == 2:
        _narrow_momentum_steps(ctx, [(tm, topt), (m, opt)], torch.int8, first_step=0, steps=3)
        dcp_save(ctx, tm, topt, base / "torch")
        dcp_save(ctx, m, opt, base / "ours")
        return
    dcp_load(ctx, m, opt, base / "ours")
    dcp_load(ctx, tm, topt, base / "torch")
    hook(topt)  # (the 2-rank blocks' values, stored in the 3-rank blocks)
    ours, ref = list(m.named_parameters()), list(tm.named_parameters())
    ctx.check.params(ours, ref, "after dcp.load on 3 ranks:", grads=False)
    for (n, p), (_, q) in zip(ours, ref):
        ctx.check.tensor(opt.momentum_buffer(p), buffer_of(topt, q),
                         f"after dcp.load on 3 ranks: momentum_buffer of {n} (widened)")
    _narrow_momentum_steps(ctx, [(tm, topt), (m, opt)], torch.int8, first_step=3, steps=3,
                           what="resumed on 3 ranks ")


SR_SEED = 12345


def _sr_opt(model, hk: str, flat: bool):
    import momentum_cuda
    return _count_planning(momentum_cuda.SGD(model.parameters(), flat=flat,
                                             stochastic_rounding=True, sr_seed=SR_SEED,
                                             **hypers(hk)))


class _SrTwin:
    """stochastic_rounding=True on the whole tensors (reference.sgd_sr_reference_step): the
    full bf16 parameters FSDP2 would gather, stepped with the full (reduced, clipped)
    gradients; each parameter's stream is its position, its step count its own."""

    def __init__(self, model, hk: str):
        self.names = [n for n, _ in model.named_parameters()]
        self.full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        self.bufs = {n: None for n in self.names}
        self.h, self.steps = hypers(hk), 0

    def step(self, model) -> None:
        from momentum_cuda.reference import sgd_sr_reference_step, sr_key
        self.steps += 1
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        names = [n for n in self.names if grads[n] is not None]
        keys = [sr_key(SR_SEED, self.steps, self.names.index(n)) for n in names]
        out = sgd_sr_reference_step([self.full[n] for n in names], [grads[n] for n in names],
                                    [self.bufs[n] for n in names], keys, **self.h)
        self.bufs.update(zip(names, out))

    def compare(self, ctx: Ctx, model, opt, label: str) -> None:
        """Ours (DTensors, gathered) against the whole tensors: parameters, bf16 buffers
        sharded like their parameters, and each parameter's sr_step."""
        for n, p in model.named_parameters():
            ctx.check.tensor(p.full_tensor(), self.full[n], f"{label} {n}")
            b = buffer_of(opt, p)
            if b is not None and (b.dtype != torch.bfloat16 or not isinstance(b, _dtensor_cls())
                                  or tuple(b.placements) != tuple(p.placements)):
                ctx.check.fail(f"{label} the momentum_buffer of {n} is a {type(b).__name__} of "
                               f"{b.dtype}, not a bf16 DTensor sharded like its parameter")
                continue
            ctx.check.tensor(None if b is None else b.full_tensor(), self.bufs[n],
                             f"{label} momentum_buffer of {n}")
            sr_step = opt.state.get(p, {}).get("sr_step")
            if sr_step != self.steps:
                ctx.check.fail(f"{label} sr_step of {n} is {sr_step!r}, not {self.steps}")


def _sr_steps(ctx: Ctx, twin: _SrTwin, runs, *, first_step: int, steps: int, what: str = ""):
    """Steps of the (model, opt) runs on the same data, clipping every other step (torch's
    clip_grad_norm_ and opt.clip_grad_norm_ in turn), then zero_grad; the twin steps with the
    first run's full (clipped) gradients and every run is compared with it."""
    for k in range(first_step, first_step + steps):
        x, y = mlp_data(ctx, 6, k)
        label = f"{what}step {k + 1}:"
        for i, (m, o) in enumerate(runs):
            F.mse_loss(m(x.to(torch.bfloat16)), y.to(torch.bfloat16)).backward()
            if k % 4 == 1:
                nn.utils.clip_grad_norm_(m.parameters(), 0.05)
            elif k % 4 == 3:
                o.clip_grad_norm_(0.05)
            if k >= first_step + 2 and k % 4 != 3:  # (from step 3; a pending clip plans)
                _replayed(ctx, o, o.step, label)
            else:
                o.step()
            if i == 0:  # (after the step: opt.clip_grad_norm_ clips the gradients inside it)
                twin.step(m)
        for m, o in runs:
            twin.compare(ctx, m, o, label)
            ctx.record("paths", paths(o))
            o.zero_grad(set_to_none=k % 2 == 0)


def fsdp2_sr(ctx: Ctx, *, flat: bool, hk: str):
    """stochastic_rounding=True on FSDP2 shards of bf16 parameters: each local shard draws
    the random bits of its elements' indices in the whole tensor, so the gathered parameters
    hold the bits of the unsharded step (_SrTwin: the reference on the full tensors, with the
    full gradients), on 2 ranks and on 3 (uneven shards, empty ones); the buffers are bf16
    DTensors sharded like their parameters. On 2 ranks also a dcp.save / dcp.load into a fresh
    model and optimizer (sr_step included) that trains on with the bits of the uninterrupted
    run. Without the shard offset the parameters differ from step 1 on (planted)."""
    m = fsdp2(mlp(1).to(torch.bfloat16), ctx)
    opt = _sr_opt(m, hk, flat)
    twin = _SrTwin(m, hk)
    _sr_steps(ctx, twin, [(m, opt)], first_step=0, steps=5)
    if ctx.world != 2:
        return
    base = ctx.shared / f"ckpt-sr-{_flat_id(flat)}-{hk}"
    dcp_save(ctx, m, opt, base)
    m2 = fsdp2(mlp(99).to(torch.bfloat16), ctx)
    opt2 = _sr_opt(m2, hk, flat)
    dcp_load(ctx, m2, opt2, base)
    twin.compare(ctx, m2, opt2, "after dcp.load:")
    _sr_steps(ctx, twin, [(m, opt), (m2, opt2)], first_step=5, steps=3, what="resumed ")


def _master_opt(model, hk: str, flat: bool):
    import momentum_cuda
    return _count_planning(momentum_cuda.SGD(model.parameters(), flat=flat, master_weights=True,
                                             **hypers(hk)))


def _master_steps(ctx: Ctx, tm, topt, runs, dtype, *, first_step: int, steps: int,
                  what: str = ""):
    """Steps of `dtype` (bf16 or fp16) (model, opt) runs with master_weights=True and of
    torch's fp32 twin (tm, topt: torch.optim.SGD(foreach=False)), all on the same data; the
    twin takes the first run's gradients upcast to fp32 after its step (clipped by torch's
    clip_grad_norm_ or by opt.clip_grad_norm_ inside the step, every other step). Step 5
    writes l1.weight between steps (its master restarts from the written value; the twin's
    parameter takes that value); step 6 gives l2.weight's local shard new values in new
    memory at its own address, its version unchanged (conftest.same_address_new_storage),
    which a replay's check must see as a write too. Compared after every step:
    opt.master_weight(p) with the twin's fp32 parameter, p with it rounded to dtype, the fp32
    buffers (DTensors sharded like their parameters)."""
    from conftest import same_address_new_storage
    for k in range(first_step, first_step + steps):
        x, y = mlp_data(ctx, 8, k)
        label = f"{what}step {k + 1}:"
        if k == 4:
            with torch.no_grad():
                for m, _ in runs:
                    m.l1.weight.mul_(-0.5)
                tm.l1.weight.copy_(runs[0][0].l1.weight.float())
        if k == 5:
            with torch.no_grad():
                for m, _ in runs:
                    lp = m.l2.weight._local_tensor
                    same_address_new_storage(lp, lp * -0.75)
                tm.l2.weight.copy_(runs[0][0].l2.weight.float())
        for i, (m, o) in enumerate(runs):
            F.mse_loss(m(x.to(dtype)), y.to(dtype)).backward()
            if k % 4 == 1:
                nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            elif k % 4 == 3:
                o.clip_grad_norm_(0.5)
            # replayed from step 3, but for a pending clip and the steps after the writes
            if k >= first_step + 2 and k % 4 != 3 and k not in (4, 5):
                _replayed(ctx, o, o.step, label)
            else:
                o.step()
            if i == 0:
                for p, q in zip(m.parameters(), tm.parameters()):
                    q.grad = p.grad.float()
                topt.step()
        for m, o in runs:
            _compare_masters(ctx, m, o, tm, topt, dtype, label)
            ctx.record("paths", paths(o))
        for m, o in runs:
            o.zero_grad(set_to_none=k % 2 == 0)
        topt.zero_grad()


def _compare_masters(ctx: Ctx, m, o, tm, topt, dtype, label: str) -> None:
    for (n, p), (_, q) in zip(m.named_parameters(), tm.named_parameters()):
        ctx.check.tensor(o.master_weight(p), q.detach(), f"{label} master of {n}")
        ctx.check.tensor(p.detach(), q.detach().to(dtype), f"{label} {n}")
        ctx.check.tensor(buffer_of(o, p), buffer_of(topt, q), f"{label} buffer of {n}")
        st = o.state.get(p, {})
        for key in ("master_weight",) if dtype is torch.float16 else ("master_remainder",):
            t = st.get(key)
            if not (isinstance(t, _dtensor_cls()) and t.placements == p.placements):
                ctx.check.fail(f"{label} {key} of {n} is a {type(t).__name__}")


def _inject_ties(ctx: Ctx, m, o, tm) -> None:
    """bf16 masters that are halfway between two bf16 values (low half 0x8000), half of them
    rounded up (the tie bit set) and half down, at every position of l2.weight on every rank,
    given to the optimizer as a checkpoint gives them (the parameter written first, then
    load_state_dict of a state_dict whose remainder and unpacked tie bits say so) and to the
    twin as its fp32 parameter; checks that master_weight(p) reads them back."""
    from momentum_cuda.reference import bf16_split
    p, q = m.l2.weight, tm.l2.weight
    with torch.no_grad():
        u = q.detach().full_tensor().view(torch.int32)
        halfway = ((u & ~0xFFFF) | 0x8000).view(torch.float32)
        param, rem, tie = bf16_split(halfway)
        if not (tie.any() and (~tie).any()):
            ctx.check.fail("the injected masters hold no tie (or only ties)")
        q.copy_(_distribute_like(halfway, q))
        p.copy_(_distribute_like(param, p))
    sd = o.state_dict()
    i = [id(x) for x in m.parameters()].index(id(p))
    sd["state"][i] = dict(sd["state"][i], master_remainder=_distribute_like(rem, p),
                          master_ties=_distribute_like(tie.to(torch.uint8), p))
    o.load_state_dict(sd)
    ctx.check.tensor(o.master_weight(p), q.detach(), "injected ties: master of l2.weight")


def _distribute_like(full, like):
    """full (the same on every rank) as a DTensor sharded like `like`: each rank takes its own
    shard (src_data_rank=None: no scatter, which gloo refuses for int16)."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def fsdp2_master(ctx: Ctx, *, flat: bool, hk: str, dtype):
    """master_weights=True for bf16 or fp16 FSDP2 parameters: each rank steps its local shards;
    the state is sharded like its parameter (fp16: the fp32 master, a DTensor; bf16: the int16
    remainder, a DTensor, and the tie bits packed per local shard, which state_dict gives as a
    uint8 DTensor sharded like it); bitwise against torch.optim.SGD(foreach=False) on fp32 FSDP2
    parameters fed the gradients upcast (the contract), a write between steps included. On 2
    ranks also a dcp.save / dcp.load into a fresh model and optimizer that trains on with the
    bits of the uninterrupted run; for bf16, masters on ties (_inject_ties) go through it."""
    m = fsdp2(mlp(1).to(dtype), ctx)
    tm = fsdp2(mlp(1).to(dtype).float(), ctx)
    opt = _master_opt(m, hk, flat)
    topt = torch.optim.SGD(tm.parameters(), **hypers(hk), foreach=False)
    _master_steps(ctx, tm, topt, [(m, opt)], dtype, first_step=0, steps=6)
    if ctx.world != 2:
        return
    if dtype is torch.bfloat16:
        _inject_ties(ctx, m, opt, tm)
    base = ctx.shared / f"ckpt-master-{str(dtype)[6:]}-{_flat_id(flat)}-{hk}"
    dcp_save(ctx, m, opt, base)
    m2 = fsdp2(mlp(99).to(dtype), ctx)
    opt2 = _master_opt(m2, hk, flat)
    dcp_load(ctx, m2, opt2, base)
    _compare_masters(ctx, m2, opt2, tm, topt, dtype, "after dcp.load:")
    _master_steps(ctx, tm, topt, [(m, opt), (m2, opt2)], dtype, first_step=6, steps=3,
                  what="resumed ")


def dtensor_sr_refused(ctx: Ctx, *, flat: bool):
    """stochastic_rounding=True on a DTensor whose local shard is not one run of the whole
    tensor (Shard(1) of a matrix): step() raises, naming the flag and the shard, before
    anything is written; a Shard(0) one and a Replicate one step."""
    import momentum_cuda
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    for pl, ok in ((Shard(1), False), (Shard(0), True), (Replicate(), True)):
        w = torch.randn(5, 7, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
        p = nn.Parameter(distribute_tensor(w, ctx.mesh, [pl]))
        p.grad = p.detach().clone().mul_(0.5)
        opt = momentum_cuda.SGD([p], lr=0.1, momentum=0.9, flat=flat, stochastic_rounding=True)
        before = p.detach().to_local().clone()
        try:
            opt.step()
        except RuntimeError as e:
            why = "needs each DTensor parameter's local shard to be one run of the whole tensor"
            if ok or why not in str(e):
                ctx.check.fail(f"{pl}: unexpected error: {e}")
            ctx.check.tensor(p.detach().to_local(), before,
                             f"{pl}: the parameter after the refusal")
            if opt.state:
                ctx.check.fail(f"{pl}: the refused step left state")
            continue
        if not ok:
            ctx.check.fail(f"{pl}: step() did not raise")
        elif torch.equal(p.detach().to_local(), before):
            ctx.check.fail(f"{pl}: step() left the parameter as it was")


# ---- the scenario list -----------------------------------------------------------------------
SCENARIOS: dict[str, tuple] = {}  # name -> (function, kwargs)
LAUNCHES: dict[int, list[str]] = {2: [], 3: []}


def _add(world: int, name: str, fn, **kw) -> None:
    assert name not in SCENARIOS, name
    SCENARIOS[name] = (fn, kw)
    LAUNCHES[world].append(name)


def _flat_id(flat: bool) -> str:
    return "flat" if flat else "pertensor"


def _build() -> None:
    for flat in (True, False):
        for hk in ("nest-wd", "damp-max-wd", "ema"):
            _add(2, f"fsdp2/{_flat_id(flat)}/{hk}", fsdp2_train, flat=flat, hk=hk)
    _add(2, "fsdp2/flat/plain-wd", fsdp2_train, flat=True, hk="plain-wd")
    for flat in (True, False):
        for hk in ("nest-wd", "damp-max-wd"):
            for dtype in (torch.bfloat16, torch.int8):
                _add(2, f"fsdp2-{str(dtype)[6:]}-momentum/{_flat_id(flat)}/{hk}",
                     fsdp2_narrow_momentum, flat=flat, hk=hk, dtype=dtype)
        for hk in ("nest-wd", "damp-max-wd"):
            _add(2, f"fsdp2-sr/{_flat_id(flat)}/{hk}", fsdp2_sr, flat=flat, hk=hk)
        _add(2, f"dtensor-sr-refused/{_flat_id(flat)}", dtensor_sr_refused, flat=flat)
        for hk in ("nest-wd", "damp-max-wd"):
            for dtype in (torch.bfloat16, torch.float16):
                _add(2, f"fsdp2-master-{str(dtype)[6:]}/{_flat_id(flat)}/{hk}", fsdp2_master,
                     flat=flat, hk=hk, dtype=dtype)
    for flat in (True, False):
        for hk in ("tensors", "ema-tensors"):
            _add(2, f"fsdp2/{_flat_id(flat)}/{hk}", fsdp2_train, flat=flat, hk=hk)
            _add(2, f"ddp/find_unused=1,bucket_view=1,static=0/{_flat_id(flat)}/dynamic/{hk}",
                 ddp_train, find_unused=True, bucket_view=True, static=False, flat=flat, hk=hk,
                 schedule="dynamic")
    # the modes with the hyper-parameters in tensors, which their kernels read (DTensor shards)
    _add(2, "fsdp2-bfloat16-momentum/flat/tensors", fsdp2_narrow_momentum, flat=True,
         hk="tensors", dtype=torch.bfloat16)
    _add(2, "fsdp2-int8-momentum/pertensor/tensors", fsdp2_narrow_momentum, flat=False,
         hk="tensors", dtype=torch.int8)
    _add(2, "fsdp2-master-bfloat16/pertensor/tensors", fsdp2_master, flat=False, hk="tensors",
         dtype=torch.bfloat16)
    _add(2, "fsdp2-sr/flat/tensors", fsdp2_sr, flat=True, hk="tensors")
    for flat in (True, False):
        _add(2, f"fsdp2-bf16-mp/{_flat_id(flat)}/mom", fsdp2_train, flat=flat, hk="mom", mp=True)
        _add(2, f"fsdp2-cpu-offload/{_flat_id(flat)}/nest-wd", fsdp2_train, flat=flat,
             hk="nest-wd", offload=True)
    _add(2, "fsdp2-ckpt/flat/nest-wd", fsdp2_checkpoint, flat=True, hk="nest-wd")
    _add(2, "fsdp2-ckpt/pertensor/damp-max-wd", fsdp2_checkpoint, flat=False, hk="damp-max-wd")
    _add(2, "fsdp2-ckpt/flat/ema-wd-max", fsdp2_checkpoint, flat=True, hk="ema-wd-max")
    for flat in (True, False):
        _add(2, f"fsdp2-int8-xworld-save/{_flat_id(flat)}/damp-max-wd", fsdp2_int8_xworld,
             flat=flat, hk="damp-max-wd")
        _add(2, f"fsdp2-ckpt-xworld-save/{_flat_id(flat)}/nest-wd", fsdp2_xworld_save,
             flat=flat, hk="nest-wd")
    for flat in (True, False):
        for hk in ("mom", "damp-max-wd"):
            _add(2, f"dtensor/{_flat_id(flat)}/{hk}", dtensor_train, flat=flat, hk=hk,
                 init_mesh=flat and hk == "mom")
        _add(2, f"dtensor-partial-grads/{_flat_id(flat)}/nest-wd", dtensor_train, flat=flat,
             hk="nest-wd", grads="partial")
    _add(2, "dtensor/flat/ema-wd-max", dtensor_train, flat=True, hk="ema-wd-max")
    for flat in (True, False):
        _add(2, f"dtensor-replay-edits/{_flat_id(flat)}", dtensor_replay_edits, flat=flat)
    hks = iter(["mom", "nest-wd", "damp-max-wd", "plain-wd"] * 10)
    for static in (False, True):
        for find_unused in (False, True):
            if static:
                schedules = ["static-some", "static-none"]
            else:
                schedules = ["dynamic" if find_unused else "all-used"]
            for bucket_view in (False, True):
                for flat in (True, False):
                    for schedule in schedules:
                        hk = next(hks)
                        name = (f"ddp/find_unused={int(find_unused)},bucket_view={int(bucket_view)}"
                                f",static={int(static)}/{_flat_id(flat)}/{schedule}/{hk}")
                        _add(2, name, ddp_train, find_unused=find_unused, bucket_view=bucket_view,
                             static=static, flat=flat, hk=hk, schedule=schedule)
    for bucket_view in (True, False):
        for flat in (True, False):
            for hk in ("nest-wd", "tensors", "ema"):
                _add(2, f"ddp-steady/bucket_view={int(bucket_view)}/{_flat_id(flat)}/{hk}",
                     ddp_steady, bucket_view=bucket_view, flat=flat, hk=hk)
        _add(2, f"ddp-steady-unused/bucket_view={int(bucket_view)}/flat/tensors", ddp_steady,
             bucket_view=bucket_view, flat=True, hk="tensors", unused=True)
    _add(2, "ddp/find_unused=1,bucket_view=1,static=0/flat/dynamic/ema", ddp_train,
         find_unused=True, bucket_view=True, static=False, flat=True, hk="ema", schedule="dynamic")
    for flat in (True, False):
        for capturable in (False, True):
            _add(2, f"fsdp2-gradscaler{'-capturable' if capturable else ''}/{_flat_id(flat)}"
                    f"/nest-wd", fsdp2_gradscaler, flat=flat, hk="nest-wd", capturable=capturable)
        for hk in ("nest-wd", "ema-wd-max"):
            _add(2, f"ddp-gradscaler-capturable/{_flat_id(flat)}/{hk}", ddp_gradscaler_capturable,
                 flat=flat, hk=hk)
    _add(2, "fsdp2-bfloat16-momentum-gradscaler/flat/nest-wd", fsdp2_narrow_momentum_gradscaler,
         flat=True, hk="nest-wd", dtype=torch.bfloat16)
    _add(2, "fsdp2-int8-momentum-gradscaler/pertensor/damp-max-wd",
         fsdp2_narrow_momentum_gradscaler, flat=False, hk="damp-max-wd", dtype=torch.int8)
    for grad_views in (False, True):
        for param_views in (False, True):
            for flat in (True, False):
                _add(2, f"zero/ddp_grad_views={int(grad_views)},param_views={int(param_views)}"
                        f"/{_flat_id(flat)}/nest-wd", zero_train, flat=flat,
                     grad_views=grad_views, param_views=param_views, hk="nest-wd")
    _add(2, "zero/ddp_grad_views=1,param_views=0/flat/ema-wd-max", zero_train, flat=True,
         grad_views=True, param_views=False, hk="ema-wd-max")
    # 3 ranks: uneven shards (an empty one on rank 2), and the 2-rank checkpoint loaded
    for flat in (True, False):
        _add(3, f"fsdp2-uneven/{_flat_id(flat)}/damp-max-wd", fsdp2_train, flat=flat,
             hk="damp-max-wd")
        _add(3, f"dtensor-uneven/{_flat_id(flat)}/nest-wd", dtensor_train, flat=flat,
             hk="nest-wd")
    _add(3, "fsdp2-uneven/flat/ema", fsdp2_train, flat=True, hk="ema")
    _add(3, "fsdp2-uneven-sr/flat/nest-wd", fsdp2_sr, flat=True, hk="nest-wd")
    _add(3, "fsdp2-uneven-master-float16/pertensor/damp-max-wd", fsdp2_master, flat=False,
         hk="damp-max-wd", dtype=torch.float16)
    _add(3, "fsdp2-uneven-master-bfloat16/flat/nest-wd", fsdp2_master, flat=True,
         hk="nest-wd", dtype=torch.bfloat16)
    _add(3, "fsdp2-uneven-bfloat16-momentum/pertensor/damp-max-wd", fsdp2_narrow_momentum,
         flat=False, hk="damp-max-wd", dtype=torch.bfloat16)
    _add(3, "fsdp2-uneven-int8-momentum/flat/nest-wd", fsdp2_narrow_momentum, flat=True,
         hk="nest-wd", dtype=torch.int8)
    for flat in (True, False):
        _add(3, f"fsdp2-int8-xworld-load/{_flat_id(flat)}/damp-max-wd", fsdp2_int8_xworld,
             flat=flat, hk="damp-max-wd")
    for flat, source in ((True, "own"), (False, "own"), (True, "torch")):
        _add(3, f"fsdp2-ckpt-xworld-load/{_flat_id(flat)}/from-{source}/nest-wd",
             fsdp2_xworld_load, flat=flat, hk="nest-wd", source=source)


_build()


# ---- the rank's main -------------------------------------------------------------------------
def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)  # atomic: the harness never reads half a file


def _run_one(name: str, ctx: Ctx) -> dict:
    fn, kw = SCENARIOS[name]
    t0 = time.perf_counter()
    try:
        fn(ctx, **kw)
        if ctx.check.count:
            status = "mismatch"
            more = ctx.check.count - len(ctx.check.problems)
            detail = "\n".join(ctx.check.problems) + (f"\n... and {more} more" if more else "")
        else:
            status, detail = "ok", ""
    except Skip as e:
        status, detail = "skip", str(e)
    except Exception as e:  # recorded; the next scenario runs on its own process group
        status = "error"
        # the exception first (a long traceback must not push it out of a short report)
        detail = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
        if ctx.check.count:
            detail = ("differences before the exception:\n" + "\n".join(ctx.check.problems)
                      + "\n" + detail)
    return dict(status=status, detail=detail, info=ctx.info,
                seconds=round(time.perf_counter() - t0, 3))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", required=True, type=Path)
    ap.add_argument("--shared", required=True, type=Path)
    ap.add_argument("--collective-timeout", type=float, default=30.0)
    ap.add_argument("names", nargs="+")
    args = ap.parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the harness asks at its deadline
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore", message=".*momentum_cuda.*")
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    out = dict(rank=rank, world=world, current="(start-up: init_process_group)", results={})
    _write(args.results, out)
    timeout = timedelta(seconds=args.collective_timeout)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), None, False,
                          timeout=timeout)
    t0 = time.perf_counter()
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timeout)
    # between scenarios every rank waits here for the others, longer than a collective can hang
    control = dist.new_group(backend="gloo", timeout=timedelta(
        seconds=3 * args.collective_timeout + 30))
    groups = [dist.new_group(backend="gloo", timeout=timeout) for _ in args.names]
    out["init_seconds"] = round(time.perf_counter() - t0, 3)
    for name, group in zip(args.names, groups):
        out["current"] = name
        _write(args.results, out)
        if name not in SCENARIOS:
            out["results"][name] = dict(status="error", detail=f"no scenario named {name!r}",
                                        info={}, seconds=0)
        else:
            out["results"][name] = _run_one(name, Ctx(rank, world, group, args.shared))
        out["current"] = "barrier after " + name
        _write(args.results, out)
        dist.barrier(group=control)
    out["current"] = None
    _write(args.results, out)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
