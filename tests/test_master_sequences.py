"""Randomized operation sequences for the bf16 modes (issue 14), flat and per-tensor, random
hyper-parameters:
- master_weights=True: bf16 parameters, and fp16 ones (each with two fp32 ones) stepped by
  momentum_cuda.SGD / Momentum with master weights, against fp32 twins stepped by torch.optim.SGD(foreach=False) /
  MomentumReference (test_master_weights.MasterTwins);
- stochastic_rounding=True: the same parameters against bf16 twins stepped by SrReference
  below, an optimizer written from the contract (reference.sgd_sr_reference_step per bf16
  parameter with the key of its own step count and position; torch's step for the fp32 ones);
- momentum_dtype=torch.int8 (first group) and torch.bfloat16 (second): the same shapes in fp32,
  against fp32 twins stepped by QmomReference below (reference.sgd_momentum_dtype_reference_step
  per parameter; an added group has no momentum_dtype: torch's step). Between steps a random
  interleaving of what
training code does: fresh gradients (the twins get them widened), GradScaler's step and update
(overflows too; the twin takes GradScaler's unscale of our gradients, from torch's own op, and
skips where it finds an inf), gradients scaled in place or dropped, zero_grad either way, a
group's hyper-parameter edited, a parameter written (copy_ of fresh values or of itself
scaled: its master restarts from the written value, so the twin is given the same value), a
group's lr, momentum or weight_decay made a 1-element fp32 or fp64 tensor, or filled in place
(the kernels read it; the twin gets its value as a float), a parameter's memory order changed
(model.to(memory_format=...): a master restarts, the twin is given its value; int8 momentum
blocks are formed again on the new layout), for master weights a parameter's dtype changed
(bf16 <-> fp16, model.to(dtype): the master restarts in the other form), a new param group,
state_dict + load_state_dict, copy.deepcopy of parameters and optimizer together. After every
operation: every master, parameter and momentum buffer bit for bit (and the step counts), and
gradient presence. Stochastic rounding also
draws opt.state.clear() on both sides (the step counts restart, so do the keys).

Not drawn, with the reason: for master weights, opt.state.clear() / momentum_buffer = None
(they drop the remainder too: the master restarts from the bf16 value while the fp32 twin
keeps its low bits; README, "Master weights"); for both, clipping (it computes on the bf16
gradients on our side and the fp32 ones on the twin's, a different input). momentum_dtype draws
opt.state.clear() as stochastic rounding does.

Hypothesis is derandomized (a fixed seed, the same sequences every run) and keeps no database;
MOMENTUM_CUDA_SEQUENCES scales the count with tests/test_sequences.py's (a tenth of it here).
"""
from __future__ import annotations

import copy
import os

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import momentum_cuda
from momentum_cuda.reference import (QBLOCK, dequantize_momentum, quantize_momentum,
                                     sgd_momentum_dtype_reference_step, sgd_sr_reference_step,
                                     sr_key)
from torch.optim.sgd import sgd as _torch_sgd

from conftest import bits, fresh_grads
from test_master_weights import BF16_SIZES, MasterTwins

N_SEQUENCES = max(20, int(os.environ.get("MOMENTUM_CUDA_SEQUENCES", "1000")) // 10)
SIZES = [(5, 4)] + BF16_SIZES  # (one with two memory orders, in the first group: "relayout")

LR = st.sampled_from([0.1, 0.01, 1e-3, 0.0])
HYPER = {
    "sgd": st.fixed_dictionaries(dict(lr=LR, momentum=st.sampled_from([0.0, 0.9, 0.5]),
                                      dampening=st.sampled_from([0.0, 0.3]),
                                      weight_decay=st.sampled_from([0.0, 1e-2]),
                                      maximize=st.booleans())),
    "ema": st.fixed_dictionaries(dict(lr=LR, momentum=st.sampled_from([0.9, 0.5]),
                                      weight_decay=st.sampled_from([0.0, 1e-2]),
                                      maximize=st.booleans())),
}
K = st.integers(0, 15)
SEED = st.integers(0, 2**16)
OPS = {
    "grads": st.tuples(SEED),
    "step": st.just(()),
    "train": st.tuples(SEED),
    "zero_grad": st.tuples(st.booleans()),
    "grad_mul": st.tuples(st.sampled_from([0.5, -1.0, 3.0])),
    "grad_none": st.tuples(K),
    "edit": st.tuples(K, st.sampled_from(["lr", "momentum", "weight_decay", "maximize"]), SEED),
    "edit_tensor": st.tuples(K, st.sampled_from(["lr", "momentum", "weight_decay"]), SEED,
                             st.sampled_from([torch.float32, torch.float64]), st.booleans()),
    "write": st.tuples(K, SEED),
    "write_scaled": st.tuples(K, st.sampled_from([0.5, -3.0])),
    "add_group": st.tuples(SEED, st.sampled_from([(1,), (9,), (4, 3), (2, 3, 2, 3)])),
    "relayout": st.tuples(K),
    "retype": st.tuples(K),
    "save_load": st.just(()),
    "deepcopy": st.just(()),
    "reset_state": st.just(()),
    "scaler_step": st.tuples(st.booleans()),
    "scaler_train": st.tuples(SEED, st.booleans()),
}
WEIGHTS = {"step": 4, "train": 4, "grads": 3, "scaler_step": 2, "scaler_train": 4}
NAMES = st.sampled_from([n for n in sorted(OPS) for _ in range(WEIGHTS.get(n, 1))])


def _sync_grads(tw):
    """The twins' gradients: ours in the twin's dtype (widened for master weights; None where
    ours is None)."""
    for p, t in zip(tw.ours, tw.twin):
        t.grad = None if p.grad is None else p.grad.detach().to(t.dtype).clone()


class SrReference(torch.optim.Optimizer):
    """stochastic_rounding=True written from its contract: per bf16 parameter with a gradient,
    its step count (state "sr_step") goes up by one and reference.sgd_sr_reference_step steps
    it with sr_key(sr_seed, that count, its position among all the parameters); an fp32
    parameter takes torch's functional sgd. ema: the Momentum form (dampening = momentum, the
    buffer starting at zero)."""

    def __init__(self, params, ema, sr_seed, **h):
        # in the groups: torch's Optimizer pickles (deep copies) only defaults, state and groups
        defaults = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                        maximize=False, ema=ema, sr_seed=sr_seed)
        defaults.update(h)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        pos = 0
        for group in self.param_groups:
            m, ema = group["momentum"], group["ema"]
            h = dict(lr=group["lr"], momentum=m, weight_decay=group["weight_decay"],
                     maximize=group["maximize"], dampening=m if ema else group["dampening"],
                     nesterov=False if ema else group["nesterov"])
            for p in group["params"]:
                k, pos = pos, pos + 1
                if p.grad is None:
                    continue
                st = self.state[p]
                buf = st.get("momentum_buffer")
                if ema and buf is None and m != 0:
                    buf = torch.zeros_like(p)
                if p.dtype is torch.bfloat16:
                    st["sr_step"] = st.get("sr_step", 0) + 1
                    (buf,) = sgd_sr_reference_step([p], [p.grad], [buf],
                                                   [sr_key(group["sr_seed"], st["sr_step"], k)],
                                                   **h)
                else:
                    bufs = [buf]
                    _torch_sgd([p], [p.grad], bufs, foreach=False, **h)
                    buf = bufs[0]
                if m != 0:
                    st["momentum_buffer"] = buf


class SrTwins:
    """MasterTwins' parameters and groups, stepped with stochastic_rounding=True; the twins are
    bf16 (fp32 where ours are) and SrReference steps them."""

    def __init__(self, flat, kind, h, seed):
        mt = MasterTwins(flat, kind, h, seed, sizes=SIZES)  # (its parameters and groups)
        self.ours = mt.ours
        self.twin = [torch.nn.Parameter(p.detach().clone()) for p in self.ours]
        groups = lambda ps: [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.02}]  # noqa: E731
        h = h or dict(lr=0.01, momentum=0.9, weight_decay=1e-2)
        cls = momentum_cuda.SGD if kind == "sgd" else momentum_cuda.Momentum
        self.opt = cls(groups(self.ours), flat=flat, stochastic_rounding=True,
                       sr_seed=seed + 3, **h)
        self.topt = SrReference(groups(self.twin), kind == "ema", seed + 3, **h)
        self.gen = torch.Generator().manual_seed(seed + 1)

    def grads(self):
        gs = fresh_grads(self.ours, self.gen)
        for o in (self.opt, self.topt):
            o.zero_grad()
        for p, t, g in zip(self.ours, self.twin, gs):
            p.grad, t.grad = g.clone(), g.clone()

    def check(self, what=""):
        for i, (p, t) in enumerate(zip(self.ours, self.twin)):
            assert torch.equal(bits(p), bits(t)), f"{what} param {i}"
            a, b = self.opt.state.get(p, {}), self.topt.state.get(t, {})
            assert a.get("sr_step") == b.get("sr_step"), f"{what} sr_step {i}"
            a, b = a.get("momentum_buffer"), b.get("momentum_buffer")
            assert (a is None) == (b is None), f"{what} buffer presence {i}"
            if b is not None:
                assert a.dtype == b.dtype and torch.equal(bits(a), bits(b)), f"{what} buffer {i}"


class QmomReference(torch.optim.Optimizer):
    """momentum_dtype written from its contract: each parameter of a group with a
    momentum_dtype takes reference.sgd_momentum_dtype_reference_step with its narrow buffer
    (state "momentum_buffer", and "momentum_scales" for int8; zeros for the EMA form's first
    step); the others torch's functional sgd."""

    def __init__(self, params, ema, **h):
        defaults = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                        maximize=False, ema=ema, momentum_dtype=None)
        defaults.update(h)
        super().__init__(params, defaults)

    def load_state_dict(self, state_dict):
        """torch's, but the narrow buffers keep their dtypes (torch casts every state tensor to
        its parameter's dtype, int8 codes too)."""
        super().load_state_dict(state_dict)
        ps = [p for g in self.param_groups for p in g["params"]]
        for i, st in state_dict["state"].items():
            for key, v in st.items():
                if isinstance(v, torch.Tensor) and v.dtype in (torch.int8, torch.bfloat16):
                    self.state[ps[i]][key] = v.clone()

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            m, ema, dtype = group["momentum"], group["ema"], group["momentum_dtype"]
            h = dict(lr=group["lr"], momentum=m, weight_decay=group["weight_decay"],
                     maximize=group["maximize"], dampening=m if ema else group["dampening"],
                     nesterov=False if ema else group["nesterov"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                buf, sc = st.get("momentum_buffer"), st.get("momentum_scales")
                if dtype is None:
                    if ema and buf is None and m != 0:
                        buf = torch.zeros_like(p)
                    bufs = [buf]
                    _torch_sgd([p], [p.grad], bufs, foreach=False, **h)
                    if m != 0:
                        st["momentum_buffer"] = bufs[0]
                    continue
                if ema and buf is None and m != 0:
                    buf = torch.zeros_like(p, dtype=dtype)
                    sc = torch.zeros((p.numel() + QBLOCK - 1) // QBLOCK)
                elif dtype is torch.int8 and buf is not None and buf.stride() != p.stride():
                    # the parameter's memory order changed: the blocks are formed again from
                    # the values, on its layout (the contract; bf16 keeps its values anyway)
                    buf, sc = quantize_momentum(
                        torch.empty_like(p).copy_(dequantize_momentum(buf, sc)))
                (buf,), scs = sgd_momentum_dtype_reference_step(
                    [p], [p.grad], [buf], [sc] if dtype is torch.int8 else None, **h)
                if m != 0:
                    st["momentum_buffer"] = buf
                    if scs is not None:
                        st["momentum_scales"] = scs[0]


class QmomTwins:
    """MasterTwins' shapes in fp32, the first group with momentum_dtype=torch.int8, the second
    with torch.bfloat16; fp32 twins stepped by QmomReference."""

    def __init__(self, flat, kind, h, seed):
        mt = MasterTwins(flat, kind, h, seed, sizes=SIZES)  # (its shapes and values)
        self.ours = [torch.nn.Parameter(p.detach().float()) for p in mt.ours]
        self.twin = [torch.nn.Parameter(p.detach().clone()) for p in self.ours]
        groups = lambda ps: [{"params": ps[:3], "momentum_dtype": torch.int8},  # noqa: E731
                             {"params": ps[3:], "lr": 0.02, "momentum_dtype": torch.bfloat16}]
        h = h or dict(lr=0.01, momentum=0.9, weight_decay=1e-2)
        cls = momentum_cuda.SGD if kind == "sgd" else momentum_cuda.Momentum
        self.opt = cls(groups(self.ours), flat=flat, **h)
        self.topt = QmomReference(groups(self.twin), kind == "ema", **h)
        self.gen = torch.Generator().manual_seed(seed + 1)

    grads = SrTwins.grads

    def check(self, what=""):
        for i, (p, t) in enumerate(zip(self.ours, self.twin)):
            assert torch.equal(bits(p), bits(t)), f"{what} param {i}"
            a, b = self.opt.state.get(p, {}), self.topt.state.get(t, {})
            for key in ("momentum_buffer", "momentum_scales"):
                x, y = a.get(key), b.get(key)
                assert (x is None) == (y is None), f"{what} {key} presence {i}"
                if y is not None:
                    assert x.dtype == y.dtype and torch.equal(bits(x), bits(y)), \
                        f"{what} {key} {i}"


def _scaler_step(tw, overflow):
    """GradScaler("cpu").step and update on ours, over the gradients as they are (an inf in the
    first one where `overflow`). Expected, from torch's own op on our gradients: GradScaler's
    unscale (torch._amp_foreach_non_finite_check_and_unscale_ per dtype with
    scale.double().reciprocal().float(), as GradScaler.unscale_) and its found_inf. Our
    gradients must end as those unscaled ones; the twin takes them widened and steps unless
    found_inf (as GradScaler skips torch's step). Without gradients GradScaler raises (no inf
    check recorded): not drawn then."""
    had = [p for p in tw.ours if p.grad is not None]
    gs = [p.grad for p in had]
    if not gs:
        return
    if getattr(tw, "scaler", None) is None:
        tw.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        tw.scaler.scale(torch.ones(()))  # (GradScaler makes its scale tensor here)
    if overflow:
        gs[0][(0,) * gs[0].dim()] = float("inf")
    want = [g.clone() for g in gs]
    found = torch.zeros(())
    inv = tw.scaler._scale.double().reciprocal().float()
    for dtype in {g.dtype for g in want}:
        torch._amp_foreach_non_finite_check_and_unscale_(
            [g for g in want if g.dtype == dtype], found, inv)
    tw.scaler.step(tw.opt)
    tw.scaler.update()
    # (.grad, not the tensors read above: a step that lays a group out again puts a gradient
    # into its flat buffer, and .grad is then the flat view)
    for i, (p, w) in enumerate(zip(had, want)):
        assert torch.equal(bits(p.grad), bits(w)), f"gradient {i} not unscaled as GradScaler does"
    if overflow:  # not stepped on later (a master's NaN keeps no sign or payload: README)
        had[0].grad[(0,) * had[0].grad.dim()] = 0.0
    _sync_grads(tw)
    if found.item() == 0:
        tw.topt.step()


def _edit_value(kind, key, seed):
    gen = torch.Generator().manual_seed(seed)
    r = float(torch.rand((), generator=gen))
    if key == "maximize":
        return r < 0.5
    if key == "momentum":
        return 0.5 + 0.45 * r if kind == "ema" else [0.0, 0.9, r][int(3 * r) % 3]
    return {"lr": 0.05 * r, "weight_decay": 0.01 * r}[key]


def apply(tw, kind, op):
    name, *a = op
    ours, twin = tw.ours, tw.twin
    if name == "grads":
        gen = torch.Generator().manual_seed(a[0])
        for p, g in zip(ours, fresh_grads(ours, gen)):
            p.grad = g if p.grad is None else p.grad.add_(g)  # accumulates in bf16 on our side
        _sync_grads(tw)
    elif name == "step":
        tw.opt.step()
        tw.topt.step()
    elif name == "train":
        tw.gen = torch.Generator().manual_seed(a[0])
        tw.grads()
        tw.opt.step()
        tw.topt.step()
    elif name == "zero_grad":
        tw.opt.zero_grad(set_to_none=a[0])
        tw.topt.zero_grad(set_to_none=a[0])
    elif name == "grad_mul":
        for p in ours:
            if p.grad is not None:
                p.grad.mul_(a[0])
        _sync_grads(tw)
    elif name == "grad_none":
        ours[a[0] % len(ours)].grad = None
        _sync_grads(tw)
    elif name == "edit":
        k = a[0] % len(tw.opt.param_groups)
        value = _edit_value(kind, a[1], a[2])
        if a[1] == "momentum" and value == 0 and tw.opt.param_groups[k].get("nesterov"):
            return
        tw.opt.param_groups[k][a[1]] = tw.topt.param_groups[k][a[1]] = value
    elif name == "edit_tensor":  # ours a tensor, filled in place where a[4] and it is one
        k = a[0] % len(tw.opt.param_groups)
        value = _edit_value(kind, a[1], a[2])
        if a[1] == "momentum" and value == 0 and tw.opt.param_groups[k].get("nesterov"):
            return
        held = tw.opt.param_groups[k][a[1]]
        if a[4] and isinstance(held, torch.Tensor) and held.dtype == a[3]:
            held.fill_(value)
        else:
            tw.opt.param_groups[k][a[1]] = torch.tensor(value, dtype=a[3])
        tw.topt.param_groups[k][a[1]] = float(torch.tensor(value, dtype=a[3]))
    elif name in ("write", "write_scaled"):
        k = a[0] % len(ours)
        with torch.no_grad():
            if name == "write":
                gen = torch.Generator().manual_seed(a[1])
                ours[k].copy_(torch.randn(ours[k].shape, generator=gen).to(ours[k].dtype))
            else:
                ours[k].copy_(ours[k] * a[1])
            twin[k].copy_(ours[k].to(twin[k].dtype))
    elif name == "relayout":  # model.to(memory_format=...): the dims' memory order reversed,
        # or back to contiguous (new memory either way)
        many = [i for i, p in enumerate(ours) if sum(n > 1 for n in p.shape) > 1]
        if not many:
            return
        k = many[a[0] % len(many)]
        dims = list(reversed(range(ours[k].dim())))
        with torch.no_grad():
            x = ours[k].data
            ours[k].data = (x.permute(dims).contiguous().permute(dims) if x.is_contiguous()
                            else x.contiguous())
            # a master restarts from the parameter (it moved): the fp32 twin is given its value
            twin[k].data = torch.empty_like(ours[k], dtype=twin[k].dtype).copy_(ours[k])
    elif name == "retype" and isinstance(tw, MasterTwins):
        # model.to(dtype) on one master-weights parameter, bf16 <-> fp16: the parameter and its
        # gradient converted as nn.Module._apply does; the master restarts (the parameter
        # moved, in the other mode), the fp32 twin is given its value, the fp32 buffer stays
        k = a[0] % len(ours)
        p = ours[k]
        new = {torch.bfloat16: torch.float16, torch.float16: torch.bfloat16}.get(p.dtype)
        if new is None:
            return
        with torch.no_grad():
            g, p.grad = p.grad, None
            p.data = p.data.to(new)
            if g is not None:
                p.grad = g.to(new)
            twin[k].copy_(p.float())
        _sync_grads(tw)
    elif name == "add_group":
        gen = torch.Generator().manual_seed(a[0])
        p = torch.nn.Parameter(torch.randn(a[1], generator=gen).to(ours[0].dtype))
        t = torch.nn.Parameter(p.detach().to(twin[0].dtype).clone())
        ours.append(p)
        twin.append(t)
        tw.opt.add_param_group({"params": [p], "lr": 0.03})
        tw.topt.add_param_group({"params": [t], "lr": 0.03})
    elif name == "save_load":
        tw.opt.load_state_dict(copy.deepcopy(tw.opt.state_dict()))
        tw.topt.load_state_dict(copy.deepcopy(tw.topt.state_dict()))
    elif name == "deepcopy":
        tw.ours, tw.opt = copy.deepcopy((tw.ours, tw.opt))
        tw.twin, tw.topt = copy.deepcopy((tw.twin, tw.topt))
    elif name == "scaler_step":
        _scaler_step(tw, a[0])
    elif name == "scaler_train":
        tw.gen = torch.Generator().manual_seed(a[0])
        tw.grads()
        _scaler_step(tw, a[1])
    elif name == "reset_state" and isinstance(tw, (SrTwins, QmomTwins)):
        tw.opt.state.clear()
        tw.topt.state.clear()


@st.composite
def cases(d):
    kind = d(st.sampled_from(["sgd", "sgd", "ema"]))
    h = d(HYPER[kind])
    if kind == "sgd" and d(st.booleans()) and h["momentum"] and not h["dampening"]:
        h["nesterov"] = True
    ops = d(st.lists(st.tuples(NAMES).flatmap(lambda n: OPS[n[0]].map(lambda a: (n[0], *a))),
                     min_size=3, max_size=12))
    return kind, h, d(st.booleans()), d(SEED), ops


SETTINGS = settings(max_examples=N_SEQUENCES, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                    print_blob=False)


@SETTINGS
@given(cases())
def test_master_weight_sequences(case):
    _run(lambda *a: MasterTwins(*a, sizes=SIZES), case)


@SETTINGS
@given(cases())
def test_stochastic_rounding_sequences(case):
    _run(SrTwins, case)


@SETTINGS
@given(cases())
def test_fp16_master_weight_sequences(case):
    _run(lambda *a: MasterTwins(*a, dtype=torch.float16, sizes=SIZES), case)


@SETTINGS
@given(cases())
def test_momentum_dtype_sequences(case):
    _run(QmomTwins, case)


def _run(twins, case):
    kind, h, flat, seed, ops = case
    tw = twins(flat, kind, h, seed)
    for i, op in enumerate(ops):
        apply(tw, kind, op)
        what = f"after op {i} {op} of {ops} (kind={kind}, h={h}, flat={flat}, seed={seed})"
        tw.check(what)
        for p, t in zip(tw.ours, tw.twin):
            assert (p.grad is None) == (t.grad is None), f"{what}: gradient presence"
