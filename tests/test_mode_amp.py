"""GradScaler's found_inf in the ops of the modes (csrc/momentum_ops.cpp: sgd_step_master_list_,
sgd_step_fp16_master_list_, sgd_step_qmom_list_), on the CPU: found_inf == 0 steps exactly as the
call without it; != 0 (NaN included) leaves every tensor's bits as they were (the gradients are
read only: the optimizer unscales them with torch's op first); a bad found_inf
raises, naming it, before anything is written; opcheck with found_inf given. The CUDA kernels'
skip is checked on the host (tests/test_cuda_host.py, a fourth step skipped, with planted bugs)
and on a GPU (tests/test_gpu.py); the Triton kernels' under the interpreter
(tests/test_triton_amp.py); the optimizer's replay under GradScaler in tests/test_steady_modes.py.
"""
import contextlib

import pytest
import torch

import momentum_cuda

from conftest import no_host_reads

OPS = {
    "master": torch.ops.momentum_cuda.sgd_step_master_list_.default,
    "fp16-master": torch.ops.momentum_cuda.sgd_step_fp16_master_list_.default,
    "bf16-momentum": torch.ops.momentum_cuda.sgd_step_qmom_list_.default,
    "int8-momentum": torch.ops.momentum_cuda.sgd_step_qmom_list_.default,
}
SHAPES = [(0,), (1,), (3,), (97,), (5, 61), (300,)]  # 300: two int8 blocks, the second partial
HYPER = (0.05, 0.9, 0.1, 1e-2, False, True)  # lr, momentum, dampening, weight_decay, nesterov,
# maximize


def _tensors(mode, seed):
    """(params, grads, buffers, extra lists...): fresh random values, never zeros."""
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, dtype, scale=1.0):
        return (torch.randn(shape, generator=gen) * scale).to(dtype)

    if mode == "master":
        ps = [rand(s, torch.bfloat16) for s in SHAPES]
        gs = [rand(s, torch.bfloat16, 1e-2) for s in SHAPES]
        bs = [rand(s, torch.float32, 1e-2) for s in SHAPES]
        rems = [torch.randint(-2**15, 2**15, s, generator=gen, dtype=torch.int16) for s in SHAPES]
        ties = [torch.randint(0, 256, ((p.numel() + 7) // 8,), generator=gen,
                              dtype=torch.uint8) for p in ps]
        for t, p in zip(ties, ps):  # the bits past numel are 0
            if p.numel() % 8:
                t[-1] &= (1 << (p.numel() % 8)) - 1
        return [ps, gs, bs, rems, ties]
    if mode == "fp16-master":
        ms = [rand(s, torch.float32) for s in SHAPES]
        return [[m.half() for m in ms], [rand(s, torch.float16, 1e-2) for s in SHAPES],
                [rand(s, torch.float32, 1e-2) for s in SHAPES], ms]
    ps = [rand(s, torch.float32) for s in SHAPES]
    gs = [rand(s, torch.float32, 1e-2) for s in SHAPES]
    if mode == "bf16-momentum":
        return [ps, gs, [rand(s, torch.bfloat16, 1e-2) for s in SHAPES], []]
    codes = [torch.randint(-127, 128, s, generator=gen, dtype=torch.int8) for s in SHAPES]
    scales = [torch.rand(((p.numel() + 255) // 256,), generator=gen) * 1e-4 for p in ps]
    return [ps, gs, codes, scales]


def _clone(lists):
    return [[t.clone() for t in ts] for ts in lists]


def _bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(
        {1: torch.uint8, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(a_lists, b_lists, what):
    for k, (a_ts, b_ts) in enumerate(zip(a_lists, b_lists)):
        for i, (a, b) in enumerate(zip(a_ts, b_ts)):
            assert torch.equal(_bits(a), _bits(b)), f"{what}: argument {k}[{i}]"


@pytest.mark.parametrize("first_step", [False, True], ids=["step", "first"])
@pytest.mark.parametrize("mode", list(OPS))
def test_found_inf_zero_steps_and_nonzero_skips(mode, first_step):
    """found_inf = 0: the bits of the call without it; 1, inf or NaN: nothing written; three
    steps each. (Version counters go up as for a step: on a GPU the host cannot know, as for the
    plain ops.)"""
    op = OPS[mode]
    plain = _tensors(mode, 3)
    given = _clone(plain)
    for step in range(3):
        first = first_step and step == 0
        for lists in (plain, given):  # the same fresh gradients for both
            for g, n in zip(lists[1], _tensors(mode, 10 + step)[1]):
                g.copy_(n)
        op(*plain, *HYPER, first)
        op(*given, *HYPER, first, found_inf=torch.zeros(()))
        _same(given, plain, f"{mode} step {step}: found_inf=0")
        for value in (1.0, float("inf"), float("nan")):
            before = _clone(given)
            op(*given, *HYPER, first, found_inf=torch.tensor(value))
            _same(given, before, f"{mode} step {step}: found_inf={value}")


@pytest.mark.parametrize("bad, frag", [
    (torch.zeros((), dtype=torch.float64), "found_inf must be a 1-element float32 tensor"),
    (torch.zeros(2), "found_inf must be a 1-element float32 tensor"),
    (torch.zeros((), device="meta"), "found_inf"),
], ids=["float64", "two-elements", "meta"])
@pytest.mark.parametrize("mode", list(OPS))
def test_bad_found_inf_raises_before_writing(mode, bad, frag):
    op = OPS[mode]
    lists = _tensors(mode, 4)
    before = _clone(lists)
    with pytest.raises(RuntimeError, match=frag):
        op(*lists, *HYPER, False, found_inf=bad)
    _same(lists, before, f"{mode}: a refused call")


@pytest.mark.parametrize("found", [0.0, 1.0], ids=["finite", "overflow"])
@pytest.mark.parametrize("mode", list(OPS))
def test_opcheck_with_found_inf(mode, found):
    result = torch.library.opcheck(OPS[mode], (*_tensors(mode, 5), *HYPER, False),
                                   {"found_inf": torch.tensor(found)})
    assert all(v == "SUCCESS" for v in result.values()), result


def test_empty_lists_with_found_inf_are_a_no_op():
    for mode, op in OPS.items():
        n = len(_tensors(mode, 6))
        op(*([[]] * n), *HYPER, False, found_inf=torch.ones(()))


# optimizer configurations of the modes that take found_inf: (parameter dtype, SGD options)
MODE_CONFIGS = {"master": (torch.bfloat16, dict(master_weights=True)),
                "fp16-master": (torch.float16, dict(master_weights=True)),
                "bf16-momentum": (torch.float32, dict(momentum_dtype=torch.bfloat16)),
                "int8-momentum": (torch.float32, dict(momentum_dtype=torch.int8))}


# the hyper-parameters held in tensors (tensors=True below): their dtypes, and their values at
# step k: weight_decay 0 on step 3 and momentum 0 on step 6 (their ops skipped, the buffers kept)
HYPER_DTYPES = {"lr": torch.float32, "momentum": torch.float32, "dampening": torch.float64,
                "weight_decay": torch.float64}


def scheduled_hyper(k) -> dict:
    return {"lr": 0.05 * 0.9 ** k, "momentum": 0.0 if k == 5 else 0.9 - 0.01 * k,
            "dampening": 0.1 + 0.01 * k, "weight_decay": 0.0 if k == 2 else 1e-2}


def replay_under_gradscaler(mode, backend, move=lambda t: t, scaler_device="cpu",
                            twin_backend=None, overflows=(3, 4), schedule=False, clip=False,
                            tensors=False):
    """momentum_cuda.SGD(backend=backend) in a mode under torch.amp.GradScaler(scaler_device),
    its tensors moved by `move`: after the first step that GradScaler does not skip (which
    makes the state, found_inf read on the host) no host read (planned, then from the next
    step replayed: torch's unscale, found_inf to the kernels); overflows on the steps
    `overflows` counts from 0 (0: the first step is skipped and makes no state),
    GradScaler.unscale_ before step 5 (the step then gets found_inf without grad_scale; not
    for fp16 gradients, which it refuses); `schedule`: a new float lr every step (a
    scheduler's), so every step is planned, none replayed; `clip`: on steps 5 and 6 (the first
    one overflowed) GradScaler.unscale_ then opt.clip_grad_norm_ (not for fp16); `tensors`:
    lr, momentum, dampening and weight_decay are tensors on the parameters' device
    (HYPER_DTYPES), changed in place every step (scheduled_hyper), read by the kernels (the
    twin's floats are their values; its step that makes the buffers reads momentum on the
    host, as torch's for-loop does). A fourth
    parameter never gets a gradient. The twin, the same optimizer on twin_backend (default:
    backend), never sees GradScaler: its gradients (the same loss times the same scale) are
    unscaled with torch's own op, clipped by torch.nn.utils.clip_grad_norm_ over all four, and
    it steps where the unscale finds no inf, as GradScaler + torch.optim.SGD do it. Compared
    bitwise: parameters, gradients and their presence, every state tensor, the norms. Shared by
    this file, tests/test_triton_amp.py and tests/test_gpu.py."""
    dtype, kw = MODE_CONFIGS[mode]
    gen = torch.Generator().manual_seed(61)
    values = [move(torch.randn(s, generator=gen).to(dtype))
              for s in ((97,), (5, 61), (300,), (7,))]  # the last one unused
    sides = []
    for b in (backend, twin_backend or backend):
        ps = [v.clone().requires_grad_() for v in values]
        h = scheduled_hyper(0)
        if tensors and not sides:
            h = {k: move(torch.tensor(v, dtype=HYPER_DTYPES[k])) for k, v in h.items()}
        sides.append((ps, momentum_cuda.SGD(ps, **h, backend=b, **kw)))
    (ps, opt), (qs, topt) = sides
    sc = torch.amp.GradScaler(scaler_device, init_scale=2.0**10, growth_interval=2)
    made = None  # the step that made the state
    for k in range(7):
        gs = [move(torch.randn(v.shape, generator=gen).to(dtype)) for v in values[:3]]
        if k in overflows:
            gs[1].view(-1)[0] = float("inf")
        elif made is None:
            made = k
        if schedule:
            for o in (opt, topt):
                o.param_groups[0]["lr"] = 0.05 * 0.9 ** k
        if tensors:
            for name, v in scheduled_hyper(k).items():
                opt.param_groups[0][name].fill_(v)
                topt.param_groups[0][name] = float(torch.tensor(v, dtype=HYPER_DTYPES[name]))
        scale = sc.get_scale()
        for xs, o in sides:
            o.zero_grad()
            loss = torch.stack([(x * g).sum().float() for x, g in zip(xs, gs)]).sum()
            (sc.scale(loss) if o is opt else loss * scale).backward()
        clips = clip and k in (4, 5) and dtype is not torch.float16
        if (k == 5 or clips) and dtype is not torch.float16:  # (unscale_ refuses fp16)
            sc.unscale_(opt)  # GradScaler's own unscale first: the step gets found_inf
        if clips:
            norm = opt.clip_grad_norm_(0.05)
        with no_host_reads() if made is not None and k > made else contextlib.nullcontext():
            sc.step(opt)
        sc.update()
        found = torch.zeros((), device=qs[0].device)  # (GradScaler.unscale_'s op and inv)
        inv = torch.tensor(scale, dtype=torch.float64).reciprocal().float().to(found.device)
        for q in qs[:3]:
            torch._amp_foreach_non_finite_check_and_unscale_([q.grad], found, inv)
        what = f"{mode} step {k + 1}"
        if clips:
            tnorm = torch.nn.utils.clip_grad_norm_(qs, 0.05)
            assert torch.equal(_bits(norm), _bits(tnorm)), f"{what}: total norm"
        if found.item() == 0:
            topt.step()
        for i, (p, q) in enumerate(zip(ps, qs)):
            assert torch.equal(_bits(p.detach()), _bits(q.detach())), f"{what}: param {i}"
            assert (p.grad is None) == (q.grad is None) == (i == 3), f"{what}: gradient {i}"
            if q.grad is not None:
                assert torch.equal(_bits(p.grad), _bits(q.grad)), f"{what}: gradient {i}"
            a, b = opt.state.get(p, {}), topt.state.get(q, {})
            assert a.keys() == b.keys(), f"{what}: state keys {i}"
            for key in a:
                if isinstance(a[key], torch.Tensor):
                    assert torch.equal(_bits(a[key]), _bits(b[key])), f"{what}: {key} {i}"
        if made is not None and k > made:  # (a pending clip: torch's op first, its own entry)
            assert ([e["path"] for e in opt.last_step][:1] == ["torch-clip"]) == clips, what
            assert {e["backend"] for e in opt.last_step[clips:]} == {backend}, (what,
                                                                                opt.last_step)
        elif k not in overflows:
            assert opt.state, f"{what}: no state made"
        else:
            assert not opt.state and not opt.last_step, f"{what}: a skipped first step ran"


@pytest.mark.parametrize("mode", list(MODE_CONFIGS))
def test_optimizer_replays_under_gradscaler(mode):
    replay_under_gradscaler(mode, "cpu")


@pytest.mark.parametrize("mode", list(MODE_CONFIGS))
def test_skipped_first_steps_make_no_state(mode):
    """Steps 1 and 2 overflow: GradScaler skips them, and the mode makes no state (found_inf
    read on the host for those calls); then the run as above."""
    replay_under_gradscaler(mode, "cpu", overflows=(0, 1, 4))


@pytest.mark.parametrize("mode", list(MODE_CONFIGS))
def test_clip_under_gradscaler(mode):
    """GradScaler.unscale_, opt.clip_grad_norm_ (with a parameter that has no gradient) and
    scaler.step on an overflowed step and on the next, with a new lr every step: torch's clip
    and unscale bits, found_inf read on the host by nothing but the first step."""
    replay_under_gradscaler(mode, "cpu", schedule=True, clip=True)


@pytest.mark.parametrize("mode", list(MODE_CONFIGS))
def test_tensor_hyper_parameters_under_gradscaler(mode):
    """lr, momentum, dampening and weight_decay in tensors changed in place every step (a zero
    weight_decay, then a zero momentum among them), read by the kernels: the bits of the same
    optimizer given their values as floats, and no host read after the step that made the
    state."""
    replay_under_gradscaler(mode, "cpu", tensors=True)


@pytest.mark.parametrize("mode", list(MODE_CONFIGS))
def test_tensor_hyper_parameters_and_clip_under_gradscaler(mode):
    """The same with GradScaler.unscale_ and opt.clip_grad_norm_ (a parameter without a
    gradient among them) on an overflowed step and the next: torch's clip and unscale bits."""
    replay_under_gradscaler(mode, "cpu", tensors=True, clip=True)


@pytest.mark.parametrize("mode", list(MODE_CONFIGS))
def test_scheduled_lr_planned_steps_read_nothing(mode):
    """A scheduler's new float lr every step: every step is planned, and none after the first
    reads found_inf on the host (the calls make no state: they skip on the device)."""
    replay_under_gradscaler(mode, "cpu", schedule=True)
