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


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_compiled_step_tensor_hyper_parameters_no_recompile(flat, backend):
    """lr, momentum, dampening and weight_decay all tensors, changed in place every step (the
    momentum and weight_decay 0 on some steps): after an eager first step (it creates the
    buffers, reading the momentum, as torch's for-loop does), the step compiled with
    fullgraph=True is compiled at its first call only and gives torch's bits at every step."""
    torch._dynamo.reset()
    ours, ref = _model(seed=57)

    def hyper():
        return dict(lr=torch.tensor(0.05), momentum=torch.tensor(0.9),
                    dampening=torch.tensor(0.1, dtype=torch.float64),
                    weight_decay=torch.tensor(1e-2))
    opt = momentum_cuda.SGD(ours.parameters(), flat=flat, **hyper())
    topt = torch.optim.SGD(ref.parameters(), foreach=False, **hyper())
    counter = CompileCounterWithBackend(backend)
    step = torch.compile(opt.step, fullgraph=True, backend=counter)
    schedule = [(0.05, 0.9, 0.1, 1e-2), (0.04, 0.0, 0.2, 1e-2), (0.03, 0.8, 0.35, 0.0),
                (0.02, 0.85, 0.0, 3e-2), (0.01, 0.0, 0.29, 0.0)]
    gen = torch.Generator().manual_seed(58)
    try:
        for k, values in enumerate(schedule):
            x = torch.randn(5, 7, generator=gen)
            for model, o in ((ours, opt), (ref, topt)):
                for key, v in zip(("lr", "momentum", "dampening", "weight_decay"), values):
                    o.param_groups[0][key].fill_(v)
                o.zero_grad()
                model(x).square().mean().backward()
            opt.step() if k == 0 else step()
            topt.step()
            _same(ours, ref, opt, topt, f"step {k + 1}")
            if k == 1:
                traced = counter.frame_count
        # one compilation (dynamo restarts its analysis once inside it: 2 frames), no recompile
        assert traced > 0 and counter.frame_count == traced, (traced, counter.frame_count)
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


@pytest.mark.parametrize("name", ["lr_tensor", "momentum_tensor", "dampening_tensor",
                                  "weight_decay_tensor"])
@pytest.mark.parametrize("bad,frag", [
    (lambda: torch.ones(2), "{} must be a 1-element float32 or float64 tensor on cpu"),
    (lambda: torch.ones((), dtype=torch.float16), "got Half"),
    (lambda: torch.tensor(float("nan")), "{} must be a finite number, got nan"),
    (lambda: torch.tensor(float("inf"), dtype=torch.float64), "{} must be a finite number"),
])
def test_op_rejects_bad_hyper_tensor(bad, frag, name):
    gen = torch.Generator().manual_seed(56)
    p, g, b = (torch.randn(9, generator=gen) for _ in range(3))
    before = [t.clone() for t in (p, g, b)]
    with pytest.raises(RuntimeError, match=frag.format(name)):
        OPS.sgd_step_list_([p], [g], [b], lr=0.1, momentum=0.9, dampening=0.0,
                           weight_decay=0.0, nesterov=False, maximize=False, first_step=False,
                           **{name: bad()})
    assert all(torch.equal(t, u) for t, u in zip((p, g, b), before))


@pytest.mark.parametrize("hdtype", [torch.float32, torch.float64], ids=["h32", "h64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["flat", "list"])
def test_opcheck_with_hyper_tensors(op, dtype, hdtype):
    """torch.library.opcheck on the CPU ops given every hyper-parameter as a tensor (the
    floats beside them garbage), and a zero momentum tensor (buffers given, left as they
    are)."""
    gen = torch.Generator().manual_seed(59)
    for m in (0.9, 0.0):
        p, g, b = (torch.randn(1030, generator=gen).to(dtype) for _ in range(3))
        kw = dict(lr=123.0, momentum=0.0, dampening=0.375, weight_decay=7.0, nesterov=False,
                  maximize=False, first_step=False, lr_tensor=torch.tensor(0.01, dtype=hdtype),
                  momentum_tensor=torch.tensor(m, dtype=hdtype),
                  dampening_tensor=torch.tensor(0.1, dtype=hdtype),
                  weight_decay_tensor=torch.tensor(1e-2, dtype=hdtype))
        if op == "flat":
            fn, args = OPS.sgd_step_flat_, (p, g, b, torch.tensor([[0, 1030]]))
        else:
            fn, args = OPS.sgd_step_list_, ([p], [g], [b])
        result = torch.library.opcheck(fn.default, args, kw)
        assert set(result.values()) <= {"SUCCESS"}, result
        b0 = b.clone()
        fn(*args, **kw)
        assert torch.equal(b, b0) == (m == 0.0)


# dampening whose 1 - d lies just above a bf16 rounding tie (1 - 2^-8 - 2^-9 + 2^-30): 1 - d
# rounded to bf16 straight from the double is 1 - 2^-8, through fp32 (as torch rounds a bf16
# alpha, from a float or from a tensor's .item()) 1 - 2^-7
_TIE_DAMPENING = 2 ** -8 + 2 ** -9 - 2 ** -30


# Each step's (momentum, dampening, weight_decay) as a scheduler would set them, in place: momentum
# and weight_decay 0 on some steps (torch's `!= 0` tests skip their ops; buffers are kept as they
# are), back after. Step 1 creates the buffers.
_SCHEDULE = [(0.9, _TIE_DAMPENING, 1e-2), (0.85, _TIE_DAMPENING, 0.0), (0.0, 0.25, 1e-2),
             (0.0, 0.25, 0.0), (0.8, 0.3, 2e-2), (0.75, 0.35, 1e-3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=str)
@pytest.mark.parametrize("hdtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=["h32", "h64", "hbf16"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_tensor_momentum_dampening_weight_decay(flat, hdtype, dtype):
    """momentum, dampening and weight_decay given as 1-element tensors, changed in place between
    steps (zeros included): torch's bits. fp32/fp64 tensors are read by the ops (momentum_tensor,
    ...): nothing is read on the host in Python after step 1, which creates the buffers and
    so reads the momentum, as torch's for-loop does. Other dtypes are read on the host. The
    dampening is chosen where bf16 alpha rounding from double and from fp32 differ, and torch's
    alpha=1 - dampening is a tensor op in the dampening's dtype: with float64 parameters a
    float32 or bfloat16 dampening gives other bits than the double 1 - d."""
    ours, ref = _model(seed=61)
    ours, ref = ours.to(dtype), ref.to(dtype)

    def hyper():
        m, d, wd = _SCHEDULE[0]
        return dict(momentum=torch.tensor(m, dtype=hdtype), dampening=torch.tensor(d, dtype=hdtype),
                    weight_decay=torch.tensor(wd, dtype=hdtype))
    h, th = hyper(), hyper()
    opt = momentum_cuda.SGD(ours.parameters(), lr=0.05, flat=flat, **h)
    topt = torch.optim.SGD(ref.parameters(), lr=0.05, foreach=False, **th)
    gen = torch.Generator().manual_seed(62)
    device_read = hdtype != torch.bfloat16
    for k, values in enumerate(_SCHEDULE):
        x = torch.randn(5, 7, generator=gen).to(dtype)
        for model, o in ((ours, opt), (ref, topt)):
            for key, v in zip(("momentum", "dampening", "weight_decay"), values):
                o.param_groups[0][key].fill_(v)
            o.zero_grad()
            model(x).float().square().mean().backward()
            with no_host_reads() if o is opt and k > 0 and device_read else contextlib.nullcontext():
                o.step()
        for i, (p, q) in enumerate(zip(ours.parameters(), ref.parameters())):
            assert torch.equal(p, q), f"step {k + 1}: parameter {i}"
            assert torch.equal(opt.state[p]["momentum_buffer"],
                               topt.state[q]["momentum_buffer"]), f"step {k + 1}: buffer {i}"


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_tensor_momentum_zero_before_the_buffers(flat):
    """A momentum tensor that is 0 while no buffer exists: torch's for-loop creates none (and
    reads it every step); the step reads it on the host too and creates none; once it is
    nonzero the buffers are created (the first step's clone) and the kernels read it."""
    ours, ref = _model(seed=63)
    h = lambda: dict(momentum=torch.tensor(0.0), dampening=torch.tensor(0.1),  # noqa: E731
                     weight_decay=torch.tensor(1e-2), nesterov=False)
    opt = momentum_cuda.SGD(ours.parameters(), lr=0.05, flat=flat, **h())
    topt = torch.optim.SGD(ref.parameters(), lr=0.05, foreach=False, **h())
    gen = torch.Generator().manual_seed(64)
    for k, m in enumerate([0.0, 0.0, 0.9, 0.9, 0.0, 0.8]):
        x = torch.randn(5, 7, generator=gen)
        for model, o in ((ours, opt), (ref, topt)):
            o.param_groups[0]["momentum"].fill_(m)
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
        for i, (p, q) in enumerate(zip(ours.parameters(), ref.parameters())):
            assert torch.equal(p, q), f"step {k + 1}: parameter {i}"
            assert ("momentum_buffer" in opt.state[p]) == ("momentum_buffer" in topt.state[q])
            if "momentum_buffer" in topt.state[q]:
                assert torch.equal(opt.state[p]["momentum_buffer"],
                                   topt.state[q]["momentum_buffer"]), f"step {k + 1}: buffer {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_tensor_momentum_nesterov(flat, dtype):
    """nesterov with a momentum tensor (its alpha read by the kernel), changed in place."""
    ours, ref = _model(seed=65)
    ours, ref = ours.to(dtype), ref.to(dtype)
    h = lambda: dict(momentum=torch.tensor(0.9, dtype=torch.float64), nesterov=True,  # noqa: E731
                     weight_decay=torch.tensor(3e-3))
    opt = momentum_cuda.SGD(ours.parameters(), lr=0.05, flat=flat, **h())
    topt = torch.optim.SGD(ref.parameters(), lr=0.05, foreach=False, **h())
    gen = torch.Generator().manual_seed(66)
    for k in range(STEPS):
        x = torch.randn(5, 7, generator=gen).to(dtype)
        for model, o in ((ours, opt), (ref, topt)):
            o.zero_grad()
            model(x).float().square().mean().backward()
            with no_host_reads() if o is opt and k > 0 else contextlib.nullcontext():
                o.step()
            o.param_groups[0]["momentum"].mul_(0.95)
        _same(ours, ref, opt, topt, f"step {k + 1}")


@pytest.mark.parametrize("hdtype", [torch.float32, torch.bfloat16], ids=["h32", "hbf16"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_momentum_tensor_momentum_float64_parameters(flat, hdtype):
    """Momentum's alpha = 1 - momentum from a tensor momentum is, as in MomentumReference, a
    tensor op in the momentum's dtype (a weight_decay tensor, read by the kernels, too): with float64 parameters not the double 1 - m (0.35:
    1 - m is not exact in float32 or bfloat16, as it is for m in [0.5, 1] or for 0.3)."""
    ours, ref = _model(seed=71)
    ours, ref = ours.double(), ref.double()
    opt = momentum_cuda.Momentum(ours.parameters(), lr=0.05, flat=flat,
                                 momentum=torch.tensor(0.35, dtype=hdtype),
                                 weight_decay=torch.tensor(1e-2))
    topt = MomentumReference(ref.parameters(), lr=0.05, momentum=torch.tensor(0.35, dtype=hdtype),
                             weight_decay=torch.tensor(1e-2))
    gen = torch.Generator().manual_seed(72)
    for k in range(STEPS):
        x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
        for model, o in ((ours, opt), (ref, topt)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
        _same(ours, ref, opt, topt, f"step {k + 1}")


@pytest.mark.parametrize("hdtype", [torch.float32, torch.bfloat16], ids=["h32", "hbf16"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_momentum_tensor_momentum_on_torch_ops(flat, hdtype):
    """The same through torch's own ops (a sparse embedding's gradient, path "torch-ops"),
    float64: 1 - momentum is the tensor op's, as MomentumReference computes it (found by
    tests/test_sequences.py: the double 1 - m there differed in the last bits)."""
    torch.manual_seed(74)
    ours = torch.nn.Embedding(7, 3, sparse=True).double()
    ref = copy.deepcopy(ours)
    h = lambda: dict(lr=0.05, momentum=torch.tensor(0.35, dtype=hdtype))  # noqa: E731
    opt = momentum_cuda.Momentum(ours.parameters(), flat=flat, **h())
    topt = MomentumReference(ref.parameters(), **h())
    gen = torch.Generator().manual_seed(75)
    for k in range(STEPS):
        idx = torch.randint(0, 7, (5,), generator=gen)
        w = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        for model, o in ((ours, opt), (ref, topt)):
            o.zero_grad()
            (model(idx) * w).sum().backward()
            o.step()
        assert [e["path"] for e in opt.last_step] == ["torch-ops"]
        _same(ours, ref, opt, topt, f"step {k + 1}")


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_tensor_hyper_parameters_interplay(flat):
    """All four hyper-parameters as tensors, changed in place, through what training code does
    around the step, against torch.optim.SGD(foreach=False) with its own tensors: a parameter
    left without a gradient, opt.clip_grad_norm_ (torch's clip_grad_norm_ on the twin), a
    deepcopy of model and optimizer that continues, a state_dict round trip into a fresh
    optimizer, a param-group edit to floats and back to a tensor, and model.to(float64)."""
    from conftest import assert_twins
    torch.manual_seed(73)
    ours = torch.nn.Sequential(torch.nn.Linear(7, 97), torch.nn.Tanh(), torch.nn.Linear(97, 3),
                               torch.nn.Linear(3, 3))  # the last one gets no gradient
    ref = copy.deepcopy(ours)
    names = ("lr", "momentum", "dampening", "weight_decay")

    def hyper(values, dtype=torch.float32):
        return {n: torch.tensor(v, dtype=dtype) for n, v in zip(names, values)}
    start = (0.05, 0.9, 0.1, 1e-2)
    opt = momentum_cuda.SGD(ours.parameters(), flat=flat, **hyper(start))
    topt = torch.optim.SGD(ref.parameters(), foreach=False, **hyper(start))
    gen = torch.Generator().manual_seed(74)
    schedule = [(0.05, 0.9, 0.1, 1e-2), (0.04, 0.0, 0.35, 0.0), (0.03, 0.8, 0.29, 2e-2),
                (0.02, 0.85, 0.2, 1e-3)]

    def steps(k0, dtype=torch.float32):
        for k in range(k0, k0 + len(schedule)):
            x = torch.randn(5, 7, generator=gen).to(dtype)
            values = schedule[k % len(schedule)]
            for model, o in ((ours, opt), (ref, topt)):
                for n, v in zip(names, values):
                    if isinstance(o.param_groups[0][n], torch.Tensor):
                        o.param_groups[0][n].fill_(v)
                    else:
                        o.param_groups[0][n] = v
                o.zero_grad()
                model[:3](x).square().mean().backward()
            norm = opt.clip_grad_norm_(0.05)
            tnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
            assert torch.equal(norm, tnorm), f"step {k + 1}: norm"
            opt.step()
            topt.step()
            assert_twins(ours, ref, opt, topt, f"step {k + 1}")

    steps(0)
    ours, opt = copy.deepcopy((ours, opt))  # the copy continues
    steps(4)
    fresh = momentum_cuda.SGD(ours.parameters(), flat=flat, **hyper(start))
    fresh.load_state_dict(opt.state_dict())
    tfresh = torch.optim.SGD(ref.parameters(), foreach=False, **hyper(start))
    tfresh.load_state_dict(topt.state_dict())
    opt, topt = fresh, tfresh
    steps(8)
    for o in (opt, topt):  # a param-group edit: floats, then tensors of float64
        o.param_groups[0].update(zip(names, schedule[2]))
    steps(12)
    for o in (opt, topt):
        o.param_groups[0].update(hyper(schedule[3], torch.float64))
    ours.to(torch.float64)
    ref.to(torch.float64)
    steps(16, torch.float64)
