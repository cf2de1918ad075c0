"""opt.clip_grad_norm_: torch.nn.utils.clip_grad_norm_'s total norm, with the clip applied inside
the next step's kernels (optim._Clip). Compared bitwise, every step, with torch's own sequence on
a twin model: clip_grad_norm_(model.parameters(), ...) then torch.optim.SGD(foreach=False) (or
MomentumReference); the returned norm, parameters, gradients (the clipped ones are written
back), momentum buffers and their presence. Under GradScaler the sequence is torch's AMP recipe
(scaler.unscale_, clip, scaler.step), overflows included. Where the kernels cannot take the clip
(gradients still scaled, mixed dtypes, a traced or differentiable step) torch's own
clip_grads_with_norm_ runs first, reported as path "torch-clip"; tests below check which path
ran, so a pass on the fallback cannot hide a broken kernel path. On CUDA the kernels multiply in
their own pass (tests/cuda/host_kernel_test.cpp, amp_suite, with a planted bug in
tests/test_cuda_host.py); the CPU op applies torch's mul_ before its kernel."""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

import momentum_cuda
from momentum_cuda.reference import MomentumReference
from conftest import assert_twins, bits, no_host_reads

STEPS = 6


def _model(seed, dtype=torch.float32, unused=True):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(7, 97), torch.nn.Tanh(), torch.nn.Linear(97, 3))
    if unused:  # forward never reads it: its gradient stays None, it never gets a buffer
        m.register_parameter("unused", torch.nn.Parameter(torch.randn(3, 2)))
    m = m.to(dtype)
    return m, copy.deepcopy(m)


def _pair(kind, ours, ref, flat, **extra):
    if kind == "momentum":
        h = dict(lr=0.05, momentum=0.8, weight_decay=1e-3)
        return (momentum_cuda.Momentum(ours.parameters(), flat=flat, **h, **extra),
                MomentumReference(ref.parameters(), **h))
    h = (dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2) if kind == "sgd"
         else dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True))
    return (momentum_cuda.SGD(ours.parameters(), flat=flat, **h, **extra),
            torch.optim.SGD(ref.parameters(), foreach=False, **h))


def _paths(opt):
    return [e["path"] for e in opt.last_step]


# max_norm per step: most steps clip (the norm is ~1), one does not (coefficient 1).
MAX_NORMS = [0.05, 0.3, 100.0, 0.01, 0.2, 0.07]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("kind", ["sgd", "nesterov", "momentum"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_clip_bitwise(kind, flat, dtype):
    ours, ref = _model(31, dtype)
    opt, topt = _pair(kind, ours, ref, flat)
    gen = torch.Generator().manual_seed(32)
    for k in range(STEPS):
        x = torch.randn(5, 7, generator=gen).to(dtype)
        for model, o in ((ours, opt), (ref, topt)):
            o.zero_grad()
            model(x).square().mean().backward()
        steady = any("momentum_buffer" in st for st in opt.state.values())
        with no_host_reads() if steady else contextlib.nullcontext():
            norm = opt.clip_grad_norm_(MAX_NORMS[k])
            opt.step()
        tnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORMS[k])
        topt.step()
        assert norm.dtype == tnorm.dtype and torch.equal(bits(norm), bits(tnorm)), \
            f"step {k + 1}: total norm"
        assert_twins(ours, ref, opt, topt, f"step {k + 1}")
        assert _paths(opt) == ["flat" if flat else "per-tensor"], _paths(opt)


def test_clip_is_not_a_no_op():
    """Control: the same run without the clip on our side differs, so the comparisons above
    see the clip."""
    ours, ref = _model(33)
    opt, topt = _pair("sgd", ours, ref, True)
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(34))
    for model in (ours, ref):
        model(x).square().mean().backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.01)
    opt.step()
    topt.step()
    with pytest.raises(AssertionError, match="parameter"):
        assert_twins(ours, ref, opt, topt, "unclipped")


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.5, math.inf])
@pytest.mark.parametrize("foreach", [None, False])
def test_clip_norm_types(norm_type, foreach):
    ours, ref = _model(35)
    opt, topt = _pair("sgd", ours, ref, True)
    gen = torch.Generator().manual_seed(36)
    for k in range(3):
        x = torch.randn(5, 7, generator=gen)
        for model, o in ((ours, opt), (ref, topt)):
            o.zero_grad()
            model(x).square().mean().backward()
        norm = opt.clip_grad_norm_(0.1, norm_type=norm_type, foreach=foreach)
        tnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1, norm_type=norm_type,
                                               foreach=foreach)
        opt.step()
        topt.step()
        assert torch.equal(norm, tnorm), f"step {k + 1}: norm"
        assert_twins(ours, ref, opt, topt, f"step {k + 1}")


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("init_scale", [1000.0, 2.0 ** 16])
def test_clip_with_gradscaler(flat, init_scale):
    """torch's AMP recipe: scale(loss).backward(); unscale_; clip; step; update. GradScaler hands
    the step found_inf alone (it unscaled already); the clip runs in the kernels; overflowed
    steps (1, and 4-5 in a row) are skipped with the gradients still clipped, as torch's."""
    ours, ref = _model(37)
    opt, topt = _pair("sgd", ours, ref, flat)
    scalers = [torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
               for _ in range(2)]
    gen = torch.Generator().manual_seed(38)
    for k in range(STEPS):
        x = torch.randn(5, 7, generator=gen)
        overflow = k in (0, 3, 4)
        for model, o, scaler in ((ours, opt, scalers[0]), (ref, topt, scalers[1])):
            o.zero_grad()
            loss = model(x).square().mean() * (math.inf if overflow else 1.0)
            scaler.scale(loss).backward()
            scaler.unscale_(o)
            steady = o is opt and any("momentum_buffer" in st for st in opt.state.values())
            with no_host_reads() if steady else contextlib.nullcontext():
                if o is opt:
                    norm = o.clip_grad_norm_(0.05)
                else:
                    tnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                scaler.step(o)
            scaler.update()
        assert torch.equal(bits(norm), bits(tnorm)), f"step {k + 1}: norm"
        assert scalers[0].get_scale() == scalers[1].get_scale(), f"step {k + 1}: scale"
        assert_twins(ours, ref, opt, topt, f"step {k + 1}")
        if k > 0:  # step 1 creates the buffers: found_inf is read on the host, torch clips
            assert _paths(opt) == ["flat" if flat else "per-tensor"], (k, _paths(opt))
    assert any("momentum_buffer" in st for st in opt.state.values())


def test_clip_on_scaled_gradients_runs_torch_clip_first():
    """clip_grad_norm_ before GradScaler unscaled (torch clips the scaled gradients, then
    scaler.step unscales them): the kernels would unscale first, so torch's clip runs first."""
    ours, ref = _model(39)
    opt, topt = _pair("sgd", ours, ref, True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1000.0) for _ in range(2)]
    gen = torch.Generator().manual_seed(40)
    for k in range(4):
        x = torch.randn(5, 7, generator=gen)
        for model, o, scaler in ((ours, opt, scalers[0]), (ref, topt, scalers[1])):
            o.zero_grad()
            scaler.scale(model(x).square().mean()).backward()
            if o is opt:
                o.clip_grad_norm_(50.0)
            else:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
            scaler.step(o)
            scaler.update()
        assert_twins(ours, ref, opt, topt, f"step {k + 1}")
        assert _paths(opt) == ["torch-clip", "flat"], _paths(opt)


def test_clip_mixed_dtypes_runs_torch_clip():
    """fp32 and fp64 gradients: torch's norm is fp64 and its mul_ promotes; torch's op runs."""
    gen = torch.Generator().manual_seed(41)
    vals = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen, dtype=torch.float64)]
    grads = [torch.randn_like(v) for v in vals]
    ours = [torch.nn.Parameter(v.clone()) for v in vals]
    ref = [torch.nn.Parameter(v.clone()) for v in vals]
    opt = momentum_cuda.SGD(ours, lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, foreach=False)
    for k in range(3):
        for ps in (ours, ref):
            for p, g in zip(ps, grads):
                p.grad = g * (k + 1)
        norm = opt.clip_grad_norm_(0.5)
        opt.step()
        tnorm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
        topt.step()
        assert norm.dtype == torch.float64 and torch.equal(norm, tnorm)
        for p, q in zip(ours, ref):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
        assert _paths(opt)[0] == "torch-clip", _paths(opt)


def test_clip_twice_measures_the_clipped_gradients():
    ours, ref = _model(42)
    opt, topt = _pair("sgd", ours, ref, True)
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(43))
    for model in (ours, ref):
        model(x).square().mean().backward()
    n1 = opt.clip_grad_norm_(0.1)
    n2 = opt.clip_grad_norm_(0.02)
    t1 = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
    t2 = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.02)
    assert torch.equal(n1, t1) and torch.equal(n2, t2)
    opt.step()
    topt.step()
    assert_twins(ours, ref, opt, topt, "two clips")


def test_zero_grad_drops_the_clip():
    """clip, then zero_grad and a new backward without clipping: torch steps the new, unclipped
    gradients."""
    ours, ref = _model(44)
    opt, topt = _pair("sgd", ours, ref, True)
    gen = torch.Generator().manual_seed(45)
    x1, x2 = torch.randn(5, 7, generator=gen), torch.randn(5, 7, generator=gen)
    for model, o in ((ours, opt), (ref, topt)):
        model(x1).square().mean().backward()
        if o is opt:
            o.clip_grad_norm_(0.01)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
        o.zero_grad()
        model(x2).square().mean().backward()
        o.step()
    assert_twins(ours, ref, opt, topt, "after zero_grad")


def _changes():
    def accumulate(model, x):
        model(x).square().mean().backward()

    def replace(model, x):
        model[0].weight.grad = model[0].weight.grad.clone()

    def written(model, x):
        model[2].bias.grad.mul_(2.0)

    def appears(model, x):
        model.unused.grad = torch.ones_like(model.unused)

    def module_zero_grad(model, x):
        model.zero_grad()
        model(x).square().mean().backward()

    def torch_clip(model, x):
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)

    def data_replaced(model, x):  # the same tensor, its version counter unchanged
        model[2].weight.grad.data = model[2].weight.grad.data * 0.5
    return dict(accumulate=accumulate, replace=replace, written=written, appears=appears,
                module_zero_grad=module_zero_grad, torch_clip=torch_clip,
                data_replaced=data_replaced)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("change", list(_changes()))
def test_gradient_changed_after_clip_raises(change, flat):
    """What torch would have applied to gradients that have since changed cannot be redone:
    step() (and a second clip_grad_norm_) raises, naming the parameter, before anything is
    written, and keeps raising until zero_grad() drops the clip."""
    ours, _ = _model(46)
    opt = momentum_cuda.SGD(ours.parameters(), lr=0.1, momentum=0.9, flat=flat)
    gen = torch.Generator().manual_seed(47)
    x = torch.randn(5, 7, generator=gen)
    ours(x).square().mean().backward()
    opt.step()  # buffers exist
    opt.zero_grad()
    ours(x).square().mean().backward()
    opt.clip_grad_norm_(0.05)
    _changes()[change](ours, x)
    before = [t.detach().clone() for t in ours.parameters()]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in ours.parameters() if p in opt.state]
    for _ in range(2):
        with pytest.raises(RuntimeError, match="clip_grad_norm_ measured the gradients"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), before))
        assert all(torch.equal(opt.state[p]["momentum_buffer"], b)
                   for p, b in zip([p for p in ours.parameters() if p in opt.state], bufs))
    with pytest.raises(RuntimeError, match="clip_grad_norm_ measured the gradients"):
        opt.clip_grad_norm_(0.05)  # torch's would measure the changed, once-clipped gradients
    opt.zero_grad()  # drops the clip
    ours(x).square().mean().backward()
    opt.clip_grad_norm_(0.05)
    opt.step()
    assert _paths(opt) == ["flat" if flat else "per-tensor"]


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_model_to_after_clip_raises(dtype, flat):
    """model.to(dtype) between clip_grad_norm_ and step(): torch clipped the float32 gradients
    before .to() converted them; the deferred clip cannot (Module._apply gives each .grad new
    data, keeping the tensor and its version counter): step() raises before anything is
    written, at a first step too (no buffer left behind)."""
    for first in (True, False):
        ours, _ = _model(49)
        opt = momentum_cuda.SGD(ours.parameters(), lr=0.1, momentum=0.9, flat=flat)
        x = torch.randn(5, 7, generator=torch.Generator().manual_seed(50))
        if not first:
            ours(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        ours(x).square().mean().backward()
        opt.clip_grad_norm_(0.05)
        ours.to(dtype)
        before = [t.detach().clone() for t in ours.parameters()]
        state = {p: dict(st) for p, st in opt.state.items()}
        with pytest.raises(RuntimeError, match="given other memory or dtype"):
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), before))
        assert {p: dict(st) for p, st in opt.state.items() if st} == {
            p: st for p, st in state.items() if st}


def test_param_group_added_after_clip_raises():
    ours, _ = _model(48)
    opt = momentum_cuda.SGD(ours[0].parameters(), lr=0.1, momentum=0.9)
    ours(torch.randn(5, 7)).square().mean().backward()
    opt.clip_grad_norm_(0.05)
    opt.add_param_group({"params": list(ours[2].parameters())})
    with pytest.raises(RuntimeError, match="param groups changed"):
        opt.step()


def test_deepcopy_with_a_pending_clip():
    """A copy of the optimizer taken between clip and step (deepcopy copies a plain tensor's
    .grad) holds the clipped gradients: torch's op runs first, as torch's clip had."""
    gen = torch.Generator().manual_seed(49)
    vals = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    ours = [v.clone().requires_grad_() for v in vals]
    ref = [v.clone().requires_grad_() for v in vals]
    for ps in (ours, ref):
        for p, v in zip(ps, vals):
            p.grad = v * 3.0
    opt = momentum_cuda.SGD(ours, lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, foreach=False)
    opt.clip_grad_norm_(0.05)
    torch.nn.utils.clip_grad_norm_(ref, 0.05)
    twin = copy.deepcopy(opt)
    mine = [p for group in twin.param_groups for p in group["params"]]
    for p, q in zip(mine, ref):
        assert torch.equal(p.grad, q.grad)
    for o in (opt, topt, twin):
        o.step()
    for ps in (ours, mine):
        for p, q in zip(ps, ref):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad)


def test_no_gradients():
    p = torch.nn.Parameter(torch.randn(3))
    opt = momentum_cuda.SGD([p], lr=0.1)
    norm = opt.clip_grad_norm_(1.0)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_([p], 1.0))
    opt.step()


def test_differentiable_step_clips_with_torch():
    gen = torch.Generator().manual_seed(51)
    w = torch.randn(4, 3, generator=gen)
    g = torch.randn(4, 3, generator=gen)
    ours = w.clone().requires_grad_(False)
    ref = w.clone()
    opt = momentum_cuda.SGD([ours], lr=0.1, momentum=0.9, differentiable=True)
    topt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, foreach=False, differentiable=True)
    for t, o in ((ours, opt), (ref, topt)):
        t.grad = g.clone()
    opt.clip_grad_norm_(0.5)
    torch.nn.utils.clip_grad_norm_([ref], 0.5)
    opt.step()
    topt.step()
    assert torch.equal(ours, ref) and torch.equal(ours.grad, ref.grad)
    assert _paths(opt)[0] == "torch-clip"


def test_op_rejects_bad_clip_coef():
    gen = torch.Generator().manual_seed(52)
    p, g, b = (torch.randn(9, generator=gen) for _ in range(3))
    before = [t.clone() for t in (p, g, b)]
    for bad, frag in ((torch.ones(2), "clip_coef must be a 1-element Float"),
                      (torch.ones((), dtype=torch.float64), "got Double")):
        with pytest.raises(RuntimeError, match=frag):
            torch.ops.momentum_cuda.sgd_step_list_(
                [p], [g], [b], lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0,
                nesterov=False, maximize=False, first_step=False, clip_coef=bad)
        assert all(torch.equal(t, u) for t, u in zip((p, g, b), before))
