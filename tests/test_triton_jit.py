"""Triton's real JIT on every Triton launch of tests/test_gpu.py, without a GPU.

tests/test_triton_interp.py runs the Triton kernels in Triton's interpreter, which ignores
argument types, and tests/test_triton_aot.py compiles them from signatures written by hand;
neither sees the kernel that Triton's JIT builds for a real call. Here the stand-in driver of
tests/triton_stub_driver.py lets the JIT run on CPU tensors: binder, specialization, caches and
compiler (TTIR, PTX, cubin for sm_90) run as on a GPU; only the launch does nothing.

The replay: every parametrized case of tests/test_gpu.py whose `backend` is "triton" (read from
the test functions' parametrize marks), run by test_gpu's own test functions and _run with
.cuda() as the identity, so momentum_cuda.SGD / Momentum call the real entry points of
momentum_cuda/triton_kernels.py (validation, scalar rounding, flags, pointer table). Two seams
in momentum_cuda only: the entry points' CUDA-device check accepts CPU tensors, and the "triton"
backend may be chosen for CPU tensors; the pointer table then stays on the CPU (its branch for
non-CUDA devices: no pinned copy). No kernel runs, so the reference optimizers' steps are no-ops
too: test_gpu's bitwise comparisons then compare unchanged tensors; its backend and path
assertions still check every step. Each case runs REPLAY_STEPS steps, not test_gpu.STEPS: from
step 2 on, every step launches the same kernels with the same specializations (same parameters,
flags and sizes; buffers exist), so later steps compile nothing, and their gradient work on
2^20-element tensors would nearly double the runtime. Cases that drive torch.amp.GradScaler or
clip gradients (_replay_gradscaler_and_clip) get a CPU GradScaler, whose unscale then only
detects overflows, and a torch clip that multiplies nothing, so both sides keep equal gradients
while the optimizer makes the calls (grad_scale, found_inf, clip_coef) that the same steps make
on a GPU; torch's SGD step then records the momentum buffers it would create (_sgd_state_only).

For every launch and the kernel compiled for it:
- the constexpr flags and the scalar values are the ones the call asks for (scalars rounded once
  to opmath: fp32 for fp32/bf16/fp16, unchanged for fp64);
- the five scalars are fp64 kernel parameters for every dtype (binder signature, TTIR, PTX
  `.param .f64`): an fp32 parameter would round the fp64 dtype's scalars to fp32;
- pointers carry the tensors' element type (flat kernel: its arguments; list kernel: the int64
  table arguments and the int_to_ptr casts);
- GradScaler's and the clip's pointers are loaded exactly when their flags (AMP_SCALE,
  AMP_SKIP, CLIP) are on, typed as their tensors, and the unscale's reciprocal is
  cvt.rn.f32.f64(div.rn.f64(1.0, scale)), with no approximate division (_check_amp_compiled);
- num_warps 4, fp fusion off, target sm_90, and a cubin was made.
Compilations are counted with a fresh TRITON_CACHE_DIR (each one compiles, none loads) and must
equal the number of distinct specializations among the launches, by Triton's rules (_spec_key).
The count and compile time are printed ("N JIT compilations in T s ...", with the test_gpu
function that first needed each): they size the Triton stage of the GPU check
(tools/gpu_check.py). test_jit_amp_variants compiles the AMP variants of both kernels for every
dtype on their own (they are not in the count above unless test_gpu runs them on Triton);
test_jit_qmom_kernel and test_jit_fp16_master_kernel compile the momentum_dtype and the fp16
master-weights kernels through their entry points, aligned (128-bit accesses) and not.
"""
import inspect
import itertools
import re
import time
from collections import Counter

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

import test_gpu  # noqa: E402  (tests/ is on sys.path under pytest, as for every test file)
import triton_stub_driver  # noqa: E402
import momentum_cuda.reference  # noqa: E402
from momentum_cuda import _backends  # noqa: E402
from momentum_cuda import triton_kernels as tk  # noqa: E402
from momentum_cuda.reference import MomentumReference  # noqa: E402

ARCH = 90
# every step kernel of momentum_cuda/triton_kernels.py
KERNELS = (tk._sgd_flat_kernel, tk._sgd_list_kernel, tk._sgd_master_kernel, tk._sgd_sr_kernel,
           tk._sgd_qmom_kernel, tk._sgd_fp16_master_kernel)
REPLAY_STEPS = 2  # step 1 (FIRST_STEP where momentum is on) and one later step
SCALARS = ("neg_lr", "wd", "m_mul", "m_add", "one_minus_d")
# tensor dtype -> (Triton signature name, MLIR element type, Triton language dtype)
ELEM = {torch.float32: ("fp32", "f32", tl.float32), torch.float64: ("fp64", "f64", tl.float64),
        torch.bfloat16: ("bf16", "bf16", tl.bfloat16), torch.float16: ("fp16", "f16", tl.float16)}
# the storage kinds of momentum_cuda/triton_kernels.py: how r() rounds
KIND = {torch.float32: 0, torch.float64: 0, torch.bfloat16: 1, torch.float16: 2}
SHORT = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16",
         torch.float16: "fp16"}


def _triton_cases():
    """(test function, kwargs) for every parametrized case of tests/test_gpu.py that runs the
    Triton backend, in the order pytest would run them."""
    param_set = type(pytest.param(None))
    cases = []
    for name, fn in vars(test_gpu).items():
        if not name.startswith("test_") or not callable(fn):
            continue
        grid = []
        for mark in getattr(fn, "pytestmark", []):
            if mark.name != "parametrize":
                continue
            names, values = mark.args[0], mark.args[1]
            names = ([n.strip() for n in names.split(",")] if isinstance(names, str)
                     else list(names))
            rows = [tuple(v.values) if isinstance(v, param_set)
                    else ((v,) if len(names) == 1 else tuple(v)) for v in values]
            grid.append((names, rows))
        if not any("backend" in names for names, _ in grid):
            continue
        for combo in itertools.product(*(rows for _, rows in grid)):
            kw = {}
            for (names, _), row in zip(grid, combo):
                kw.update(zip(names, row))
            if kw["backend"] == "triton":
                cases.append((fn, kw))
    return cases


def _opmath(x: float, dtype) -> float:
    """x rounded once to the opmath of dtype (round to nearest even), as a Python float."""
    if dtype == torch.float64:
        return float(x)
    return torch.tensor(float(x), dtype=torch.float64).to(torch.float32).item()


# the modes' kernels' constexprs (no storage kinds; of AMP only AMP_SKIP, found_inf, and not in
# the stochastic-rounding kernel)
MASTER_FLAGS = ("MAXIMIZE", "WEIGHT_DECAY", "MOMENTUM", "NESTEROV", "FIRST_STEP", "BLOCK",
                "LR_TENSOR", "M_TENSOR", "D_TENSOR", "WD_TENSOR")


def _expected(entry):
    """The constexpr flags and scalars an entry-point call asks for, from its own arguments
    (the master entry's bf16 parameters: fp32 opmath, as the master is fp32)."""
    kw, dtype = entry["kwargs"], entry["dtype"]
    m, d = float(kw["momentum"]), float(kw["dampening"])
    given = {n: kw.get(f"{n}_tensor") is not None
             for n in ("lr", "momentum", "dampening", "weight_decay")}
    flags = dict(MAXIMIZE=kw["maximize"],
                 WEIGHT_DECAY=given["weight_decay"] or float(kw["weight_decay"]) != 0,
                 MOMENTUM=given["momentum"] or m != 0, NESTEROV=kw["nesterov"],
                 FIRST_STEP=kw["first_step"], KIND=KIND[dtype],
                 OPMATH=tl.float64 if dtype == torch.float64 else tl.float32,
                 LR_TENSOR=given["lr"], M_TENSOR=given["momentum"], D_TENSOR=given["dampening"],
                 WD_TENSOR=given["weight_decay"],
                 AMP_SCALE=kw.get("grad_scale") is not None,
                 AMP_SKIP=kw.get("found_inf") is not None,
                 CLIP=kw.get("clip_coef") is not None,
                 FIRST_TENSOR=kw.get("first_step_tensor") is not None, BLOCK=1024)
    if entry["kind"] == "list":
        flags["DTYPE"] = ELEM[dtype][2]
    if entry["kind"] in ("master", "sr", "qmom", "fp16_master"):
        flags = {k: flags[k] for k in MASTER_FLAGS + (("AMP_SKIP",) if entry["kind"] != "sr"
                                                       else ())}
    if entry["kind"] == "qmom":
        flags.update(_qmom_expected(entry))
    if entry["kind"] == "fp16_master":
        flags.update(_fp16_master_expected(entry))
    scalars = dict(neg_lr=_opmath(-float(kw["lr"]), dtype),
                   wd=_opmath(kw["weight_decay"], dtype), m_mul=_opmath(m, dtype),
                   m_add=_opmath(m, dtype), one_minus_d=_opmath(1.0 - d, dtype))
    return flags, scalars


def _qmom_expected(entry):
    """The momentum_dtype kernel's own constexprs for an entry call: QUANT 1 with int8 buffers
    (scales given), QBLOCK 256, ALIGNED exactly when every parameter, gradient and buffer
    address is a multiple of 16 bytes."""
    params = entry["tensors"]
    grads, bufs, scales = (list(a or []) for a in entry["args"][:3])
    aligned = all(t.data_ptr() % 16 == 0 for ts in (params, grads, bufs) for t in ts
                  if t.numel())
    return dict(QUANT=int(bool(scales)), QBLOCK=256, ALIGNED=aligned)


def _fp16_master_expected(entry):
    """The fp16 master kernel's own constexpr: ALIGNED exactly when every parameter, gradient,
    buffer and master address is a multiple of 16 bytes."""
    params = entry["tensors"]
    grads, bufs, masters = (list(a or []) for a in entry["args"][:3])
    return dict(ALIGNED=all(t.data_ptr() % 16 == 0 for ts in (params, grads, bufs, masters)
                            for t in ts if t.numel()))


def _check_vector_access(ptx, what, consts, problems):
    """ALIGNED: 128-bit global loads and stores (the unmasked blocks); otherwise none."""
    vec = _vector_ops(ptx, "ld") + _vector_ops(ptx, "st")
    if consts.get("ALIGNED") and not (_vector_ops(ptx, "ld") and _vector_ops(ptx, "st")):
        problems.append(f"vector: {what}: ALIGNED but no 128-bit loads and stores")
    if not consts.get("ALIGNED") and vec:
        problems.append(f"vector: {what}: {vec} 128-bit accesses without ALIGNED")


def _check_fp16_master_compiled(ck, what, consts, problems):
    """The fp16 master kernel: no float converted to fp16 (the parameter's rounding is integer
    arithmetic, _fp16_bits) and nothing divides; the gradient widened by cvt.f32.f16 (exact);
    ALIGNED: every tensor of an unmasked block moves in 128-bit accesses (one for the 8 fp16
    parameters or gradients of a thread, two for its 8 fp32 masters or buffers: loads of g, m
    and, on later steps with momentum, buf; stores of p, m and, with momentum, buf), otherwise
    none."""
    ptx = ck.asm["ptx"]
    conv = set(re.findall(r"\b(?:cvt\.\w+\.f16\.f32|div\.[\w.]+|rcp\.[\w.]+)", ptx))
    if conv:
        problems.append(f"ptx: {what}: {sorted(conv)} (the rounding is integer arithmetic)")
    if not re.search(r"\bcvt\.f32\.f16\b", ptx):
        problems.append(f"ptx: {what}: no cvt.f32.f16 (the gradient's widening)")
    _check_vector_access(ptx, what, consts, problems)
    if consts.get("ALIGNED"):
        mom = bool(consts.get("MOMENTUM"))
        want = (3 + 2 * (mom and not consts.get("FIRST_STEP")), 3 + 2 * mom)
        got = (_vector_ops(ptx, "ld"), _vector_ops(ptx, "st"))
        if got != want:
            problems.append(f"vector: {what}: 128-bit loads / stores {got}, expected {want}")


def _check_qmom_compiled(ck, what, consts, problems):
    """The momentum_dtype kernel: no float converted to bf16 (the buffer's rounding is integer
    arithmetic); with int8 buffers the two divisions (absmax / 127, v / scale) are div.rn.f32,
    correctly rounded as the contract says, and nothing else divides (Triton's fp32 `/` would
    be the approximate div.full.f32); the codes' rounding adds 1.5 * 2^23 with add.rn (no
    contraction, not folded away); ALIGNED: 128-bit global loads and stores (the unmasked
    blocks), otherwise none."""
    ptx = ck.asm["ptx"]
    if re.search(r"\bcvt\.\w+\.bf16\.f32", ptx):
        problems.append(f"ptx: {what}: a float converted to bf16 (the rounding is integer "
                        "arithmetic)")
    q8 = bool(consts.get("QUANT")) and bool(consts.get("MOMENTUM"))
    divs = set(re.findall(r"\b(?:div|rcp)\.[\w.]+", ptx))
    if divs != ({"div.rn.f32"} if q8 else set()):
        problems.append(f"ptx: {what}: divisions {sorted(divs)}, QUANT {consts.get('QUANT')}")
    if q8 and not (re.search(r"\badd\.rn\.f32\s[^;]*0f4B400000;", ptx)
                   and re.search(r"\b(?:add\.rn\.f32\s[^;]*0fCB400000|sub\.rn\.f32\s[^;]*"
                                 r"0f4B400000);", ptx)):
        problems.append(f"ptx: {what}: no add.rn.f32 of +-1.5 * 2^23 (the codes' rounding)")
    _check_vector_access(ptx, what, consts, problems)


def _spec_key(kernel, bound):
    """What Triton's JIT keys a compiled kernel on: each tensor's dtype and whether its address
    is a multiple of 16; each int's range (i32 or i64), whether it is 1 (made a constant) and
    whether it is a multiple of 16; every constexpr and option value; floats only by type."""
    constexprs = {kernel.arg_names[i] for i in kernel.constexprs}
    key = [kernel.__name__]
    for name, v in sorted(bound.items()):
        if isinstance(v, torch.Tensor):
            key.append((name, v.dtype, v.data_ptr() % 16 == 0))
        elif type(v) is int and name not in constexprs:
            key.append((name, "1" if v == 1 else
                        ("i32" if -2**31 <= v < 2**31 else "i64", v % 16 == 0)))
        elif type(v) is float:
            key.append((name, "float"))
        else:
            key.append((name, str(v)))
    return tuple(key)


class _Recorder:
    """Wraps the Triton entry points and the two kernels' run(): each launch is recorded with
    the entry call it belongs to and the CompiledKernel that JITFunction.run returned."""

    def __init__(self):
        self.entry = None
        self.case = None  # the name of the test_gpu function being replayed
        self.launches = []
        self.compiled = {}  # id -> (CompiledKernel, tensor dtype, case of its first launch)
        self.compile_s = 0.0
        self.last_call = {}  # kind -> (tensors, args, kwargs) of its entry's last call

    def wrap_entry(self, fn, kind):
        def entry(tensors, *args, **kwargs):
            if kind == "flat":
                dtype = tensors.dtype
            else:
                tensors = list(tensors)
                dtype = tensors[0].dtype if tensors else None
            self.entry = dict(kind=kind, kwargs=kwargs, dtype=dtype, tensors=tensors,
                              args=args)
            self.last_call[kind] = (tensors, args, kwargs)
            try:
                return fn(tensors, *args, **kwargs)
            finally:
                self.entry = None
        return entry

    def wrap_run(self, kernel):
        real_run = kernel.run

        def run(*args, grid, warmup, **kwargs):
            t0 = time.perf_counter()
            ck = real_run(*args, grid=grid, warmup=warmup, **kwargs)
            if id(ck) not in self.compiled:
                self.compile_s += time.perf_counter() - t0
                self.compiled[id(ck)] = (ck, self.entry and self.entry["dtype"], self.case)
            bound = dict(zip(kernel.arg_names, args), **kwargs)
            self.launches.append(dict(entry=self.entry, kernel=kernel, bound=bound, ck=ck))
            return ck
        return run


def _entry_params(ptx: str, name: str) -> list:
    """The PTX types of the .entry's parameters, in order (pointers as 'u64.ptr')."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    assert m, f"no .entry {name} in the PTX"
    return [t + (".ptr" if ptr else "") for t, ptr in
            re.findall(r"\.param\s+\.(\w+)(\s+\.ptr)?", m.group(1))]


AMP_PTRS = {"scale_ptr": "AMP_SCALE", "inf_ptr": "AMP_SKIP", "coef_ptr": "CLIP",
            "first_ptr": "FIRST_TENSOR"}


# a mode kernel's pointers and the constexprs that turn them on
MODE_PTRS = {"inf_ptr": "AMP_SKIP", "lr_ptr": "LR_TENSOR", "mom_ptr": "M_TENSOR",
             "d_ptr": "D_TENSOR", "wd_ptr": "WD_TENSOR"}


def _check_mode_pointers(ck, name, what, sig, runtime, params, problems):
    """A mode kernel's found_inf (inf_ptr; not the stochastic-rounding kernel's) and
    hyper-parameters held in tensors (lr_ptr, mom_ptr, d_ptr, wd_ptr): a flag off, its pointer
    is never loaded; on, a pointer parameter (fp32 for found_inf, fp32 or fp64 for the
    hyper-parameters) that is loaded (the dampening only where the buffer is damped: MOMENTUM
    on, FIRST_STEP off)."""
    consts = {list(sig)[path[0]]: v for path, v in ck.src.constants.items()}
    for ptr, flag in MODE_PTRS.items():
        if ptr not in runtime:
            continue
        i = runtime.index(ptr)
        loaded = re.search(rf"ld\.param\.\w+\s+%\w+,\s*\[{name}_param_{i}\]",
                           ck.asm["ptx"]) is not None
        used = bool(consts.get(flag)) and (ptr != "d_ptr" or (
            bool(consts.get("MOMENTUM")) and not consts.get("FIRST_STEP")))
        if used != loaded:
            problems.append(f"mode: {what}: {flag} {consts.get(flag)} but {ptr} (param {i}) "
                            f"{'loaded' if loaded else 'never loaded'}")
        want = {"*fp32"} if ptr == "inf_ptr" else {"*fp32", "*fp64"}
        if consts.get(flag) and (sig[ptr] not in want or params[i] != "u64.ptr"):
            problems.append(f"signature: {what}: {ptr} is {sig[ptr]} / .param .{params[i]}")


def _check_amp_compiled(ck, name, dtype, sig, runtime, params, problems):
    """GradScaler's and the clip's pointers: a flag off, its pointer is never loaded (the plain
    kernel reads nothing more than before); on, it is typed as the tensor it reads (scale and
    found_inf fp32, the clip coefficient of the gradients' dtype) and loaded, and the unscale's
    reciprocal is fp32(1 / fp64(scale)): an IEEE fp64 division (div.rn.f64) rounded once to fp32
    (cvt.rn.f32.f64), no approximate division or reciprocal anywhere."""
    names = list(sig)
    consts = {names[path[0]]: v for path, v in ck.src.constants.items()}
    what = f"{name} {SHORT[dtype]}"
    ptx = ck.asm["ptx"]
    for ptr, flag in AMP_PTRS.items():
        i = runtime.index(ptr)
        loaded = re.search(rf"ld\.param\.\w+\s+%\w+,\s*\[{name}_param_{i}\]", ptx) is not None
        if consts.get(flag) and not loaded:
            problems.append(f"amp: {what}: {flag} on but {ptr} (param {i}) never loaded")
        if not consts.get(flag) and loaded:
            problems.append(f"amp: {what}: {flag} off but {ptr} (param {i}) is loaded")
        if consts.get(flag):
            want = {"coef_ptr": f"*{ELEM[dtype][0]}", "first_ptr": "*u8"}.get(ptr, "*fp32")
            if sig[ptr] != want:
                problems.append(f"signature: {what}: {ptr} is {sig[ptr]}, not {want}")
            if params[i] != "u64.ptr":
                problems.append(f"ptx: {what}: {ptr} is .param .{params[i]}")
    divs = set(re.findall(r"\b(?:div|rcp)\.[\w.]+", ptx))
    want = {"div.rn.f64"} if consts.get("AMP_SCALE") else set()
    if divs != want:
        problems.append(f"amp: {what}: divisions {sorted(divs)}, expected {sorted(want)}")
    if consts.get("AMP_SCALE"):
        m = re.search(r"div\.rn\.f64\s+(%\w+),\s*(%\w+),", ptx)
        one = m and re.search(rf"mov\.b64\s+{m.group(2)},\s*0d3FF0000000000000;", ptx)
        cvt = m and re.search(rf"cvt\.rn\.f32\.f64\s+%\w+,\s*{m.group(1)};", ptx)
        if not (one and cvt):
            problems.append(f"amp: {what}: the reciprocal is not cvt.rn.f32.f64(div.rn.f64(1.0, "
                            "scale))")


def _check_compiled(ck, name, dtype, problems):
    """The compiled kernel: fp64 scalars, element types, options, target, a cubin."""
    sig = dict(ck.src.signature)
    names = list(sig)
    elem, mlir, _ = ELEM[dtype]
    what = f"{name} {SHORT[dtype]}"
    for s in SCALARS:
        if sig[s] != "fp64":
            problems.append(f"signature: {what}: scalar {s} is {sig[s]}, not fp64")
    ptrs = ("p_ptr", "g_ptr", "b_ptr") if name == "_sgd_flat_kernel" else ("rows_ptr",
                                                                              "blocks_ptr")
    want_ptr = f"*{elem}" if name == "_sgd_flat_kernel" else "*i64"
    for p in ptrs:
        if sig[p] != want_ptr:
            problems.append(f"signature: {what}: {p} is {sig[p]}, not {want_ptr}")
    ttir = ck.asm["ttir"]
    head = re.search(r"tt\.func public @" + name + r"\((.*?)\) attributes", ttir, re.S)
    args = dict(re.findall(r"%(\w+): (!tt\.ptr<\w+>|\w+)", head.group(1))) if head else {}
    for s in SCALARS:
        if args.get(s) != "f64":
            problems.append(f"ttir: {what}: %{s} is {args.get(s)}, not f64")
    want_ir = f"!tt.ptr<{mlir}>" if name == "_sgd_flat_kernel" else "!tt.ptr<i64>"
    for p in ptrs:
        if args.get(p) != want_ir:
            problems.append(f"ttir: {what}: %{p} is {args.get(p)}, not {want_ir}")
    if name != "_sgd_flat_kernel":
        # the bf16 kernels' tensors: bf16 parameters, gradients (and, stochastic rounding,
        # buffers) and int16 remainders as 16-bit integers (no float cast); master weights:
        # tie bytes and fp32 buffers (with MOMENTUM)
        consts = {names[path[0]]: v for path, v in ck.src.constants.items()}
        want = {"_sgd_master_kernel": {"i16", "i8"} | ({"f32"} if consts.get("MOMENTUM")
                                                        else set()),
                "_sgd_sr_kernel": {"i16"},
                "_sgd_qmom_kernel": {"f32"} | ({("i8" if consts.get("QUANT") else "i16")}
                                               if consts.get("MOMENTUM") else set()),
                # fp16 parameters as bits, fp16 gradients, fp32 masters (and buffers)
                "_sgd_fp16_master_kernel": {"i16", "f16", "f32"},
                }.get(name, {mlir})
        # (an alignment hint on the cast comes as an attribute dict before the type)
        casts = set(re.findall(r"tt\.int_to_ptr %\w+(?: \{[^}\n]*\})? : i64 -> !tt\.ptr<(\w+)>",
                               ttir))
        if casts != want:
            problems.append(f"ttir: {what}: int_to_ptr casts to {casts}, not {want}")
    # PTX parameters: the non-constexpr arguments in order (then Triton's scratch pointers).
    params = _entry_params(ck.asm["ptx"], name)
    runtime = [n for n in names if sig[n] != "constexpr"]
    for arg, want in [(s, "f64") for s in SCALARS] + [(p, "u64.ptr") for p in ptrs]:
        i = runtime.index(arg)
        got = params[i] if i < len(params) else None
        if got != want:
            problems.append(f"ptx: {what}: {arg} is .param .{got}, not .param .{want}")
    if name in ("_sgd_master_kernel", "_sgd_sr_kernel", "_sgd_qmom_kernel",
                "_sgd_fp16_master_kernel"):
        _check_mode_pointers(ck, name, what, sig, runtime, params, problems)
    if name in ("_sgd_master_kernel", "_sgd_sr_kernel"):
        conv = set(re.findall(r"\b(?:cvt\.\w+\.bf16\.f32|div\.[\w.]+|rcp\.[\w.]+)", ck.asm["ptx"]))
        if conv:
            problems.append(f"ptx: {what}: {sorted(conv)} (the split is integer arithmetic)")
    elif name == "_sgd_qmom_kernel":
        _check_qmom_compiled(ck, what, {names[path[0]]: v
                                        for path, v in ck.src.constants.items()}, problems)
    elif name == "_sgd_fp16_master_kernel":
        _check_fp16_master_compiled(ck, what, {names[path[0]]: v
                                               for path, v in ck.src.constants.items()},
                                    problems)
    else:
        _check_amp_compiled(ck, name, dtype, sig, runtime, params, problems)
    md = ck.metadata
    if (md.num_warps, md.enable_fp_fusion, md.target.arch) != (4, False, ARCH):
        problems.append(f"options: {what}: num_warps {md.num_warps}, enable_fp_fusion "
                        f"{md.enable_fp_fusion}, arch {md.target.arch}")
    if not ck.asm.get("cubin"):
        problems.append(f"cubin: {what}: no cubin")


def _sgd_state_only(opt, on):
    """torch.optim.SGD.step in the replay: changes no parameter (no kernel runs on our side);
    in GradScaler cases (on), creates the momentum buffers torch's step would (a clone of the
    gradient, where there is none yet): those tests compare which parameters have a buffer
    after overflow-skipped steps, not the buffers' values. Elsewhere it creates none: test_gpu's
    _run compares the values of the buffers torch has."""
    if not on:
        return
    for group in opt.param_groups:
        if group["momentum"] == 0:
            continue
        for p in group["params"]:
            if p.grad is not None and opt.state[p].get("momentum_buffer") is None:
                opt.state[p]["momentum_buffer"] = p.grad.detach().clone()


def _replay_gradscaler_and_clip(monkeypatch):
    """For test_gpu cases that drive GradScaler or clip gradients: GradScaler("cuda") becomes
    GradScaler("cpu") (the "cuda" one disables itself without a GPU, and then hands the
    optimizer nothing), and, since no kernel runs, torch's own writes to the gradients are
    turned off too, so both sides keep equal gradients: GradScaler's unscale only detects
    overflows (found_inf, which drives the control flow: skipped steps, the first step's host
    read), and torch's clip multiplies nothing. The optimizer then makes the calls, with the
    grad_scale / found_inf / clip_coef, that the same steps make on a GPU."""
    real_scaler = torch.amp.GradScaler
    real_unscale = torch._amp_foreach_non_finite_check_and_unscale_

    def scaler(device="cuda", *args, **kwargs):
        return real_scaler("cpu", *args, **kwargs)

    def detect_only(grads, found_inf, inv_scale):
        real_unscale([g.clone() for g in grads], found_inf, inv_scale)

    monkeypatch.setattr(torch.amp, "GradScaler", scaler)
    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", detect_only)
    monkeypatch.setattr(torch.nn.utils.clip_grad, "_clip_grads_with_norm_",
                        lambda *a, **k: None)
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", lambda *a, **k: None)



def _fp16_master_reference_unchanged(rec):
    """reference.sgd_fp16_master_reference_step in the replay, where no kernel runs: the
    parameters and masters stay as they are, and the buffers it returns are copies of those
    the op's last call left (None without momentum, as the reference returns them)."""
    def step(params, grads, bufs, masters, **hyper):
        if not hyper.get("momentum"):
            return list(bufs)
        _, args, _ = rec.last_call["fp16_master"]
        return [t.clone() for t in args[1]]
    return step


def _qmom_reference_unchanged(rec):
    """reference.sgd_momentum_dtype_reference_step in the replay, where no kernel runs: the
    parameters stay as they are, and the buffers (and int8 scales) it returns are copies of
    those the op's last call left (unchanged: test_gpu calls the op, then the reference, on
    the same step)."""
    def step(params, grads, bufs, scales=None, **hyper):
        int8 = scales is not None
        if not hyper.get("momentum"):
            return [None] * len(params), ([None] * len(params) if int8 else None)
        _, args, _ = rec.last_call["qmom"]
        out_bufs, out_scales = ([t.clone() for t in a] for a in args[1:3])
        return out_bufs, (out_scales if int8 else None)
    return step


@pytest.fixture
def jit_without_gpu(tmp_path, monkeypatch):
    """The stand-in driver, a fresh TRITON_CACHE_DIR, and the two seams of the replay; all
    undone after the test."""
    if tk.interpreting():
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernels are interpreted, no JIT")
    cache = tmp_path / "triton-cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    real_check = tk._check_device

    def check_device(t, name):  # CPU tensors stand in for CUDA ones; anything else is checked
        if t.device.type != "cpu":
            real_check(t, name)

    monkeypatch.setattr(tk, "_check_device", check_device)
    monkeypatch.setitem(_backends._PREFERENCE, "cpu", ("cpu", "triton"))
    with triton_stub_driver.stub_driver(list(KERNELS), ARCH):
        yield cache


def test_stub_driver_restores_triton():
    """stub_driver leaves Triton's driver and the kernels' in-memory caches as it found them."""
    if tk.interpreting():
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernels are interpreted, no JIT")
    drv = triton_stub_driver._DRIVER_CONFIG
    before = drv._active
    caches = tk._sgd_flat_kernel.device_caches
    with triton_stub_driver.stub_driver([tk._sgd_flat_kernel]) as stub:
        assert drv.active is stub and isinstance(stub, triton_stub_driver.StubDriver)
        assert tk._sgd_flat_kernel.device_caches is not caches
        assert len(tk._sgd_flat_kernel.device_caches) == 0
    assert drv._active is before
    assert tk._sgd_flat_kernel.device_caches is caches


def test_jit_replay_of_test_gpu(jit_without_gpu, monkeypatch):
    """Every Triton launch of tests/test_gpu.py, compiled by the JIT and checked (module doc).
    The count, with test_gpu's grid today: its 16 HYPER rows make 20 flag sets (MAXIMIZE,
    WEIGHT_DECAY, MOMENTUM, NESTEROV, FIRST_STEP; step 1 and later steps differ where momentum
    is on); per dtype the list kernel compiles once per flag set, the flat kernel twice (its
    span length n is a multiple of 16 for the "shapes" sizes, not for the others): 4 dtypes x
    (20 + 40) = 240 for test_sgd_bitwise_vs_torch_forloop; test_opcheck_on_gpu's flat segments
    add 2 flat specializations per dtype (248). The Momentum cases reuse flag sets and length
    classes already there. The tensor hyper-parameter test adds, per dtype and kernel, the
    step-1 and the later flag set with all four *_TENSOR flags on (16). A GradScaler test on
    the Triton backend (fp32 and bf16, flat and per-tensor, clip or not) adds 3 flag sets per
    kernel and dtype it runs: grad_scale + found_inf, clip_coef on the first step, clip_coef +
    found_inf (12 for two dtypes): 276. test_master_weights_bitwise_vs_fp32_torch's five
    hyper-parameter sets add 9 of the master kernel (step 1 and later steps where momentum is
    on); test_stochastic_rounding_bitwise_vs_reference's add 9 of the stochastic-rounding
    kernel: 294. test_momentum_dtype_bitwise_vs_reference adds 17 of the momentum_dtype kernel
    (bf16 and int8 buffers, first and later steps, bf16 without momentum) and
    test_qmom_opcheck_on_gpu 1: 312. test_fp16_master_bitwise_vs_reference adds 9 of the
    fp16 master kernel (its reference replaced like the momentum_dtype one,
    _fp16_master_reference_unchanged) and test_fp16_master_opcheck_on_gpu 1: 322 in all."""
    cache = jit_without_gpu
    cases = _triton_cases()
    assert cases, "tests/test_gpu.py has no case with backend='triton' to replay"
    assert test_gpu.STEPS >= REPLAY_STEPS
    monkeypatch.setattr(test_gpu, "STEPS", REPLAY_STEPS)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    state_only = {"on": False}
    monkeypatch.setattr(torch.optim.SGD, "step",
                        lambda self, closure=None: _sgd_state_only(self, state_only["on"]))
    monkeypatch.setattr(MomentumReference, "step", lambda self, closure=None: None)
    _replay_gradscaler_and_clip(monkeypatch)
    rec = _Recorder()
    monkeypatch.setattr(tk, "triton_sgd_step_flat_",
                        rec.wrap_entry(tk.triton_sgd_step_flat_, "flat"))
    monkeypatch.setattr(tk, "triton_sgd_step_list_",
                        rec.wrap_entry(tk.triton_sgd_step_list_, "list"))
    monkeypatch.setattr(tk, "triton_sgd_step_master_list_",
                        rec.wrap_entry(tk.triton_sgd_step_master_list_, "master"))
    monkeypatch.setattr(tk, "triton_sgd_step_sr_list_",
                        rec.wrap_entry(tk.triton_sgd_step_sr_list_, "sr"))
    monkeypatch.setattr(tk, "triton_sgd_step_qmom_list_",
                        rec.wrap_entry(tk.triton_sgd_step_qmom_list_, "qmom"))
    monkeypatch.setattr(tk, "triton_sgd_step_fp16_master_list_",
                        rec.wrap_entry(tk.triton_sgd_step_fp16_master_list_, "fp16_master"))
    # no kernel runs: the stochastic-rounding reference leaves the parameters as they are and
    # gives the buffers the optimizer creates (zeros), as the replayed step does
    monkeypatch.setattr(momentum_cuda.reference, "sgd_sr_reference_step",
                        lambda params, grads, bufs, keys, **h: [torch.zeros_like(p)
                                                                for p in params])
    # likewise the momentum_dtype reference: parameters unchanged, the op's buffers as left
    monkeypatch.setattr(momentum_cuda.reference, "sgd_momentum_dtype_reference_step",
                        _qmom_reference_unchanged(rec))
    # and the fp16 master-weights reference: parameters and masters unchanged
    fp16_ref = _fp16_master_reference_unchanged(rec)
    monkeypatch.setattr(momentum_cuda.reference, "sgd_fp16_master_reference_step", fp16_ref)
    if hasattr(test_gpu, "sgd_fp16_master_reference_step"):  # imported by name
        monkeypatch.setattr(test_gpu, "sgd_fp16_master_reference_step", fp16_ref)
    kernels = KERNELS
    t0 = time.perf_counter()
    try:
        for k in kernels:  # an instance attribute: deleting it brings back JITFunction.run
            k.run = rec.wrap_run(k)
        for fn, kw in cases:
            rec.case = fn.__name__
            state_only["on"] = "GradScaler" in inspect.getsource(fn)
            fn(**kw)
    finally:
        for k in kernels:
            vars(k).pop("run", None)
    wall = time.perf_counter() - t0

    problems = []
    keys = set()
    checked = set()
    for launch in rec.launches:
        entry, kernel, bound, ck = launch["entry"], launch["kernel"], launch["bound"], launch["ck"]
        if entry is None:
            problems.append(f"launch: {kernel.__name__} launched outside an entry point")
            continue
        name, dtype = kernel.__name__, entry["dtype"]
        keys.add(_spec_key(kernel, bound))
        flags, scalars = _expected(entry)
        got = {k: bound[k] for k in flags}
        if got != flags:
            problems.append(f"flags: {name} {SHORT[dtype]}: launched with {got}, the call "
                            f"asks for {flags}")
        got = {s: bound[s] for s in SCALARS}
        if got != scalars or not all(type(v) is float for v in got.values()):
            problems.append(f"scalars: {name} {SHORT[dtype]}: {got}, expected {scalars}")
        names = list(ck.src.signature)
        consts = {names[path[0]]: v for path, v in ck.src.constants.items()}
        if {k: consts.get(k) for k in flags} != flags:
            problems.append(f"constexprs: {name} {SHORT[dtype]}: compiled with "
                            f"{ {k: consts.get(k) for k in flags} }, launched with {flags}")
        if id(ck) not in checked:
            checked.add(id(ck))
            _check_compiled(ck, name, dtype, problems)

    n = len(rec.compiled)
    in_memory = sum(len(dc[0]) for k in kernels for dc in k.device_caches.values())
    cubins = len(list(cache.rglob("*.cubin")))
    per_kernel = Counter(ck.src.fn.__name__ for ck, _, _ in rec.compiled.values())
    by_dtype = Counter(SHORT.get(dtype) for _, dtype, _ in rec.compiled.values())
    by_case = Counter(case for _, _, case in rec.compiled.values())
    print(f"\n{n} JIT compilations in {rec.compile_s:.1f} s (triton {triton.__version__}, "
          f"sm_{ARCH}; {len(rec.launches)} launches from {len(cases)} tests/test_gpu.py cases "
          f"in {wall:.1f} s; " + ", ".join(f"{k} {v}" for k, v in sorted(per_kernel.items()))
          + "; per dtype: " + ", ".join(f"{d} {by_dtype[d]}" for d in SHORT.values())
          + "; first needed by: " + ", ".join(f"{k} {v}" for k, v in by_case.items()) + ")")

    if problems:
        kinds = Counter(p.split(":")[0] for p in problems)
        first = {}  # the first problem of each check, kernel and dtype
        for p in problems:
            first.setdefault(":".join(p.split(":")[:2]), p)
        pytest.fail(f"{len(problems)} problems ({dict(kinds)}) over {len(rec.launches)} launches "
                    f"and {n} compiled kernels; the first of each check, kernel and dtype:\n  "
                    + "\n  ".join(first.values()))
    assert rec.launches, "the replay launched no Triton kernel"
    # Each distinct specialization compiles once, and nothing else makes Triton compile again.
    assert n == len(keys), (f"{n} compilations, but the launches hold {len(keys)} distinct "
                            "specializations")
    assert in_memory == n, f"{in_memory} kernels in the JIT's in-memory caches, {n} compiled"
    assert cubins == n, f"{cubins} cubins in the fresh TRITON_CACHE_DIR, {n} compilations"


def _vector_ops(ptx, op):
    """How many 128-bit global accesses (ld / st) a PTX has: v4.b32 or v2.b64."""
    return len(re.findall(rf"\b{op}\.global(?:\.\w+)*\.(?:v4\.b32|v2\.b64)\b", ptx))


def test_jit_amp_variants(jit_without_gpu, monkeypatch):
    """GradScaler's and the clip's variants of both kernels, every dtype, compiled by the JIT
    through the entry points (on a 16-byte aligned span whose length is a multiple of 16, so the
    flat kernel is vectorised): grad_scale + found_inf + clip_coef, found_inf alone, none, and
    found_inf with first_step_tensor (capturable: the first step decided by the kernel, which
    loads the buffer and stores what the plain kernel stores).
    Each compiled kernel passes _check_compiled (with _check_amp_compiled: the pointers a flag
    turns off are never loaded, the reciprocal is cvt.rn.f32.f64(div.rn.f64(1.0, scale))), and
    its flags are the call's. In the flat kernel the gradient's write-back keeps the 128-bit
    width: with the gradient written, 3/2 the plain kernel's vector stores (p, buf and g
    instead of p and buf) and as many vector loads; found_inf alone stores what the plain
    kernel stores."""
    cache = jit_without_gpu
    rec = _Recorder()
    monkeypatch.setattr(tk, "triton_sgd_step_flat_",
                        rec.wrap_entry(tk.triton_sgd_step_flat_, "flat"))
    monkeypatch.setattr(tk, "triton_sgd_step_list_",
                        rec.wrap_entry(tk.triton_sgd_step_list_, "list"))
    h = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
             maximize=False, first_step=False)
    kernels = (tk._sgd_flat_kernel, tk._sgd_list_kernel)
    variants = ("plain", "all", "found_inf", "first")
    by = {}  # (kind, dtype, variant) -> CompiledKernel
    try:
        for k in kernels:
            k.run = rec.wrap_run(k)
        for dtype in ELEM:
            n = 4096
            p, g, b = (torch.zeros(n, dtype=dtype) for _ in range(3))
            assert all(t.data_ptr() % 16 == 0 for t in (p, g, b))
            amps = {"plain": {}, "found_inf": dict(found_inf=torch.zeros(1)),
                    "all": dict(grad_scale=torch.ones(1), found_inf=torch.zeros(1),
                                clip_coef=torch.ones(1, dtype=dtype)),
                    # capturable's first step decided by the kernel (first_step_tensor)
                    "first": dict(found_inf=torch.zeros(1), first_step=True,
                                  first_step_tensor=torch.ones((), dtype=torch.bool))}
            for variant in variants:
                kw = dict(h, **amps[variant])
                for kind in ("flat", "list"):
                    if kind == "flat":
                        tk.triton_sgd_step_flat_(p, g, b, torch.tensor([[0, n]]), **kw)
                    else:
                        tk.triton_sgd_step_list_([p], [g], [b], **kw)
                    by[kind, dtype, variant] = rec.launches[-1]["ck"]
    finally:
        for k in kernels:
            vars(k).pop("run", None)

    problems = []
    for launch in rec.launches:
        entry, kernel, bound = launch["entry"], launch["kernel"], launch["bound"]
        flags, _ = _expected(entry)
        got = {k: bound[k] for k in flags}
        if got != flags:
            problems.append(f"flags: {kernel.__name__}: launched with {got}, expected {flags}")
    for (kind, dtype, variant), ck in by.items():
        _check_compiled(ck, f"_sgd_{kind}_kernel", dtype, problems)
    for dtype in ELEM:
        plain, amp, skip, first = (by["flat", dtype, v].asm["ptx"] for v in variants)
        st, ld = _vector_ops(plain, "st"), _vector_ops(plain, "ld")
        if not (st and ld and _vector_ops(amp, "st") * 2 == st * 3
                and _vector_ops(amp, "ld") == ld and _vector_ops(skip, "st") == st
                and _vector_ops(skip, "ld") == ld and _vector_ops(first, "st") == st
                and _vector_ops(first, "ld") == ld):
            problems.append(f"vector: flat {SHORT[dtype]}: plain st/ld {st}/{ld}, all "
                            f"{_vector_ops(amp, 'st')}/{_vector_ops(amp, 'ld')}, found_inf "
                            f"{_vector_ops(skip, 'st')}/{_vector_ops(skip, 'ld')}")
    n = len(rec.compiled)
    print(f"\n{n} JIT compilations of the AMP variants in {rec.compile_s:.1f} s")
    assert not problems, "\n  ".join(problems)
    assert n == len(by) == 2 * len(ELEM) * len(variants), (n, len(by))
    assert len(list(cache.rglob("*.cubin"))) == n


def test_jit_qmom_kernel(jit_without_gpu, monkeypatch):
    """The momentum_dtype kernel compiled by the JIT through its entry point (tests/test_gpu.py's
    replay covers it only where test_gpu runs it on Triton): bf16 and int8 buffers and none
    (momentum 0), the first step and a later one with every flag on, on 16-byte aligned tensors
    and on views at an odd address. Each launch's constexprs are the call's (ALIGNED exactly
    for aligned addresses); each compiled kernel passes _check_compiled (fp64 scalars, int64
    tables, int_to_ptr to f32 and the buffer's i16 / i8, no bf16 conversion, int8: div.rn.f32
    and nothing else that divides, the codes' add.rn of 1.5 * 2^23; ALIGNED: 128-bit loads and
    stores, else none; fusion off, 4 warps, sm_90, a cubin); one compilation per
    specialization."""
    cache = jit_without_gpu
    rec = _Recorder()
    monkeypatch.setattr(tk, "triton_sgd_step_qmom_list_",
                        rec.wrap_entry(tk.triton_sgd_step_qmom_list_, "qmom"))
    n = 5000  # 4 full blocks and a partial one: both paths of the aligned kernel
    later = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True,
                 maximize=True, first_step=False)
    first = dict(later, nesterov=False, first_step=True)
    plain = dict(later, momentum=0.0, nesterov=False)

    def view(dtype, aligned):
        t = torch.zeros(n + 16, dtype=dtype)
        return t[:n] if aligned else t[1:n + 1]

    by = {}
    try:
        tk._sgd_qmom_kernel.run = rec.wrap_run(tk._sgd_qmom_kernel)
        for kind in ("bf16", "int8", "none"):
            for hname, h in (("later", later), ("first", first)):
                if kind == "none":
                    h = plain if hname == "later" else None
                if h is None:
                    continue
                for aligned in (True, False):
                    p, g = view(torch.float32, aligned), view(torch.float32, aligned)
                    bdt = torch.int8 if kind == "int8" else torch.bfloat16
                    b = [view(bdt, aligned)] if kind != "none" else []
                    s = [torch.zeros(-(-n // 256))] if kind == "int8" else []
                    tk.triton_sgd_step_qmom_list_([p], [g], b, s, **h)
                    by[kind, hname, aligned] = rec.launches[-1]["ck"]
    finally:
        vars(tk._sgd_qmom_kernel).pop("run", None)

    problems = []
    keys = set()
    for launch in rec.launches:
        entry, kernel, bound = launch["entry"], launch["kernel"], launch["bound"]
        keys.add(_spec_key(kernel, bound))
        flags, scalars = _expected(entry)
        got = {k: bound[k] for k in flags}
        if got != flags:
            problems.append(f"flags: launched with {got}, expected {flags}")
        if {s: bound[s] for s in SCALARS} != scalars:
            problems.append(f"scalars: {[bound[s] for s in SCALARS]}, expected {scalars}")
    for (kind, hname, aligned), ck in by.items():
        names = list(ck.src.signature)
        consts = {names[path[0]]: v for path, v in ck.src.constants.items()}
        if consts.get("ALIGNED") != aligned:
            problems.append(f"{kind} {hname}: ALIGNED {consts.get('ALIGNED')}, expected "
                            f"{aligned}")
        _check_compiled(ck, "_sgd_qmom_kernel", torch.float32, problems)
    compiled = len(rec.compiled)
    print(f"\n{compiled} JIT compilations of the momentum_dtype kernel in {rec.compile_s:.1f} s")
    assert not problems, "\n  ".join(problems)
    assert compiled == len(keys) == len(by) == 10, (compiled, len(keys), len(by))
    assert len(list(cache.rglob("*.cubin"))) == compiled


def test_jit_fp16_master_kernel(jit_without_gpu, monkeypatch):
    """The fp16 master-weights kernel compiled by the JIT through its entry point (the replay
    covers it only where tests/test_gpu.py runs it on Triton): with momentum (the first step and
    a later one with every flag on) and without, on 16-byte aligned tensors and on views at an
    odd address (fp16 2 bytes, fp32 4 bytes past a boundary). Each launch's constexprs and
    scalars are the call's (ALIGNED exactly for aligned addresses); each compiled kernel passes
    _check_compiled (fp64 scalars, int64 tables, int_to_ptr to i16 (the parameter's bits), f16
    (the gradient) and f32 (master, buffer), no conversion to fp16 and no division, the
    gradient widened by cvt.f32.f16; ALIGNED: 128-bit loads and stores, else none; fusion off,
    4 warps, sm_90, a cubin); one compilation per specialization."""
    cache = jit_without_gpu
    rec = _Recorder()
    monkeypatch.setattr(tk, "triton_sgd_step_fp16_master_list_",
                        rec.wrap_entry(tk.triton_sgd_step_fp16_master_list_, "fp16_master"))
    n = 5000  # 4 full blocks and a partial one: both paths of the aligned kernel
    later = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True,
                 maximize=True, first_step=False)
    first = dict(later, nesterov=False, first_step=True)
    plain = dict(later, momentum=0.0, nesterov=False)

    def view(dtype, aligned):
        t = torch.zeros(n + 16, dtype=dtype)
        return t[:n] if aligned else t[1:n + 1]

    by = {}
    try:
        tk._sgd_fp16_master_kernel.run = rec.wrap_run(tk._sgd_fp16_master_kernel)
        for hname, h in (("later", later), ("first", first), ("plain", plain)):
            for aligned in (True, False):
                p, g = view(torch.float16, aligned), view(torch.float16, aligned)
                m = view(torch.float32, aligned)
                b = [view(torch.float32, aligned)] if h["momentum"] else []
                tk.triton_sgd_step_fp16_master_list_([p], [g], b, [m], **h)
                by[hname, aligned] = rec.launches[-1]["ck"]
    finally:
        vars(tk._sgd_fp16_master_kernel).pop("run", None)

    problems = []
    keys = set()
    for launch in rec.launches:
        entry, kernel, bound = launch["entry"], launch["kernel"], launch["bound"]
        keys.add(_spec_key(kernel, bound))
        flags, scalars = _expected(entry)
        got = {k: bound[k] for k in flags}
        if got != flags:
            problems.append(f"flags: launched with {got}, expected {flags}")
        if {s: bound[s] for s in SCALARS} != scalars:
            problems.append(f"scalars: {[bound[s] for s in SCALARS]}, expected {scalars}")
    for (hname, aligned), ck in by.items():
        names = list(ck.src.signature)
        consts = {names[path[0]]: v for path, v in ck.src.constants.items()}
        if consts.get("ALIGNED") != aligned:
            problems.append(f"{hname}: ALIGNED {consts.get('ALIGNED')}, expected {aligned}")
        _check_compiled(ck, "_sgd_fp16_master_kernel", torch.float16, problems)
    compiled = len(rec.compiled)
    print(f"\n{compiled} JIT compilations of the fp16 master kernel in {rec.compile_s:.1f} s")
    assert not problems, "\n  ".join(problems)
    assert compiled == len(keys) == len(by) == 6, (compiled, len(keys), len(by))
    assert len(list(cache.rglob("*.cubin"))) == compiled
