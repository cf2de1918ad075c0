"""Gradient presence with the flat layout: p.grad is None exactly where torch's is, whatever
user code does between backward() and step(), and a present gradient holds torch's bits.

zero_grad() (set_to_none=True) sets every .grad to None, as torch does; backward() attaches a
parameter's flat gradient view (filled with -0.0) when a gradient reaches it, and autograd adds
the gradient into it: -0.0 + g is g bit for bit, -0.0 included. A parameter backward does not
reach keeps .grad None, so code that writes into every existing .grad (clip_grad_norm_,
clip_grad_value_, a p.grad.mul_ loop) skips it and the step skips it, as with torch.

Every comparison is bitwise against a twin stepped by torch.optim.SGD(foreach=False) on the same
fresh random data: parameters, momentum buffers, gradients and whether each is None (after
backward, after the user's gradient code, after the step) and state_dict().
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import momentum_cuda
from conftest import backward_grads, fresh_grads, make_values, momentum_buffer, whole_storage
from test_conformance import same, same_state_dict

pytestmark = pytest.mark.filterwarnings("ignore:Using backward.. with create_graph=True")
FLAT = pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
HYPERS = {
    "plain": dict(momentum=0.0),
    "plain-wd": dict(momentum=0.0, weight_decay=1e-2),
    "momentum-wd": dict(momentum=0.9, weight_decay=1e-2),
    "nesterov-wd": dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
}
STEPS = 6


class _Net(nn.Module):
    """A trunk, an optional branch and two heads: head_b and the branch are not used on some
    steps, so their parameters get no gradient there."""

    def __init__(self, dtype, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Linear(7, 9)
        self.branch = nn.Linear(9, 9)
        self.head_a = nn.Linear(9, 3)
        self.head_b = nn.Linear(9, 3)
        self.to(dtype)

    def forward(self, x, use_b=True, use_branch=True):
        h = torch.tanh(self.trunk(x))
        if use_branch:
            h = h + torch.tanh(self.branch(h))
        out = self.head_a(h)
        return out + self.head_b(h) if use_b else out


def _twins(dtype, seed, flat, h, lr=0.05):
    net = _Net(dtype, seed)
    tnet = copy.deepcopy(net)
    opt = momentum_cuda.SGD(net.parameters(), lr=lr, foreach=False, flat=flat, **h)
    topt = torch.optim.SGD(tnet.parameters(), lr=lr, foreach=False, **h)
    return net, tnet, opt, topt


def _loss(net, x, **kw):
    return net(x, **kw).float().square().mean()


def _grads_agree(net, tnet, what):
    for (name, p), q in zip(net.named_parameters(), tnet.parameters()):
        same(p.grad, q.grad, f"{what}: {name}.grad")


def _conform(net, tnet, opt, topt, what):
    for (name, p), q in zip(net.named_parameters(), tnet.parameters()):
        same(p, q, f"{what}: {name}")
        same(momentum_buffer(opt, p), momentum_buffer(topt, q), f"{what}: {name} buffer")
        same(p.grad, q.grad, f"{what}: {name}.grad")
    same_state_dict(opt.state_dict(), topt.state_dict(), f"{what}: state_dict")


def _zero(opt, how):
    if how == "default":
        opt.zero_grad()
    else:
        opt.zero_grad(set_to_none=how == "set_to_none=True")


def _clip_norm(ps):
    torch.nn.utils.clip_grad_norm_(ps, max_norm=0.05)


def _clip_value(ps):
    torch.nn.utils.clip_grad_value_(ps, clip_value=0.01)


def _mul_loop(ps):
    for p in ps:
        if p.grad is not None:
            p.grad.mul_(0.5)


POST = {"clip_grad_norm_": _clip_norm, "clip_grad_value_": _clip_value, "mul_loop": _mul_loop}


# ---- the bug: an unused parameter, then code that writes into every existing .grad --------------
@pytest.mark.parametrize("zero", ["default", "set_to_none=True", "set_to_none=False"])
@pytest.mark.parametrize("post", list(POST))
@pytest.mark.parametrize("hk", list(HYPERS))
@DTYPES
@FLAT
def test_unused_parameters_then_grad_writes(flat, dtype, hk, post, zero):
    """head_b and the branch are unused on some steps; after backward, clip_grad_norm_ /
    clip_grad_value_ / a p.grad.mul_ loop writes into every existing .grad; then step. torch
    skips a parameter whose .grad is None (and clipping skips it); so must momentum_cuda."""
    net, tnet, opt, topt = _twins(dtype, 101, flat, HYPERS[hk])
    gen = torch.Generator().manual_seed(102)
    for step in range(STEPS):
        use_b, use_branch = step in (0, 3), step not in (1, 2, 4)
        x = torch.randn(5, 7, generator=gen).to(dtype)
        for n, o in ((net, opt), (tnet, topt)):
            _zero(o, zero)
            _loss(n, x, use_b=use_b, use_branch=use_branch).backward()
        what = f"step {step + 1}"
        _grads_agree(net, tnet, f"{what} after backward")
        if zero != "set_to_none=False":
            assert (net.head_b.weight.grad is None) == (not use_b), what
        for n in (net, tnet):
            POST[post](list(n.parameters()))
        _grads_agree(net, tnet, f"{what} after {post}")
        opt.step()
        topt.step()
        _conform(net, tnet, opt, topt, what)
        if flat:  # one kernel call per run of parameters with a gradient (one when all have)
            assert {e["path"] for e in opt.last_step} == {"flat"}, opt.last_step
            if use_b and use_branch or zero == "set_to_none=False" and step:
                assert len(opt.last_step) == 1, opt.last_step


# ---- gradient accumulation ------------------------------------------------------------------------
@pytest.mark.parametrize("hk", ["plain-wd", "nesterov-wd"])
@DTYPES
@FLAT
def test_accumulation_where_a_parameter_joins_in_the_second_backward(flat, dtype, hk):
    """Two backward() calls per step: head_b gets a gradient only in the second (the first
    accumulation into its .grad is then the second backward's), on some steps in neither."""
    net, tnet, opt, topt = _twins(dtype, 111, flat, HYPERS[hk])
    gen = torch.Generator().manual_seed(112)
    for step in range(STEPS):
        x1, x2 = (torch.randn(4, 7, generator=gen).to(dtype) for _ in range(2))
        second_b = step % 3 != 2
        for n, o in ((net, opt), (tnet, topt)):
            o.zero_grad()
            _loss(n, x1, use_b=False).backward()
        _grads_agree(net, tnet, f"step {step + 1} after the first backward")
        assert net.head_b.weight.grad is None
        for n in (net, tnet):
            _loss(n, x2, use_b=second_b, use_branch=False).backward()
        _grads_agree(net, tnet, f"step {step + 1} after the second backward")
        opt.step()
        topt.step()
        _conform(net, tnet, opt, topt, f"step {step + 1}")
        if flat and second_b:
            assert [e["path"] for e in opt.last_step] == ["flat"], opt.last_step


# ---- the sign of zero ------------------------------------------------------------------------------
@pytest.mark.parametrize("hk", ["momentum-wd", "nesterov-wd", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16],
                         ids=["fp32", "bf16", "fp64", "fp16"])
@FLAT
def test_negative_zero_gradients(flat, dtype, hk):
    """Gradients with -0.0 in some elements (and one parameter whose gradient is -0.0
    everywhere): torch stores the incoming gradient as is, so its .grad and its first momentum
    buffer (a clone of it) hold -0.0 there. momentum_cuda's flat gradient must hold the same
    bits: it starts at -0.0, and -0.0 + -0.0 is -0.0 where +0.0 + -0.0 would be +0.0."""
    h = dict(HYPERS[hk])
    h["weight_decay"] = 0.0  # g + wd * p would hide the sign of a zero gradient
    sizes = [33, (6, 5), 1, 17]
    values = make_values(sizes, dtype, seed=121)
    ours = [v.clone().requires_grad_() for v in values]
    ref = [v.clone().requires_grad_() for v in values]
    opt = momentum_cuda.SGD(ours, lr=0.05, foreach=False, flat=flat, **h)
    topt = torch.optim.SGD(ref, lr=0.05, foreach=False, **h)
    gen = torch.Generator().manual_seed(122)
    for step in range(4):
        grads = fresh_grads(ours, gen)
        for g in grads:
            mask = torch.rand(g.shape, generator=gen) < 0.3
            g.masked_fill_(mask, -0.0)
        grads[2].fill_(-0.0)
        if step == 2:
            grads[0].fill_(0.0)  # +0.0 too
        for o, ps in ((opt, ours), (topt, ref)):
            o.zero_grad()
            backward_grads(ps, grads)
        for i, (p, q, g) in enumerate(zip(ours, ref, grads)):
            same(q.grad, g, f"step {step + 1}: torch's grad {i} is the incoming gradient")
            same(p.grad, q.grad, f"step {step + 1}: grad {i}")
        opt.step()
        topt.step()
        for i, (p, q) in enumerate(zip(ours, ref)):
            same(p, q, f"step {step + 1}: param {i}")
            same(momentum_buffer(opt, p), momentum_buffer(topt, q), f"step {step + 1}: buf {i}")
        if flat:
            assert [e["path"] for e in opt.last_step] == ["flat"], opt.last_step


# ---- the user's own gradients --------------------------------------------------------------------
@pytest.mark.parametrize("hk", ["momentum-wd", "nesterov-wd"])
@DTYPES
@FLAT
def test_user_assigns_grad_between_backward_and_step(flat, dtype, hk):
    """p.grad = t after backward: for a parameter that has a gradient (replaced) and for one
    that has none (head_b, unused). The step uses t (per-tensor path for it); after the next
    zero_grad() backward attaches the flat views again."""
    net, tnet, opt, topt = _twins(dtype, 131, flat, HYPERS[hk])
    gen = torch.Generator().manual_seed(132)
    for step in range(STEPS):
        x = torch.randn(5, 7, generator=gen).to(dtype)
        for n, o in ((net, opt), (tnet, topt)):
            o.zero_grad()
            _loss(n, x, use_b=False).backward()
        assign = step % 2 == 0
        if assign:
            new = fresh_grads([net.trunk.weight, net.head_b.bias], gen)
            for n in (net, tnet):
                n.trunk.weight.grad = new[0].clone()
                n.head_b.bias.grad = new[1].clone()
        _grads_agree(net, tnet, f"step {step + 1} before the step")
        opt.step()
        topt.step()
        _conform(net, tnet, opt, topt, f"step {step + 1}")
        if flat:
            per = sum(e["tensors"] for e in opt.last_step if e["path"] == "per-tensor")
            assert per == (2 if assign else 0), opt.last_step


@DTYPES
@FLAT
def test_existing_gradients_at_construction(flat, dtype):
    """Gradients that exist when the optimizer is built are kept (copied into the flat buffer
    with flat=True, same values); None ones stay None and are skipped, as by torch."""
    net = _Net(dtype, 141)
    tnet = copy.deepcopy(net)
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(142)).to(dtype)
    for n in (net, tnet):
        _loss(n, x, use_b=False).backward()
    before = {name: None if p.grad is None else p.grad.clone()
              for name, p in net.named_parameters()}
    h = HYPERS["nesterov-wd"]
    opt = momentum_cuda.SGD(net.parameters(), lr=0.05, foreach=False, flat=flat, **h)
    topt = torch.optim.SGD(tnet.parameters(), lr=0.05, foreach=False, **h)
    for name, p in net.named_parameters():
        same(p.grad, before[name], f"{name}.grad after construction")
    opt.step()
    topt.step()
    _conform(net, tnet, opt, topt, "step 1")
    if flat:
        assert [e["path"] for e in opt.last_step] == ["flat"], opt.last_step


# ---- what does not store a gradient, and what autograd stores itself ------------------------------
@FLAT
def test_autograd_grad_and_backward_inputs_leave_other_grads_none(flat):
    """torch.autograd.grad stores no .grad, and backward(inputs=...) only the listed ones: the
    flat views are attached only where torch stores a gradient."""
    net, tnet, opt, topt = _twins(torch.float32, 151, flat, HYPERS["nesterov-wd"])
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(152))
    for n, o in ((net, opt), (tnet, topt)):
        o.zero_grad()
        got = torch.autograd.grad(_loss(n, x), list(n.parameters()))
        assert all(g is not None for g in got)
        assert all(p.grad is None for p in n.parameters())
        _loss(n, x).backward(inputs=[n.head_a.weight, n.trunk.bias])
    _grads_agree(net, tnet, "after backward(inputs=...)")
    opt.step()
    topt.step()
    _conform(net, tnet, opt, topt, "step")
    if flat:
        assert sum(e["tensors"] for e in opt.last_step) == 2, opt.last_step


@FLAT
def test_create_graph_backward(flat):
    """backward(create_graph=True): autograd stores gradients that carry a graph, new tensors
    (not the flat views); the step uses them with torch's bits."""
    net, tnet, opt, topt = _twins(torch.float64, 161, flat, HYPERS["momentum-wd"])
    gen = torch.Generator().manual_seed(162)
    for step in range(3):
        x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
        for n, o in ((net, opt), (tnet, topt)):
            o.zero_grad()
            _loss(n, x, use_b=step != 1).backward(create_graph=True)
        _grads_agree(net, tnet, f"step {step + 1}")
        assert net.trunk.weight.grad.grad_fn is not None
        opt.step()
        topt.step()
        _conform(net, tnet, opt, topt, f"step {step + 1}")
        for n in (net, tnet):  # break the parameter <-> gradient cycle create_graph makes
            for p in n.parameters():
                p.grad = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_moved_parameter_gets_autograds_own_gradient(dtype):
    """A parameter whose data was replaced is no longer in its flat buffer: backward stores its
    own tensor there (the hook leaves it alone); the step lays the group out again (the new
    data is the parameter's own), so that step and the next are flat, with torch's bits."""
    net, tnet, opt, topt = _twins(dtype, 171, True, HYPERS["momentum-wd"])
    gen = torch.Generator().manual_seed(172)
    key = lambda t: t.untyped_storage().data_ptr()
    for step in range(4):
        if step == 2:
            new = torch.randn(net.head_a.weight.shape, generator=gen).to(dtype)
            net.head_a.weight.data = new.clone()
            tnet.head_a.weight.data = new.clone()
        x = torch.randn(5, 7, generator=gen).to(dtype)
        for n, o in ((net, opt), (tnet, topt)):
            o.zero_grad()
            _loss(n, x).backward()
        in_flat = key(net.head_a.weight.grad) == key(net.trunk.weight.grad)
        assert in_flat == (step != 2), step
        opt.step()
        topt.step()
        _conform(net, tnet, opt, topt, f"step {step + 1}")
        assert {e["path"] for e in opt.last_step} == {"flat"}, opt.last_step
        assert key(net.head_a.weight) == key(net.trunk.weight)  # laid out again at step 2


# ---- the padding a GPU launch runs over ----------------------------------------------------------
def _int_bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _flag_sets():
    for mom, damp, nest, wd, mx, first in itertools.product(
            (0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 1e-2), (False, True), (False, True)):
        if (nest or first) and mom == 0 or nest and damp:
            continue
        yield dict(momentum=mom, dampening=damp, nesterov=nest, weight_decay=wd, maximize=mx,
                   first_step=first)


def _padding_after_gpu_style_steps(params, grad_whole):
    """Runs the CPU kernel the way a GPU flat launch does (one segment covering every
    parameter and the padding between them) on copies of the buffers, for every flag set,
    twice; returns the flag sets after which param or buffer padding is not +0.0."""
    p_whole = whole_storage(params[0]).clone()
    covered = torch.zeros(p_whole.numel(), dtype=torch.bool)
    for p in params:
        covered[p.storage_offset():p.storage_offset() + p.numel()] = True
    lo = min(p.storage_offset() for p in params)
    hi = max(p.storage_offset() + p.numel() for p in params)
    seg = torch.tensor([[lo, hi - lo]], dtype=torch.int64)
    bad = []
    for flags in _flag_sets():
        pw, gw = p_whole.clone(), grad_whole.clone()
        bw = torch.zeros_like(pw) if flags["momentum"] else None
        for k in range(2):
            torch.ops.momentum_cuda.sgd_step_flat_(pw, gw, bw, seg, lr=0.1,
                                  **{**flags, "first_step": flags["first_step"] and k == 0})
        for name, t in (("param", pw), ("buf", bw)):
            if t is not None and _int_bits(t[~covered]).any():
                bad.append((name, flags))
    return bad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
def test_padding_signs_under_a_covering_launch(dtype):
    """What a CUDA/Triton flat launch does to the padding between parameters, run with the CPU
    kernel over one covering segment for every flag set, twice: the parameter padding stays
    +0.0 whatever the sign of the gradient padding, and the momentum buffer padding gets -0.0
    from a first step (buf = g) for some flag set with either sign: the buffers as zero_grad()
    and backward() leave them (-0.0 padding), and with +0.0 padding. The optimizer resets the
    buffer padding after a covering first step (next test)."""
    sizes = [3, 97, (5, 7), 1, 17]
    ps = [v.clone().requires_grad_() for v in make_values(sizes, dtype, seed=181)]
    opt = momentum_cuda.SGD(ps, lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(182)
    opt.zero_grad()
    backward_grads(ps[:4], fresh_grads(ps[:4], gen))  # ps[4]: its region left at -0.0
    grad_whole = whole_storage(ps[0].grad)
    covered = _covered(ps, grad_whole.numel())
    assert torch.equal(grad_whole[~covered], torch.full_like(grad_whole[~covered], -0.0))
    bad = _padding_after_gpu_style_steps(ps, grad_whole)
    assert bad and {name for name, _ in bad} == {"buf"}
    assert all(f["first_step"] and not f["maximize"] and not f["weight_decay"] for _, f in bad)
    positive = grad_whole.clone()
    positive[~covered] = 0.0
    bad = _padding_after_gpu_style_steps(ps, positive)
    assert bad and {name for name, _ in bad} == {"buf"}
    assert all(f["first_step"] and f["maximize"] and not f["weight_decay"] for _, f in bad)


def _covered(params, n):
    covered = torch.zeros(n, dtype=torch.bool)
    for p in params:
        covered[p.storage_offset():p.storage_offset() + p.numel()] = True
    return covered


@pytest.mark.parametrize("reset", [True, False], ids=["as-built", "without-reset"])
@pytest.mark.parametrize("zero", ["default", "set_to_none=False"])
@pytest.mark.parametrize("hk", ["momentum", "nesterov-max", "dampening-max"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_covering_steps_keep_padding_positive_zero(dtype, hk, zero, reset, monkeypatch):
    """The optimizer's flat step run as on a GPU (one covering span per run, forced here on the
    CPU bucket; fp32/fp64 bits do not depend on the span), parameters joining at different
    steps (so first steps happen in partial runs): torch's bits, and after every step the
    padding of the parameter and momentum buffers is +0.0 bit for bit. Without the buffer
    padding reset, a first step leaves -0.0 there when the gradient padding has the sign that
    the step turns into -0.0 (-0.0 after zero_grad() without maximize, +0.0 after
    zero_grad(set_to_none=False) with maximize): those runs must fail."""
    h = {"momentum": dict(momentum=0.9), "nesterov-max": dict(momentum=0.9, nesterov=True,
                                                             maximize=True),
         "dampening-max": dict(momentum=0.9, dampening=0.3, maximize=True)}[hk]
    if not reset:
        monkeypatch.setattr(momentum_cuda.optim._Bucket, "reset_buf_padding", lambda b: None)
    sizes = [3, 97, (5, 7), 1, 17]
    values = make_values(sizes, dtype, seed=191)
    ours = [v.clone().requires_grad_() for v in values]
    ref = [v.clone().requires_grad_() for v in values]
    opt = momentum_cuda.SGD(ours, lr=0.05, foreach=False, **h)
    topt = torch.optim.SGD(ref, lr=0.05, foreach=False, **h)
    (bucket,) = opt._layouts[id(opt.param_groups[0])].buckets
    bucket.covers_padding = True
    gen = torch.Generator().manual_seed(192)
    clean = True
    for step in range(4):
        live = [i for i in range(len(sizes)) if i <= step + 1]  # 2 params, then 3, 4, 5
        grads = fresh_grads([ours[i] for i in live], gen)
        for o, ps in ((opt, ours), (topt, ref)):
            _zero(o, zero)
            backward_grads([ps[i] for i in live], grads)
        opt.step()
        topt.step()
        for i, (p, q) in enumerate(zip(ours, ref)):
            same(p, q, f"step {step + 1}: param {i}")
            same(momentum_buffer(opt, p), momentum_buffer(topt, q), f"step {step + 1}: buf {i}")
        assert {e["path"] for e in opt.last_step} == {"flat"}, opt.last_step
        for t in (ours[0], momentum_buffer(opt, ours[0])):
            whole = whole_storage(t)
            clean &= not _int_bits(whole[~_covered(ours, whole.numel())]).any()
    maximize = h.get("maximize", False)
    assert clean == (reset or (maximize if zero == "default" else not maximize))
