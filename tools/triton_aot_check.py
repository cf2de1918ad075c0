"""Ahead-of-time (no GPU needed) evidence for the Triton momentum kernels.

Compiles a ``@triton.jit`` kernel for an NVIDIA target (sm_80 / sm_90) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32), options={...})``,
then inspects the PTX and the SASS (``cuobjdump -sass`` from the triton wheel) for

1. 128-bit global memory access: ``ld.global.v4.b32`` / ``st.global.v4.b32`` in PTX and
   ``LDG.E.128`` / ``STG.E.128`` in SASS (bf16 with 8 elements per thread is also packed into
   ``.v4.b32`` = 8 x bf16), and
2. the FMA contract of the momentum update ``buf = fma(g, 1 - dampening, buf * momentum)``:
   every ``mul.rn.f32`` that multiplies by the momentum parameter feeds *the addend* of a
   ``fma.rn.f32``, and no ``fma.rn.f32`` has the momentum as a multiplicand (that would be
   ``buf * momentum`` contracted into an FMA, i.e. a different rounding).

Notes found while writing this (triton 3.9.0):

* compile options go in ``options=`` as a plain dict (``{"enable_fp_fusion": False,
  "num_warps": 4}``); they are validated by the backend's ``parse_options`` and end up in
  ``CompiledKernel.metadata`` (``metadata.enable_fp_fusion`` is checked here). With
  ``enable_fp_fusion=False`` LLVM does not contract and ptxas gets ``--fmad=false``.
  ``TRITON_FORCE_DISABLE_FP_FUSION=1`` in the environment overrides a requested ``True``.
* ``attrs`` maps ``(arg_index,)`` to ``[["tt.divisibility", 16]]``. Divisibility on the
  pointers alone is NOT enough for a masked kernel (``mask = offs < n``): the element count
  must be marked divisible by 16 as well, or the mask's constancy is 1 and every access is
  scalar. At run time the Triton JIT applies the same specialisation automatically (integer
  arguments that are multiples of 16, pointers that are 16-byte aligned), so the vector variant
  is what runs for n % 16 == 0; other n get a separately compiled scalar variant.
* The PTX entry gets two extra trailing ``.u64`` params (global / profile scratch).

The list (pointer-table) kernel is checked for the same FMA contract; it is not expected to
have 128-bit accesses: its element pointers are int64 table entries cast to pointers in-kernel,
with no alignment guarantee the compiler could use (see :func:`list_evidence`).

Command line:  python tools/triton_aot_check.py   (compiles the real flat and list kernels of
``momentum_cuda.triton_kernels`` for fp32/bf16 x sm_80/sm_90 and prints the evidence;
exit status 1 if a check fails).
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
import time
from typing import Iterable, Mapping

DIV16 = [["tt.divisibility", 16]]


# --------------------------------------------------------------------------- compile
@dataclasses.dataclass
class AotResult:
    name: str
    arch: int
    ptx: str
    cubin: bytes
    sass: str
    enable_fp_fusion: bool
    num_warps: int
    compile_s: float
    divisible_args: tuple

    def param_names(self) -> list:
        return re.findall(r"\.param\s+\.\S+(?:\s+\.ptr\s+\.global\s+\.align\s+\d+)?\s+(\w+)", self.ptx)


def bin_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def sass_of(cubin: bytes) -> str:
    """Disassemble a cubin with the wheel's cuobjdump (falls back to nvdisasm)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        for tool, args in (("cuobjdump", ["-sass"]), ("nvdisasm", ["-c"])):
            exe = os.path.join(bin_dir(), tool)
            if os.path.exists(exe):
                r = subprocess.run([exe, *args, path], capture_output=True, text=True)
                if r.returncode == 0 and r.stdout.strip():
                    return r.stdout
        raise RuntimeError("no working cuobjdump/nvdisasm in " + bin_dir())
    finally:
        os.unlink(path)


def pointer_args(signature: Mapping[str, str]) -> list:
    return [k for k, v in signature.items() if str(v).startswith("*")]


def compile_aot(fn, signature: Mapping[str, str], constexprs: Mapping[str, object] | None = None,
                arch: int = 90, *, divisible: Iterable[str] | None = None,
                pointer_divisibility: bool = True, enable_fp_fusion: bool = False,
                num_warps: int = 4, with_sass: bool = True) -> AotResult:
    """AOT-compile ``fn`` for ``sm_<arch>``.

    ``signature`` maps *every* argument name (in order) to a Triton type string (``"*fp32"``,
    ``"*bf16"``, ``"i32"``, ``"fp32"``) or ``"constexpr"``; ``constexprs`` gives the constexpr
    values. ``tt.divisibility=16`` goes on all pointer args (unless ``pointer_divisibility`` is
    False) plus the argument names in ``divisible`` (e.g. the element count).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    constexprs = dict(constexprs or {})
    signature = dict(signature)
    for k in constexprs:
        signature[k] = "constexpr"
    names = list(fn.arg_names)
    missing = [n for n in names if n not in signature]
    if missing:
        raise ValueError(f"signature lacks {missing}")
    signature = {n: signature[n] for n in names}
    div = set(divisible or ())
    if pointer_divisibility:
        div |= set(pointer_args(signature))
    attrs = {(names.index(n),): DIV16 for n in sorted(div, key=names.index)}
    t0 = time.perf_counter()
    ck = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                        target=GPUTarget("cuda", arch, 32),
                        options={"enable_fp_fusion": enable_fp_fusion, "num_warps": num_warps})
    dt = time.perf_counter() - t0
    cubin = ck.asm["cubin"]
    return AotResult(name=ck.metadata.name, arch=arch, ptx=ck.asm["ptx"], cubin=cubin,
                     sass=sass_of(cubin) if with_sass else "",
                     enable_fp_fusion=bool(ck.metadata.enable_fp_fusion), num_warps=num_warps,
                     compile_s=dt, divisible_args=tuple(sorted(div, key=names.index)))


def param_index(fn, signature: Mapping[str, str], name: str, constexprs=()) -> int:
    """Index of argument ``name`` among the PTX entry params (constexprs are not params)."""
    cs = set(constexprs)
    runtime = [n for n in fn.arg_names if n not in cs and signature.get(n) != "constexpr"]
    return runtime.index(name)


# --------------------------------------------------------------------------- 128-bit I/O
_PTX_GLD = re.compile(r"\bld\.global(?:\.\w+)*\.(v[248])?\.?(b|f|u|s)(8|16|32|64)\b")
_PTX_MEM = re.compile(r"\b(ld|st)\.global((?:\.[a-z0-9_]+)*)")
_SASS_MEM = re.compile(r"\b(LDG|STG)((?:\.[A-Z0-9_]+)*)")


def _ptx_width(mods: str) -> int:
    parts = mods.strip(".").split(".")
    vec = 1
    bits = None
    for p in parts:
        if p in ("v2", "v4", "v8"):
            vec = int(p[1:])
        m = re.fullmatch(r"[bfus](8|16|32|64)", p)
        if m:
            bits = int(m.group(1))
    return vec * (bits or 0)


def memory_ops(ptx: str, sass: str) -> dict:
    """Global loads/stores by access width in bits: {'ptx_ld': {128: 6}, ..., 'sass_LDG': {...}}."""
    out = {"ptx_ld": {}, "ptx_st": {}, "sass_LDG": {}, "sass_STG": {}, "ptx_ld_lines": [],
           "ptx_st_lines": [], "sass_lines": []}
    for line in ptx.splitlines():
        m = _PTX_MEM.search(line)
        if m:
            w = _ptx_width(m.group(2))
            key = "ptx_" + m.group(1)
            out[key][w] = out[key].get(w, 0) + 1
            out[key + "_lines"].append(line.strip())
    for line in sass.splitlines():
        m = _SASS_MEM.search(line)
        if m:
            mods = m.group(2).split(".")
            # LDG.E.128 / LDG.E.64 / LDG.E.U16 / LDG.E.S8 ...; no width suffix: 32 bits
            w = next((int(x.lstrip("US")) for x in mods
                      if x in ("64", "128", "U16", "S16", "U8", "S8", "16", "8")), 32)
            key = "sass_" + m.group(1)
            out[key][w] = out[key].get(w, 0) + 1
            out["sass_lines"].append(re.sub(r"/\*\s*[0-9a-fx]+\s*\*/", "", line).strip())
    return out


def check_vector_io(res: AotResult, *, require_all: bool = True) -> tuple[bool, dict]:
    """128-bit global loads and stores in PTX and SASS. With ``require_all`` no narrower
    global access may appear at all."""
    ops = memory_ops(res.ptx, res.sass)
    problems = []
    for key in ("ptx_ld", "ptx_st", "sass_LDG", "sass_STG"):
        widths = ops[key]
        if not widths.get(128):
            problems.append(f"{key}: no 128-bit access (widths {widths})")
        elif require_all and set(widths) != {128}:
            problems.append(f"{key}: narrower accesses present (widths {widths})")
    ops["problems"] = problems
    return not problems, ops


# --------------------------------------------------------------------------- FMA contract
_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)\s+([^;]*);")


def ptx_instructions(ptx: str) -> list:
    """[(lineno, opcode, dst, [srcs], text)] for simple register instructions."""
    out = []
    for i, line in enumerate(ptx.splitlines()):
        m = _INSTR.match(line)
        if not m or "{" in m.group(2):
            continue
        ops = [o.strip() for o in m.group(2).split(",")]
        out.append((i, m.group(1), ops[0], ops[1:], line.strip()))
    return out


def _param_regs(instrs, param_name: str) -> set:
    """Registers holding ``param_name``: its ld.param plus mov copies and exact-narrowing
    cvt (the real kernel passes fp64 scalars and narrows them with cvt.rn.f32.f64)."""
    regs = {d for _, op, d, s, _ in instrs if op.startswith("ld.param") and s and s[0] == f"[{param_name}]"}
    changed = True
    while changed:
        changed = False
        for _, op, d, s, _ in instrs:
            if op.startswith(("mov.", "cvt.")) and len(s) == 1 and s[0] in regs and d not in regs:
                regs.add(d)
                changed = True
    return regs


_FLOAT_ARITH = re.compile(r"^(add|sub|mul|fma|div|neg|abs|min|max|sqrt|rcp)\.[\w.]*f(16|32|64)(x2)?$")


def _value_closure(instrs, start: str) -> set:
    """Registers that carry ``start``'s value through non-floating-point ops (the integer
    bf16/fp16 rounding: bfe/add.s32/and.b32, moves, selp value operands). Stops at float
    arithmetic and does not follow predicates (setp -> selp is NaN selection, not data)."""
    reached = {start}
    changed = True
    while changed:
        changed = False
        for _, op, d, s, _ in instrs:
            if d in reached or _FLOAT_ARITH.match(op) or op.startswith(("setp", "st.", "ld.")):
                continue
            srcs = s[:2] if op.startswith("selp") else s
            if any(r in reached for r in srcs):
                reached.add(d)
                changed = True
    return reached


def check_fma_contract(res: AotResult, momentum_param: int | str, lr_param: int | str | None = None
                       ) -> tuple[bool, dict]:
    """``buf*momentum`` must be a separate ``mul.rn.f32`` whose result (possibly after the
    integer bf16/fp16 rounding) is the addend (third operand) of a ``fma.rn.f32`` -- i.e.
    ``fma(g, 1-d, r(buf*m))`` -- never a contracted FMA and never a plain add.

    ``momentum_param`` / ``lr_param``: PTX param index (see :func:`param_index`) or full name.
    With ``lr_param`` (the param holding -lr, or lr negated in-kernel) each of those FMA results
    (after rounding) must be a multiplicand of an ``fma.rn.f32`` with -lr: ``p = fma(buf, -lr, p)``.
    """
    instrs = ptx_instructions(res.ptx)
    pname = momentum_param if isinstance(momentum_param, str) else f"{res.name}_param_{momentum_param}"
    mregs = _param_regs(instrs, pname)
    info = {"momentum_regs": sorted(mregs), "pairs": [], "problems": [], "snippet": []}
    if not mregs:
        info["problems"].append(f"momentum param {pname} is never loaded")
        return False, info
    defs = {d: (i, op, s, t) for i, op, d, s, t in instrs}
    uses = {}
    for i, op, d, s, t in instrs:
        for j, r in enumerate(s):
            uses.setdefault(r, []).append((i, op, j, d, t))
    fmas = [x for x in instrs if x[1].startswith("fma.") and x[1].endswith("f32")]
    muls = [x for x in instrs if x[1].startswith("mul.") and x[1].endswith("f32")
            and any(r in mregs for r in x[3])]
    info["n_fma_f32"] = len(fmas)
    info["n_mul_by_momentum"] = len(muls)
    for i, op, d, s, t in fmas:
        if any(r in mregs for r in s[:2]):
            info["problems"].append(f"momentum is an FMA multiplicand (contracted buf*m): {t}")
    if not muls:
        info["problems"].append("no separate mul.f32 by the momentum")
    bufs = []
    for i, op, d, s, t in muls:
        if op != "mul.rn.f32":
            info["problems"].append(f"mul by momentum is not mul.rn.f32 (contractible): {t}")
        carried = _value_closure(instrs, d)
        us = [u for r in carried for u in uses.get(r, []) if _FLOAT_ARITH.match(u[1])]
        good = [u for u in us if u[1] == "fma.rn.f32" and u[2] == 2 and u[0] > i]
        if not good or len(good) != len(us):
            info["problems"].append(f"{t} is not (only) the addend of an fma.rn.f32; float uses: "
                                    f"{[u[4] for u in us]}")
        for u in good:
            info["pairs"].append((t, u[4]))
            bufs.append(u[3])
    if lr_param is not None:
        lname = lr_param if isinstance(lr_param, str) else f"{res.name}_param_{lr_param}"
        lregs = _param_regs(instrs, lname)
        # -lr may be formed in-kernel by neg.f32 (or sub 0, lr)
        lregs |= {d for _, op, d, s, _ in instrs if op.startswith(("neg.", "sub.")) and
                  any(r in lregs for r in s)}
        info["lr_fmas"] = []
        for b in bufs:
            carried = _value_closure(instrs, b)
            hit = [u for r in carried for u in uses.get(r, []) if u[1] == "fma.rn.f32"
                   and u[2] in (0, 1) and any(x in lregs for x in defs[u[3]][2][:2])]
            if hit:
                info["lr_fmas"].append(hit[0][4])
        if len(info["lr_fmas"]) != len(bufs):
            info["problems"].append(f"only {len(info['lr_fmas'])}/{len(bufs)} buf values feed "
                                    "fma.rn.f32(buf, -lr, p)")
    if info["pairs"]:
        info["snippet"] = list(info["pairs"][0])
    return not info["problems"], info


def sass_arith(sass: str) -> dict:
    c = {}
    for op in ("FMUL", "FFMA", "FADD", "HFMA2", "F2F", "F2FP", "PRMT"):
        c[op] = len(re.findall(rf"\b{op}(?:\.[A-Z0-9.]+)?\s", sass))
    return c


def check_sass_mul_kept(res: AotResult, n_mul: int) -> tuple[bool, dict]:
    """ptxas must keep the separate multiplies (it gets --fmad=false when fusion is off)."""
    c = sass_arith(res.sass)
    return c["FMUL"] >= n_mul, c


# --------------------------------------------------------------------------- report
def evidence(res: AotResult, momentum_param, lr_param=None) -> dict:
    vok, vio = check_vector_io(res)
    fok, fma = check_fma_contract(res, momentum_param, lr_param)
    sok, sas = check_sass_mul_kept(res, fma.get("n_mul_by_momentum", 0))
    return {"arch": f"sm_{res.arch}", "enable_fp_fusion": res.enable_fp_fusion,
            "compile_s": round(res.compile_s, 3), "divisible_args": res.divisible_args,
            "vector_io_ok": vok, "vector_io": {k: vio[k] for k in
                                               ("ptx_ld", "ptx_st", "sass_LDG", "sass_STG")},
            "vector_io_problems": vio["problems"],
            "ptx_load_example": vio["ptx_ld_lines"][:1], "ptx_store_example": vio["ptx_st_lines"][:1],
            "sass_mem_example": vio["sass_lines"][:2],
            "fma_ok": fok, "fma_problems": fma["problems"], "mul_fma_example": fma["snippet"],
            "n_mul_by_momentum": fma.get("n_mul_by_momentum"), "n_fma_f32": fma.get("n_fma_f32"),
            "lr_fma_example": (fma.get("lr_fmas") or [None])[0],
            "sass_mul_kept": sok, "sass_arith": sas}


# --------------------------------------------------------------------------- real kernel
REAL_FLAT_KERNEL = "_sgd_flat_kernel"
REAL_MOMENTUM_ARG = "m_mul"   # buf * m_mul (nesterov uses the separate m_add)
REAL_LR_ARG = "neg_lr"


def _real_spec(tk, fn, sig: dict, dt: str, flags: dict, **extra_constexprs) -> dict:
    """The part both real kernels share: the constexprs _launch passes (default flags: momentum
    on, not the first step, no nesterov / weight decay / maximize), their signature entries, and
    where the momentum and lr scalars sit."""
    import triton.language as tl

    ce = dict(MAXIMIZE=False, WEIGHT_DECAY=False, MOMENTUM=True, NESTEROV=False,
              FIRST_STEP=False, KIND={"fp32": 0, "bf16": 1, "fp16": 2}[dt], OPMATH=tl.float32,
              LR_TENSOR=False, M_TENSOR=False, D_TENSOR=False, WD_TENSOR=False,
              AMP_SCALE=False, AMP_SKIP=False, CLIP=False, FIRST_TENSOR=False, **extra_constexprs,
              BLOCK=getattr(tk, "BLOCK_SIZE", 1024))
    ce.update(flags)
    for k in ce:
        sig[k] = "constexpr"
    return {"fn": fn, "signature": sig, "constexprs": ce,
            "momentum": param_index(fn, sig, REAL_MOMENTUM_ARG),
            "lr": param_index(fn, sig, REAL_LR_ARG),
            "num_warps": getattr(tk, "NUM_WARPS", 4)}


def real_flat_spec(tk, dt: str, **flags) -> dict:
    """(fn, signature, constexprs) for momentum_cuda.triton_kernels._sgd_flat_kernel with the
    scalar types and constexprs its _launch uses; ``dt`` is "fp32" or "bf16"."""
    fn = getattr(tk, REAL_FLAT_KERNEL)
    sig = {}
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            sig[name] = f"*{dt}"
        elif name == "n":
            sig[name] = "i32"
        else:
            sig[name] = "fp64"
    return _real_spec(tk, fn, sig, dt, flags)


def check_real(tk, dt: str, arch: int, **flags) -> dict:
    spec = real_flat_spec(tk, dt, **flags)
    res = compile_aot(spec["fn"], spec["signature"], spec["constexprs"], arch,
                      divisible=("n",), num_warps=spec["num_warps"])
    return evidence(res, spec["momentum"], spec["lr"])


REAL_LIST_KERNEL = "_sgd_list_kernel"


def real_list_spec(tk, dt: str, **flags) -> dict:
    """(fn, signature, constexprs) for momentum_cuda.triton_kernels._sgd_list_kernel, the
    pointer-table kernel: two int64 table pointers (rows, block map), the fp64 scalars, and the
    element type as the DTYPE constexpr (the table's addresses are cast to it in-kernel)."""
    import triton.language as tl

    fn = getattr(tk, REAL_LIST_KERNEL)
    sig = {n: ("*i64" if n.endswith("_ptr") else "fp64") for n in fn.arg_names}
    return _real_spec(tk, fn, sig, dt, flags,
                      DTYPE={"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}[dt])


def list_evidence(res: AotResult, momentum_param, lr_param=None) -> dict:
    """The list kernel's evidence: the FMA contract as for the flat kernel, and its memory
    accesses. The element pointers come from the int64 table (int -> pointer casts) and carry
    no alignment guarantee, so 128-bit accesses are NOT expected: the data accesses are one
    element wide (32-bit fp32, 16-bit bf16), plus 64-bit loads of the table entries."""
    fok, fma = check_fma_contract(res, momentum_param, lr_param)
    sok, sas = check_sass_mul_kept(res, fma.get("n_mul_by_momentum", 0))
    ops = memory_ops(res.ptx, res.sass)
    return {"arch": f"sm_{res.arch}", "enable_fp_fusion": res.enable_fp_fusion,
            "compile_s": round(res.compile_s, 3),
            "memory_widths": {k: ops[k] for k in ("ptx_ld", "ptx_st", "sass_LDG", "sass_STG")},
            "ptx_load_example": ops["ptx_ld_lines"][:3],
            "fma_ok": fok, "fma_problems": fma["problems"], "mul_fma_example": fma["snippet"],
            "n_mul_by_momentum": fma.get("n_mul_by_momentum"), "n_fma_f32": fma.get("n_fma_f32"),
            "lr_fma_example": (fma.get("lr_fmas") or [None])[0],
            "sass_mul_kept": sok, "sass_arith": sas}


def check_real_list(tk, dt: str, arch: int, **flags) -> dict:
    spec = real_list_spec(tk, dt, **flags)
    res = compile_aot(spec["fn"], spec["signature"], spec["constexprs"], arch,
                      num_warps=spec["num_warps"])
    return list_evidence(res, spec["momentum"], spec["lr"])


def _main() -> int:
    import json

    from momentum_cuda import triton_kernels as tk

    ok = True
    for dt in ("fp32", "bf16"):
        for arch in (80, 90):
            e = check_real(tk, dt, arch)
            ok &= e["vector_io_ok"] and e["fma_ok"] and e["sass_mul_kept"]
            print(json.dumps({f"{dt} sm_{arch}": e}, indent=1, default=str))
    for dt in ("fp32", "bf16"):
        for arch in (80, 90):
            e = check_real_list(tk, dt, arch)
            ok &= e["fma_ok"] and e["sass_mul_kept"] and e["enable_fp_fusion"] is False
            print(json.dumps({f"list kernel {dt} sm_{arch}": e}, indent=1, default=str))
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(_main())
