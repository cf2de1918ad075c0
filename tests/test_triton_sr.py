"""The Triton stochastic-rounding kernel (bf16 parameters, gradients and momentum buffers,
csrc/include/momentum_cuda/stochastic.h) under Triton's CPU interpreter (TRITON_INTERPRET=1),
without a GPU.

As in tests/test_triton_master.py (whose helpers this file imports), the interpreter must be on
before momentum_cuda.triton_kernels is imported, so the checks run in ONE child Python process
(this file, run as a script) and each pytest test asserts one check's outcome.

Every comparison is bitwise (torch.equal on the bits) after every step, against the plain-torch
contract momentum_cuda.reference.sgd_sr_reference_step (torch.optim.SGD's fp32 step on the
widened values; the parameter rounded stochastically with sr_random(key) in memory order, the
buffer to nearest even) and, where this build has it, the C++ CPU op
torch.ops.momentum_cuda.sgd_step_sr_list_, on copies: parameters and momentum buffers, and the
gradients are left as they were. A NaN buffer is 0x7FC0 in the kernels (c10's conversion);
torch's CPU .to(bfloat16) in the reference gives 0xFFFF, so the reference's NaN buffers are
compared as 0x7FC0. Each call of the entry point must be exactly ONE launch of the SR kernel
(counting proxies) and none of the other kernels. Inputs: fresh random values (never zeros),
fresh random keys each step (keys near 2^32 - 1 among them), sizes 0, 1, 3, 7, 8, 9, 97, 1025,
3001, a transposed 2-D and a channels_last 4-D layout, every flag combination, first and later
steps; NaN, inf, bf16-max and subnormal parameters, gradients and buffers. Besides: the same
keys give the same bits and another key other bits (of its tensor only); results just past the
largest bf16 round to inf or not by their random bits; SR is unbiased (1 + 2^-9 rounds up a
quarter of the time); the kernel's random bits at indices past 2^32 (a test kernel over
_sr_random); the pointer table cached across steps while the keys travel in a tensor of their
own; a launch split past the grid limit; validation; opcheck of the custom op; an sm_90
ahead-of-time compile (test_triton_master's checks on this kernel).

Planted bugs must make the comparisons fail: the random bits drawn by the logical index
instead of the memory-order one, the parameter rounded to nearest, the key ignored, a wrong
hash constant, the keys not following the table's order past an empty tensor, the low 16 bits
of r not used, the buffer truncated.
"""
from __future__ import annotations

import os
import sys
from unittest import mock

import pytest
import torch

from conftest import have, interpreter_child
from test_triton_master import (MANY_SHAPES, MASTER_FLAGS, SHAPES, _bits, _combos, _like,
                                _programs, _raises)
import test_triton_master as _tm

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# ----------------------------------------------------------------------------------------------
# Child side: runs with TRITON_INTERPRET=1 (only ever called from _child_main).
# ----------------------------------------------------------------------------------------------
STEPS = 3
U32 = 2**32
NEAR_MAX_KEYS = (U32 - 1, U32 - 2, 2**31, 2**31 - 1, 0)


def _op():
    """The C++ op, or None where this build does not have it yet."""
    return getattr(torch.ops.momentum_cuda, "sgd_step_sr_list_", None)


class _Launches(_tm._Launches):
    """test_triton_master's launch counter, the SR kernel counted too."""
    NAMES = ("_sgd_sr_kernel",) + _tm._Launches.NAMES


def _bf16(spec, gen):
    """Random bf16 values (never zero) laid out as spec."""
    return _like(spec, torch.randn(spec[0], generator=gen).to(torch.bfloat16))


def _state(shapes, gen):
    """[params, bufs]: random bf16 values."""
    return [[_bf16(spec, gen) for spec in shapes], [_bf16(spec, gen) for spec in shapes]]


def _keys(n, gen):
    """Random keys in [0, 2^32), the NEAR_MAX_KEYS among them."""
    keys = torch.randint(0, U32, (n,), generator=gen, dtype=torch.int64).tolist()
    keys[:len(NEAR_MAX_KEYS)] = NEAR_MAX_KEYS[:n]
    return keys


def _clone(state):
    return [[t.clone() for t in ts] for ts in state]


def _canonical_nan(t):
    """bf16 bits with every NaN as 0x7FC0 (the kernels' NaN)."""
    return torch.where(t.isnan(), torch.tensor(0x7FC0, dtype=torch.int16), _bits(t))


def _compare(ours, params, bufs, momentum, what):
    """Mismatches (list of strings) of ours = [params, bufs] with the given ones (bufs: NaNs
    compared as 0x7FC0)."""
    bad = []
    parts = [("param", ours[0], params)] + ([("momentum buffer", ours[1], bufs)]
                                            if momentum else [])
    for name, mine, theirs in parts:
        for i, (a, b) in enumerate(zip(mine, theirs)):
            y = _canonical_nan(b) if name == "momentum buffer" else _bits(b)
            if a.shape != b.shape or a.stride() != b.stride() or not torch.equal(_bits(a), y):
                bad.append(f"{what}: {name} {i} (shape {tuple(a.shape)}) differs")
    return bad


def _step(tk, ours, grads, keys, h, first, fn=None, offsets=None):
    """One step of the entry point (or fn) on `ours`, asserting ONE launch of the SR kernel
    (none at all when every tensor is empty) and no other."""
    bufs = ours[1] if h["momentum"] else []
    n_prog = _programs(ours[0], tk.BLOCK_SIZE)
    kw = {} if offsets is None else dict(offsets=offsets)
    with _Launches(tk) as launches:
        (fn or tk.triton_sgd_step_sr_list_)(ours[0], grads, bufs, keys, **h, first_step=first,
                                            **kw)
    if fn is None:
        assert launches.log["_sgd_sr_kernel"] == ([(n_prog,)] if n_prog else []), \
            f"SR launches {launches.log['_sgd_sr_kernel']}, expected one of {n_prog}"
        assert not any(launches.log[n] for n in _tm._Launches.NAMES)


def _run(tk, shapes, h, seed, steps=STEPS, first=None, state=None, grads=None, keys=None,
         fn=None, cpu=True, offsets=None):
    """`steps` steps of the kernel, the C++ op (cpu, where built) and the reference on copies
    of one state, fresh random gradients and keys each step (unless `grads` / `keys`: a list
    per step); the first step is first_step=True when momentum is on (unless `first` says);
    offsets (None: not passed) the tensors' shard offsets. Returns the mismatches, and the
    kernel's final state."""
    from momentum_cuda.reference import sgd_sr_reference_step
    gen = torch.Generator().manual_seed(seed)
    state = state or _state(shapes, gen)
    ours, theirs, ref = _clone(state), _clone(state), _clone(state)
    op = _op() if cpu else None
    ref_bufs = ref[1]
    bad = []
    for s in range(steps):
        f = bool(h["momentum"]) and s == 0 if first is None else first and s == 0
        g = grads[s] if grads is not None else [_bf16(spec, gen) for spec in shapes]
        k = keys[s] if keys is not None else _keys(len(shapes), gen)
        g_before = [t.clone() for t in g]
        _step(tk, ours, g, k, h, f, fn, offsets)
        if op is not None:
            op(theirs[0], g, theirs[1] if h["momentum"] else [], k, h["lr"], h["momentum"],
               h["dampening"], h["weight_decay"], h["nesterov"], h["maximize"], f,
               offsets=offsets)
            bad += _compare(ours, theirs[0], theirs[1], h["momentum"],
                            f"step {s + 1} vs C++ op {h}")
        ref_bufs = sgd_sr_reference_step(ref[0], g, [None] * len(shapes) if f else ref_bufs,
                                         k, **h, offsets=offsets)
        bad += _compare(ours, ref[0], ref_bufs, h["momentum"], f"step {s + 1} vs reference {h}")
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(g, g_before)), \
            "a gradient was written"
    return bad, ours


def _agree(tk, runs) -> None:
    """Every run (the keyword arguments of _run) agrees with both references at every step."""
    bad = [m for kw in runs for m in _run(tk, **kw)[0]]
    assert not bad, bad[:10]


def check_inputs_are_what_they_claim(tk):
    """The layouts are dense but not contiguous where claimed; an empty tensor comes before
    the others (so the table's tensor index is not the parameter's); no zeros."""
    gen = torch.Generator().manual_seed(1)
    params, bufs = _state(SHAPES, gen)
    assert SHAPES[0][0] == (0,)
    for (shape, layout), p, b in zip(SHAPES, params, bufs):
        assert tuple(p.shape) == shape and b.stride() == p.stride() and p.dtype == torch.bfloat16
        assert tk._dense(p)
        if layout:
            assert not p.is_contiguous()
        if layout == "cl":
            assert p.is_contiguous(memory_format=torch.channels_last)
    assert all(bool((p.float() != 0).all()) for p in params + bufs)
    assert {7, 97, 1025, 3001} <= {p.numel() for p in params}


def check_every_flag_combination(tk):
    """Every flag combination, STEPS steps (the first with first_step where momentum is on),
    SHAPES in one call: the kernel, the C++ op and the reference agree bit for bit."""
    _agree(tk, (dict(shapes=SHAPES, h=h, seed=10 + i) for i, h in enumerate(_combos())))


def check_later_steps_without_first(tk):
    """Momentum on and first_step False from the start: the given buffers are read."""
    _agree(tk, (dict(shapes=SHAPES, h=h, seed=40 + i, steps=1, first=False)
                for i, h in enumerate(h for h in _combos() if h["momentum"])))


def check_many_tensors_one_launch(tk):
    """>= 100 tensors (odd sizes, empty ones, transposed and channels_last) in ONE launch per
    step; two flag sets, two steps."""
    assert len(MANY_SHAPES) >= 100
    _agree(tk, (dict(shapes=MANY_SHAPES, h=h, seed=60 + i, steps=2)
                for i, h in enumerate((_combos()[-1], _combos()[7]))))


# shard offsets (FSDP2's local shards): the index crossing 2^32 inside a block, at a block's
# start, past 2^32 and 2^40, odd ones; the empty tensor's offset is never read
def _offsets(n):
    edge = [5, 2**32 - 100, 2**32 - 1024, 2**32 - 1, 2**32, 2**32 + 3, 2**40 - 7, 3, 2**33 - 513]
    return [edge[i % len(edge)] + i for i in range(n)]


def check_shard_offsets(tk):
    """Each tensor's random bits are those of its indices from its offset (a shard's place in
    its whole tensor), where a block crosses 2^32 too: the kernel, the C++ op and the reference
    agree over SHAPES and MANY_SHAPES; offsets of 0 give the bits of no offsets."""
    _agree(tk, (dict(shapes=shapes, h=_combos()[j], seed=80 + j, steps=2,
                     offsets=_offsets(len(shapes)))
                for j, shapes in ((-1, SHAPES), (3, MANY_SHAPES), (7, SHAPES))))
    h, state, grads, keys = _call_inputs(81)
    a = _one_call(tk, state, grads, keys, h)
    b = _one_call(tk, state, grads, keys, h, offsets=[0] * len(SHAPES))
    assert not _compare(a, b[0], b[1], True, "offsets 0")


def check_empty_calls_no_launch(tk):
    """No tensor, or only empty ones: validated, nothing launched."""
    h = _combos()[-1]
    _run(tk, [((0,), None), ((0, 4), None)], h, seed=70)
    _step(tk, [[], []], [], [], h, False)


# parameters, gradients and buffers where rounding is delicate: infinities, NaNs (both signs,
# payloads), the largest finite bf16, the smallest subnormal, zeros
SPECIAL_BITS = [0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7FC1, 0xFF81, 0x7F7F, 0xFF7F, 0x0001, 0x8001,
                0x0000, 0x8000]


def _with_specials(t, gen, every=3):
    """t (bf16) with SPECIAL_BITS written, in a random order, at about 1 in `every` places."""
    flat = t.view(torch.int16).view(-1) if t.is_contiguous() else None
    assert flat is not None
    sp = torch.tensor(SPECIAL_BITS, dtype=torch.int32)
    sp = (sp - ((sp >> 15) << 16)).to(torch.int16)
    where = torch.randint(0, every, flat.shape, generator=gen) == 0
    flat[where] = sp[torch.randint(0, len(sp), (int(where.sum()),), generator=gen)]
    return t


def check_nan_inf_max_values(tk):
    """NaN, inf, largest-finite, subnormal and zero parameters, gradients and buffers, every
    flag combination: both references bit for bit."""
    gen = torch.Generator().manual_seed(90)
    shapes = [((300,), None), ((1025,), None)]
    _agree(tk, (dict(shapes=shapes, h=h, seed=90 + i, steps=2,
                     state=[[_with_specials(t, gen) for t in ts] for ts in _state(shapes, gen)],
                     grads=[[_with_specials(_bf16(spec, gen), gen, 4) for spec in shapes]
                            for _ in range(2)])
                for i, h in enumerate(_combos())))


def check_overflow_rounds_to_inf_stochastically(tk):
    """fp32 results just above the largest bf16 (0x7F7F8000-ish: between it and fp32's
    largest) round to inf or to the largest bf16 by their random bits, as the references
    do; both outcomes occur."""
    n = 2000
    big = torch.full((n,), 0x7F7F, dtype=torch.int16).view(torch.bfloat16)
    p = torch.cat([big[: n // 2], -big[n // 2:]])
    # lr * |g| = 0.05 * 1.33e37 ~ 6.6e35: half an ulp of the largest bf16 (2^120 / 2)
    g = torch.full((n,), -1.33e37, dtype=torch.bfloat16)
    g[n // 2:] = -g[n // 2:]
    h = dict(lr=0.05, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
             maximize=False)
    bad, ours = _run(tk, [((n,), None)], h, seed=0, steps=1, state=[[p], [p.clone()]],
                     grads=[[g]], keys=[[U32 - 1]])
    assert not bad, bad[:10]
    out = ours[0][0].float()
    n_inf = int(out.isinf().sum())
    assert 0.3 * n < n_inf < 0.7 * n, f"{n_inf} of {n} rounded to inf"
    assert int((out.abs() == big.float()).sum()) == n - n_inf


def check_keys_near_max(tk):
    """Keys 2^32 - 1, 2^32 - 2, 2^31, 2^31 - 1, 0 on every tensor: both references."""
    _agree(tk, (dict(shapes=SHAPES, h=_combos()[j % len(_combos())], seed=95 + j, steps=2,
                     keys=[[key] * len(SHAPES), [U32 - 1 - key] * len(SHAPES)])
                for j, key in enumerate(NEAR_MAX_KEYS)))


def _call_inputs(seed):
    """(hyper-parameters, state, gradients, keys) of one random call over SHAPES."""
    gen = torch.Generator().manual_seed(seed)
    state = _state(SHAPES, gen)
    grads = [_bf16(spec, gen) for spec in SHAPES]
    return _combos()[-1], state, grads, _keys(len(SHAPES), gen)


def _one_call(tk, state, grads, keys, h, offsets=None):
    ours = _clone(state)
    _step(tk, ours, grads, keys, h, False, offsets=offsets)
    return ours


def check_same_key_same_bits_other_key_other_bits(tk):
    """The same state, gradients and keys give the same bits twice; another key for one tensor
    changes that tensor's parameter in many elements (SR is random: > 10% of 3001) and no other
    tensor; the buffers (nearest even) do not depend on the keys."""
    h, state, grads, keys = _call_inputs(100)
    a = _one_call(tk, state, grads, keys, h)
    b = _one_call(tk, state, grads, keys, h)
    assert not _compare(a, b[0], b[1], True, "same keys")
    big = max(range(len(SHAPES)), key=lambda i: state[0][i].numel())
    other = list(keys)
    other[big] = (keys[big] + 1) % U32
    c = _one_call(tk, state, grads, other, h)
    for i, (x, y) in enumerate(zip(a[0], c[0])):
        differ = int((_bits(x) != _bits(y)).sum())
        if i == big:
            assert differ > x.numel() // 10, f"another key changed {differ} of {x.numel()}"
        else:
            assert differ == 0, f"tensor {i} changed with tensor {big}'s key"
    assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a[1], c[1])), \
        "a buffer depends on the key"


def check_rounding_is_unbiased(tk):
    """4096 elements whose fp32 result is 1 + 2^-9 (a quarter of the way from 1 to the next
    bf16, 1 + 2^-7) round up with frequency ~ 1/4, one key; over 8 keys the mean is within
    0.01 of 1/4."""
    n = 4096
    one = torch.ones(n, dtype=torch.bfloat16)
    g = torch.full((n,), -2.0 ** -9, dtype=torch.bfloat16)  # lr 1: p = 1 + 2^-9 exactly
    h = dict(lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
             maximize=False)
    ups = []
    for key in range(8):
        p = one.clone()
        tk.triton_sgd_step_sr_list_([p], [g], [], [key * 0x9E3779B9 % U32], **h,
                                    first_step=False)
        vals = set(p.float().unique().tolist())
        assert vals <= {1.0, 1.0 + 2.0 ** -7}, vals
        ups.append(float((p.float() > 1).double().mean()))
        assert 0.2 < ups[-1] < 0.3, ups
    assert abs(sum(ups) / len(ups) - 0.25) < 0.01, ups


def check_random_bits_past_2_32(tk):
    """_sr_random (the kernel's bits) at indices near and past 2^32, 2^33 and 2^62, from
    block-aligned bases and from bases whose blocks cross 2^32 (a shard's offset), equals
    lowbias32(lowbias32(key ^ (i >> 32)) ^ (i mod 2^32)) (reference.lowbias32); and for
    indices below 2^32, reference.sr_random."""
    from momentum_cuda.reference import lowbias32, sr_random
    B = tk.BLOCK_SIZE
    out = torch.empty(3 * B, dtype=torch.int64)
    for key in (0, 1, 0x12345678, U32 - 1):
        for base in (0, U32 - B, U32 - 2 * B, 2 * U32 + 3 * B, 2**62, U32 - B // 2 - 3,
                     2 * U32 - 1, 3 * U32 - 2 * B + 1):
            tk._sr_random_kernel[(3,)](key, base, out, out.numel(), BLOCK=B)
            i = base + torch.arange(out.numel())
            want = lowbias32(lowbias32(key ^ (i >> 32)) ^ (i & (U32 - 1)))
            assert torch.equal(out, want), (key, base)
            if base == 0:
                assert torch.equal(out, sr_random(key, out.numel()))


def check_split_past_grid_limit(tk):
    """Past _MAX_PROGRAMS (lowered to 3 here) the launch is split, each part reading the
    same keys tensor by tensor index: same bits."""
    def split_step(params, *args, **kw):
        with _Launches(tk) as launches:
            tk.triton_sgd_step_sr_list_(params, *args, **kw)
        full, rest = divmod(_programs(params, tk.BLOCK_SIZE), 3)
        assert launches.log["_sgd_sr_kernel"] == [(3,)] * full + [(rest,)] * (rest > 0)

    with mock.patch.object(tk, "_MAX_PROGRAMS", 3):
        _agree(tk, [dict(shapes=SHAPES, h=_combos()[-1], seed=105, fn=split_step)])


def check_table_cached_keys_copied(tk):
    """Two steps over the same tensors with other keys (and offsets) reuse ONE cached pointer
    table (the list kernel's: rows [p, g, buf, numel]) and pass the keys and offsets of the
    non-empty tensors, in the table's order, as an int64 tensor of their own (key, offset)."""
    gen = torch.Generator().manual_seed(107)
    h = _combos()[-1]
    params, bufs = _state(SHAPES, gen)
    grads = [_bf16(spec, gen) for spec in SHAPES]
    seen = []
    kernel = tk._sgd_sr_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(args[:3])
                return kernel[grid](*args, **kw)
            return launch
    tk._TABLES.clear()
    tk._sgd_sr_kernel = Spy()
    try:
        for s in range(2):
            keys = _keys(len(SHAPES), gen)
            offsets = None if s == 0 else _offsets(len(SHAPES))
            tk.triton_sgd_step_sr_list_(params, grads, bufs, keys, **h, first_step=False,
                                        offsets=offsets)
            rows, blocks, k = seen[-1]
            nonempty = [i for i, p in enumerate(params) if p.numel()]
            offs = offsets or [0] * len(SHAPES)
            assert k.dtype == torch.int64 and k.tolist() == [x for i in nonempty
                                                             for x in (keys[i], offs[i])]
            assert rows.reshape(-1, 4)[:, 3].tolist() == [params[i].numel() for i in nonempty]
            assert rows.reshape(-1, 4)[:, 0].tolist() == [params[i].data_ptr()
                                                          for i in nonempty]
    finally:
        tk._sgd_sr_kernel = kernel
    assert len(tk._TABLES) == 1
    assert [t.data_ptr() for t in seen[0][:2]] == [t.data_ptr() for t in seen[1][:2]], \
        "the table was rebuilt"


# ---- planted bugs ------------------------------------------------------------------------------
_tk = None  # momentum_cuda.triton_kernels, imported in the child
if have("triton"):  # the planted kernel variants (interpreted in the child, never in the parent)
    import triton
    import triton.language as tl

    @triton.jit
    def _round_nearest(m, r):
        """Planted: the parameter rounded to nearest even (no SR)."""
        return _tk._bf16_rne(m)

    @triton.jit
    def _round_high_bits(m, r):
        """Planted: the high 16 bits of r added instead of the low ones."""
        u = m.to(tl.uint32, bitcast=True)
        return tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, (u + (r >> 16)) >> 16)

    @triton.jit
    def _random_ignores_key(key, first, BLOCK: tl.constexpr):
        """Planted: the key ignored."""
        idx = first + tl.arange(0, BLOCK)
        return _tk._lowbias32(_tk._lowbias32((idx >> 32).to(tl.uint32)) ^ idx.to(tl.uint32))

    @triton.jit
    def _random_one_inner(key, first, BLOCK: tl.constexpr):
        """Planted: one inner hash per block (its first index's), wrong past a 2^32 crossing."""
        idx = first + tl.arange(0, BLOCK)
        inner = _tk._lowbias32(key ^ (first >> 32).to(tl.uint32))
        return _tk._lowbias32(inner ^ idx.to(tl.uint32))

    @triton.jit
    def _lowbias32_wrong_constant(x):
        """Planted: the second multiplier off by two (0x846CA68D)."""
        x = (x ^ (x >> 16)) * tl.full((), 0x7FEB352D, tl.uint32)
        x = (x ^ (x >> 15)) * tl.full((), 0x846CA68D, tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def _rne_truncates(x):
        """Planted: the buffer truncated to bf16 (the interpreter's cast)."""
        return x.to(tl.uint32, bitcast=True) >> 16


def _logical_order(tk):
    """Planted: each tensor stepped as a contiguous copy (logical order) and copied back: the
    random bits of a transposed or channels_last element are those of its logical index."""
    def step(params, grads, bufs, keys, **kw):
        cp = [p.contiguous() for p in params]
        cb = [b.contiguous() for b in bufs]
        tk.triton_sgd_step_sr_list_(cp, [g.contiguous() for g in grads], cb, keys, **kw)
        for dst, src in zip(params + list(bufs), cp + cb):
            dst.copy_(src)
    return step


def _planted_kept(tk):
    """_triple_addrs whose indices ignore the empty tensors skipped: keys[j] for the j-th
    non-empty tensor."""
    orig = tk._triple_addrs

    def bad(*args):
        addrs, numels, kept = orig(*args)
        return addrs, numels, list(range(len(kept)))
    return bad


def check_planted_bugs_fail(tk):
    """Each planted bug makes the comparison with the reference fail (the real kernel passes
    first): over SHAPES (empty first, transposed, channels_last) with momentum, two steps."""
    h = _combos()[-1]
    assert h["momentum"]

    def caught(fn=None):
        return _run(tk, SHAPES, h, seed=111, steps=2, cpu=False, fn=fn,
                    offsets=_offsets(len(SHAPES)))[0]

    assert not caught(), "the real kernel must match here"
    assert caught(_logical_order(tk)), "planted bug (logical-order random bits) went unnoticed"
    for name, bug, what in (("_bf16_round_stochastic", _round_nearest, "round to nearest"),
                            ("_bf16_round_stochastic", _round_high_bits, "high bits of r"),
                            ("_sr_random", _random_ignores_key, "key ignored"),
                            ("_sr_random", _random_one_inner, "one inner hash per block"),
                            ("_lowbias32", _lowbias32_wrong_constant, "wrong hash constant"),
                            ("_bf16_rne", _rne_truncates, "buffer truncated"),
                            ("_triple_addrs", None, "keys by position among non-empty")):
        with mock.patch.object(tk, name, _planted_kept(tk) if bug is None else bug):
            assert caught(), f"planted bug ({what}) went unnoticed"


# ---- validation ------------------------------------------------------------------------------
def check_validation_errors(tk):
    """Bad keys, dtypes, sizes, strides, list lengths, overlaps and scalars raise naming the
    argument and the value, before anything is launched or written; the C++ op (where built)
    refuses each of them too."""
    gen = torch.Generator().manual_seed(120)
    shapes = [((20,), None), ((4, 5), None)]
    P, B = _state(shapes, gen)
    G = [_bf16(spec, gen) for spec in shapes]
    K = [5, U32 - 1]
    before = [[t.clone() for t in ts] for ts in (P, B, G)]
    h = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False,
             maximize=False, first_step=False)

    def swap(lst, i, t):
        out = list(lst)
        out[i] = t
        return out

    cases = [
        # (params, grads, bufs, keys, hyper changes, exception, text)
        (P, G, B, [5], {}, ValueError, "keys has 1 entries but params has 2"),
        (P, G, B, [5, 6, 7], {}, ValueError, "keys has 3 entries but params has 2"),
        (P, G, B, [5, U32], {}, ValueError, "keys[1] must be in [0, 2^32), got 4294967296"),
        (P, G, B, [-1, 5], {}, ValueError, "keys[0] must be in [0, 2^32), got -1"),
        (P, G, B, [5, 2**63], {}, ValueError, "keys[1] must be in [0, 2^32)"),
        (P, G, B, [5, 1.0], {}, TypeError, "keys[1] must be an int, got float"),
        (P, G, B, [True, 5], {}, TypeError, "keys[0] must be an int, got bool"),
        (P, G, B, 5, {}, TypeError, "keys must be a list of ints, got int"),
        (swap(P, 0, P[0].float()), swap(G, 0, G[0].float()), swap(B, 0, B[0].float()), K, {},
         ValueError, "params[0] must be bfloat16 (stochastic rounding rounds to bf16), got "
         "torch.float32"),
        (swap(P, 1, P[1].float()), swap(G, 1, G[1].float()), B, K, {}, ValueError,
         "params[1] has dtype torch.float32 but params[0] has dtype torch.bfloat16"),
        (P, swap(G, 1, G[1].float()), B, K, {}, ValueError, "grads[1] has dtype"),
        (P, swap(G, 1, G[1][:2]), B, K, {}, ValueError, "grads[1] has shape"),
        (P, swap(G, 1, G[1].t().contiguous().t()), B, K, {}, ValueError, "grads[1] has strides"),
        (P, G, swap(B, 1, B[1].float()), K, {}, ValueError,
         "momentum_buffers[1] has dtype torch.float32 but params[1] has dtype torch.bfloat16"),
        (P, G, swap(B, 1, B[1].reshape(20)), K, {}, ValueError, "momentum_buffers[1] has shape"),
        (P, G, swap(B, 1, B[1].t().contiguous().t()), K, {}, ValueError,
         "momentum_buffers[1] has strides"),
        (P, G, swap(B, 1, None), K, {}, ValueError, "momentum_buffers[1] is undefined"),
        (P, G, B[:1], K, {}, ValueError, "momentum_buffers has 1 tensors"),
        (P, G[:1], B, K, {}, ValueError, "grads has 1 tensors"),
        (P, swap(G, 0, "g"), B, K, {}, TypeError, "grads[0] must be a tensor"),
        (swap(P, 1, torch.ones(40, dtype=torch.bfloat16)[::2]), G, B, K, {}, ValueError,
         "params[1] must be dense"),
        (P, G, swap(B, 0, P[0]), K, {}, ValueError, "overlaps"),
        (P, G, swap(B, 1, B[0][:20].reshape(4, 5)), K, {}, ValueError, "overlaps"),
        (P, G, B, K, dict(lr=float("nan")), ValueError, "lr must be a finite number"),
        (P, G, B, K, dict(weight_decay=float("inf")), ValueError,
         "weight_decay must be a finite number"),
        (P, G, B, K, dict(momentum="0.9"), TypeError, "momentum must be a Python float"),
        (P, G, B, K, dict(nesterov=1), TypeError, "nesterov must be a bool"),
        (P, G, [], K, dict(momentum=0.0, nesterov=True), ValueError,
         "nesterov=True needs momentum"),
        (P, G, [], K, dict(momentum=0.0, first_step=True), ValueError, "first_step=True"),
        (P, G, B, K, dict(offsets=[0]), ValueError, "offsets has 1 entries but params has 2"),
        (P, G, B, K, dict(offsets=[0, -1]), ValueError,
         "offsets[1] must be in [0, 2^63 - numel], got -1"),
        (P, G, B, K, dict(offsets=[2**63 - 10, 0]), ValueError,
         "offsets[0] must be in [0, 2^63 - numel], got 9223372036854775798"),
    ]
    op = _op()
    for p, g, b, k, hc, exc, text in cases:
        kw = dict(h, **hc)
        with _Launches(tk) as launches:
            _raises(lambda: tk.triton_sgd_step_sr_list_(p, g, b, k, **kw), exc, text)
        assert not any(launches.log.values()), f"{text}: launched"
        if exc is ValueError and op is not None:  # the C++ op refuses the same call
            try:
                op(p, g, b, k, kw["lr"], kw["momentum"], kw["dampening"], kw["weight_decay"],
                   kw["nesterov"], kw["maximize"], kw["first_step"], offsets=kw.get("offsets"))
            except (RuntimeError, ValueError, TypeError):
                pass
            else:
                raise AssertionError(f"the C++ op accepted the call refused with {text!r}")
    after = [P, B, G]
    assert all(torch.equal(_bits(x), _bits(y)) for xs, ys in zip(before, after)
               for x, y in zip(xs, ys)), "a failed call wrote something"


def check_sr_op_opcheck(tk):
    """torch.ops.momentum_cuda.triton_sgd_step_sr_list_ (the custom op over the entry point)
    passes torch.library.opcheck and gives the entry point's bits; sr_op routes to it."""
    from momentum_cuda._ops import sr_op
    ops = torch.ops.momentum_cuda
    assert sr_op("triton") is ops.triton_sgd_step_sr_list_.default
    gen = torch.Generator().manual_seed(130)
    shapes = [((n,), None) for n in (0, 1, 9, 97, 1030)] + [((6, 5), "t")]
    for h in (dict(lr=0.0123, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
                   maximize=True, first_step=False),
              dict(lr=0.0123, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                   maximize=False, first_step=False)):
        params, bufs = _state(shapes, gen)
        grads = [_bf16(spec, gen) for spec in shapes]
        keys = _keys(len(shapes), gen)
        b = bufs if h["momentum"] else []
        result = torch.library.opcheck(ops.triton_sgd_step_sr_list_.default,
                                       (params, grads, b, keys), h)
        assert set(result.values()) == {"SUCCESS"}, result
        one, two = _clone([params, bufs]), _clone([params, bufs])
        ops.triton_sgd_step_sr_list_(one[0], grads, one[1] if h["momentum"] else [], keys, **h)
        tk.triton_sgd_step_sr_list_(two[0], grads, two[1] if h["momentum"] else [], keys, **h)
        assert not _compare(one, two[0], two[1], h["momentum"], "op vs entry point")
        assert not torch.equal(_bits(one[0][-1]), _bits(params[-1])), "nothing was stepped"


CHECKS = [name for name in list(globals()) if name.startswith("check_")]


def _child_main() -> None:
    _tm.run_checks(globals())


# ----------------------------------------------------------------------------------------------
# Parent side: pytest.
# ----------------------------------------------------------------------------------------------
pytestmark = _tm.pytestmark  # triton and numpy are needed for the interpreter


@pytest.fixture(scope="module")
def sr_results():
    return interpreter_child("test_triton_sr", timeout=600)


@pytest.mark.parametrize("name", CHECKS)
def test_interpreter(sr_results, name):
    res = sr_results[name]
    assert res["error"] is None, res["error"]


def test_cpu_tensors_refused_without_interpreter():
    """In this (non-interpreted) process, CPU tensors are refused before any launch by the
    entry point and by the custom op over it, naming the parameter; nothing is written."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process interprets")
    from momentum_cuda import triton_kernels as tk
    p = torch.ones(4, dtype=torch.bfloat16)
    h = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
             maximize=False, first_step=False)
    for step in (tk.triton_sgd_step_sr_list_, torch.ops.momentum_cuda.triton_sgd_step_sr_list_):
        with pytest.raises(ValueError, match=r"params\[0\] must be on a CUDA device"):
            step([p], [p.clone()], [], [7], **h)
    assert bool((p == 1).all())


def test_sr_op_routes_backends():
    """sr_op: the Triton custom op for "triton", the C++ op otherwise; an unknown backend
    raises."""
    from momentum_cuda._ops import sr_op
    ops = torch.ops.momentum_cuda
    assert sr_op("triton") is ops.triton_sgd_step_sr_list_.default
    if _op() is not None:
        assert sr_op("cpu") is ops.sgd_step_sr_list_.default
    with pytest.raises(ValueError, match="backend must be"):
        sr_op("tpu")


SR_FLAGS = [f for f, ce in MASTER_FLAGS.items() if "AMP_SKIP" not in ce]  # (no found_inf)


@pytest.mark.parametrize("flags", SR_FLAGS, ids=SR_FLAGS)
def test_sr_kernel_compiles_for_sm90(flags, monkeypatch):
    """test_triton_master's ahead-of-time checks, on the SR kernel in place of the master
    one: it compiles for sm_90 (int -> pointer casts, wrapping uint32 multiplies), keeps
    buf * m a separate mul.rn.f32 feeding the addend of an fma.rn (fusion off) where the
    buffer is read, and converts no float to bf16 (the roundings are integer bit arithmetic).
    Besides, it multiplies by both lowbias32 constants."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import triton_aot_check as aot
    from momentum_cuda import triton_kernels as tk
    compiled = []
    compile_aot = aot.compile_aot
    monkeypatch.setattr(aot, "compile_aot",
                        lambda *a, **kw: compiled.append(compile_aot(*a, **kw)) or compiled[-1])
    monkeypatch.setattr(tk, "_sgd_master_kernel", tk._sgd_sr_kernel)
    _tm.test_master_kernel_compiles_for_sm90(flags)
    (res,) = compiled
    assert res.name == "_sgd_sr_kernel", res.name
    # the lowbias32 multipliers, as 32-bit immediates (signed or not) of integer multiplies
    assert str(0x7FEB352D) in res.ptx
    assert str(0x846CA68B) in res.ptx or str(0x846CA68B - 2**32) in res.ptx


if __name__ == "__main__":
    _child_main()
