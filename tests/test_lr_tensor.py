"""A learning rate held in a tensor (fp32 or fp64, 1 element), as capturable training and
torch.compile keep it: the kernels read it in place (the ops' lr_tensor), so a step reads nothing
on the host in Python, and a compiled step does not recompile when a scheduler changes it in
place. Bitwise against torch.optim.SGD(foreach=False) given the same tensor lr (which reads it
with .item()), flat and per-tensor, SGD and Momentum; the op-level argument against the float
lr it holds; bad lr_tensor arguments named."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import momentum_cuda
from momentum_cuda.reference import MomentumReference
from conftest import no_host_reads

OPS = torch.ops.momentum_cuda
STEPS = 5


def _model(seed):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(7, 97), torch.nn.Tanh(), torch.nn.Linear(97, 3))
    return m, copy.deepcopy(m)


def _pair(kind, ours, ref, flat, lr, tlr):
    if kind == "sgd":
        h = dict(momentum=0.9, dampening=0.1, weight_decay=1e-2, maximize=True)
        return (momentum_cuda.SGD(ours.parameters(), lr=lr, flat=flat, **h),
                torch.optim.SGD(ref.parameters(), lr=tlr, foreach=False, **h))
    h = dict(momentum=0.8, weight_decay=1e-3)
    return (momentum_cuda.Momentum(ours.parameters(), lr=lr, flat=flat, **h),
            MomentumReference(ref.parameters(), lr=tlr, **h))


def _same(ours, ref, opt, topt, what):
    for i, (p, q) in enumerate(zip(ours.parameters(), ref.parameters())):
        assert torch.equal(p, q), f"{what}: parameter {i}"
        assert torch.equal(opt.state[p]["momentum_buffer"], topt.state[q]["momentum_buffer"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["sgd", "momentum"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_tensor_lr_read_by_the_kernel(flat, kind, dtype):
    ours, ref = _model(seed=51)
    lr, tlr = torch.tensor(0.0123, dtype=dtype), torch.tensor(0.0123, dtype=dtype)
    opt, topt = _pair(kind, ours, ref, flat, lr, tlr)
    gen = torch.Generator().manual_seed(52)
    for k in range(STEPS):
        x = torch.randn(5, 7, generator=gen)
        for model in (ours, ref):
            model(x).square().mean().backward()
        with no_host_reads() if k > 0 else contextlib.nullcontext():
            opt.step()
        topt.step()
        _same(ours, ref, opt, topt, f"step {k + 1}")
        for t in (lr, tlr):
            t.mul_(0.7)  # a scheduler's in-place update
        opt.zero_grad()
        topt.zero_grad()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_compiled_step_tensor_lr_scheduled_no_recompile(flat, backend):
    torch._dynamo.reset()
    ours, ref = _model(seed=53)
    lr, tlr = torch.tensor(0.05), torch.tensor(0.05)
    opt, topt = _pair("sgd", ours, ref, flat, lr, tlr)
    counter = CompileCounterWithBackend(backend)
    # compiled before the scheduler wraps opt.step (its wrapper lives in a file dynamo skips)
    step = torch.compile(opt.step, fullgraph=True, backend=counter)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9 ** k)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, lambda k: 0.9 ** k)
    gen = torch.Generator().manual_seed(54)
    try:
        for k in range(STEPS + 2):
            x = torch.randn(5, 7, generator=gen)
            for model in (ours, ref):
                model(x).square().mean().backward()
            step()
            topt.step()
            _same(ours, ref, opt, topt, f"step {k + 1}")
            sched.step()
            tsched.step()
            opt.zero_grad()
            topt.zero_grad()
        assert opt.param_groups[0]["lr"] is lr and not torch.equal(lr, torch.tensor(0.05))
        assert counter.frame_count == 2, counter.frame_count  # first step, then all others
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["flat", "list"])
def test_op_lr_tensor_is_read_instead_of_lr(op, dtype):
    gen = torch.Generator().manual_seed(55)
    p, g, b = (torch.randn(1030, generator=gen).to(dtype) for _ in range(3))
    kw = dict(momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False,
              first_step=False)
    for lr_t in (torch.tensor(0.0123), torch.tensor(0.0123, dtype=torch.float64)):
        outs = []
        for args in (dict(lr=lr_t.item()), dict(lr=123.0, lr_tensor=lr_t)):
            q, c = p.clone(), b.clone()
            if op == "flat":
                OPS.sgd_step_flat_(q, g, c, torch.tensor([[0, 1030]]), **kw, **args)
            else:
                OPS.sgd_step_list_([q], [g], [c], **kw, **args)
            outs.append((q, c))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("bad,frag", [
    (lambda: torch.ones(2), "lr_tensor must be a 1-element float32 or float64 tensor on cpu"),
    (lambda: torch.ones((), dtype=torch.float16), "got Half"),
    (lambda: torch.tensor(float("nan")), "lr_tensor must be a finite number, got nan"),
])
def test_op_rejects_bad_lr_tensor(bad, frag):
    gen = torch.Generator().manual_seed(56)
    p, g, b = (torch.randn(9, generator=gen) for _ in range(3))
    before = [t.clone() for t in (p, g, b)]
    with pytest.raises(RuntimeError, match=frag):
        OPS.sgd_step_list_([p], [g], [b], lr=0.1, momentum=0.9, dampening=0.0,
                           weight_decay=0.0, nesterov=False, maximize=False, first_step=False,
                           lr_tensor=bad())
    assert all(torch.equal(t, u) for t, u in zip((p, g, b), before))


# dampening whose 1 - d lies just above a bf16 rounding tie (1 - 2^-8 - 2^-9 + 2^-30): 1 - d
# rounded to bf16 straight from the double is 1 - 2^-8, through fp32 (as torch rounds a bf16
# alpha, from a float or from a tensor's .item()) 1 - 2^-7
_TIE_DAMPENING = 2 ** -8 + 2 ** -9 - 2 ** -30


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("hdtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["h32", "h64", "hbf16"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_tensor_momentum_dampening_weight_decay(flat, hdtype, dtype):
    """momentum, dampening and weight_decay given as 1-element tensors (read on the host, as
    torch's for-loop reads them): torch's bits, with a scheduler-like in-place change between
    steps and a dampening chosen where bf16 alpha rounding from double and from fp32 differ.
    torch's alpha=1 - dampening is a tensor op in the dampening's dtype: with float64
    parameters a float32 or bfloat16 dampening gives other bits than the double 1 - d."""
    ours, ref = _model(seed=61)
    ours, ref = ours.to(dtype), ref.to(dtype)

    def hyper():
        return dict(momentum=torch.tensor(0.9, dtype=hdtype),
                    dampening=torch.tensor(_TIE_DAMPENING, dtype=hdtype),
                    weight_decay=torch.tensor(1e-2, dtype=hdtype))
    h, th = hyper(), hyper()
    opt = momentum_cuda.SGD(ours.parameters(), lr=0.05, flat=flat, **h)
    topt = torch.optim.SGD(ref.parameters(), lr=0.05, foreach=False, **th)
    gen = torch.Generator().manual_seed(62)
    for k in range(STEPS):
        x = torch.randn(5, 7, generator=gen).to(dtype)
        for model, o in ((ours, opt), (ref, topt)):
            o.zero_grad()
            model(x).float().square().mean().backward()
            o.step()
            for key in ("momentum", "weight_decay"):  # as a scheduler would, in place
                o.param_groups[0][key].mul_(0.97)
        for i, (p, q) in enumerate(zip(ours.parameters(), ref.parameters())):
            assert torch.equal(p, q), f"step {k + 1}: parameter {i}"
            assert torch.equal(opt.state[p]["momentum_buffer"],
                               topt.state[q]["momentum_buffer"]), f"step {k + 1}: buffer {i}"


@pytest.mark.parametrize("hdtype", [torch.float32, torch.bfloat16], ids=["h32", "hbf16"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_momentum_tensor_momentum_float64_parameters(flat, hdtype):
    """Momentum's alpha = 1 - momentum from a tensor momentum is, as in MomentumReference, a
    tensor op in the momentum's dtype: with float64 parameters not the double 1 - m (0.35:
    1 - m is not exact in float32 or bfloat16, as it is for m in [0.5, 1] or for 0.3)."""
    ours, ref = _model(seed=71)
    ours, ref = ours.double(), ref.double()
    opt = momentum_cuda.Momentum(ours.parameters(), lr=0.05, flat=flat,
                                 momentum=torch.tensor(0.35, dtype=hdtype))
    topt = MomentumReference(ref.parameters(), lr=0.05, momentum=torch.tensor(0.35, dtype=hdtype))
    gen = torch.Generator().manual_seed(72)
    for k in range(STEPS):
        x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
        for model, o in ((ours, opt), (ref, topt)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
        _same(ours, ref, opt, topt, f"step {k + 1}")
