"""The Triton master-weights kernel (bf16 parameters with exact fp32 masters,
csrc/include/momentum_cuda/bf16_split.h) under Triton's CPU interpreter (TRITON_INTERPRET=1),
without a GPU.

As in tests/test_triton_interp.py, the interpreter must be on before
momentum_cuda.triton_kernels is imported, so the checks run in ONE child Python process (this
file, run as a script) and each pytest test asserts one check's outcome.

Every comparison is bitwise (torch.equal on the bits) and made against BOTH references after
every step: the plain-torch contract (momentum_cuda.reference.sgd_master_reference_step:
torch.optim.SGD's fp32 step on the joined masters, split again) and the C++ CPU op
torch.ops.momentum_cuda.sgd_step_master_list_, on copies: parameters, remainders, tie bytes and
momentum buffers, and the gradients are left as they were. Each call of the entry point must be
exactly ONE launch of the master kernel (counting proxies) and none of the other kernels.
Inputs: fresh random values (never zeros) with a quarter of the masters moved to a halfway point
(low half 0x8000, loaded through reference.bf16_split: tie bits set and clear), sizes
0, 1, 3, 7, 8, 9, 97, 1025, 3001, a transposed 2-D and a channels_last 4-D layout (tie bits in
memory order), every flag combination, first and later steps.

A NaN master's parameter is 0x7FC0 in all three (bf16_split.h, reference.bf16_split). One
difference of the references is handled where it arises: a NaN gradient with maximize can leave
the C++ op's momentum buffer with the NaN's other sign than torch's (and the kernel's); NaN
signs are compared against the reference only (NaN sign and payload are outside the contract).
Planted bugs (kernel helpers swapped for wrong variants: the tie bit ignored in the join, tie
bits packed or read in the wrong bit order, the tie written for every halfway master, a
truncating split; a block map naming the neighbour tensor) must make the comparisons fail.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
import traceback

import pytest
import torch

from conftest import have, interpreter_child

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# ----------------------------------------------------------------------------------------------
# Child side: runs with TRITON_INTERPRET=1 (only ever called from _child_main).
# ----------------------------------------------------------------------------------------------
SIZES = (0, 1, 3, 7, 8, 9, 97, 1025, 3001)
# (shape, layout): None contiguous, "t" a transposed 2-D, "cl" channels_last 4-D
SHAPES = ([((n,), None) for n in SIZES]
          + [((13, 9), "t"), ((31, 33), "t"), ((2, 3, 5, 7), "cl"), ((3, 8, 4, 4), "cl"),
             ((0, 4), None)])
# >= 100 tensors in one call: the shapes above and 90 small odd sizes
MANY_SHAPES = SHAPES + [((((i * 37) % 151) | 1,), None) for i in range(90)]
STEPS = 3
LR = 0.05
OP = torch.ops.momentum_cuda.sgd_step_master_list_


def _combos():
    """Every flag on and off: momentum 0/0.9, dampening 0/0.1, weight_decay 0/0.01, nesterov
    (momentum and no dampening), maximize."""
    out = []
    for momentum, dampening, wd, nesterov, maximize in itertools.product(
            (0.0, 0.9), (0.0, 0.1), (0.0, 0.01), (False, True), (False, True)):
        if (momentum == 0 and (dampening or nesterov)) or (nesterov and dampening):
            continue
        out.append(dict(lr=LR, momentum=momentum, dampening=dampening, weight_decay=wd,
                        nesterov=nesterov, maximize=maximize))
    return out


def _empty(spec, dtype):
    shape, layout = spec
    if layout == "t":
        return torch.empty(shape[::-1], dtype=dtype).t()
    if layout == "cl":
        return torch.empty(shape, dtype=dtype, memory_format=torch.channels_last)
    return torch.empty(shape, dtype=dtype)


def _like(spec, values):
    """values (any layout) copied into a new tensor of spec's layout and values' dtype."""
    return _empty(spec, values.dtype).copy_(values)


def _halfway(m, gen, fraction=0.25):
    """A fraction of the fp32 masters m moved to a halfway point between two bf16 values."""
    u = m.view(torch.int32)
    half = torch.rand(m.shape, generator=gen) < fraction
    u[half] = (u[half] & ~0xFFFF) | 0x8000
    return m


def _split(spec, master):
    """(param, remainder, tie bytes) of the fp32 masters, through reference.bf16_split, the
    param and remainder laid out as spec, the tie bits packed in memory order."""
    from momentum_cuda.reference import bf16_split, pack_ties
    p, r, t = bf16_split(_like(spec, master))
    return _like(spec, p), _like(spec, r), pack_ties(_like(spec, t))


def _state(shapes, gen, masters=None):
    """[params, bufs, rems, ties]: random masters (a quarter halfway) unless given as a list
    of fp32 tensors; buffers random (never zeros)."""
    params, bufs, rems, ties = [], [], [], []
    for k, spec in enumerate(shapes):
        m = (_halfway(torch.randn(spec[0], generator=gen), gen) if masters is None
             else masters[k])
        p, r, t = _split(spec, m)
        params.append(p)
        rems.append(r)
        ties.append(t)
        bufs.append(_like(spec, torch.randn(spec[0], generator=gen)))
    return [params, bufs, rems, ties]


def _grads(shapes, gen):
    return [_like(spec, torch.randn(spec[0], generator=gen).to(torch.bfloat16))
            for spec in shapes]


def _clone(state):
    return [[t.clone() for t in ts] for ts in state]


def _bits(t):
    t = t.detach()
    if t.is_floating_point():
        return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])
    return t


class _Launches:
    """Counts launches of the Triton kernels: the module's kernel objects (looked up by the
    entry points at call time) replaced by proxies recording each grid."""
    NAMES = ("_sgd_master_kernel", "_sgd_list_kernel", "_sgd_flat_kernel")

    class _Proxy:
        def __init__(self, kernel, log):
            self._kernel, self._log = kernel, log

        def __getitem__(self, grid):
            self._log.append(tuple(grid))
            return self._kernel[grid]

        def __getattr__(self, name):
            return getattr(self._kernel, name)

    def __init__(self, tk):
        self.tk = tk
        self.log = {n: [] for n in self.NAMES}

    def __enter__(self):
        self._orig = {n: getattr(self.tk, n) for n in self.NAMES}
        for n in self.NAMES:
            setattr(self.tk, n, self._Proxy(self._orig[n], self.log[n]))
        return self

    def __exit__(self, *exc):
        for n, k in self._orig.items():
            setattr(self.tk, n, k)


def _programs(params, block):
    return sum(-(-p.numel() // block) for p in params)


def _compare(ours, other, momentum, what, other_bufs=None, buf_nan_sign_ok=False):
    """Mismatches (list of strings) between two states [params, bufs, rems, ties].
    other_bufs: the reference's buffers (its own list). buf_nan_sign_ok: a NaN
    buffer element may differ in its sign bit only (where both are NaN)."""
    bad = []
    bufs = other_bufs if other_bufs is not None else other[1]
    parts = [("param", 0, other[0]), ("remainder", 2, other[2]), ("ties", 3, other[3])]
    if momentum:
        parts.append(("momentum buffer", 1, bufs))
    for name, k, theirs in parts:
        for i, (a, b) in enumerate(zip(ours[k], theirs)):
            x, y = _bits(a), _bits(b)
            if name == "momentum buffer" and buf_nan_sign_ok:
                nan = a.isnan() & b.isnan()
                x, y = torch.where(nan, x & 0x7FFFFFFF, x), torch.where(nan, y & 0x7FFFFFFF, y)
            if a.shape != b.shape or a.stride() != b.stride() or not torch.equal(x, y):
                bad.append(f"{what}: {name} {i} (shape {tuple(a.shape)}) differs")
    return bad


def _step(tk, ours, grads, h, first, fn=None):
    """One step of the entry point (or fn) on `ours`, asserting ONE launch of the master
    kernel (none at all when every tensor is empty) and no other."""
    bufs = ours[1] if h["momentum"] else []
    n_prog = _programs(ours[0], tk.BLOCK_SIZE)
    with _Launches(tk) as launches:
        (fn or tk.triton_sgd_step_master_list_)(ours[0], grads, bufs, ours[2], ours[3], **h,
                                                first_step=first)
    if fn is None:
        assert launches.log["_sgd_master_kernel"] == ([(n_prog,)] if n_prog else []), \
            f"master launches {launches.log['_sgd_master_kernel']}, expected one of {n_prog}"
        assert not launches.log["_sgd_list_kernel"] and not launches.log["_sgd_flat_kernel"]


def _run(tk, shapes, h, seed, steps=STEPS, first=None, state=None, grads=None, fn=None,
         cpu=True, buf_nan_sign_ok=False):
    """`steps` steps of the kernel, the CPU op and the reference on copies of one state, fresh
    random gradients each step (unless `grads`: a list per step); the first step is
    first_step=True when momentum is on (unless `first` says). Returns the mismatches, and the
    kernel's final state."""
    from momentum_cuda.reference import sgd_master_reference_step
    gen = torch.Generator().manual_seed(seed)
    state = state or _state(shapes, gen)
    ours, theirs, ref = _clone(state), _clone(state), _clone(state)
    ref_bufs = None
    bad = []
    for s in range(steps):
        f = bool(h["momentum"]) and s == 0 if first is None else first and s == 0
        g = grads[s] if grads is not None else _grads(shapes, gen)
        g_before = [t.clone() for t in g]
        _step(tk, ours, g, h, f, fn)
        if cpu:
            OP(theirs[0], g, theirs[1] if h["momentum"] else [], theirs[2], theirs[3],
               h["lr"], h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"],
               h["maximize"], f)
            bad += _compare(ours, theirs, h["momentum"], f"step {s + 1} vs CPU op {h}",
                            buf_nan_sign_ok=buf_nan_sign_ok)
        if ref_bufs is None or f:
            ref_bufs = [None] * len(ref[0]) if f else ref[1]
        ref_bufs = sgd_master_reference_step(ref[0], g, ref_bufs, ref[2], ref[3], **h)
        bad += _compare(ours, ref, h["momentum"], f"step {s + 1} vs reference {h}",
                        other_bufs=ref_bufs)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(g, g_before)), \
            "a gradient was written"
    return bad, ours


def check_inputs_are_what_they_claim(tk):
    """The layouts are dense but not contiguous where claimed, and the inputs hold set and
    clear tie bits (also in the non-contiguous tensors) and no zeros."""
    gen = torch.Generator().manual_seed(1)
    params, bufs, rems, ties = _state(SHAPES, gen)
    for (shape, layout), p, r, t in zip(SHAPES, params, rems, ties):
        assert tuple(p.shape) == shape and r.stride() == p.stride()
        assert tk._dense(p)
        if layout == "t":
            assert not p.is_contiguous()
        if layout == "cl":
            assert not p.is_contiguous()
            assert p.is_contiguous(memory_format=torch.channels_last)
        assert t.numel() == (p.numel() + 7) // 8
        if p.numel() > 8:
            assert int(t.count_nonzero()) > 0, f"no tie bit set in {shape}"
    set_bits = sum(int(t.count_nonzero()) for t, (_, lay) in zip(ties, SHAPES) if lay)
    assert set_bits > 10
    assert all(bool((p.float() != 0).all()) for p in params)


def check_every_flag_combination(tk):
    """Every flag combination, STEPS steps (the first with first_step where momentum is on),
    SHAPES in one call: the kernel, the CPU op and the reference agree bit for bit."""
    bad = []
    for i, h in enumerate(_combos()):
        bad += _run(tk, SHAPES, h, seed=10 + i)[0]
    assert not bad, bad[:10]


def check_later_steps_without_first(tk):
    """Momentum on and first_step False from the start: the given buffers are read."""
    bad = []
    for i, h in enumerate(h for h in _combos() if h["momentum"]):
        bad += _run(tk, SHAPES, h, seed=40 + i, steps=1, first=False)[0]
    assert not bad, bad[:10]


def check_many_tensors_one_launch(tk):
    """>= 100 tensors (odd sizes, empty ones, transposed and channels_last) in ONE launch per
    step; two flag sets, two steps."""
    assert len(MANY_SHAPES) >= 100
    bad = []
    for i, h in enumerate((_combos()[-1], _combos()[7])):
        bad += _run(tk, MANY_SHAPES, h, seed=60 + i, steps=2)[0]
    assert not bad, bad[:10]


def check_empty_calls_no_launch(tk):
    """No tensor, or only empty ones: validated, nothing launched."""
    h = _combos()[-1]
    _run(tk, [((0,), None), ((0, 4), None)], h, seed=70)
    _step(tk, [[], [], [], []], [], h, False)


def _halfway_results(shapes, gen, maximize):
    """(masters, grads) for which a plain lr = 1 step lands every master exactly on a halfway
    point t (low half 0x8000, t in [1.25, 1.75)): the gradient g is a bf16 value with
    |g| in [2^-8, 2^-7), whose lowest bit (2^-15) is above t's ulp (2^-23), so the master
    t + g (t - g with maximize) is exact in fp32 and so is the step's fma(g, -1, m)."""
    masters, grads = [], []
    for shape, _ in shapes:
        n = torch.Size(shape).numel()
        high = torch.randint(0x3FA0, 0x3FE0, (n,), generator=gen, dtype=torch.int32)
        t = ((high << 16) | 0x8000).view(torch.float32)
        gb = torch.randint(0x3B80, 0x3C00, (n,), generator=gen, dtype=torch.int32)
        gb = gb | (torch.randint(0, 2, (n,), generator=gen, dtype=torch.int32) << 15)
        g = (gb << 16).view(torch.float32)
        assert bool(((g.abs() >= 2.0 ** -8) & (g.abs() < 2.0 ** -7)).all())
        masters.append((t - g if maximize else t + g).reshape(shape))
        grads.append(g.to(torch.bfloat16).reshape(shape))
    return masters, grads


def check_halfway_results_write_tie_bits(tk):
    """Steps whose results sit exactly at halfway points: the tie bits the kernel WRITES (set
    where the master rounded up, clear where down) and remainders 0x8000 match both
    references, in every layout."""
    gen = torch.Generator().manual_seed(80)
    for h in (dict(lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
              dict(lr=1.0, momentum=0.9, dampening=0.1, weight_decay=0.0, nesterov=False)):
        for maximize in (False, True):
            masters, grads = _halfway_results(SHAPES, gen, maximize)
            g = [_like(spec, t) for spec, t in zip(SHAPES, grads)]
            state = _state(SHAPES, gen, masters)
            h = dict(h, maximize=maximize)
            bad, ours = _run(tk, SHAPES, h, seed=0, steps=1, state=state, grads=[g])
            assert not bad, bad[:10]
            assert all(bool((r == -0x8000).all()) for r in ours[2]), "not halfway"
            bits = torch.cat([(t.to(torch.int32).unsqueeze(1) >> torch.arange(8)).flatten() & 1
                              for t in ours[3]])
            assert int(bits.sum()) > 100, "too few tie bits written"
            n = sum(p.numel() for p in ours[0])
            assert int(bits.sum()) < n - 100, "too few tie bits clear"


# masters where splitting and joining are delicate: infinities, NaNs (payloads, signs, a
# remainder above 0x8000), halfway points next to the bf16 overflow (0x7F7F8000 rounds up to
# inf with its tie bit set), the largest finite, zeros, subnormals
SPECIAL_MASTERS = [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7FC08000, 0x7FC0FFFF,
                   0x7FBF9000, 0xFFBF1234, 0x7F7F8000, 0xFF7F8000, 0x7F7FFFFF, 0x7F7F7FFF,
                   0x00000000, 0x80000000, 0x00008000, 0x00018000, 0x00000001, 0x807F8000]


def _special_state(gen, n=300):
    """SPECIAL_MASTERS repeated among random masters, in two tensors."""
    m = _halfway(torch.randn(n, generator=gen), gen)
    sp = torch.tensor(SPECIAL_MASTERS, dtype=torch.int64)
    sp = (sp - ((sp >> 31) << 32)).to(torch.int32).view(torch.float32)
    for k in range(0, n - len(sp), 3 * len(sp)):
        m[k:k + len(sp)] = sp
    shapes = [((n,), None), ((10, n // 10), "t")]
    return shapes, _state(shapes, gen, [m, m.reshape(n // 10, 10).t()])


def check_nan_inf_masters(tk):
    """Infinite, NaN, overflowing-halfway, zero and subnormal masters, finite gradients, every
    flag combination: both references bit for bit (a NaN master's parameter 0x7FC0)."""
    gen = torch.Generator().manual_seed(90)
    bad = []
    for i, h in enumerate(_combos()):
        shapes, state = _special_state(gen)
        assert any(bool(p.isnan().any()) for p in state[0])
        assert any(int(t.count_nonzero()) for t in state[3])
        bad += _run(tk, shapes, h, seed=90 + i, state=state)[0]
    assert not bad, bad[:10]


def check_nan_inf_gradients(tk):
    """NaN and infinite gradients (and buffers): both references bit for bit, except the NaN
    sign of the CPU op's buffers with maximize (module doc)."""
    gen = torch.Generator().manual_seed(95)
    bad = []
    for i, h in enumerate(_combos()):
        shapes, state = _special_state(gen)
        state[1][0][5:40:7] = float("nan")
        state[1][0][6:40:7] = float("inf")
        grads = []
        for _ in range(STEPS):
            g = _grads(shapes, gen)
            g[0].view(torch.int16)[::11] = 0x7FC0
            g[0].view(torch.int16)[1::13] = -1  # 0xFFFF: a NaN with the sign set
            g[0][2::17] = float("inf")
            g[1][3::5] = -float("inf")
            grads.append(g)
        bad += _run(tk, shapes, h, seed=0, state=state, grads=grads,
                    buf_nan_sign_ok=h["maximize"])[0]
    assert not bad, bad[:10]


def check_split_past_grid_limit(tk):
    """Past _MAX_PROGRAMS (lowered to 3 here) the launch is split: same bits."""
    orig = tk._MAX_PROGRAMS
    tk._MAX_PROGRAMS = 3
    try:
        h = _combos()[-1]

        def entry(*args, **kw):
            with _Launches(tk) as launches:
                tk.triton_sgd_step_master_list_(*args, **kw)
            n_prog = _programs(args[0], tk.BLOCK_SIZE)
            assert launches.log["_sgd_master_kernel"] == (
                [(3,)] * (n_prog // 3) + ([(n_prog % 3,)] if n_prog % 3 else []))
        bad = _run(tk, SHAPES, h, seed=100, fn=entry)[0]
    finally:
        tk._MAX_PROGRAMS = orig
    assert not bad, bad[:10]


def check_master_table_layout(tk):
    """The master kernel's table: rows of 6 int64 [p, g, buf, remainder, ties, numel] per
    non-empty tensor, then the block map, one tensor (one host-to-device copy on a GPU)."""
    B = tk.BLOCK_SIZE
    rows, blocks, n = tk._list_table([(1, 2, 3, 4, 5), (6, 7, 0, 8, 9)], [B + 1, 8],
                                     torch.device("cpu"))
    assert n == 3
    assert rows.tolist() == [1, 2, 3, 4, 5, B + 1, 6, 7, 0, 8, 9, 8]
    assert blocks.tolist() == [0, 0, 0, B, 1, 0]
    assert blocks.data_ptr() == rows.data_ptr() + 8 * rows.numel()
    assert B % 8 == 0, "a program must own whole tie bytes"


# ---- planted bugs ------------------------------------------------------------------------------
try:  # the planted kernel variants (interpreted in the child, never run in the parent)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the tests skip without triton
    triton = tl = None
_tk = None  # momentum_cuda.triton_kernels, imported in the child

if triton is not None:
    @triton.jit
    def _join_ignores_tie(param, rem, tie):
        """Planted: a halfway remainder always joins below the parameter (tie bit ignored)."""
        up = (rem >= 0x8000).to(tl.uint32)
        return (((param - up) << 16) | rem).to(tl.float32, bitcast=True)

    @triton.jit
    def _pack_reversed(tie, BLOCK: tl.constexpr):
        """Planted: bit 7 - j of byte k for element 8k + j."""
        rows = tl.reshape(tie, (BLOCK // 8, 8)) << (7 - tl.arange(0, 8)).to(tl.uint32)[None, :]
        return tl.sum(rows, axis=1).to(tl.uint8)

    @triton.jit
    def _load_reversed(ties_ptr, offs, mask):
        """Planted: element offs read from bit 7 - offs % 8."""
        byte = tl.load(ties_ptr + offs // 8, mask=mask, other=0).to(tl.uint32)
        return (byte >> (7 - offs % 8).to(tl.uint32)) & 1

    @triton.jit
    def _split_tie_every_halfway(m):
        """Planted: the tie bit set for every halfway master (also one rounded down)."""
        u = m.to(tl.uint32, bitcast=True)
        param = _tk._round_storage(m, 1).to(tl.uint32, bitcast=True) >> 16
        rem = u & 0xFFFF
        return param, rem, (rem == 0x8000).to(tl.uint32)

    @triton.jit
    def _split_truncates(m):
        """Planted: the parameter is the master's high half (the interpreter's bf16 cast)."""
        u = m.to(tl.uint32, bitcast=True)
        rem = u & 0xFFFF
        return u >> 16, rem, u & 0


def _planted_table(tk):
    """_list_table whose block map names the neighbour tensor."""
    orig = tk._list_table

    def bad(addrs, numels, device):
        rows, blocks, n = orig(addrs, numels, device)
        blocks = blocks.clone().reshape(-1, 2)
        blocks[:, 0] = (blocks[:, 0] + 1) % len(numels)
        return rows.clone(), blocks.reshape(-1), n
    return orig, bad


def check_planted_bugs_fail(tk):
    """Each planted bug makes the comparison fail on random steps and halfway results
    (the real kernel passes both first)."""
    gen = torch.Generator().manual_seed(110)
    h_rand = _combos()[-1]
    h_half = dict(lr=1.0, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False)
    masters, grads = _halfway_results(SHAPES, gen, False)
    half_state = _state(SHAPES, gen, masters)
    half_grads = [[_like(spec, t) for spec, t in zip(SHAPES, grads)]]

    def caught():
        # the reference only: the CPU op is checked against it above
        bad, _ = _run(tk, SHAPES, h_rand, seed=111, steps=2, cpu=False)
        bad2, _ = _run(tk, SHAPES, h_half, seed=0, steps=1, state=half_state,
                       grads=half_grads, cpu=False)
        return bad + bad2

    assert not caught(), "the real kernel must match here"
    for name, bug, what in (("_bf16_join", _join_ignores_tie, "join ignores the tie bit"),
                            ("_pack_tie_bits", _pack_reversed, "ties packed in reverse order"),
                            ("_load_tie_bits", _load_reversed, "ties read in reverse order"),
                            ("_bf16_split", _split_tie_every_halfway,
                             "tie set for every halfway master"),
                            ("_bf16_split", _split_truncates, "split truncates"),
                            ("_list_table", None, "block map names the neighbour tensor")):
        if bug is None:
            orig, bad = _planted_table(tk)
        else:
            orig, bad = getattr(tk, name), bug
        setattr(tk, name, bad)
        tk._TABLES.clear()  # a table cached for reused addresses would bypass _list_table
        try:
            assert caught(), f"planted bug ({what}) went unnoticed"
        finally:
            setattr(tk, name, orig)
            tk._TABLES.clear()


# ---- validation ------------------------------------------------------------------------------
def _raises(fn, exc, text):
    try:
        fn()
    except exc as e:
        assert text in str(e), f"message {str(e)!r} lacks {text!r}"
        return
    raise AssertionError(f"no {exc.__name__} ({text})")


def check_validation_errors(tk):
    """Bad dtypes, sizes, strides, tie lengths, list lengths, overlaps and scalars raise
    naming the argument, before anything is launched or written; the C++ op refuses each
    of them too (same conditions)."""
    gen = torch.Generator().manual_seed(120)
    shapes = [((20,), None), ((4, 5), None)]
    state = _state(shapes, gen)
    grads = _grads(shapes, gen)
    before = [[t.clone() for t in ts] for ts in state + [grads]]
    h = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False,
             maximize=False, first_step=False)
    P, B, R, T = state
    G = grads

    def swap(lst, i, t):
        out = list(lst)
        out[i] = t
        return out

    cases = [
        # (params, grads, bufs, rems, ties, hyper changes, exception, text)
        (swap(P, 0, P[0].float()), swap(G, 0, G[0].float()), B, R, T, {}, ValueError,
         "params[0] must be bfloat16"),
        (swap(P, 1, P[1].float()), swap(G, 1, G[1].float()), B, R, T, {}, ValueError,
         "params[1] has dtype torch.float32 but params[0] has dtype torch.bfloat16"),
        (swap(P, 1, P[1].int()), G, B, R, T, {}, ValueError, "params[1] must be float32"),
        (P, swap(G, 1, G[1].float()), B, R, T, {}, ValueError, "grads[1] has dtype"),
        (P, swap(G, 1, G[1][:2]), B, R, T, {}, ValueError, "grads[1] has shape"),
        (P, swap(G, 1, G[1].t().contiguous().t()), B, R, T, {}, ValueError,
         "grads[1] has strides"),
        (P, G, swap(B, 1, B[1].bfloat16()), R, T, {}, ValueError,
         "momentum_buffers[1] must be torch.float32"),
        (P, G, swap(B, 1, B[1].reshape(20)), R, T, {}, ValueError,
         "momentum_buffers[1] has shape"),
        (P, G, swap(B, 1, None), R, T, {}, ValueError, "momentum_buffers[1] is undefined"),
        (P, G, B[:1], R, T, {}, ValueError, "momentum_buffers has 1 tensors"),
        (P, G, B, swap(R, 1, R[1].int()), T, {}, ValueError, "remainders[1] must be torch.int16"),
        (P, G, B, swap(R, 1, R[1].view(torch.uint16)), T, {}, ValueError,
         "remainders[1] must be torch.int16"),
        (P, G, B, swap(R, 1, R[1].reshape(5, 4)), T, {}, ValueError,
         "remainders[1] has shape"),
        (P, G, B, swap(R, 1, R[1].t().contiguous().t()), T, {}, ValueError,
         "remainders[1] has strides"),
        (P, G, B, swap(R, 1, "rem"), T, {}, TypeError, "remainders[1] must be a tensor"),
        (P, G, B, R[:1], T, {}, ValueError, "remainders has 1 tensors"),
        (P, G, B, R, swap(T, 1, torch.zeros(2, dtype=torch.uint8)), {}, ValueError,
         "ties[1] must be a contiguous 1-D uint8 tensor of 3 bytes"),
        (P, G, B, R, swap(T, 1, torch.zeros(4, dtype=torch.uint8)), {}, ValueError,
         "ties[1] must be a contiguous 1-D uint8 tensor of 3 bytes"),
        (P, G, B, R, swap(T, 1, T[1].view(torch.int8)), {}, ValueError, "ties[1] must be"),
        (P, G, B, R, swap(T, 1, T[1].bool()), {}, ValueError, "ties[1] must be"),
        (P, G, B, R, swap(T, 1, torch.zeros(3, 1, dtype=torch.uint8)), {}, ValueError,
         "ties[1] must be"),
        (P, G, B, R, swap(T, 1, torch.zeros(6, dtype=torch.uint8)[::2]), {}, ValueError,
         "ties[1] must be"),
        (P, G, B, R, swap(T, 1, None), {}, ValueError, "ties[1] is undefined"),
        (P, G, B, R, T[:1], {}, ValueError, "ties has 1 tensors"),
        (P, G[:1], B, R, T, {}, ValueError, "grads has 1 tensors"),
        (swap(P, 1, torch.ones(40, dtype=torch.bfloat16)[::2]), G, B, R, T, {}, ValueError,
         "params[1] must be dense"),
        # overlaps: a remainder over a parameter's bytes, tie bytes inside a remainder
        (P, G, B, swap(R, 0, P[0].view(torch.int16)), T, {}, ValueError, "overlaps"),
        (P, G, B, R, swap(T, 0, R[0].view(torch.uint8)[:3]), {}, ValueError, "overlaps"),
        (P, G, swap(B, 1, B[0][:20].reshape(4, 5)), R, T, {}, ValueError, "overlaps"),
        (P, G, B, R, T, dict(lr=float("nan")), ValueError, "lr must be a finite number"),
        (P, G, B, R, T, dict(weight_decay=float("inf")), ValueError,
         "weight_decay must be a finite number"),
        (P, G, B, R, T, dict(momentum="0.9"), TypeError, "momentum must be a Python float"),
        (P, G, B, R, T, dict(nesterov=1), TypeError, "nesterov must be a bool"),
        (P, G, [], R, T, dict(momentum=0.0, nesterov=True), ValueError,
         "nesterov=True needs momentum"),
        (P, G, [], R, T, dict(momentum=0.0, first_step=True), ValueError,
         "first_step=True"),
    ]
    for p, g, b, r, t, hc, exc, text in cases:
        kw = dict(h, **hc)
        with _Launches(tk) as launches:
            _raises(lambda: tk.triton_sgd_step_master_list_(p, g, b, r, t, **kw), exc, text)
        assert not any(launches.log.values()), f"{text}: launched"
        if exc is ValueError:  # the C++ op refuses the same call
            try:
                OP(p, g, b, r, t, kw["lr"], kw["momentum"], kw["dampening"],
                   kw["weight_decay"], kw["nesterov"], kw["maximize"], kw["first_step"])
            except (RuntimeError, ValueError, TypeError):
                pass
            else:
                raise AssertionError(f"the C++ op accepted the call refused with {text!r}")
    after = state + [grads]
    assert all(torch.equal(_bits(x), _bits(y)) for xs, ys in zip(before, after)
               for x, y in zip(xs, ys)), "a failed call wrote something"


def check_master_op_opcheck(tk):
    """torch.ops.momentum_cuda.triton_sgd_step_master_list_ (the custom op over the entry
    point) passes torch.library.opcheck and gives the entry point's bits."""
    ops = torch.ops.momentum_cuda
    gen = torch.Generator().manual_seed(130)
    shapes = [((n,), None) for n in (0, 1, 9, 97, 1030)] + [((6, 5), "t")]
    for h in (dict(lr=0.0123, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
                   maximize=True, first_step=False),
              dict(lr=0.0123, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                   maximize=False, first_step=False)):
        params, bufs, rems, ties = _state(shapes, gen)
        grads = _grads(shapes, gen)
        b = bufs if h["momentum"] else []
        result = torch.library.opcheck(ops.triton_sgd_step_master_list_.default,
                                       (params, grads, b, rems, ties), h)
        assert set(result.values()) == {"SUCCESS"}, result
        one = _clone([params, bufs, rems, ties])
        two = _clone([params, bufs, rems, ties])
        ops.triton_sgd_step_master_list_(one[0], grads, one[1] if h["momentum"] else [],
                                         one[2], one[3], **h)
        tk.triton_sgd_step_master_list_(two[0], grads, two[1] if h["momentum"] else [],
                                        two[2], two[3], **h)
        assert not _compare(one, two, h["momentum"], "op vs entry point")
        assert not torch.equal(_bits(one[0][-1]), _bits(params[-1])), "nothing was stepped"


CHECKS = [name for name in list(globals()) if name.startswith("check_")]


def run_checks(namespace: dict, prepare=None) -> None:
    """The child side of an interpreter test module (conftest.interpreter_child starts it with
    TRITON_INTERPRET=1): the interpreted triton_kernels as the module's _tk (after
    prepare(tk), if given), then every check in its CHECKS, each one's {"error": traceback or
    None, "seconds": ...} printed after @@RESULT@@ for the parent."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    sys.path.insert(0, ROOT)
    from momentum_cuda import triton_kernels as tk
    assert tk.interpreting(), "kernels are not interpreted"
    namespace["_tk"] = tk
    if prepare is not None:
        prepare(tk)
    torch.set_num_threads(1)
    out = {}
    for name in namespace["CHECKS"]:
        t0 = time.perf_counter()
        try:
            namespace[name](tk)
            err = None
        except Exception:  # reported to the parent
            err = traceback.format_exc()
        out[name] = {"error": err, "seconds": round(time.perf_counter() - t0, 2)}
    print("@@RESULT@@" + json.dumps(out))


def _child_main() -> None:
    run_checks(globals())


# ----------------------------------------------------------------------------------------------
# Parent side: pytest.
# ----------------------------------------------------------------------------------------------
pytestmark = pytest.mark.skipif(not (have("triton") and have("numpy")),
                                reason="triton and numpy are needed for the interpreter")


@pytest.fixture(scope="module")
def master_results():
    return interpreter_child("test_triton_master", timeout=600)


@pytest.mark.parametrize("name", CHECKS)
def test_interpreter(master_results, name):
    res = master_results[name]
    assert res["error"] is None, res["error"]


def test_cpu_tensors_refused_without_interpreter():
    """In this (non-interpreted) process, CPU tensors are refused before any launch, naming
    the parameter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process interprets")
    from momentum_cuda import triton_kernels as tk
    p = torch.ones(4, dtype=torch.bfloat16)
    r, t = torch.zeros(4, dtype=torch.int16), torch.zeros(1, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"params\[0\] must be on a CUDA device"):
        tk.triton_sgd_step_master_list_([p], [p.clone()], [], [r], [t], lr=0.1, momentum=0.0,
                                        dampening=0.0, weight_decay=0.0, nesterov=False,
                                        maximize=False, first_step=False)
    assert bool((p == 1).all())


MASTER_FLAGS = {"plain": {}, "momentum-wd-nesterov-max": dict(WEIGHT_DECAY=True, NESTEROV=True,
                                                              MAXIMIZE=True),
                "first-step": dict(FIRST_STEP=True), "found-inf": dict(AMP_SKIP=True)}


@pytest.mark.parametrize("flags", list(MASTER_FLAGS), ids=list(MASTER_FLAGS))
def test_master_kernel_compiles_for_sm90(flags):
    """The master kernel compiles ahead of time for sm_90 (reshape, sum, int -> pointer casts),
    keeps buf * m a separate mul.rn.f32 feeding the addend of an fma.rn (fusion off) where
    the buffer is read, and converts no float to bf16 (join and split are integer bit
    arithmetic)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import triton_aot_check as aot
    from momentum_cuda import triton_kernels as tk
    fn = tk._sgd_master_kernel
    vals = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, use_buf=True)
    ce = tk._step_flags(vals, False, False, False)
    if "AMP_SKIP" in fn.arg_names:  # (not in the stochastic-rounding kernel: test_triton_sr)
        ce["AMP_SKIP"] = False
    opts = {k: ce.pop(k) for k in ("num_warps", "enable_fp_fusion")}
    ce.update(MASTER_FLAGS[flags])
    sig = {n: ("*fp32" if n == "inf_ptr" else "*i64" if n.endswith("_ptr") else "fp64")
           for n in fn.arg_names if n not in ce}
    res = aot.compile_aot(fn, sig, ce, 90, num_warps=opts["num_warps"],
                          enable_fp_fusion=opts["enable_fp_fusion"])
    assert res.cubin and res.enable_fp_fusion is False
    assert "cvt.rn.bf16" not in res.ptx and ".bf16" not in res.ptx
    assert "fma.rn.f32" in res.ptx
    if not ce["FIRST_STEP"]:
        runtime = [n for n in fn.arg_names if n not in ce]
        # with nesterov the lr fma takes g + m * buf, not buf: its operand is not checked
        ok, fma = aot.check_fma_contract(res, runtime.index("m_mul"),
                                         None if ce["NESTEROV"] else runtime.index("neg_lr"))
        assert ok, fma["problems"]
        per_thread = ce["BLOCK"] // (32 * opts["num_warps"])
        assert fma["n_mul_by_momentum"] == per_thread, fma


if __name__ == "__main__":
    _child_main()
