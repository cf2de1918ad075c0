"""torch.compile: the optimizer's step traced by dynamo (optim._step_traced) and run through the
eager, aot_eager and inductor backends, flat=True and flat=False, bitwise against eager
torch.optim.SGD(foreach=False) (or MomentumReference) over several steps; fullgraph=True, so a
graph break fails. Recompiles are counted: one graph for the first step (buffers are created)
and one for the steps after it, whatever the number of steps. A training step holding
zero_grad(), forward, backward and step() compiled (fullgraph=False) under inductor gives the
same bits too."""
from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import momentum_cuda
from momentum_cuda.reference import MomentumReference

BACKENDS = ("eager", "aot_eager", "inductor")
STEPS = 4


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    # dynamo's "eager" backend leaves grad mode off when the graph raises inside the step's
    # no_grad() (torch 2.13; aot_eager and inductor restore it): the overlap test does that
    torch.set_grad_enabled(True)


def _model(seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(7, 97), torch.nn.Tanh(), torch.nn.Linear(97, 3),
                            torch.nn.LayerNorm(3)).to(dtype)
    return m, copy.deepcopy(m)


def _pair(kind, ours, ref, flat, **over):
    if kind == "sgd":
        h = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True,
                 maximize=False, **over)
        return (momentum_cuda.SGD(ours.parameters(), flat=flat, **h),
                torch.optim.SGD(ref.parameters(), foreach=False, **h))
    if kind == "sgd-plain":
        h = dict(lr=0.05, momentum=0.0, weight_decay=0.0, maximize=True, **over)
        return (momentum_cuda.SGD(ours.parameters(), flat=flat, **h),
                torch.optim.SGD(ref.parameters(), foreach=False, **h))
    h = dict(lr=0.05, momentum=0.8, weight_decay=1e-3, **over)
    return (momentum_cuda.Momentum(ours.parameters(), flat=flat, **h),
            MomentumReference(ref.parameters(), **h))


def _same(ours, ref, opt, topt, what):
    for i, (p, q) in enumerate(zip(ours.parameters(), ref.parameters())):
        assert torch.equal(p, q), f"{what}: parameter {i} differs"
        tb = topt.state[q].get("momentum_buffer")
        ob = opt.state[p].get("momentum_buffer") if p in opt.state else None
        assert (ob is None) == (tb is None), f"{what}: buffer presence of parameter {i}"
        if tb is not None:
            assert torch.equal(ob, tb), f"{what}: momentum buffer {i} differs"


def _grads(model, x):
    model(x).square().mean().backward()


@pytest.mark.parametrize("kind", ["sgd", "sgd-plain", "momentum"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_fullgraph_bitwise(backend, flat, kind):
    ours, ref = _model(seed=11)
    opt, topt = _pair(kind, ours, ref, flat)
    counter = CompileCounterWithBackend(backend)
    step = torch.compile(opt.step, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(12)
    for k in range(STEPS):
        x = torch.randn(5, 7, generator=gen)
        _grads(ours, x)
        _grads(ref, x)
        step()
        topt.step()
        _same(ours, ref, opt, topt, f"{backend} step {k + 1}")
        assert [e["path"] for e in opt.last_step] == ["per-tensor"], opt.last_step
        opt.zero_grad()
        topt.zero_grad()
    # step 1 creates the buffers (where momentum != 0), the later steps share one graph
    assert counter.frame_count == (1 if kind == "sgd-plain" else 2), counter.frame_count


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_compiled_step_after_eager_steps_and_back(flat):
    """Eager, compiled, eager again on one optimizer: the bits of torch throughout (the flat
    layout and the state made by either kind of step are read by the other)."""
    ours, ref = _model(seed=13)
    opt, topt = _pair("sgd", ours, ref, flat)
    compiled = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(14)
    for k, step in enumerate([opt.step, compiled, compiled, opt.step, opt.step]):
        x = torch.randn(5, 7, generator=gen)
        _grads(ours, x)
        _grads(ref, x)
        step()
        topt.step()
        _same(ours, ref, opt, topt, f"step {k + 1}")
        opt.zero_grad()
        topt.zero_grad()


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_compiled_training_step_inductor(flat):
    """zero_grad(), forward, backward and step() in one function compiled by inductor. Its
    backward is inductor's, whose gradients need not be eager's bits: torch's eager step is
    given the gradients the compiled step used (still in .grad after it) and must land on
    the same parameters and buffers."""
    ours, ref = _model(seed=15)
    opt, topt = _pair("sgd", ours, ref, flat)

    def train(x):
        opt.zero_grad()
        loss = ours(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    compiled = torch.compile(train, backend="inductor")
    gen = torch.Generator().manual_seed(16)
    for k in range(STEPS):
        compiled(torch.randn(5, 7, generator=gen))
        for p, q in zip(ours.parameters(), ref.parameters()):
            q.grad = p.grad.clone()
        topt.step()
        _same(ours, ref, opt, topt, f"train step {k + 1}")
    assert [e["path"] for e in opt.last_step] == ["per-tensor"]  # traced: see _step_traced


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_overlapping_parameters_refused(backend):
    """Parameters that overlap in memory: torch's for-loop steps them one after the other; the
    compiled step cannot see addresses while tracing, and the op refuses overlapping tensors
    when the graph runs, before writing anything. Never a silent difference."""
    gen = torch.Generator().manual_seed(17)
    whole = torch.randn(10, generator=gen)
    x, y = whole[0:6], whole[3:9]  # overlapping views of one tensor
    x.grad, y.grad = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    opt = momentum_cuda.SGD([x, y], lr=0.1, momentum=0.9, flat=False)
    before = whole.clone()
    step = torch.compile(opt.step, fullgraph=True, backend=backend)
    with pytest.raises(RuntimeError, match="overlaps"):
        step()
    assert torch.equal(whole, before)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_clip_and_step_fullgraph(backend, flat):
    """opt.clip_grad_norm_ and step() compiled together (fullgraph): while tracing, the clip
    is torch's own (get_total_norm, clip_grads_with_norm_), so the norm and the clipped
    gradients are those of torch's clip_grad_norm_ compiled by the same backend (inductor's
    reduction is its own, not eager's: the reference is compiled too), and the step's bits
    eager torch.optim.SGD's on them."""
    ours, ref = _model(seed=17)
    opt, topt = _pair("sgd", ours, ref, flat)
    torch_clip = torch.compile(lambda: torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05),
                               fullgraph=True, backend=backend)

    def clip_step():
        norm = opt.clip_grad_norm_(0.05)
        opt.step()
        return norm
    counter = CompileCounterWithBackend(backend)
    step = torch.compile(clip_step, fullgraph=True, backend=counter)
    gen = torch.Generator().manual_seed(18)
    for k in range(STEPS):
        x = torch.randn(5, 7, generator=gen)
        _grads(ours, x)
        _grads(ref, x)
        norm = step()
        tnorm = torch_clip()
        topt.step()
        assert torch.equal(norm, tnorm), f"{backend} step {k + 1}: norm"
        _same(ours, ref, opt, topt, f"{backend} step {k + 1}")
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad), f"{backend} step {k + 1}: gradient"
        opt.zero_grad()
        topt.zero_grad()
    assert counter.frame_count == 2, counter.frame_count


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_eager_clip_then_compiled_step(flat):
    """A clip measured eagerly and left pending, then a compiled step: the traced step applies
    it with torch's op first."""
    ours, ref = _model(seed=19)
    opt, topt = _pair("sgd", ours, ref, flat)
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(20)
    for k in range(STEPS):
        x = torch.randn(5, 7, generator=gen)
        _grads(ours, x)
        _grads(ref, x)
        norm = opt.clip_grad_norm_(0.05)
        tnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        step()
        topt.step()
        assert torch.equal(norm, tnorm)
        _same(ours, ref, opt, topt, f"step {k + 1}")
        opt.zero_grad()
        topt.zero_grad()


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_compiled_steps_around_model_to_and_deepcopy(flat):
    """Compiled steps, then model.to(float64) (new parameter tensors' data, buffers of the old
    dtype kept as torch keeps them), more compiled steps, then a deepcopy of (model, optimizer)
    stepped by a compiled step of its own: torch's bits throughout."""
    ours, ref = _model(seed=23)
    opt, topt = _pair("sgd", ours, ref, flat)
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(24)

    def one(k, m, o, tm, to, fn):
        x = torch.randn(5, 7, generator=gen)
        _grads(m, x.to(next(m.parameters()).dtype))
        _grads(tm, x.to(next(tm.parameters()).dtype))
        fn()
        to.step()
        _same(m, tm, o, to, f"step {k + 1}")
        o.zero_grad()
        to.zero_grad()
    for k in range(2):
        one(k, ours, opt, ref, topt, step)
    ours.to(torch.float64)
    ref.to(torch.float64)
    for k in range(2, 4):
        one(k, ours, opt, ref, topt, step)
    (ours2, opt2), (ref2, topt2) = copy.deepcopy((ours, opt)), copy.deepcopy((ref, topt))
    step2 = torch.compile(opt2.step, fullgraph=True, backend="aot_eager")
    for k in range(4, 6):
        one(k, ours2, opt2, ref2, topt2, step2)
