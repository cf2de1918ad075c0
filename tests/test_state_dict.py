"""state_dict compatibility with torch.optim.SGD (both directions, in memory and through
torch.save/torch.load), torch's format, lr schedulers, and Momentum's own round trip."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch.optim.lr_scheduler import OneCycleLR, StepLR

import momentum_cuda
from momentum_cuda.reference import MomentumReference
from conftest import (assert_same, backward_grads, flat_paths, fresh_grads, make_values,
                      momentum_buffer, run_steps, storage_ptr, twin_params)

HYPERS = {
    "nesterov-wd": dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    "dampening-max": dict(momentum=0.8, dampening=0.3, maximize=True),
}
SIZES_A = [97, (9, 11), 1, 0]
SIZES_B = [3, (5, 4)]


def _groups(params, h):
    """Two groups: the first with the test's hyper-parameters, the second with others."""
    k = len(SIZES_A)
    return [dict(params=params[:k], **h),
            dict(params=params[k:], lr=0.03, momentum=0.5, weight_decay=1e-3)]


def _values(dtype, seed):
    return make_values(SIZES_A, dtype, seed) + make_values(SIZES_B, dtype, seed + 1)


def _transport(sd, how):
    if how == "memory":
        return copy.deepcopy(sd)  # torch's load_state_dict keeps the tensors it is given
    f = io.BytesIO()
    torch.save(sd, f)
    f.seek(0)
    return torch.load(f)


def _make(kind, params, h, flat=True):
    if kind == "ours":
        return momentum_cuda.SGD(_groups(params, h), lr=0.1, flat=flat)
    return torch.optim.SGD(_groups(params, h), lr=0.1, foreach=False)


def _continue(runs, steps, seed, frozen=(), skip_at=None):
    """runs: [(optimizer, params)]; identical fresh grads for all, compared to runs[0] after
    every step. skip_at: (step, index) pairs whose parameter gets no gradient."""
    gen = torch.Generator().manual_seed(seed)
    opt0, ps0 = runs[0]
    for step in range(steps):
        grads = fresh_grads(ps0, gen)
        for opt, ps in runs:
            opt.zero_grad()  # the usual loop: zero_grad, backward, step
            live = [i for i in range(len(ps))
                    if i not in frozen and not (skip_at and (step, i) in skip_at)]
            for i, p in enumerate(ps):
                if i not in live:
                    p.grad = None
            backward_grads([ps[i] for i in live], [grads[i] for i in live])
            opt.step()
        for opt, ps in runs[1:]:
            assert_same(ps0, ps, opt0, opt, what=f"step {step + 1} ({type(opt).__name__}):")


@pytest.mark.parametrize("how", ["memory", "file"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hk", list(HYPERS))
@pytest.mark.parametrize("direction", ["ours->torch", "torch->ours"])
def test_state_dict_transfer(direction, hk, dtype, flat, how):
    h = HYPERS[hk]
    values = _values(dtype, seed=501)
    n = len(values)
    ours, ref = twin_params(values)
    opt = _make("ours", ours, h, flat)
    topt = _make("torch", ref, h)
    _continue([(opt, ours), (topt, ref)], steps=5, seed=502, skip_at={(0, 1)})
    src_opt, src_params = (opt, ours) if direction == "ours->torch" else (topt, ref)
    sd = _transport(src_opt.state_dict(), how)
    # the destination: fresh parameters with the source's current values, an optimizer built
    # with OTHER hyper-parameters (the loaded param_groups must win)
    dst_params = [p.detach().clone().requires_grad_() for p in src_params]
    other = dict(momentum=0.3, weight_decay=0.0)
    if direction == "ours->torch":
        dst = torch.optim.SGD(_groups(dst_params, other), lr=0.5, foreach=False)
    else:
        dst = momentum_cuda.SGD(_groups(dst_params, other), lr=0.5, flat=flat)
    dst.load_state_dict(sd)
    for g_dst, g_src in zip(dst.param_groups, src_opt.param_groups):
        for key in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"):
            assert g_dst[key] == g_src[key]
    # param 1 skipped its first step (state created later); every param has a buffer now
    assert all(momentum_buffer(dst, p) is not None for p in dst_params[:n])
    _continue([(opt, ours), (topt, ref), (dst, dst_params)], steps=6, seed=503)
    if direction == "torch->ours" and flat:
        # the loaded buffers were copied into the flat layout: one kernel call per bucket
        assert flat_paths(dst) == ["flat", "flat"]
        bufs = [momentum_buffer(dst, p) for p in dst_params[:len(SIZES_A)]]
        assert len({storage_ptr(b) for b in bufs}) == 1


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_load_before_any_step_and_frozen_params(flat):
    """A checkpoint from torch with a frozen parameter (no state) and a parameter that never
    got a gradient (no buffer) loads into a fresh momentum_cuda.SGD: those stay stateless."""
    values = _values(torch.float32, seed=511)
    frozen = {2}
    flags = [i not in frozen for i in range(len(values))]
    ours, ref = twin_params(values, requires_grad=flags)
    topt = _make("torch", ref, HYPERS["nesterov-wd"])
    _continue([(topt, ref)], steps=3, seed=512, frozen=frozen,
              skip_at={(s, 4) for s in range(3)})
    sd = topt.state_dict()
    assert set(sd["state"]) == set(range(len(values))) - {2, 4}
    for p, q in zip(ours, ref):
        with torch.no_grad():
            p.copy_(q)
    opt = _make("ours", ours, dict(momentum=0.1), flat)
    opt.load_state_dict(copy.deepcopy(sd))
    assert momentum_buffer(opt, ours[2]) is None and momentum_buffer(opt, ours[4]) is None
    _continue([(topt, ref), (opt, ours)], steps=6, seed=513, frozen=frozen)
    assert momentum_buffer(opt, ours[2]) is None


@pytest.mark.parametrize("momentum", [0.9, 0.0])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_state_dict_format_equals_torch(flat, momentum):
    """Same keys and values as torch.optim.SGD's state_dict after the same training: state per
    parameter index (only where torch has state), momentum_buffer only, same param_groups."""
    values = _values(torch.float32, seed=521)
    frozen = {3}
    flags = [i not in frozen for i in range(len(values))]
    ours, ref = twin_params(values, requires_grad=flags)
    h = dict(momentum=momentum, weight_decay=1e-2)
    opt = momentum_cuda.SGD(_groups(ours, h), lr=0.1, flat=flat)
    topt = torch.optim.SGD(_groups(ref, h), lr=0.1)  # same arguments as ours
    _continue([(opt, ours), (topt, ref)], steps=3, seed=522, frozen=frozen,
              skip_at={(0, 5), (1, 5), (2, 5)})
    a, b = opt.state_dict(), topt.state_dict()
    assert set(a) == set(b) == {"state", "param_groups"}
    assert sorted(a["state"]) == sorted(b["state"]), (
        f"state indices: ours {sorted(a['state'])}, torch {sorted(b['state'])}")
    for k in b["state"]:
        assert set(a["state"][k]) == set(b["state"][k]) == {"momentum_buffer"}
        assert torch.equal(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"])
    assert a["param_groups"] == b["param_groups"]


# ---- lr schedulers -----------------------------------------------------------------------------
def _sched_run(make_sched, dtype, flat, h, steps=20):
    values = _values(dtype, seed=531)
    ours, ref = twin_params(values)
    opt = momentum_cuda.SGD(_groups(ours, h), lr=0.1, flat=flat)
    topt = torch.optim.SGD(_groups(ref, h), lr=0.1, foreach=False)
    s_ours, s_ref = make_sched(opt), make_sched(topt)
    seen = []

    def sched_step(step):
        if step > 0:
            s_ours.step()
            s_ref.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in topt.param_groups]
        assert ([g["momentum"] for g in opt.param_groups]
                == [g["momentum"] for g in topt.param_groups])
        seen.append((opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]))

    run_steps(opt, ours, topt, ref, steps=steps, seed=532, before_step=sched_step,
              expect_path="flat" if flat else "per-tensor")
    return seen


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_step_lr(dtype, flat):
    seen = _sched_run(lambda o: StepLR(o, step_size=3, gamma=0.5), dtype, flat,
                      dict(momentum=0.9, nesterov=True, weight_decay=1e-2))
    assert len({lr for lr, _ in seen}) == 7  # 20 steps, a new lr every 3


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_cycle_lr_cycles_momentum(dtype, flat):
    seen = _sched_run(lambda o: OneCycleLR(o, max_lr=[0.2, 0.05], total_steps=20,
                                           cycle_momentum=True, base_momentum=0.8,
                                           max_momentum=0.95),
                      dtype, flat, dict(momentum=0.9, dampening=0.1, weight_decay=1e-2))
    moms = [m for _, m in seen]
    assert len(set(moms)) > 10 and min(moms) < 0.81 and max(moms) > 0.94  # really cycling


def test_one_cycle_lr_with_momentum_ema():
    values = make_values([97, (9, 11), 3], torch.float32, seed=541)
    ours, ref = twin_params(values)
    opt = momentum_cuda.Momentum(ours, lr=0.1, momentum=0.9, weight_decay=1e-2)
    topt = MomentumReference(ref, lr=0.1, momentum=0.9, weight_decay=1e-2)
    kw = dict(max_lr=0.1, total_steps=15, cycle_momentum=True, base_momentum=0.8,
              max_momentum=0.95)
    s1, s2 = OneCycleLR(opt, **kw), OneCycleLR(topt, **kw)

    def sched_step(step):
        if step > 0:
            s1.step()
            s2.step()

    run_steps(opt, ours, topt, ref, steps=15, seed=542, before_step=sched_step,
              expect_path="flat")


# ---- Momentum's own round trip ----------------------------------------------------------------
@pytest.mark.parametrize("how", ["memory", "file"])
@pytest.mark.parametrize("flat_src,flat_dst", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_momentum_state_dict_round_trip(dtype, flat_src, flat_dst, how):
    values = make_values([97, (9, 11), 1, 3], dtype, seed=551)
    ours, ref = twin_params(values)
    h = dict(lr=0.05, momentum=0.8, weight_decay=1e-2, maximize=True)
    opt = momentum_cuda.Momentum(ours, flat=flat_src, **h)
    topt = MomentumReference(ref, **h)
    _continue([(opt, ours), (topt, ref)], steps=5, seed=552)
    sd = _transport(opt.state_dict(), how)
    assert set(sd["state"]) == {0, 1, 2, 3}
    assert all(set(s) == {"momentum_buffer"} for s in sd["state"].values())
    dst_params = [p.detach().clone().requires_grad_() for p in ours]
    dst = momentum_cuda.Momentum(dst_params, lr=0.5, momentum=0.5, flat=flat_dst)
    dst.load_state_dict(sd)
    assert dst.param_groups[0]["momentum"] == 0.8 and dst.param_groups[0]["lr"] == 0.05
    _continue([(topt, ref), (opt, ours), (dst, dst_params)], steps=6, seed=553)
    if flat_dst:
        assert flat_paths(dst) == ["flat"]
