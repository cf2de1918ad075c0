"""The Triton fp16 master-weights kernel (fp16 parameters with separate fp32 masters,
csrc/include/momentum_cuda/fp16_master.h) under Triton's CPU interpreter (TRITON_INTERPRET=1),
without a GPU.

As in tests/test_triton_qmom.py (whose helpers this file uses), the interpreter must be on
before momentum_cuda.triton_kernels is imported, so the checks run in ONE child Python process
(this file, run as a script) and each pytest test asserts one check's outcome.

Every comparison is bitwise (torch.equal on the bits) after every step, against the plain-torch
contract momentum_cuda.reference.sgd_fp16_master_reference_step and the C++ CPU op
torch.ops.momentum_cuda.sgd_step_fp16_master_list_, on copies: parameters, masters and
momentum buffers; the gradients are left as they were. Each call of the entry point is exactly
ONE launch of the fp16 master kernel (counting proxies), none of the other kernels, with ALIGNED
set exactly when every address of the table is a multiple of 16. The parameters start as random
bytes (the contract never reads them); the buffers too where a first step must not read them.
Inputs: every flag combination, first and later steps, gradients from fp16 subnormals to
thousands, sizes 0, 1, 3, 97, 1000, 1023, 1024, 1025, 3001 and 2^16 + 3, transposed 2-D,
channels_last 4-D and permuted 3-D layouts, views at odd addresses (the unaligned launch),
>= 100 tensors in one call; range edges: masters stepped across 65504 and 65520 (the parameter
inf while its master is finite, and back), fp16 subnormal results and their ties, ties of normal
values, -0.0, fp32 subnormals, inf and NaN masters and gradients (a NaN parameter is 0x7E00 with
its sign: the reference's NaNs, made by torch's conversion, are compared in that form). The
conversion alone (_fp16_bits) against torch's round-to-nearest-even cast on every fp16 value,
its fp32 neighbours, every midpoint and its neighbours. Writes stay inside each tensor (guard
values around views of one storage). Validation; opcheck of the custom op.

Planted bugs (kernel text substituted) must make the comparisons fail: a truncating fp16
conversion, the parameter rounded from the old master, the buffer not written, the master not
written, fp16 subnormals flushed to zero or converted as normals, overflow saturated at 65504,
NaN written as inf, a first step taken as a later one, every block unmasked.
"""
# No `from __future__ import annotations`: the test kernel's `tl.constexpr` annotation must
# reach Triton as a type, not as text.
import os
from unittest import mock

import pytest
import torch

import conftest
import test_triton_master as _tm
import test_triton_qmom as _tq
from test_triton_master import _bits, _combos, _raises
from test_triton_qmom import _aligned, _empty, _garbage, _like


# ----------------------------------------------------------------------------------------------
# Child side: runs with TRITON_INTERPRET=1 (only ever called from _child_main).
# ----------------------------------------------------------------------------------------------
STEPS = 3
SIZES = (0, 1, 3, 97, 1000, 1023, 1024, 1025, 3001)
# (shape, layout): as in test_triton_qmom ("odd": 2 bytes (fp16) / 4 bytes (fp32) past a
# 16-byte boundary)
SHAPES = ([((n,), None) for n in SIZES]
          + [((13, 9), "t"), ((31, 33), "t"), ((2, 3, 5, 7), "cl"), ((3, 8, 4, 4), "cl"),
             ((5, 6, 11), "perm"), ((0, 4), None)])
MANY_SHAPES = SHAPES + [((((i * 37) % 151) | 1,), None) for i in range(90)]
BIG = 2**16 + 3
GRAD_SCALES = (1e-6, 1.0, 1e3)  # fp16 subnormal gradients, then ordinary, then large


def _op():
    return torch.ops.momentum_cuda.sgd_step_fp16_master_list_


def _fp16(spec, values):
    return _like(spec, values.reshape(spec[0]).to(torch.float16))


def _state(shapes, gen, garbage_bufs=False):
    """[params, bufs, masters]: params random bytes (never read), fp32 masters and buffers
    random (buffers random bytes with garbage_bufs)."""
    params = [_garbage(_empty(spec, torch.float16), gen) for spec in shapes]
    bufs = [_like(spec, torch.randn(spec[0], generator=gen) * 0.1) for spec in shapes]
    masters = [_like(spec, torch.randn(spec[0], generator=gen)) for spec in shapes]
    if garbage_bufs:
        for b in bufs:
            _garbage(b, gen)
    return [params, bufs, masters]


def _copy(t):
    """A copy of t with t's strides at t's address mod 16 (Tensor.clone allocates afresh: an
    odd view's clone is aligned)."""
    off = t.data_ptr() % 16 // t.element_size()
    out = torch.empty(t.numel() + 16, dtype=t.dtype).as_strided(t.shape, t.stride(), off)
    assert out.data_ptr() % 16 == t.data_ptr() % 16
    return out.copy_(t)


def _clone(state):
    return [[_copy(t) for t in ts] for ts in state]


class _Launches(_tq._Launches):
    """test_triton_qmom's launch counter, with the fp16 master kernel."""
    NAMES = ("_sgd_fp16_master_kernel",) + _tq._Launches.NAMES


def _table_aligned(params, grads, bufs, masters):
    return _aligned(params, grads, bufs) and _aligned(masters, [], [])


def _step(tk, ours, grads, h, first, fn=None):
    """One step of the entry point (or fn) on ours = [params, bufs, masters], asserting ONE
    launch of the fp16 master kernel with the call's ALIGNED (none at all when every tensor is
    empty) and no other kernel."""
    params, bufs, masters = ours
    bufs = bufs if h["momentum"] else []
    n_prog = _tm._programs(params, tk.BLOCK_SIZE)
    with _Launches(tk) as launches:
        (fn or tk.triton_sgd_step_fp16_master_list_)(params, grads, bufs, masters, **h,
                                                     first_step=first)
    if fn is None:
        log = launches.log["_sgd_fp16_master_kernel"]
        assert [g for g, _ in log] == ([(n_prog,)] if n_prog else []), \
            f"launches {log}, expected one of {n_prog} programs"
        if log:
            kw = log[0][1]
            assert kw["ALIGNED"] == _table_aligned(params, grads, bufs, masters), kw["ALIGNED"]
        assert not any(launches.log[n] for n in _Launches.NAMES
                       if n != "_sgd_fp16_master_kernel")


def _canonical_nan_fp16(t):
    """fp16 bits with a NaN as 0x7E00 with its sign (c10's scalar conversion; torch's
    vectorized one may keep payload bits)."""
    b = _bits(t)
    canon = torch.where(b < 0, torch.tensor(-512, dtype=torch.int16),  # 0xFE00
                        torch.tensor(0x7E00, dtype=torch.int16))
    return torch.where(t.isnan(), canon, b)


def _compare(ours, other, momentum, what, canon_nan=False, nan_sign_ok=False):
    """Mismatches of ours = [params, bufs, masters] with other (same form). canon_nan: other's
    NaN parameters compared as 0x7E00 with their sign. nan_sign_ok: where both are NaN, the
    sign (and for fp32 the payload) may differ (NaN signs and payloads are outside the
    contract: the C++ op's maximize negates a NaN gradient where torch keeps it, and which
    NaN an fma returns differs between the interpreter, torch's CPU code and a GPU)."""
    bad = []
    parts = [("param", 0), ("master", 2)] + ([("momentum buffer", 1)] if momentum else [])
    for name, k in parts:
        for i, (a, b) in enumerate(zip(ours[k], other[k])):
            x = _bits(a)
            y = _canonical_nan_fp16(b) if canon_nan and name == "param" else _bits(b)
            if nan_sign_ok:
                # the parameter's NaN stays 0x7E00 up to its sign; an fp32 NaN is any NaN
                nan = a.isnan() & b.isnan()
                keep = 0x7FFF if a.element_size() == 2 else 0x7F800000
                x, y = torch.where(nan, x & keep, x), torch.where(nan, y & keep, y)
            if a.shape != b.shape or a.stride() != b.stride() or not torch.equal(x, y):
                n = int((x != y).sum()) if x.shape == y.shape else -1
                bad.append(f"{what}: {name} {i} (shape {tuple(a.shape)}) differs in {n}")
    return bad


def _run(tk, shapes, h, seed, steps=STEPS, first=None, state=None, grads=None, fn=None,
         cpu=True, nan_sign_ok=False):
    """`steps` steps of the kernel, the C++ op (cpu) and the reference on copies of one state,
    fresh random fp16 gradients each step (GRAD_SCALES, unless `grads`: a list per step); the
    first step is first_step=True when momentum is on (unless `first` says), and its buffers
    then hold random bytes. nan_sign_ok: NaNs compared up to sign (_compare). Returns the
    mismatches and the kernel's final state."""
    from momentum_cuda.reference import sgd_fp16_master_reference_step
    gen = torch.Generator().manual_seed(seed)
    momentum = bool(h["momentum"])
    starts_first = momentum and (first is None or first)
    state = state or _state(shapes, gen, garbage_bufs=starts_first)
    ours, theirs, ref = _clone(state), _clone(state), _clone(state)
    ref_bufs = ref[1]
    bad = []
    for s in range(steps):
        f = starts_first and s == 0
        g = grads[s] if grads is not None else [
            _fp16(spec, torch.randn(spec[0], generator=gen) * GRAD_SCALES[s % 3])
            for spec in shapes]
        g_before = [t.clone() for t in g]
        _step(tk, ours, g, h, f, fn)
        if cpu:
            _op()(theirs[0], g, theirs[1] if momentum else [], theirs[2], h["lr"],
                  h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"],
                  h["maximize"], f)
            bad += _compare(ours, theirs, momentum, f"step {s + 1} vs C++ op {h}",
                            nan_sign_ok=h["maximize"] or nan_sign_ok)
        if f or not momentum:
            ref_bufs = [None] * len(shapes)
        ref_bufs = sgd_fp16_master_reference_step(ref[0], g, ref_bufs, ref[2], **h)
        bad += _compare(ours, [ref[0], ref_bufs, ref[2]], momentum,
                        f"step {s + 1} vs reference {h}", canon_nan=True,
                        nan_sign_ok=nan_sign_ok)
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(g, g_before)), \
            "a gradient was written"
    return bad, ours


def _agree(tk, runs) -> None:
    bad = [m for kw in runs for m in _run(tk, **kw)[0]]
    assert not bad, bad[:10]


def check_inputs_are_what_they_claim(tk):
    """The layouts are dense but not contiguous where claimed, the state's tensors share the
    parameters' strides, the odd views are unaligned, the gradient scales reach fp16
    subnormals."""
    gen = torch.Generator().manual_seed(1)
    params, bufs, masters = _state(SHAPES, gen)
    for (shape, layout), p, b, m in zip(SHAPES, params, bufs, masters):
        assert tuple(p.shape) == shape and p.dtype == torch.float16
        assert b.stride() == m.stride() == p.stride() and b.dtype == m.dtype == torch.float32
        assert tk._dense(p)
        if layout:
            assert not p.is_contiguous()
    assert _table_aligned(params, params, bufs, masters)
    for dt in (torch.float16, torch.float32):
        odd = _empty(((300,), "odd"), dt)
        assert odd.data_ptr() % 16 and tk._dense(odd)
    g = _fp16(((1000,), None), torch.randn(1000, generator=gen) * GRAD_SCALES[0])
    assert bool((g.abs() < 2.0**-14).any() & (g != 0).any())


def check_every_flag_combination(tk):
    """Every flag combination, two steps (the first with first_step where momentum is on; the
    second reads the buffers the kernel wrote), SHAPES in one call: kernel, C++ op and
    reference agree bit for bit (three steps: check_big_tensor)."""
    _agree(tk, (dict(shapes=SHAPES, h=h, seed=10 + i, steps=2)
                for i, h in enumerate(_combos())))


def check_later_steps_without_first(tk):
    """Momentum on and first_step False from the start: the given buffers are read."""
    _agree(tk, (dict(shapes=SHAPES, h=h, seed=40 + i, steps=1, first=False)
                for i, h in enumerate(_combos()) if h["momentum"]))


def check_unaligned_launch(tk):
    """Parameters, gradients, buffers and masters at odd addresses: the whole launch runs
    unaligned (ALIGNED off), same bits; one momentum flag set with weight decay and nesterov,
    and one without momentum."""
    shapes = [((300,), "odd"), ((1500,), "odd"), ((1025,), None), ((6, 7), "t")]
    hs = [h for h in _combos() if h["nesterov"] and h["weight_decay"]] + [_combos()[0]]
    _agree(tk, (dict(shapes=shapes, h=h, seed=50 + i) for i, h in enumerate(hs)))


def check_one_unaligned_tensor(tk):
    """Aligned parameters and gradients, but one master (or one buffer) at an odd address:
    ALIGNED off for the launch (checked by _step), same bits."""
    shapes = [((2048,), None), ((1500,), None)]
    h = _combos()[-1]
    for k in (1, 2):  # the buffer, the master
        gen = torch.Generator().manual_seed(52 + k)
        state = _state(shapes, gen, garbage_bufs=True)
        state[k][1] = _like(((1500,), "odd"), state[k][1])
        assert state[k][1].data_ptr() % 16
        bad, _ = _run(tk, shapes, h, seed=54 + k, steps=2, state=state)
        assert not bad, bad[:10]


def check_big_tensor(tk):
    """2^16 + 3 elements with small tensors: three steps with every flag on, two without
    momentum."""
    for i, h in enumerate((_combos()[-1], _combos()[1])):
        _agree(tk, [dict(shapes=[((BIG,), None), ((257,), None), ((4, 5, 6, 7), "cl")], h=h,
                         seed=55 + i, steps=3 - i)])


def check_many_tensors_one_launch(tk):
    """>= 100 tensors (odd sizes, empty ones, non-contiguous layouts) in ONE launch per step;
    every flag on, two steps."""
    assert len(MANY_SHAPES) >= 100
    _agree(tk, [dict(shapes=MANY_SHAPES, h=_combos()[-1], seed=60, steps=2)])


def check_empty_calls_no_launch(tk):
    """No tensor, or only empty ones: validated, nothing launched (_step checks)."""
    _run(tk, [((0,), None), ((0, 4), None)], _combos()[-1], seed=70)
    with _Launches(tk) as launches:
        tk.triton_sgd_step_fp16_master_list_([], [], [], [], **_combos()[-1], first_step=False)
    assert not any(launches.log.values())


def _f32(*bits):
    return torch.tensor(list(bits), dtype=torch.int32).view(torch.float32)


def _edge_masters():
    """fp32 masters at the edges of fp16's conversion (positive; used with both signs)."""
    t24 = 2.0 ** -24
    vals = [65504.0, 65519.0, 65520.0, 65536.0, 65503.0, 1e38, float("inf"),
            2.0 ** -14, 1023.5 * t24, 1023.25 * t24, 1022.5 * t24, t24, 0.5 * t24, 1.5 * t24,
            2.5 * t24, 0.25 * t24, 0.75 * t24, 0.0, 1e-45, 1.0 + 2.0 ** -11,
            1.0 + 3 * 2.0 ** -11, 2048.0 + 1.0, 2048.0 + 3.0, 1.0]
    bits = _f32(0x477FEFFF, 0x477FF000, 0x477FF001, 0x38800000 - 1, 0x33800000, 0x33800001,
                0x337FFFFF, 0x7F7FFFFF, 0x00000001)  # around 65520, 2^-14, 2^-25; fp32 extremes
    pos = torch.cat([torch.tensor(vals, dtype=torch.float32), bits])
    return torch.cat([pos, -pos, _f32(0x7FC00000, -0x00400000, 0x7F800001)])  # NaN, -NaN


def check_range_edges(tk):
    """Masters at the conversion's edges (zero gradients keep them: the parameter is each one's
    rounding), then masters walked across 65504 and 65520 and back (the parameter inf while its
    master is finite), walked through fp16's subnormals, and NaN / inf gradients: kernel, C++ op
    and reference agree after every step, with and without momentum and maximize (NaNs up
    to their sign: _compare)."""
    edges = _edge_masters()
    t24 = 2.0 ** -24
    walk = torch.tensor([65500.0, -65500.0, 65519.0, 3e-6, -1e-7, 1000 * t24, 0.5, 2.0])
    seen = dict(inf_finite=False, sub=False, nan=False)
    n = edges.numel() + walk.numel()
    spec = ((n,), None)
    for i, h in enumerate((_combos()[0], dict(_combos()[-1], weight_decay=0.0),
                           dict(_combos()[2], momentum=0.9))):
        h = dict(h, lr=1.0)
        gen = torch.Generator().manual_seed(75 + i)
        state = _state([spec], gen, garbage_bufs=True)
        state[2][0].copy_(torch.cat([edges, walk]))
        for s, delta in enumerate((0.0, -10.0, -10.0, 30.0, 30.0, -3.0)):
            g = torch.zeros(n)
            g[edges.numel():] = torch.tensor([delta, -delta, -delta, 400 * t24, -300 * t24,
                                              -700 * t24, delta, 0.0])
            if delta == 30.0:
                g[-1] = float("nan") if i else float("inf")
            g = (-g if h["maximize"] else g).to(torch.float16)
            bad, state = _run(tk, [spec], h, seed=0, steps=1, first=s == 0, state=state,
                              grads=[[g]], nan_sign_ok=True)
            assert not bad, (i, s, bad[:10])
            p, m = state[0][0], state[2][0]
            seen["inf_finite"] |= bool((p.isinf() & m.isfinite()).any())
            seen["sub"] |= bool(((p.abs() < 2.0**-14) & (p != 0)).any())
            seen["nan"] |= bool(p.isnan().any())
    assert all(seen.values()), seen
    # the edges alone: subnormal ties to even, 65520 to inf, NaN as 0x7E00 with its sign
    p = _garbage(torch.empty(edges.numel(), dtype=torch.float16),
                 torch.Generator().manual_seed(79))
    m = edges.clone()
    tk.triton_sgd_step_fp16_master_list_([p], [torch.zeros_like(p)], [], [m], lr=1.0,
                                         momentum=0.0, dampening=0.0, weight_decay=0.0,
                                         nesterov=False, maximize=False, first_step=False)
    nan = edges.isnan()
    assert torch.equal(m.isnan(), nan) and torch.equal(_bits(m)[~nan], _bits(edges)[~nan]), \
        "a zero step changed a master"
    assert torch.equal(_bits(p), _canonical_nan_fp16(edges.to(torch.float16)))
    assert _bits(p)[nan].tolist() == [0x7E00, -512, 0x7E00]
    assert p[2].isinf() and p[0] == 65504 and p[1] == 65504
    ties = _bits(torch.tensor([0.5 * t24, 1.5 * t24, 2.5 * t24]).half()).tolist()
    assert ties == [0, 2, 2], ties  # torch's subnormal ties go to even (the premise)


def check_fp16_bits_match_torch(tk):
    """_fp16_bits alone: torch's round-to-nearest-even conversion of every fp16 value widened,
    its fp32 neighbours, every midpoint between neighbouring fp16 values and its neighbours,
    both signs, and random fp32 bit patterns; NaN as 0x7E00 with its sign."""
    import triton

    h = torch.arange(0, 0x7C00, dtype=torch.int32)  # the finite non-negative fp16 values
    vals = h.to(torch.int16).view(torch.float16).float()
    up = torch.cat([vals[1:], torch.tensor([65520.0])])  # 65520: the midpoint to inf
    mid = vals.double().add(up.double()).div(2).float()  # exact in fp32
    assert torch.equal(mid.double(), (vals.double() + up.double()) / 2)
    base = torch.cat([vals, mid])
    b = base.view(torch.int32)
    pats = torch.cat([b, b + 1, (b - 1).clamp(min=0)])
    pats = torch.cat([pats, pats | -0x80000000,
                      torch.randint(-2**31, 2**31, (200000,), generator=torch.Generator()
                                    .manual_seed(3), dtype=torch.int64).to(torch.int32),
                      torch.tensor([0x7F800000, 0x7F800001, 0x7FC00000, 0x7FFFFFFF,
                                    -0x00800000, -1], dtype=torch.int32)])
    x = pats.view(torch.float32)
    out = torch.empty(x.numel(), dtype=torch.int32)
    _fp16_bits_kernel[(triton.cdiv(x.numel(), 8192),)](x, out, x.numel(), BLOCK=8192)
    want = _canonical_nan_fp16(x.to(torch.float16)).to(torch.int32) & 0xFFFF
    bad = (out != want).nonzero().flatten()
    assert bad.numel() == 0, [(hex(pats[i].item() & 0xFFFFFFFF), hex(out[i].item()),
                               hex(want[i].item())) for i in bad[:8]]


def check_writes_stay_inside(tk):
    """Parameters, gradients, buffers and masters as 16-byte aligned views of one storage
    each, with guard values between them: a step writes nothing outside the tensors (full
    blocks run unmasked on the aligned path)."""
    sizes = [1, 1023, 1024, 1025, 2049, 3000]
    gap = 2048
    h = _combos()[-1]
    gen = torch.Generator().manual_seed(85)
    total = sum(-(-n // 16) * 16 for n in sizes) + gap * (len(sizes) + 1)
    stores = {"p": torch.full((total,), -7.0, dtype=torch.float16),
              "g": torch.full((total,), -7.0, dtype=torch.float16),
              "b": torch.full((total,), -7.0), "m": torch.full((total,), -7.0)}
    before = {k: v.clone() for k, v in stores.items()}
    views = {k: [] for k in stores}
    inside = torch.zeros(total, dtype=torch.bool)
    off = gap
    for n in sizes:
        for k in stores:
            views[k].append(stores[k][off:off + n])
        inside[off:off + n] = True
        off += -(-n // 16) * 16 + gap  # the next views 16-byte aligned too
    for v in views["m"] + views["g"]:
        v.copy_(torch.randn(v.shape, generator=gen))
    assert _table_aligned(views["p"], views["g"], views["b"], views["m"])
    for first in (True, False):
        tk.triton_sgd_step_fp16_master_list_(views["p"], views["g"], views["b"], views["m"],
                                             **h, first_step=first)
    for k, t in stores.items():
        assert torch.equal(_bits(t)[~inside], _bits(before[k])[~inside]), \
            f"a write outside the {k} tensors"
    assert not torch.equal(_bits(stores["m"]), _bits(before["m"])), "nothing was stepped"


def check_table_cached(tk):
    """The pointer table is built once for a set of tensors and reused at later steps (no
    host work or copy); rows of 5 (p, g, buffer or 0, master, numel)."""
    gen = torch.Generator().manual_seed(90)
    for h in (_combos()[-1], _combos()[0]):
        params, bufs, masters = _state(SHAPES, gen)
        bufs = bufs if h["momentum"] else []
        grads = [_fp16(spec, torch.randn(spec[0], generator=gen)) for spec in SHAPES]
        tk._TABLES.clear()
        seen = []
        kernel = tk._sgd_fp16_master_kernel

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    seen.append(args[:2])
                    return kernel[grid](*args, **kw)
                return launch
        tk._sgd_fp16_master_kernel = Spy()
        try:
            for _ in range(2):
                tk.triton_sgd_step_fp16_master_list_(params, grads, bufs, masters, **h,
                                                     first_step=False)
        finally:
            tk._sgd_fp16_master_kernel = kernel
        assert len(tk._TABLES) == 1
        assert [t.data_ptr() for t in seen[0]] == [t.data_ptr() for t in seen[1]], \
            "the table was rebuilt"
        rows = seen[0][0].reshape(-1, 5)
        keep = [i for i, p in enumerate(params) if p.numel()]
        assert rows[:, -1].tolist() == [params[i].numel() for i in keep]
        assert rows[:, 0].tolist() == [params[i].data_ptr() for i in keep]
        assert rows[:, 1].tolist() == [grads[i].data_ptr() for i in keep]
        assert rows[:, 2].tolist() == ([bufs[i].data_ptr() for i in keep] if bufs
                                       else [0] * len(keep))
        assert rows[:, 3].tolist() == [masters[i].data_ptr() for i in keep]


def check_split_past_grid_limit(tk):
    """Past _MAX_PROGRAMS (lowered to 3 here) the launch is split: same bits."""
    orig = tk._MAX_PROGRAMS
    tk._MAX_PROGRAMS = 3
    tk._TABLES.clear()
    try:
        def entry(params, *args, **kw):
            with _Launches(tk) as launches:
                tk.triton_sgd_step_fp16_master_list_(params, *args, **kw)
            n_prog = _tm._programs(params, tk.BLOCK_SIZE)
            assert [g for g, _ in launches.log["_sgd_fp16_master_kernel"]] == (
                [(3,)] * (n_prog // 3) + ([(n_prog % 3,)] if n_prog % 3 else []))
        _agree(tk, [dict(shapes=SHAPES, h=_combos()[-1], seed=100, fn=entry)])
    finally:
        tk._MAX_PROGRAMS = orig
        tk._TABLES.clear()


# ---- planted bugs ------------------------------------------------------------------------------
PLANTS = [
    # (function, old text, new text, occurrences, what)
    ("_fp16_bits", "r = _round_storage(x, 2).to(tl.uint32, bitcast=True)",
     "r = x.to(tl.uint32, bitcast=True) & 0xFFFFE000", 1, "truncating fp16 conversion"),
    ("_fp16_master_block", "_fp16_bits(new)", "_fp16_bits(m)", 1,
     "parameter rounded from the old master"),
    ("_fp16_master_block", "_st(b_ptr + offs, buf, mask, MASKED)",
     "_st(m_ptr + offs, new, mask, MASKED)", 1, "buffer not written"),
    ("_fp16_master_block", "_st(m_ptr + offs, new, mask, MASKED)",
     "_st(m_ptr + offs, m, mask, MASKED)", 1, "master not written"),
    ("_fp16_bits", "h = tl.where(a < 0x38800000, sub, normal)",
     "h = tl.where(a < 0x38800000, 0, normal)", 1, "subnormals flushed to zero"),
    ("_fp16_bits", "h = tl.where(a < 0x38800000, sub, normal)", "h = normal", 1,
     "subnormals converted as normals"),
    ("_fp16_bits", "h = tl.where(a == 0x7F800000, 0x7C00, h)",
     "h = tl.where(a == 0x7F800000, 0x7BFF, h)", 1, "overflow saturated at 65504"),
    ("_fp16_bits", "h = tl.where(a > 0x7F800000, 0x7E00, h)",
     "h = tl.where(a > 0x7F800000, 0x7C00, h)", 1, "NaN written as inf"),
    ("_fp16_master_block", "NESTEROV, FIRST_STEP, LR_TENSOR, M_TENSOR, D_TENSOR,",
     "NESTEROV, False, LR_TENSOR, M_TENSOR, D_TENSOR,", 1,
     "first step as a later one (the buffer damped from zero)"),
    ("_sgd_fp16_master_kernel", "if start + BLOCK <= n:", "if start < n:", 1,
     "every block unmasked"),
]


def check_planted_bugs_fail(tk):
    """Each planted bug makes a check fail (the real kernel passes the same checks first):
    random steps over a few shapes (the first with garbage buffers), the range edges, and
    the guard values around views."""
    shapes = [((1025,), None), ((97,), None), ((13, 9), "t"), ((3000,), None)]

    def caught(guarded_only=False):
        bad = []
        if not guarded_only:
            bad += _run(tk, shapes, _combos()[-1], seed=111, steps=2, cpu=False)[0]
            for check in (check_range_edges,):
                try:
                    check(tk)
                except AssertionError as e:
                    bad.append(str(e)[:200])
        try:
            check_writes_stay_inside(tk)
        except AssertionError as e:
            bad.append(str(e)[:200])
        return bad

    assert not caught(), "the real kernel must pass here"
    for name, old, new, count, what in PLANTS:
        bug = _tq._planted(tk, name, old, new, count)
        with mock.patch.object(tk, name, bug):
            assert caught(guarded_only=name == "_sgd_fp16_master_kernel"), \
                f"planted bug ({what}) went unnoticed"


# ---- validation ------------------------------------------------------------------------------
def check_validation_errors(tk):
    """Bad dtypes, sizes, strides, list lengths, overlaps and scalars raise naming the
    argument, before anything is launched or written; the C++ op refuses each of them too."""
    gen = torch.Generator().manual_seed(120)
    shapes = [((20,), None), ((4, 300), None)]
    P, B, M = _state(shapes, gen)
    G = [_fp16(spec, torch.randn(spec[0], generator=gen)) for spec in shapes]
    before = [[t.clone() for t in ts] for ts in (P, B, M, G)]
    h = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False,
             maximize=False, first_step=False)

    def swap(lst, i, t):
        out = list(lst)
        out[i] = t
        return out

    cases = [
        # (params, grads, bufs, masters, hyper changes, exception, text)
        (swap(P, 0, P[0].bfloat16()), swap(G, 0, G[0].bfloat16()), B, M, {}, ValueError,
         "params[0] must be float16 (fp16 master weights keep an fp32 copy of a float16 "
         "parameter)"),
        ([p.float() for p in P], [g.float() for g in G], B, M, {}, ValueError,
         "params[0] must be float16"),
        (P, G, B, M[:1], {}, ValueError, "masters has 1 tensors but params has 2"),
        (P, G, B, M + M[:1], {}, ValueError, "masters has 3 tensors but params has 2"),
        (P, G, B, swap(M, 1, M[1].half()), {}, ValueError, "masters[1] must be torch.float32"),
        (P, G, B, swap(M, 1, M[1].double()), {}, ValueError,
         "masters[1] must be torch.float32"),
        (P, G, B, swap(M, 1, M[1].reshape(1200)), {}, ValueError, "masters[1] has shape"),
        (P, G, B, swap(M, 1, M[1].t().contiguous().t()), {}, ValueError,
         "masters[1] has strides"),
        (P, G, B, swap(M, 0, None), {}, ValueError, "masters[0] is undefined"),
        (P, G, B, swap(M, 1, M[0]), {}, ValueError, "masters[1] has shape"),
        (P, G, B, swap(M, 1, B[1]), {}, ValueError, "overlaps"),
        (P, G, swap(B, 1, B[1].half()), M, {}, ValueError,
         "momentum_buffers[1] must be torch.float32"),
        (P, G, swap(B, 1, B[1].reshape(1200)), M, {}, ValueError,
         "momentum_buffers[1] has shape"),
        (P, G, swap(B, 1, None), M, {}, ValueError, "momentum_buffers[1] is undefined"),
        (P, G, B[:1], M, {}, ValueError, "momentum_buffers has 1 tensors"),
        (P, swap(G, 1, G[1].float()), B, M, {}, ValueError, "grads[1] has dtype"),
        (P, swap(G, 1, G[1][:2]), B, M, {}, ValueError, "grads[1] has shape"),
        (P, G[:1], B, M, {}, ValueError, "grads has 1 tensors"),
        (P, swap(G, 0, "g"), B, M, {}, TypeError, "grads[0] must be a tensor"),
        (swap(P, 0, torch.ones(40, dtype=torch.float16)[::2]), G, B, M, {}, ValueError,
         "params[0] must be dense"),
        (P, swap(G, 0, P[0]), B, M, {}, ValueError, "overlaps"),
        (P, G, B, swap(M, 0, B[0].view(torch.int32).view(torch.float32)), {}, ValueError,
         "overlaps"),
        (P, G, B, M, dict(lr=float("nan")), ValueError, "lr must be a finite number"),
        (P, G, B, M, dict(momentum="0.9"), TypeError, "momentum must be a Python float"),
        (P, G, B, M, dict(nesterov=1), TypeError, "nesterov must be a bool"),
        (P, G, [], M, dict(momentum=0.0, nesterov=True), ValueError,
         "nesterov=True needs momentum"),
        (P, G, [], M, dict(momentum=0.0, first_step=True), ValueError, "first_step=True"),
    ]
    op = _op()
    for p, g, b, m, hc, exc, text in cases:
        kw = dict(h, **hc)
        with _Launches(tk) as launches:
            _raises(lambda: tk.triton_sgd_step_fp16_master_list_(p, g, b, m, **kw), exc, text)
        assert not any(launches.log.values()), f"{text}: launched"
        if exc is ValueError:  # the C++ op refuses the same call
            try:
                op(p, g, b, m, kw["lr"], kw["momentum"], kw["dampening"], kw["weight_decay"],
                   kw["nesterov"], kw["maximize"], kw["first_step"])
            except (RuntimeError, ValueError, TypeError):
                pass
            else:
                raise AssertionError(f"the C++ op accepted the call refused with {text!r}")
    after = [P, B, M, G]
    assert all(torch.equal(_bits(x), _bits(y)) for xs, ys in zip(before, after)
               for x, y in zip(xs, ys)), "a failed call wrote something"


def check_fp16_master_op_opcheck(tk):
    """torch.ops.momentum_cuda.triton_sgd_step_fp16_master_list_ (the custom op over the entry
    point) passes torch.library.opcheck and gives the entry point's bits, with and without
    momentum; fp16_master_op routes to it."""
    from momentum_cuda._ops import fp16_master_op
    ops = torch.ops.momentum_cuda
    assert fp16_master_op("triton") is ops.triton_sgd_step_fp16_master_list_.default
    gen = torch.Generator().manual_seed(130)
    shapes = [((n,), None) for n in (0, 1, 9, 257, 1030)] + [((6, 5), "t")]
    for h in (dict(lr=0.0123, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
                   maximize=True, first_step=False),
              dict(lr=0.0123, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True,
                   maximize=False, first_step=True),
              dict(lr=0.0123, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                   maximize=False, first_step=False)):
        state = _state(shapes, gen)
        if not h["momentum"]:
            state[1] = []
        grads = [_fp16(spec, torch.randn(spec[0], generator=gen)) for spec in shapes]
        result = torch.library.opcheck(ops.triton_sgd_step_fp16_master_list_.default,
                                       (state[0], grads, state[1], state[2]), h)
        assert set(result.values()) == {"SUCCESS"}, result
        one, two = _clone(state), _clone(state)
        ops.triton_sgd_step_fp16_master_list_(one[0], grads, one[1], one[2], **h)
        tk.triton_sgd_step_fp16_master_list_(two[0], grads, two[1], two[2], **h)
        assert not _compare(one, two, bool(h["momentum"]), "op vs entry point")
        assert not torch.equal(_bits(one[2][-1]), _bits(state[2][-1])), "nothing was stepped"


CHECKS = [name for name in list(globals()) if name.startswith("check_")]

_fp16_bits_kernel = None  # defined in the child (its @triton.jit needs the interpreter on)


def _define_kernels(tk):
    """The test kernel, on the module's globals (the interpreter runs a kernel's source
    again with its globals only: no closures)."""
    global _fp16_bits_kernel, _fp16_bits, tl
    import triton
    import triton.language as tl
    _fp16_bits = tk._fp16_bits

    @triton.jit
    def _fp16_bits_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        """out = _fp16_bits(x) as int32."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        bits = _fp16_bits(tl.load(x_ptr + offs, mask=m))
        tl.store(out_ptr + offs, bits.to(tl.int32), mask=m)



def _child_main() -> None:
    _tm.run_checks(globals(), _define_kernels)


# ----------------------------------------------------------------------------------------------
# Parent side: pytest.
# ----------------------------------------------------------------------------------------------
pytestmark = _tm.pytestmark  # triton and numpy are needed for the interpreter


@pytest.fixture(scope="module")
def fp16_master_results():
    return conftest.interpreter_child("test_triton_fp16_master", timeout=600)


@pytest.mark.parametrize("name", CHECKS)
def test_interpreter(fp16_master_results, name):
    res = fp16_master_results[name]
    assert res["error"] is None, res["error"]


def test_cpu_tensors_refused_without_interpreter():
    """In this (non-interpreted) process, CPU tensors are refused before any launch by the
    entry point and by the custom op over it, naming the parameter; nothing is written."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process interprets")
    from momentum_cuda import triton_kernels as tk
    p = torch.ones(4, dtype=torch.float16)
    m = torch.ones(4)
    h = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
             maximize=False, first_step=False)
    for step in (tk.triton_sgd_step_fp16_master_list_,
                 torch.ops.momentum_cuda.triton_sgd_step_fp16_master_list_):
        with pytest.raises(ValueError, match=r"params\[0\] must be on a CUDA device"):
            step([p], [p.clone()], [], [m], **h)
    assert bool((p == 1).all()) and bool((m == 1).all())


def test_fp16_master_op_routes_backends():
    """fp16_master_op: the Triton custom op for "triton", the C++ op otherwise."""
    from momentum_cuda._ops import fp16_master_op
    ops = torch.ops.momentum_cuda
    assert fp16_master_op("triton") is ops.triton_sgd_step_fp16_master_list_.default
    assert fp16_master_op("cpu") is ops.sgd_step_fp16_master_list_.default


if __name__ == "__main__":
    _child_main()
