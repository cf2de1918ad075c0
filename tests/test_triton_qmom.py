"""The Triton momentum_dtype kernel (fp32 parameters, momentum buffers stored as bf16 or as int8
codes with an fp32 scale per 256 elements, csrc/include/momentum_cuda/momentum_dtype.h) under
Triton's CPU interpreter (TRITON_INTERPRET=1), without a GPU.

As in tests/test_triton_sr.py (this file uses test_triton_master's helpers), the interpreter
must be on before momentum_cuda.triton_kernels is imported, so the checks run in ONE child
Python process (this file, run as a script) and each pytest test asserts one check's outcome.

Every comparison is bitwise (torch.equal on the bits) after every step, against the plain-torch
contract momentum_cuda.reference.sgd_momentum_dtype_reference_step and the C++ CPU op
torch.ops.momentum_cuda.sgd_step_qmom_list_, on copies: parameters, buffers and scales; the
gradients are left as they were. Each call of the entry point is exactly ONE launch of the
momentum_dtype kernel (counting proxies), none of the other kernels, with ALIGNED set exactly
when every address of the table is a multiple of 16. Inputs: random values, both buffer kinds
(and no buffer, momentum 0), every flag combination, first and later steps, sizes 0, 1, 3, 97,
255, 256, 257, 1000, 1023, 1025, 3001 and 2^16 + 3, transposed 2-D, channels_last 4-D and
permuted 3-D layouts (blocks counted in memory order), a view at an odd address (the unaligned
launch), >= 100 tensors in one call; blocks that are all zero, hold a NaN or an inf (read back as
NaN at the next step), subnormal values whose scale rounds to a subnormal or to zero, exact ties
of v / scale and of bf16 rounding, fp32's largest values. Writes stay inside each tensor
(guard values around views of one storage). Validation; opcheck of the custom op.

Planted bugs (kernel text substituted, or helpers swapped) must make the comparisons fail: bf16
truncated, the absmax over half the block, the scale from the first element, ties rounded away
from zero, the scale as a multiply by 1/127, the code as a multiply by 1/scale, no NaN scale
for an inf block, the scales indexed per program instead of per 256 elements, every block
unmasked (a write past the tensor).
"""
from __future__ import annotations

import inspect
import os
import sys
import tempfile
import textwrap
from unittest import mock

import pytest
import torch

import conftest
from test_triton_master import _bits, _combos, _raises
import test_triton_master as _tm


# ----------------------------------------------------------------------------------------------
# Child side: runs with TRITON_INTERPRET=1 (only ever called from _child_main).
# ----------------------------------------------------------------------------------------------
STEPS = 3
QB = 256  # momentum_dtype.h's kQBlock, checked against the module's and the reference's
SIZES = (0, 1, 3, 97, 255, 256, 257, 1000, 1023, 1025, 3001)
# (shape, layout): None contiguous, "t" transposed 2-D, "cl" channels_last 4-D, "perm" a
# permuted 3-D, "odd": a contiguous view at an address 4 (fp32) / 2 (bf16) / 1 (int8) bytes
# past a 16-byte boundary
SHAPES = ([((n,), None) for n in SIZES]
          + [((13, 9), "t"), ((31, 33), "t"), ((2, 3, 5, 7), "cl"), ((3, 8, 4, 4), "cl"),
             ((5, 6, 11), "perm"), ((0, 4), None)])
MANY_SHAPES = SHAPES + [((((i * 37) % 151) | 1,), None) for i in range(90)]
BIG = 2**16 + 3
KINDS = ("bf16", "int8")


def _op():
    return torch.ops.momentum_cuda.sgd_step_qmom_list_


def _empty(spec, dtype):
    shape, layout = spec
    if layout == "t":
        return torch.empty(shape[::-1], dtype=dtype).t()
    if layout == "cl":
        return torch.empty(shape, dtype=dtype, memory_format=torch.channels_last)
    if layout == "perm":
        a, b, c = shape
        return torch.empty((c, a, b), dtype=dtype).permute(1, 2, 0)
    if layout == "odd":
        n = torch.Size(shape).numel()
        return torch.empty(n + 16, dtype=dtype)[1:n + 1].view(shape)
    return torch.empty(shape, dtype=dtype)


def _like(spec, values):
    return _empty(spec, values.dtype).copy_(values.reshape(spec[0]))


def _numel(spec):
    return torch.Size(spec[0]).numel()


def _rand(spec, gen, scale=1.0):
    return _like(spec, torch.randn(spec[0], generator=gen) * scale)


def _garbage(t, gen):
    """t filled with random bytes (NaNs among them): what a first step must not read."""
    from momentum_cuda.reference import _memory_order
    view = _memory_order(t)
    raw = torch.randint(0, 256, (t.numel() * t.element_size(),), generator=gen,
                        dtype=torch.uint8)
    view.copy_(raw.view(t.dtype).view(view.shape))
    return t


def _state(shapes, kind, gen, garbage=False):
    """[params, bufs, scales]: random fp32 params; bf16 buffers from random values, or int8
    buffers quantized from random values (reference.quantize_momentum, so codes and scales
    are consistent); with garbage the buffers and scales hold random bytes."""
    from momentum_cuda.reference import quantize_momentum
    params = [_rand(spec, gen) for spec in shapes]
    bufs, scales = [], []
    for spec in shapes:
        v = _rand(spec, gen, 0.1)
        if kind == "bf16":
            bufs.append(v.to(torch.bfloat16))
        elif kind == "int8":
            codes, sc = quantize_momentum(v)
            bufs.append(codes)
            scales.append(sc)
    if garbage:
        for t in bufs + scales:
            _garbage(t, gen)
    return [params, bufs, scales]


def _copy(t):
    """A copy of t with t's strides at t's address mod 16 (Tensor.clone allocates afresh: an
    odd view's clone is aligned, and the unaligned launch would not run)."""
    off = t.data_ptr() % 16 // t.element_size()
    out = torch.empty(t.numel() + 16, dtype=t.dtype).as_strided(t.shape, t.stride(), off)
    assert out.data_ptr() % 16 == t.data_ptr() % 16
    return out.copy_(t)


def _clone(state):
    return [[_copy(t) for t in ts] for ts in state]


class _Launches(_tm._Launches):
    """test_triton_master's launch counter, with the momentum_dtype kernel; its launches are
    recorded with their keyword arguments (the constexprs)."""
    NAMES = ("_sgd_qmom_kernel", "_sgd_sr_kernel") + _tm._Launches.NAMES

    class _Proxy(_tm._Launches._Proxy):
        def __getitem__(self, grid):
            launch = self._kernel[grid]

            def run(*args, **kw):
                self._log.append((tuple(grid), kw))
                return launch(*args, **kw)
            return run


def _aligned(params, grads, bufs):
    return all(t.data_ptr() % 16 == 0 for ts in (params, grads, bufs) for t in ts if t.numel())


def _step(tk, ours, grads, h, first, fn=None):
    """One step of the entry point (or fn) on ours = [params, bufs, scales], asserting ONE
    launch of the momentum_dtype kernel with the call's ALIGNED and QUANT (none at all when
    every tensor is empty) and no other kernel."""
    params, bufs, scales = ours
    bufs = bufs if h["momentum"] else []
    n_prog = _tm._programs(params, tk.BLOCK_SIZE)
    with _Launches(tk) as launches:
        (fn or tk.triton_sgd_step_qmom_list_)(params, grads, bufs, scales, **h, first_step=first)
    if fn is None:
        log = launches.log["_sgd_qmom_kernel"]
        assert [g for g, _ in log] == ([(n_prog,)] if n_prog else []), \
            f"launches {log}, expected one of {n_prog} programs"
        if log:
            kw = log[0][1]
            assert kw["ALIGNED"] == _aligned(params, grads, bufs), kw["ALIGNED"]
            assert kw["QUANT"] == int(bool(scales)) and kw["QBLOCK"] == QB
        assert not any(launches.log[n] for n in _Launches.NAMES if n != "_sgd_qmom_kernel")


def _canonical_nan_bf16(t):
    return torch.where(t.isnan(), torch.tensor(0x7FC0, dtype=torch.int16), _bits(t))


def _compare(ours, other, momentum, what, canon_nan=False, nan_sign_ok=False):
    """Mismatches of ours = [params, bufs, scales] with other (same form). canon_nan: other's
    bf16 NaN buffers compared as 0x7FC0 (torch's CPU conversion gives 0xFFFF). nan_sign_ok: a
    NaN parameter may differ in its sign bit only (the C++ op's maximize negates a NaN
    gradient's sign where torch keeps it; NaN signs are outside the contract, the reference
    comparison keeps them)."""
    bad = []
    parts = [("param", 0)] + ([("momentum buffer", 1), ("scale", 2)] if momentum else [])
    for name, k in parts:
        for i, (a, b) in enumerate(zip(ours[k], other[k])):
            x, y = _bits(a), _bits(b)
            if canon_nan and name == "momentum buffer" and b.dtype == torch.bfloat16:
                y = _canonical_nan_bf16(b)
            if nan_sign_ok and name == "param":
                nan = a.isnan() & b.isnan()
                x, y = torch.where(nan, x & 0x7FFFFFFF, x), torch.where(nan, y & 0x7FFFFFFF, y)
            if a.shape != b.shape or a.stride() != b.stride() or not torch.equal(x, y):
                n = int((x != y).sum()) if x.shape == y.shape else -1
                bad.append(f"{what}: {name} {i} (shape {tuple(a.shape)}) differs in {n}")
    return bad


def _run(tk, shapes, h, kind, seed, steps=STEPS, first=None, state=None, grads=None, fn=None,
         cpu=True):
    """`steps` steps of the kernel, the C++ op (cpu) and the reference on copies of one state,
    fresh random gradients each step (unless `grads`: a list per step; their scale grows
    tenfold each step); the first step is first_step=True when momentum is on (unless `first`
    says: then the buffers hold random bytes, which a first step must not read). kind: "bf16"
    or "int8" buffers (ignored without momentum). Returns the mismatches and the kernel's
    final state."""
    from momentum_cuda.reference import sgd_momentum_dtype_reference_step
    gen = torch.Generator().manual_seed(seed)
    momentum = bool(h["momentum"])
    kind = kind if momentum else None
    starts_first = momentum and (first is None or first)
    state = state or _state(shapes, kind, gen, garbage=starts_first)
    ours, theirs, ref = _clone(state), _clone(state), _clone(state)
    ref_bufs, ref_scales = ref[1], ref[2] if kind == "int8" else None
    bad = []
    for s in range(steps):
        f = starts_first and s == 0
        g = grads[s] if grads is not None else [_rand(spec, gen, 10.0 ** s) for spec in shapes]
        g_before = [t.clone() for t in g]
        _step(tk, ours, g, h, f, fn)
        if cpu:
            _op()(theirs[0], g, theirs[1] if momentum else [], theirs[2], h["lr"], h["momentum"],
                  h["dampening"], h["weight_decay"], h["nesterov"], h["maximize"], f)
            bad += _compare(ours, theirs, momentum, f"step {s + 1} vs C++ op {kind} {h}",
                            nan_sign_ok=h["maximize"])
        if f:
            ref_bufs = [None] * len(shapes)
            ref_scales = [None] * len(shapes) if kind == "int8" else None
        ref_bufs, ref_scales = sgd_momentum_dtype_reference_step(
            ref[0], g, ref_bufs if momentum else [None] * len(shapes), ref_scales, **h)
        if momentum:
            bad += _compare(ours, [ref[0], ref_bufs, ref_scales or []], True,
                            f"step {s + 1} vs reference {kind} {h}", canon_nan=True)
        else:
            bad += _compare(ours, ref, False, f"step {s + 1} vs reference {h}")
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(g, g_before)), \
            "a gradient was written"
    return bad, ours


def _agree(tk, runs) -> None:
    bad = [m for kw in runs for m in _run(tk, **kw)[0]]
    assert not bad, bad[:10]


def _kind_combos():
    """(kind, hyper-parameters): every flag combination; with momentum, once per buffer
    kind."""
    out = []
    for h in _combos():
        for kind in (KINDS if h["momentum"] else ("bf16",)):
            out.append((kind, h))
    return out


def check_constants_agree(tk):
    """The block size is the contract's 256 everywhere; the kernel's block holds whole
    int8 blocks."""
    from momentum_cuda.reference import QBLOCK
    assert tk.QBLOCK == QBLOCK == QB
    assert tk.BLOCK_SIZE % QB == 0


def check_inputs_are_what_they_claim(tk):
    """The layouts are dense but not contiguous where claimed, memory order differs from
    logical order there, and the int8 state has codes and scales of several blocks."""
    gen = torch.Generator().manual_seed(1)
    params, bufs, scales = _state(SHAPES, "int8", gen)
    for (shape, layout), p, b, s in zip(SHAPES, params, bufs, scales):
        assert tuple(p.shape) == shape and b.stride() == p.stride() and b.dtype == torch.int8
        assert tk._dense(p) and s.numel() == -(-p.numel() // QB)
        if layout:
            assert not p.is_contiguous()
    assert _aligned(params, params, bufs)
    odd = _empty(((300,), "odd"), torch.float32)
    assert odd.data_ptr() % 16 and tk._dense(odd)
    assert {255, 256, 257, 1023, 1025} <= {p.numel() for p in params}
    assert sum(s.numel() for s in scales) > 20 and all(bool((s > 0).all()) for s in scales)


def check_every_flag_combination(tk):
    """Every flag combination and buffer kind, two steps (the first with first_step where
    momentum is on; the second reads the buffers the kernel wrote), SHAPES in one call: kernel,
    C++ op and reference agree bit for bit (three steps: check_big_tensor, the special
    blocks)."""
    _agree(tk, (dict(shapes=SHAPES, h=h, kind=kind, seed=10 + i, steps=2)
                for i, (kind, h) in enumerate(_kind_combos())))


def check_later_steps_without_first(tk):
    """Momentum on and first_step False from the start: the given buffers (and scales) are
    read."""
    _agree(tk, (dict(shapes=SHAPES, h=h, kind=kind, seed=40 + i, steps=1, first=False)
                for i, (kind, h) in enumerate(_kind_combos()) if h["momentum"]))


def check_unaligned_launch(tk):
    """A parameter (and its gradient and buffer) at an odd address: the whole launch runs
    unaligned (ALIGNED off), same bits; one flag set per kind and without momentum."""
    shapes = [((300,), "odd"), ((1500,), "odd"), ((1025,), None), ((6, 7), "t")]
    hs = [(kind, h) for kind, h in _kind_combos() if h["nesterov"] and h["weight_decay"]]
    hs.append(("bf16", _combos()[0]))
    _agree(tk, (dict(shapes=shapes, h=h, kind=kind, seed=50 + i) for i, (kind, h) in
                enumerate(hs)))


def check_big_tensor(tk):
    """2^16 + 3 elements (257 int8 blocks, the last of 3) with small tensors, three steps,
    every flag on, both kinds."""
    h = _combos()[-1]
    _agree(tk, (dict(shapes=[((BIG,), None), ((257,), None), ((4, 5, 6, 7), "cl")], h=h,
                     kind=kind, seed=55 + i, steps=3) for i, kind in enumerate(KINDS)))


def check_many_tensors_one_launch(tk):
    """>= 100 tensors (odd sizes, empty ones, non-contiguous layouts) in ONE launch per step;
    both kinds, a flag set each, two steps."""
    assert len(MANY_SHAPES) >= 100
    _agree(tk, (dict(shapes=MANY_SHAPES, h=h, kind=kind, seed=60 + i, steps=2)
                for i, (kind, h) in enumerate(zip(KINDS, (_combos()[-1], _combos()[7])))))


def check_empty_calls_no_launch(tk):
    """No tensor, or only empty ones: validated, nothing launched."""
    for kind in KINDS:
        _run(tk, [((0,), None), ((0, 4), None)], _combos()[-1], kind, seed=70)
    _step(tk, [[], [], []], [], _combos()[-1], False)


def _special_grads(n_blocks, gen):
    """A gradient of n_blocks * QB + 7 elements whose int8 blocks are special: all zero; a
    NaN; +inf; -inf; zeros of both signs with one 1; subnormals k * 2^-149 whose scale rounds
    to a subnormal (absmax 100 ulps) and to zero (absmax 63 ulps); exact ties (absmax 127,
    scale 1: values k + 0.5); ties at scale 2^-3; fp32's largest magnitudes; bf16 ties (low
    half 0x8000) and values that round to bf16's inf; the partial last block with a NaN at its
    last element. Other blocks random."""
    n = n_blocks * QB + 7
    g = torch.randn(n, generator=gen)
    blk = [g[i * QB:(i + 1) * QB] for i in range(n_blocks)]
    tiny = torch.tensor(2.0 ** -149)
    blk[0].zero_()
    blk[1][17] = float("nan")
    blk[2][255] = float("inf")
    blk[3][0] = -float("inf")
    blk[4].zero_()
    blk[4][::2] = -0.0
    blk[4][100] = 1.0
    blk[5].copy_(torch.randint(-100, 101, (QB,), generator=gen).float() * tiny)
    blk[5][3] = 100 * tiny
    blk[6].copy_(torch.randint(-63, 64, (QB,), generator=gen).float() * tiny)
    blk[6][9] = -63 * tiny
    ties = torch.arange(QB).float() - 128.0 + 0.5  # -127.5 .. 127.5
    blk[7].copy_(ties.clamp(-126.5, 126.5))
    blk[7][0] = 127.0
    blk[8].copy_(ties.clamp(-126.5, 126.5) * 0.125)
    blk[8][5] = -127.0 * 0.125
    blk[9].copy_(torch.rand(QB, generator=gen) * 3.4e38 - 1.7e38)
    blk[9][7] = 3.4028234663852886e38
    blk[9][8] = -3.4028234663852886e38
    u = torch.randint(0x3F80, 0x4780, (QB,), generator=gen, dtype=torch.int32)
    blk[10].copy_(((u << 16) | 0x8000).view(torch.float32))  # bf16 ties
    blk[10][::7] = torch.tensor(0x7F7FFFFF, dtype=torch.int32).view(torch.float32)
    blk[10][3::7] = torch.tensor(0x7F7F8000, dtype=torch.int32).view(torch.float32)
    g[-1] = float("nan")
    return g


def check_special_blocks(tk):
    """Blocks with NaN, inf, all zeros, signed zeros, subnormals (scale subnormal or 0),
    exact ties, fp32's largest values, bf16 ties and overflows, in the gradient that a first
    step makes the buffer (then random steps read those buffers back: a non-finite block
    reads as NaN), with and without maximize and weight decay: both kinds, both references."""
    gen = torch.Generator().manual_seed(80)
    n_blocks = 12
    spec = ((n_blocks * QB + 7,), None)
    shapes = [spec, ((300,), None), spec]
    runs = []
    for i, (kind, h) in enumerate((k, h) for k, h in _kind_combos() if h["momentum"]
                                  and not h["dampening"]):
        g0 = [_special_grads(n_blocks, gen), torch.randn(300, generator=gen),
              _special_grads(n_blocks, gen).flip(0)]
        later = [[torch.randn(_numel(sp), generator=gen) for sp in shapes] for _ in range(2)]
        runs.append(dict(shapes=shapes, h=dict(h, lr=1.0), kind=kind, seed=80 + i, steps=3,
                         grads=[g0] + later))
    _agree(tk, runs)


def check_ties_round_to_even(tk):
    """A first step whose buffer is exactly k + 0.5 in a block of absmax 127 (scale 1): the
    codes are rounded half to even (the references agree, and directly: 0.5 -> 0, 1.5 -> 2,
    2.5 -> 2, -0.5 -> 0, -1.5 -> -2, 126.5 -> 126)."""
    g = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -126.5] + [0.0] * 248)
    h = dict(lr=0.0, momentum=0.5, dampening=0.0, weight_decay=0.0, nesterov=False,
             maximize=False)
    p = [torch.zeros(QB)]
    b = [torch.empty(QB, dtype=torch.int8)]
    s = [torch.empty(1)]
    tk.triton_sgd_step_qmom_list_(p, [g], b, s, **h, first_step=True)
    assert s[0].item() == 1.0
    assert b[0][:8].tolist() == [127, 0, 2, 2, 0, -2, 126, -126], b[0][:8].tolist()
    bad, _ = _run(tk, [((QB,), None)], h, "int8", seed=0, steps=1, grads=[[g]])
    assert not bad, bad


def check_writes_stay_inside(tk):
    """Parameters, buffers and scales as 16-byte aligned views of one storage each, with
    guard values between them: a step writes nothing outside the tensors (full blocks run
    unmasked on the aligned path), both kinds."""
    sizes = [1, 255, 257, 1023, 1025, 2049, 3000]
    gap = 2048
    h = _combos()[-1]
    gen = torch.Generator().manual_seed(85)
    for kind in KINDS:
        bdt = torch.int8 if kind == "int8" else torch.bfloat16
        total = sum(-(-n // 16) * 16 for n in sizes) + gap * (len(sizes) + 1)
        stores = {"p": torch.full((total,), -7.0), "g": torch.full((total,), -7.0),
                  "b": torch.full((total,), 99, dtype=torch.int8).to(bdt),
                  "s": torch.full((total,), -7.0)}
        before = {k: v.clone() for k, v in stores.items()}
        views = {k: [] for k in stores}
        off = gap
        inside = {k: torch.zeros(total, dtype=torch.bool) for k in stores}
        for n in sizes:
            nb = -(-n // QB)
            for k in stores:
                m = nb if k == "s" else n
                if k == "s" and kind != "int8":
                    continue
                views[k].append(stores[k][off:off + m])
                inside[k][off:off + m] = True
            off += -(-n // 16) * 16 + gap  # the next views 16-byte aligned too
        for v in views["p"] + views["g"]:
            v.copy_(torch.randn(v.shape, generator=gen))
        assert _aligned(views["p"], views["g"], views["b"])
        for first in (True, False):
            tk.triton_sgd_step_qmom_list_(views["p"], views["g"], views["b"], views["s"], **h,
                                          first_step=first)
        for k, t in stores.items():
            assert torch.equal(_bits(t)[~inside[k]], _bits(before[k])[~inside[k]]), \
                f"{kind}: a write outside the {k} tensors"
        assert not torch.equal(_bits(stores["p"]), _bits(before["p"])), "nothing was stepped"


def check_table_cached(tk):
    """The pointer table is built once for a set of tensors and reused at later steps (no
    host work or copy); bf16 tables have the list kernel's rows of 4, int8 ones rows of 5
    (the scales' address before numel)."""
    gen = torch.Generator().manual_seed(90)
    h = _combos()[-1]
    for kind, width in (("bf16", 4), ("int8", 5)):
        params, bufs, scales = _state(SHAPES, kind, gen)
        grads = [_rand(spec, gen) for spec in SHAPES]
        tk._TABLES.clear()
        seen = []
        kernel = tk._sgd_qmom_kernel

        class Spy:
            def __getitem__(self, grid):
                def launch(*args, **kw):
                    seen.append(args[:2])
                    return kernel[grid](*args, **kw)
                return launch
        tk._sgd_qmom_kernel = Spy()
        try:
            for _ in range(2):
                tk.triton_sgd_step_qmom_list_(params, grads, bufs, scales, **h, first_step=False)
        finally:
            tk._sgd_qmom_kernel = kernel
        assert len(tk._TABLES) == 1
        assert [t.data_ptr() for t in seen[0]] == [t.data_ptr() for t in seen[1]], \
            "the table was rebuilt"
        rows = seen[0][0].reshape(-1, width)
        keep = [i for i, p in enumerate(params) if p.numel()]
        assert rows[:, -1].tolist() == [params[i].numel() for i in keep]
        assert rows[:, 2].tolist() == [bufs[i].data_ptr() for i in keep]
        if kind == "int8":
            assert rows[:, 3].tolist() == [scales[i].data_ptr() for i in keep]


def check_split_past_grid_limit(tk):
    """Past _MAX_PROGRAMS (lowered to 3 here) the launch is split: same bits."""
    orig = tk._MAX_PROGRAMS
    tk._MAX_PROGRAMS = 3
    tk._TABLES.clear()
    try:
        def entry(params, *args, **kw):
            with _Launches(tk) as launches:
                tk.triton_sgd_step_qmom_list_(params, *args, **kw)
            n_prog = _tm._programs(params, tk.BLOCK_SIZE)
            assert [g for g, _ in launches.log["_sgd_qmom_kernel"]] == (
                [(3,)] * (n_prog // 3) + ([(n_prog % 3,)] if n_prog % 3 else []))
        _agree(tk, (dict(shapes=SHAPES, h=_combos()[-1], kind=kind, seed=100, fn=entry)
                    for kind in KINDS))
    finally:
        tk._MAX_PROGRAMS = orig
        tk._TABLES.clear()


# ---- planted bugs ------------------------------------------------------------------------------
_tk = None  # momentum_cuda.triton_kernels, imported in the child
_PLANT_DIR = None


def _planted(tk, name, old, new, count=1):
    """A copy of the jit function tk.<name> with `old` replaced by `new` in its source (count
    times), compiled from a file (Triton reads a kernel's source) whose globals are tk's."""
    global _PLANT_DIR
    fn = getattr(tk, name)
    src = textwrap.dedent(inspect.getsource(fn.fn))
    assert src.count(old) == count, f"{name}: {old!r} found {src.count(old)} times"
    src = src.replace(old, new)
    if _PLANT_DIR is None:
        _PLANT_DIR = tempfile.mkdtemp(prefix="qmom_plants_")
        sys.path.insert(0, _PLANT_DIR)
    mod = f"qmom_plant_{len(os.listdir(_PLANT_DIR))}"
    with open(os.path.join(_PLANT_DIR, mod + ".py"), "w") as f:
        f.write("import triton\nimport triton.language as tl\n"
                "from momentum_cuda import triton_kernels as _tkm\n"
                "globals().update({k: v for k, v in vars(_tkm).items() "
                "if k.startswith('_') and not k.startswith('__')})\n\n" + src)
    return getattr(__import__(mod), name)


PLANTS = [
    # (function, old text, new text, occurrences, what)
    ("_qmom_block", "_bf16_rne(buf)", "(buf.to(tl.uint32, bitcast=True) >> 16)", 1,
     "bf16 buffer truncated"),
    ("_qmom_block", "tl.max(bits, axis=1)",
     "tl.max(tl.where(tl.arange(0, QBLOCK)[None, :] < QBLOCK // 2, bits, 0), axis=1)", 1,
     "absmax over half the block"),
    ("_qmom_block", "tl.max(bits, axis=1)",
     "tl.max(tl.where(tl.arange(0, QBLOCK)[None, :] == 0, bits, 0), axis=1)", 1,
     "scale from the first element"),
    ("_q8_code", "x = (x + 12582912.0) - 12582912.0", "x = tl.where(x < 0, x - 0.5, x + 0.5)", 1,
     "ties rounded away from zero"),
    ("_q8_scale", "tl.math.div_rn(a, 127.0)", "a * (1.0 / 127.0)", 1,
     "scale as a multiply by 1/127"),
    ("_q8_code", "tl.math.div_rn(v, tl.where(ok, scale, 1.0))",
     "v * (1.0 / tl.where(ok, scale, 1.0))", 1, "code as a multiply by 1/scale"),
    ("_q8_scale", "tl.where(absmax_bits < 0x7F800000, tl.math.div_rn(a, 127.0), nan)",
     "tl.math.div_rn(a, 127.0)", 1, "no NaN scale for an inf block"),
    ("_qmom_block", "s_ptr + start // QBLOCK + rows", "s_ptr + start // BLOCK + rows", 2,
     "scales indexed per program"),
    ("_sgd_qmom_kernel", "if start + BLOCK <= n:", "if start < n:", 1,
     "every block unmasked"),
]


def check_planted_bugs_fail(tk):
    """Each planted bug makes a check fail (the real kernel passes the same checks first):
    random steps over SHAPES, the special blocks, and the guard values around views."""
    gen = torch.Generator().manual_seed(110)
    h = _combos()[-1]
    n_blocks = 12
    spec = ((n_blocks * QB + 7,), None)
    special = [[_special_grads(n_blocks, gen), torch.randn(300, generator=gen)]]
    special.append([torch.randn(_numel(spec), generator=gen), torch.randn(300, generator=gen)])
    h_special = dict(lr=1.0, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                     maximize=False)

    def caught(kind, guarded_only=False):
        bad = []
        if not guarded_only:
            bad += _run(tk, SHAPES, h, kind, seed=111, steps=2, cpu=False)[0]
            bad += _run(tk, [spec, ((300,), None)], h_special, kind, seed=112, steps=2,
                        grads=special, cpu=False)[0]
        try:
            check_writes_stay_inside(tk)
        except AssertionError as e:
            bad.append(str(e))
        return bad

    for kind in KINDS:
        assert not caught(kind), f"the real kernel must pass here ({kind})"
    for name, old, new, count, what in PLANTS:
        bug = _planted(tk, name, old, new, count)
        with mock.patch.object(tk, name, bug):
            kinds = ("bf16",) if "bf16" in what else ("int8",)
            if name == "_sgd_qmom_kernel":  # writes past tensors: only where guards are
                assert all(caught(k, True) for k in KINDS), f"planted bug ({what}) went unnoticed"
                continue
            assert all(caught(k) for k in kinds), f"planted bug ({what}) went unnoticed"


# ---- validation ------------------------------------------------------------------------------
def check_validation_errors(tk):
    """Bad dtypes, sizes, strides, scales, list lengths, overlaps and scalars raise naming the
    argument, before anything is launched or written; the C++ op refuses each of them too."""
    gen = torch.Generator().manual_seed(120)
    shapes = [((20,), None), ((4, 300), None)]
    P, B, S = _state(shapes, "int8", gen)
    _, B16, _ = _state(shapes, "bf16", gen)
    G = [_rand(spec, gen) for spec in shapes]
    before = [[t.clone() for t in ts] for ts in (P, B, S, B16, G)]
    h = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False,
             maximize=False, first_step=False)

    def swap(lst, i, t):
        out = list(lst)
        out[i] = t
        return out

    cases = [
        # (params, grads, bufs, scales, hyper changes, exception, text)
        (P, G, [], S, dict(momentum=0.0), ValueError,
         "scales has 2 tensors but momentum=0.0 has no momentum buffers to scale"),
        (P, G, B, S[:1], {}, ValueError, "scales has 1 tensors but params has 2"),
        (P, G, B, S + S[:1], {}, ValueError, "scales has 3 tensors but params has 2"),
        (swap(P, 0, P[0].double()), swap(G, 0, G[0].double()), B, S, {}, ValueError,
         "params[0] must be float32 (momentum_dtype keeps float32 parameters)"),
        ([p.bfloat16() for p in P], [g.bfloat16() for g in G], B16, [], {}, ValueError,
         "params[0] must be float32"),
        (P, G, B16, S, {}, ValueError, "momentum_buffers[0] must be torch.int8"),
        (P, G, B, [], {}, ValueError, "momentum_buffers[0] must be torch.bfloat16"),
        (P, G, swap(B16, 1, B16[1].float()), [], {}, ValueError,
         "momentum_buffers[1] must be torch.bfloat16"),
        (P, G, swap(B, 1, B[1].reshape(1200)), S, {}, ValueError,
         "momentum_buffers[1] has shape"),
        (P, G, swap(B, 1, B[1].t().contiguous().t()), S, {}, ValueError,
         "momentum_buffers[1] has strides"),
        (P, G, swap(B, 1, None), S, {}, ValueError, "momentum_buffers[1] is undefined"),
        (P, G, B[:1], S, {}, ValueError, "momentum_buffers has 1 tensors"),
        (P, G, B, swap(S, 1, S[1][:4]), {}, ValueError,
         "scales[1] must be a contiguous 1-D float32 tensor of 5 block scales (one per 256 "
         "elements of params[1])"),
        (P, G, B, swap(S, 1, S[1].double()), {}, ValueError, "scales[1] must be a contiguous"),
        (P, G, B, swap(S, 1, S[1].reshape(5, 1)), {}, ValueError,
         "scales[1] must be a contiguous"),
        (P, G, B, swap(S, 1, torch.zeros(10)[::2]), {}, ValueError,
         "scales[1] must be a contiguous"),
        (P, G, B, swap(S, 0, None), {}, ValueError, "scales[0] is undefined"),
        (P, G, B, swap(S, 1, P[1].view(-1)[:5]), {}, ValueError, "overlaps"),
        (P, G, B, swap(S, 1, S[0]), {}, ValueError, "scales[1] must be a contiguous"),
        (P, swap(G, 1, G[1].double()), B, S, {}, ValueError, "grads[1] has dtype"),
        (P, swap(G, 1, G[1][:2]), B, S, {}, ValueError, "grads[1] has shape"),
        (P, G[:1], B, S, {}, ValueError, "grads has 1 tensors"),
        (P, swap(G, 0, "g"), B, S, {}, TypeError, "grads[0] must be a tensor"),
        (swap(P, 0, torch.ones(40)[::2]), G, B, S, {}, ValueError, "params[0] must be dense"),
        (P, G, swap(B16, 0, P[0].view(torch.bfloat16)[:20]), [], {}, ValueError, "overlaps"),
        (P, G, B, S, dict(lr=float("nan")), ValueError, "lr must be a finite number"),
        (P, G, B, S, dict(momentum="0.9"), TypeError, "momentum must be a Python float"),
        (P, G, B, S, dict(nesterov=1), TypeError, "nesterov must be a bool"),
        (P, G, [], [], dict(momentum=0.0, nesterov=True), ValueError,
         "nesterov=True needs momentum"),
        (P, G, [], [], dict(momentum=0.0, first_step=True), ValueError, "first_step=True"),
    ]
    op = _op()
    for p, g, b, s, hc, exc, text in cases:
        kw = dict(h, **hc)
        with _Launches(tk) as launches:
            _raises(lambda: tk.triton_sgd_step_qmom_list_(p, g, b, s, **kw), exc, text)
        assert not any(launches.log.values()), f"{text}: launched"
        if exc is ValueError:  # the C++ op refuses the same call
            try:
                op(p, g, b, s, kw["lr"], kw["momentum"], kw["dampening"], kw["weight_decay"],
                   kw["nesterov"], kw["maximize"], kw["first_step"])
            except (RuntimeError, ValueError, TypeError):
                pass
            else:
                raise AssertionError(f"the C++ op accepted the call refused with {text!r}")
    after = [P, B, S, B16, G]
    assert all(torch.equal(_bits(x), _bits(y)) for xs, ys in zip(before, after)
               for x, y in zip(xs, ys)), "a failed call wrote something"


def check_qmom_op_opcheck(tk):
    """torch.ops.momentum_cuda.triton_sgd_step_qmom_list_ (the custom op over the entry point)
    passes torch.library.opcheck and gives the entry point's bits, both kinds and without
    momentum; qmom_op routes to it."""
    from momentum_cuda._ops import qmom_op
    ops = torch.ops.momentum_cuda
    assert qmom_op("triton") is ops.triton_sgd_step_qmom_list_.default
    gen = torch.Generator().manual_seed(130)
    shapes = [((n,), None) for n in (0, 1, 9, 257, 1030)] + [((6, 5), "t")]
    for kind, h in (("int8", dict(lr=0.0123, momentum=0.9, dampening=0.1, weight_decay=0.01,
                                  nesterov=False, maximize=True, first_step=False)),
                    ("bf16", dict(lr=0.0123, momentum=0.9, dampening=0.0, weight_decay=0.0,
                                  nesterov=True, maximize=False, first_step=False)),
                    ("bf16", dict(lr=0.0123, momentum=0.0, dampening=0.0, weight_decay=0.0,
                                  nesterov=False, maximize=False, first_step=False))):
        state = _state(shapes, kind if h["momentum"] else None, gen)
        grads = [_rand(spec, gen) for spec in shapes]
        result = torch.library.opcheck(ops.triton_sgd_step_qmom_list_.default,
                                       (*state[:1], grads, *state[1:]), h)
        assert set(result.values()) == {"SUCCESS"}, result
        one, two = _clone(state), _clone(state)
        ops.triton_sgd_step_qmom_list_(one[0], grads, one[1], one[2], **h)
        tk.triton_sgd_step_qmom_list_(two[0], grads, two[1], two[2], **h)
        assert not _compare(one, two, True, "op vs entry point")
        assert not torch.equal(_bits(one[0][-1]), _bits(state[0][-1])), "nothing was stepped"


CHECKS = [name for name in list(globals()) if name.startswith("check_")]


def _child_main() -> None:
    _tm.run_checks(globals())


# ----------------------------------------------------------------------------------------------
# Parent side: pytest.
# ----------------------------------------------------------------------------------------------
pytestmark = _tm.pytestmark  # triton and numpy are needed for the interpreter


@pytest.fixture(scope="module")
def qmom_results():
    return conftest.interpreter_child("test_triton_qmom", timeout=600)


@pytest.mark.parametrize("name", CHECKS)
def test_interpreter(qmom_results, name):
    res = qmom_results[name]
    assert res["error"] is None, res["error"]


def test_cpu_tensors_refused_without_interpreter():
    """In this (non-interpreted) process, CPU tensors are refused before any launch by the
    entry point and by the custom op over it, naming the parameter; nothing is written."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process interprets")
    from momentum_cuda import triton_kernels as tk
    p = torch.ones(4)
    h = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
             maximize=False, first_step=False)
    for step in (tk.triton_sgd_step_qmom_list_,
                 torch.ops.momentum_cuda.triton_sgd_step_qmom_list_):
        with pytest.raises(ValueError, match=r"params\[0\] must be on a CUDA device"):
            step([p], [p.clone()], [], [], **h)
    assert bool((p == 1).all())


def test_qmom_op_routes_backends():
    """qmom_op: the Triton custom op for "triton", the C++ op otherwise."""
    from momentum_cuda._ops import qmom_op
    ops = torch.ops.momentum_cuda
    assert qmom_op("triton") is ops.triton_sgd_step_qmom_list_.default
    assert qmom_op("cpu") is ops.sgd_step_qmom_list_.default


if __name__ == "__main__":
    _child_main()
