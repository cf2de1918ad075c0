"""Stochastic rounding of bf16 parameters (issue 14): the CPU op sgd_step_sr_list_ bit for bit
against its plain-torch contract (momentum_cuda.reference.sgd_sr_reference_step: torch's fp32
step on the widened values, the parameter rounded stochastically with the counter-based random
bits of csrc/include/momentum_cuda/stochastic.h, the buffer to nearest even), the rounding's
unbiasedness with a derived bound, and the optimizers' stochastic_rounding=True against the
reference stepped by hand."""
import math

import pytest
import torch

import momentum_cuda
from momentum_cuda import _C
from momentum_cuda.reference import (lowbias32, sgd_sr_reference_step, sr_key, sr_random)

from conftest import bits, isa_available

OP = torch.ops.momentum_cuda.sgd_step_sr_list_.default
FLAG_SETS = [dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
             for m in (0.0, 0.9) for d in (0.0, 0.1) for wd in (0.0, 0.01)
             for n in (False, True) for mx in (False, True)
             if not (n and (m == 0 or d != 0)) and not (m == 0 and d != 0)]
SHAPES = [(0,), (1,), (3,), (7,), (97,), (1025,), (5, 7), (2, 3, 4, 5)]


def _tensors(gen, shapes, layout=None):
    out = []
    for s in shapes:
        t = torch.randn(s, generator=gen).to(torch.bfloat16)
        if layout == "channels_last" and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        elif layout == "transposed" and t.dim() == 2:
            t = t.t().contiguous().t()
        out.append(t)
    return out


def _like(ts, gen):
    return [torch.empty_like(t).copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
            for t in ts]


def test_lowbias32_is_the_published_mixer():
    """lowbias32 (reference) against its definition written with Python ints, and a bijection
    on a sample (distinct inputs, distinct outputs)."""
    def lb(x):
        x ^= x >> 16
        x = x * 0x7FEB352D & 0xFFFFFFFF
        x ^= x >> 15
        x = x * 0x846CA68B & 0xFFFFFFFF
        return x ^ (x >> 16)
    xs = torch.randint(0, 2**32, (4096,), generator=torch.Generator().manual_seed(1))
    assert lowbias32(xs).tolist() == [lb(x) for x in xs.tolist()]
    r = sr_random(123, 1 << 16)
    assert r.unique().numel() == 1 << 16 and int(r.min()) >= 0 and int(r.max()) < 2**32


def test_cpp_keys_are_the_reference_keys():
    """_C.sr_keys (the replayed step's keys, stochastic.h's mc_sr_key) against reference.sr_key:
    random 63-bit seeds, steps and streams, the 2^32 edges and negative values (taken mod
    2^32 alike)."""
    gen = torch.Generator().manual_seed(11)
    edge = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**63 - 1, -1, -(2**40)]
    values = edge + torch.randint(-(2**62), 2**62, (300,), generator=gen).tolist()
    steps, streams = values, values[::-1]
    for seed in values[:30]:
        assert _C.sr_keys(seed, steps, streams) == [sr_key(seed, a, b)
                                                     for a, b in zip(steps, streams)]
    with pytest.raises(RuntimeError, match="one stream per step"):
        _C.sr_keys(0, [1, 2], [3])


@pytest.mark.parametrize("layout", [None, "channels_last", "transposed"])
@pytest.mark.parametrize("h", FLAG_SETS, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
def test_op_bitwise_against_reference(h, layout):
    """Three steps (the first one creating the buffers where momentum is on), fresh gradients,
    keys of consecutive steps, against sgd_sr_reference_step on copies."""
    gen = torch.Generator().manual_seed(5)
    ps = _tensors(gen, SHAPES, layout)
    ref = [p.clone() for p in ps]
    bufs = [torch.empty_like(p) for p in ps] if h["momentum"] else []
    rbufs = [None] * len(ps)
    for step in range(1, 4):
        gs = _like(ps, gen)
        keys = [sr_key(42, step, i) for i in range(len(ps))]
        OP(ps, gs, bufs, keys, 0.05, h["momentum"], h["dampening"], h["weight_decay"],
           h["nesterov"], h["maximize"], bool(h["momentum"]) and step == 1)
        rbufs = sgd_sr_reference_step(ref, gs, rbufs, keys, lr=0.05, **h)
        for i, (a, b) in enumerate(zip(ps, ref)):
            assert a.stride() == b.stride()
            assert torch.equal(bits(a), bits(b)), f"step {step} param {i}"
            if h["momentum"]:
                assert torch.equal(bits(bufs[i]), bits(rbufs[i])), f"step {step} buffer {i}"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["avx2", "default"])
def test_op_large_threads_and_isa(threads, isa):
    """2^20 + 3 elements, split over threads (the random bits follow the element, not the
    thread), on each instruction set the CPU has; shard offsets whose index crosses 2^32 in
    the middle of the large tensor (not at a block of the loop) and at the small one's second
    element."""
    if not isa_available(isa):
        pytest.skip(f"{isa} not available")
    gen = torch.Generator().manual_seed(6)
    ps = _tensors(gen, [(2**20 + 3,), (33,)])
    ref = [p.clone() for p in ps]
    gs, bufs = _like(ps, gen), _like(ps, gen)
    rb = [b.clone() for b in bufs]
    keys = [2**32 - 1, 0]
    offsets = [2**32 - 2**19 - 3, 2**32 - 1]
    old_threads, old_isa = torch.get_num_threads(), _C.set_cpu_isa(isa)
    torch.set_num_threads(threads)
    try:
        OP(ps, gs, bufs, keys, 0.01, 0.9, 0.0, 1e-3, True, False, False, offsets=offsets)
    finally:
        torch.set_num_threads(old_threads)
        _C.set_cpu_isa(old_isa)
    rb = sgd_sr_reference_step(ref, gs, rb, keys, lr=0.01, momentum=0.9, weight_decay=1e-3,
                               nesterov=True, offsets=offsets)
    for a, b in zip(ps + bufs, ref + rb):
        assert torch.equal(bits(a), bits(b))



def test_special_values():
    """inf, NaN (parameter 0x7FC0, as the round-to-nearest conversion), the largest bf16 (may
    round up to inf), zeros of both signs, subnormals."""
    special = torch.tensor([0x7F800000, 0xFF800000, 0x7FC00000, 0x7F7FFFFF, 0x00000001,
                            0x80000000, 0x00000000, 0x807FFFFF] * 8, dtype=torch.int64)
    m = ((special - ((special >> 31) << 32)).to(torch.int32)).view(torch.float32)
    p = m.to(torch.bfloat16)
    p.view(torch.int16)[m.isnan()] = 0x7FC0
    ref = p.clone()
    g = torch.full_like(p, 1e-3)
    OP([p], [g], [], [99], 0.5, 0.0, 0.0, 0.0, False, False, False)
    sgd_sr_reference_step([ref], [g], [None], [99], lr=0.5, momentum=0.0)
    assert torch.equal(bits(p), bits(ref))
    assert (bits(p)[p.isnan()] == 0x7FC0).all() and p.isnan().any()


def _ups(q: int, n: int, key: int) -> int:
    """How many of n parameters at 1 + q * 2^-23 (low half q between the bf16 values 1 and
    1 + 2^-7) the op rounds up: p = 1, gradient -1, lr = q * 2^-23 (exact in fp32)."""
    p = torch.ones(n, dtype=torch.bfloat16)
    OP([p], [-torch.ones_like(p)], [], [key], q * 2.0**-23, 0.0, 0.0, 0.0, False, False, False)
    assert set(p.float().unique().tolist()) <= {1.0, 1.0 + 2**-7}
    return int((p.float() > 1.0).sum())


@pytest.mark.parametrize("q", [1, 0x1000, 0x5555, 0x8000, 0xC000, 0xFFFF])
def test_unbiased_with_a_derived_bound(q):
    """The rounding rounds up with probability q / 2^16, so the rounded values' mean is the
    exact one. With n = 2^20 elements the count of ups is Binomial(n, q / 2^16) if the random
    bits are uniform and independent across elements; a deviation over 6 standard deviations
    (+1) has probability about 2e-9 for such bits (normal approximation; at q = 1, n p = 16,
    the Poisson tail is about 1e-7), so the fixed keys below (the same sequence every run)
    fail only for bits that are not. Checked on three keys, and on
    the even and odd elements separately (bits that depend on the index parity fail there)."""
    n = 1 << 20
    pr = q / 65536
    sigma = math.sqrt(n * pr * (1 - pr))
    for key in (0, sr_key(1, 1, 0), 2**32 - 1):
        ups = _ups(q, n, key)
        assert abs(ups - n * pr) <= 6 * sigma + 1, (key, ups, n * pr, sigma)
    p = torch.ones(n, dtype=torch.bfloat16)
    OP([p], [-torch.ones_like(p)], [], [7], q * 2.0**-23, 0.0, 0.0, 0.0, False, False, False)
    for half in (p[0::2], p[1::2]):
        ups, m = int((half.float() > 1).sum()), half.numel()
        assert abs(ups - m * pr) <= 6 * math.sqrt(m * pr * (1 - pr)) + 1


def test_round_to_nearest_would_fail_the_bound():
    """The unbiasedness test can fail: round to nearest (what a plain bf16 step does) sends
    every element at q = 0x5555 down, far outside the bound."""
    n, q = 1 << 20, 0x5555
    p = torch.ones(n, dtype=torch.bfloat16)
    p.add_(torch.ones_like(p), alpha=q * 2.0**-23)
    ups = int((p.float() > 1).sum())
    pr = q / 65536
    assert abs(ups - n * pr) > 6 * math.sqrt(n * pr * (1 - pr)) + 1


def test_same_key_same_bits_other_key_other_bits():
    gen = torch.Generator().manual_seed(8)
    p0 = _tensors(gen, [(4096,)])[0]
    g = _like([p0], gen)[0]
    outs = {}
    for key in (5, 5, 6):
        p = p0.clone()
        OP([p], [g], [], [key], 0.001, 0.0, 0.0, 0.0, False, False, False)
        outs.setdefault(key, []).append(p)
    assert torch.equal(bits(outs[5][0]), bits(outs[5][1]))
    assert not torch.equal(bits(outs[5][0]), bits(outs[6][0]))


@pytest.mark.parametrize("bad,match", [
    (dict(keys=[-1]), r"keys\[0\] must be in \[0, 2\^32\), got -1"),
    (dict(keys=[2**32]), r"keys\[0\] must be in \[0, 2\^32\), got 4294967296"),
    (dict(keys=[1, 2]), r"keys has 2 entries but params has 1"),
    (dict(offsets=[-1]), r"offsets\[0\] must be in \[0, 2\^63 - numel\], got -1"),
    (dict(offsets=[2**63 - 5]), r"offsets\[0\] must be in \[0, 2\^63 - numel\], got 9223372036854775803"),
    (dict(offsets=[0, 0]), r"offsets has 2 entries but params has 1"),
    (dict(dtype=torch.float32), r"params\[0\] must be bfloat16 \(stochastic rounding"),
    (dict(buf_dtype=torch.float32), r"momentum_buffers\[0\] has dtype Float"),
    (dict(lr=float("nan")), r"lr must be a finite number"),
])
def test_errors_name_the_argument_and_write_nothing(bad, match):
    dtype = bad.get("dtype", torch.bfloat16)
    p = torch.randn(9).to(dtype)
    g = torch.randn(9).to(dtype)
    b = torch.randn(9).to(bad.get("buf_dtype", dtype))
    before = [t.clone() for t in (p, g, b)]
    with pytest.raises(RuntimeError, match=match):
        OP([p], [g], [b], bad.get("keys", [3]), bad.get("lr", 0.1), 0.9, 0.0, 0.0, False, False,
           False, offsets=bad.get("offsets"))
    for t, u in zip((p, g, b), before):
        assert torch.equal(bits(t), bits(u))


def test_opcheck():
    gen = torch.Generator().manual_seed(9)
    ps = _tensors(gen, [(0,), (1,), (97,), (3, 5)])
    args = (ps, _like(ps, gen), _like(ps, gen), [1, 2, 3, 2**32 - 1], 0.01, 0.9, 0.1, 0.01,
            False, True, False)
    result = torch.library.opcheck(OP, args)
    assert set(result.values()) == {"SUCCESS"}, result
    result = torch.library.opcheck(OP, args, dict(offsets=[0, 2**32 - 3, 7, 2**40]))
    assert set(result.values()) == {"SUCCESS"}, result


# ---- the optimizers: stochastic_rounding=True against the reference stepped by hand ----------
import copy  # noqa: E402


class SrTwins:
    """bf16 parameters (and two fp32 ones) stepped by momentum_cuda with stochastic_rounding;
    their twins stepped by sgd_sr_reference_step with the keys the contract names
    (sr_key(sr_seed, the parameter's step count, its position)), the fp32 twins by
    torch.optim.SGD(foreach=False) / MomentumReference."""

    def __init__(self, flat, kind="sgd", h=None, seed=3, sr_seed=77):
        gen = torch.Generator().manual_seed(seed)
        shapes = [(1,), (3,), (97,), (4, 5), (2, 3, 2, 2), (5,), (8,)]
        vals = [torch.randn(s, generator=gen) for s in shapes]
        self.ours = [torch.nn.Parameter(v.to(torch.bfloat16) if k < 5 else v)
                     for k, v in enumerate(vals)]
        self.ref = [p.detach().clone() for p in self.ours[:5]]
        self.fp32 = [torch.nn.Parameter(p.detach().clone()) for p in self.ours[5:]]
        self.h = h or dict(lr=0.01, momentum=0.9, weight_decay=1e-2)
        self.kind, self.sr_seed = kind, sr_seed
        cls = momentum_cuda.SGD if kind == "sgd" else momentum_cuda.Momentum
        self.opt = cls(self.ours, flat=flat, stochastic_rounding=True, sr_seed=sr_seed,
                       **self.h)
        if kind == "sgd":
            self.topt = torch.optim.SGD(self.fp32, foreach=False, **self.h)
        else:
            from momentum_cuda.reference import MomentumReference
            self.topt = MomentumReference(self.fp32, **self.h)
        self.bufs = [None] * 5
        self.steps = 0
        self.gen = torch.Generator().manual_seed(seed + 1)

    def ref_h(self):
        h = dict(self.h)
        h.setdefault("momentum", 0.0)
        if self.kind != "sgd":
            h["dampening"] = h["momentum"]
            self.bufs = [torch.zeros_like(p) if b is None else b
                         for p, b in zip(self.ref, self.bufs)]
        return h

    def step(self, n=1):
        for _ in range(n):
            self.steps += 1
            gs = [torch.randn(p.shape, generator=self.gen).to(p.dtype) for p in self.ours]
            for p, g in zip(self.ours, gs):
                p.grad = g.clone()
            for t, g in zip(self.fp32, gs[5:]):
                t.grad = g.clone()
            self.opt.step()
            self.topt.step()
            keys = [sr_key(self.sr_seed, self.steps, i) for i in range(5)]
            h = self.ref_h()  # (first: it gives the EMA form its zero buffers)
            self.bufs = sgd_sr_reference_step(self.ref, gs[:5], self.bufs, keys, **h)
            self.check(f"step {self.steps}")

    def check(self, what):
        for i, (p, r) in enumerate(zip(self.ours, self.ref)):
            assert torch.equal(bits(p), bits(r)), f"{what}: param {i}"
            if self.h.get("momentum"):
                assert torch.equal(bits(self.opt.state[p]["momentum_buffer"]),
                                   bits(self.bufs[i])), f"{what}: buffer {i}"
        for p, t in zip(self.ours[5:], self.fp32):
            assert torch.equal(bits(p), bits(t)), f"{what}: fp32 param"


from test_master_weights import FLAT, OPT_CASES  # noqa: E402  (the same optimizer cases)


@FLAT
@pytest.mark.parametrize("kind,h", OPT_CASES, ids=[f"{k}-{i}" for i, (k, _) in
                                                   enumerate(OPT_CASES)])
def test_optimizer_against_reference(flat, kind, h):
    tw = SrTwins(flat, kind, h)
    tw.step(4)
    paths = {e["path"] for e in tw.opt.last_step}
    assert "stochastic-rounding" in paths
    assert all(tw.opt.state[p]["sr_step"] == 4 for p in tw.ours[:5])


@FLAT
@pytest.mark.parametrize("how", ["state_dict", "deepcopy"])
def test_checkpoint_and_deepcopy_continue_the_same_bits(flat, how):
    """The step counts and the seed travel with the state (state "sr_step", group "sr_seed"):
    a loaded checkpoint or a deep copy draws the bits the original would have."""
    tw = SrTwins(flat)
    tw.step(2)
    if how == "state_dict":
        sd = copy.deepcopy(tw.opt.state_dict())
        fresh = momentum_cuda.SGD(tw.ours, flat=flat, stochastic_rounding=True, sr_seed=1,
                                  **tw.h)
        fresh.load_state_dict(sd)
        assert fresh.param_groups[0]["sr_seed"] == 77
        tw.opt = fresh
    else:
        tw.ours, tw.opt = copy.deepcopy((tw.ours, tw.opt))
    tw.step(2)


def test_torch_checkpoint_loads_and_the_setting_stays():
    ps = [torch.nn.Parameter(torch.randn(9).to(torch.bfloat16))]
    topt = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    ps[0].grad = torch.randn(9).to(torch.bfloat16)
    topt.step()
    opt = momentum_cuda.SGD(ps, lr=0.1, momentum=0.9, stochastic_rounding=True, sr_seed=5)
    opt.load_state_dict(topt.state_dict())
    assert opt.param_groups[0]["stochastic_rounding"] and opt.param_groups[0]["sr_seed"] == 5
    buf = opt.state[ps[0]]["momentum_buffer"].clone()
    p0 = ps[0].detach().clone()
    opt.step()
    ref = [p0]
    bufs = sgd_sr_reference_step(ref, [ps[0].grad], [buf], [sr_key(5, 1, 0)], lr=0.1,
                                 momentum=0.9)
    assert torch.equal(bits(ps[0]), bits(ref[0]))
    assert torch.equal(bits(opt.state[ps[0]]["momentum_buffer"]), bits(bufs[0]))


def test_stochastic_rounding_learns_where_round_to_nearest_stalls():
    """lr * g below half a bf16 ulp of p: round to nearest never moves p (torch's bf16 SGD
    stalls), stochastic rounding moves it on average by the exact update: after 200 steps
    of -2^-12 each on 1.0 (ulp 2^-7: a 1/32 chance per step and element), the mean over 4096
    elements is within 4 standard deviations of 1 - 200 * 2^-12."""
    n, steps, delta = 4096, 200, 2.0**-12
    p = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    q = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = momentum_cuda.SGD([p], lr=delta, stochastic_rounding=True)
    topt = torch.optim.SGD([q], lr=delta)
    for _ in range(steps):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
        opt.step()
        topt.step()
    assert torch.equal(q.detach(), torch.ones_like(q))  # the stall
    want = 1 - steps * delta
    # each element: a sum of per-step roundings, variance <= steps * (ulp/2)^2 / ... bounded by
    # the per-step variance ulp^2 * pr (1 - pr) <= ulp * delta
    sigma = math.sqrt(steps * 2.0**-7 * delta / n)
    assert abs(p.detach().float().mean().item() - want) <= 4 * sigma


def test_errors():
    bf = [torch.nn.Parameter(torch.ones(3, dtype=torch.bfloat16))]
    with pytest.raises(ValueError, match="exclude each other"):
        momentum_cuda.SGD(bf, lr=0.1, master_weights=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="sr_seed must be an int in"):
        momentum_cuda.SGD(bf, lr=0.1, stochastic_rounding=True, sr_seed=-1)
    with pytest.raises(ValueError, match="stochastic_rounding=True cannot be used with "
                                         "differentiable"):
        momentum_cuda.SGD(bf, lr=0.1, stochastic_rounding=True, differentiable=True)
    with pytest.raises(ValueError, match="rounds to bfloat16; a float16"):
        momentum_cuda.Momentum([torch.nn.Parameter(torch.ones(3, dtype=torch.float16))],
                               lr=0.1, stochastic_rounding=True)
    opt = momentum_cuda.SGD(bf, lr=0.1, stochastic_rounding=True)
    bf[0].grad = torch.ones_like(bf[0])
    with pytest.raises(RuntimeError, match="stochastic_rounding=True: a step traced"):
        opt._step_traced(None)
    assert torch.equal(bf[0].detach(), torch.ones(3, dtype=torch.bfloat16))
