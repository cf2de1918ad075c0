"""Gradients, momentum buffers and checkpoints in forms torch.optim.SGD(foreach=False) takes but
the kernels do not model, each against a twin stepped by torch (or MomentumReference), flat and
per-tensor:

- a broadcast gradient (`p.grad = t.expand(n)`, stride 0): torch's ops treat a broadcast operand
  apart, and its elements get bits that depend on their position;
- a first step's gradient in another layout than its parameter (transposed, channels_last):
  torch's buffer is the gradient's clone, in the gradient's layout, and what reads it later
  (a sum) sees that layout;
- a gradient of another dtype (`p.grad.data = g.double()`): torch's ops promote;
- a buffer of an integer or complex dtype, or not a tensor: torch's step fails part-way; here
  before anything is written;
- a checkpoint whose buffer has another shape, for a parameter that gets no gradient: torch
  loads it and steps the others.
"""
import copy
import io

import pytest
import torch
from torch import nn

import momentum_cuda
from momentum_cuda.reference import MomentumReference

FLAT = pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])


def _same(ps, qs, opt, topt, what):
    for i, (p, q) in enumerate(zip(ps, qs)):
        assert torch.equal(p, q), f"{what}: parameter {i}"
        assert (p.grad is None) == (q.grad is None), f"{what}: grad {i} presence"
        assert p.grad is None or torch.equal(p.grad, q.grad), f"{what}: grad {i}"
        b = opt.state[p].get("momentum_buffer") if p in opt.state else None
        c = topt.state[q].get("momentum_buffer") if q in topt.state else None
        assert (b is None) == (c is None), f"{what}: buffer {i} presence"
        if b is not None:
            assert torch.equal(b, c), f"{what}: buffer {i}"
            assert b.stride() == c.stride(), f"{what}: buffer {i} strides"
            assert torch.equal(b.sum(), c.sum()), f"{what}: buffer {i} sum"


def _pair(kind, params, **h):
    twins = [p.detach().clone().requires_grad_() for p in params]
    if kind == "SGD":
        return (momentum_cuda.SGD(params, **h),
                torch.optim.SGD(twins, foreach=False, **{k: v for k, v in h.items()
                                                         if k != "flat"}), twins)
    h.pop("dampening", None)
    return (momentum_cuda.Momentum(params, **h),
            MomentumReference(twins, **{k: v for k, v in h.items() if k != "flat"}), twins)


def _model_twins(m, flat):
    """m, its copy, and SGD(lr=0.1, momentum=0.9, weight_decay=0.01) over each: ours, torch's."""
    t = copy.deepcopy(m)
    h = dict(lr=0.1, momentum=0.9, weight_decay=0.01)
    return (m, t, momentum_cuda.SGD(m.parameters(), flat=flat, **h),
            torch.optim.SGD(t.parameters(), foreach=False, **h))


@FLAT
@pytest.mark.parametrize("kind", ["SGD", "Momentum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [3, 7, 97])
def test_broadcast_gradient(flat, kind, dtype, n):
    """p.grad a stride-0 expansion of one value, with dampening (SGD) or the EMA's 1 - m: each
    step against torch, a contiguous parameter beside it in the same group."""
    gen = torch.Generator().manual_seed(n)
    ps = [torch.randn(n, dtype=dtype, generator=gen).requires_grad_(),
          torch.randn(5, dtype=dtype, generator=gen).requires_grad_()]
    opt, topt, qs = _pair(kind, ps, lr=0.1, momentum=0.9, dampening=0.1, flat=flat)
    for step in range(4):
        v = torch.randn(1, dtype=dtype, generator=gen)
        g = torch.randn(5, dtype=dtype, generator=gen)
        ps[0].grad, qs[0].grad = v.expand(n), v.expand(n)
        ps[1].grad, qs[1].grad = g.clone(), g.clone()
        opt.step()
        topt.step()
        _same(ps, qs, opt, topt, f"{kind} step {step}")


@FLAT
@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_first_step_gradient_in_another_layout(flat, layout):
    """A gradient assigned in another layout than its contiguous parameter at the first step:
    torch's buffer is its clone (the gradient's strides), and a sum over the buffer follows
    them; the steps after take the buffer as torch left it."""
    gen = torch.Generator().manual_seed(3)
    shape = (64, 33) if layout == "transposed" else (8, 16, 5, 3)
    ps = [torch.randn(shape, generator=gen).requires_grad_(),
          torch.randn(11, generator=gen).requires_grad_()]
    opt, topt, qs = _pair("SGD", ps, lr=0.1, momentum=0.9, dampening=0.2, flat=flat)
    for step in range(3):
        g = torch.randn(shape, generator=gen)
        g = (g.t().contiguous().t() if layout == "transposed"
             else g.contiguous(memory_format=torch.channels_last))
        h = torch.randn(11, generator=gen)
        ps[0].grad, qs[0].grad = g.clone(memory_format=torch.preserve_format), g
        ps[1].grad, qs[1].grad = h.clone(), h
        opt.step()
        topt.step()
        _same(ps, qs, opt, topt, f"step {step}")


@FLAT
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_gradient_of_another_dtype(flat, dtype):
    """p.grad.data = g.to(dtype) (autograd refuses p.grad = such a tensor; .data does not):
    torch's ops promote (a float64 gradient makes a float64 buffer) and cast into the
    parameter; so do torch's ops here (path "torch-ops")."""
    torch.manual_seed(4)
    m, t, opt, topt = _model_twins(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)),
                                   flat)
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        x = torch.randn(3, 5, generator=gen)
        for mm, o in ((m, opt), (t, topt)):
            o.zero_grad()
            mm(x).square().sum().backward()
            mm[2].weight.grad.data = mm[2].weight.grad.data.to(dtype)
            o.step()
        _same(list(m.parameters()), list(t.parameters()), opt, topt, f"step {step}")
    assert "torch-ops" in {e["path"] for e in opt.last_step}


@FLAT
@pytest.mark.parametrize("buf", ["int64", "complex64", "bool", "float"])
def test_a_buffer_torch_cannot_step_is_refused_first(flat, buf):
    """A momentum buffer replaced by one torch's in-place ops cannot write (an integer or bool
    buffer: the float result cannot be cast to it) or whose update cannot be added to the
    parameter (complex), or by a number: torch's step writes the parameters before it, then
    fails; here the step raises first, nothing written."""
    torch.manual_seed(6)
    m = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    t = copy.deepcopy(m)
    opt = momentum_cuda.SGD(m.parameters(), lr=0.1, momentum=0.9, flat=flat)
    topt = torch.optim.SGD(t.parameters(), lr=0.1, momentum=0.9, foreach=False)
    x = torch.randn(2, 4)
    for mm, o in ((m, opt), (t, topt)):
        for _ in range(2):
            o.zero_grad()
            mm(x).square().sum().backward()
            o.step()
        o.zero_grad()
        mm(x).square().sum().backward()
        o.state[mm[1].bias]["momentum_buffer"] = (
            0.5 if buf == "float" else torch.zeros(2, dtype=getattr(torch, buf)))
    before = [p.detach().clone() for p in t.parameters()]
    with pytest.raises((RuntimeError, AttributeError)):
        topt.step()
    assert not all(torch.equal(a, p) for a, p in zip(before, t.parameters()))  # part-way
    before = [p.detach().clone() for p in m.parameters()]
    bufs = [opt.state[p]["momentum_buffer"] for p in m.parameters()]
    kept = [b.clone() if isinstance(b, torch.Tensor) else b for b in bufs]
    with pytest.raises(TypeError if buf == "float" else RuntimeError,
                       match="not a tensor" if buf == "float" else "before anything was written"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(kept, bufs))


@FLAT
def test_checkpoint_buffer_of_another_shape_unused(flat):
    """A checkpoint whose buffer for a parameter that gets no gradient has another shape (a
    layer resized since): torch loads it as it is and steps the others; so does this
    optimizer, and the loaded buffer stays in the state as it was."""
    torch.manual_seed(7)
    m = nn.ModuleDict({"used": nn.Linear(4, 3), "unused": nn.Linear(4, 5)})
    t = copy.deepcopy(m)
    src = torch.optim.SGD(copy.deepcopy(m).parameters(), lr=0.1, momentum=0.9, foreach=False)
    for p in src.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    src.step()
    sd = src.state_dict()
    sd["state"][3]["momentum_buffer"] = torch.randn(7)
    blob = io.BytesIO()
    torch.save(sd, blob)
    opt = momentum_cuda.SGD(m.parameters(), lr=0.1, momentum=0.9, flat=flat)
    topt = torch.optim.SGD(t.parameters(), lr=0.1, momentum=0.9, foreach=False)
    for o in (opt, topt):
        blob.seek(0)
        o.load_state_dict(torch.load(blob))
    x = torch.randn(2, 4)
    for step in range(3):
        for mm, o in ((m, opt), (t, topt)):
            o.zero_grad()
            mm["used"](x).square().sum().backward()
            o.step()
        _same(list(m.parameters()), list(t.parameters()), opt, topt, f"step {step}")
    assert opt.state[m["unused"].bias]["momentum_buffer"].shape == (7,)


@pytest.mark.parametrize("grad", ["float64", "ZeroTensor"])
def test_relayout_leaves_a_gradient_torch_keeps_apart(grad):
    """model.double(); model.float() after steps (the group is laid out again) while a .grad
    holds float64 data (p.grad.data = g.double()) or is a ZeroTensor: the relayout moves only
    gradients of the parameter's dtype, shape and layout that are plain tensors; these stay as
    torch keeps them, stepped by torch's ops."""
    torch.manual_seed(8)
    m, t, opt, topt = _model_twins(nn.Linear(5, 5), flat=True)
    gen = torch.Generator().manual_seed(9)
    for k in range(5):
        x = torch.randn(3, 5, generator=gen)
        for mm, o in ((m, opt), (t, topt)):
            if k == 3:
                mm.double()
                mm.float()
            o.zero_grad()
            mm(x).square().sum().backward()
            if grad == "float64":
                mm.weight.grad.data = mm.weight.grad.double()
            elif k >= 3:
                mm.weight.grad = torch._efficientzerotensor(mm.weight.shape)
            o.step()
        _same(list(m.parameters()), list(t.parameters()), opt, topt, f"step {k}")
        assert m.weight.grad.dtype == t.weight.grad.dtype
