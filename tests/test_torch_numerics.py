"""Pins the facts about torch's CPU arithmetic that momentum_cuda's bitwise contract rests on, so a
torch upgrade (or another dispatch) that changes one fails here, loudly, and not as a vague
mismatch somewhere else. Each fact is checked bit for bit (torch.equal) against an exact model,
and each test also checks that the model is distinguishable from the nearest wrong one.

Facts (torch 2.13, CPU capability AVX2 or AVX512, the ones a CPU with AVX2 dispatches to):
  F1 fp32/fp64: x.add(y, alpha=a) == fma(y, a', x), one rounding; a' = a rounded to the dtype.
  F2 bf16/fp16: x.add(y, alpha=a) rounds a to bf16/fp16 first (a'). In the vectorized body it is
     round(x + a'*y) (the product of two bf16/fp16 values is exact in fp32, so one fp32 rounding,
     then the narrowing); in the scalar tail, the last (len % 32) elements of each chunk that
     at::parallel_for gives a thread, it is round(x + round(a'*y)). A tensor of n elements is
     one chunk if n <= 32768 or torch runs one thread, else min(threads, ceil(n/32768)) chunks
     of ceil(n/chunks) elements.
  F3 x.mul(m) == round(x * float32(m)) for fp32/bf16/fp16 (fp64: x * m): the scalar is rounded to
     fp32, never to bf16/fp16 (torch's foreach path does round it to bf16: not the reference).
  F4 torch.optim.SGD's for-loop (_single_tensor_sgd) is the op sequence that sgd_math.h encodes.

With ATEN_CPU_CAPABILITY=default (what torch runs on a CPU without AVX2) F1 and F2 do NOT hold:
add is mul-then-add (two roundings) and bf16/fp16 use the tail formula everywhere. Those facts
are pinned too (in a child process), and the kernel is checked against torch there.

The exact fma oracle for fp32 (no math.fma before Python 3.13, numpy has no fma): the product
of two fp32 values has at most 48 significant bits, so it is exact in fp64. The fp64 sum
s = fl64(p + x) is rounded; rounding it again to fp32 can double-round (the classic
1 + 2**-24 - tiny case). TwoSum gives the exact error e (s + e == p + x exactly, Knuth); from
(s, e) we form round-to-odd: if e != 0 and s's last significand bit is even, step s one ulp
toward e. Rounding a round-to-odd value of precision 53 to precision 24 (53 >= 24 + 2) equals
rounding the exact value (Boldo & Melquiond, "Emulation of FMA and correctly rounded sums:
proved algorithms using rounding to odd", IEEE TC 2008). The oracle itself is checked against
exact rational arithmetic (fractions.Fraction) here, including crafted double-rounding cases.
fp64 uses Fraction directly (exact; float(Fraction) is correctly rounded).
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from momentum_cuda import _C
from conftest import step_one

GRAIN = 32768  # at::parallel_for grain of TensorIterator (at::internal::GRAIN_SIZE)
VEC_BLOCK = 32  # elements per iteration of the vectorized loop for bf16/fp16 (2 vectors)
NARROW = (torch.bfloat16, torch.float16)
ALPHAS = (-0.1, 0.9, 1 - 0.9, -1e-3, 0.0123, -2.5)
SIZES = (37, 1000, 32768, 32769, 70001, 100003)


def _capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


needs_vector_capability = pytest.mark.skipif(
    _capability() == "DEFAULT", reason="torch runs its DEFAULT kernels here (pinned separately)")


def _randn(n, gen, dtype, scale=1.0):
    t = torch.randn(n, generator=gen, dtype=torch.float64) * scale
    t = torch.where(t == 0, torch.ones_like(t), t)  # never zero
    return t.to(dtype)


def _f32(a: float) -> float:
    return float(np.float32(a))


# ---- exact oracles ---------------------------------------------------------------------------
def fma32(y: torch.Tensor, a: float, x: torch.Tensor) -> torch.Tensor:
    """fma(y, a, x) rounded once to fp32; y, x fp32 tensors, a a Python float exact in fp32."""
    assert y.dtype == x.dtype == torch.float32 and _f32(a) == a
    p = y.double() * a  # exact: 24 + 24 significant bits <= 53 (no over/underflow here)
    xd = x.double()
    s = p + xd
    bb = s - p  # TwoSum (Knuth): e is the exact rounding error of s
    e = (p - (s - bb)) + (xd - bb)
    bits = s.view(torch.int64)
    step = torch.where((e > 0) == (s > 0), 1, -1)  # one ulp toward the exact value
    bits = torch.where((e != 0) & ((bits & 1) == 0), bits + step, bits)  # round to odd
    return bits.view(torch.float64).to(torch.float32)


def _frac_to_f32(fr: Fraction) -> np.float32:
    """Exact rational -> nearest fp32, ties to even (by comparing the neighbours exactly)."""
    c = np.float32(float(fr))
    best = None
    for cand in (np.nextafter(c, np.float32(-np.inf)), c, np.nextafter(c, np.float32(np.inf))):
        key = (abs(Fraction(float(cand)) - fr), int(np.array(cand).view(np.uint32)) & 1)
        if best is None or key < best[0]:
            best = (key, cand)
    return best[1]


def fma32_fraction(y, a, x) -> torch.Tensor:
    fa = Fraction(a)
    return torch.tensor([float(_frac_to_f32(Fraction(yi) * fa + Fraction(xi)))
                         for yi, xi in zip(y.tolist(), x.tolist())], dtype=torch.float32)


def fma64_fraction(y, a, x) -> torch.Tensor:
    fa = Fraction(a)
    return torch.tensor([float(Fraction(yi) * fa + Fraction(xi))
                         for yi, xi in zip(y.tolist(), x.tolist())], dtype=torch.float64)


def hard_fp32_cases():
    """x with an odd last bit in [1, 2) (ulp 2**-23) and y*a = half an ulp * (1 - 2**-46): the
    exact sum lies just below the midpoint, so the correct result is x; rounding the fp64 sum
    (which IS the midpoint) to fp32 gives x + ulp (ties to even). Signs mirrored too."""
    m = torch.arange(1, 2**12, 2, dtype=torch.int64)  # odd significands
    x = (1 + m.double() * 2.0**-23).to(torch.float32)
    y = torch.full_like(x, 1 + 2.0**-23)
    a = (1 - 2.0**-23) * 2.0**-24
    x = torch.cat([x, -x])
    y = torch.cat([y, -y])
    return y, a, x


# ---- chunking model of torch's bf16/fp16 add -------------------------------------------------
def torch_tail_mask(n: int, threads: int) -> torch.Tensor:
    """True where torch's bf16/fp16 add takes its scalar tail (see the module docstring)."""
    chunks = 1 if (n <= GRAIN or threads <= 1) else min(threads, -(-n // GRAIN))
    cs = -(-n // chunks) if n else 1
    mask = torch.zeros(n, dtype=torch.bool)
    for c0 in range(0, n, cs):
        c1 = min(n, c0 + cs)
        mask[c1 - (c1 - c0) % VEC_BLOCK:c1] = True
    return mask


def narrow_add_formulas(x, y, alpha):
    """(body, tail) results of x.add(y, alpha) for bf16/fp16 x, y."""
    d = x.dtype
    a = float(torch.tensor(_f32(alpha), dtype=torch.float32).to(d))  # double -> float -> d
    xf, yf = x.float(), y.float()
    body = (xf + yf * a).to(d)  # yf * a is exact in fp32; one fp32 rounding, then narrowing
    tail = (xf + (yf * a).to(d).float()).to(d)
    return body, tail


# ---- the oracle itself -------------------------------------------------------------------------
def test_fma32_oracle_matches_exact_rationals():
    gen = torch.Generator().manual_seed(1)
    n = 1500
    x = _randn(n, gen, torch.float32)
    y = _randn(n, gen, torch.float32, scale=3.0)
    for a in (_f32(-0.1), _f32(0.9), _f32(1e-3)):
        assert torch.equal(fma32(y, a, x), fma32_fraction(y, a, x))
    y, a, x = hard_fp32_cases()
    exact = fma32_fraction(y, a, x)
    assert torch.equal(exact, x)  # just below the midpoint: rounds back to x
    assert torch.equal(fma32(y, a, x), exact)
    naive = (y.double() * a + x.double()).to(torch.float32)  # double rounding
    assert not torch.equal(naive, exact), "the crafted cases no longer double-round"
    assert (naive != exact).all()


# ---- F1: fp32 / fp64 add with alpha is one fma -------------------------------------------------
@needs_vector_capability
@pytest.mark.parametrize("n", [1000, 70001])
def test_fp32_add_alpha_is_fma(n):
    gen = torch.Generator().manual_seed(n)
    x = _randn(n, gen, torch.float32)
    y = _randn(n, gen, torch.float32, scale=4.0)
    differs = 0
    for alpha in ALPHAS:
        a = _f32(alpha)  # the Python double rounded ONCE to fp32
        want = fma32(y, a, x)
        assert torch.equal(x.add(y, alpha=alpha), want), f"alpha={alpha}"
        assert torch.equal(x.clone().add_(y, alpha=alpha), want), f"add_ alpha={alpha}"
        assert torch.equal(torch.add(x, y, alpha=alpha), want)
        differs += int((want != (x + y * a)).sum())  # mul then add: two roundings
    assert differs > 0, "fma and mul+add agree everywhere: the test cannot tell them apart"


@needs_vector_capability
def test_fp32_add_alpha_double_rounding_cases():
    y, a, x = hard_fp32_cases()
    assert torch.equal(x.add(y, alpha=a), x)  # a true fma, not fp64 arithmetic rounded to fp32


@needs_vector_capability
def test_fp32_alpha_is_rounded_once_from_the_double():
    """float(1 - 0.9) rounded to fp32 is not 1.0f - 0.9f: torch uses the former."""
    assert _f32(1 - 0.9) != np.float32(1.0) - np.float32(0.9)
    gen = torch.Generator().manual_seed(3)
    x = _randn(4000, gen, torch.float32)
    y = _randn(4000, gen, torch.float32)
    got = x.add(y, alpha=1 - 0.9)
    assert torch.equal(got, fma32(y, _f32(1 - 0.9), x))
    assert not torch.equal(got, fma32(y, float(np.float32(1.0) - np.float32(0.9)), x))


@needs_vector_capability
@pytest.mark.parametrize("n", [1000, 40001])
def test_fp64_add_alpha_is_fma(n):
    gen = torch.Generator().manual_seed(n + 7)
    x = _randn(n, gen, torch.float64)
    y = _randn(n, gen, torch.float64, scale=4.0)
    idx = torch.randperm(n, generator=gen)[:800]  # exact rationals are slow: a sample
    differs = 0
    for alpha in (-0.1, 0.9, 1 - 0.9):
        got = x.add(y, alpha=alpha)
        want = fma64_fraction(y[idx], alpha, x[idx])
        assert torch.equal(got[idx], want), f"alpha={alpha}"
        differs += int((want != (x[idx] + y[idx] * alpha)).sum())
    assert differs > 0


# ---- F2: bf16 / fp16 add: body and tail ----------------------------------------------------------
def _check_narrow_add(dtype, n, threads):
    gen = torch.Generator().manual_seed(n * 3 + threads)
    x = _randn(n, gen, dtype)
    y = _randn(n, gen, dtype)
    mask = torch_tail_mask(n, threads)
    seen_tail = seen_body = 0
    for alpha in ALPHAS[:4]:
        assert torch.get_num_threads() == threads
        got = x.add(y, alpha=alpha)
        body, tail = narrow_add_formulas(x, y, alpha)
        want = torch.where(mask, tail, body)
        if not torch.equal(got, want):
            bad = torch.nonzero(got != want).flatten()
            pytest.fail(f"{dtype} n={n} threads={threads} alpha={alpha}: {bad.numel()} elements "
                        f"differ from the body/tail model, first at {bad[:8].tolist()} "
                        f"(tail there: {mask[bad[:8]].tolist()})")
        assert torch.equal(x.clone().add_(y, alpha=alpha), want)
        seen_tail += int((body != tail)[mask].sum())
        seen_body += int((body != tail)[~mask].sum())
    return seen_body, seen_tail, int(mask.sum())


@needs_vector_capability
@pytest.mark.parametrize("dtype", NARROW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("threads", ["torch", 1])
def test_narrow_add_body_and_tail(dtype, threads, num_threads):
    """Sizes below and above 32768, with torch's own thread count and with one thread."""
    t = torch.get_num_threads() if threads == "torch" else 1
    num_threads(t)
    seen_body = seen_tail = tails = 0
    for n in SIZES:
        b, tl, m = _check_narrow_add(dtype, n, t)
        seen_body, seen_tail, tails = seen_body + b, seen_tail + tl, tails + m
    # the model is not vacuous: the tail formula is wrong in the body and vice versa
    assert seen_body > 0
    assert tails > 0 and seen_tail > 0


@needs_vector_capability
@pytest.mark.parametrize("dtype", NARROW, ids=["bf16", "fp16"])
def test_narrow_add_depends_on_thread_count(dtype, num_threads):
    """The same add gives different bits with 1 and 2 threads (n > 32768): the chunk rule is
    real, so the kernel must follow torch's thread count."""
    n = 70001
    gen = torch.Generator().manual_seed(11)
    x, y = _randn(n, gen, dtype), _randn(n, gen, dtype)
    out = {}
    for t in (1, 2):
        num_threads(t)
        out[t] = x.add(y, alpha=0.9)
        _check_narrow_add(dtype, n, t)
    assert not torch.equal(out[1], out[2])


@needs_vector_capability
def test_tail_mask_model():
    assert not torch_tail_mask(32768, 2).any()  # one chunk, 1024 full blocks
    assert torch_tail_mask(37, 2).nonzero().flatten().tolist() == [32, 33, 34, 35, 36]
    m = torch_tail_mask(70001, 2)  # chunks [0, 35001) and [35001, 70001)
    assert m.nonzero().flatten().tolist() == list(range(35001 - 25, 35001)) + list(range(70001 - 24, 70001))
    assert torch_tail_mask(70001, 1).nonzero().flatten().tolist() == list(range(70001 - 17, 70001))


# ---- F3: mul by a Python scalar ------------------------------------------------------------------
@pytest.mark.parametrize("n", [1000, 70001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                         ids=["fp32", "bf16", "fp16"])
def test_mul_scalar_rounds_scalar_to_fp32(dtype, n):
    gen = torch.Generator().manual_seed(n + 5)
    x = _randn(n, gen, dtype, scale=3.0)
    differs_double = differs_narrow = 0
    for m in (0.9, 0.87, 1 - 1e-3, 0.1):
        m32 = _f32(m)
        # fp32: the product of two fp32 values is exact in fp64, so this is ONE rounding
        want = (x.double() * m32).to(torch.float32).to(dtype)
        if dtype is not torch.float32:  # torch: fp32 product (rounded), then narrowed
            want = (x.float() * m32).to(dtype)
        got = x.mul(m)
        assert torch.equal(got, want), f"m={m}"
        assert torch.equal(x.clone().mul_(m), want)
        differs_double += int((want != (x.double() * m).to(dtype)).sum())
        m_narrow = float(torch.tensor(m32).to(dtype))
        differs_narrow += int((want != (x.float() * m_narrow).to(dtype)).sum())
    assert differs_narrow > 0 or dtype is torch.float32
    assert differs_double > 0 or dtype is not torch.float32


# ---- F4: the op sequence of torch's for-loop SGD -------------------------------------------------
def test_single_tensor_sgd_source():
    """sgd_math.h encodes these lines; a torch that rewrites them must be looked at."""
    from torch.optim import sgd

    src = inspect.getsource(sgd._single_tensor_sgd)
    for line in ("grad = grads[i] if not maximize else -grads[i]",
                 "grad = grad.add(param, alpha=weight_decay)",
                 "if momentum != 0:",
                 "buf = grad.detach().clone()",
                 "buf.mul_(momentum).add_(grad, alpha=1 - dampening)",
                 "grad = grad.add(buf, alpha=momentum)",
                 "param.add_(grad, alpha=-lr)"):
        assert line in src, f"torch.optim.sgd._single_tensor_sgd no longer has {line!r}"
    order = [src.index(s) for s in ("-grads[i]", "alpha=weight_decay", "alpha=1 - dampening",
                                    "alpha=momentum", "alpha=-lr")]
    assert order == sorted(order)


# ---- the kernel follows the thread-count dependence --------------------------------------------
def _torch_sgd_steps(p0, grads, **h):
    p = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([p], foreach=False, **h)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt.state[p]["momentum_buffer"]


def _kernel_steps(p0, grads, **h):
    p, buf = p0.clone(), torch.empty_like(p0)
    for k, g in enumerate(grads):
        step_one(p, g, buf, lr=h["lr"], momentum=h["momentum"],
                         dampening=h["dampening"], weight_decay=h["weight_decay"],
                         nesterov=h["nesterov"], maximize=False, first_step=k == 0)
    return p, buf


@needs_vector_capability
@pytest.mark.parametrize("dtype", NARROW, ids=["bf16", "fp16"])
def test_kernel_follows_thread_count(dtype, num_threads):
    n = 70001
    gen = torch.Generator().manual_seed(21)
    p0 = _randn(n, gen, dtype)
    grads = [_randn(n, gen, dtype) for _ in range(3)]
    h = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False)
    ref = {}
    for t in (1, 2):
        num_threads(t)
        ref[t] = _torch_sgd_steps(p0, grads, **h)
        ours = _kernel_steps(p0, grads, **h)
        assert torch.equal(ours[0], ref[t][0]), f"params, {t} thread(s)"
        assert torch.equal(ours[1], ref[t][1]), f"momentum buffer, {t} thread(s)"
    assert not torch.equal(ref[1][0], ref[2][0]), "torch's bits no longer depend on threads"


# ---- other CPU capabilities, in a child process (ATEN_CPU_CAPABILITY is read at start-up) ----
def probe() -> dict:
    """Run in a child process: which formulas torch's add / mul follow under this capability,
    and whether the kernel matches torch's for-loop SGD."""
    out = {"capability": _capability()}
    gen = torch.Generator().manual_seed(99)
    n = 70001
    x32, y32 = _randn(n, gen, torch.float32), _randn(n, gen, torch.float32, scale=4.0)
    x64, y64 = _randn(2000, gen, torch.float64), _randn(2000, gen, torch.float64, scale=4.0)
    fma32_ok = muladd32_ok = fma64_ok = muladd64_ok = True
    for alpha in (-0.1, 0.9, 1 - 0.9):
        a = _f32(alpha)
        got = x32.add(y32, alpha=alpha)
        fma32_ok &= torch.equal(got, fma32(y32, a, x32))
        muladd32_ok &= torch.equal(got, x32 + y32 * a)
        got = x64.add(y64, alpha=alpha)
        fma64_ok &= torch.equal(got, fma64_fraction(y64, alpha, x64))
        muladd64_ok &= torch.equal(got, x64 + y64 * alpha)
    out.update(fp32_add_is_fma=fma32_ok, fp32_add_is_mul_add=muladd32_ok,
               fp64_add_is_fma=fma64_ok, fp64_add_is_mul_add=muladd64_ok)
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        model = all_tail = mul = True
        for size in (1000, 70001):
            x, y = _randn(size, gen, dtype), _randn(size, gen, dtype)
            mask = torch_tail_mask(size, torch.get_num_threads())
            for alpha in (-0.1, 0.9):
                got = x.add(y, alpha=alpha)
                body, tail = narrow_add_formulas(x, y, alpha)
                model &= torch.equal(got, torch.where(mask, tail, body))
                all_tail &= torch.equal(got, tail)
            mul &= torch.equal(x.mul(0.9), (x.float() * _f32(0.9)).to(dtype))
        out[f"{name}_add_body_tail_model"] = model
        out[f"{name}_add_all_tail"] = all_tail
        out[f"{name}_mul_fp32_scalar"] = mul
    h = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False)
    for dtype, name in ((torch.float32, "fp32"), (torch.float64, "fp64"),
                        (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        p0 = _randn(5000, gen, dtype)
        grads = [_randn(5000, gen, dtype) for _ in range(3)]
        ref = _torch_sgd_steps(p0, grads, **h)
        ok = {}
        for isa in ("default", "avx2", "avx512"):
            try:
                prev = _C.set_cpu_isa(isa)
            except RuntimeError:
                continue
            try:
                ours = _kernel_steps(p0, grads, **h)
            finally:
                _C.set_cpu_isa(prev)
            ok[isa] = torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])
        out[f"kernel_{name}"] = ok
    return out


_PROBES: dict = {}


def _probe_in_child(capability: str) -> dict:
    if capability not in _PROBES:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
                "import test_torch_numerics as t; print('PROBE' + json.dumps(t.probe()))")
        r = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env,
                           capture_output=True, text=True, timeout=300)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("PROBE")]
        assert r.returncode == 0 and lines, f"probe failed: {r.stderr[-2000:]}"
        _PROBES[capability] = json.loads(lines[-1][5:])
    return _PROBES[capability]


def _probe_or_skip(capability: str) -> dict:
    res = _probe_in_child(capability)
    if res["capability"] != capability.upper():
        pytest.skip(f"torch cannot run {capability} here (got {res['capability']})")
    return res


def test_capability_avx2_facts():
    """The AVX2 kernels (a CPU without AVX-512) follow F1-F3 like the native ones."""
    res = _probe_or_skip("avx2")
    assert res["fp32_add_is_fma"] and res["fp64_add_is_fma"], res
    assert not res["fp32_add_is_mul_add"], res
    for name in ("bf16", "fp16"):
        assert res[f"{name}_add_body_tail_model"] and not res[f"{name}_add_all_tail"], res
        assert res[f"{name}_mul_fp32_scalar"], res


def test_capability_default_facts():
    """torch's DEFAULT kernels (no AVX2: the dispatch torch uses on such a CPU, and under
    ATEN_CPU_CAPABILITY=default) do NOT fuse: add(x, y, alpha) == x + round(alpha * y) for
    fp32/fp64, and bf16/fp16 use the narrowed product for every element."""
    res = _probe_or_skip("default")
    assert res["fp32_add_is_mul_add"] and not res["fp32_add_is_fma"], res
    assert res["fp64_add_is_mul_add"] and not res["fp64_add_is_fma"], res
    for name in ("bf16", "fp16"):
        assert res[f"{name}_add_all_tail"] and not res[f"{name}_add_body_tail_model"], res
        assert res[f"{name}_mul_fp32_scalar"], res


@pytest.mark.parametrize("capability", ["avx2", "default"])
@pytest.mark.parametrize("dtype", ["fp32", "fp64", "bf16", "fp16"])
def test_kernel_matches_torch_under_capability(capability, dtype):
    """The kernel must give torch's bits whichever kernels torch dispatches to. Under DEFAULT
    (a CPU without AVX2) torch does not fuse (test_capability_default_facts), while the kernel
    always uses fma and the AVX2 body/tail split, in both of its ISAs."""
    res = _probe_or_skip(capability)
    ok = res[f"kernel_{dtype}"]
    assert ok and all(ok.values()), (
        f"kernel vs torch.optim.SGD(foreach=False) under ATEN_CPU_CAPABILITY={capability}, "
        f"{dtype}: equal per kernel ISA = {ok}")
