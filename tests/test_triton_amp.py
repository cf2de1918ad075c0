"""GradScaler's grad_scale and found_inf and the clip coefficient in the Triton kernels, under
Triton's CPU interpreter (TRITON_INTERPRET=1), without a GPU.

As in tests/test_triton_interp.py (whose helpers this file reuses), the interpreter must be on
before momentum_cuda.triton_kernels is imported, so the checks run in ONE child Python process
(this file, run as a script) and each pytest test asserts one check's outcome.

The semantics are the CUDA kernel's (csrc/cuda/sgd_kernel.cuh: amp_step, amp_grad,
update_one): inv = fp32(1 / fp64(scale)); g = r(g * inv) in opmath unless inv == 1; then, with
a clip coefficient (1 element, the gradients' dtype), g = r(g * coef); that g is written back
whenever grad_scale or clip_coef is given (also on a skipped step); found_inf != 0 skips the
update of parameters and buffers. References:
- gradients: torch's own ops, bit for bit: GradScaler's unscale
  (torch._amp_foreach_non_finite_check_and_unscale_ with scale.double().reciprocal().float(),
  as GradScaler._unscale_grads_) and torch.nn.utils.clip_grads_with_norm_ with
  torch.nn.utils.get_total_norm's norm (the coefficient handed to the kernel is computed as
  torch computes it), every dtype (these are single multiplies in opmath on the CPU too). One
  exception, bf16 NaN bits: torch's CPU ops write 0xFFFF in vectorised lanes and 0x7FC0 in
  their scalar tails; the reference takes c10::BFloat16's 0x7FC0, sgd_math.h's contract;
- parameters and buffers: fp32 / fp64: torch.optim.SGD(foreach=False) stepped on those
  gradients (not stepped where found_inf != 0, as GradScaler skips it); bf16 / fp16: the plain
  torch CUDA-contract reference of test_triton_interp (_contract_step), since torch's CPU
  bf16/fp16 SGD narrows its alphas and GPU torch does not (test_triton_interp's module doc).
Planted bugs (flags dropped on the host: clip, skip, unscale; kernel variants swapped in for
_amp_grad: no rounding between unscale and clip, the gradient rewritten when inv == 1;
gradients not written back) must make the comparisons fail.

The modes' Triton ops (master, fp16 master, momentum_dtype bf16 and int8) given found_inf: the
bits of their C++ CPU ops, nothing written on a skipped step, opcheck, the argument check; and
momentum_cuda.SGD(backend="triton") in those modes under GradScaler replaying its kept calls with
no host read, against the CPU backend planning every step; each with a planted bug (found_inf
dropped on the host).

first_step_tensor (capturable=True's first step decided by the kernels) against the constexpr
paths, with a planted bug (the flag dropped), its argument checks and opcheck; and
momentum_cuda.SGD(backend="triton", capturable=True) under GradScaler with no host read and the
flags read late (check_optimizer_capturable_e2e, with the same planted bug).
Also: scale 1 leaves the gradients' bits (NaN payloads) alone; each tensor on its own; argument
validation; torch.library.opcheck on the amp ops and on the plain ops given found_inf;
step_ops("triton")'s dispatch (which op, whose version counters go up) also under
torch.compile; and momentum_cuda.SGD on the Triton backend under GradScaler("cpu"), with and
without opt.clip_grad_norm_, against GradScaler + torch.optim.SGD(foreach=False). That last
check needs optim.py to let the Triton backend claim _step_supports_amp_scaling and take the
clip in its kernels; where optim.py does not yet, the check applies that change to the class in
the child process (_proposed_optim_patch) and reports it ("patched").
"""
from __future__ import annotations

import inspect
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
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SIZES = (0, 1, 3, 97, 1030)
OFFSETS = (1, 4, 9, 107, 1141)  # odd gaps between the flat segments (padding must stay)
SCALES = (65536.0, 1000.0, 3.0)
HYPERS = (dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
               maximize=False),
          dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True,
               maximize=True),
          dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.01, nesterov=False,
               maximize=False))
INF_AT = {97: ((0, float("inf")), (5, float("-inf")), (7, float("nan")))}
_ti = None  # test_triton_interp, imported in the child


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _eq(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _bf16_nan_as_c10(gs):
    """bf16 NaNs as c10::BFloat16 (and sgd_math.h, the kernels' contract) write them: 0x7FC0.
    torch's CPU ops write 0xFFFF instead in their vectorised lanes (at::vec's fp32 -> bf16
    conversion) and 0x7FC0 in their scalar tails, so their NaN bits depend on the position."""
    for g in gs:
        if g.dtype == torch.bfloat16:
            g.view(torch.int16)[g.isnan()] = 0x7FC0
    return gs


def _torch_grads(gs, scale, clip):
    """What GradScaler.unscale_ and then torch's clip_grad_norm_ (max_norm = 0.3 x the total
    norm when finite, else 1) leave in the gradients (bf16 NaNs as 0x7FC0: _bf16_nan_as_c10);
    and the clip coefficient as torch computes it (clip_grads_with_norm_:
    clamp(max_norm / (total_norm + 1e-6), max=1)), or None."""
    gs = [g.clone() for g in gs]
    inv = torch.full((), scale, dtype=torch.float32).double().reciprocal().float()
    torch._amp_foreach_non_finite_check_and_unscale_(gs, torch.zeros(()), inv)
    if not clip:
        return _bf16_nan_as_c10(gs), None
    total = torch.nn.utils.get_total_norm(gs, 2.0, False, False)
    max_norm = 0.3 * total.item() if torch.isfinite(total) else 1.0
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in gs]
    for p, g in zip(params, gs):
        p.grad = g
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=False)
    return _bf16_nan_as_c10([p.grad for p in params]), coef


class _Case:
    """One sequence of steps of one (dtype, kind, scale, found_inf, clip, hyper): step k has
    found_inf = skips[k]; the first step that is not skipped is the buffers' first step."""

    def __init__(self, dtype, kind, scale, found_inf, clip, h, seed):
        self.dtype, self.kind, self.scale, self.clip, self.h = dtype, kind, scale, clip, h
        self.skips = (found_inf, 0, found_inf)
        gen = torch.Generator().manual_seed(seed)
        shapes = [(n,) for n in SIZES] + ([(11, 7)] if kind == "list" else [])
        self.ps = [self._one(s, gen) for s in shapes]
        self.grads = []
        for skip in self.skips:
            gs = [(self._one(s, gen).float() * 8).to(dtype) for s in shapes]
            if skip:  # the overflow GradScaler found: inf, -inf and NaN in one gradient
                for i, s in enumerate(shapes):
                    for j, v in INF_AT.get(s[0] if len(s) == 1 else None, ()):
                        gs[i][j] = v
            self.grads.append(gs)

    def _one(self, shape, gen):
        if len(shape) == 2:  # a transposed layout (dense, not contiguous)
            return torch.randn(shape[::-1], generator=gen).to(self.dtype).t()
        return torch.randn(shape, generator=gen).to(self.dtype)

    def run(self, tk, entry=None):
        """Our kernels through the entry point: (params, buffers, gradients) per step."""
        out = []
        ps = [p.clone() for p in self.ps]
        use_buf = self.h["momentum"] != 0
        bufs = [torch.full_like(p, 5.0) for p in ps] if use_buf else []
        stepped = False
        flat = None
        if self.kind == "flat":  # one flat buffer, odd gaps; padding 7 (p), 3 (g), 5 (buf)
            total = OFFSETS[-1] + SIZES[-1] + 5
            flat = [torch.full((total,), v, dtype=self.dtype) for v in (7.0, 3.0, 5.0)]
            segs = torch.tensor([[o, n] for o, n in zip(OFFSETS, SIZES)], dtype=torch.int64)
            for o, p in zip(OFFSETS, ps):
                flat[0][o:o + p.numel()] = p
        for skip, gs in zip(self.skips, self.grads):
            kw = dict(self.h, first_step=use_buf and not stepped,
                      grad_scale=torch.tensor([self.scale]),
                      found_inf=torch.tensor([float(skip)]))
            ref_gs, coef = _torch_grads(gs, self.scale, self.clip)
            if coef is not None:
                kw["clip_coef"] = coef
            gs = [g.clone() for g in gs]  # clone() keeps the transposed layout
            if self.kind == "flat":
                fp, fg, fb = flat
                for o, g in zip(OFFSETS, gs):
                    fg[o:o + g.numel()] = g
                (entry or tk.triton_sgd_step_flat_)(fp, fg, fb if use_buf else None, segs, **kw)
                pad = torch.ones(fp.numel(), dtype=torch.bool)
                for o, n in zip(OFFSETS, SIZES):
                    pad[o:o + n] = False
                assert bool((fp[pad] == 7).all() and (fg[pad] == 3).all()
                            and (fb[pad] == 5).all()), "the flat padding changed"
                cut = lambda t: [t[o:o + n].clone() for o, n in zip(OFFSETS, SIZES)]  # noqa
                out.append((cut(fp), cut(fb) if use_buf else [], cut(fg)))
            else:
                with _ti._Launches(tk) as launches:
                    (entry or tk.triton_sgd_step_list_)(ps, gs, bufs, **kw)
                n_prog = sum(-(-p.numel() // tk.BLOCK_SIZE) for p in ps)
                assert launches.flat == [] and launches.list == [(n_prog,)], \
                    (launches.flat, launches.list, n_prog)
                out.append(([p.clone() for p in ps], [b.clone() for b in bufs], gs))
            stepped = stepped or not skip
        return out

    def reference(self):
        """(params, buffers, gradients) per step from torch's ops (module doc)."""
        out = []
        use_buf = self.h["momentum"] != 0
        ps = [p.clone() for p in self.ps]
        bufs = [torch.full_like(p, 5.0) for p in ps] if use_buf else []
        torch_sgd = self.dtype in (torch.float32, torch.float64)
        if torch_sgd:
            tps = [torch.nn.Parameter(p.clone()) for p in ps]
            opt = torch.optim.SGD(tps, foreach=False, **self.h)
        stepped = False
        for skip, gs in zip(self.skips, self.grads):
            ref_gs, _ = _torch_grads(gs, self.scale, self.clip)
            if not skip:
                if torch_sgd:
                    for p, g in zip(tps, ref_gs):
                        p.grad = g.clone()
                    opt.step()
                    ps = [p.detach().clone() for p in tps]
                    if use_buf:
                        bufs = [opt.state[p]["momentum_buffer"].clone() for p in tps]
                else:
                    for p, g, b in zip(ps, ref_gs, bufs if use_buf else [None] * len(ps)):
                        _ti._contract_step(p, g, b, **self.h,
                                           first_step=use_buf and not stepped)
                stepped = True
            out.append(([p.clone() for p in ps], [b.clone() for b in bufs],
                        [g.clone() for g in ref_gs]))
        return out


def _cases(dtypes=DTYPES, kinds=("flat", "list"), scales=SCALES):
    i = 0
    for dtype in dtypes:
        for kind in kinds:
            for scale in scales:
                for found_inf in (0, 1):
                    for clip in (False, True):
                        i += 1
                        yield _Case(dtype, kind, scale, found_inf, clip,
                                    HYPERS[i % len(HYPERS)], seed=1000 + i)


def _compare(got, ref, case):
    """The first difference between two runs of a case, or None."""
    for k, ((p, b, g), (rp, rb, rg)) in enumerate(zip(got, ref)):
        for what, xs, ys in (("gradient", g, rg), ("parameter", p, rp), ("buffer", b, rb)):
            for i, (x, y) in enumerate(zip(xs, ys)):
                if not _eq(x, y):
                    return (f"{case.dtype} {case.kind} scale={case.scale} skips={case.skips} "
                            f"clip={case.clip} {case.h}: step {k + 1}: {what} {i} "
                            f"(numel {x.numel()}) differs")
    return None


def _mismatches(tk, cases, entry=None, first_only=False):
    """The differences over cases (first_only: stop at the first)."""
    out = []
    for c in cases:
        d = _compare(c.run(tk, entry), c.reference(), c)
        if d:
            out.append(d)
            if first_only:
                break
    return out


def check_amp_bits_vs_torch(tk):
    """Every dtype, flat and list, scales 2^16 / 1000 / 3, found_inf 0 and 1 (overflowed
    gradients: inf, -inf, NaN), clip on and off, three steps: gradients, parameters and buffers
    bitwise against torch's ops; skipped steps leave parameters and buffers untouched (also a
    skipped first step: the next one is the buffers' first); each list step is one launch."""
    cases = list(_cases())
    assert len(cases) == 96
    bad = _mismatches(tk, cases)
    assert not bad, f"{len(bad)} of {len(cases)} cases differ; first: {bad[:3]}"


def check_skipped_step_leaves_params_untouched(tk):
    """found_inf = 1 on every step: parameters and buffers keep their exact bits, the gradients
    are still unscaled and clipped (written back)."""
    for dtype in DTYPES:
        for kind in ("flat", "list"):
            case = _Case(dtype, kind, 1000.0, 1, True, HYPERS[0], seed=77)
            case.skips = (1, 1, 1)
            got = case.run(tk)
            for k, (ps, bs, gs) in enumerate(got):
                assert all(_eq(p, q) for p, q in zip(ps, case.ps)), f"{dtype} {kind} {k}"
                assert all(bool((b == 5).all()) for b in bs), f"{dtype} {kind} {k}: buffer"
                ref_gs, _ = _torch_grads(case.grads[k], 1000.0, True)
                assert all(_eq(g, r) for g, r in zip(gs, ref_gs)), f"{dtype} {kind} {k}: grad"
                assert not all(_eq(g, r) for g, r in zip(gs, case.grads[k])), "not written"


def _odd_nans(dtype):
    """A gradient holding NaNs with payloads and signs that a rounding would change."""
    bits = {torch.float32: [0x7FA00001, -0x3EDCBB, 0x7FC00000],
            torch.float64: [0x7FF4000000000001, -0x7FFFFFFFFFFF, 0x7FF8000000000000],
            torch.bfloat16: [0x7F81, -0x3F, 0x7FC0],
            torch.float16: [0x7C01, -0x1FF, 0x7E00]}[dtype]
    ibits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.finfo(dtype).bits // 8]
    nans = torch.tensor(bits, dtype=ibits).view(dtype)
    assert bool(nans.isnan().all()), nans
    g = torch.randn(97, generator=torch.Generator().manual_seed(3)).to(dtype)
    g[[1, 10, 50]] = nans
    return g


def check_scale_one_leaves_gradient_bits(tk):
    """inv == 1 (scale 1) and no clip: the gradient is not rewritten (its NaN payloads keep
    their bits, as the CUDA kernel leaves them); found_inf 0 and 1."""
    for dtype in DTYPES:
        g0 = _odd_nans(dtype)
        for skip in (0.0, 1.0):
            kw = dict(HYPERS[0], first_step=False, grad_scale=torch.ones(1),
                      found_inf=torch.tensor([skip]))
            for kind in ("flat", "list"):
                p, b, g = torch.zeros(97, dtype=dtype), torch.zeros(97, dtype=dtype), g0.clone()
                if kind == "flat":
                    tk.triton_sgd_step_flat_(p, g, b, torch.tensor([[0, 97]]), **kw)
                else:
                    tk.triton_sgd_step_list_([p], [g], [b], **kw)
                assert _eq(g, g0), f"{dtype} {kind} found_inf={skip}: gradient rewritten"


def check_found_inf_alone_and_clip_alone(tk):
    """Each tensor on its own: found_inf alone skips without touching the gradient; clip_coef
    alone clips (torch's mul_) and writes back; grad_scale alone unscales and updates."""
    gen = torch.Generator().manual_seed(9)
    for dtype in DTYPES:
        p0, g0, b0 = (torch.randn(1030, generator=gen).to(dtype) for _ in range(3))
        coef = torch.tensor(0.3).to(dtype)
        for kind in ("flat", "list"):
            def step(g, **amp):
                p, b = p0.clone(), b0.clone()
                kw = dict(HYPERS[0], first_step=False, **amp)
                if kind == "flat":
                    tk.triton_sgd_step_flat_(p, g, b, torch.tensor([[0, 1030]]), **kw)
                else:
                    tk.triton_sgd_step_list_([p], [g], [b], **kw)
                return p, b
            g = g0.clone()
            p, b = step(g, found_inf=torch.ones(1))
            assert _eq(p, p0) and _eq(b, b0) and _eq(g, g0), f"{dtype} {kind}: found_inf"
            g = g0.clone()
            p, b = step(g, found_inf=torch.zeros(1))
            pp, bb = step(g0.clone())
            assert _eq(p, pp) and _eq(b, bb) and _eq(g, g0), f"{dtype} {kind}: found_inf 0"
            g = g0.clone()
            p, b = step(g, clip_coef=coef)
            want = g0.clone().mul_(coef)
            pp, bb = step(want.clone())
            assert _eq(g, want) and _eq(p, pp) and _eq(b, bb), f"{dtype} {kind}: clip alone"
            g = g0.clone()
            p, b = step(g, grad_scale=torch.tensor([3.0]))
            want, _ = _torch_grads([g0], 3.0, False)
            pp, bb = step(want[0].clone())
            assert _eq(g, want[0]) and _eq(p, pp) and _eq(b, bb), f"{dtype} {kind}: scale"


# ---- planted bugs ------------------------------------------------------------------------------
PLANT_CASES = dict(dtypes=(torch.float32, torch.bfloat16), scales=(1000.0,))


def _planted_flags(tk, flag):
    """_flags with one AMP flag forced off: its tensor is passed but never read."""
    orig = tk._flags

    def bad(*args, **kwargs):
        f = orig(*args, **kwargs)
        f[flag] = False
        return f
    return orig, bad


def check_planted_flag_bugs_fail(tk):
    cases = list(_cases(**PLANT_CASES))
    assert not _mismatches(tk, cases), "the real kernels must match here"
    for flag, what in (("CLIP", "clip ignored"), ("AMP_SKIP", "found_inf ignored"),
                       ("AMP_SCALE", "unscale ignored")):
        orig, bad = _planted_flags(tk, flag)
        tk._flags = bad
        try:
            caught = _mismatches(tk, cases, first_only=True)
        finally:
            tk._flags = orig
        assert caught, f"planted bug ({what}) went unnoticed"


try:  # the planted kernel variants (interpreted in the child, never run in the parent)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the tests skip without triton
    triton = tl = None
_tk = None  # momentum_cuda.triton_kernels, imported in the child

if triton is not None:
    @triton.jit
    def _amp_grad_one_rounding(g, g_ptr, offs, mask, scale_ptr, coef_ptr, KIND: tl.constexpr,
                               OPMATH: tl.constexpr, AMP_SCALE: tl.constexpr,
                               CLIP: tl.constexpr, BLOCK: tl.constexpr):
        """Planted: g * inv * coef rounded to the gradients' dtype ONCE (no r() between the
        unscale and the clip)."""
        inv = tl.broadcast_to((1.0 / tl.load(scale_ptr).to(tl.float64)).to(tl.float32),
                              [BLOCK])
        x = g * inv.to(OPMATH)
        if CLIP:
            x = x * tl.load(coef_ptr).to(OPMATH)
        g = _tk._round_storage(x, KIND)
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
        return g

    @triton.jit
    def _amp_grad_rewrites_at_inv_one(g, g_ptr, offs, mask, scale_ptr, coef_ptr,
                                      KIND: tl.constexpr, OPMATH: tl.constexpr,
                                      AMP_SCALE: tl.constexpr, CLIP: tl.constexpr,
                                      BLOCK: tl.constexpr):
        """Planted: the gradient unscaled and written back whatever inv is (also inv == 1)."""
        inv = tl.broadcast_to((1.0 / tl.load(scale_ptr).to(tl.float64)).to(tl.float32),
                              [BLOCK])
        g = _tk._round_storage(g * inv.to(OPMATH), KIND)
        if CLIP:
            g = _tk._round_storage(g * tl.load(coef_ptr).to(OPMATH), KIND)
        tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=mask)
        return g


def check_planted_kernel_bugs_fail(tk):
    """Kernel-side bugs: no rounding between unscale and clip (bf16: a different gradient),
    the gradient rewritten at inv == 1 (NaN payloads change)."""
    orig = tk._amp_grad
    cases = [c for c in _cases(**PLANT_CASES) if c.clip and c.dtype == torch.bfloat16]
    assert not _mismatches(tk, cases), "the real kernels must match here"
    tk._amp_grad = _amp_grad_one_rounding
    try:
        caught = _mismatches(tk, cases, first_only=True)
    finally:
        tk._amp_grad = orig
    assert caught, "planted bug (one rounding for unscale and clip) went unnoticed"
    tk._amp_grad = _amp_grad_rewrites_at_inv_one
    try:
        check_scale_one_leaves_gradient_bits(tk)
    except AssertionError:
        pass
    else:
        raise AssertionError("planted bug (gradient rewritten at inv == 1) went unnoticed")
    finally:
        tk._amp_grad = orig
    check_scale_one_leaves_gradient_bits(tk)  # and the real one passes again


def check_planted_no_write_back_fails(tk):
    """An entry point whose gradients come back unwritten (restored after the call): the
    gradient comparison must see it (found_inf = 1: parameters alone would not)."""
    def restoring(entry):
        def call(p, g, *args, **kwargs):
            gs = g if isinstance(g, list) else [g]
            saved = [x.clone() for x in gs]
            entry(p, g, *args, **kwargs)
            for x, s in zip(gs, saved):
                x.copy_(s)
        return call
    for kind, entry in (("flat", tk.triton_sgd_step_flat_), ("list", tk.triton_sgd_step_list_)):
        case = _Case(torch.float32, kind, 1000.0, 1, False, HYPERS[0], seed=88)
        assert _compare(case.run(tk), case.reference(), case) is None
        assert _compare(case.run(tk, restoring(entry)), case.reference(), case), \
            f"{kind}: gradients not written back went unnoticed"


# ---- validation, ops, dispatch -----------------------------------------------------------------
def check_validation_errors(tk):
    """Bad grad_scale / found_inf / clip_coef raise ValueError naming the argument and what
    was given, before anything is written."""
    h = dict(HYPERS[0], first_step=False)
    p, g, b = torch.ones(8), torch.ones(8), torch.ones(8)
    hp, hg, hb = (torch.ones(8, dtype=torch.bfloat16) for _ in range(3))
    seg = torch.tensor([[0, 8]])
    flat, lst = tk.triton_sgd_step_flat_, tk.triton_sgd_step_list_
    r = _ti._raises
    for fn in (lambda **a: flat(p, g, b, seg, **h, **a), lambda **a: lst([p], [g], [b], **h, **a)):
        r(lambda: fn(grad_scale=torch.ones(2)), ValueError,
          "grad_scale must be a 1-element float32 tensor on cpu (the parameters' device), got "
          "torch.float32 cpu tensor of shape (2,)")
        r(lambda: fn(grad_scale=torch.ones(1, dtype=torch.float64)), ValueError,
          "grad_scale must be a 1-element float32 tensor")
        r(lambda: fn(found_inf=torch.zeros(1, dtype=torch.bfloat16)), ValueError,
          "found_inf must be a 1-element float32 tensor on cpu (the parameters' device), got "
          "torch.bfloat16")
        r(lambda: fn(found_inf=torch.zeros(1, device="meta")), ValueError,
          "found_inf must be a 1-element float32 tensor on cpu")
        r(lambda: fn(found_inf=0.0), ValueError, "found_inf must be a 1-element float32 "
          "tensor on cpu (the parameters' device), got 0.0")
        r(lambda: fn(clip_coef=torch.ones(1, dtype=torch.float64)), ValueError,
          "clip_coef must be a 1-element torch.float32 (the parameters' dtype) tensor on cpu")
        r(lambda: fn(clip_coef=torch.ones(0)), ValueError, "clip_coef must be a 1-element")
        r(lambda: fn(clip_coef=torch.ones(1).to_sparse()), ValueError,
          "clip_coef must be a 1-element")
    r(lambda: lst([hp], [hg], [hb], **h, clip_coef=torch.ones(1)), ValueError,
      "clip_coef must be a 1-element torch.bfloat16 (the parameters' dtype) tensor on cpu "
      "(the parameters' device), got torch.float32 cpu tensor of shape (1,)")
    # a bad one after good ones: nothing written
    r(lambda: lst([p], [g], [b], **h, grad_scale=torch.tensor([4.0]),
                  clip_coef=torch.ones(1, dtype=torch.float64)), ValueError, "clip_coef")
    assert bool((p == 1).all() and (g == 1).all() and (b == 1).all())
    assert bool((hp == 1).all() and (hg == 1).all() and (hb == 1).all())


def _tensors(args):
    """The tensors of op arguments, lists flattened."""
    return [t for x in args for t in (x if isinstance(x, list) else [x])]


def _op_args(kind, dtype, gen):
    if kind == "flat":
        p, g, b = (torch.randn(1163, generator=gen).to(dtype) for _ in range(3))
        return (p, g, b, torch.tensor([[0, 1], [5, 97], [102, 0], [120, 3], [130, 1030]]))
    return tuple([torch.randn(n, generator=gen).to(dtype) for n in SIZES] for _ in range(3))


def check_triton_amp_ops_opcheck(tk):
    """torch.library.opcheck on the amp ops (grads declared written) with every combination
    of the three tensors tried, and on the plain ops given found_inf (grads read only); the
    ops give the entry points' bits."""
    ops = torch.ops.momentum_cuda
    gen = torch.Generator().manual_seed(5)
    h = dict(lr=0.0123, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
             maximize=True, first_step=False)
    for dtype in (torch.float32, torch.bfloat16):
        amps = [dict(grad_scale=torch.tensor([1000.0]), found_inf=torch.zeros(1),
                     clip_coef=torch.tensor(0.3).to(dtype)),
                dict(grad_scale=torch.tensor([3.0]), found_inf=torch.ones(1)),
                dict(clip_coef=torch.tensor([0.7]).to(dtype))]
        for kind in ("flat", "list"):
            amp_op = getattr(ops, f"triton_sgd_step_amp_{kind}_").default
            plain_op = getattr(ops, f"triton_sgd_step_{kind}_").default
            entry = getattr(tk, f"triton_sgd_step_{kind}_")
            for amp in amps:
                args = _op_args(kind, dtype, gen)
                result = torch.library.opcheck(amp_op, args, dict(h, **amp))
                assert set(result.values()) == {"SUCCESS"}, (kind, dtype, amp, result)
                a1 = [[t.clone() for t in x] if isinstance(x, list) else x.clone()
                      for x in args]
                a2 = [[t.clone() for t in x] if isinstance(x, list) else x.clone()
                      for x in args]
                amp_op(*a1, **h, **amp)
                entry(*a2, **h, **amp)
                assert _ti._same(_tensors(a1[:3]), _tensors(a2[:3])), \
                    f"{kind} amp op != entry point"
            for found in (torch.zeros(1), torch.ones(1)):
                result = torch.library.opcheck(plain_op, _op_args(kind, dtype, gen),
                                               dict(h, found_inf=found))
                assert set(result.values()) == {"SUCCESS"}, (kind, dtype, result)


def check_step_ops_dispatch(tk):
    """step_ops("triton") routes a call by its keywords: grad_scale or clip_coef given -> the
    amp op (the gradients' version counters go up, as the C++ ops' do); found_inf alone or
    nothing -> the plain op (gradients keep their versions, as under torch's SGD). Parameters
    and buffers are bumped every time."""
    from momentum_cuda._ops import step_ops
    flat_op, list_op = step_ops("triton")
    h = dict(HYPERS[0], first_step=False)
    for kind in ("flat", "list"):
        for amp, grads_bumped in ((dict(), False), (dict(found_inf=torch.zeros(1)), False),
                                  (dict(found_inf=torch.ones(1)), False),
                                  (dict(grad_scale=torch.tensor([2.0])), True),
                                  (dict(clip_coef=torch.tensor(0.5)), True),
                                  (dict(grad_scale=torch.tensor([2.0]),
                                        found_inf=torch.ones(1),
                                        clip_coef=torch.tensor(0.5)), True)):
            p, g, b = (torch.randn(33) for _ in range(3))
            g0 = g.clone()
            v = [t._version for t in (p, g, b)]
            if kind == "flat":
                flat_op(p, g, b, torch.tensor([[0, 33]]), **h, **amp)
            else:
                list_op([p], [g], [b], **h, **amp)
            dv = [t._version - v0 for t, v0 in zip((p, g, b), v)]
            assert dv == [1, int(grads_bumped), 1], (kind, list(amp), dv)
            if "grad_scale" in amp or "clip_coef" in amp:
                assert not _eq(g, g0), (kind, list(amp), "gradient not written")
            else:
                assert _eq(g, g0), (kind, list(amp))
    assert [f.__name__ for f in (flat_op, list_op)] == ["triton_sgd_step_flat",
                                                        "triton_sgd_step_list"]


def check_compiled_calls_through_dispatch(tk):
    """torch.compile(fullgraph=True, backend="aot_eager") traces step_ops("triton")'s
    dispatch (no graph break) into the amp op or the plain op, with the eager call's bits:
    parameters, buffers and (written) gradients."""
    from momentum_cuda._ops import step_ops
    flat_op, list_op = step_ops("triton")
    h = dict(HYPERS[0], first_step=False)
    gen = torch.Generator().manual_seed(12)
    amps = (dict(grad_scale=torch.tensor([1000.0]), found_inf=torch.zeros(1),
                 clip_coef=torch.tensor(0.3)),
            dict(found_inf=torch.zeros(1)), dict(clip_coef=torch.tensor(0.3)))
    for kind in ("flat", "list"):
        for amp in amps:
            torch._dynamo.reset()
            if kind == "flat":
                args = [torch.randn(1163, generator=gen) for _ in range(3)]
                segs = torch.tensor([[0, 1], [5, 97], [130, 1030]])

                def fn(p, g, b, amp=amp):
                    flat_op(p, g, b, segs, **h, **amp)
            else:
                args = [[torch.randn(n, generator=gen) for n in (1, 97, 1030)] for _ in range(3)]

                def fn(ps, gs, bs, amp=amp):
                    list_op(ps, gs, bs, **h, **amp)
            copy = lambda a: [[t.clone() for t in x] if isinstance(x, list) else x.clone()  # noqa
                              for x in a]
            eager, compiled = copy(args), copy(args)
            fn(*eager)
            torch.compile(fn, fullgraph=True, backend="aot_eager")(*compiled)
            assert _ti._same(_tensors(eager), _tensors(compiled)), (kind, list(amp))
            assert not _ti._same(_tensors(eager), _tensors(args)), (kind, list(amp), "no-op")


# ---- the optimizer (momentum_cuda.SGD on the Triton backend) under GradScaler -------------------
def _proposed_optim_patch():
    """The optim.py change this feature asks for (see the report): the Triton backend claims
    _step_supports_amp_scaling and takes the clip in its kernels. Applied here only where
    optim.py does not do it yet; returns what was patched (empty: optim.py's own code ran)."""
    from momentum_cuda import optim
    cls = optim._FusedMomentum
    patched = []
    p = torch.nn.Parameter(torch.zeros(3))
    opt = optim.SGD([p], lr=0.1, backend="triton")
    if not opt._step_supports_amp_scaling:
        cls._step_supports_amp_scaling = property(lambda self: True)
        patched.append("_step_supports_amp_scaling")
    if '"triton"' in inspect.getsource(cls._clip_in_kernels):
        def _clip_in_kernels(self, clip, plans, amp):
            if not clip.fusable or (amp is not None and amp[0] is not None):
                return False
            return all(item[3] is None for _, _, loose in plans for item in loose)
        cls._clip_in_kernels = _clip_in_kernels
        patched.append("_clip_in_kernels")
    return patched


def _triton_twins(seed, flat, **kw):
    """(model, torch's twin, momentum_cuda.SGD(backend="triton", **kw) over the model,
    torch.optim.SGD(foreach=False) over the twin)."""
    from momentum_cuda import optim
    torch.manual_seed(seed)
    ours = torch.nn.Sequential(torch.nn.Linear(7, 97), torch.nn.Tanh(), torch.nn.Linear(97, 3))
    ref = __import__("copy").deepcopy(ours)
    h = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)
    return (ours, ref, optim.SGD(ours.parameters(), backend="triton", flat=flat, **kw, **h),
            torch.optim.SGD(ref.parameters(), foreach=False, **h))


def check_optimizer_gradscaler_and_clip_e2e(tk):
    """momentum_cuda.SGD(backend="triton") on CPU tensors (the interpreter) with
    GradScaler("cpu"): GradScaler hands it grad_scale and found_inf, and
    opt.clip_grad_norm_'s coefficient is applied in the kernel; bitwise against GradScaler +
    torch.optim.SGD(foreach=False) (+ torch's clip_grad_norm_) at every step: parameters,
    gradients, buffers and their presence, the scale, the norm; overflows on step 1 and two in
    a row; flat and per-tensor; every step after the first (an overflow, handled on the host)
    on the Triton kernels, none on torch's clip."""
    from momentum_cuda import _backends
    _backends._PREFERENCE["cpu"] = ("cpu", "triton")
    patched = _proposed_optim_patch()
    for flat in (True, False):
        for clip in (False, True):
            ours, ref, opt, topt = _triton_twins(21, flat)
            assert opt._step_supports_amp_scaling
            scalers = [torch.amp.GradScaler("cpu", init_scale=1000.0, growth_interval=2)
                       for _ in range(2)]
            gen = torch.Generator().manual_seed(22)
            for k in range(7):
                x = torch.randn(5, 7, generator=gen)
                norms = []
                for model, o, s in ((ours, opt, scalers[0]), (ref, topt, scalers[1])):
                    o.zero_grad()
                    loss = model(x).square().mean() * (float("inf") if k in (0, 3, 4) else 1.)
                    s.scale(loss).backward()
                    if clip:
                        s.unscale_(o)
                        norms.append(o.clip_grad_norm_(0.05) if o is opt else
                                     torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
                    s.step(o)
                    s.update()
                what = f"flat={flat} clip={clip} step {k + 1}"
                assert scalers[0].get_scale() == scalers[1].get_scale(), what
                if clip:
                    assert _eq(norms[0], norms[1]), f"{what}: norm"
                for i, (p, q) in enumerate(zip(ours.parameters(), ref.parameters())):
                    assert _eq(p.detach(), q.detach()), f"{what}: parameter {i}"
                    assert _eq(p.grad, q.grad), f"{what}: gradient {i}"
                    ob = opt.state[p].get("momentum_buffer") if p in opt.state else None
                    tb = topt.state[q].get("momentum_buffer") if q in topt.state else None
                    assert (ob is None) == (tb is None), f"{what}: buffer presence {i}"
                    if tb is not None:
                        assert _eq(ob, tb), f"{what}: buffer {i}"
                paths = {(e["backend"], e["path"]) for e in opt.last_step}
                if k > 0:  # step 1 overflows: GradScaler's work done on the host, no step
                    assert paths <= {("triton", "flat" if flat else "per-tensor")}, (what, paths)
                    assert paths, (what, opt.last_step)
    return {"patched": patched}


def check_optimizer_capturable_e2e(tk):
    """capturable=True on the Triton backend: the steps that make the momentum buffers (steps
    1 and 2 overflow) read nothing on the host (conftest.no_host_reads) and the kernels decide
    the first step from the flag (first_step_tensor), also while the host has not read it
    back (_Unsure.host_ready False: only state_dict() reads it, at the end); flat and
    per-tensor, with and without opt.clip_grad_norm_; parameters and gradients bitwise against
    GradScaler + torch.optim.SGD(foreach=False) every step, the state at the end."""
    from conftest import no_host_reads
    from momentum_cuda import _backends, optim
    _backends._PREFERENCE["cpu"] = ("cpu", "triton")
    optim._Unsure.host_ready = False
    try:
        for flat in (True, False):
            for clip in (False, True):
                ours, ref, opt, topt = _triton_twins(23, flat, capturable=True)
                scalers = [torch.amp.GradScaler("cpu", init_scale=1000.0, growth_interval=2)
                           for _ in range(2)]
                gen = torch.Generator().manual_seed(24)
                for k in range(6):
                    x = torch.randn(5, 7, generator=gen)
                    for model, o, s in ((ours, opt, scalers[0]), (ref, topt, scalers[1])):
                        o.zero_grad()
                        loss = model(x).square().mean() * (float("inf") if k in (0, 1, 4)
                                                           else 1.)
                        s.scale(loss).backward()
                        if clip:
                            s.unscale_(o)
                            if o is opt:
                                o.clip_grad_norm_(0.05)
                            else:
                                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                        if o is opt:  # (the flat op reads its CPU segments: no sync)
                            with no_host_reads(int64_tolist=True):
                                s.step(o)
                        else:
                            s.step(o)
                        s.update()
                    what = f"flat={flat} clip={clip} step {k + 1}"
                    for i, (p, q) in enumerate(zip(ours.parameters(), ref.parameters())):
                        assert _eq(p.detach(), q.detach()), f"{what}: parameter {i}"
                        assert _eq(p.grad, q.grad), f"{what}: gradient {i}"
                    assert {e["backend"] for e in opt.last_step} == {"triton"}, what
                    if k == 2:
                        assert opt._unsure, f"{what}: no flag left undecided"
                sd, tsd = opt.state_dict()["state"], topt.state_dict()["state"]
                assert sd.keys() == tsd.keys(), f"flat={flat} clip={clip}: state keys"
                for i, st in tsd.items():
                    assert _eq(sd[i]["momentum_buffer"], st["momentum_buffer"]), \
                        f"flat={flat} clip={clip}: buffer {i}"
    finally:
        optim._Unsure.host_ready = True


def check_planted_capturable_flag_fails(tk):
    """The check above fails with the flag dropped on the host (FIRST_TENSOR off)."""
    orig, bad = _planted_flags(tk, "FIRST_TENSOR")
    tk._flags = bad
    try:
        check_optimizer_capturable_e2e(tk)
    except AssertionError:
        return
    finally:
        tk._flags = orig
    raise AssertionError("planted bug (FIRST_TENSOR off) went unnoticed by the optimizer check")


def check_planted_e2e_flag_bugs_fail(tk):
    """The optimizer comparison above fails with the clip, the unscale or the skip dropped from
    the kernels (its tensors passed, its flag forced off)."""
    for flag in ("CLIP", "AMP_SCALE", "AMP_SKIP"):
        orig, bad = _planted_flags(tk, flag)
        tk._flags = bad
        try:
            check_optimizer_gradscaler_and_clip_e2e(tk)
        except AssertionError:
            continue
        finally:
            tk._flags = orig
        raise AssertionError(f"planted bug ({flag} off) went unnoticed by the optimizer check")


# ---- hyper-parameters held in tensors (lr_tensor, momentum_tensor, ...) ------------------------
# Per step (lr, momentum, dampening, weight_decay), as a scheduler sets them in place: zeros in
# momentum (the buffers stay as they are) and weight_decay (its op is skipped), dampenings whose
# 1 - d rounds differently in fp32 and in double.
_HYPER_SCHEDULE = ((0.1, 0.9, 0.1, 0.01), (0.05, 0.0, 0.35, 0.0), (0.07, 0.8, 0.2, 0.0),
                   (0.03, 0.0, 0.0, 0.02), (0.11, 0.7, 0.29, 0.03))


def _hyper_ref_step(p, g, buf, values, hdtype, nesterov, first_step):
    """The CUDA contract (sgd_kernel.cuh's device_step) for hyper-parameters held in
    `hdtype` tensors, in plain torch: each alpha the tensor's value rounded once to opmath;
    1 - dampening computed in hdtype; the factor of buf.mul_(momentum) rounded to the storage
    dtype first (torch's CUDA mul_ loads a 0-dim CUDA tensor as the common dtype); a zero
    momentum or weight_decay skips its ops."""
    dt = p.dtype
    lr, m, d, wd = (torch.tensor(v, dtype=hdtype) for v in values)
    r = (lambda t: t) if dt in (torch.float32, torch.float64) else (lambda t: t.to(dt).float())
    op = torch.float64 if dt == torch.float64 else torch.float32
    P, G = p.to(op), g.to(op)
    if float(wd) != 0:
        G = r(G.add(P, alpha=float(wd)))
    if float(m) != 0:
        m_mul = m.to(op).to(dt).to(op)
        if first_step:
            B = G.clone()
        else:
            B = r(r(buf.to(op) * m_mul).add(G, alpha=float(1 - d)))
        G = r(G.add(B, alpha=float(m))) if nesterov else B
        buf.copy_(B.to(dt))
    p.copy_(r(P.add(G, alpha=-float(lr))).to(dt))


def check_hyper_tensors_read_by_the_kernels(tk):
    """lr, momentum, dampening and weight_decay as fp32 / fp64 tensors (lr_tensor, ...): the
    flat and the list kernels give _hyper_ref_step's bits for every dtype, nesterov or not,
    with the floats passed beside them set to garbage (only the tensors can give the bits)."""
    n = 0
    for dtype in DTYPES:
        for hdtype in (torch.float32, torch.float64):
            for nesterov in (False, True):
                for kind in ("flat", "list"):
                    ps, grads = _ti._make(dtype, 71 + n, SIZES)
                    n += 1
                    ref = [p.clone() for p in ps]
                    rbufs = [torch.zeros_like(p) for p in ps]
                    sizes = [p.numel() for p in ps]
                    total = sum(sizes) + len(sizes)
                    fp = torch.zeros(total, dtype=dtype)
                    fg, fb = torch.zeros_like(fp), torch.zeros_like(fp)
                    offs = [sum(sizes[:i]) + i for i in range(len(sizes))]  # 1-element gaps
                    segs = torch.tensor([[o, c] for o, c in zip(offs, sizes)], dtype=torch.int64)
                    views = lambda t: [t[o:o + c] for o, c in zip(offs, sizes)]  # noqa: E731
                    for v, p in zip(views(fp), ps):
                        v.copy_(p)
                    hyper = [torch.zeros((), dtype=hdtype) for _ in range(4)]
                    for step in range(len(_HYPER_SCHEDULE)):
                        values = _HYPER_SCHEDULE[step]
                        for t, v in zip(hyper, values):
                            t.fill_(v)
                        first = step == 0
                        gs = grads[step % len(grads)]
                        for v, g in zip(views(fg), gs):
                            v.copy_(g)
                        for p, g, b in zip(ref, gs, rbufs):
                            _hyper_ref_step(p, g, b, values, hdtype, nesterov, first)
                        kw = dict(lr=123.0, momentum=0.0, dampening=0.375, weight_decay=7.0,
                                  nesterov=nesterov, maximize=False, first_step=first,
                                  lr_tensor=hyper[0], momentum_tensor=hyper[1],
                                  dampening_tensor=hyper[2], weight_decay_tensor=hyper[3])
                        if kind == "flat":
                            tk.triton_sgd_step_flat_(fp, fg, fb, segs, **kw)
                        else:
                            tk.triton_sgd_step_list_(views(fp), views(fg), views(fb), **kw)
                        for i, (a, b) in enumerate(zip(views(fp), ref)):
                            assert _eq(a, b), (f"{kind} {dtype} h={hdtype} nesterov={nesterov} "
                                               f"step {step + 1}: param {i}")
                        for i, (a, b) in enumerate(zip(views(fb), rbufs)):
                            assert _eq(a, b), (f"{kind} {dtype} h={hdtype} nesterov={nesterov} "
                                               f"step {step + 1}: buffer {i}")
                    assert all(fp[o - 1] == 0 for o in offs[1:]), "padding written"
    return f"{n} cases"


def check_planted_hyper_tensor_bugs_fail(tk):
    """The check above fails when the kernels ignore a zero momentum tensor or the storage
    rounding of its factor (the flags forced: the kernel then takes the floats' paths)."""
    for flag, what in (("M_TENSOR", "momentum tensor ignored"),
                       ("D_TENSOR", "dampening tensor ignored"),
                       ("WD_TENSOR", "weight_decay tensor ignored")):
        orig, bad = _planted_flags(tk, flag)
        tk._flags = bad
        try:
            check_hyper_tensors_read_by_the_kernels(tk)
            caught = False
        except AssertionError:
            caught = True
        finally:
            tk._flags = orig
        assert caught, f"planted bug ({what}) went unnoticed"


def _first_tensor_mismatches(tk, entries=None):
    """first_step_tensor (with first_step=True) against the constexpr paths (first_step equal
    to its value), every dtype, flat and list, with and without GradScaler's tensors and a
    clip coefficient, momentum on and nesterov: parameters, buffers and gradients bitwise.
    The buffers hold fresh values (a first step must not read them). entries: the flat and the
    list entry point (default: tk's)."""
    flat, lst = entries or (tk.triton_sgd_step_flat_, tk.triton_sgd_step_list_)
    gen = torch.Generator().manual_seed(91)
    out = []
    for dtype in DTYPES:
        for kind, fn in (("flat", flat), ("list", lst)):
            for h in HYPERS[:2]:
                for amp in ({}, dict(grad_scale=torch.tensor([1000.0]), found_inf=torch.zeros(1)),
                            dict(found_inf=torch.ones(1)),
                            dict(clip_coef=torch.tensor([0.3]).to(dtype))):
                    for value in (True, False):
                        args = _op_args(kind, dtype, gen)
                        want = [[t.clone() for t in x] if isinstance(x, list) else x.clone()
                                for x in args]
                        (flat if kind == "flat" else lst)(*want, **h, **amp, first_step=value)
                        fn(*args, **h, **amp, first_step=True,
                           first_step_tensor=torch.tensor(value))
                        if not _ti._same(_tensors(args[:3]), _tensors(want[:3])):
                            out.append(f"{dtype} {kind} {h} {sorted(amp)} flag={value}")
    return out


def check_first_step_tensor(tk):
    """first_step_tensor decides the first step in the kernels (capturable=True's device
    decision, optim._Unsure), with the bits of the constexpr paths; a flag dropped on the host
    (FIRST_TENSOR off: every call a first step) fails; bad arguments raise before anything is
    written; opcheck passes on the four ops given it."""
    bad = _first_tensor_mismatches(tk)
    assert not bad, f"{len(bad)} cases differ; first: {bad[:3]}"
    orig, planted = _planted_flags(tk, "FIRST_TENSOR")
    tk._flags = planted
    try:
        caught = _first_tensor_mismatches(tk)
    finally:
        tk._flags = orig
    assert caught and all("flag=False" in c for c in caught), caught[:3]
    gen = torch.Generator().manual_seed(92)
    h = dict(HYPERS[0], first_step=True)
    for kwargs, frag in ((dict(first_step_tensor=torch.tensor(1.0)),
                          "first_step_tensor must be a 1-element bool"),
                         (dict(first_step_tensor=torch.tensor([True, False])),
                          "first_step_tensor must be a 1-element bool"),
                         (dict(first_step_tensor=torch.tensor(True), first_step=False),
                          "first_step_tensor is given with first_step=False")):
        for kind in ("flat", "list"):
            args = _op_args(kind, torch.float32, gen)
            before = [t.clone() for t in _tensors(args[:3])]
            try:
                getattr(tk, f"triton_sgd_step_{kind}_")(*args, **dict(h, **kwargs))
            except ValueError as e:
                assert frag in str(e), (frag, str(e))
            else:
                raise AssertionError(f"{kind}: {kwargs} did not raise")
            assert _ti._same(_tensors(args[:3]), before), f"{kind}: written before raising"
    ops = torch.ops.momentum_cuda
    for kind in ("flat", "list"):
        for name, amp in ((f"triton_sgd_step_{kind}_", dict(found_inf=torch.zeros(1))),
                          (f"triton_sgd_step_amp_{kind}_",
                           dict(grad_scale=torch.tensor([3.0]), found_inf=torch.ones(1)))):
            for value in (True, False):
                result = torch.library.opcheck(
                    getattr(ops, name).default, _op_args(kind, torch.bfloat16, gen),
                    dict(h, **amp, first_step_tensor=torch.tensor(value)))
                assert set(result.values()) == {"SUCCESS"}, (name, value, result)
    return f"plant caught in {len(caught)} cases"


# ---- the modes' ops (master, fp16 master, momentum_dtype) given found_inf ----------------------
_MODE_OPS = ("master", "fp16-master", "bf16-momentum", "int8-momentum")


def _mode_calls(tk):
    """{mode: (Triton op, C++ CPU op)} of the modes that take found_inf."""
    ops = torch.ops.momentum_cuda
    return {"master": (ops.triton_sgd_step_master_list_.default,
                       ops.sgd_step_master_list_.default),
            "fp16-master": (ops.triton_sgd_step_fp16_master_list_.default,
                            ops.sgd_step_fp16_master_list_.default),
            "bf16-momentum": (ops.triton_sgd_step_qmom_list_.default,
                              ops.sgd_step_qmom_list_.default),
            "int8-momentum": (ops.triton_sgd_step_qmom_list_.default,
                              ops.sgd_step_qmom_list_.default)}


def _mode_mismatches(tk):
    """Each mode's Triton op against its C++ CPU op (test_mode_amp holds that one to the call
    without found_inf), three steps, the second with found_inf = 1 or NaN (skipped: nothing may
    change), the others with found_inf = 0: the mismatches found."""
    from test_mode_amp import HYPER, _bits, _clone, _tensors
    bad = []
    for mode, (triton, cpu) in _mode_calls(tk).items():
        for first in (False, True):
            ours = _tensors(mode, 31)
            ref = _clone(ours)
            for step, value in enumerate((0.0, float("nan") if first else 1.0, 0.0)):
                fresh = _tensors(mode, 40 + step)[1]
                for lists in (ours, ref):
                    for g, n in zip(lists[1], fresh):
                        g.copy_(n)
                before = _clone(ours)
                f = first and step == 0
                triton(*ours, *HYPER, f, found_inf=torch.tensor(value))
                cpu(*ref, *HYPER, f, found_inf=torch.tensor(value))
                for k, (a_ts, b_ts, c_ts) in enumerate(zip(ours, ref, before)):
                    for i, (a, b, c) in enumerate(zip(a_ts, b_ts, c_ts)):
                        if not torch.equal(_bits(a), _bits(b)):
                            bad.append(f"{mode} first={first} step {step}: argument {k}[{i}]")
                        if value != 0 and not torch.equal(_bits(a), _bits(c)):
                            bad.append(f"{mode} first={first} step {step}: argument {k}[{i}] "
                                       "written by a skipped step")
    return bad


def check_mode_ops_found_inf(tk):
    """The master, fp16 master and momentum_dtype (bf16, int8) Triton ops given found_inf: bits
    of the C++ CPU op, and nothing written where it skips; opcheck with found_inf; a bad
    found_inf refused, naming it, before anything is written."""
    from test_mode_amp import HYPER, _clone, _tensors
    bad = _mode_mismatches(tk)
    assert not bad, bad[:10]
    for mode, (triton, _) in _mode_calls(tk).items():
        for value in (0.0, 1.0):
            result = torch.library.opcheck(triton, (*_tensors(mode, 50), *HYPER, False),
                                           {"found_inf": torch.tensor(value)})
            assert all(v == "SUCCESS" for v in result.values()), (mode, result)
        lists = _tensors(mode, 51)
        before = _clone(lists)
        try:
            triton(*lists, *HYPER, False, found_inf=torch.zeros((), dtype=torch.float64))
        except (RuntimeError, ValueError) as e:
            assert "found_inf must be a 1-element float32 tensor" in str(e), (mode, str(e))
        else:
            raise AssertionError(f"{mode}: a float64 found_inf was taken")
        assert not _mode_mismatches_of(lists, before), f"{mode}: a refused call wrote"


def _mode_mismatches_of(lists, before):
    from test_mode_amp import _bits
    return [(k, i) for k, (a_ts, b_ts) in enumerate(zip(lists, before))
            for i, (a, b) in enumerate(zip(a_ts, b_ts)) if not torch.equal(_bits(a), _bits(b))]


def check_planted_mode_skip_dropped_fails(tk):
    """The comparison above fails with found_inf dropped on the host (the kernels' AMP_SKIP
    off)."""
    orig = tk._mode_tensors
    tk._mode_tensors = lambda found_inf, *rest: orig(None, *rest)
    try:
        bad = _mode_mismatches(tk)
    finally:
        tk._mode_tensors = orig
    modes = {b.split()[0] for b in bad}
    assert modes == set(_MODE_OPS), f"planted bug caught only for {sorted(modes)}"
    return f"plant caught: {len(bad)} mismatches"


def check_optimizer_modes_gradscaler_e2e(tk):
    """momentum_cuda.SGD(backend="triton") with master_weights (bf16, fp16) and momentum_dtype
    (bf16, int8) under GradScaler("cpu"): from the third step on no host read (the kept calls
    replay: torch's unscale, found_inf to the Triton kernels); overflows on steps 4 and 5; the
    bits of the same optimizer on the C++ CPU backend planning every step (found_inf read on
    the host): parameters, gradients, the whole state (test_mode_amp.replay_under_gradscaler)."""
    from momentum_cuda import _backends
    from test_mode_amp import MODE_CONFIGS, replay_under_gradscaler
    _backends._PREFERENCE["cpu"] = ("cpu", "triton")
    for mode in MODE_CONFIGS:
        replay_under_gradscaler(mode, "triton", twin_backend="cpu")


def check_planted_optimizer_mode_skip_fails(tk):
    """The optimizer check above fails with found_inf dropped on the host."""
    orig = tk._mode_tensors
    tk._mode_tensors = lambda found_inf, *rest: orig(None, *rest)
    try:
        check_optimizer_modes_gradscaler_e2e(tk)
    except AssertionError:
        return
    finally:
        tk._mode_tensors = orig
    raise AssertionError("planted bug (found_inf dropped) went unnoticed by the optimizer check")


def check_mode_ops_hyper_tensors(tk):
    """The Triton ops of the modes (master, fp16 master, bf16 and int8 momentum, stochastic
    rounding) given lr, momentum, dampening and weight_decay as tensors (zeros among them):
    the bits of the C++ CPU op given their values as floats, three steps each
    (test_mode_hyper.op_mismatches); opcheck with the tensors."""
    from test_mode_hyper import NAMES, lists_of, op_mismatches
    ops = torch.ops.momentum_cuda
    triton = {"master": ops.triton_sgd_step_master_list_.default,
              "fp16-master": ops.triton_sgd_step_fp16_master_list_.default,
              "bf16-momentum": ops.triton_sgd_step_qmom_list_.default,
              "int8-momentum": ops.triton_sgd_step_qmom_list_.default,
              "sr": ops.triton_sgd_step_sr_list_.default}
    bad = op_mismatches(lambda mode: triton[mode])
    assert not bad, bad[:10]
    for mode, op in triton.items():
        kw = {f"{n}_tensor": torch.tensor(v, dtype=torch.float64 if n == "momentum" else None)
              for n, v in zip(NAMES, (0.05, 0.9, 0.1, 0.0))}
        result = torch.library.opcheck(op, (*lists_of(mode, 52), 0.0, 0.0, 0.0, 0.0, False,
                                            False, False), kw)
        assert all(v == "SUCCESS" for v in result.values()), (mode, result)


def check_planted_mode_hyper_tensors_dropped_fails(tk):
    """The comparison above fails in every mode with the tensors dropped on the host (the
    kernels then step with the floats, 0.0)."""
    from test_mode_hyper import OPS, op_mismatches
    orig = tk._mode_tensors
    tk._mode_tensors = lambda *args: (orig(*args)[0], tk._NO_HYPER)
    try:
        bad = op_mismatches(lambda mode: getattr(
            torch.ops.momentum_cuda, "triton_" + OPS[mode].__name__.split(".")[0]).default)
    finally:
        tk._mode_tensors = orig
    modes = {b.split()[0] for b in bad}
    assert modes == set(OPS), f"planted bug caught only for {sorted(modes)}"


def check_optimizer_modes_hyper_tensors_e2e(tk):
    """SGD(backend="triton") in each mode under GradScaler("cpu") with lr, momentum, dampening
    and weight_decay in tensors changed every step: the bits of the C++ CPU backend given their
    values as floats, no host read after the step that made the state
    (test_mode_amp.replay_under_gradscaler, tensors=True)."""
    from momentum_cuda import _backends
    from test_mode_amp import MODE_CONFIGS, replay_under_gradscaler
    _backends._PREFERENCE["cpu"] = ("cpu", "triton")
    for mode in MODE_CONFIGS:
        replay_under_gradscaler(mode, "triton", twin_backend="cpu", tensors=True)


CHECKS = [name for name in list(globals()) if name.startswith("check_")]


def _child_main() -> None:
    global _ti, _tk
    assert os.environ.get("TRITON_INTERPRET") == "1"
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    import test_triton_interp
    _ti = test_triton_interp
    from momentum_cuda import triton_kernels as tk
    _tk = tk
    assert tk.interpreting(), "kernels are not interpreted"
    torch.set_num_threads(1)
    only = os.environ.get("MC_TRITON_AMP_CHECKS")
    out = {}
    for name in CHECKS:
        if only and name not in only.split(","):
            continue
        t0 = time.perf_counter()
        info = None
        try:
            info = globals()[name](tk)
            err = None
        except Exception:  # reported to the parent
            err = traceback.format_exc()
        out[name] = {"error": err, "seconds": round(time.perf_counter() - t0, 2), "info": info}
    print("@@RESULT@@" + json.dumps(out))


# ----------------------------------------------------------------------------------------------
# Parent side: pytest.
# ----------------------------------------------------------------------------------------------
pytestmark = pytest.mark.skipif(not (have("triton") and have("numpy")),
                                reason="triton and numpy are needed for the interpreter")


@pytest.fixture(scope="module")
def amp_results():
    return interpreter_child("test_triton_amp", timeout=600)


@pytest.mark.parametrize("name", CHECKS)
def test_interpreter(amp_results, name):
    res = amp_results[name]
    print(f"{name}: {res['seconds']} s" + (f", {res['info']}" if res["info"] else ""))
    assert res["error"] is None, res["error"]


if __name__ == "__main__":
    _child_main()
