"""The Triton backend under Triton's CPU interpreter (TRITON_INTERPRET=1), without a GPU.

@triton.jit reads TRITON_INTERPRET when a kernel is DECORATED, so the interpreter must be on before
momentum_cuda.triton_kernels is imported, and other test files of the same pytest process may
import triton for the GPU. The checks therefore run in ONE child Python process with the variable
set (this file, run as a script); each pytest test below asserts one check's outcome.

References:
- fp32 / fp64: torch.optim.SGD(foreach=False) on CPU, bit for bit (torch's CPU add with alpha is an
  fma with the alpha rounded once, in the order of sgd_math.h).
- bf16 / fp16: the CUDA contract written independently in plain torch: every op in fp32 with an
  fp32 alpha (not narrowed), rounded to the storage dtype with .to() (round to nearest even on
  CPU). torch's own CPU bf16 path narrows alphas and rounds a*y first in its scalar tails, so in
  general it is NOT the reference.
- bf16, power-of-two alphas (lr, weight_decay, 1 - dampening, nesterov momentum): there both
  CPU differences vanish and the flat and list kernels are compared with torch.optim.SGD
  (foreach=False) on CPU bf16 itself; making any one alpha non-power-of-two makes torch differ
  (checked), which shows that comparison is real.
Planted bugs (1 - d computed in fp32; no explicit bf16 rounding) must make the comparison fail.

The list path (one launch of the pointer-table kernel per step) is checked on >= 100 tensors of
odd sizes (0, 1, 3, 97, several blocks) including transposed 2-D and permuted 3-D layouts, every
flag combination, three steps; every list call asserts exactly ONE launch of the list kernel
(kernel objects replaced by counting proxies) and none of the flat kernel. Planted table bugs
(block start off by one, the neighbour tensor's block, numel - 1) must make it fail.
"""
from __future__ import annotations

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
SIZES = (0, 1, 3, 97, 1025)
STEPS = 3


def _combos():
    """Small hyper-parameter grid: every flag on and off (nesterov needs dampening 0)."""
    out = []
    for momentum in (0.0, 0.9):
        for dampening in ((0.0,) if momentum == 0 else (0.0, 0.1)):
            for wd in (0.0, 0.01):
                for nesterov in ((False, True) if momentum and dampening == 0 else (False,)):
                    for maximize in (False, True):
                        out.append(dict(lr=0.1, momentum=momentum, dampening=dampening,
                                        weight_decay=wd, nesterov=nesterov, maximize=maximize))
    return out


def _make(dtype, seed, sizes=SIZES):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(n, generator=g).to(dtype) for n in sizes]
    grads = [[torch.randn(n, generator=g).to(dtype) for n in sizes] for _ in range(STEPS)]
    return ps, grads


def _torch_sgd(ps, grads, h):
    """torch.optim.SGD(foreach=False): params after STEPS steps."""
    ps = [p.clone().requires_grad_(True) for p in ps]
    opt = torch.optim.SGD(ps, foreach=False, **h)
    for step in range(STEPS):
        for p, g in zip(ps, grads[step]):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in ps]


def _contract_step(p, g, buf, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
                   first_step):
    """The CUDA contract in plain torch: fp32 ops (fma add with fp32 alpha), RNE to storage."""
    dt = p.dtype
    r = (lambda t: t) if dt in (torch.float32, torch.float64) else (lambda t: t.to(dt).float())
    op = torch.float64 if dt == torch.float64 else torch.float32
    P, G = p.to(op), g.to(op)
    B = None if buf is None else buf.to(op)
    if maximize:
        G = -G
    if weight_decay != 0:
        G = r(G.add(P, alpha=weight_decay))
    if momentum != 0:
        if first_step:
            B = G.clone()
        else:
            B = r(r(B.mul(momentum)).add(G, alpha=1 - dampening))
        G = r(G.add(B, alpha=momentum)) if nesterov else B
    P = r(P.add(G, alpha=-lr))
    p.copy_(P.to(dt))
    if momentum != 0:
        buf.copy_(B.to(dt))


def _run_flat(tk, ps, grads, h, offsets, fn=None, contract=False):
    """Kernel's flat path (or `contract`'s reference) over a flat buffer with the given offsets
    (odd gaps: unaligned spans); returns params after STEPS steps and the untouched padding."""
    dtype = ps[0].dtype
    total = offsets[-1] + ps[-1].numel() + 5
    fp = torch.full((total,), 7.0, dtype=dtype)  # padding 7: must stay 7
    fg = torch.full((total,), 3.0, dtype=dtype)
    fb = torch.full((total,), 5.0, dtype=dtype) if h["momentum"] else None
    segs = torch.tensor([[o, p.numel()] for o, p in zip(offsets, ps)],
                        dtype=torch.int64).reshape(-1, 2)
    for o, p in zip(offsets, ps):
        fp[o:o + p.numel()] = p
    for step in range(STEPS):
        for o, g in zip(offsets, grads[step]):
            fg[o:o + g.numel()] = g
        kw = dict(h, first_step=bool(h["momentum"]) and step == 0)
        if contract:
            for o, p in zip(offsets, ps):
                sl = slice(o, o + p.numel())
                _contract_step(fp[sl], fg[sl], None if fb is None else fb[sl], **kw)
        else:
            (fn or tk.triton_sgd_step_flat_)(fp, fg, fb, segs, **kw)
    mask = torch.ones(total, dtype=torch.bool)
    for o, p in zip(offsets, ps):
        mask[o:o + p.numel()] = False
    pad_ok = bool((fp[mask] == 7).all()) and (fb is None or bool((fb[mask] == 5).all()))
    return [fp[o:o + p.numel()].clone() for o, p in zip(offsets, ps)], pad_ok


class _Launches:
    """Counts launches of the Triton kernels: replaces the module's kernel objects (which the
    entry points look up at call time) by proxies recording each grid."""

    class _Proxy:
        def __init__(self, kernel, log):
            self._kernel, self._log = kernel, log

        def __getitem__(self, grid):
            self._log.append(tuple(grid))
            return self._kernel[grid]

        def __getattr__(self, name):
            return getattr(self._kernel, name)

    def __init__(self, tk):
        self.tk, self.list, self.flat = tk, [], []

    def __enter__(self):
        self._orig = self.tk._sgd_list_kernel, self.tk._sgd_flat_kernel
        self.tk._sgd_list_kernel = self._Proxy(self._orig[0], self.list)
        self.tk._sgd_flat_kernel = self._Proxy(self._orig[1], self.flat)
        return self

    def __exit__(self, *exc):
        self.tk._sgd_list_kernel, self.tk._sgd_flat_kernel = self._orig


def _programs(ps, block):
    return sum(-(-p.numel() // block) for p in ps)


def _run_list(tk, ps, grads, h, bufs_none=False):
    """The list entry point for STEPS steps on clones of ps (their layouts kept: clone and
    empty_like preserve the strides of dense tensors). Every step must be exactly ONE launch
    of the list kernel over all blocks, none of the flat kernel (none at all if all empty)."""
    ps = [p.clone() for p in ps]
    bufs = [torch.empty_like(p) for p in ps] if h["momentum"] else (None if bufs_none else [])
    n_prog = _programs(ps, tk.BLOCK_SIZE)
    for step in range(STEPS):
        kw = dict(h, first_step=bool(h["momentum"]) and step == 0)
        gs = [torch.empty_like(p).copy_(g) for p, g in zip(ps, grads[step])]
        with _Launches(tk) as launches:
            tk.triton_sgd_step_list_(ps, gs, bufs, **kw)
        assert launches.flat == [], f"the list path launched the flat kernel: {launches.flat}"
        assert launches.list == ([(n_prog,)] if n_prog else []), \
            f"list launches {launches.list}, expected one of {n_prog} programs"
    return ps


def _run_list_contract(ps, grads, h):
    """The CUDA contract reference, tensor by tensor, on clones of ps (layouts kept)."""
    ps = [p.clone() for p in ps]
    bufs = [torch.zeros_like(p) for p in ps] if h["momentum"] else [None] * len(ps)
    for step in range(STEPS):
        kw = dict(h, first_step=bool(h["momentum"]) and step == 0)
        for p, g, b in zip(ps, grads[step], bufs):
            _contract_step(p, g, b, **kw)
    return ps


# The list tests' tensors: 1-D odd sizes (0, 1, 3, 97, several blocks), transposed 2-D and
# permuted 3-D (dense, NOT contiguous: the kernel walks them in memory order), an empty 2-D.
# (shape, perm): allocated with shape [shape[i] for i in perm], then permuted back to shape.
# Not here: empty tensors with a 0 before the last dimension (torch.ones(2, 0, 5), or
# torch.empty(4, 0).t()): momentum_cuda._util.is_dense rejects them although ATen counts them
# dense (is_contiguous() is True for every empty tensor), so the entry points raise "must be
# dense" for them.
LIST_SHAPES = ([((n,), None) for n in (0, 1, 3, 97, 1025, 2049, 0, 5, 1, 7, 3)]
               + [((((i * 37) % 151) | 1,), None) for i in range(80)]
               + [(s, (1, 0)) for s in ((3, 5), (7, 11), (13, 1), (1, 13), (31, 33), (9, 9),
                                        (2, 97), (97, 3), (33, 35), (5, 3), (11, 7))]
               + [((0, 4), None)]
               + [(s, (2, 0, 1)) for s in ((2, 3, 5), (3, 1, 7), (5, 4, 3), (1, 1, 1),
                                           (7, 5, 3))])
# bf16/fp16 list checks (slower in the interpreter): the first 1-D sizes and every 2-D/3-D one.
HALF_LIST_SHAPES = LIST_SHAPES[:11] + [s for s in LIST_SHAPES if len(s[0]) > 1]


def _make_list(dtype, seed, shapes=LIST_SHAPES):
    g = torch.Generator().manual_seed(seed)

    def one(shape, perm):
        if perm is None:
            t = torch.empty(shape, dtype=dtype)
        else:
            inv = sorted(range(len(perm)), key=perm.__getitem__)
            t = torch.empty([shape[i] for i in perm], dtype=dtype).permute(inv)
        assert tuple(t.shape) == tuple(shape)
        return t.copy_(torch.randn(shape, generator=g).to(dtype))
    ps = [one(*s) for s in shapes]
    grads = [[one(*s) for s in shapes] for _ in range(STEPS)]
    return ps, grads


def _same(a_list, b_list):
    return all(a.dtype == b.dtype and torch.equal(a.view(torch.int8 if a.element_size() == 1 else
                                                         {2: torch.int16, 4: torch.int32,
                                                          8: torch.int64}[a.element_size()]),
                                                  b.view({2: torch.int16, 4: torch.int32, 8:
                                                          torch.int64}[b.element_size()]))
               for a, b in zip(a_list, b_list))


OFFSETS = [1, 4, 9, 107, 1133]  # after sizes 0,1,3,97: odd gaps, no 16-byte alignment


def check_fp32_flat_vs_torch_sgd(tk):
    for i, h in enumerate(_combos()):
        ps, grads = _make(torch.float32, i)
        got, pad_ok = _run_flat(tk, ps, grads, h, OFFSETS)
        assert pad_ok, f"padding changed for {h}"
        assert _same(got, _torch_sgd(ps, grads, h)), f"fp32 flat differs from torch SGD for {h}"


def check_fp64_flat_vs_torch_sgd(tk):
    for i, h in enumerate(_combos()[::3]):
        ps, grads = _make(torch.float64, 100 + i)
        got, pad_ok = _run_flat(tk, ps, grads, h, OFFSETS)
        assert pad_ok
        assert _same(got, _torch_sgd(ps, grads, h)), f"fp64 flat differs from torch SGD for {h}"


def check_list_shapes_are_what_they_claim(tk):
    ps, _ = _make_list(torch.float32, 0)
    assert len(ps) >= 100
    sizes = {p.numel() for p in ps}
    assert {0, 1, 3, 97}.issubset(sizes) and max(sizes) > 2 * tk.BLOCK_SIZE
    nc = [p for p in ps if not p.is_contiguous()]
    assert len(nc) >= 10, len(nc)
    assert all(tk._dense(p) for p in ps)


def check_fp32_list_vs_torch_sgd(tk):
    ps, grads = _make_list(torch.float32, 200)
    for h in _combos():
        assert _same(_run_list(tk, ps, grads, h), _torch_sgd(ps, grads, h)), \
            f"fp32 list differs from torch SGD for {h}"


def check_fp64_list_vs_torch_sgd(tk):
    ps, grads = _make_list(torch.float64, 210)
    for h in _combos()[::3]:
        assert _same(_run_list(tk, ps, grads, h), _torch_sgd(ps, grads, h)), \
            f"fp64 list differs from torch SGD for {h}"


def check_list_momentum0_buffers_none(tk):
    ps, grads = _make_list(torch.float32, 220)
    for h in [h for h in _combos() if h["momentum"] == 0 and h["weight_decay"]]:
        assert _same(_run_list(tk, ps, grads, h, bufs_none=True), _torch_sgd(ps, grads, h))


def check_list_empty_tensors_no_launch(tk):
    ps = [torch.ones(0), torch.ones(0, 3), torch.ones(0, 2, 5)]
    grads = [[torch.ones_like(p) for p in ps]] * STEPS
    h = _combos()[-1]
    _run_list(tk, ps, grads, h)  # asserts: no launch at all
    with _Launches(tk) as launches:
        tk.triton_sgd_step_list_([], [], [], **dict(h, first_step=False))
    assert launches.list == [] and launches.flat == []


def check_list_table_layout(tk):
    """_list_table: rows [p, g, buf, numel] per tensor, then the block map [tensor, start] per
    program, views of ONE int64 tensor (a single host-to-device copy on a GPU)."""
    B = tk.BLOCK_SIZE
    rows, blocks, n = tk._list_table([(10, 20, 30), (40, 50, 0), (70, 80, 90)],
                                     [3, B + 1, 2 * B], torch.device("cpu"))
    assert n == 5
    assert rows.tolist() == [10, 20, 30, 3, 40, 50, 0, B + 1, 70, 80, 90, 2 * B]
    assert blocks.tolist() == [0, 0, 1, 0, 1, B, 2, 0, 2, B]
    assert rows.dtype == blocks.dtype == torch.int64
    assert rows.untyped_storage().data_ptr() == blocks.untyped_storage().data_ptr()
    assert blocks.data_ptr() == rows.data_ptr() + 8 * rows.numel()
    # the entry point builds one table per step
    calls = []
    orig = tk._list_table

    def spy(*a):
        calls.append(a)
        return orig(*a)
    tk._list_table = spy
    try:
        ps, grads = _make_list(torch.float32, 230, LIST_SHAPES[:20])
        _run_list(tk, ps, grads, _combos()[-1])
    finally:
        tk._list_table = orig
    assert len(calls) == STEPS, len(calls)


def check_list_split_past_grid_limit(tk):
    """Past _MAX_PROGRAMS (CUDA's grid limit) the launch is split; here the limit is lowered to
    7 programs: ceil(programs / 7) launches, same bits."""
    ps, grads = _make_list(torch.float32, 240, LIST_SHAPES[:30])
    h = _combos()[-1]
    ref = _torch_sgd(ps, grads, h)
    n_prog = _programs(ps, tk.BLOCK_SIZE)
    orig = tk._MAX_PROGRAMS
    tk._MAX_PROGRAMS = 7
    try:
        ps2 = [p.clone() for p in ps]
        bufs = [torch.empty_like(p) for p in ps2]
        for step in range(STEPS):
            with _Launches(tk) as launches:
                tk.triton_sgd_step_list_(ps2, [g.clone() for g in grads[step]], bufs,
                                         **dict(h, first_step=step == 0))
            want = [(7,)] * (n_prog // 7) + ([(n_prog % 7,)] if n_prog % 7 else [])
            assert launches.list == want, (launches.list, n_prog)
    finally:
        tk._MAX_PROGRAMS = orig
    assert _same(ps2, ref)


def _planted_table(tk, how):
    """_list_table with a planted bug. All of them stay inside the tensors' memory (a wrong
    numel LARGER than the tensor would write past it: not planted, it could crash the child)."""
    orig = tk._list_table

    def bad(addrs, numels, device):
        rows, blocks, n = orig(addrs, numels, device)
        rows, blocks = rows.clone().reshape(-1, 4), blocks.clone().reshape(-1, 2)
        if how == "block start off by one":
            blocks[:, 1] += 1
        elif how == "neighbour tensor":
            blocks[:, 0] = (blocks[:, 0] + 1) % rows.shape[0]
        elif how == "numel - 1":
            rows[:, 3] -= 1
        else:
            raise AssertionError(how)
        return rows.reshape(-1), blocks.reshape(-1), n
    return orig, bad


def check_planted_list_table_bugs_fail(tk):
    ps, grads = _make_list(torch.float32, 250)
    h = _combos()[-1]
    ref = _torch_sgd(ps, grads, h)
    assert _same(_run_list(tk, ps, grads, h), ref), "the real kernel must match here"
    for how in ("block start off by one", "neighbour tensor", "numel - 1"):
        orig, bad = _planted_table(tk, how)
        tk._list_table = bad
        try:
            planted = _run_list(tk, ps, grads, h)
        finally:
            tk._list_table = orig
        assert not _same(planted, ref), f"planted list bug ({how}) went unnoticed"


def check_contract_reference_is_torch_for_fp32(tk):
    # The plain-torch contract, with identity rounding, reproduces torch SGD: it is a faithful
    # transcription of the formula.
    for i, h in enumerate(_combos()):
        ps, grads = _make(torch.float32, 300 + i)
        got, _ = _run_flat(tk, ps, grads, h, OFFSETS, contract=True)
        assert _same(got, _torch_sgd(ps, grads, h)), f"contract reference != torch for {h}"


def _check_half(tk, dtype, seed0):
    for i, h in enumerate(_combos()):
        ps, grads = _make(dtype, seed0 + i)
        got, pad_ok = _run_flat(tk, ps, grads, h, OFFSETS)
        assert pad_ok
        ref, _ = _run_flat(tk, ps, grads, h, OFFSETS, contract=True)
        assert _same(got, ref), f"{dtype} flat differs from the CUDA contract for {h}"
    ps, grads = _make_list(dtype, seed0 + 99, HALF_LIST_SHAPES)
    for h in _combos():
        assert _same(_run_list(tk, ps, grads, h), _run_list_contract(ps, grads, h)), \
            f"{dtype} list differs from the CUDA contract for {h}"


def check_bf16_vs_contract(tk):
    _check_half(tk, torch.bfloat16, 400)


def check_fp16_vs_contract(tk):
    _check_half(tk, torch.float16, 500)


# ---- bf16 against torch's own CPU for-loop, where that comparison is honest -----------------
# The issue asks for bitwise agreement with torch.optim.SGD's for-loop for fp32 AND bf16. The
# kernels implement the CUDA contract (fp32 ops with fp32 alphas, one RNE rounding to bf16 per
# op); torch's CPU bf16 for-loop differs from that contract in two ways:
#  (a) add_(y, alpha=a) narrows the alpha to bf16 on CPU;
#  (b) the scalar tail of each vectorised loop (the last n % 32 elements of every
#      at::parallel_for chunk with AVX2: 2 x 16 bf16 lanes; chunks of 32768) computes
#      r(x + r(a * y)) in bf16 arithmetic instead of r(fma(y, a, x)).
# Both vanish when every alpha is exact in bf16 AND a * y is exact in bf16 for bf16 y, i.e. when
# the alphas are powers of two: lr, weight_decay, 1 - dampening and (nesterov) momentum. Then
# r(a*y) = a*y and, x and a*y being 8-bit values, their fp32 sum or fma is exact or rounds away
# only bits far below a bf16 half-ulp, so both torch paths round the exact x + a*y once.
# The momentum of buf.mul_(m) is not an add_ alpha: torch computes buf * float(m) in fp32 and
# rounds, like the contract, so any bf16-exact m (0.875) is fine there.
# In this regime the kernels must equal torch's CPU for-loop itself; outside it the CUDA-contract
# reference (check_bf16_vs_contract) is the one that applies, and the checks below show torch's
# CPU bits really do differ there (so the pow2 check is not vacuous).
POW2_SIZES = (0, 1, 3, 31, 33, 97, 1025, 2049)
POW2_OFFSETS = [1 + sum(n + 3 for n in POW2_SIZES[:i]) for i in range(len(POW2_SIZES))]
POW2_BASE = dict(lr=2.0 ** -3, momentum=0.875, dampening=0.5, weight_decay=2.0 ** -7,
                 nesterov=False, maximize=True)


def _pow2_combos():
    """Every flag on and off with power-of-two alphas: lr 2^-3, weight_decay 2^-7, dampening
    0 or 0.5 (1 - d = 1 or 0.5), momentum 0.875 (only a mul_ factor) or, with nesterov (where
    it is an add_ alpha too), 0.5."""
    out = []
    for momentum, dampenings, nesterovs in ((0.0, (0.0,), (False,)),
                                            (0.875, (0.0, 0.5), (False,)),
                                            (0.5, (0.0,), (False, True))):
        for dampening in dampenings:
            for wd in (0.0, 2.0 ** -7):
                for nesterov in nesterovs:
                    for maximize in (False, True):
                        out.append(dict(lr=2.0 ** -3, momentum=momentum, dampening=dampening,
                                        weight_decay=wd, nesterov=nesterov, maximize=maximize))
    return out


def check_bf16_flat_and_list_vs_torch_sgd_pow2(tk):
    ps, grads = _make(torch.bfloat16, 900, POW2_SIZES)
    lps, lgrads = _make_list(torch.bfloat16, 901, HALF_LIST_SHAPES)
    for h in _pow2_combos():
        got, pad_ok = _run_flat(tk, ps, grads, h, POW2_OFFSETS)
        assert pad_ok
        assert _same(got, _torch_sgd(ps, grads, h)), f"bf16 flat differs from torch SGD for {h}"
        assert _same(_run_list(tk, lps, lgrads, h), _torch_sgd(lps, lgrads, h)), \
            f"bf16 list differs from torch SGD for {h}"


NOT_POW2 = {"lr=0.1": dict(lr=0.1), "weight_decay=0.01": dict(weight_decay=0.01),
            "dampening=0.1": dict(dampening=0.1),
            "nesterov, momentum=0.9": dict(momentum=0.9, dampening=0.0, nesterov=True)}


def check_bf16_outside_pow2_torch_cpu_differs(tk):
    """One alpha at a time made non-power-of-two: torch's CPU bf16 bits leave the kernel's
    (deterministically, for these inputs), the CUDA-contract reference still equals it."""
    ps, grads = _make(torch.bfloat16, 910, POW2_SIZES)
    got, _ = _run_flat(tk, ps, grads, POW2_BASE, POW2_OFFSETS)
    assert _same(got, _torch_sgd(ps, grads, POW2_BASE)), "the pow2 base case must match"
    for name, change in NOT_POW2.items():
        h = dict(POW2_BASE, **change)
        got, _ = _run_flat(tk, ps, grads, h, POW2_OFFSETS)
        assert not _same(got, _torch_sgd(ps, grads, h)), \
            f"{name}: torch's CPU bf16 path agreed with the kernel anyway"
        ref, _ = _run_flat(tk, ps, grads, h, POW2_OFFSETS, contract=True)
        assert _same(got, ref), f"{name}: kernel differs from the CUDA contract"
    lps, lgrads = _make_list(torch.bfloat16, 911, HALF_LIST_SHAPES)
    h = dict(POW2_BASE, lr=0.1)
    assert not _same(_run_list(tk, lps, lgrads, h), _torch_sgd(lps, lgrads, h)), \
        "list, lr=0.1: torch's CPU bf16 path agreed with the kernel anyway"


def check_bf16_torch_cpu_scalar_tail(tk):
    """Difference (b) alone: lr = 0.75 is exact in bf16 but 0.75 * y is not (10 bits). torch's
    CPU bits then differ from the kernel's ONLY in the scalar tail, the last n % (2 x vector
    width) elements of each tensor (one chunk: n < 32768), where it rounds 0.75 * y first."""
    import torch.backends.cpu
    lanes = {"AVX2": 32, "AVX512": 64}.get(torch.backends.cpu.get_cpu_capability())
    ps, grads = _make(torch.bfloat16, 920, POW2_SIZES)
    h = dict(POW2_BASE, lr=0.75)
    got, _ = _run_flat(tk, ps, grads, h, POW2_OFFSETS)
    ref = _torch_sgd(ps, grads, h)
    diff = [(n, (a.view(torch.int16) != b.view(torch.int16)).nonzero().flatten().tolist())
            for n, a, b in zip(POW2_SIZES, got, ref)]
    assert any(d for _, d in diff), "lr=0.75: torch's CPU bf16 path agreed anyway"
    if lanes is not None:  # other vector widths: the tail is elsewhere; not asserted
        for n, d in diff:
            assert all(i >= n - n % lanes for i in d), \
                f"size {n}: differences outside the scalar tail of {n % lanes}: {d}"


def _hard_inputs():
    """fp32 inputs where rounding is hard: ties, neighbours, subnormals, overflow, inf, NaN."""
    gen = torch.Generator().manual_seed(7)
    bits = [torch.randint(-2**31, 2**31, (20000,), generator=gen, dtype=torch.int64)]
    # exact ties and neighbours for bf16 (16 dropped bits) and fp16 normal (13 dropped bits)
    base = torch.randint(0, 2**31, (3000,), generator=gen, dtype=torch.int64)
    for drop in (16, 13):
        t = (base >> drop << drop) + (1 << (drop - 1))
        bits += [t, t - 1, t + 1, t | (1 << 31)]
    # fp16 range edges: subnormals, 2^-14 boundary, 65504/65520, tiny, huge
    for f in (2.0 ** -25, 2.0 ** -24, 3 * 2.0 ** -25, 1.5 * 2.0 ** -24, 2.0 ** -14,
              2.0 ** -14 - 2.0 ** -25, 65504.0, 65519.0, 65520.0, 65536.0, 1e-30, 3e38, 0.0):
        v = torch.tensor([f, -f], dtype=torch.float32).view(torch.int32).to(torch.int64)
        bits += [v, v - 1, v + 1]
    sub = torch.randint(0, 0x38800000, (5000,), generator=gen, dtype=torch.int64)
    bits += [sub]
    bits += [torch.tensor([0x7F800000, 0xFF800000 - 2**32, 0x7FC00000, 0x7F800001, 0x7F7FFFFF],
                          dtype=torch.int64)]
    return torch.cat(bits).to(torch.int32).view(torch.float32)


def check_round_storage_bits(tk):
    """r() on hard fp32 inputs (ties, subnormals, overflow, inf, NaN) equals torch's RNE .to()."""
    k = tk._round_storage_kernel
    triton = tk.triton

    x = _hard_inputs()
    for kind, dt in ((1, torch.bfloat16), (2, torch.float16)):
        y = torch.empty_like(x)
        k[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), KIND=kind, BLOCK=1024)
        ref = x.to(dt).float()
        nan = ref.isnan()
        assert torch.equal(y.isnan(), nan), f"{dt}: NaN handling differs"
        assert torch.equal(y[~nan].view(torch.int32), ref[~nan].view(torch.int32)), \
            f"{dt}: r() differs from torch's RNE on {(y[~nan] != ref[~nan]).sum()} inputs"


def _planted_one_minus_d(tk):
    """A variant whose host computes 1 - d as float32(1) - float32(d)."""
    orig = tk._scalars

    def bad(vals, dtype):
        s = list(orig(vals, dtype))
        s[4] = tk._to_f32(1.0 - tk._to_f32(vals["dampening"]))
        return tuple(s)
    return orig, bad


def check_planted_one_minus_d_fails(tk):
    h = dict(lr=0.1, momentum=0.9, dampening=0.9, weight_decay=0.0, nesterov=False,
             maximize=False)
    ps, grads = _make(torch.float32, 600)
    ref = _torch_sgd(ps, grads, h)
    good, _ = _run_flat(tk, ps, grads, h, OFFSETS)
    assert _same(good, ref), "the real kernel must match here"
    orig, bad = _planted_one_minus_d(tk)
    tk._scalars = bad
    try:
        planted, _ = _run_flat(tk, ps, grads, h, OFFSETS)
    finally:
        tk._scalars = orig
    assert not _same(planted, ref), "planted bug (fp32 1-d) went unnoticed"


def _flat_with_kind(tk, kind):
    """The flat entry point with r() forced to `kind` (0: no explicit rounding, cast only)."""
    def fn(p, g, b, segs, **kw):
        vals = tk._check_scalars(kw["lr"], kw["momentum"], kw["dampening"], kw["weight_decay"],
                                 kw["nesterov"], kw["maximize"], kw["first_step"])
        sc = tk._scalars(vals, p.dtype)
        for off, cnt in segs.tolist():
            if cnt == 0:
                continue
            sl = slice(off, off + cnt)
            tk._sgd_flat_kernel[(tk.triton.cdiv(cnt, tk.BLOCK_SIZE),)](
                p[sl], g[sl], b[sl] if b is not None else p[sl], cnt, *[p[sl]] * 8, *sc,
                MAXIMIZE=kw["maximize"], WEIGHT_DECAY=kw["weight_decay"] != 0,
                MOMENTUM=kw["momentum"] != 0, NESTEROV=kw["nesterov"],
                FIRST_STEP=kw["first_step"], KIND=kind, OPMATH=tk.tl.float32,
                LR_TENSOR=False, M_TENSOR=False, D_TENSOR=False, WD_TENSOR=False,
                AMP_SCALE=False, AMP_SKIP=False, CLIP=False, FIRST_TENSOR=False,
                BLOCK=tk.BLOCK_SIZE, num_warps=tk.NUM_WARPS, enable_fp_fusion=False)
    return fn


def check_planted_no_bf16_rounding_fails(tk):
    h = _combos()[-1]
    ps, grads = _make(torch.bfloat16, 700)
    ref, _ = _run_flat(tk, ps, grads, h, OFFSETS, contract=True)
    planted, _ = _run_flat(tk, ps, grads, h, OFFSETS, fn=_flat_with_kind(tk, 0))
    assert not _same(planted, ref), "bf16 without explicit rounding went unnoticed"


def check_planted_no_fp16_rounding_fails(tk):
    h = _combos()[-1]
    ps, grads = _make(torch.float16, 800)
    ref, _ = _run_flat(tk, ps, grads, h, OFFSETS, contract=True)
    planted, _ = _run_flat(tk, ps, grads, h, OFFSETS, fn=_flat_with_kind(tk, 0))
    assert not _same(planted, ref), "fp16 without rounding between ops went unnoticed"


def check_interpreter_fp16_cast_is_rne(tk):
    """Informational: the interpreter's plain fp32 -> fp16 cast rounds to nearest even (numpy
    astype), unlike its bf16 cast; the kernel does not rely on it (r() uses bits)."""
    x = _hard_inputs()
    y = torch.empty_like(x)
    tk._cast_fp16_kernel[(tk.triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    ref = x.to(torch.float16).float()
    nan = ref.isnan()
    assert torch.equal(y.isnan(), nan)
    assert torch.equal(y[~nan].view(torch.int32), ref[~nan].view(torch.int32)), \
        "the interpreter's fp16 cast does not round to nearest even"


def _raises(fn, exc, text):
    try:
        fn()
    except exc as e:
        assert text in str(e), f"message {str(e)!r} lacks {text!r}"
        return
    raise AssertionError(f"no {exc.__name__} ({text})")


def check_validation_errors(tk):
    h = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
             maximize=False, first_step=False)
    p, g, b = torch.ones(8), torch.ones(8), torch.ones(8)
    seg = torch.tensor([[0, 8]])
    flat = tk.triton_sgd_step_flat_
    lst = tk.triton_sgd_step_list_
    _raises(lambda: flat(p, g, None, seg, **h), ValueError, "momentum_buffer is None")
    _raises(lambda: flat(p, g, b, seg, **dict(h, lr=float("nan"))), ValueError,
            "lr must be a finite number")
    _raises(lambda: flat(p, g, b, seg, **dict(h, momentum=0.0, nesterov=True)), ValueError,
            "nesterov=True needs momentum")
    _raises(lambda: flat(p, g, b, seg, **dict(h, momentum=0.0, first_step=True)), ValueError,
            "first_step=True")
    _raises(lambda: flat(p, g.double(), b, seg, **h), ValueError, "grad has dtype")
    _raises(lambda: flat(p, g[:4], b, seg, **h), ValueError, "grad has shape")
    _raises(lambda: flat(p, p, b, seg, **h), ValueError, "overlaps")
    _raises(lambda: flat(p, g, b, torch.tensor([[4, 8]]), **h), ValueError, "segments[0]")
    _raises(lambda: flat(p, g, b, torch.tensor([[0, 8]], dtype=torch.int32), **h), ValueError,
            "segments must be")
    _raises(lambda: flat(p.int(), g.int(), b.int(), seg, **h), ValueError, "param must be float32")
    _raises(lambda: flat(torch.ones(2, 4), g, b, seg, **h), ValueError, "contiguous 1-D")
    _raises(lambda: lst([p, torch.ones(3)], [g], [b], **h), ValueError, "grads has 1 tensors")
    _raises(lambda: lst([p], [g], [], **h), ValueError, "momentum_buffers has 0")
    _raises(lambda: lst([p, p], [g, torch.ones(8)], [b, torch.ones(8)], **h), ValueError,
            "overlaps")
    _raises(lambda: lst([p, torch.ones(8).half()], [g, g.half()], [b, b.half()], **h), ValueError,
            "params[1] has dtype")
    _raises(lambda: lst([torch.ones(4, 4)], [torch.ones(4, 4)], [torch.ones(4, 4).t()], **h),
            ValueError, "momentum_buffers[0] has strides")
    _raises(lambda: lst([torch.ones(8)[::2]], [torch.ones(4)], [torch.ones(4)], **h), ValueError,
            "params[0] must be dense")
    # a bad tensor after good ones: nothing launched, the good ones unchanged
    _raises(lambda: lst([p, torch.ones(8)[::2]], [g, torch.ones(4)], [b, torch.ones(4)], **h),
            ValueError, "params[1] must be dense")
    # nothing changed by any failed call
    assert bool((p == 1).all() and (g == 1).all() and (b == 1).all())


def check_list_other_strides_on_size1_dims(tk):
    """Gradients and buffers whose strides differ from their parameter's on dimensions of size
    1 only hold each element where the parameter does: the list op takes them and gives the
    bits it gives with the parameter's own strides (as the C++ ops, test_kernel_api.py)."""
    gen = torch.Generator().manual_seed(9)
    h = dict(lr=0.0123, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
             maximize=False, first_step=False)
    shapes = [(3, 1, 5), (1, 7), (1,), (2, 3, 1, 4)]
    ps = [torch.randn(s, generator=gen) for s in shapes]
    gs, bs = ([torch.randn(s, generator=gen) for s in shapes] for _ in range(2))

    def odd(t):
        strides = [s + 3 if n == 1 else s for n, s in zip(t.shape, t.stride())]
        return torch.empty_strided(t.shape, strides, dtype=t.dtype).copy_(t)
    q1, c1 = [t.clone() for t in ps], [t.clone() for t in bs]
    q2, c2 = [t.clone() for t in ps], [odd(t) for t in bs]
    tk.triton_sgd_step_list_(q1, gs, c1, **h)
    tk.triton_sgd_step_list_(q2, [odd(t) for t in gs], c2, **h)
    assert all(o.stride() != t.stride() for o, t in zip(c2, c1))
    assert _same(q1 + c1, q2 + c2) and not torch.equal(q1[0], ps[0])


def check_triton_ops_opcheck(tk):
    """torch.ops.momentum_cuda.triton_sgd_step_flat_ / _list_ (the custom ops over the entry
    points) pass torch.library.opcheck, and give the entry points' bits."""
    ops = torch.ops.momentum_cuda
    gen = torch.Generator().manual_seed(5)
    h = dict(lr=0.0123, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
             maximize=True, first_step=False)
    p, g, b = (torch.randn(1163, generator=gen) for _ in range(3))
    segs = torch.tensor([[0, 1], [5, 97], [102, 0], [120, 3], [130, 1030]])
    ps, gs, bs = ([torch.randn(n, generator=gen) for n in SIZES] for _ in range(3))
    for op, args in ((ops.triton_sgd_step_flat_, (p, g, b, segs)),
                     (ops.triton_sgd_step_list_, (ps, gs, bs))):
        result = torch.library.opcheck(op.default, args, h)
        assert set(result.values()) == {"SUCCESS"}, result
    p1, b1, p2, b2 = p.clone(), b.clone(), p.clone(), b.clone()
    ops.triton_sgd_step_flat_(p1, g, b1, segs, **h)
    tk.triton_sgd_step_flat_(p2, g, b2, segs, **h)
    assert _same([p1, b1], [p2, b2]) and not torch.equal(p1, p), "flat op != entry point"
    q1, c1 = [t.clone() for t in ps], [t.clone() for t in bs]
    q2, c2 = [t.clone() for t in ps], [t.clone() for t in bs]
    ops.triton_sgd_step_list_(q1, gs, c1, **h)
    tk.triton_sgd_step_list_(q2, gs, c2, **h)
    assert _same(q1 + c1, q2 + c2), "list op != entry point"


def check_lr_tensor_read_by_the_kernels(tk):
    """lr_tensor (fp32 and fp64, 1 element) is read by both kernels in place of lr (set to
    garbage here): the bits of the float lr it holds, every dtype; a bad one is refused."""
    gen = torch.Generator().manual_seed(6)
    h = dict(momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=False,
             first_step=False)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        p, g, b = (torch.randn(1030, generator=gen).to(dtype) for _ in range(3))
        for lr_t in (torch.tensor(0.0123), torch.tensor(0.0123, dtype=torch.float64)):
            for kind in ("flat", "list"):
                outs = []
                for args in (dict(lr=lr_t.item()), dict(lr=123.0, lr_tensor=lr_t)):
                    q, c = p.clone(), b.clone()
                    if kind == "flat":
                        tk.triton_sgd_step_flat_(q, g, c, torch.tensor([[0, 1030]]), **h, **args)
                    else:
                        tk.triton_sgd_step_list_([q], [g], [c], **h, **args)
                    outs.append([q, c])
                assert _same(outs[0], outs[1]), f"{dtype} {kind} lr_tensor {lr_t.dtype}"
    _raises(lambda: tk.triton_sgd_step_list_([p], [g], [b], **h, lr=0.1,
                                             lr_tensor=torch.ones(2)),
            ValueError, "lr_tensor must be a 1-element float32 or float64 tensor")


CHECKS = [name for name in list(globals()) if name.startswith("check_")]


def _child_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    sys.path.insert(0, ROOT)
    from momentum_cuda import triton_kernels as tk
    assert tk.interpreting(), "kernels are not interpreted"
    torch.set_num_threads(1)
    out = {}
    for name in CHECKS:
        t0 = time.perf_counter()
        try:
            globals()[name](tk)
            err = None
        except Exception:  # reported to the parent
            err = traceback.format_exc()
        out[name] = {"error": err, "seconds": round(time.perf_counter() - t0, 2)}
    print("@@RESULT@@" + json.dumps(out))


# ----------------------------------------------------------------------------------------------
# Parent side: pytest.
# ----------------------------------------------------------------------------------------------
pytestmark = pytest.mark.skipif(not (have("triton") and have("numpy")),
                                reason="triton and numpy are needed for the interpreter")


@pytest.fixture(scope="module")
def interp_results():
    return interpreter_child("test_triton_interp", timeout=600)


@pytest.mark.parametrize("name", CHECKS)
def test_interpreter(interp_results, name):
    res = interp_results[name]
    assert res["error"] is None, res["error"]


def test_import_without_interpreter_rejects_cpu_tensors():
    """In this (non-interpreted) process the module imports, and CPU tensors are refused
    with a clear error before any launch."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process interprets")
    from momentum_cuda import triton_kernels as tk
    assert tk.TRITON_AVAILABLE and not tk.interpreting()
    p = torch.ones(4)
    with pytest.raises(ValueError, match="CUDA device"):
        tk.triton_sgd_step_list_([p], [p.clone()], [], lr=0.1, momentum=0.0, dampening=0.0,
                                 weight_decay=0.0, nesterov=False, maximize=False,
                                 first_step=False)
    assert bool((p == 1).all())



def test_list_table_is_built_once_per_set_of_tensors(monkeypatch):
    """The list kernel's pointer table is a function of the addresses and sizes alone: a step
    over the same tensors reuses the device copy (no host work, allocation or copy: capturable
    in a CUDA graph), other addresses or sizes get their own, the last 8 are kept."""
    from momentum_cuda import triton_kernels as tk
    monkeypatch.setattr(tk, "_TABLES", type(tk._TABLES)())
    built = []
    real = tk._list_table
    monkeypatch.setattr(tk, "_list_table", lambda *a: built.append(a) or real(*a))
    cpu = torch.device("cpu")
    addrs, numels = [(64, 128, 0), (1024, 2048, 0)], [3, 5000]
    first = tk._cached_list_table(addrs, numels, cpu)
    again = tk._cached_list_table(list(addrs), list(numels), cpu)
    assert again is first and len(built) == 1
    rows, blocks, n = first
    assert rows.tolist() == [64, 128, 0, 3, 1024, 2048, 0, 5000]
    assert n == 1 + -(-5000 // tk.BLOCK_SIZE)
    other = tk._cached_list_table(addrs, [3, 4999], cpu)
    assert other is not first and len(built) == 2
    for k in range(tk._TABLES_KEPT):
        tk._cached_list_table([(8 * (k + 1), 16, 0)], [1], cpu)
    assert len(tk._TABLES) == tk._TABLES_KEPT
    assert tk._cached_list_table(addrs, numels, cpu) is not first  # evicted: built again
    assert len(built) == 3 + tk._TABLES_KEPT

if __name__ == "__main__":
    _child_main()
