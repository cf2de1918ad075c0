"""torch.compile: the optimizer's step traced by dynamo (optim._step_traced) and run through the
eager, aot_eager and inductor backends, flat=True and flat=False, bitwise against eager
torch.optim.SGD(foreach=False) (or MomentumReference) over several steps; fullgraph=True, so a
graph break fails. Recompiles are counted: one graph for the first step (buffers are created)
and one for the steps after it, whatever the number of steps. A training step holding
zero_grad(), forward, backward and step() compiled (fullgraph=False) under inductor gives the
same bits too."""
from __future__ import annotations

import contextlib
import math
import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import momentum_cuda
from momentum_cuda.reference import MomentumReference
from conftest import SIZE1_LAYOUTS, bits, free_size1, no_host_reads, size1_param

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


def _pair(kind, ours, ref, flat, capturable=False, **over):
    mine = dict(flat=flat, capturable=capturable)
    if kind == "sgd":
        h = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True,
                 maximize=False, **over)
        return (momentum_cuda.SGD(ours.parameters(), **mine, **h),
                torch.optim.SGD(ref.parameters(), foreach=False, **h))
    if kind == "sgd-plain":
        h = dict(lr=0.05, momentum=0.0, weight_decay=0.0, maximize=True, **over)
        return (momentum_cuda.SGD(ours.parameters(), **mine, **h),
                torch.optim.SGD(ref.parameters(), foreach=False, **h))
    h = dict(lr=0.05, momentum=0.8, weight_decay=1e-3, **over)
    return (momentum_cuda.Momentum(ours.parameters(), **mine, **h),
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
    stepped by a compiled step of its own: torch's bits throughout. The fp32 buffers of fp64
    parameters take torch's own ops, which a traced step runs outside the graph: a
    fullgraph=True step refuses them before writing anything, a fullgraph=False one runs."""
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
    _grads(ours, torch.randn(5, 7, dtype=torch.float64, generator=gen))
    before = [p.detach().clone() for p in ours.parameters()]
    with pytest.raises(torch._dynamo.exc.Unsupported, match="torch's own ops"):
        step()
    assert all(torch.equal(p, b) for p, b in zip(ours.parameters(), before))
    opt.zero_grad()
    step = torch.compile(opt.step, backend="aot_eager")
    for k in range(2, 4):
        one(k, ours, opt, ref, topt, step)
        assert "torch-ops" in {e["path"] for e in opt.last_step}, opt.last_step
    (ours2, opt2), (ref2, topt2) = copy.deepcopy((ours, opt)), copy.deepcopy((ref, topt))
    step2 = torch.compile(opt2.step, backend="aot_eager")
    for k in range(4, 6):
        one(k, ours2, opt2, ref2, topt2, step2)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_runs_torch_ops_eagerly(backend, flat):
    """Parameters the kernels do not model (here bf16 ones with transposed gradients, whose
    bits depend on how torch's TensorIterator walks them, next to fp32 ones on the kernels) are
    stepped with torch's own ops, which a traced step runs outside the graph
    (optim._torch_ops_untraced): inductor would fuse them (bf16: no rounding between the ops)
    and lose torch's bits. fullgraph=True refuses the step, naming why, before writing
    anything; fullgraph=False runs it, bitwise against torch at every step, under every
    backend."""
    gen = torch.Generator().manual_seed(43)
    vals = [torch.randn(6, 4, generator=gen).to(torch.bfloat16),
            torch.randn(33, generator=gen).to(torch.bfloat16),
            torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    ours = [torch.nn.Parameter(v.clone()) for v in vals]
    ref = [torch.nn.Parameter(v.clone()) for v in vals]
    h = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    opt = momentum_cuda.SGD(ours, flat=flat, **h)
    topt = torch.optim.SGD(ref, foreach=False, **h)

    def grads():
        gs = [torch.randn(4, 6, generator=gen).to(torch.bfloat16).t()]  # transposed
        gs += [torch.randn(v.shape, generator=gen).to(v.dtype) for v in vals[1:]]
        for ps in (ours, ref):
            for p, g in zip(ps, gs):
                p.grad = g.clone()
    grads()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="torch's own ops"):
        torch.compile(opt.step, fullgraph=True, backend=backend)()
    assert all(torch.equal(p, v) for p, v in zip(ours, vals)) and not opt.state
    step = torch.compile(opt.step, backend=backend)
    for k in range(STEPS):
        if k:
            grads()
        step()
        topt.step()
        for i, (p, q) in enumerate(zip(ours, ref)):
            assert torch.equal(bits(p), bits(q)), f"{backend} step {k + 1}: parameter {i}"
            assert torch.equal(bits(opt.state[p]["momentum_buffer"]),
                               bits(topt.state[q]["momentum_buffer"])), f"step {k + 1}: buf {i}"
        assert {e["path"] for e in opt.last_step} == {"per-tensor", "torch-ops"}, opt.last_step


OVERFLOW = (0, 3, 4)  # step 1 (no state may be left), and two in a row


def _scaled_grads(model, x, scaler, overflow):
    loss = model(x).square().mean() * (float("inf") if overflow else 1.0)
    scaler.scale(loss).backward()


def _same_params_and_grads(ours, ref, what):
    for i, (p, q) in enumerate(zip(ours.parameters(), ref.parameters())):
        assert torch.equal(bits(p), bits(q)), f"{what}: parameter {i}"
        assert torch.equal(bits(p.grad), bits(q.grad)), f"{what}: gradient {i}"


def _same_state_dict(opt, topt, what):
    a, b = opt.state_dict()["state"], topt.state_dict()["state"]  # (reads capturable's flags)
    assert a.keys() == b.keys(), f"{what}: state {sorted(a)} vs torch's {sorted(b)}"
    for i, st in b.items():
        assert torch.equal(bits(a[i]["momentum_buffer"]), bits(st["momentum_buffer"])), \
            f"{what}: momentum buffer {i}"


@pytest.mark.parametrize("amp", [False, True], ids=["plain", "gradscaler"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_gradients_with_other_size1_strides(backend, flat, dtype, amp):
    """Parameters with a dimension of size 1 (conftest.SIZE1_LAYOUTS) whose gradients differ
    from them in that dimension's stride only, new strides at every step: dynamo makes such a
    stride a symbol that its .stride() cannot return, so the traced step must not ask it
    (optim._same_layout, _walked_alike). fullgraph=True, bitwise against torch's for-loop at
    every step (under GradScaler: capturable, overflows on steps 1 and 4, the unscaled
    gradients written back in place); the kernels take every gradient. (The permuted layout
    is left out: in bf16 a traced step cannot tell its strides and steps it with torch's ops,
    a graph break, test_compiled_step_runs_torch_ops_eagerly.)"""
    gen = torch.Generator().manual_seed(41)
    layouts = [(s, f) for s, f in SIZE1_LAYOUTS if f != "permuted"]
    pairs = [[torch.nn.Parameter(size1_param(s, f, dtype, gen)) for s, f in layouts]]
    pairs.append([torch.nn.Parameter(p.detach().clone()) for p in pairs[0]])
    for p, q in zip(*pairs):
        assert p.stride() == q.stride()
    h = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    opt = momentum_cuda.SGD(pairs[0], flat=flat, capturable=amp, **h)
    topt = torch.optim.SGD(pairs[1], foreach=False, **h)
    compiled = torch.compile(opt.step, fullgraph=True, backend=backend)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2)] if amp else None
    for k in range(STEPS):
        grads = [free_size1(p, gen) for p in pairs[0]]
        if amp and k in (0, 3):
            grads[1].view(-1)[0] = float("inf")
        for ps, o, i in ((pairs[0], opt, 0), (pairs[1], topt, 1)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()  # (clone keeps the strides)
            if not amp:
                compiled() if o is opt else o.step()
                continue
            scalers[i].scale(torch.ones(()))  # (the gradients above stand for scaled ones)
            if o is opt:
                opt.step = compiled  # (on the instance: GradScaler.step calls it)
            try:
                scalers[i].step(o)
            finally:
                vars(o).pop("step", None)
            scalers[i].update()
        for j, (p, q) in enumerate(zip(*pairs)):
            assert p.grad.stride() == grads[j].stride()
            assert torch.equal(bits(p), bits(q)), f"step {k + 1}: parameter {j}"
            assert torch.equal(bits(p.grad), bits(q.grad)), f"step {k + 1}: gradient {j}"
        a, b = opt.state_dict()["state"], topt.state_dict()["state"]
        assert a.keys() == b.keys(), f"step {k + 1}: state {sorted(a)} vs {sorted(b)}"
        for j, st in b.items():
            assert torch.equal(bits(a[j]["momentum_buffer"]), bits(st["momentum_buffer"]))
        if not (amp and k in (0, 3)):
            assert {e["path"] for e in opt.last_step} == {"per-tensor"}, (k, opt.last_step)


@pytest.mark.parametrize("capturable", [False, True], ids=["host-first", "capturable"])
@pytest.mark.parametrize("kind", ["sgd", "momentum"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_under_gradscaler(backend, flat, kind, capturable):
    """GradScaler.step calling a step compiled with fullgraph=True, against GradScaler + torch's
    for-loop at every step (scale 1000, not a power of two; overflows on steps 1, 4 and 5):
    parameters and gradients (bit patterns: NaN and inf after an overflow), the scale, and the
    state through state_dict(). The kernels unscale and skip on the device, and no step reads
    a tensor on the host (no_host_reads; fullgraph=True fails on a graph break).
    capturable=True: compiled from step 1, each first step decided on the device by a flag
    made in the traced step (optim._LooseFirst); two graphs (the step that makes the buffers,
    then every other). Without it the step that creates the buffers reads found_inf on the host
    (a graph break, which fullgraph refuses), so steps 1 and 2 are eager; then one graph."""
    ours, ref = _model(seed=25)
    opt, topt = _pair(kind, ours, ref, flat, capturable=capturable)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(opt.step, fullgraph=True, backend=counter)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1000.0, growth_interval=2)
               for _ in range(2)]
    gen = torch.Generator().manual_seed(26)
    for k in range(STEPS + 5):
        x = torch.randn(5, 7, generator=gen)
        for model, o, scaler in ((ours, opt, scalers[0]), (ref, topt, scalers[1])):
            o.zero_grad()
            _scaled_grads(model, x, scaler, k in OVERFLOW)
            if o is opt and (capturable or k >= 2):
                opt.step = compiled  # (on the instance: GradScaler.step calls it)
            try:
                # (inductor's compiler reads constants with .item() while it compiles: there
                # fullgraph=True alone says that the step reads nothing on the host)
                with no_host_reads() if (o is opt and (capturable or k >= 2)
                                         and backend != "inductor") else \
                        contextlib.nullcontext():
                    scaler.step(o)
            finally:
                vars(o).pop("step", None)
            scaler.update()
        what = f"{backend} step {k + 1}{' (overflow)' if k in OVERFLOW else ''}"
        assert scalers[0].get_scale() == scalers[1].get_scale(), f"{what}: scale"
        _same_params_and_grads(ours, ref, what)
        if k in (0, 4):  # a skipped first step leaves no state; state_dict() reads the flags
            _same_state_dict(opt, topt, what)
    _same_state_dict(opt, topt, "end")
    assert [e["path"] for e in opt.last_step] == ["per-tensor"], opt.last_step
    # capturable: the traced step 1, then state_dict() read the flags after steps 1 and 5
    # (each time the graph's guards on the optimizer's flags fail once)
    assert counter.frame_count == (4 if capturable else 1), counter.frame_count


@pytest.mark.parametrize("capturable", [False, True], ids=["host-first", "capturable"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_training_step_under_gradscaler(backend, flat, capturable):
    """zero_grad(), autocast-free forward, scaled backward, scaler.step(opt) and
    scaler.update() in one function compiled with fullgraph=False (dynamo traces GradScaler
    and the step together): the bits of the same eager loop with torch's for-loop, overflows
    on steps 1, 4 and 5. Without capturable the step that creates the buffers breaks the graph
    to read found_inf; the steps after it are compiled once (no recompile), and so are all
    steps with capturable=True after its first two graphs."""
    ours, ref = _model(seed=27)
    opt, topt = _pair("sgd", ours, ref, flat, capturable=capturable)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1000.0, growth_interval=2)
               for _ in range(2)]

    def train(model, o, scaler, x, scale):
        o.zero_grad()
        loss = model(x).square().mean() * scale
        scaler.scale(loss).backward()
        scaler.step(o)
        scaler.update()

    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(train, backend=counter)
    gen = torch.Generator().manual_seed(28)
    frames = []
    for k in range(STEPS + 5):
        x = torch.randn(5, 7, generator=gen)
        scale = torch.tensor(float("inf") if k in OVERFLOW else 1.0)
        compiled(ours, opt, scalers[0], x, scale)
        train(ref, topt, scalers[1], x, scale)
        what = f"{backend} step {k + 1}"
        assert scalers[0].get_scale() == scalers[1].get_scale(), f"{what}: scale"
        _same_params_and_grads(ours, ref, what)
        frames.append(counter.frame_count)
    _same_state_dict(opt, topt, "end")
    assert frames[-1] == frames[2], frames  # nothing compiled after step 3


@pytest.mark.parametrize("key", ["lr", "momentum", "weight_decay"])
@pytest.mark.parametrize("kind", ["sgd", "momentum"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_compiled_step_float_hyper_parameter_changed_every_step(flat, kind, key):
    """A float hyper-parameter changed before every step (a scheduler on a float lr, say),
    compiled with fullgraph=True: dynamo traces the float unspecialised from its second value,
    which the step's finiteness check cannot test while tracing (it was a graph break, so
    fullgraph raised at step 3); the ops check it when the graph runs. Each value still
    recompiles (the ops take it as a constant, as torch's compiled optimizers do; a tensor
    avoids it: tests/test_lr_tensor.py); the bits are torch's at every step."""
    ours, ref = _model(seed=29)
    opt, topt = _pair(kind, ours, ref, flat)
    first = opt.param_groups[0][key]
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(30)
    for k in range(STEPS + 2):
        for o in (opt, topt):
            o.param_groups[0][key] = first * 0.9 ** k
        x = torch.randn(5, 7, generator=gen)
        _grads(ours, x)
        _grads(ref, x)
        step()
        topt.step()
        _same(ours, ref, opt, topt, f"step {k + 1}")
        opt.zero_grad()
        topt.zero_grad()


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_compiled_step_non_finite_float_lr_refused(flat, bad):
    """While tracing, the step cannot test a float it may not read; the op refuses a
    non-finite lr when the graph runs, before writing anything."""
    ours, ref = _model(seed=31)
    opt, _ = _pair("sgd", ours, ref, flat)
    step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    _grads(ours, torch.randn(5, 7, generator=torch.Generator().manual_seed(32)))
    step()  # (the buffers made)
    opt.param_groups[0]["lr"] = bad
    before = [p.detach().clone() for p in ours.parameters()]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in ours.parameters()]
    with pytest.raises(Exception, match="lr must be a finite number"):
        step()
    for p, p0, b0 in zip(ours.parameters(), before, buffers):
        assert torch.equal(p, p0) and torch.equal(opt.state[p]["momentum_buffer"], b0)

