"""Master weights for bf16 parameters (issue 14): the op sgd_step_master_list_ against the
plain-torch contract (momentum_cuda.reference.sgd_master_reference_step: torch.optim.SGD's fp32
step on the master bf16_join gives, split again), bit for bit: parameters, remainders, packed
tie bits and fp32 momentum buffers, every flag set, odd sizes, several steps, both CPU
instruction sets and thread counts; bad input raises naming the argument and writes nothing;
opcheck."""
import math

import pytest
import torch

from momentum_cuda import _C
from momentum_cuda.reference import (bf16_join, bf16_split, pack_ties,
                                     sgd_master_reference_step, unpack_ties)

from conftest import bits, hyper_id, same_address_new_storage, sgd_hyper_grid

OP = torch.ops.momentum_cuda.sgd_step_master_list_.default
SIZES = [0, 1, 3, 7, 8, 9, 16, 97, 1000]
GRID = sgd_hyper_grid()


def _masters(n, gen):
    """fp32 masters with every rounding case: random values, and a quarter of them moved to a
    halfway point (low half 0x8000), where the tie bit decides."""
    m = torch.randn(n, generator=gen)
    u = m.view(torch.int32)
    half = torch.rand(n, generator=gen) < 0.25
    u[half] = (u[half] & ~0xFFFF) | 0x8000
    return m


def _state(sizes, seed, first):
    """(params, grads, bufs, rems, ties) for the op; the reference gets clones."""
    gen = torch.Generator().manual_seed(seed)
    params, rems, ties, grads, bufs = [], [], [], [], []
    for n in sizes:
        p, r, t = bf16_split(_masters(n, gen))
        params.append(p)
        rems.append(r)
        ties.append(pack_ties(t))
        grads.append(torch.randn(n, generator=gen).to(torch.bfloat16))
        bufs.append(torch.empty(n) if first else torch.randn(n, generator=gen))
    return params, grads, bufs, rems, ties


def _clone(lists):
    return [[t.clone() for t in ts] for ts in lists]


def _run_both(state, h, first, steps=1, gen=None):
    ours = _clone(state)
    ref = _clone(state)
    ref_bufs = [None] * len(ref[0]) if first else ref[2]
    for s in range(steps):
        f = first and s == 0
        OP(ours[0], ours[1], ours[2] if h["momentum"] else [], ours[3], ours[4], 0.05,
           h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"], h["maximize"], f)
        ref_bufs = sgd_master_reference_step(ref[0], ref[1], ref_bufs, ref[3], ref[4], lr=0.05,
                                             **h)
        for name, k in (("param", 0), ("remainder", 3), ("ties", 4)):
            for i, (a, b) in enumerate(zip(ours[k], ref[k])):
                assert torch.equal(bits(a), bits(b)), f"step {s + 1}: {name} {i}"
        if h["momentum"]:
            for i, (a, b) in enumerate(zip(ours[2], ref_bufs)):
                assert torch.equal(bits(a), bits(b)), f"step {s + 1}: momentum buffer {i}"
        if gen is not None:  # fresh gradients for the next step
            for g_ours, g_ref in zip(ours[1], ref[1]):
                g_ours.copy_(torch.randn(g_ours.shape, generator=gen).to(torch.bfloat16))
                g_ref.copy_(g_ours)
    return ours


CASES = [(h, first) for h in GRID for first in (False, True) if h["momentum"] or not first]


@pytest.mark.parametrize("h,first", CASES, ids=[hyper_id(h) + ("-first" if f else "")
                                                for h, f in CASES])
def test_every_flag_set_against_the_contract(h, first):
    _run_both(_state(SIZES, 0, first), h, first, steps=3, gen=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("isa", ["avx2", "default"])
@pytest.mark.parametrize("threads", [1, 2])
def test_large_and_split_across_threads(isa, threads):
    """2^20+3 elements (more than one thread's grain: the split is at tie bytes) and sizes
    that end mid-byte, on each instruction set the CPU has."""
    try:
        old = _C.set_cpu_isa(isa)
    except RuntimeError:
        pytest.skip(f"this CPU has no {isa}")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        h = dict(momentum=0.9, dampening=0.0, nesterov=True, weight_decay=1e-2, maximize=False)
        _run_both(_state([(1 << 20) + 3, 13, 5], 1, False), h, False, steps=2,
                  gen=torch.Generator().manual_seed(3))
    finally:
        torch.set_num_threads(old_threads)
        _C.set_cpu_isa(old)


def test_master_is_torchs_fp32_step_over_many_steps():
    """The contract end to end: the joined master after 20 steps equals torch.optim.SGD run on
    fp32 copies of the masters with the bf16 gradients widened, and the parameter is that
    master rounded to nearest even (so small updates accumulate: a bf16-only SGD loses them)."""
    gen = torch.Generator().manual_seed(5)
    m0 = _masters(4097, gen)
    p, r, t = bf16_split(m0)
    t = pack_ties(t)
    buf = torch.empty(4097)
    twin = m0.clone().requires_grad_()
    topt = torch.optim.SGD([twin], lr=1e-4, momentum=0.9, foreach=False)
    for step in range(20):
        g = torch.randn(4097, generator=gen).to(torch.bfloat16)
        OP([p], [g], [buf], [r], [t], 1e-4, 0.9, 0.0, 0.0, False, False, step == 0)
        twin.grad = g.float()
        topt.step()
        master = bf16_join(p, r, unpack_ties(t, p))
        assert torch.equal(bits(master), bits(twin.detach())), f"step {step + 1}: master"
        assert torch.equal(bits(p), bits(twin.detach().to(torch.bfloat16))), "parameter"
        assert torch.equal(bits(buf), bits(topt.state[twin]["momentum_buffer"]))
    plain = m0.to(torch.bfloat16)  # the same steps in bf16 alone
    assert not torch.equal(bits(p), bits(plain))


def test_tie_bits_past_the_end_stay_zero():
    state = _state([13], 2, False)
    ours = _run_both(state, dict(momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0,
                                 maximize=False), False)
    assert ours[4][0][1].item() >> 5 == 0  # elements 13..15 do not exist


def _bad_cases():
    """(what to change, expected message) for one list of two items."""
    return [
        (lambda s: (s[0].__setitem__(0, s[0][0].float()), s[1].__setitem__(0, s[1][0].float())),
         r"params\[0\] must be bfloat16 \(master weights split a bf16 parameter\), got Float"),
        (lambda s: s[0].__setitem__(1, s[0][1].float()), r"params\[1\] has dtype Float but "
                                                         r"params\[0\] has dtype BFloat16"),
        (lambda s: s[2].__setitem__(0, s[2][0].to(torch.bfloat16)),
         r"momentum_buffers\[0\] must be a Float tensor"),
        (lambda s: s[3].__setitem__(1, s[3][1].int()), r"remainders\[1\] must be a Short tensor"),
        (lambda s: s[3].__setitem__(0, s[3][0][:-1]), r"remainders\[0\] must be a Short tensor .* "
                                                      r"shape \[9\]"),
        (lambda s: s[4].__setitem__(0, torch.zeros(1, dtype=torch.uint8)),
         r"ties\[0\] must be a contiguous 1-D uint8 tensor of 2 bytes"),
        (lambda s: s[1].__setitem__(0, s[1][0].float()), r"grads\[0\] has dtype Float"),
        (lambda s: s[3].__setitem__(1, s[3][0][:5]), r"remainders\[.\] overlaps remainders\[.\]"),
        (lambda s: s[4].pop(), r"ties has 1 tensors but params has 2"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_names_the_argument_and_writes_nothing(case):
    change, message = _bad_cases()[case]
    state = list(map(list, _state([9, 5], 3, False)))
    change(state)
    before = _clone(state)
    with pytest.raises(RuntimeError, match=message):
        OP(*state, 0.05, 0.9, 0.0, 0.0, False, False, False)
    for ts, bs in zip(state, before):
        for a, b in zip(ts, bs):
            assert torch.equal(bits(a), bits(b))


def test_version_counters_of_written_tensors():
    """params, buffers, remainders and ties are written (bumped, as in-place ops do); the
    gradients are read only."""
    state = _state([9], 4, False)
    versions = [[t._version for t in ts] for ts in state]
    OP(*state, 0.05, 0.9, 0.0, 0.0, False, False, False)
    after = [[t._version for t in ts] for ts in state]
    assert [a[0] - v[0] for a, v in zip(after, versions)] == [1, 0, 1, 1, 1]


def test_opcheck():
    state = _state([9, 17], 6, False)
    torch.library.opcheck(OP, (*state, 0.05, 0.9, 0.1, 1e-2, False, True, False))
    torch.library.opcheck(OP, (*_state([4], 7, True), 0.05, 0.9, 0.0, 0.0, True, False, True))


# ---- the optimizers: master_weights=True against torch.optim.SGD on fp32 twins ---------------
import copy  # noqa: E402

import momentum_cuda  # noqa: E402
from momentum_cuda.reference import MomentumReference  # noqa: E402

from conftest import fresh_grads  # noqa: E402

BF16_SIZES = [1, 3, 97, 16, 33]


class MasterTwins:
    """bf16 (or, given dtype, fp16) parameters (and two fp32 ones, laid out flat) stepped by
    momentum_cuda with master_weights=True; their fp32 twins (the bf16 values widened: the
    masters start there) stepped by torch.optim.SGD(foreach=False) (MomentumReference for
    Momentum) with the bf16 gradients widened. check(): every master, parameter and momentum
    buffer bit for bit."""

    def __init__(self, flat, kind="sgd", h=None, seed=0, dtype=torch.bfloat16,
                 sizes=BF16_SIZES):
        gen = torch.Generator().manual_seed(seed)
        self.ours = [torch.nn.Parameter(_masters(n, gen).to(dtype)) if isinstance(n, int) else
                     torch.nn.Parameter(_masters(math.prod(n), gen).view(n).to(dtype))
                     for n in sizes]
        self.ours += [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (5, 8)]
        self.twin = [torch.nn.Parameter(p.detach().float().clone()) for p in self.ours]
        h = h or dict(lr=0.01, momentum=0.9, weight_decay=1e-2)
        groups = lambda ps: [{"params": ps[:3]}, {"params": ps[3:], "lr": 0.02}]  # noqa: E731
        if kind == "sgd":
            self.opt = momentum_cuda.SGD(groups(self.ours), flat=flat, master_weights=True, **h)
            self.topt = torch.optim.SGD(groups(self.twin), foreach=False, **h)
        else:
            self.opt = momentum_cuda.Momentum(groups(self.ours), flat=flat, master_weights=True,
                                              **h)
            self.topt = MomentumReference(groups(self.twin), **h)
        self.gen = torch.Generator().manual_seed(seed + 1)

    def grads(self):
        """zero_grad() and backward on both sides: ours gets bf16 gradients, the twins them
        widened."""
        gs = fresh_grads(self.ours, self.gen)
        for o in (self.opt, self.topt):
            o.zero_grad()
        torch.stack([(p * g).sum().float() for p, g in zip(self.ours, gs)]).sum().backward()
        torch.stack([(t * g.float()).sum() for t, g in zip(self.twin, gs)]).sum().backward()

    def step(self, n=1):
        for _ in range(n):
            self.grads()
            self.opt.step()
            self.topt.step()
            self.check()

    def check(self, what=""):
        for i, (p, t) in enumerate(zip(self.ours, self.twin)):
            if p.dtype in (torch.bfloat16, torch.float16):
                assert torch.equal(bits(self.opt.master_weight(p)), bits(t)), f"{what} master {i}"
                assert torch.equal(bits(p), bits(t.detach().to(p.dtype))), f"{what} p {i}"
            else:
                assert torch.equal(bits(p), bits(t)), f"{what} param {i}"
            a = self.opt.state.get(p, {}).get("momentum_buffer")
            b = self.topt.state.get(t, {}).get("momentum_buffer")
            assert (a is None) == (b is None), f"{what} buffer presence {i}"
            if b is not None:
                assert a.dtype == b.dtype and torch.equal(bits(a), bits(b)), f"{what} buffer {i}"


FLAT = pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
DTYPE = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
OPT_CASES = [("sgd", dict(lr=0.01, momentum=0.9, weight_decay=1e-2)),
             ("sgd", dict(lr=0.01, momentum=0.9, nesterov=True, maximize=True)),
             ("sgd", dict(lr=0.01, momentum=0.5, dampening=0.3)),
             ("sgd", dict(lr=0.003)),
             ("ema", dict(lr=0.01, momentum=0.8, weight_decay=1e-2))]


@FLAT
@pytest.mark.parametrize("kind,h", OPT_CASES, ids=[f"{k}-{i}" for i, (k, _) in
                                                   enumerate(OPT_CASES)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_training_loop_against_fp32_twins(flat, kind, h, dtype):
    tw = MasterTwins(flat, kind, h, dtype=dtype)
    tw.step(6)
    paths = sorted({e["path"] for e in tw.opt.last_step})
    assert "master" in paths and ("flat" in paths) == flat


@FLAT
def test_small_updates_accumulate_where_bf16_alone_stalls(flat):
    """lr small enough that each update is below half a bf16 ulp: the masters move, the
    parameters eventually follow; plain bf16 SGD leaves them where they started."""
    tw = MasterTwins(flat, h=dict(lr=1e-5, momentum=0.9))
    start = [p.detach().clone() for p in tw.ours[:5]]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in tw.ours[:5]]
    popt = torch.optim.SGD(plain, lr=1e-5, momentum=0.9, foreach=False)
    for _ in range(30):
        tw.grads()
        for q, p in zip(plain, tw.ours[:5]):
            q.grad = p.grad.clone()
        tw.opt.step()
        tw.topt.step()
        popt.step()
    tw.check()
    moved = sum(int((p != s).sum()) for p, s in zip(tw.ours[:5], start))
    stuck = sum(int((q != s).sum()) for q, s in zip(plain, start))
    assert moved > stuck


@FLAT
@DTYPE
def test_writes_to_a_parameter_restart_its_master(flat, dtype):
    """A parameter written between steps (copy_ under no_grad, the model's load_state_dict)
    or given new memory restarts its master from its value; the twin gets the same values."""
    tw = MasterTwins(flat, dtype=dtype)
    tw.step(3)
    new = torch.randn(97, generator=tw.gen).to(dtype)
    with torch.no_grad():
        tw.ours[2].copy_(new)
        tw.twin[2].copy_(new.float())
        tw.ours[0].data = tw.ours[0].data.clone()  # same bf16 value, new memory
        tw.twin[0].data = tw.ours[0].data.float()
    tw.step(3)


@FLAT
@DTYPE
@pytest.mark.parametrize("steps", [1, 3], ids=["planned", "replayed"])
def test_new_memory_at_the_same_address_restarts_the_master(flat, dtype, steps):
    """New values in new memory at the address the parameter had (the same data_ptr and
    version): the master restarts from them, as for any new memory, whether the step after
    it is planned or would be replayed (the replay's check compares the storage too); the
    twin gets the same values. Before, the stale remainder (or fp16 master) stayed."""
    tw = MasterTwins(flat, dtype=dtype)
    tw.step(steps)
    new = torch.randn(97, generator=tw.gen).to(dtype)
    with torch.no_grad():
        same_address_new_storage(tw.ours[2], new)
        tw.twin[2].copy_(new.float())
    tw.step(2)


@FLAT
@DTYPE
def test_state_dict_round_trip_and_deepcopy(flat, dtype):
    tw = MasterTwins(flat, dtype=dtype)
    tw.step(2)
    sd = tw.opt.state_dict()
    p0 = sd["state"][0]
    assert p0["momentum_buffer"].dtype == torch.float32
    if dtype is torch.bfloat16:
        assert p0["master_remainder"].dtype == torch.int16
        assert p0["master_ties"].dtype == torch.uint8
    else:  # torch's load_state_dict would cast it to float16
        assert set(p0) == {"momentum_buffer", "master_weight"}
        assert p0["master_weight"].dtype == torch.float32
    fresh = momentum_cuda.SGD([{"params": tw.ours[:3]}, {"params": tw.ours[3:], "lr": 0.02}],
                              lr=0.01, momentum=0.9, weight_decay=1e-2, flat=flat,
                              master_weights=True)
    fresh.load_state_dict(copy.deepcopy(sd))
    assert fresh.state[tw.ours[0]]["momentum_buffer"].dtype == torch.float32
    if dtype is torch.float16:
        assert fresh.state[tw.ours[0]]["master_weight"].dtype == torch.float32
    tw.opt = fresh
    tw.step(2)
    clone = copy.deepcopy(tw)  # model, optimizer and twins together
    clone.step(2)


@FLAT
@DTYPE
def test_plain_fp32_checkpoint_loads(flat, dtype):
    """torch.optim.SGD's state (fp32 momentum buffers) loads into master weights: the buffers
    stay fp32; each master starts from its (loaded) bf16 parameter."""
    tw = MasterTwins(flat, dtype=dtype)
    tw.step(2)
    loaded = MasterTwins(flat, seed=3, dtype=dtype)
    with torch.no_grad():
        for p, q, t in zip(loaded.ours, tw.ours, loaded.twin):
            p.copy_(q)
            t.copy_(q.float())  # the twin: the bf16 model's values, widened
    loaded.opt.load_state_dict(copy.deepcopy(tw.topt.state_dict()))
    loaded.topt.load_state_dict(copy.deepcopy(tw.topt.state_dict()))
    assert all(g["master_weights"] for g in loaded.opt.param_groups)  # not torch's key: kept
    loaded.step(3)


@FLAT
def test_gradscaler_and_clip_use_torchs_own_ops_first(flat):
    """GradScaler (unscale, found_inf read on the host) and clip_grad_norm_ (torch's clip)
    run before the master op, with a bf16 and an fp32 parameter unused on one step; the twins
    step on the unscaled, clipped gradients widened. (fp16 parameters: GradScaler.unscale_
    itself refuses fp16 gradients, "Attempting to unscale FP16 gradients", whatever the
    optimizer.)"""
    tw = MasterTwins(flat)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for step in range(4):
        gs = fresh_grads(tw.ours, tw.gen)
        if step == 1:
            gs[2][0] = float("inf")
        tw.opt.zero_grad()
        used = [k for k in range(len(tw.ours)) if not (step == 2 and k in (1, 5))]  # unused
        scaler.scale(torch.stack([(tw.ours[k] * gs[k]).sum().float()
                                  for k in used]).sum()).backward()
        scaler.unscale_(tw.opt)
        tw.opt.clip_grad_norm_(0.5)
        found = sum(v.item() for v in scaler._per_optimizer_states[id(tw.opt)]["found_inf_per_device"].values())
        scaler.step(tw.opt)
        scaler.update()
        for p, t in zip(tw.ours, tw.twin):
            t.grad = None if p.grad is None else p.grad.float()
        if not found:
            tw.topt.step()
        tw.check(f"step {step + 1}")


@DTYPE
def test_turning_master_weights_on_mid_training(dtype):
    """A bf16 (fp16) group trained plainly, then master_weights=True: its parameters leave the
    flat layout, their buffers widen exactly, and from then on they follow fp32 twins started
    from their values and buffers."""
    gen = torch.Generator().manual_seed(8)
    ps = [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in (7, 40)]
    opt = momentum_cuda.SGD(ps, lr=0.01, momentum=0.9)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    assert {e["path"] for e in opt.last_step} <= {"flat", "per-tensor"}
    opt.param_groups[0]["master_weights"] = True
    twin = [torch.nn.Parameter(p.detach().float()) for p in ps]
    topt = torch.optim.SGD(twin, lr=0.01, momentum=0.9, foreach=False)
    for p, t in zip(ps, twin):
        topt.state[t]["momentum_buffer"] = opt.state[p]["momentum_buffer"].float()
    for _ in range(3):
        for p, t in zip(ps, twin):
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            t.grad = p.grad.float()
        opt.step()
        topt.step()
        assert [e["path"] for e in opt.last_step] == ["master"]
        for p, t in zip(ps, twin):
            assert torch.equal(bits(opt.master_weight(p)), bits(t))
            assert torch.equal(bits(opt.state[p]["momentum_buffer"]),
                               bits(topt.state[t]["momentum_buffer"]))


def test_master_weights_errors():
    with pytest.raises(ValueError, match="cannot be used with differentiable=True"):
        momentum_cuda.SGD([torch.nn.Parameter(torch.ones(3))], lr=0.1, master_weights=True,
                          differentiable=True)
    p = torch.nn.Parameter(torch.ones(3))
    opt = momentum_cuda.SGD([p], lr=0.1, master_weights=True)
    with pytest.raises(ValueError, match="has no master"):
        opt.master_weight(p)
    q = torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))
    opt = momentum_cuda.SGD([q], lr=0.1, master_weights=True)
    q.grad = torch.ones_like(q)
    with pytest.raises(RuntimeError, match="traced by torch.compile is not supported"):
        opt._step_traced(None)
    assert torch.equal(q, torch.ones(3, dtype=torch.bfloat16))  # nothing stepped


@FLAT
def test_scheduler_group_added_zero_grad_kept_and_pickle(flat, tmp_path):
    """A StepLR schedule, zero_grad(set_to_none=False), a bf16 parameter added as a new group
    mid-training, and torch.save / torch.load of the optimizer with its model."""
    tw = MasterTwins(flat)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5)
              for o in (tw.opt, tw.topt)]
    for step in range(6):
        tw.grads()
        if step == 2:
            for o in (tw.opt, tw.topt):
                o.zero_grad(set_to_none=False)
            tw.grads()
        if step == 3:
            new = _masters(21, tw.gen).to(torch.bfloat16)
            p, t = torch.nn.Parameter(new.clone()), torch.nn.Parameter(new.float())
            tw.ours.append(p)
            tw.twin.append(t)
            tw.opt.add_param_group({"params": [p], "lr": 0.005})
            tw.topt.add_param_group({"params": [t], "lr": 0.005})
            p.grad = torch.randn(21, generator=tw.gen).to(torch.bfloat16)
            t.grad = p.grad.float()
        tw.opt.step()
        tw.topt.step()
        for s in scheds:
            s.step()
        tw.check(f"step {step + 1}")
    path = tmp_path / "ck.pt"
    torch.save({"ours": tw.ours, "opt": tw.opt}, path)
    loaded = torch.load(path, weights_only=False)
    tw.ours, tw.opt = loaded["ours"], loaded["opt"]
    tw.step(2)


def test_channels_last_parameter():
    """A 4-D bf16 parameter in channels_last memory: the kernel walks memory order (its
    remainder has the same strides, the tie bits follow memory order); master_weight lays
    them back out."""
    gen = torch.Generator().manual_seed(11)
    m = _masters(2 * 3 * 5 * 5, gen).view(2, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    param, rem, tie = bf16_split(m)  # a quarter of the masters at halfway points: ties set
    p = torch.nn.Parameter(param)
    assert not p.is_contiguous() and rem.stride() == p.stride() and tie.any()
    t = torch.nn.Parameter(m.clone())
    opt = momentum_cuda.SGD([p], lr=0.01, momentum=0.9, master_weights=True)
    topt = torch.optim.SGD([t], lr=0.01, momentum=0.9, foreach=False)
    # the state as the kernel keeps it: tie bits in memory order (NHWC for channels_last)
    opt.state[p].update(master_remainder=rem, master_ties=pack_ties(tie))
    assert torch.equal(pack_ties(tie), pack_ties(tie.permute(0, 2, 3, 1).contiguous()))
    assert torch.equal(bits(opt.master_weight(p)), bits(m))
    for step in range(4):
        g = torch.randn(p.shape, generator=gen).to(torch.bfloat16)
        p.grad = g.contiguous(memory_format=torch.channels_last)
        t.grad = g.float()
        opt.step()
        topt.step()
        assert torch.equal(bits(opt.master_weight(p)), bits(t)), f"step {step + 1}"
        assert opt.state[p]["master_remainder"].stride() == p.stride()


@FLAT
@pytest.mark.parametrize("how", ["state_dict", "deepcopy"])
def test_written_master_leaves_settled(flat, how):
    """A parameter written after its last step and before state_dict() / deepcopy: the copy or
    the loaded checkpoint carries the written value as the master (found by
    test_master_sequences: the stale remainder came back joined to the new value)."""
    tw = MasterTwins(flat)
    tw.step(2)
    with torch.no_grad():
        tw.ours[0].mul_(-3.0)
        tw.twin[0].copy_(tw.ours[0].float())
    if how == "state_dict":
        sd = copy.deepcopy(tw.opt.state_dict())
        tw.opt.load_state_dict(sd)
        tw.topt.load_state_dict(copy.deepcopy(tw.topt.state_dict()))
    else:
        tw.ours, tw.opt = copy.deepcopy((tw.ours, tw.opt))
        tw.twin, tw.topt = copy.deepcopy((tw.twin, tw.topt))
    tw.check("after the write")
    tw.step(2)


@FLAT
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_write_after_a_copy_restarts_the_copys_master(flat, dtype, how):
    """A parameter of a copied optimizer (deepcopy or pickle of parameters and optimizer
    together) written before the copy's first step: its master restarts from the written value,
    as in the original (the copy knows its parameters' versions from the start)."""
    import pickle
    tw = MasterTwins(flat, dtype=dtype)
    tw.step(2)
    pair = (tw.ours, tw.opt)
    ours, opt = copy.deepcopy(pair) if how == "deepcopy" else pickle.loads(pickle.dumps(pair))
    with torch.no_grad():
        ours[0].copy_(torch.full_like(ours[0], 0.3))
    assert torch.equal(bits(opt.master_weight(ours[0])), bits(ours[0].detach().float()))


@FLAT
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_export_to_plain_fp32_sgd(flat, dtype):
    """Leaving master weights: fp32 parameters made of opt.master_weight(p) (fp32 ones as they
    are) and opt.torch_state_dict() loaded into torch.optim.SGD(foreach=False) step on with the
    bits of the fp32 twins, which were torch's all along."""
    tw = MasterTwins(flat, dtype=dtype)
    tw.step(3)
    sd = tw.opt.torch_state_dict()
    assert all("master_weights" not in g for g in sd["param_groups"])
    assert all(set(st) <= {"momentum_buffer"} for st in sd["state"].values())
    fp32 = [torch.nn.Parameter(tw.opt.master_weight(p) if p.dtype != torch.float32
                               else p.detach().clone()) for p in tw.ours]
    out = torch.optim.SGD([{"params": fp32[:3]}, {"params": fp32[3:]}], lr=0.5)
    out.load_state_dict(copy.deepcopy(sd))
    for _ in range(2):
        gs = fresh_grads(tw.twin, tw.gen)
        for p, t, g in zip(fp32, tw.twin, gs):
            p.grad, t.grad = g.clone(), g.clone()
        out.step()
        tw.topt.step()
        for p, t in zip(fp32, tw.twin):
            assert torch.equal(bits(p), bits(t))
