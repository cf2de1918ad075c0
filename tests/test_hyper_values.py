"""Hyper-parameter values a param group may hold at a step, read as torch.optim.SGD's for-loop
reads them: momentum set to 0 in a nesterov group (torch takes the plain step), a numpy float32
dampening (torch's 1 - dampening is a float32 then), a value whose alpha overflows the
parameters' dtype (torch's step raises part-way: here before anything is written), a tensor
holding NaN, a string. Each against a twin stepped by torch.optim.SGD(foreach=False) (or
MomentumReference), flat and per-tensor; where momentum_cuda raises, nothing was written: the
parameters, the state and the buffers are as before, and the steps after a fix go on with
torch's bits."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import momentum_cuda
from momentum_cuda.reference import MomentumReference

FLAT = pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])


def _models(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)
    return m, copy.deepcopy(m)


def _groups(m, **second):
    return [{"params": m[0].parameters()}, {"params": m[2].parameters(), **second}]


def _backward(m, x):
    m.zero_grad()
    m(x).square().sum().backward()


def _same(m, t, opt, topt, what):
    for (n, p), q in zip(m.named_parameters(), t.parameters()):
        assert torch.equal(p, q), f"{what}: {n}"
        b = opt.state[p].get("momentum_buffer") if p in opt.state else None
        c = topt.state[q].get("momentum_buffer") if q in topt.state else None
        assert (b is None) == (c is None) and (b is None or torch.equal(b, c)), f"{what}: {n}"


def _step_both(m, t, opt, topt, x, what):
    for mm, o in ((m, opt), (t, topt)):
        _backward(mm, x)
        o.step()
    _same(m, t, opt, topt, what)


def _snapshot(m, opt):
    return ([p.detach().clone() for p in m.parameters()],
            {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
             for p, st in opt.state.items()})


def _unchanged(m, opt, snap, what):
    params, state = snap
    assert all(torch.equal(a, p) for a, p in zip(params, m.parameters())), f"{what}: a parameter"
    now = {id(p): st for p, st in opt.state.items() if st}
    assert now.keys() == {k for k, v in state.items() if v}, f"{what}: state entries"
    for k, st in now.items():
        for key, v in st.items():
            w = state[k][key]
            assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), what


@FLAT
@pytest.mark.parametrize("zero", [0.0, -0.0, 0], ids=["0.0", "-0.0", "int0"])
def test_nesterov_group_whose_momentum_drops_to_zero(flat, zero):
    """A nesterov group whose momentum a schedule sets to 0 after some steps: torch's for-loop
    skips the momentum branch (nesterov with it) and takes the plain step; so here, in the
    second group, with the first group stepped before it."""
    m, t = _models(1)
    h = dict(lr=0.1, momentum=0.9)
    opt = momentum_cuda.SGD(_groups(m, nesterov=True), flat=flat, **h)
    topt = torch.optim.SGD(_groups(t, nesterov=True), foreach=False, **h)
    gen = torch.Generator().manual_seed(2)
    for step in range(5):
        x = torch.randn(4, 6, generator=gen)
        if step == 2:
            opt.param_groups[1]["momentum"] = topt.param_groups[1]["momentum"] = zero
        _step_both(m, t, opt, topt, x, f"step {step}")


@FLAT
def test_numpy_float32_hyper_parameters(flat):
    """np.float32 dampening with float64 parameters: torch's alpha, 1 - dampening, is a numpy
    float32 (0.9 rounded to float32, not to double); the kernels get the dampening whose double
    1 - d is that value. Momentum's EMA weight likewise (1 - momentum)."""
    m, t = _models(3, torch.float64)
    h = dict(lr=np.float32(0.1), momentum=np.float32(0.9), dampening=np.float32(0.1),
             weight_decay=np.float32(0.01))
    opt = momentum_cuda.SGD(m.parameters(), flat=flat, **h)
    topt = torch.optim.SGD(t.parameters(), foreach=False, **h)
    m2, t2 = _models(3, torch.float64)
    eh = dict(lr=np.float32(0.1), momentum=np.float32(0.1))
    eopt = momentum_cuda.Momentum(m2.parameters(), flat=flat, **eh)
    etopt = MomentumReference(t2.parameters(), **eh)
    gen = torch.Generator().manual_seed(4)
    for step in range(4):
        x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        for mm, o in ((m, opt), (t, topt), (m2, eopt), (t2, etopt)):
            _backward(mm, x)
            o.step()
        _same(m, t, opt, topt, f"SGD, step {step}")
        _same(m2, t2, eopt, etopt, f"Momentum, step {step}")


# (dtype, key, value, raises on the step after a first one): torch's alpha conversion
OVERFLOWS = [
    (torch.float32, "lr", 1e39, True), (torch.float32, "lr", 1e5, False),
    (torch.float32, "weight_decay", 1e39, True), (torch.float32, "dampening", 1e39, True),
    (torch.float32, "dampening", -1e39, True), (torch.float32, "momentum", 1e39, False),
    (torch.float16, "lr", 1e5, True), (torch.float16, "weight_decay", 65504.0, False),
    (torch.bfloat16, "lr", 3.4e38, True), (torch.float64, "lr", 1e300, False),
]


@FLAT
@pytest.mark.parametrize("dtype,key,value,raises", OVERFLOWS,
                         ids=[f"{str(d)[6:]}-{k}-{v:g}" for d, k, v, _ in OVERFLOWS])
def test_an_alpha_that_overflows_the_dtype(flat, dtype, key, value, raises):
    """torch's step converts -lr, weight_decay and 1 - dampening to the parameters' dtype and
    raises (part-way) where one overflows it: here the same error, before anything is written
    (the first group included); where torch steps, the same bits."""
    m, t = _models(5, dtype)
    h = dict(lr=0.1, momentum=0.9)
    opt = momentum_cuda.SGD(_groups(m), flat=flat, **h)
    topt = torch.optim.SGD(_groups(t), foreach=False, **h)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(4, 6, generator=gen, dtype=dtype)
    for mm, o in ((m, opt), (t, topt)):
        _backward(mm, x)
        o.step()
        o.param_groups[1][key] = value
        _backward(mm, 2 * x)
    if not raises:
        opt.step()
        topt.step()
        _same(m, t, opt, topt, "stepped")
        return
    with pytest.raises(RuntimeError, match="without overflow"):
        topt.step()
    snap = _snapshot(m, opt)
    with pytest.raises(RuntimeError, match=f"{key if key != 'dampening' else '1 - dampening'}"
                       r" = .*cannot be converted to type .* without overflow"):
        opt.step()
    _unchanged(m, opt, snap, "after the refusal")


@FLAT
def test_dampening_that_overflows_is_unused_on_a_first_step(flat):
    """torch's first step clones the gradient into the buffer (no 1 - dampening alpha): a
    dampening whose alpha overflows float32 does not fail it."""
    m, t = _models(7)
    h = dict(lr=0.1, momentum=0.9, dampening=-1e39)
    opt = momentum_cuda.SGD(m.parameters(), flat=flat, **h)
    topt = torch.optim.SGD(t.parameters(), foreach=False, **h)
    _step_both(m, t, opt, topt, torch.randn(4, 6, generator=torch.Generator().manual_seed(8)),
               "first step")


@FLAT
@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay", "dampening"])
@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_a_non_finite_tensor_is_refused_before_anything_is_written(flat, key, first):
    """A hyper-parameter tensor holding NaN in the second group (a scheduler fed a NaN): refused
    (ValueError naming it) before the first group is stepped and before any buffer is made;
    with the value fixed the steps go on with torch's bits (dampening 0.5: a buffer made by
    the refused step would have changed them)."""
    m, t = _models(9)
    h = dict(lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.01)
    opt = momentum_cuda.SGD(_groups(m), flat=flat, **h)
    topt = torch.optim.SGD(_groups(t), foreach=False, **h)
    gen = torch.Generator().manual_seed(10)
    if not first:
        x = torch.randn(4, 6, generator=gen)
        for mm, o in ((m, opt), (t, topt)):
            _backward(mm, x)
            o.step()
    good = opt.param_groups[1][key]
    opt.param_groups[1][key] = torch.tensor(float("nan"))
    _backward(m, torch.randn(4, 6, generator=gen))
    snap = _snapshot(m, opt)
    with pytest.raises(ValueError, match=f"{key} must be a finite number"):
        opt.step()
    _unchanged(m, opt, snap, "after the refusal")
    opt.param_groups[1][key] = good
    for step in range(3):
        _step_both(m, t, opt, topt, torch.randn(4, 6, generator=gen), f"step {step} after the fix")


@FLAT
def test_a_string_is_refused(flat):
    m, _ = _models(11)
    for cls, key in ((momentum_cuda.SGD, "momentum"), (momentum_cuda.SGD, "lr"),
                     (momentum_cuda.Momentum, "momentum")):
        opt = cls(m.parameters(), lr=0.1, momentum=0.9, flat=flat)
        opt.param_groups[0][key] = "0.9"
        _backward(m, torch.randn(4, 6))
        with pytest.raises(TypeError, match=f"{key} must be a number"):
            opt.step()


def test_a_failing_flat_kernel_leaves_no_buffer():
    """The buffers a first flat step makes enter the state only after its kernel ran: a kernel
    that fails (a CUDA launch error, say) leaves the state without them, as the step it did
    not take; the next step is then a first step, with torch's bits."""
    m, t = _models(12)
    h = dict(lr=0.1, momentum=0.9, dampening=0.5)
    opt = momentum_cuda.SGD(m.parameters(), **h)
    topt = torch.optim.SGD(t.parameters(), foreach=False, **h)
    opt.zero_grad()  # (laid out)
    buckets = [b for lay in opt._layouts.values() for b in lay.buckets]
    assert buckets

    def fails(*args, **kwargs):
        raise RuntimeError("kernel launch failed")
    for b in buckets:
        b.op, b.device = fails, b.flat_param.device
    gen = torch.Generator().manual_seed(13)
    _backward(m, torch.randn(4, 6, generator=gen))
    with pytest.raises(RuntimeError, match="kernel launch failed"):
        opt.step()
    assert not any(st.get("momentum_buffer") is not None for st in opt.state.values())
    for b in buckets:
        b.op = None
    for step in range(3):
        _step_both(m, t, opt, topt, torch.randn(4, 6, generator=gen), f"step {step}")


def _same_with_grads(m, t, opt, topt, what):
    _same(m, t, opt, topt, what)
    for (n, p), q in zip(m.named_parameters(), t.parameters()):
        assert (p.grad is None) == (q.grad is None), f"{what}: {n}.grad presence"
        assert p.grad is None or torch.equal(p.grad, q.grad), f"{what}: {n}.grad"


# (optimizer, parameter dtype, group values): hyper-parameter tensors torch's for-loop uses as
# tensors, with ops of their own: an lr that requires grad (param.addcmul_(grad, lr, value=-1)),
# a weight_decay that requires grad (grad.addcmul_(param.clone(), wd), in place: .grad changes),
# a momentum with dimensions (buf.mul_(momentum) then promotes: float64 arithmetic for float32
# buffers), a momentum that requires grad
TENSOR_CASES = {
    "lr requires grad, bf16": ("SGD", torch.bfloat16,
                               dict(lr=torch.tensor(0.1, requires_grad=True))),
    "lr requires grad, fp16": ("SGD", torch.float16,
                               dict(lr=torch.tensor([0.1], requires_grad=True))),
    "weight_decay requires grad": ("SGD", torch.float32,
                                   dict(weight_decay=torch.tensor(0.01, requires_grad=True))),
    "momentum (1,) fp64": ("SGD", torch.float32,
                           dict(momentum=torch.tensor([0.9], dtype=torch.float64))),
    "momentum (1,) fp64, bf16": ("SGD", torch.bfloat16,
                                 dict(momentum=torch.tensor([0.9], dtype=torch.float64))),
    "momentum requires grad": ("SGD", torch.float32,
                               dict(momentum=torch.tensor(0.9, requires_grad=True))),
    "momentum (1,) zero": ("SGD", torch.float32, dict(momentum=torch.tensor([0.0]))),
    "Momentum lr requires grad": ("Momentum", torch.bfloat16,
                                  dict(lr=torch.tensor(0.1, requires_grad=True))),
}


@FLAT
@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_hyper_tensors_torch_uses_as_tensors(flat, case):
    """A group whose hyper-parameter tensor torch's for-loop uses with other ops than the
    kernels model (TENSOR_CASES) is stepped with torch's own ops (path "torch-ops"), the
    other group with the kernels: parameters, gradients (weight_decay's in-place addcmul_),
    buffers and their presence are torch's at every step."""
    name, dtype, values = TENSOR_CASES[case]
    m, t = _models(21, dtype)
    h = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    if name == "SGD":
        h["dampening"] = 0.1
        opt = momentum_cuda.SGD(_groups(m, **values), flat=flat, **h)
        topt = torch.optim.SGD(_groups(t, **{k: v.detach().clone().requires_grad_(
            v.requires_grad) for k, v in values.items()}), foreach=False, **h)
    else:
        opt = momentum_cuda.Momentum(_groups(m, **values), flat=flat, **h)
        topt = MomentumReference(_groups(t, **{k: v.detach().clone().requires_grad_(
            v.requires_grad) for k, v in values.items()}), **h)
    gen = torch.Generator().manual_seed(22)
    for step in range(4):
        x = torch.randn(4, 6, generator=gen).to(dtype)
        for mm, o in ((m, opt), (t, topt)):
            _backward(mm, x)
            o.step()
        _same_with_grads(m, t, opt, topt, f"{case}, step {step}")
        assert "torch-ops" in {e["path"] for e in opt.last_step}, opt.last_step


# group values torch's step refuses (an alpha must be a Number: not a tensor with dimensions
# nor one that requires grad; a momentum broadcast to another shape than the buffer's), and
# at which step: dampening is used only once a buffer exists
REFUSED = {
    "weight_decay (1,)": ("SGD", dict(weight_decay=torch.tensor([0.01])), 0, TypeError),
    "dampening (1,)": ("SGD", dict(dampening=torch.tensor([0.1])), 1, TypeError),
    "nesterov, momentum (1,)": ("SGD", dict(momentum=torch.tensor([0.9]), nesterov=True), 0,
                                TypeError),
    "nesterov, momentum requires grad": (
        "SGD", dict(momentum=torch.tensor(0.9, requires_grad=True), nesterov=True), 0, TypeError),
    "momentum (1, 1)": ("SGD", dict(momentum=torch.tensor([[0.9]])), 1, RuntimeError),
    "Momentum momentum (1,)": ("Momentum", dict(momentum=torch.tensor([0.9])), 0, TypeError),
    "Momentum lr (1,)": ("Momentum", dict(lr=torch.tensor([0.1])), 0, TypeError),
}


@FLAT
@pytest.mark.parametrize("case", list(REFUSED))
def test_hyper_tensors_torch_refuses(flat, case):
    """Group values torch's step refuses part-way (the first group stepped, then the error in
    the second): refused here with the same exception type and nothing written, at the same
    step (steps before it are torch's)."""
    name, values, at, exc = REFUSED[case]
    m, t = _models(23)
    h = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    if name == "SGD":
        opt = momentum_cuda.SGD(_groups(m, **values), flat=flat, **h)
        topt = torch.optim.SGD(_groups(t, **values), foreach=False, **h)
    else:
        opt = momentum_cuda.Momentum(_groups(m, **values), flat=flat, **h)
        topt = MomentumReference(_groups(t, **values), **h)
    gen = torch.Generator().manual_seed(24)
    for step in range(at):
        _step_both(m, t, opt, topt, torch.randn(4, 6, generator=gen), f"{case}, step {step}")
    _both_refuse(m, t, opt, topt, torch.randn(4, 6, generator=gen), exc,
                 f"{case}: after the refusal")


def _both_refuse(m, t, opt, topt, x, exc, what, step=None):
    """On input x, torch's step raises exc (after the groups it steps first); ours (opt.step,
    or `step`) raises it too, with nothing written."""
    _backward(t, x)
    with pytest.raises(exc):
        topt.step()
    _backward(m, x)
    snap = _snapshot(m, opt)
    with pytest.raises(exc):
        (step or opt.step)()
    _unchanged(m, opt, snap, what)


@FLAT
def test_numbers_torch_takes_and_refuses(flat):
    """torch's ops take a bool, int or float, and numpy's bool, integer and float scalars, as a
    Scalar; torch's for-loop does its own arithmetic on other numbers (a Fraction, a numpy 0-d
    array: -lr, 1 - dampening, `!= 0`) and fails where one reaches an op (an alpha, mul_'s
    factor), or never does (a weight_decay equal to 0, a momentum only used from the second
    step, a dampening only with a buffer). Each as torch: the same bits, or a TypeError at the
    same step with nothing written. (A numpy uint lr: torch's -lr wraps around.)"""
    from fractions import Fraction
    h = dict(lr=0.05, momentum=0.9, weight_decay=0.01, dampening=0)
    steps = [  # (group values, whether torch's step raises on a step where buffers exist)
        (dict(lr=np.array(0.05)), False), (dict(dampening=np.float32(0.1)), False),
        (dict(momentum=np.True_, dampening=np.False_), False),
        (dict(weight_decay=np.True_), False), (dict(lr=np.array(0.05, np.float32)), False),
        (dict(lr=np.uint8(1)), False), (dict(weight_decay=Fraction(0)), False),
        (dict(momentum=Fraction(0)), False), (dict(dampening=np.array(0.1)), False),
        (dict(lr=Fraction(1, 10)), True), (dict(weight_decay=np.array(0.01)), True),
        (dict(momentum=np.array(0.9)), True), (dict(dampening=Fraction(1, 10)), True),
        (dict(lr=np.True_), True),  # (numpy has no -True: torch's -lr fails)
    ]
    for values, raises in steps:
        m, t = _models(25)
        opt = momentum_cuda.SGD(_groups(m), flat=flat, **h)
        topt = torch.optim.SGD(_groups(t), foreach=False, **h)
        gen = torch.Generator().manual_seed(26)
        _step_both(m, t, opt, topt, torch.randn(4, 6, generator=gen), f"{values}, before")
        for o in (opt, topt):
            o.param_groups[1].update(values)
        if not raises:
            for step in range(2):
                _step_both(m, t, opt, topt, torch.randn(4, 6, generator=gen), f"{values}")
            continue
        _both_refuse(m, t, opt, topt, torch.randn(4, 6, generator=gen), TypeError,
                     f"{values}")


# (parameter dtype, key, tensor dtype, value filled in place, exception): refused at a
# replayed step, before the first group is stepped
FILLED = {
    "lr nan": (torch.float32, "lr", torch.float32, float("nan"), ValueError),
    "weight_decay inf": (torch.float32, "weight_decay", torch.float64, float("inf"), ValueError),
    "lr 1e39 fp64 tensor, fp32": (torch.float32, "lr", torch.float64, 1e39, RuntimeError),
    "weight_decay 1e5, fp16": (torch.float16, "weight_decay", torch.float32, 1e5, RuntimeError),
}


@FLAT
@pytest.mark.parametrize("case", list(FILLED))
def test_tensor_filled_in_place_after_steady_steps(flat, case):
    """A host-memory hyper-parameter tensor of the second group filled in place (a scheduler's
    fill_) with NaN, inf or a value beyond the parameters' dtype once the step replays: torch's
    step writes the first group, then fails (or steps NaN: Limits); here it raises first with
    nothing written, as a planned step does, and the steps after the fix are torch's."""
    dtype, key, tdtype, value, exc = FILLED[case]
    m, t = _models(27, dtype)
    good = 0.05 if key == "lr" else 0.01
    h = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    opt = momentum_cuda.SGD(_groups(m, **{key: torch.tensor(good, dtype=tdtype)}), flat=flat,
                            **h)
    topt = torch.optim.SGD(_groups(t, **{key: torch.tensor(good, dtype=tdtype)}),
                           foreach=False, **h)
    gen = torch.Generator().manual_seed(28)
    for step in range(5):
        _step_both(m, t, opt, topt, torch.randn(4, 6, generator=gen).to(dtype), f"step {step}")
    assert opt._steady is not None
    opt.param_groups[1][key].fill_(value)
    _backward(m, torch.randn(4, 6, generator=gen).to(dtype))
    snap = _snapshot(m, opt)
    with pytest.raises(exc):
        opt.step()
    _unchanged(m, opt, snap, case)
    opt.param_groups[1][key].fill_(good)
    for step in range(2):
        _step_both(m, t, opt, topt, torch.randn(4, 6, generator=gen).to(dtype), f"{step} after")


@FLAT
@pytest.mark.parametrize("change", ["lr requires_grad_", "momentum unsqueeze_"])
def test_hyper_tensor_changed_in_place_after_steady_steps(flat, change):
    """A kept hyper-parameter tensor changed in place once the step replays into one torch's
    for-loop uses with other ops (an lr that now requires grad: addcmul_ for bf16; a float64
    momentum given a dimension: float64 arithmetic): the steps after are torch's."""
    dtype = torch.bfloat16 if change.startswith("lr") else torch.float32
    key = change.split()[0]
    m, t = _models(29, dtype)
    h = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
    mk = lambda: torch.tensor(h[key], dtype=torch.float64)  # noqa: E731
    ours, theirs = mk(), mk()
    opt = momentum_cuda.SGD(_groups(m, **{key: ours}), flat=flat, **h)
    topt = torch.optim.SGD(_groups(t, **{key: theirs}), foreach=False, **h)
    gen = torch.Generator().manual_seed(30)
    for step in range(8):
        if step == 4:
            for x in (ours, theirs):
                x.requires_grad_(True) if key == "lr" else x.unsqueeze_(0)
        _step_both(m, t, opt, topt, torch.randn(4, 6, generator=gen).to(dtype), f"step {step}")
    assert "torch-ops" in {e["path"] for e in opt.last_step}


@FLAT
def test_compiled_step_with_a_weight_decay_that_requires_grad(flat):
    """torch.compile(opt.step) (dynamo, eager backend) with a weight_decay tensor that requires
    grad: the traced step, too, puts the group on torch's own ops (addcmul_, writing into
    .grad), with eager torch's bits."""
    m, t = _models(31)
    h = dict(lr=0.05, momentum=0.9)
    wd = dict(weight_decay=torch.tensor(0.01, requires_grad=True))
    opt = momentum_cuda.SGD(_groups(m, **wd), flat=flat, **h)
    topt = torch.optim.SGD(_groups(t, weight_decay=torch.tensor(0.01, requires_grad=True)),
                           foreach=False, **h)
    step = torch.compile(opt.step, backend="eager")
    gen = torch.Generator().manual_seed(32)
    for k in range(3):
        x = torch.randn(4, 6, generator=gen)
        _backward(m, x)
        step()
        _backward(t, x)
        topt.step()
        _same_with_grads(m, t, opt, topt, f"step {k}")


@FLAT
def test_hyper_tensor_given_another_dtype_after_steady_steps(flat):
    """momentum.data = momentum.data.bfloat16() on the kept tensor (same object) once the step
    replays: planned again, with torch's bits (the kernels take float32/float64 tensors; a
    bf16 one is read on the host, as torch's for-loop reads it)."""
    m, t = _models(33)
    h = dict(lr=0.05, weight_decay=0.01)
    ours, theirs = torch.tensor(0.9), torch.tensor(0.9)
    opt = momentum_cuda.SGD(_groups(m, momentum=ours), momentum=0.9, flat=flat, **h)
    topt = torch.optim.SGD(_groups(t, momentum=theirs), momentum=0.9, foreach=False, **h)
    gen = torch.Generator().manual_seed(34)
    for k in range(7):
        if k == 4:
            for x in (ours, theirs):
                x.data = x.data.bfloat16()
        _step_both(m, t, opt, topt, torch.randn(4, 6, generator=gen), f"step {k}")


@FLAT
def test_hyper_tensor_given_two_elements_after_steady_steps(flat):
    """lr.data = a 2-element tensor on the kept lr (same object) once the step replays: planned
    again, which refuses it (ValueError naming lr) with nothing written."""
    m, t = _models(35)
    lr = torch.tensor(0.05)
    opt = momentum_cuda.SGD(_groups(m, lr=lr), lr=0.05, momentum=0.9, flat=flat)
    gen = torch.Generator().manual_seed(36)
    for _ in range(4):
        _backward(m, torch.randn(4, 6, generator=gen))
        opt.step()
    lr.data = torch.tensor([0.1, 0.2])
    _backward(m, torch.randn(4, 6, generator=gen))
    snap = _snapshot(m, opt)
    with pytest.raises(ValueError, match="lr must be 1-element"):
        opt.step()
    _unchanged(m, opt, snap, "2-element lr")


@FLAT
def test_compiled_step_refuses_before_any_group_is_stepped(flat):
    """torch.compile(opt.step) with the second group's momentum a Fraction: torch's for-loop
    clones the gradient at the first step and fails at the second (mul_ takes no Fraction),
    after the first group; the compiled step rehearses the group eagerly first, so it raises
    with nothing written."""
    from fractions import Fraction
    m, t = _models(37)
    h = dict(lr=0.05, momentum=0.9)
    opt = momentum_cuda.SGD(_groups(m, momentum=Fraction(9, 10)), flat=flat, **h)
    topt = torch.optim.SGD(_groups(t, momentum=Fraction(9, 10)), foreach=False, **h)
    step = torch.compile(opt.step, backend="eager")
    gen = torch.Generator().manual_seed(38)
    x = torch.randn(4, 6, generator=gen)
    _backward(m, x)
    step()
    _backward(t, x)
    topt.step()
    _same(m, t, opt, topt, "first step")
    _both_refuse(m, t, opt, topt, torch.randn(4, 6, generator=gen), TypeError,
                 "compiled, Fraction momentum", step)
