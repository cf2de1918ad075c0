"""Master weights for bf16 parameters (issue 14): the op sgd_step_master_list_ against the
plain-torch contract (momentum_cuda.reference.sgd_master_reference_step: torch.optim.SGD's fp32
step on the master bf16_join gives, split again), bit for bit: parameters, remainders, packed
tie bits and fp32 momentum buffers, every flag set, odd sizes, several steps, both CPU
instruction sets and thread counts; bad input raises naming the argument and writes nothing;
opcheck."""
import pytest
import torch

from momentum_cuda import _C
from momentum_cuda.reference import (bf16_join, bf16_split, pack_ties,
                                     sgd_master_reference_step, unpack_ties)

from conftest import bits, hyper_id, sgd_hyper_grid

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
