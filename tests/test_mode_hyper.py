"""Hyper-parameters held in tensors in the ops of the modes (csrc/momentum_ops.cpp:
sgd_step_master_list_, sgd_step_fp16_master_list_, sgd_step_qmom_list_, sgd_step_sr_list_:
lr_tensor, momentum_tensor, dampening_tensor, weight_decay_tensor, as the plain ops take them),
and the optimizer handing them over instead of reading them on the host.

On the CPU: an op given 1-element fp32 / fp64 tensors steps with the bits of the call given
their values as floats (dampening as torch's `1 - dampening` tensor op rounds it:
optim._dampening); a zero momentum or weight_decay tensor skips its ops, and the buffers (int8
scales too) keep their bits, as torch's `!= 0` tests leave them; bad tensors are refused,
naming them, before anything is written; opcheck with the tensors given. `op_mismatches` is
shared with the Triton interpreter check (tests/test_triton_amp.py) and the GPU test
(tests/test_gpu.py); the CUDA kernels read the tensors on the host through the shim
(tests/test_cuda_host.py: step 1 of every mode's cases, its host scalars NaN, with a zero
momentum and weight_decay for half the seeds, and three planted bugs). The optimizer in every
mode with the four in tensors changed in place every step reads nothing on the host after the
step that made the buffers (GradScaler's case: tests/test_mode_amp.py)."""
import pytest
import torch

import momentum_cuda
from momentum_cuda.optim import _dampening

from conftest import no_host_reads, write_grads
from test_mode_amp import _bits, _clone, _tensors

OPS = {
    "master": torch.ops.momentum_cuda.sgd_step_master_list_.default,
    "fp16-master": torch.ops.momentum_cuda.sgd_step_fp16_master_list_.default,
    "bf16-momentum": torch.ops.momentum_cuda.sgd_step_qmom_list_.default,
    "int8-momentum": torch.ops.momentum_cuda.sgd_step_qmom_list_.default,
    "sr": torch.ops.momentum_cuda.sgd_step_sr_list_.default,
}
NAMES = ("lr", "momentum", "dampening", "weight_decay")
# (values of lr, momentum, dampening, weight_decay, their tensors' dtypes, nesterov, maximize)
CASES = [
    ((0.05, 0.9, 0.1, 1e-2), (torch.float32,) * 4, False, False),
    ((0.05, 0.9, 0.1, 1e-2), (torch.float64,) * 4, False, True),
    ((3e-3, 0.7, 0.0, 0.0), (torch.float64, torch.float32, torch.float32, torch.float64), True,
     False),
    ((0.05, 0.0, 0.1, 1e-2), (torch.float32, torch.float32, torch.float64, torch.float32), False,
     False),  # a zero momentum: the buffers keep their bits
    ((0.05, 0.0, 0.0, 0.0), (torch.float64,) * 4, True, True),
]


def lists_of(mode, seed, move=lambda t: t):
    """The op's tensor lists (and stochastic rounding's keys), fresh random values."""
    if mode != "sr":
        return [[move(t) for t in ts] for ts in _tensors(mode, seed)]
    gen = torch.Generator().manual_seed(seed)
    shapes = [(0,), (1,), (3,), (97,), (5, 61), (300,)]
    lists = [[move(torch.randn(s, generator=gen).bfloat16()) for s in shapes],
             [move((torch.randn(s, generator=gen) * 1e-2).bfloat16()) for s in shapes],
             [move((torch.randn(s, generator=gen) * 1e-2).bfloat16()) for s in shapes]]
    return lists + [[int(k) for k in torch.randint(0, 2**32, (len(shapes),), generator=gen)]]


def _tensor_lists(lists):
    """The tensor lists among an op's lists (stochastic rounding's keys are ints)."""
    return [ts for ts in lists if not isinstance(ts[0] if ts else None, int)]


def _call(op, mode, lists, first, hyper, nesterov, maximize, tensors=None):
    """One op call: the floats `hyper`; `tensors` (name -> tensor) given as *_tensor keywords.
    A float momentum of 0 takes no buffers (nor int8 scales)."""
    tensor_lists = _tensor_lists(lists)
    args = list(lists)
    if hyper[1] == 0 and tensors is None:  # the float reference: no buffers to take
        args[2] = []
        if mode == "int8-momentum":
            args[3] = []
    zero = tensors is None and hyper[1] == 0  # (nesterov and a first step need momentum)
    kw = {f"{n}_tensor": t for n, t in (tensors or {}).items()}
    op(*args, *hyper, nesterov and not zero, maximize, first and not zero, **kw)
    return tensor_lists


def op_mismatches(op_of, move=lambda t: t, steps=3, ref_of=None):
    """For each mode (op_of(mode): its op) and case of CASES: `steps` calls (the first one a
    first step) given the hyper-parameters as tensors on the lists' device (`move`), against
    the C++ CPU op (ref_of(mode) on the moved lists, if given) given them as floats (what the
    tensors hold; dampening as optim._dampening reads a float32 one). Returns the (mode, case,
    step, argument) that differ."""
    bad = []
    for mode in OPS:
        for c, (vals, dtypes, nesterov, maximize) in enumerate(CASES):
            ours = lists_of(mode, 100 + c, move)
            ref = lists_of(mode, 100 + c, move if ref_of else lambda t: t)
            tensors = {n: move(torch.tensor(v, dtype=dt)) for n, v, dt in zip(NAMES, vals, dtypes)}
            floats = tuple(_dampening(t.cpu()) if n == "dampening" else float(t)
                           for n, t in tensors.items())
            for step in range(steps):
                got = _call(op_of(mode), mode, ours, step == 0, (0.0,) * 4, nesterov, maximize,
                            tensors)
                want = _call((ref_of or OPS.get)(mode), mode, ref, step == 0, floats, nesterov,
                             maximize)
                for k, (a_ts, b_ts) in enumerate(zip(got, want)):
                    for i, (a, b) in enumerate(zip(a_ts, b_ts)):
                        if not torch.equal(_bits(a.cpu()), _bits(b.cpu())):
                            bad.append(f"{mode} case {c} step {step}: argument {k}[{i}]")
    return bad


def test_tensor_hyper_parameters_give_the_float_bits():
    bad = op_mismatches(lambda mode: OPS[mode])
    assert not bad, bad[:10]


def test_a_zero_momentum_tensor_leaves_the_buffers():
    """The buffers (int8 codes and scales) given with a zero momentum tensor keep their bits,
    while the parameters step (without momentum)."""
    for mode in OPS:
        lists = lists_of(mode, 7)
        before = _clone(_tensor_lists(lists))
        _call(OPS[mode], mode, lists, False, (0.0,) * 4, False, False,
              {"lr": torch.tensor(0.05), "momentum": torch.tensor(0.0),
               "dampening": torch.tensor(0.1), "weight_decay": torch.tensor(1e-2)})
        kept = [2, 3] if mode == "int8-momentum" else [2]
        for k in kept:
            for i, (a, b) in enumerate(zip(lists[k], before[k])):
                assert torch.equal(_bits(a), _bits(b)), f"{mode}: argument {k}[{i}] written"
        assert not all(torch.equal(_bits(a), _bits(b)) for a, b in zip(lists[0], before[0])), \
            f"{mode}: the parameters did not step"


@pytest.mark.parametrize("bad, frag", [
    (torch.tensor(0.1, dtype=torch.bfloat16), "must be a 1-element float32 or float64 tensor"),
    (torch.tensor([0.1, 0.2]), "must be a 1-element float32 or float64 tensor"),
    (torch.tensor(float("nan")), "must be a finite number"),
])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", list(OPS))
def test_bad_hyper_tensor_raises_before_writing(mode, name, bad, frag):
    lists = lists_of(mode, 8)
    before = _clone(_tensor_lists(lists))
    with pytest.raises(RuntimeError) as e:
        _call(OPS[mode], mode, lists, False, (0.05, 0.9, 0.1, 1e-2), False, False, {name: bad})
    assert f"{name}_tensor" in str(e.value) and frag in str(e.value), str(e.value)
    for k, (a_ts, b_ts) in enumerate(zip(lists, before)):
        for i, (a, b) in enumerate(zip(a_ts, b_ts)):
            assert torch.equal(_bits(a), _bits(b)), f"{mode}: refused call wrote {k}[{i}]"


@pytest.mark.parametrize("mode", list(OPS))
def test_opcheck_with_hyper_tensors(mode):
    lists = lists_of(mode, 9)
    kw = {"lr_tensor": torch.tensor(0.05), "momentum_tensor": torch.tensor(0.9, dtype=torch.float64),
          "dampening_tensor": torch.tensor(0.1), "weight_decay_tensor": torch.tensor(0.0)}
    result = torch.library.opcheck(OPS[mode], (*lists, 0.0, 0.0, 0.0, 0.0, False, False, False),
                                   kw)
    assert set(result.values()) == {"SUCCESS"}, result


# mode -> (the optimizer, its parameters' dtypes: an fp32 one beside bf16 or fp16 ones goes to the
# plain ops, the group's flat layout where flat=True (momentum_dtype takes fp32 ones only); its
# keywords)
BF, F32, F16, F64 = torch.bfloat16, torch.float32, torch.float16, torch.float64
CONFIGS = {
    "master": (momentum_cuda.SGD, [BF, BF, F32, BF], dict(master_weights=True)),
    "fp16-master": (momentum_cuda.SGD, [F16, F16, F32, F16], dict(master_weights=True)),
    "sr": (momentum_cuda.SGD, [BF, BF, F32, BF], dict(stochastic_rounding=True, sr_seed=3)),
    "bf16-momentum": (momentum_cuda.SGD, [F32] * 4, dict(momentum_dtype=torch.bfloat16)),
    "int8-momentum": (momentum_cuda.SGD, [F32] * 4, dict(momentum_dtype=torch.int8)),
    "momentum-master": (momentum_cuda.Momentum, [BF, BF, F32, BF], dict(master_weights=True)),
}


def _schedule(k, momentum_class):
    """The values at step k: a zero weight_decay on step 3, a zero momentum on step 5 (SGD:
    momentum, dampening and weight_decay change every step; Momentum: lr and weight_decay, its
    momentum a float)."""
    h = {"lr": 0.05 * 0.9 ** k, "weight_decay": 0.0 if k == 2 else 1e-2}
    if not momentum_class:
        h.update(momentum=0.0 if k == 4 else 0.9 - 0.01 * k, dampening=0.1 + 0.01 * k)
    return h


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("mode", list(CONFIGS))
def test_optimizer_reads_the_tensors_on_the_device(mode, flat):
    """The optimizer in a mode with its hyper-parameters in tensors (fp32 lr and momentum, fp64
    dampening and weight_decay) changed in place every step, a parameter of another dtype on
    the plain ops and one that never gets a gradient: the bits of the same optimizer given the
    values as floats (parameters, gradients, every state tensor), and no host read after the
    first step (which makes the buffers: whether it does is momentum != 0, read then)."""
    cls, dtypes, kw = CONFIGS[mode]
    ema = cls is momentum_cuda.Momentum
    dt = {"lr": F32, "momentum": F32, "dampening": F64, "weight_decay": F64}
    gen = torch.Generator().manual_seed(17)
    values = [torch.randn(s, generator=gen).to(d)
              for s, d in zip([(97,), (5, 61), (33,), (7,)], dtypes)]
    h0 = _schedule(0, ema)
    ps = [v.clone().requires_grad_() for v in values]
    qs = [v.clone().requires_grad_() for v in values]
    opt = cls(ps, **{n: torch.tensor(v, dtype=dt[n]) for n, v in h0.items()}, flat=flat, **kw)
    topt = cls(qs, **h0, flat=flat, **kw)
    if ema:
        opt.param_groups[0]["momentum"] = topt.param_groups[0]["momentum"] = 0.9
    for k in range(7):
        for n, v in _schedule(k, ema).items():
            opt.param_groups[0][n].fill_(v)
            topt.param_groups[0][n] = float(torch.tensor(v, dtype=dt[n]))
        for x, y in zip(ps[:3], qs[:3]):
            g = torch.randn(x.shape, generator=gen).to(x.dtype)
            x.grad, y.grad = g.clone(), g.clone()
        with no_host_reads() if k > 0 else torch.no_grad():
            opt.step()
        topt.step()
        what = f"{mode} step {k + 1}"
        for i, (p, q) in enumerate(zip(ps, qs)):
            assert torch.equal(_bits(p.detach()), _bits(q.detach())), f"{what}: param {i}"
            assert (p.grad is None) == (q.grad is None), f"{what}: gradient {i}"
            a, b = opt.state.get(p, {}), topt.state.get(q, {})
            assert a.keys() == b.keys(), f"{what}: state keys {i}"
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert torch.equal(_bits(a[key]), _bits(b[key])), f"{what}: {key} {i}"
                else:
                    assert a[key] == b[key], f"{what}: {key} {i}"


@pytest.mark.parametrize("steps", [0, 2], ids=["planned", "replayed"])
def test_stochastic_rounding_refuses_a_cuda_graph_capture(monkeypatch, steps):
    """A step with stochastic_rounding=True while a CUDA graph is captured (optim._capturing
    made true: no GPU here) raises, naming the reason, before anything is written: a captured
    step would replay one step's random keys and never advance state["sr_step"]. Planned (the
    first step) and where the steady state would replay it (after two steps); the group's fp32
    parameter (the plain ops) is not written either."""
    from momentum_cuda import optim
    gen = torch.Generator().manual_seed(23)
    ps = [torch.randn(s, generator=gen).to(d).requires_grad_()
          for s, d in (((97,), BF), ((33,), F32), ((5, 7), BF))]
    opt = momentum_cuda.SGD(ps, lr=0.05, momentum=0.9, stochastic_rounding=True)
    for k in range(steps + 1):
        write_grads(opt, ps, [torch.randn(p.shape, generator=gen).to(p.dtype) for p in ps])
        if k < steps:
            opt.step()
    assert (opt._steady is not None) == (steps > 0)
    before = [p.detach().clone() for p in ps]
    state = {i: {k: v.clone() if isinstance(v, torch.Tensor) else v
                 for k, v in opt.state.get(p, {}).items()} for i, p in enumerate(ps)}
    monkeypatch.setattr(optim, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="stochastic_rounding=True cannot be captured"):
        opt.step()
    for i, p in enumerate(ps):
        assert torch.equal(_bits(p.detach()), _bits(before[i])), f"param {i} written"
        for k, v in state[i].items():
            got = opt.state[p][k]
            assert (torch.equal(_bits(got), _bits(v)) if isinstance(v, torch.Tensor)
                    else got == v), f"state {k} of param {i} changed"


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("mode", list(CONFIGS))
def test_tensor_hyper_parameters_across_model_to_channels_last(mode, flat):
    """model.to(memory_format=channels_last) between steps of a mode whose hyper-parameters
    are tensors changed in place every step: the conv weight's memory order changes (its
    mode state re-formed on the new layout, the group laid out again), and the bits stay
    those of the same optimizer given floats (parameters, gradients, every state tensor);
    the steps after the change read nothing on the host."""
    cls, dtypes, kw = CONFIGS[mode]
    ema = cls is momentum_cuda.Momentum
    dt = {"lr": F32, "momentum": F32, "dampening": F64, "weight_decay": F64}

    def model():
        torch.manual_seed(23)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(),
                                   torch.nn.Linear(4 * 5 * 5, 3)).to(dtypes[0])
    ours, twin = model(), model()
    h0 = _schedule(0, ema)
    opt = cls(ours.parameters(), **{n: torch.tensor(v, dtype=dt[n]) for n, v in h0.items()},
              flat=flat, **kw)
    topt = cls(twin.parameters(), **h0, flat=flat, **kw)
    if ema:
        opt.param_groups[0]["momentum"] = topt.param_groups[0]["momentum"] = 0.9
    gen = torch.Generator().manual_seed(29)
    for k in range(7):
        if k == 3:
            for m in (ours, twin):
                m.to(memory_format=torch.channels_last)
            assert not ours[0].weight.is_contiguous()
        for n, v in _schedule(k, ema).items():
            opt.param_groups[0][n].fill_(v)
            topt.param_groups[0][n] = float(torch.tensor(v, dtype=dt[n]))
        x = torch.randn(2, 3, 7, 7, generator=gen).to(dtypes[0])
        for m, o in ((ours, opt), (twin, topt)):
            o.zero_grad()
            m(x.contiguous(memory_format=torch.channels_last) if k >= 3 else x
              ).float().square().sum().backward()
        with no_host_reads() if k not in (0, 3) else torch.no_grad():
            opt.step()
        topt.step()
        what = f"{mode} step {k + 1}"
        for (name, p), q in zip(ours.named_parameters(), twin.parameters()):
            assert p.stride() == q.stride(), f"{what}: {name} strides"
            assert torch.equal(_bits(p.detach()), _bits(q.detach())), f"{what}: {name}"
            assert torch.equal(_bits(p.grad), _bits(q.grad)), f"{what}: {name} gradient"
            a, b = opt.state.get(p, {}), topt.state.get(q, {})
            assert a.keys() == b.keys(), f"{what}: {name} state keys"
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert a[key].stride() == b[key].stride(), f"{what}: {name} {key} strides"
                    assert torch.equal(_bits(a[key]), _bits(b[key])), f"{what}: {name} {key}"
                else:
                    assert a[key] == b[key], f"{what}: {name} {key}"
