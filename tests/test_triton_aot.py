"""Ahead-of-time compile evidence for the Triton kernels (no GPU needed).

Compiles for sm_80 and sm_90 with triton.compile(ASTSource, GPUTarget) and checks the PTX /
SASS (tools/triton_aot_check.py): 128-bit global loads/stores, and the FMA contract
buf = fma(g, 1-d, buf*m) with buf*m a separate mul.rn.f32 (enable_fp_fusion=False).
A stand-in kernel plus planted bad variants prove the checks can fail; the real flat kernel of
momentum_cuda.triton_kernels is checked when that module imports, and so is its list
(pointer-table) kernel: the FMA contract, and element-wide (not 128-bit) accesses, since its
pointers come from an int64 table with no alignment guarantee.
"""
from __future__ import annotations

import importlib
import os
import sys

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import triton_aot_check as aot  # noqa: E402

ARCHS = (80, 90)
BLOCK = 1024


# ---------------------------------------------------------------- stand-in kernels
@triton.jit
def standin_flat(p_ptr, g_ptr, b_ptr, n, lr, momentum, dampening, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    b = tl.fma(g, 1.0 - dampening, b * momentum)
    p = tl.fma(b, -lr, p)
    tl.store(b_ptr + offs, b.to(b_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def planted_plain(p_ptr, g_ptr, b_ptr, n, lr, momentum, dampening, BLOCK: tl.constexpr):
    """Same update written as b*m + g*(1-d) without tl.fma."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    b = b * momentum + g * (1.0 - dampening)
    p = p - lr * b
    tl.store(b_ptr + offs, b.to(b_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


def _sig(dt):
    return {"p_ptr": f"*{dt}", "g_ptr": f"*{dt}", "b_ptr": f"*{dt}", "n": "i32", "lr": "fp32",
            "momentum": "fp32", "dampening": "fp32", "BLOCK": "constexpr"}


_cache = {}


def _compile(fn, dt, arch, **kw):
    key = (fn.__name__, dt, arch, tuple(sorted(kw.items())))
    if key not in _cache:
        kw.setdefault("divisible", ("n",))
        _cache[key] = aot.compile_aot(fn, _sig(dt), {"BLOCK": BLOCK}, arch, **kw)
    return _cache[key]


M_IDX = 5  # PTX param index of `momentum` (p, g, b, n, lr, momentum, ...)
LR_IDX = 4


def test_param_index():
    assert aot.param_index(standin_flat, _sig("fp32"), "momentum", ("BLOCK",)) == M_IDX


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_standin_passes(dt, arch):
    res = _compile(standin_flat, dt, arch)
    assert res.enable_fp_fusion is False
    ok, io = aot.check_vector_io(res)
    assert ok, io["problems"]
    assert any("ld.global.v4.b32" in x for x in io["ptx_ld_lines"])
    assert any("st.global.v4.b32" in x for x in io["ptx_st_lines"])
    assert any("LDG.E.128" in x for x in io["sass_lines"])
    assert any("STG.E.128" in x for x in io["sass_lines"])
    ok, fma = aot.check_fma_contract(res, M_IDX, LR_IDX)
    assert ok, fma["problems"]
    # BLOCK 1024 / (4 warps * 32 lanes) = 8 elements per thread
    assert fma["n_mul_by_momentum"] == 8 and len(fma["pairs"]) == 8
    mul, fm = fma["snippet"]
    assert mul.startswith("mul.rn.f32") and fm.startswith("fma.rn.f32")
    assert len(fma["lr_fmas"]) == 8, fma
    ok, c = aot.check_sass_mul_kept(res, 8)
    assert ok, c


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_planted_no_divisibility_fails_vector_check(dt):
    res = _compile(standin_flat, dt, 90, pointer_divisibility=False, divisible=())
    ok, io = aot.check_vector_io(res)
    assert not ok
    assert not io["ptx_ld"].get(128) and not io["sass_LDG"].get(128), io["ptx_ld"]


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_planted_unaligned_count_fails_vector_check(dt):
    """Aligned pointers but n not known to be a multiple of 16: the mask kills vectorisation."""
    res = _compile(standin_flat, dt, 90, divisible=())
    ok, io = aot.check_vector_io(res)
    assert not ok and not io["ptx_ld"].get(128)


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_planted_fusion_on_plain_expression_fails_fma_check(dt):
    res = _compile(planted_plain, dt, 90, enable_fp_fusion=True)
    if not res.enable_fp_fusion:
        pytest.skip("TRITON_FORCE_DISABLE_FP_FUSION overrides enable_fp_fusion=True")
    ok, fma = aot.check_fma_contract(res, M_IDX)
    assert not ok
    # the vector check is unaffected by the arithmetic
    assert aot.check_vector_io(res)[0]


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_planted_plain_expression_no_fusion_fails_fma_check(dt):
    """Without tl.fma and without fusion: mul, mul, add -- no FMA for the gradient term."""
    res = _compile(planted_plain, dt, 90, enable_fp_fusion=False)
    ok, fma = aot.check_fma_contract(res, M_IDX)
    assert not ok
    assert any("not (only) the addend" in p for p in fma["problems"]), fma["problems"]


@triton.jit
def planted_contracted(p_ptr, g_ptr, b_ptr, n, lr, momentum, dampening, BLOCK: tl.constexpr):
    """b*m + g (no dampening) with fusion on: LLVM contracts to fma(b, m, g)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    b = b * momentum + g
    p = tl.fma(b, -lr, p)
    tl.store(b_ptr + offs, b.to(b_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


def test_planted_contracted_momentum_fails_fma_check():
    res = _compile(planted_contracted, "fp32", 90, enable_fp_fusion=True)
    if not res.enable_fp_fusion:
        pytest.skip("TRITON_FORCE_DISABLE_FP_FUSION overrides enable_fp_fusion=True")
    ok, fma = aot.check_fma_contract(res, M_IDX)
    assert not ok
    assert any("momentum is an FMA multiplicand" in p for p in fma["problems"]), fma["problems"]


def test_planted_standin_with_fusion_on_is_flagged():
    """Even with tl.fma, fusion on emits a contractible mul.f32 (no .rn): flagged."""
    res = _compile(standin_flat, "fp32", 90, enable_fp_fusion=True)
    if not res.enable_fp_fusion:
        pytest.skip("TRITON_FORCE_DISABLE_FP_FUSION overrides enable_fp_fusion=True")
    ok, fma = aot.check_fma_contract(res, M_IDX)
    assert not ok and any("not mul.rn.f32" in p for p in fma["problems"])


# ---------------------------------------------------------------- real kernels
def _real():
    try:
        tk = importlib.import_module("momentum_cuda.triton_kernels")
    except Exception as e:  # missing or broken: a skip; the stand-in tests still run
        pytest.skip(f"momentum_cuda.triton_kernels does not import: {type(e).__name__}: {e}")
    if not getattr(tk, "TRITON_AVAILABLE", True) or not hasattr(tk, aot.REAL_FLAT_KERNEL):
        pytest.skip("momentum_cuda.triton_kernels has no flat kernel")
    return tk


# GradScaler's and the clip's flags off: the plain kernels as every step without them runs them
# (tests/test_triton_jit.py compiles the AMP variants, through the JIT).
AMP_OFF = {"AMP_SCALE": False, "AMP_SKIP": False, "CLIP": False}
REAL_FLAGS = {
    "momentum": dict(AMP_OFF),
    "nesterov_wd": {"NESTEROV": True, "WEIGHT_DECAY": True, **AMP_OFF},
    "maximize": {"MAXIMIZE": True, **AMP_OFF},
}


@pytest.mark.parametrize("flags", list(REAL_FLAGS), ids=list(REAL_FLAGS))
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_real_flat_kernel(dt, arch, flags):
    tk = _real()
    spec = aot.real_flat_spec(tk, dt, **REAL_FLAGS[flags])
    res = aot.compile_aot(spec["fn"], spec["signature"], spec["constexprs"], arch,
                          divisible=("n",), num_warps=spec["num_warps"])
    assert res.enable_fp_fusion is False
    ok, io = aot.check_vector_io(res)
    assert ok, io["problems"]
    assert any("ld.global.v4.b32" in x for x in io["ptx_ld_lines"])
    assert any("st.global.v4.b32" in x for x in io["ptx_st_lines"])
    assert any("LDG.E.128" in x for x in io["sass_lines"])
    assert any("STG.E.128" in x for x in io["sass_lines"])
    # with nesterov, p = fma(fma(buf, m_add, g), -lr, p): buf does not feed the lr FMA itself
    nesterov = spec["constexprs"]["NESTEROV"]
    ok, fma = aot.check_fma_contract(res, spec["momentum"], None if nesterov else spec["lr"])
    assert ok, fma["problems"]
    per_thread = spec["constexprs"]["BLOCK"] // (32 * spec["num_warps"])
    assert fma["n_mul_by_momentum"] == per_thread and len(fma["pairs"]) == per_thread
    if not nesterov:
        assert len(fma["lr_fmas"]) == per_thread
    assert aot.check_sass_mul_kept(res, per_thread)[0]


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_real_flat_kernel_unaligned_count_is_scalar(dt):
    """Documents the specialisation: n not divisible by 16 -> no 128-bit accesses."""
    tk = _real()
    spec = aot.real_flat_spec(tk, dt, **AMP_OFF)
    res = aot.compile_aot(spec["fn"], spec["signature"], spec["constexprs"], 90, divisible=(),
                          num_warps=spec["num_warps"], with_sass=False)
    assert not aot.memory_ops(res.ptx, "")["ptx_ld"].get(128)


# ---------------------------------------------------------------- the list (pointer-table) kernel
@pytest.mark.parametrize("flags", list(REAL_FLAGS), ids=list(REAL_FLAGS))
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_real_list_kernel(dt, arch, flags):
    """The list kernel compiles for sm_80/sm_90 with its int64 -> pointer casts, keeps the FMA
    contract (mul.rn by the momentum feeding the addend of fma.rn, buf feeding fma.rn with -lr)
    and fusion off. Its element pointers are table entries with no alignment guarantee, so 128-bit
    accesses are NOT expected: data accesses are one element wide; the table reads are 64-bit."""
    tk = _real()
    if not hasattr(tk, aot.REAL_LIST_KERNEL):
        pytest.skip("momentum_cuda.triton_kernels has no list kernel")
    spec = aot.real_list_spec(tk, dt, **REAL_FLAGS[flags])
    res = aot.compile_aot(spec["fn"], spec["signature"], spec["constexprs"], arch,
                          num_warps=spec["num_warps"])
    assert res.enable_fp_fusion is False
    nesterov = spec["constexprs"]["NESTEROV"]
    ok, fma = aot.check_fma_contract(res, spec["momentum"], None if nesterov else spec["lr"])
    assert ok, fma["problems"]
    per_thread = spec["constexprs"]["BLOCK"] // (32 * spec["num_warps"])
    assert fma["n_mul_by_momentum"] == per_thread and len(fma["pairs"]) == per_thread
    if not nesterov:
        assert len(fma["lr_fmas"]) == per_thread
    assert aot.check_sass_mul_kept(res, per_thread)[0]
    ops = aot.memory_ops(res.ptx, res.sass)
    w = {"fp32": 32, "bf16": 16}[dt]
    # per thread: p, g, buf loads and p, buf stores of 8 elements each; 6 table entries
    # (block map: tensor index, start; row: p, g, buf addresses, numel)
    for key in ("ptx_ld", "sass_LDG"):
        assert ops[key] == {64: 6, w: 3 * per_thread}, (key, ops[key])
    for key in ("ptx_st", "sass_STG"):
        assert ops[key] == {w: 2 * per_thread}, (key, ops[key])
    assert any("ld.global.b64" in x for x in ops["ptx_ld_lines"])


def test_sass_width_parser():
    """U16 / U8 SASS accesses count as 16 / 8 bits (not as the 32-bit default)."""
    ops = aot.memory_ops("", "  LDG.E.U16 R1, desc[UR4][R2.64] ;\n  STG.E.U8 [R2], R1 ;\n"
                             "  LDG.E.128 R4, [R2] ;\n  LDG.E R5, [R2] ;\n")
    assert ops["sass_LDG"] == {16: 1, 128: 1, 32: 1} and ops["sass_STG"] == {8: 1}
