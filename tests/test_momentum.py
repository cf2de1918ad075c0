"""momentum_cuda.Momentum (EMA form) against momentum_cuda.reference.MomentumReference, bit for
bit, plus a check of the reference formula itself against an fp64 computation of the EMA with a
derived error bound."""
from __future__ import annotations

import pytest
import torch

import momentum_cuda
from momentum_cuda.reference import MomentumReference
from conftest import (BIG, DTYPE_IDS, DTYPES, SIZES, STEPS, assert_same, flat_paths,
                      fresh_grads, make_values, momentum_buffer, run_steps, twin_params,
                      write_grads)


def _pair(ours, ref, flat, lr=0.1, momentum=0.9, **h):
    opt = momentum_cuda.Momentum(ours, lr=lr, momentum=momentum, flat=flat, **h)
    topt = MomentumReference(ref, lr=lr, momentum=momentum, **h)
    return opt, topt


@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("wd", [0.0, 1e-2], ids=["wd0", "wd1e-2"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_momentum_vs_reference(dtype, flat, wd, maximize, isa):
    ours, ref = twin_params(make_values(SIZES, dtype, seed=201))
    opt, topt = _pair(ours, ref, flat, weight_decay=wd, maximize=maximize)
    assert opt.backend == "cpu"
    run_steps(opt, ours, topt, ref, steps=STEPS, seed=202,
              expect_path="flat" if flat else "per-tensor")
    if flat:
        assert len(opt.last_step) == 1 and opt.last_step[0]["tensors"] == len(SIZES)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_momentum_big(dtype, flat):
    ours, ref = twin_params(make_values([BIG, 97], dtype, seed=211))
    opt, topt = _pair(ours, ref, flat, lr=0.05, momentum=0.8, weight_decay=1e-2, maximize=True)
    run_steps(opt, ours, topt, ref, steps=STEPS, seed=212)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_momentum_groups_and_frozen(flat):
    dt = [torch.float32, torch.bfloat16, torch.float16]
    va = make_values([97, 3, (97, 33)], dt[0], seed=221) + make_values([5], dt[1], seed=222)
    vb = make_values([1, 31], dt[2], seed=223) + make_values([7, 0], dt[0], seed=224)
    fa = [True, False, True, True]  # index 1 frozen
    a1, b1 = twin_params(va, requires_grad=fa)
    a2, b2 = twin_params(vb)
    ga = [dict(params=a1, lr=0.2, momentum=0.5, weight_decay=1e-2),
          dict(params=a2, momentum=0.99, maximize=True)]
    gb = [dict(params=b1, lr=0.2, momentum=0.5, weight_decay=1e-2),
          dict(params=b2, momentum=0.99, maximize=True)]
    opt = momentum_cuda.Momentum(ga, lr=0.03, momentum=0.9, flat=flat)
    topt = MomentumReference(gb, lr=0.03, momentum=0.9)
    run_steps(opt, a1 + a2, topt, b1 + b2, steps=STEPS, seed=225, skip={5})
    assert torch.equal(a1[1], va[1]) and momentum_buffer(opt, a1[1]) is None
    assert torch.equal(a2[1], vb[1]) and momentum_buffer(opt, a2[1]) is None
    if flat:  # buckets: (g0, fp32), (g0, bf16), (g1, fp16), (g1, fp32); index 5 has no grad,
        # so (g1, fp16) holds index 4 only and (g1, fp32) holds 6 and 7
        assert flat_paths(opt) == ["flat"] * 4


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_first_step_is_one_minus_b_times_g(dtype, flat):
    """v starts at zero: after step 1, v = (1 - b) * g exactly as the reference computes it,
    i.e. one rounding of g times the alpha 1-b (alpha rounded to bf16/fp16 first on the CPU: the
    product of two bf16/fp16 numbers is exact in fp32), and p = p - lr * v."""
    b = 0.9
    ours, ref = twin_params(make_values(SIZES, dtype, seed=231))
    p0 = [p.detach().clone() for p in ours]
    opt, topt = _pair(ours, ref, flat, lr=0.1, momentum=b)
    grads = fresh_grads(ours, torch.Generator().manual_seed(232))
    write_grads(opt, ours, grads)
    for q, g in zip(ref, grads):
        q.grad = g.clone()
    opt.step()
    topt.step()
    assert_same(ours, ref, opt, topt)
    narrow = dtype in (torch.bfloat16, torch.float16)
    alpha = float(torch.tensor(1 - b, dtype=dtype)) if narrow else 1 - b
    for p, q0, g in zip(ours, p0, grads):
        v = momentum_buffer(opt, p)
        if narrow:
            expect = (g.float() * alpha).to(dtype)  # exact product, one rounding
        else:
            expect = g * (1 - b)  # the scalar rounded once to the dtype, one rounding
        assert torch.equal(v, expect)
        assert torch.equal(p, q0.add(v, alpha=-0.1))


@pytest.mark.parametrize("momentum", [0, 0.0, 1, 1.0, -0.1, 1.5])
def test_invalid_momentum(momentum):
    params = [torch.randn(3, requires_grad=True)]
    with pytest.raises(ValueError):
        momentum_cuda.Momentum(params, momentum=momentum)


def test_invalid_momentum_set_later_raises_at_step():
    """A scheduler (or the user) may change momentum in a group: an invalid value must raise at
    the step, not silently compute something."""
    p = torch.randn(5, requires_grad=True)
    opt = momentum_cuda.Momentum([p], lr=0.1, momentum=0.9)
    p.grad = torch.randn(5)
    opt.param_groups[0]["momentum"] = 1.0
    before = p.detach().clone()
    with pytest.raises(ValueError):
        opt.step()
    assert torch.equal(p, before)


def test_invalid_lr_and_weight_decay():
    params = [torch.randn(3, requires_grad=True)]
    with pytest.raises(ValueError):
        momentum_cuda.Momentum(params, lr=-1.0)
    with pytest.raises(ValueError):
        momentum_cuda.Momentum(params, weight_decay=-1e-3)


# ---- the EMA against an fp64 computation, with a derived tolerance --------------------------
_UNIT = {  # (u_op: opmath unit roundoff, u_st: extra unit roundoff of storing, eta: underflow)
    torch.float32: (2.0**-24, 0.0, 2.0**-150),
    torch.bfloat16: (2.0**-24, 2.0**-8, 2.0**-134),
    torch.float16: (2.0**-24, 2.0**-11, 2.0**-25),
}


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_ema_against_fp64_with_derived_bound(dtype, flat):
    """p_k, v_k from Momentum versus the EMA evaluated in fp64 from the same stored inputs:
        v_k = b v_{k-1} + (1 - b) g_k,  v_0 = 0;   p_k = p_{k-1} - lr v_k.

    Error model (elementwise, first order plus every cross term kept, so it is an upper bound):
    each op result is rounded once to fp32 (opmath, unit roundoff u_op = 2^-24) and then to the
    storage dtype (u_st: 0 for fp32, 2^-8 for bf16, 2^-11 for fp16), so one rounded op has a
    relative error of at most r = u_op + u_st + u_op*u_st, plus an absolute eta for underflow
    (half the smallest subnormal gap of the storage dtype). The scalars: b is rounded to fp32
    (relative u_op); the alphas 1-b and -lr are rounded to fp32 and, for bf16/fp16, to the
    storage dtype (relative r_a = r). torch's vectorized add is one rounding of x + alpha*y, its
    scalar tail rounds the product first; the bound covers both by adding the product rounding.
    With Ev, Ep the bounds on |v^ - v|, |p^ - p| (exact inputs g_k, p_0: Ev = Ep = 0 at k = 0):
        m^ = round(b^ v^):        e_m <= (1+u_op) b Ev + u_op b |v| + r (1+u_op) b (|v| + Ev)
        t^ = alpha^ g (rounded):  e_t <= r_a (1-b)|g| + r (1+r_a)(1-b)|g|
        v^ = round(m^ + t^):      Ev' = e_m + e_t + r (|v'| + e_m + e_t) + eta
        s^ = alpha^ v^ (rounded): e_s <= lr Ev' + r_a lr (|v'| + Ev') + r (1+r_a) lr (|v'| + Ev')
        p^ = round(p^ + s^):      Ep' = Ep + e_s + r (|p'| + Ep + e_s) + eta
    The fp64 evaluation adds at most a few 2^-53 relative per step: 1e-14 * (|p| + lr|v|) * k
    covers it. The kernel must stay inside this bound at every step; a wrong formula (a missing
    1-b, a dampening applied twice, the wrong lr) lands far outside it."""
    b, lr, steps = 0.9, 0.1, 12
    u_op, u_st, eta = _UNIT[dtype]
    r = u_op + u_st + u_op * u_st
    r_a = r
    values = make_values([4097, (97, 33)], dtype, seed=241)
    ours, _ = twin_params(values)
    opt = momentum_cuda.Momentum(ours, lr=lr, momentum=b, flat=flat)
    gen = torch.Generator().manual_seed(242)
    P = [v.double() for v in values]
    V = [torch.zeros_like(x) for x in P]
    Ep = [torch.zeros_like(x) for x in P]
    Ev = [torch.zeros_like(x) for x in P]
    worst = 0.0
    for k in range(1, steps + 1):
        grads = fresh_grads(ours, gen)
        write_grads(opt, ours, grads)
        opt.step()
        for i, (p, g) in enumerate(zip(ours, grads)):
            g64 = g.double().abs()
            Vprev = V[i].abs() + Ev[i]
            V[i] = b * V[i] + (1 - b) * g.double()
            e_m = (1 + u_op) * b * Ev[i] + u_op * b * (Vprev - Ev[i]) + r * (1 + u_op) * b * Vprev
            e_t = r_a * (1 - b) * g64 + r * (1 + r_a) * (1 - b) * g64
            Ev[i] = e_m + e_t + r * (V[i].abs() + e_m + e_t) + eta
            Vk = V[i].abs() + Ev[i]
            P[i] = P[i] - lr * V[i]
            e_s = lr * Ev[i] + r_a * lr * Vk + r * (1 + r_a) * lr * Vk
            Ep[i] = Ep[i] + e_s + r * (P[i].abs() + Ep[i] + e_s) + eta
            slack = 1e-14 * k * (P[i].abs() + lr * V[i].abs())
            v_hat = momentum_buffer(opt, p).double()
            err_v = (v_hat - V[i]).abs()
            err_p = (p.detach().double() - P[i]).abs()
            assert (err_v <= Ev[i] + slack).all(), (
                f"step {k}: |v - v_fp64| {err_v.max().item():.3g} exceeds the bound at "
                f"{(err_v - Ev[i]).argmax().item()}")
            assert (err_p <= Ep[i] + slack).all(), (
                f"step {k}: |p - p_fp64| {err_p.max().item():.3g} exceeds the bound at "
                f"{(err_p - Ep[i]).argmax().item()}")
            worst = max(worst, (err_p / (Ep[i] + slack)).max().item())
            # the bound is not vacuous: a small fraction of |p| (r ~ 0.4 % for bf16)
            assert (Ep[i] <= 40 * r * (P[i].abs() + 1)).all()
    # the computation really rounds (so the bound is what is being tested, not equality)
    assert worst > 0.0


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("kind", ["Momentum", "SGD"])
@pytest.mark.parametrize("how", ["clear", "none"])
def test_momentum_reset_by_hand(flat, kind, how):
    """opt.state.clear() or state[p]["momentum_buffer"] = None between steps resets momentum
    (torch: the next step is a first step; Momentum: v starts at zero again). The flat
    buffer still holds the old values: they must not leak into the new momentum."""
    gen = torch.Generator().manual_seed(31)
    ps = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (5, 1, 97)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    if kind == "Momentum":
        o = momentum_cuda.Momentum(ps, lr=0.1, momentum=0.9, flat=flat)
        t = MomentumReference(qs, lr=0.1, momentum=0.9)
    else:
        o = momentum_cuda.SGD(ps, lr=0.1, momentum=0.9, flat=flat)
        t = torch.optim.SGD(qs, lr=0.1, momentum=0.9, foreach=False)
    for step in range(4):
        if step == 2:
            for oo in (o, t):
                if how == "clear":
                    oo.state.clear()
                else:
                    for p in oo.param_groups[0]["params"]:
                        oo.state[p]["momentum_buffer"] = None
        ws = [torch.randn(p.shape, generator=gen) for p in ps]
        for oo, pp in ((o, ps), (t, qs)):
            oo.zero_grad()
            sum((p * w).sum() for p, w in zip(pp, ws)).backward()
            oo.step()
        for p, q in zip(ps, qs):
            assert torch.equal(p, q), step
            assert torch.equal(o.state[p]["momentum_buffer"], t.state[q]["momentum_buffer"])
        assert {e["path"] for e in o.last_step} == ({"flat"} if flat else {"per-tensor"})
