"""momentum_cuda.SGD (a drop-in for torch.optim.SGD) and momentum_cuda.Momentum (the EMA form).

Both run the same kernel (sgd_math.h); Momentum is SGD's arithmetic with dampening = momentum, no
step-1 clone and the buffer starting at zero (momentum_cuda.reference has it in plain PyTorch).

Flat layout (flat=True, the default): on construction the parameters of each (param group,
device, dtype) that require grad are moved into one buffer and become views of it; gradients and
momentum buffers get matching flat buffers at the same offsets, and a step is ONE kernel call
over the whole span. Each parameter starts at a multiple of ALIGN_BYTES (64 bytes: a cache line,
the widest CPU vector (AVX-512) and a multiple of the 16 bytes a CUDA vector load needs); the
padding between parameters holds zeros: a flat call runs over it (CUDA, Triton, and the CPU for
fp32/fp64) and keeps it +0.0 in the parameter and momentum buffers (see _Bucket.covers_padding);
the CPU kernel skips it for bf16/fp16, whose bits depend on positions inside each tensor.

Gradients: p.grad is None exactly when torch's would be. zero_grad() (set_to_none=True) fills
each flat gradient buffer with -0.0 and sets every .grad to None, as torch does. A flat
parameter's gradient accumulator carries a pre-hook: when backward brings a dense gradient to a
parameter whose .grad is None and which is still in place, the hook sets .grad to the parameter's
flat view (holding -0.0) and autograd adds the gradient into it. -0.0 + g is g bit for bit (for
g = -0.0 too), so the view holds exactly the tensor torch would store. A sparse gradient, or a
parameter moved out of its buffer, is left to autograd, which stores its own tensor.

Which parameters move: only those whose storage nothing else can see (_private): every tensor
holding it is one of the optimizer's parameters (or a momentum_cuda flat buffer), they do not
overlap, and it is not shared memory. A parameter that is a view of a tensor the training code
keeps stays in it, so that tensor follows every step as with torch; parameters that overlap are
stepped with torch's own ops, one after the other, as torch's for-loop does. Two or more that
are alone in a storage and fill most of it (ZeRO's parameters_as_bucket_view) are stepped where
they are, by one flat call over that storage (_pinned). Gradients that are views of someone
else's storage (DDP's gradient_as_bucket_view buckets) are read in place: the parameters are
laid out at their gradients' offsets (_lenders), and one list call steps all such buckets of a
group. DTensor parameters (FSDP2) stay where they
are; the per-tensor kernels run on their local shards and their momentum buffers are DTensors
sharded like them.

Correctness never depends on the layout surviving: before every step each parameter is checked
(its data still at its flat offset, its .grad still the flat view and its memory, its buffer
still the flat view); any that is not goes through the per-tensor path, with the same
arithmetic. When a parameter that could be laid out is off the flat path (model.to() or
p.data = ... moved it; it was frozen, on meta or lazy when its group was laid out) the step
lays the group out again first: values, gradients and momentum buffers are copied over, and a
buffer of another dtype or layout than its parameter, or a gradient of another layout, stays as
torch keeps it.

What the kernels do not model runs torch's own for-loop ops, reported in opt.last_step:
complex parameters and sparse gradients (path "torch-ops": torch.optim.SGD steps complex
parameters in complex arithmetic, not through view_as_real, and sparse gradients with sparse
ops), and every step of an SGD built with differentiable=True (path "torch-differentiable",
under grad mode, as torch runs it; such an optimizer has no flat layout).

master_weights=True (a group's key, present only when set): its bf16 parameters are stepped
through exact fp32 masters held as the parameter plus state "master_remainder" and "master_ties"
(csrc/include/momentum_cuda/bf16_split.h), by the backend's master op (sgd_step_master_list_ on
cpu and cuda, its Triton twin; _step_modes), outside the flat layout; path "master" in
opt.last_step. stochastic_rounding=True (keys "stochastic_rounding" and "sr_seed", likewise)
steps them in fp32 and rounds them back to bf16 stochastically (sgd_step_sr_list_ and its
Triton twin; csrc/include/momentum_cuda/stochastic.h), their momentum buffers bf16; path
"stochastic-rounding".

momentum_dtype=torch.bfloat16 or torch.int8 (a group's key "momentum_dtype", present only when
set): the momentum buffers of its fp32 parameters are stored narrow (state "momentum_buffer"
bf16, or int8 codes with state "momentum_scales", one fp32 scale per 256 elements), stepped by
the backend's sgd_step_qmom_list_ (csrc/include/momentum_cuda/momentum_dtype.h: torch's fp32
step on the widened buffer, which is then stored narrow again), outside the flat layout; path
"momentum-dtype". opt.momentum_buffer(p) reads one back in fp32 and opt.torch_state_dict()
gives the whole state as torch.optim.SGD keeps it.

copy.deepcopy, pickle and torch.save of an optimizer give one with its own flat buffers over
the copied parameters (__setstate__ rebuilds the layout); it steps on with the same bits.

The kernels are dispatcher ops (momentum_cuda/_ops.py). While torch.compile traces step(), none
of the address bookkeeping above runs (_step_traced): one list op per (device, dtype) over the
tensors wherever they live. A 1-element fp32/fp64 tensor lr is read by the kernels on its
device. GradScaler hands the step its grad_scale and found_inf (_step_supports_amp_scaling):
the kernels unscale and skip on the device (the modes' replayed calls, _replay_mode: torch's
unscale, then their kernels skip; stochastic rounding reads found_inf on the host); a step
that would create momentum buffers reads
found_inf on the host first, so that an overflow-skipped first step leaves no state, or, with
capturable=True, leaves that to the device (_Unsure, over a bucket's or a list call's flag:
the buffers enter the state as the step makes them, and leave it again once the host has read
that every step using them was skipped), in a traced step too (_traced_held).
clip_grad_norm_ returns torch's total norm and leaves the multiply to the next step's kernels
(_Clip), which check first that the gradients are still the ones measured.
"""
from __future__ import annotations

import functools
import logging
import math
import numbers
import operator
import sys
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

from torch.optim.sgd import sgd as _torch_sgd

try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # torch built without distributed: nothing is a DTensor
    _DTensor = ()

from ._backends import _C, resolve_backend
from ._ops import fp16_master_op, master_op, qmom_op, sr_op, step_ops
from ._util import is_dense as _dense
from .reference import (QBLOCK, _bf16_rne, _memory_order, bf16_join, block_scales,
                        dequantize_momentum, momentum_reference_step, pack_ties,
                        quantize_momentum, sr_key, unpack_ties)

log = logging.getLogger("momentum_cuda")

ALIGN_BYTES = 64
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _dampening(x) -> float:
    """dampening as the ops take it (they compute alpha = 1 - dampening in double). torch's
    for-loop passes alpha=1 - dampening: for a tensor that is a tensor op in its dtype, so a
    float32 dampening gives 1 - d rounded to float32, not to double (for float64 parameters the
    two differ). The double returned is 1 - t for that t, so that 1 - (1 - t) == t exactly; it
    is, for every t of at most 24 significant bits in [2^-29, 2^30), and checked."""
    if not isinstance(x, torch.Tensor):
        if type(x) is float or isinstance(x, int):
            return float(x)
        # a number with arithmetic of its own (numpy.float32: torch's 1 - dampening is then a
        # float32 result): that 1 - x, as a double, is what the kernels must compute
        t = float(1 - x)
        d = 1.0 - t
        if math.isfinite(t) and 1.0 - d != t:
            raise ValueError(f"dampening={x!r}: 1 - dampening = {t!r} in {type(x).__name__} "
                             "cannot be passed to the kernels exactly; give it as a float")
        return d if math.isfinite(t) else float(x)
    if x.numel() != 1:
        raise ValueError(f"Tensor dampening must be 1-element, got shape {tuple(x.shape)}")
    if x.dtype is torch.float64 or not x.is_floating_point():
        return float(x.item())
    t = float((1 - x).item())
    d = 1.0 - t
    if math.isfinite(t) and 1.0 - d != t:
        raise ValueError(f"dampening={x!r}: 1 - dampening = {t!r} in {x.dtype} cannot be passed "
                         "to the kernels exactly; give dampening as a float or a float64 tensor")
    return d if math.isfinite(t) else float(x.item())


def _hyper_tensor(x, name: str):
    """A group's lr, momentum, dampening or weight_decay for the step: a float, or a 1-element
    fp32/fp64 tensor that does not require grad, which the kernels read on its device (torch's
    for-loop reads it with .item(); the kernels round it as torch's ops do: sgd_kernel.cuh,
    device_step). Other tensors are read here (dampening as _dampening reads it)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(x.shape)}")
        if x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
            return x if x.dim() == 0 else x.reshape(())
        return _on_host(name, x)
    if not _scalar(x) and not _numberlike(x):
        raise TypeError(f"{name} must be a number or a 1-element tensor, got {x!r} "
                        f"({type(x).__name__})")
    if name == "dampening":
        return _dampening(x)
    if name == "lr" and not isinstance(x, (bool, int, float)):
        try:  # torch's alpha is -lr in x's own arithmetic (a numpy uint wraps)
            return -float(-x)
        except TypeError as e:  # (numpy has no negative of a bool: torch fails there too)
            raise TypeError(f"lr={x!r}: torch.optim.SGD's alpha -lr fails: {e}") from e
    return float(x)


_HYPER_NAMES = ("lr", "momentum", "dampening", "weight_decay")


def _hyper_tensors_hold(tensors) -> bool:
    """The kept step's hyper-parameter tensors [(tensor, is lr, dtype, device)], changed in
    place since, are still what it was planned for: the same dtype and device (t.data = ...),
    none requires grad nor (but lr) has dimensions (torch's for-loop would use it otherwise:
    _raw_hyper), and one in host memory holds a finite value that every parameter dtype takes
    as an alpha (read in C++). Else the step is planned again, whose checks (_finite,
    _alpha_range) raise before anything is written."""
    top = _ALPHA_MAX[torch.float16]
    for t, lr, dtype, device in tensors:
        if t.dtype != dtype or t.device != device or t.numel() != 1 or t.requires_grad or (
                t.dim() and not lr) or (
                t.device.type == "cpu" and not abs(_C.host_value(t)) <= top):
            return False
    return True


def _scalar(x) -> bool:
    """x is a number torch's ops take as a Scalar argument (an add's alpha, a mul's factor): a
    bool, int or float, or a numpy bool, integer or float scalar."""
    if isinstance(x, (bool, int, float)):
        return True
    np = sys.modules.get("numpy")
    return np is not None and isinstance(x, np.generic) and x.dtype.kind in "biuf"


def _numberlike(x) -> bool:
    """x is a real number that torch's ops do not take as a Scalar (a Fraction, a Decimal, a
    numpy 0-d array): torch's for-loop uses it in its own arithmetic (-lr, 1 - dampening, `!=
    0`) and refuses it where it reaches an op, so such a group steps with torch's own ops
    (_raw_hyper), rehearsed."""
    if isinstance(x, numbers.Number):
        return not isinstance(x, complex)
    np = sys.modules.get("numpy")
    return (np is not None and isinstance(x, np.ndarray) and x.ndim == 0
            and x.dtype.kind in "biuf")


def _raw_hyper(group, ema: bool) -> dict | None:
    """The group's own lr, momentum, dampening and weight_decay where one is a tensor that
    torch's for-loop uses with other ops than the kernels model (None otherwise): one that
    requires grad (torch then steps with addcmul_, or refuses it as an alpha), and for SGD a
    momentum, dampening or weight_decay with dimensions (torch squeezes only lr: a momentum of
    shape (1,) takes part in type promotion; the others are refused as an alpha). For
    Momentum (MomentumReference) any such tensor with dimensions. Or a number torch's ops do
    not take (_numberlike). Such a group is stepped with torch's own ops, rehearsed first
    (_rehearse)."""
    names = ("lr", "momentum", "weight_decay") if ema else ("lr", "momentum", "dampening",
                                                            "weight_decay")
    vals = {n: group[n] for n in names}
    if not any(not _scalar(v) if not isinstance(v, torch.Tensor) else v.requires_grad or (
            v.dim() and (ema or n != "lr")) for n, v in vals.items()):
        return None
    m = vals["momentum"]
    if isinstance(m, torch.Tensor) and m.numel() == 1 and not bool(m != 0):
        vals["momentum"] = 0.0  # (torch's `momentum != 0`, read here: no buffers)
    if ema:
        vals["dampening"] = None  # (MomentumReference's 1 - momentum, from the tensor)
    return vals


def _unscale(grads, grad_scale) -> None:
    """grads (dense tensors) unscaled in place with torch's own op, as GradScaler._unscale_grads_
    does it: per (device, dtype), by float(1 / double(scale)). (Its found_inf is GradScaler's
    to compute; the one written here is not read.)"""
    inv = grad_scale.double().reciprocal().float()
    by: dict = {}
    for g in grads:
        by.setdefault((g.device, g.dtype), []).append(g)
    for (device, _), gs in by.items():
        torch._amp_foreach_non_finite_check_and_unscale_(gs, torch.zeros((), device=device),
                                                         inv.to(device))


def _on_host(name: str, t: torch.Tensor) -> float:
    """A hyper-parameter tensor read with .item(), as torch's for-loop reads it (dampening as
    _dampening reads it)."""
    return _dampening(t) if name == "dampening" else float(t.item())


def _mode_defaults(master_weights, stochastic_rounding, sr_seed, momentum_dtype=None) -> dict:
    """The group keys of the modes, present only when a mode is on (torch's groups, and
    state_dict, have none of them)."""
    if momentum_dtype not in _MOMENTUM_DTYPES:
        raise ValueError("momentum_dtype must be None, torch.float32, torch.bfloat16 or "
                         f"torch.int8, got {momentum_dtype!r}")
    narrow = {"momentum_dtype": momentum_dtype} if _MOMENTUM_DTYPES[momentum_dtype] else {}
    if master_weights and stochastic_rounding:
        raise ValueError("master_weights=True and stochastic_rounding=True exclude each other "
                         "(stochastic rounding is for bf16 parameters without a master)")
    if isinstance(sr_seed, bool) or not isinstance(sr_seed, int) or not 0 <= sr_seed < 2**32:
        raise ValueError(f"sr_seed must be an int in [0, 2**32), got {sr_seed!r}")
    if master_weights:
        return {"master_weights": True, **narrow}
    if stochastic_rounding:
        return {"stochastic_rounding": True, "sr_seed": sr_seed, **narrow}
    return narrow


# momentum_dtype's accepted values: whether each stores the buffer narrow (float32 is torch's)
_MOMENTUM_DTYPES = {None: False, torch.float32: False, torch.bfloat16: True, torch.int8: True}
# hyper-parameter values a replayed step may hold: the same object is the same value
_IMMUTABLE = (float, int, bool, type(None), torch.dtype)
# the group keys of the modes
_MODE_KEYS = ("master_weights", "stochastic_rounding", "sr_seed", "momentum_dtype")
# a mode's flag (in messages) and its path in opt.last_step
_MODE_FLAG = {"master": "master_weights=True", "master16": "master_weights=True",
              "sr": "stochastic_rounding=True", "qmom": "momentum_dtype"}
_MODE_PATH = {"master": "master", "master16": "master", "sr": "stochastic-rounding",
              "qmom": "momentum-dtype"}
# the state of the other master mode, which a parameter whose dtype changed leaves behind
_OTHER_MASTER = {"master": ("master_weight",), "master16": ("master_remainder", "master_ties")}


def _modes(group) -> tuple:
    """A group's (master_weights, stochastic_rounding, momentum_dtype): its bf16 (the first
    two) or fp32 (the last) parameters take the per-tensor ops of the modes."""
    return (bool(group.get("master_weights")), bool(group.get("stochastic_rounding")),
            group.get("momentum_dtype"))


def _narrow_buffer(buf, dtype):
    """An fp32 (or narrow) momentum buffer stored as momentum_dtype `dtype`: (buffer, scales or
    None); bf16 rounds to nearest even, int8 quantizes (reference.quantize_momentum)."""
    if buf.dtype == torch.int8:
        raise ValueError("an int8 momentum buffer is read with its scales (_wide_buffer)")
    if dtype is torch.bfloat16:
        return _bf16_rne(buf.float()), None
    return quantize_momentum(buf.float())


def _wide_buffer(buf, scales):
    """A momentum_dtype buffer (bf16, or int8 with its scales) read back in fp32, exactly as
    the kernels read it (a DTensor's int8 codes with the scales of its local shard's blocks)."""
    if buf.dtype == torch.int8:
        if isinstance(buf, _DTensor):
            return _as_dtensor(dequantize_momentum(buf._local_tensor, scales), buf)
        return dequantize_momentum(buf, scales)
    return buf.float()


def _block_marks(codes):
    """int16 laid out like the int8 codes: at the first element of each block (every QBLOCK-th
    in memory order) the block's size, else 0. Saved next to block_scales (the form a
    DTensor's scales take in state_dict(), sharded like its parameter), it tells
    load_state_dict whether a shard's blocks are the ones it was saved with (a block cut short
    or begun elsewhere by other shards shows)."""
    n = codes.numel()
    i = torch.arange(n, device=codes.device)
    marks = torch.where(i % QBLOCK == 0, torch.clamp(n - i, max=QBLOCK), 0).to(torch.int16)
    out = torch.empty_like(codes, dtype=torch.int16)
    _memory_order(out).copy_(marks.view(_memory_order(codes).shape))
    return out


def _scales_of_blocks(per_element, marks):
    """block_scales undone where this local shard's blocks are the ones it was saved with
    (its saved marks are _block_marks') and each holds one scale (bits compared: NaN scales
    too): the scales; else None."""
    flat = _memory_order(per_element).reshape(-1)
    if not torch.equal(_memory_order(marks).reshape(-1), _block_marks(flat)):
        return None
    scales = flat[::QBLOCK].contiguous()
    same = torch.equal(flat.view(torch.int32), block_scales(flat, scales).view(torch.int32))
    return scales if same else None


def _use_buf(h) -> bool:
    """Whether the step runs the momentum ops (torch: momentum != 0). A momentum tensor left
    in h is one whose buffers all exist (_FusedMomentum._plan, _group_hyper): they are given
    to the kernel, which reads the value and leaves them as they are where it is zero."""
    m = h["momentum"]
    return isinstance(m, torch.Tensor) or m != 0


# a master-weights parameter's state and its dtypes (load_state_dict keeps them)
_MASTER_STATE = {"momentum_buffer": torch.float32, "master_remainder": torch.int16,
                 "master_ties": torch.uint8, "master_weight": torch.float32}

_HYPER_TENSOR_ARGS = (("lr", "lr_tensor"), ("momentum", "momentum_tensor"),
                      ("dampening", "dampening_tensor"), ("weight_decay", "weight_decay_tensor"))


def _replayable_hyper(h, vals, devices) -> bool:
    """Whether a step planned with the hyper-parameters h from a group's values vals
    (_hyper_values), its calls on `devices`, may be replayed while the same objects stay
    there: each value immutable, or a tensor that h holds itself on the calls' device (the
    kernels read it at every step: filled in place, it changes no plan). A tensor read on the
    host instead (Momentum's momentum; one of another dtype or on another device; a momentum
    while buffers are made) is planned at every step."""
    held = [h[n] for n, _ in _HYPER_TENSOR_ARGS if isinstance(h[n], torch.Tensor)]
    if any(t.device != d for t in held for d in devices):
        return False
    ids = {id(t) for t in held}
    return all(type(v) in _IMMUTABLE or id(v) in ids for v in vals)


def _mode_args(h, first) -> tuple:
    """A mode op's positional arguments from the hyper-parameters h (as _hyper_args gives them),
    and its keywords: the hyper-parameter tensors."""
    return ((h["lr"], h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"],
             h["maximize"], first), {arg: h[arg] for _, arg in _HYPER_TENSOR_ARGS if arg in h})


def _finite(h) -> None:
    """The step's hyper-parameters h checked before any group is stepped: finite (a tensor in
    host memory read in C++, no Python host read; one in device memory is the kernel's to
    read, as torch's ops read it); nesterov off where momentum is 0, as torch's for-loop then
    takes the plain step."""
    if h.get("nesterov") and not isinstance(h["momentum"], torch.Tensor) and h["momentum"] == 0:
        h["nesterov"] = False
    if torch.compiler.is_compiling():
        # a float that dynamo traces unspecialised cannot be tested here (a graph break):
        # the ops check their scalars when the graph runs, before writing anything
        return
    for name in ("lr", "momentum", "dampening", "weight_decay"):
        v = h[name]
        if isinstance(v, torch.Tensor):
            if v.device.type == "cpu" and not math.isfinite(_C.host_value(v)):
                raise ValueError(f"{name} must be a finite number, got {v!r} (nothing was "
                                 "written)")
        elif not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v}")


# The largest finite value of each parameter dtype torch converts a Python-number alpha to
# (c10::checked_convert: above it, "value cannot be converted ... without overflow")
_ALPHA_MAX = {torch.float32: float(torch.finfo(torch.float32).max),
              torch.bfloat16: float(torch.finfo(torch.bfloat16).max),
              torch.float16: float(torch.finfo(torch.float16).max)}


def _alpha_range(h, plan) -> None:
    """torch's for-loop passes -lr, weight_decay, 1 - dampening (to a buffer that exists) and,
    with nesterov, momentum as the alpha of add/add_, converted to the parameter's dtype:
    where one does not fit, its step raises part-way (RuntimeError "value cannot be
    converted to type float without overflow"). The same is raised here, for the dtypes and
    buffers of the planned step, before anything is written."""
    def num(v):  # a tensor in host memory read in C++ (no Python host read); one in device
        return not isinstance(v, torch.Tensor) or v.device.type == "cpu"  # memory: unchecked
    def val(v):
        return _C.host_value(v) if isinstance(v, torch.Tensor) else v
    alphas = [("lr", val(h["lr"])) if num(h["lr"]) else None,
              ("weight_decay", val(h["weight_decay"]))
              if num(h["weight_decay"]) and val(h["weight_decay"]) != 0 else None,
              ("momentum", val(h["momentum"]))
              if h.get("nesterov") and num(h["momentum"]) else None]
    damp = (num(h["momentum"]) and val(h["momentum"]) != 0 and num(h["dampening"])
            and abs(1.0 - val(h["dampening"])) > _ALPHA_MAX[torch.float16])
    alphas = [a for a in alphas if a is not None and abs(a[1]) > _ALPHA_MAX[torch.float16]]
    if not alphas and not damp:
        return
    _, runs, checked = plan
    kinds = {(r[0].flat_param.dtype, not r[3]) for r in runs}  # (dtype, a buffer exists)
    kinds |= {(p.dtype, buf is not None) for p, _, buf, *_ in checked}
    for dtype, has_buf in sorted(kinds, key=str):
        top = _ALPHA_MAX.get(dtype)
        if top is None:
            continue
        for name, v in alphas + ([("1 - dampening", 1.0 - val(h["dampening"]))]
                                 if damp and has_buf else []):
            if abs(v) > top:
                raise RuntimeError(
                    f"{name} = {v!r}: value cannot be converted to type {dtype} without "
                    f"overflow (torch.optim.SGD's step raises this part-way; here nothing was "
                    f"written)")


_MEMORY_FORMATS = {4: (torch.contiguous_format, torch.channels_last),
                   5: (torch.contiguous_format, torch.channels_last_3d)}


def _same_layout(a, b) -> bool:
    """a places each element where b (of one shape) does: equal strides on every dimension of
    size other than 1, whose stride moves nothing (the kernels walk memory; the ops check the
    same). While dynamo traces, the strides of some gradients are symbols its .stride() cannot
    return (a size-1 dimension's; after a recompile, others): tensors both contiguous in one
    memory format (torch's, channels_last) are laid out alike without asking."""
    if a.dim() != b.dim():
        return False
    if not torch.compiler.is_compiling():
        if a.stride() == b.stride():
            return True
    else:
        for fmt in _MEMORY_FORMATS.get(a.dim(), (torch.contiguous_format,)):
            if a.is_contiguous(memory_format=fmt) and b.is_contiguous(memory_format=fmt):
                return True
    return all(a.stride(d) == b.stride(d) for d in range(a.dim()) if b.shape[d] != 1)


def _plain(t) -> bool:
    """t (a tensor, or None) is read as its memory holds it: no negative or conjugate view bit
    (torch's ops resolve those), not a ZeroTensor (no memory). _C.kernel_ready checks the same.
    While dynamo traces (which cannot ask), true."""
    return (t is None or torch.compiler.is_compiling()
            or not (t.is_neg() or t.is_conj() or t._is_zerotensor()))


def _clone_layout(t):
    """A tensor laid out as t.clone() would be (torch's first momentum buffer is the gradient's
    clone): t's own strides where t is dense, else the memory format torch suggests for it."""
    if torch.compiler.is_compiling() or _dense(t):
        return t
    return torch.empty_like(t, device="meta")


def _self_overlapping(t) -> bool:
    """Some elements of t share memory (a broadcast: a stride 0 on a dimension of size > 1), or
    torch cannot tell (a layout its check finds too hard). While dynamo traces (which cannot
    call torch's check), the stride-0 case."""
    if torch.compiler.is_compiling():
        return any(s == 0 and n != 1 for n, s in zip(t.shape, t.stride()))
    return torch._debug_has_internal_overlap(t) != 0


def _walked_alike(t, p) -> bool:
    """For bf16/fp16, whose bits depend on how torch's TensorIterator walks its operands
    (_torch_reason): t, laid out like p (_same_layout), is walked as if it had p's strides.
    TensorIterator's fast set-up takes operands all contiguous, or all channels_last, as one
    block whatever their size-1 strides; any other layout only with strides exactly equal
    (which a traced step cannot ask of a size-1 dimension: torch's ops then). _C.kernel_ready
    checks the same."""
    if not _same_layout(t, p):
        return False
    if p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(
            memory_format=torch.channels_last)):
        return True
    if torch.compiler.is_compiling() and any(n == 1 for n in p.shape):
        return False
    return t.stride() == p.stride()


@torch.compiler.disable(reason="momentum_cuda: parameters stepped with torch's own ops (path "
                                "'torch-ops' in opt.last_step) run eagerly, since a compiler "
                                "(inductor) would change their bits")
def _torch_ops_untraced(opt, items, h) -> list:
    """opt._torch_ops(items, h) for a traced step, outside the graph: inductor would fuse torch's
    ops (bf16: no rounding between them) and no longer give torch.optim.SGD's bits. A graph
    break, which fullgraph=True refuses with the reason above."""
    return opt._torch_ops(items, h)


@torch.compiler.disable(reason="momentum_cuda: torch's own step rehearsed on stand-ins before a "
                                "traced step puts a param group on torch's ops (_raw_hyper)")
def _rehearse_untraced(opt, items, h) -> None:
    """opt._rehearse(items, h), run eagerly while a step is traced: what torch's ops would refuse
    part-way raises before the graph's other groups are stepped."""
    opt._rehearse(items, h)


def _bump(tensors) -> None:
    torch.autograd.graph.increment_version(tensors)


def _observed_step(func):
    """step() as torch's Optimizer.profile_hook_step wraps it (the step hooks, global and the
    optimizer's, in its order; the profiler range "Optimizer.step#<class>.step"), that wrapper
    itself running whenever something can observe it: a hook is registered, a profiler records,
    or torch.compile traces. Otherwise the step runs without it: entering record_function
    dispatches a profiler op even with no profiler, as much host time as a flat step's own
    checks. Marked `hooked`, so that Optimizer.__init__ does not wrap it again."""
    observed = Optimizer.profile_hook_step(func)
    profiling = torch._C._autograd._profiler_enabled

    @functools.wraps(func)
    def step(*args, **kwargs):
        self = args[0]
        if (torch.compiler.is_compiling() or self._optimizer_step_pre_hooks
                or self._optimizer_step_post_hooks or _torch_optimizer._global_optimizer_pre_hooks
                or _torch_optimizer._global_optimizer_post_hooks or profiling()):
            return observed(*args, **kwargs)
        out = func(*args, **kwargs)
        self._optimizer_step_code()
        return out

    step.hooked = True
    return step


def _strided(t) -> bool:
    return t is None or t.layout == torch.strided


def _grad_hook(bucket_ref, i):
    """A pre-hook on the gradient accumulator (AccumulateGrad) of bucket.params[i]. It runs
    only when backward stores a gradient into .grad (torch.autograd.grad does not run it), before
    autograd reads .grad. A dense gradient for a parameter whose .grad is None and that is still
    in place gets the flat view, holding -0.0, as its .grad: autograd then adds the gradient into
    it, which gives torch's bits. Under create_graph (grad mode on) autograd would replace the
    view with a new tensor anyway, and a sparse gradient must stay sparse: both are left alone."""
    def hook(grad_outputs):
        b = bucket_ref()
        if b is None or torch.is_grad_enabled():
            return None
        g = grad_outputs[0]
        p = b.params[i]
        if p.grad is not None or g is None or g.layout != torch.strided or not b.intact(i):
            return None
        view = b.grad_views[i]
        if not b.holds_grad(i, view):
            # someone set .grad.data (e.g. Module._apply) or changed the view in place (t_()):
            # that tensor is theirs now
            view = b.grad_views[i] = b.new_grad_view(i)
            b.neg_zero[i] = False
            b.check = None
        if not b.neg_zero[i]:
            view.fill_(-0.0)
        b.neg_zero[i] = False
        p.grad = view
        return None
    return hook


def _layable(p) -> bool:
    """p could sit in a flat buffer, its storage aside (see _private): a dense float parameter
    that requires grad, materialised (not on meta, not a lazy module's uninitialised one), not
    a DTensor (FSDP2 keeps each local shard in its own storage, which it all-gathers from)."""
    return (not isinstance(p, _DTensor) and p.requires_grad and p.dtype in _DTYPES
            and p.device.type != "meta" and not is_lazy(p) and _dense(p))


def _lendable(p, g) -> bool:
    """g, p's gradient, could be read in place by a flat call (see _FusedMomentum._lenders):
    a dense view, laid out like p, of a storage of p's dtype and device that is larger than g
    or that another tensor holds too (DDP's bucket with this one gradient in it). Not a
    gradient alone in its own storage (autograd's, or p.grad = t): laying out for it would
    repeat at every step that brings a new one."""
    if not (g is not None and g.layout == torch.strided and not isinstance(g, _DTensor)
            and g.dtype == p.dtype and g.device == p.device and g.stride() == p.stride()
            and _dense(g)):
        return False
    if g.untyped_storage().nbytes() > g.numel() * g.element_size():
        return True
    return _HAS_USE_COUNT and _use_count(g) > _USE_COUNT_ONE


def _local(t):
    """A DTensor's local tensor (its shard on this rank); any other tensor (or None) itself."""
    return t._local_tensor if isinstance(t, _DTensor) else t


def _same_shards(p, *ts) -> bool:
    """Every t (None aside) is a DTensor sharded like the DTensor p: same mesh, placements
    and local shape, so the step is elementwise on the local shards."""
    spec, shape = p._spec, p._local_tensor.shape
    for t in ts:
        if t is None:
            continue
        if not isinstance(t, _DTensor):
            return False
        s = t._spec
        if not ((s.mesh is spec.mesh or s.mesh == spec.mesh) and s.placements == spec.placements
                and t._local_tensor.shape == shape):
            return False
    return True


def _master_mark(p) -> tuple:
    """What a write to (or a move of) a master-weights parameter changes: its address and
    version; for a DTensor, its local shard's address and version (a write to the shard alone,
    FSDP2 replacing it) and its own version (a write to the DTensor runs on the local shard
    below autograd, which leaves the shard's version as it was)."""
    if isinstance(p, _DTensor):
        lp = p._local_tensor
        return lp.data_ptr(), lp._version, p._version
    return p.data_ptr(), p._version


def _local_state(p, t, key: str):
    """The local shard of a DTensor parameter's state entry `key` (a DTensor sharded like
    it), raising for anything else (e.g. a whole tensor loaded from another layout)."""
    if not (isinstance(t, _DTensor) and _same_shards(p, t)):
        raise RuntimeError(f"master_weights=True: state {key!r} of the {_what(p)} must be a "
                           f"DTensor sharded like it, got a {type(t).__name__} with placements "
                           f"{getattr(t, 'placements', None)}")
    return t._local_tensor


def _shard_offset(p) -> int:
    """The index in the whole tensor (memory order: row-major, as the full parameter FSDP2
    gathers) of a DTensor's local shard's first element, for stochastic rounding, whose random
    bits follow that index. Raises where the local shard is not one run of the whole tensor
    (e.g. Shard(1) of a matrix, a _StridedShard) or the global layout is not row-major."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, local = tuple(p.shape), p._local_tensor
    if any(type(pl) not in (Shard, Replicate) for pl in p.placements) or not p.is_contiguous():
        raise RuntimeError(f"stochastic_rounding=True takes DTensor parameters sharded by Shard "
                           f"and Replicate placements over a row-major whole tensor; the "
                           f"{_what(p)} has placements {p.placements} and strides {p.stride()}")
    lshape, goff = compute_local_shape_and_global_offset(shape, p.device_mesh, p.placements)
    if local.numel() == 0:
        return 0
    cut = [d for d in range(len(shape)) if lshape[d] != shape[d]]
    if cut and (cut != [cut[0]] or any(shape[d] != 1 for d in range(cut[0]))):
        raise RuntimeError(f"stochastic_rounding=True needs each DTensor parameter's local "
                           f"shard to be one run of the whole tensor (its random bits follow "
                           f"the index in it); the {_what(p)} has a local shard of shape "
                           f"{tuple(lshape)} at {tuple(goff)}")
    stride = torch.empty(shape, device="meta").stride()
    return sum(o * st for o, st in zip(goff, stride))


def _as_dtensor(local, like):
    """local (this rank's shard) as a DTensor sharded like `like` (no copy)."""
    return _DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,
                               shape=like.shape, stride=like.stride())


def _storage_key(t) -> int:
    return t.untyped_storage().data_ptr()


# Flat parameter buffers of live buckets (of every optimizer), by storage address: each holds
# one reference to its storage, which _private counts as momentum_cuda's own.
_FLAT_STORAGES: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()
# Flat gradient buffers of live buckets (not lent ones), by storage address: their views are
# momentum_cuda's own gradients, never someone else's to lend (_lenders).
_FLAT_GRADS: "weakref.WeakValueDictionary[int, torch.Tensor]" = weakref.WeakValueDictionary()


def _use_count(t) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_HAS_USE_COUNT = hasattr(torch._C, "_storage_Use_Count")
# What _use_count reports for a storage that one tensor holds (calibrated, not assumed)
_USE_COUNT_ONE = _use_count(torch.empty(1)) if _HAS_USE_COUNT else 1


def _storages(everyone) -> dict:
    """storage key -> the tensors of `everyone` (all the optimizer's parameters; a DTensor's
    local shard) in that storage, for every storage with bytes (every empty one has address
    0). What _private, _pinned and _lenders compare against."""
    return _by([q for q in map(_local, everyone) if q.layout == torch.strided
                and q.device.type != "meta" and not is_lazy(q) and q.untyped_storage().nbytes()],
               _storage_key)


def _private(params, mine) -> set:
    """The ids of the params (layable ones) that may move into a flat buffer without anyone
    noticing: every tensor that holds their storage is one of the optimizer's parameters
    (mine: _storages) or a momentum_cuda flat buffer, no two of those overlap, and the
    storage is not shared memory (model.share_memory(): it must stay there). A parameter
    that is a view of a tensor the user holds, or that overlaps another, stays where it is:
    moving it would end the aliasing torch keeps."""
    # an empty storage has no bytes to share (and every such storage has address 0)
    out = {id(p) for p in params if not p.untyped_storage().nbytes()}
    for key, ps in _by([p for p in params if id(p) not in out], _storage_key).items():
        holders = mine.get(key, ps)
        if ps[0].device.type == "cpu" and ps[0].is_shared():  # (a CUDA storage is always)
            continue
        if _HAS_USE_COUNT:
            refs = _use_count(ps[0]) - _USE_COUNT_ONE + 1  # tensors holding the storage
            ok = refs == len(holders) + (key in _FLAT_STORAGES)
        else:  # no reference count: only a storage that is exactly one parameter's
            ok = len(holders) == 1 and ps[0].storage_offset() == 0 and (
                ps[0].untyped_storage().nbytes() == ps[0].numel() * ps[0].element_size())
        if ok and all(map(_dense, holders)) and not _overlapping(holders):
            out.update(map(id, ps))
    return out


def _alone(ts, known, containers=()) -> set:
    """The ids of the tensors ts (gradients or momentum buffers a relayout would move into a
    flat buffer) whose memory no one else sees: every tensor holding their storage is one of
    `known` (the optimizer's own: the parameters' gradients or the state's buffers, and the
    old flat buffer and views they may sit in), and it is not shared memory. Such a tensor
    moves with its identity kept (t.data = its flat view), so a reference the training code
    keeps follows it, as torch's tensor goes on being .grad or the buffer; any other stays
    where it is (its parameter takes the per-tensor path), as torch keeps it, aliases and
    all: so does one whose memory overlaps another known tensor's (a gradient made a view of
    another's), but for `containers` (old flat buffers, which span their views). Without a
    storage reference count, none moves."""
    if not _HAS_USE_COUNT:
        return set()
    def plain(t):  # a tensor with storage of its own (not a DTensor, meta, or a ZeroTensor)
        return (t is not None and not isinstance(t, _DTensor) and t.layout == torch.strided
                and t.device.type != "meta" and not t._is_zerotensor())
    def key(t):
        return (t.device, _storage_key(t))
    holders = _by({id(t): t for t in list(known) + list(containers) if plain(t)}.values(), key)
    outer = {id(t) for t in containers}
    out = set()
    for t in ts:
        if not plain(t) or (t.device.type == "cpu" and t.is_shared()):
            continue
        if not t.untyped_storage().nbytes():
            out.add(id(t))  # (no memory to share)
            continue
        mine = holders.get(key(t), ())
        if (any(h is t for h in mine)
                and _use_count(t) - _USE_COUNT_ONE + 1 == len(mine)):
            own = _span(t) if t.numel() else None
            if own is None or not any(
                    h is not t and id(h) not in outer and h.numel()
                    and _spans_overlap([own, _span(h)]) for h in mine):
                out.add(id(t))
    return out


def _by(items, key) -> dict:
    out: dict = {}
    for x in items:
        out.setdefault(key(x), []).append(x)
    return out


def _span(t) -> tuple:
    """(device type, index, first byte, end) of the memory a strided tensor spans."""
    n = t.numel() if t.is_contiguous() else 1 + sum(
        (k - 1) * st for k, st in zip(t.shape, t.stride()))
    d = t.device
    return (d.type, -1 if d.index is None else d.index, t.data_ptr(),
            t.data_ptr() + n * t.element_size())


def _overlaps(spans) -> set:
    """The indices of the spans (_span's tuples, none empty) that share memory with another:
    sorted by start, each is compared with the one reaching furthest before it."""
    out, far = set(), None  # far: the index of the span ending furthest so far
    for k in sorted(range(len(spans)), key=lambda k: spans[k]):
        s = spans[k]
        if far is not None and spans[far][:2] == s[:2] and spans[far][3] > s[2]:
            out.update((far, k))
        if far is None or spans[far][:2] != s[:2] or s[3] > spans[far][3]:
            far = k
    return out


def _spans_overlap(spans) -> bool:
    """Some two of the spans share memory."""
    return bool(_overlaps(spans))


def _sharing(ts) -> set:
    """The ids of the tensors among ts that share memory with another of them (the same object
    twice included)."""
    ts = [t for t in ts if t.layout == torch.strided and t.numel()]
    return {id(ts[k]) for k in _overlaps([_span(t) for t in ts])}


def _overlapping(ts) -> bool:
    """Some two of the tensors share memory (compared by address ranges, per device)."""
    if len(ts) < 2:
        return False
    return _spans_overlap([_span(t) for t in ts if t.layout == torch.strided and t.numel()])


def _padding(offsets, params, total, device) -> torch.Tensor:
    """The indices of the padding elements of a bucket (after each parameter up to the next)."""
    ends = torch.tensor([o + p.numel() for o, p in zip(offsets, params)], dtype=torch.int64)
    lens = torch.tensor(offsets[1:] + [total], dtype=torch.int64) - ends
    first = torch.cumsum(lens, 0) - lens  # where each parameter's padding starts in the result
    idx = torch.repeat_interleave(ends - first, lens) + torch.arange(int(lens.sum()))
    return idx.to(device)


def _joined(pairs) -> list:
    """(offset, numel) pairs with adjacent ones joined."""
    out: list = []
    for o, n in pairs:
        if out and out[-1][0] + out[-1][1] == o:
            out[-1][1] += n
        else:
            out.append([o, n])
    return out


def _merged(segments) -> torch.Tensor:
    """[k, 2] (offset, numel) segments with adjacent ones joined."""
    return torch.tensor(_joined(segments.tolist()), dtype=torch.int64).reshape(-1, 2)


def _remove_hooks(handles) -> None:
    for h in handles:
        h.remove()


_TORCH_OPS_WARNINGS = {
    "layout": "momentum_cuda: a gradient or momentum buffer in a memory layout whose bits "
              "torch's ops make depend on it (a bf16/fp16 gradient or a buffer in another "
              "layout than its parameter, a broadcast gradient, a first step's gradient in "
              "another layout: torch's buffer is its clone); stepping it with torch's own ops "
              "to keep torch's bits (slower). See opt.last_step.",
    "complex": "momentum_cuda: complex parameters are stepped with torch's own ops (torch.optim."
               "SGD updates them in complex arithmetic, which the kernels do not model). See "
               "opt.last_step.",
    "sparse": "momentum_cuda: sparse gradients (or momentum buffers) are stepped with torch's "
              "own sparse ops, as torch.optim.SGD does. See opt.last_step.",
    "hyper": "momentum_cuda: a hyper-parameter tensor of a param group requires grad, or has "
             "dimensions where torch's for-loop uses it as a tensor (not lr); stepping the "
             "group with torch's own ops, which use it as torch.optim.SGD does (slower). See "
             "opt.last_step.",
    "alias": "momentum_cuda: tensors of a param group's step share memory (parameters, "
             "gradients or momentum buffers); stepping the group with torch's own ops, one "
             "parameter after the other as torch.optim.SGD does (slower). See opt.last_step.",
    "strided": "momentum_cuda: parameters that are not dense in memory (e.g. a strided slice) "
               "are stepped with torch's own ops (slower). See opt.last_step.",
    "dtensor": "momentum_cuda: a DTensor parameter's gradient or momentum buffer is sharded "
               "differently (another mesh, placements or local shape); stepping it with "
               "torch's own DTensor ops, which redistribute as torch.optim.SGD's do (slower). "
               "See opt.last_step.",
    "meta": "momentum_cuda: parameters on the meta device are stepped with torch's own ops. "
            "See opt.last_step.",
    "view": "momentum_cuda: a parameter, gradient or momentum buffer is a negative or "
            "conjugate view or a ZeroTensor, which torch's ops resolve; stepping it with "
            "torch's own ops (slower). See opt.last_step.",
    "dtype": "momentum_cuda: a momentum buffer or gradient has another dtype than its "
             "parameter (e.g. after model.to(dtype) or model.half()); stepping it with torch's "
             "own ops, which mix the dtypes as torch.optim.SGD does (slower). See "
             "opt.last_step.",
}


def _what(p) -> str:
    return f"parameter of shape {tuple(p.shape)} ({p.dtype}, {p.device})"


def _same_params(lay, group) -> bool:
    """The group holds the parameters its layout was made for, in order (by identity)."""
    return _C.same_objects(lay.params, group["params"])


@dataclass
class _GroupLayout:
    """What the flat layout made of one param group. `group` is held, so its id cannot be
    reused while the layout exists; `params` are its parameters when it was made."""

    group: dict
    params: tuple
    buckets: list
    outside: list
    # id -> data_ptr() of parameters that could be laid out but must stay where they are
    # (_private); step() lays the group out again when any other parameter outside the
    # buckets could be, or when a bucketed one has moved (model.to(), p.data = ...).
    stuck: dict = field(default_factory=dict)
    spans: list | None = None  # (data_ptr, nbytes) of the parameters _overlap last looked at
    overlap: bool = False
    # the group's _modes when laid out (the parameters of a mode stay out)
    master: tuple = (False, False, None)
    # the buckets of the layout this one replaced, until _adopt_buffers has moved their
    # momentum buffers (_alone counts their flat buffers and views as the optimizer's own)
    retired: list = field(default_factory=list)


@dataclass
class _Bucket:
    """The flat buffers of one (param group, device, dtype)."""

    params: list
    offsets: list
    flat_param: torch.Tensor
    flat_grad: torch.Tensor
    grad_views: list  # tensors over flat_grad, one per parameter (set_, not autograd views)
    gptrs: list  # data_ptr() of each gradient view (a .grad.data = ... replaces it)
    segments: torch.Tensor  # [k, 2] int64 (offset, numel) on CPU
    ptrs: list  # data_ptr() each parameter must still have
    numel_before: list  # numel_before[i]: elements of params[:i], for reports
    meta: list  # (shape, stride) of each parameter when laid out
    backend: str
    flat_buf: torch.Tensor | None = None
    buf_views: list = field(default_factory=list)
    # neg_zero[i]: grad_views[i] holds -0.0 (filled since it was last attached), so the hook
    # can attach it without filling it first.
    neg_zero: list = field(default_factory=list)
    # A flat step is one call over a covering span, padding included (on the CPU only for
    # fp32/fp64: one span instead of a segment per parameter, and torch's fp32/fp64 bits do not
    # depend on positions, docs/numerics.md; bf16/fp16 run the exact segments). The gradient
    # padding is -0.0 after zero_grad(), +0.0 after zero_grad(set_to_none=False). Any step
    # keeps the parameter padding +0.0 (fma(+-0, -lr, +0) is +0.0) and so does a momentum
    # update of +0.0 buffer padding (fma(+-0, 1-d, +0 * m) is +0.0); but a first step copies
    # the gradient (buf = g, negated by maximize), which leaves -0.0 for some flag set whatever
    # the gradient padding's sign: so the buffer padding is reset after a covering first step.
    covers_padding: bool = False
    pad_index: torch.Tensor | None = None  # the padding elements, on the buffers' device
    accs: list = field(default_factory=list)  # the gradient accumulators the hooks sit on
    hooks: list = field(default_factory=list)  # the hooks' handles
    # lent: flat_grad is not ours but the storage the gradients already are views of (DDP's
    # gradient bucket with gradient_as_bucket_view=True), the parameters sit at the same
    # offsets in flat_param: the kernel reads the gradients in place. Nothing here writes it
    # (no hooks, no -0.0 fill); grad_views are the gradient tensors seen when laid out.
    lent: bool = False
    # flat_buf's StorageImpl (its untyped_storage()._cdata): each buffer view must be over it,
    # at its parameter's offset (_C.BucketCheck compares both)
    buf_storage: int = 0
    # pinned: flat_param is the storage the parameters already are views of (_pinned): they
    # cannot move to where a lender's gradients are
    pinned: bool = False
    # the segments of a whole-bucket run: the covering span, or adjacent ones merged (a GPU)
    whole: torch.Tensor | None = None
    check: object | None = None  # _C.BucketCheck over params, grad_views, ptrs, gptrs, flats
    spans: list | None = None  # span_views()
    entry: dict | None = None  # last_step's entry for a whole-bucket run
    op: object | None = None  # the backend's flat op, and flat_param's device, looked up once
    device: torch.device | None = None
    # buffers (flat_buf's views) whose first step was decided on the device, not yet in the
    # state: _Unsure, over first_flag (made with the bucket: a CUDA graph captured later must
    # not hold the kernel that sets it; true whenever no _Unsure holds it)
    unsure: _Unsure | None = None
    first_flag: torch.Tensor | None = None

    def run_segments(self, i0: int, i1: int) -> torch.Tensor:
        """The segments one flat call runs for params[i0:i1]: one covering span
        (covers_padding: a GPU, or fp32/fp64 on the CPU; the whole bucket's kept), else the
        exact segments; on a GPU (a pinned bucket) adjacent ones are merged for a whole
        bucket. Not on the CPU, whose bf16/fp16 bits depend on positions inside each tensor,
        as torch's do."""
        if self.covers_padding:
            if i0 == 0 and i1 == len(self.params):
                if self.whole is None:
                    self.whole = self.cover(i0, i1)
                return self.whole
            return self.cover(i0, i1)
        if i0 == 0 and i1 == len(self.params):
            if self.backend == "cpu":
                return self.segments
            if self.whole is None:
                self.whole = _merged(self.segments)
            return self.whole
        return self.segments[i0:i1]

    def runs_segments(self, ranges) -> torch.Tensor:
        """run_segments of several runs [(i0, i1, ...), ...] (in order, apart), for one flat
        call over all of them."""
        if len(ranges) == 1:
            return self.run_segments(*ranges[0][:2])
        if self.covers_padding:  # (one tensor, not one per run: cover's rows)
            return torch.tensor([self.cover_row(r[0], r[1]) for r in ranges],
                                dtype=torch.int64)
        return torch.cat([self.run_segments(r[0], r[1]) for r in ranges])

    def count(self, ranges) -> tuple[int, int]:
        """(parameters, elements) of runs [(i0, i1, ...), ...]."""
        return (sum(r[1] - r[0] for r in ranges),
                sum(self.numel_before[r[1]] - self.numel_before[r[0]] for r in ranges))

    def span_views(self, use_buf: bool) -> list:
        """(param, grad, buffer) 1-D views a list call steps for the whole bucket (a lent one):
        one per run of adjacent parameters where positions do not change the bits (a GPU;
        fp32/fp64 on the CPU), else one per parameter (the CPU's bf16/fp16 bits depend on
        positions inside each tensor, as torch's do). Kept until the buffer appears."""
        if self.spans is None or (use_buf and self.spans[0][2] is None):
            merge = self.backend != "cpu" or self.flat_param.dtype in (torch.float32,
                                                                        torch.float64)
            # (from the offsets, not the segments tensor: no tensor is read in a step)
            segs = [(o, p.numel()) for o, p in zip(self.offsets, self.params)]
            fb = self.flat_buf
            self.spans = [(self.flat_param.narrow(0, o, n), self.flat_grad.narrow(0, o, n),
                           None if fb is None else fb.narrow(0, o, n))
                          for o, n in (_joined(segs) if merge else segs)]
        return self.spans

    def bump(self, i0: int, i1: int) -> None:
        """The op wrote params[i0:i1] through the flat buffer: tell autograd, as torch's
        in-place ops do (a parameter saved for backward and then stepped must raise, not
        silently differ). The op bumped the flat buffers and so the buffer views (autograd views
        of flat_buf); the parameters are not autograd views of flat_param: own counters."""
        self.checker().bump(i0, i1)

    def checker(self):
        """The bucket's _C.BucketCheck (made again when a gradient view is replaced)."""
        if self.check is None:
            self.check = _C.BucketCheck(self.params, self.grad_views, self.ptrs, self.gptrs,
                                        self.flat_param, self.flat_grad, self.meta)
        return self.check

    def intact(self, i: int) -> bool:
        """params[i] is still the view of flat_param the layout made (its gradient view fits)."""
        p, v = self.params[i], self.flat_grad
        return (p.data_ptr() == self.ptrs[i] and p.dtype == v.dtype and p.device == v.device
                and (p.shape, p.stride()) == self.meta[i] and _plain(p))

    def holds_grad(self, i: int, g) -> bool:
        """g is params[i]'s flat gradient view, still over its place in flat_grad, with its
        shape, strides and dtype (t_() or .data = another view keep the address)."""
        return (g is self.grad_views[i] and g.data_ptr() == self.gptrs[i]
                and g.dtype == self.flat_grad.dtype and (g.shape, g.stride()) == self.meta[i]
                and _plain(g))

    def new_grad_view(self, i: int) -> torch.Tensor:
        """A tensor over params[i]'s place in flat_grad (set_, so that autograd sees a plain
        tensor, not a view whose base it would track)."""
        p = self.params[i]
        return torch.empty(0, dtype=self.flat_grad.dtype, device=self.flat_grad.device).set_(
            self.flat_grad.untyped_storage(), self.offsets[i], p.shape, p.stride())

    def fill_neg_zero(self) -> None:
        """Every gradient view to -0.0, in one pass over the whole buffer."""
        self.flat_grad.fill_(-0.0)
        self.neg_zero = [True] * len(self.params)

    def reset_buf_padding(self) -> None:
        """The momentum buffer's padding back to +0.0 (after a covering first step)."""
        if self.pad_index is None:
            self.pad_index = _padding(self.offsets, self.params, self.flat_param.numel(),
                                      self.flat_param.device)
        if self.pad_index.numel():
            self.flat_buf.index_fill_(0, self.pad_index, 0.0)

    def cover(self, i0: int, i1: int) -> torch.Tensor:
        """One segment from params[i0] to the end of params[i1 - 1], padding included: what a
        GPU runs in one flat launch (the padding holds zeros: see covers_padding)."""
        return torch.tensor([self.cover_row(i0, i1)], dtype=torch.int64)

    def cover_row(self, i0: int, i1: int) -> list:
        """cover's segment, [offset, numel]."""
        end = self.offsets[i1 - 1] + self.params[i1 - 1].numel()
        return [self.offsets[i0], end - self.offsets[i0]]

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        return flat.as_strided(p.shape, p.stride(), self.offsets[i])

    def ensure_buf(self) -> None:
        if self.flat_buf is None:
            self.flat_buf = torch.zeros_like(self.flat_param)
            self.buf_views = [self.view(self.flat_buf, i) for i in range(len(self.params))]
            self.buf_storage = self.flat_buf.untyped_storage()._cdata

    def run_spans(self, ranges, use_buf) -> list:
        """(device, address, bytes) of each run's memory (i0, i1, ...) in flat_param,
        flat_grad and (use_buf) flat_buf, from the first parameter's offset to the last's end."""
        out = []
        for i0, i1, *_ in ranges:
            off0 = self.offsets[i0]
            off1 = self.offsets[i1 - 1] + self.params[i1 - 1].numel()
            for t in (self.flat_param, self.flat_grad, self.flat_buf if use_buf else None):
                if t is not None and off1 > off0:
                    es = t.element_size()
                    out.append((t.device, t.data_ptr() + off0 * es, (off1 - off0) * es))
        return out

    def holds_buf(self, i: int, buf) -> bool:
        """buf is params[i]'s flat buffer view, still over its place in flat_buf (buf.data =
        or buf.set_ would have given it other memory)."""
        return (self.flat_buf is not None and buf is self.buf_views[i]
                and buf.untyped_storage()._cdata == self.buf_storage
                and buf.storage_offset() == self.params[i].storage_offset()
                and buf.dtype == self.flat_buf.dtype and (buf.shape, buf.stride()) == self.meta[i]
                and _plain(buf))


@dataclass
class _ListCall:
    """One per-tensor list call of a step, kept for the next (_step_steady replays it): its op
    ("plain": sgd_step_list_; else the mode's), backend, device, the lists it was given but the
    gradients, its hyper-parameters and last_step entry; `keys` the state entries it used and
    `held` their objects per parameter, `watch` whether the parameters' version counters count
    (master weights). `check`, the _C.ListCheck over them that reads the gradients again, is
    made only when the step is kept (_keep_steady). sr: (sr_seed, each parameter's stream) for
    stochastic rounding, whose keys are made at every step from the state's sr_step."""

    mode: str
    backend: str
    device: torch.device
    ps: list
    bs: list
    xs: list
    ys: list
    h: dict
    keys: list
    held: list
    watch: bool
    entry: dict
    sr: tuple | None = None
    dts: list | None = None  # the DTensor parameters whose local shards ps are (FSDP2)
    check: object = None
    bump: list | None = None  # DTensors whose version counters the op's writes bump

    def arm(self) -> _ListCall:
        if self.dts is None:
            self.check = _C.ListCheck(self.ps, True, self.keys, self.held,
                                      [self.watch] * len(self.ps))
        else:
            own = {"momentum_buffer": self.bs, "master_weight": self.xs,
                   "master_remainder": self.xs, "master_ties": self.ys,
                   "momentum_scales": self.xs}
            locals_ = [[own[key][k] for key in self.keys] for k in range(len(self.ps))]
            self.check = _ShardCheck(self.dts, self.ps, self.keys, self.held, locals_,
                                     self.watch)
            self.bump = self.dts + [h for held in self.held for h in held
                                    if isinstance(h, _DTensor)]
        return self


@dataclass
class _LentCall:
    """The one list call over whole lent buckets' span views (DDP's gradient buckets read in
    place) that _step_flat ran for a (backend, device, dtype), kept for the next step
    (_step_steady replays it while each bucket's check passes): its op and lists (parameter,
    gradient and buffer spans), its hyper-parameters (_hyper_args) and last_step entry."""

    buckets: list
    use_buf: bool
    device: torch.device
    op: object
    lists: tuple
    h: dict
    entry: dict


@dataclass
class _FlatCall:
    """The flat call over a bucket's runs that _step_flat made (the whole bucket, or the runs
    of one stepped in part: its other parameters have no gradient), kept for the next step:
    `check` a _C.BucketCheck of the runs' parameters, gradient views and (`buf_views`, or None
    without a flat buffer) momentum buffer views (the whole bucket's: the bucket's own), the
    op's arguments (the runs' segments), its hyper-parameters (_hyper_args) and last_step
    entry; `n` its parameters; `mem` the (device, address, bytes) spans of its runs in the
    flat parameter, gradient and buffer (_forbid)."""

    b: object
    n: int
    use_buf: bool
    check: object
    buf_views: list | None
    args: tuple
    h: dict
    entry: dict
    mem: list


class _ShardCheck:
    """_C.ListCheck's check for a list call over the local shards of DTensor (FSDP2)
    parameters, in Python (the shards sit behind DTensor attributes): each DTensor's local
    shard the one the call stepped, at its address with its sizes and strides, and with
    `watch` (masters) over the same storage (new memory at the old address: a stale master)
    at the version the call left it; its gradient a DTensor sharded like it
    (_same_shards) whose shard is laid out like the parameter's; each of its state entries
    `keys` the DTensor the call used, over the same local tensor (bf16 masters' tie bits and
    int8 scales: the plain tensors held per shard), unchanged in layout. Returns the
    gradients' local shards, or None."""

    def __init__(self, dts, shards, keys, held, locals_, watch):
        self.items = [(dt, lp, lp.data_ptr(), lp.shape, lp.stride(), lp.dtype,
                       [(key, h, t, (t.shape, t.stride(), t.dtype))
                        for key, h, t in zip(keys, held[k], locals_[k])])
                      for k, (dt, lp) in enumerate(zip(dts, shards))]
        self.watch = watch
        self.marks = [_master_mark(dt) for dt, *_ in self.items]
        self.storages = [weakref.ref(lp.untyped_storage()) for _, lp, *_ in self.items]

    def check(self, state):
        out = []
        for (dt, lp, ptr, shape, stride, dtype, entries), mark, storage in zip(
                self.items, self.marks, self.storages):
            g = dt.grad
            if (dt._local_tensor is not lp or lp.data_ptr() != ptr or lp.shape != shape
                    or lp.stride() != stride or lp.dtype != dtype
                    or (self.watch and (_master_mark(dt) != mark
                                        or storage() is not lp.untyped_storage()))
                    or not isinstance(g, _DTensor) or not _same_shards(dt, g)):
                return None
            lg = g._local_tensor
            if (lg.layout != torch.strided or lg.shape != shape or lg.stride() != stride
                    or lg.dtype != dtype or lg.device != lp.device):
                return None
            st = state.get(dt) if entries else None
            for key, h, t, layout in entries:
                if (st is None or st.get(key) is not h or _local(h) is not t
                        or (t.shape, t.stride(), t.dtype) != layout):
                    return None
            out.append(lg)
        return out

    def commit(self, seen) -> None:
        """After a replay: the versions it left (and the optimizer's _master_seen, by DTensor)."""
        self.marks = [_master_mark(dt) for dt, *_ in self.items]
        for (dt, *_), mark in zip(self.items, self.marks):
            seen[id(dt)] = mark


def _by_bucket(runs) -> list:
    """_plan's runs ([bucket, i0, i1, first step, new buffers]) as flat calls: [bucket, first
    step, [(i0, i1, new buffers), ...]], consecutive runs of a bucket with the same first step
    together (a bucket stepped in part: one call over its runs), but where the bucket's first
    step is left to the device (_Unsure: a whole bucket, one run, _plan)."""
    calls = []
    for b, i0, i1, first, new in runs:
        if calls and calls[-1][0] is b and calls[-1][1] == first and b.unsure is None:
            calls[-1][2].append((i0, i1, new))
        else:
            calls.append([b, first, [(i0, i1, new)]])
    return calls


def _bucket_holds(b, state, use_buf) -> bool:
    """The kept whole-bucket run of b still holds (_C.BucketCheck, one C++ pass): each parameter
    where the layout put it, its gradient the view the run read, its buffer the flat view (or,
    without momentum, none read)."""
    check = b.check
    return check is not None and not check.check(state if use_buf else None,
                                                 b.buf_views if b.flat_buf is not None else None,
                                                 b.buf_storage)


def _forbid(calls) -> None:
    """Tells each kept list call's check the memory its gradients must not share at a replay:
    every parameter, buffer (and the modes' state) of the kept step, and the flat calls'
    segments of parameters, gradients and buffers (_C.ListCheck.forbid)."""
    lists = [c for c in calls if type(c) is _ListCall]
    if not lists:
        return
    spans = []
    for c in calls:
        if type(c) is _ListCall:
            ts = c.ps + c.bs + c.xs + c.ys
        elif type(c) is _LentCall:
            ts = [t for ls in c.lists for t in ls]
        else:  # (_FlatCall: its runs' spans of parameters, gradients and buffers)
            spans += c.mem
            continue
        for t in ts:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.numel():
                d, _, lo, hi = _span(_local(t))
                spans.append((t.device, lo, hi - lo))
    for c in lists:
        if c.dts is None:  # (a _C.ListCheck; FSDP2's shards take _ShardCheck)
            c.check.forbid([(lo, n) for d, lo, n in spans if d == c.device])


class _Apart:
    """A bucket a kept step ran none of flat (its parameters' gradients were elsewhere, e.g.
    p.grad = g): check() passes (True) while none of them holds its flat gradient view, which
    _plan would step flat again, else None."""

    def __init__(self, b):
        self.b = b

    def check(self, state):
        return None if self.b.checker().any_intact() else True


_profiling = torch._C._autograd._profiler_enabled


def _capturing() -> bool:
    """A CUDA graph is being captured on the current stream (no host read can run)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _Unsure:
    """The first step of a bucket's momentum buffers decided on the device (capturable=True):
    under GradScaler, whether the step that creates them is skipped is known only where
    found_inf lives, and torch's for-loop (GradScaler reads found_inf and skips the whole step)
    then holds no buffer. The buffers (the bucket's flat views) enter the state as that step
    makes them, and `flag` (a bool on the buffers' device, the bucket's first_flag) says
    whether every step that used them was skipped: the kernels read it as first_step_tensor
    (a first step while it is true), each such step ands it with found_inf != 0 (no host
    sync). The host reads it when it is back (update(), never()): if no step updated the
    buffers they leave the state again (hidden: kept made and zeroed for the next step, which
    a CUDA graph may capture); if one did, this ends and the flag is set true again
    (_FusedMomentum._settle_unsure)."""

    # whether a flag in host memory is read as soon as a step has set it (tests set False to
    # run the CPU as a GPU whose copy has not come back yet: only never(wait=True) reads it)
    host_ready = True
    __slots__ = ("flag", "host", "event", "hidden", "nones")

    def __init__(self, flag):
        self.flag = flag
        self.host = self.event = None
        self.hidden = False  # the buffers were taken out of the state (never stepped)
        # id(p) of the parameters whose momentum_buffer entry held None when the buffer was
        # put in (torch's skipped step leaves that None there)
        self.nones: set = set()

    def show(self, opt, p, buf) -> bool:
        """opt._keep_buffer(p, buf), remembering an entry that held None."""
        st = opt.state.get(p)
        if st is not None and "momentum_buffer" in st and st["momentum_buffer"] is None:
            self.nones.add(id(p))
        return opt._keep_buffer(p, buf)

    def update(self, found_inf) -> None:
        """After a step that used the flag: false unless found_inf != 0 skipped it, and on a
        GPU (not while a CUDA graph is captured) on its way to pinned host memory."""
        if found_inf is None:
            self.flag.fill_(False)
        else:
            self.flag.logical_and_(found_inf)
        self.event = None
        # (traced by torch.compile: read when waited for)
        if (self.flag.device.type == "cuda" and not torch.compiler.is_compiling()
                and not _capturing()):
            if self.host is None:
                self.host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self.host.copy_(self.flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def never(self, wait: bool) -> bool | None:
        """Whether no step updated the buffers; None while the host cannot know without
        waiting (wait=True: a sync on a GPU)."""
        if self.flag.device.type == "cpu":
            return bool(self.flag.numpy()) if wait or self.host_ready else None
        if wait:
            return bool(self.flag.item())
        if self.event is not None and not _capturing() and self.event.query():
            return bool(self.host.numpy())
        return None


class _LooseFirst:
    """A bucket's _Unsure for the per-tensor path (capturable=True): the parameters of one
    list call whose momentum buffers that call made (DTensors, whose local shards it steps,
    with their DTensor buffers; a bucket's parameters whose first step is not the whole
    bucket's), or a part of another's (or of a bucket's _Unsure) that a step split off with a
    copy of its flag (_split_flag), with the flag (first_flag) its op reads as
    first_step_tensor. Laid out as a bucket is for _settle_unsure (params, buf_views: the
    buffers as the state holds them, unsure, first_flag). Stepped by one list call of its own
    while undecided; a step that steps only some of these parameters with these buffers splits
    it under GradScaler, or else has the host read the flag first (_loose_stale)."""

    __slots__ = ("params", "buf_views", "first_flag", "unsure")

    def __init__(self, device, flag=None):
        self.params, self.buf_views = [], []
        self.first_flag = (torch.ones((), dtype=torch.bool, device=device) if flag is None
                           else flag)
        self.unsure = _Unsure(self.first_flag)


class _LastStep:
    """Holds opt.last_step. Not an attribute of the optimizer itself: dynamo drops a setattr
    on an Optimizer while tracing, and would guard on a list mutated in place."""

    def __init__(self):
        self.entries: list[dict] = []


class _Clip:
    """A clip_grad_norm_ not yet applied: torch's total norm and clip coefficient over the
    gradients measured (watch: _C.GradWatch), applied by the next step() inside its kernels, or
    with torch's own clip_grads_with_norm_ where they cannot take it."""

    def __init__(self, params, max_norm: float, total_norm, foreach):
        self.params = params  # in param_groups order
        self.watch = _C.GradWatch(params)
        self.max_norm = max_norm
        self.total_norm = total_norm
        self.foreach = foreach
        # torch's _clip_grads_with_norm_ computes the same two ops (tested bitwise)
        self.coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        dtypes = {p.grad.dtype for p in params if p.grad is not None}
        # The kernels multiply by the coefficient in the gradients' dtype; torch's mul_ with a
        # coefficient of another dtype (mixed-dtype gradients) follows its promotion rules, so
        # that case, and DTensor (FSDP2) gradients, are clipped with torch's op.
        self.fusable = (dtypes == {self.coef.dtype} and not isinstance(self.coef, _DTensor))
        self._on: dict = {}

    def coef_on(self, device):
        """The coefficient on `device` (one copy per device and clip)."""
        c = self._on.get(device)
        if c is None:
            c = self._on[device] = self.coef.to(device, non_blocking=True)
        return c

    def apply(self) -> None:
        """torch's own clip of the measured parameters' current gradients."""
        torch.nn.utils.clip_grads_with_norm_(self.params, self.max_norm, self.total_norm,
                                             self.foreach)


class _Pending:
    """Holds a pending _Clip (see _LastStep: dynamo drops a setattr on an Optimizer)."""

    def __init__(self):
        self.clip: _Clip | None = None


class _FusedMomentum(Optimizer):
    """Shared machinery of SGD and Momentum: flat layout, backend choice, step, state_dict."""

    _ema = False  # Momentum: v starts at zero, dampening = momentum, no step-1 clone

    _constructing = False

    def __init__(self, params, defaults, *, backend: str | None, flat: bool,
                 capturable: bool = False):
        self._reset_layout(backend, flat)
        self._capturable = bool(capturable)
        # All groups are laid out together: whether a parameter may move depends on which
        # other parameters share its storage (_private), across groups.
        self._constructing = True
        super().__init__(params, defaults)
        self._constructing = False
        self._check_backends()
        self._group_layouts()

    def _reset_layout(self, backend, flat) -> None:
        self._requested_backend = backend
        self._flat = bool(flat)
        # id(param group) -> its layout, kept with the group's identity rather than its
        # position, so deleting or reordering param_groups cannot pair a group with another's
        self._layouts: dict[int, _GroupLayout] = {}
        self._slot: dict[int, tuple] = {}  # id(param) -> (bucket, index)
        self._warned_torch_ops: set[str] = set()
        self._backend_by_device: dict[torch.device, str] = {}
        self._last = _LastStep()
        self._pending = _Pending()
        self._steady = None  # (param_groups, groups, calls, idle, fast, tensors): _keep_steady
        # id(master-weights param) -> (data_ptr, version) after its last step: a parameter
        # written since (load_state_dict of the model, copy_) restarts its master (_step_master)
        self._master_seen: dict[int, tuple] = {}
        # id(master-weights param) -> a weak reference to its (local) storage at its last
        # planned step: memory freed and given again at the same address (p.data moved twice,
        # model.half().bfloat16() on a caching allocator) keeps data_ptr and version, not the
        # storage (a replay's _C.ListCheck checks the storage too)
        self._master_storage: dict[int, weakref.ref] = {}
        self._unsure: dict = {}  # id -> a _Bucket or _LooseFirst whose .unsure is set

    @property
    def last_step(self) -> list[dict]:
        """The kernel calls of the last step: one dict per call (backend, path, device, dtype,
        tensors, numel)."""
        return self._last.entries

    @last_step.setter
    def last_step(self, entries: list[dict]) -> None:
        self._last.entries = entries

    def _check_backends(self, groups=None) -> None:
        for group in self.param_groups if groups is None else groups:  # now, not at a step
            for p in group["params"]:
                # meta parameters (deferred initialisation) are stepped with torch's ops,
                # unless a backend was asked for: then they raise, as any device it cannot run on
                if p.device.type != "meta" or self._requested_backend is not None:
                    self._backend_for(p.device)

    @property
    def _lays_out(self) -> bool:
        # differentiable=True: the step runs torch's ops under grad mode; a kernel writing a
        # flat buffer would be invisible to autograd, so there is no layout to keep.
        return self._flat and not self._differentiable

    @property
    def _differentiable(self) -> bool:
        # torch decides grad mode for the whole step from defaults, not per group
        # (torch.optim.optimizer._use_grad_for_differentiable)
        return bool(self.defaults.get("differentiable", False))

    # ---- copy, pickle, torch.save ----------------------------------------------------------
    def __getstate__(self) -> dict:
        """torch's three keys plus what __setstate__ needs to rebuild the layout. A pending
        clip_grad_norm_ is applied first (torch's op), so a copy sees the clipped gradients."""
        if self._pending.clip is not None:
            self._take_clip().apply()
        self._settle_unsure(True)
        self._settle_masters()
        state = super().__getstate__()
        state["_requested_backend"] = self._requested_backend
        state["_flat"] = self._flat
        state["_capturable"] = self._capturable
        return state

    def __setstate__(self, state: dict) -> None:
        """The copy gets its own flat buffers over its (copied) parameters, and momentum
        buffers that are views of them, at its first zero_grad() or step(): nothing is shared
        with the original. A copied .grad (deepcopy copies a plain tensor's .grad) is copied
        into the new flat gradient buffer; a None one stays None. torch's load_state_dict also
        calls this, on a live optimizer, with new param group dicts over the same parameters:
        the layout is kept and handed to them."""
        if "_layouts" in self.__dict__:  # load_state_dict
            old = [self._layouts.get(id(g)) for g in self.param_groups]
            super().__setstate__(state)
            self._fill_group_defaults()
            self._layouts = {}
            for lay, group in zip(old, self.param_groups):
                if lay is not None and _same_params(lay, group):
                    lay.group = group
                    self._layouts[id(group)] = lay
            return
        backend = state.pop("_requested_backend", None)
        flat = state.pop("_flat", True)
        self._capturable = state.pop("_capturable", False)
        super().__setstate__(state)
        self._fill_group_defaults()
        self._reset_layout(backend, flat)
        self._check_backends()
        # The copied masters belong to the copied parameters as they are now (__getstate__
        # settled them): a write to a parameter from here on restarts its master.
        for group in self.param_groups:
            for p in group["params"]:
                if self._master(group, p) and self.state.get(p):
                    self._mark_master(p)
        # No layout yet: while pickle or deepcopy runs, its memo holds more references to
        # the parameters' storages than the finished copy will (see _private); the first
        # zero_grad() or step() lays every group out and adopts its momentum buffers.

    def _fill_group_defaults(self) -> None:
        """Keys an older pickle's param groups may lack (SGD fills torch's)."""

    @staticmethod
    def _master(group, p) -> bool:
        """p is stepped through an fp32 master (master_weights=True, a bf16 or fp16
        parameter)."""
        return bool(group.get("master_weights")) and p.dtype in (torch.bfloat16, torch.float16)

    @staticmethod
    def _mode(group, p) -> str | None:
        """"master" (master_weights=True) or "sr" (stochastic_rounding=True) for a bf16
        parameter of such a group, "master16" for an fp16 one of a master-weights group, "qmom"
        for an fp32 one of a group with momentum_dtype, else None."""
        if p.dtype is torch.float32:
            return "qmom" if group.get("momentum_dtype") is not None else None
        if p.dtype is torch.float16:
            return "master16" if group.get("master_weights") else None
        if p.dtype is not torch.bfloat16:
            return None
        if group.get("master_weights"):
            return "master"
        return "sr" if group.get("stochastic_rounding") else None

    def _check_mode_dtypes(self, group) -> None:
        """A group with momentum_dtype holds fp32 parameters (and bf16 ones of a master or
        stochastic-rounding mode): any other parameter with a gradient would silently keep a
        buffer of its own dtype; a stochastic-rounding group holds no fp16 parameter (it rounds
        to bf16). Checked when the group is laid out and at every planned step (model.half()
        may come after steps), refused before anything is written."""
        dtype = group.get("momentum_dtype")
        if dtype is not None:
            for p in group["params"]:
                if (p.dtype is not torch.float32 and not self._mode(group, p)
                        and (p.is_floating_point() or p.is_complex())):
                    raise ValueError(f"momentum_dtype={dtype} stores the momentum of float32 "
                                     f"parameters; the group also holds a {_what(p)} (put it "
                                     "in a group without momentum_dtype)")
        if group.get("stochastic_rounding"):
            for p in group["params"]:
                if p.dtype is torch.float16:
                    raise ValueError(f"stochastic_rounding=True rounds to bfloat16; a float16 "
                                     f"parameter ({_what(p)}) is not supported")

    def _drop_masters(self, group) -> None:
        """The group's parameters that had a master and are no longer stepped through one
        (master_weights turned off, model.float()) lose its state entries, as stale as after a
        dtype change (_OTHER_MASTER): turned on again, it restarts from the parameter."""
        for p in group["params"]:
            if id(p) in self._master_seen and not self._master(group, p):
                st = self.state.get(p, {})
                for key in ("master_weight", "master_remainder", "master_ties"):
                    st.pop(key, None)
                del self._master_seen[id(p)]
                self._master_storage.pop(id(p), None)

    @torch.no_grad()
    def _widen_buffers(self, group) -> None:
        """momentum_dtype was turned off: the group's fp32 parameters get fp32 buffers again
        (read back exactly as the kernels read them), as torch.optim.SGD keeps them."""
        for p in group["params"]:
            st = self.state.get(p)
            buf = None if not st else st.get("momentum_buffer")
            if p.dtype is torch.float32 and isinstance(buf, torch.Tensor) and buf.dtype in (
                    torch.bfloat16, torch.int8):
                st["momentum_buffer"] = _wide_buffer(buf, st.pop("momentum_scales", None))

    def _group_of(self, p) -> dict | None:
        return next((g for g in self.param_groups if any(q is p for q in g["params"])), None)

    @torch.no_grad()
    def momentum_buffer(self, p) -> torch.Tensor | None:
        """p's momentum buffer (a new tensor; None before p's first step or without momentum),
        as torch.optim.SGD on fp32 parameters would hold it for a parameter of a mode: a
        narrow one (int8 codes, or the bf16 buffer of an fp32 parameter or of a
        stochastic-rounding one) read back in fp32 exactly as the kernels read it; any other
        buffer as it is."""
        self._settle_unsure(True)
        st = self.state.get(p, {})
        buf = st.get("momentum_buffer")
        if buf is None:
            return None
        group = self._group_of(p)
        if buf.dtype == torch.int8 or (buf.dtype == torch.bfloat16 and (
                p.dtype == torch.float32 or (group is not None and self._mode(group, p)))):
            return _wide_buffer(buf, st.get("momentum_scales"))
        return buf.clone()

    def torch_state_dict(self) -> dict:
        """state_dict() as torch.optim.SGD on fp32 parameters keeps it, for a checkpoint that
        leaves momentum_cuda: momentum buffers fp32 (momentum_buffer(p)), the modes' extra state
        (master remainders and tie bits, int8 scales, stochastic-rounding step counts) and
        group keys dropped. The fp32 masters of master-weights parameters are the parameters
        such an optimizer would hold: opt.master_weight(p)."""
        sd = self.state_dict()
        extra = set(_MASTER_STATE) - {"momentum_buffer"} | {"momentum_scales", "sr_step",
                                                             "momentum_blocks"}
        ps = [p for g in self.param_groups for p in g["params"]]
        state = {}
        for i, st in sd["state"].items():
            st = {k: v for k, v in st.items() if k not in extra}
            if st.get("momentum_buffer") is not None:
                st["momentum_buffer"] = self.momentum_buffer(ps[i])
            state[i] = st
        groups = [{k: v for k, v in g.items() if k not in _MODE_KEYS} for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def master_weight(self, p) -> torch.Tensor:
        """The fp32 master of a master-weights parameter (a new tensor): torch.optim.SGD on fp32
        parameters holds this value where this optimizer holds p (its bf16 or fp16 rounding).
        Before p's first step, and after p was written, it is p's value."""
        group = self._group_of(p)
        if group is None or not self._master(group, p):
            raise ValueError(f"master_weight: the {_what(p)} has no master (it is not a bfloat16 "
                             "or float16 parameter of a group with master_weights=True)")
        st = self.state.get(p, {})
        if p.dtype is torch.float16:
            m = st.get("master_weight")
            return p.detach().float() if m is None or self._master_written(p) else m.clone()
        rem, ties = st.get("master_remainder"), st.get("master_ties")
        if rem is None or ties is None or self._master_written(p):
            return p.detach().float()
        lp = _local(p).detach()
        # (the tie bits are packed in the remainders' memory order: a loaded checkpoint's may
        # not be the parameter's until its next step lays them out again)
        m = bf16_join(lp, _local(rem), unpack_ties(ties, _local(rem)))
        return _as_dtensor(m, p) if isinstance(p, _DTensor) else m

    def _settle_masters(self) -> None:
        """Before the state leaves this optimizer (state_dict, deepcopy, pickle): the master of
        a parameter written since its last step is its value, so its remainder and tie bits
        become zeros (new tensors: a state_dict taken earlier keeps its own), which a copy or a
        loaded checkpoint reads as that value without knowing of the write."""
        for group in self.param_groups:
            if not group.get("master_weights"):
                continue
            for p in group["params"]:
                st = self.state.get(p)
                if st and "master_remainder" in st and self._master_written(p):
                    st["master_remainder"] = torch.zeros_like(st["master_remainder"])
                    st["master_ties"] = torch.zeros_like(st["master_ties"])
                    self._mark_master(p)
                elif st and "master_weight" in st and self._master_written(p):
                    st["master_weight"] = torch.empty_like(st["master_weight"]).copy_(p.detach())
                    self._mark_master(p)

    def state_dict(self) -> dict:
        """torch's, with every master settled first (_settle_masters). A DTensor's tie bits
        and int8 block scales, held per local shard in its state, are given as DTensors sharded
        like it, one element per element (the tie bit, 0 or 1, as uint8; the element's block
        scale, and "momentum_blocks": _block_marks): a checkpoint (dcp)
        reshards them as it does the rest; load_state_dict takes them back per shard."""
        self._settle_unsure(True)
        self._settle_masters()
        sd = super().state_dict()
        ps = [p for g in self.param_groups for p in g["params"]]
        for i, st in list(sd["state"].items()):
            if not (type(i) is int and 0 <= i < len(ps) and isinstance(ps[i], _DTensor)
                    and isinstance(st, dict)):  # (a state_dict hook may add its own entries)
                continue
            p, ties, scales = ps[i], st.get("master_ties"), st.get("momentum_scales")
            if isinstance(ties, torch.Tensor) and not isinstance(ties, _DTensor):
                st = sd["state"][i] = dict(st)  # (torch's entries are the state's own dicts)
                rem = st.get("master_remainder")  # (packed in its memory order)
                st["master_ties"] = _as_dtensor(unpack_ties(
                    ties, _local(rem) if rem is not None else p._local_tensor).to(torch.uint8), p)
            if isinstance(scales, torch.Tensor) and not isinstance(scales, _DTensor):
                st = sd["state"][i] = dict(st)
                codes = st["momentum_buffer"]._local_tensor
                st["momentum_scales"] = _as_dtensor(block_scales(codes, scales), p)
                st["momentum_blocks"] = _as_dtensor(_block_marks(codes), p)
        return sd

    def _master_written(self, p) -> bool:
        """p was written (or moved) since its last master step: its remainder is stale."""
        seen = self._master_seen.get(id(p))
        if seen is None:
            return False
        if seen != _master_mark(p):
            return True
        ref = self._master_storage.get(id(p))
        return ref is not None and ref() is not _local(p).untyped_storage()

    def _mark_master(self, p) -> None:
        """p's master is its state as p is now (_master_written)."""
        self._master_seen[id(p)] = _master_mark(p)
        self._master_storage[id(p)] = weakref.ref(_local(p).untyped_storage())

    # ---- backend ---------------------------------------------------------------------------
    def _backend_for(self, device: torch.device) -> str:
        name = self._backend_by_device.get(device)
        if name is None:
            name = resolve_backend(self._requested_backend, device)
            self._backend_by_device[device] = name
            log.info("momentum_cuda: backend %r runs on %s", name, device)
        return name

    @property
    def backend(self) -> str | None:
        """The backend that runs the steps (one name if all parameters share it; else a
        comma-separated list; None before any parameter)."""
        names = sorted(set(self._backend_by_device.values()))
        return ",".join(names) if names else None

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}backend: {self.backend}\nflat: {self._flat}\n)"

    # ---- flat layout -----------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if not self._constructing:  # __init__ lays out all its groups at once
            try:
                self._check_backends(self.param_groups[-1:])
            except Exception:
                self.param_groups.pop()  # a group no step could run is not kept
                raise
            self._group_layouts()

    def _layout_group(self, group) -> _GroupLayout:
        self._check_mode_dtypes(group)
        old = self._layouts.get(id(group))
        if self._unsure:  # its buffers go into the state, or nowhere (the per-tensor ones too;
            # not other groups': a step may have planned them already)
            ids = {id(p) for p in group["params"]}
            if old is not None:
                ids.update(id(p) for p in old.params)
            self._settle_unsure(True, (old.buckets if old is not None else [])
                                + [u for u in self._loose_firsts()
                                   if any(id(q) in ids for q in u.params)], drop=True)
        if old is not None and old.master[2] is not None and group.get("momentum_dtype") is None:
            self._widen_buffers(group)
        for b in old.buckets if old is not None else ():
            for p in b.params:
                if self._slot.get(id(p), (None,))[0] is b:
                    del self._slot[id(p)]
            # The old gradient accumulators go: each holds its parameter's tensor, which after
            # torch.utils.swap_tensors is a tensor in the old flat buffer that _private would
            # count as someone else's.
            _remove_hooks(b.hooks)
            b.accs.clear()
            b.spans = None  # (views of the old flat buffer, which _private would count too)
        masters = {id(p): p.data_ptr() for p in group["params"] if self._mode(group, p)}
        # master-weights and stochastic-rounding parameters take their per-tensor ops: not laid
        # out (stuck where they are until they move)
        retired = list(old.buckets) if old is not None else []
        buckets, stuck = self._make_buckets(
            [p for p in group["params"] if id(p) not in masters], retired) \
            if self._lays_out else ([], {})
        stuck.update(masters)
        bucketed = {id(p) for b in buckets for p in b.params}
        lay = _GroupLayout(group, tuple(group["params"]), buckets,
                           [p for p in group["params"] if id(p) not in bucketed], stuck,
                           master=_modes(group), retired=retired)
        self._layouts[id(group)] = lay
        return lay

    def _group_layouts(self) -> list:
        """(group, layout) for every current param group. A group not seen before (added by
        hand to param_groups) or whose parameter list changed is laid out now (its parameters
        move into new flat buffers, their gradients and momentum buffers with them); layouts of
        groups no longer in param_groups are dropped, so their parameters are not touched."""
        out, relaid = [], False
        for g in self.param_groups:
            lay = self._layouts.get(id(g))
            if (lay is None or lay.group is not g or not _same_params(lay, g)
                    or lay.master != _modes(g)):
                lay = self._layout_group(g)
                relaid = True
            out.append((g, lay))
        if len(self._layouts) != len(out):
            keep = {id(g) for g, _ in out}
            if self._unsure:
                self._settle_unsure(True, [b for k, lay in self._layouts.items()
                                           if k not in keep for b in lay.buckets]
                                    + self._loose_firsts(), drop=True)
            self._layouts = {k: v for k, v in self._layouts.items() if k in keep}
        if relaid:
            self._adopt_buffers(out)
        return out

    @torch.no_grad()
    def _make_buckets(self, params, retired=()) -> tuple[list[_Bucket], dict]:
        """The buckets of one group's parameters, and `stuck`: id -> data_ptr() of those that
        could sit in a flat buffer but must stay where they are (see _private). retired: the
        buckets of the layout these replace (their gradient views are the optimizer's own)."""
        # Frozen, sparse, non-dense, complex, non-float, meta or lazy parameters stay where
        # they are and, if they ever get a gradient, take the per-tensor (or torch-ops) path;
        # once one could be laid out (unfrozen, materialised), step() lays the group out again.
        cands = [p for p in params if _layable(p)]
        holders = _storages([q for g in self.param_groups for q in g["params"]])
        private = _private(cands, holders)
        mine = [p for p in cands if id(p) in private]
        lender = self._lenders(mine, holders)
        by_key = _by(mine, lambda p: (p.device, p.dtype, lender.get(id(p)), None))
        pinned = self._pinned([p for p in cands if id(p) not in private], holders)
        for key, ps in pinned.items():
            by_key[(ps[0].device, ps[0].dtype, None, key)] = ps
        in_place = {id(p) for ps in pinned.values() for p in ps}
        stuck = {id(p): p.data_ptr() for p in cands
                 if id(p) not in private and id(p) not in in_place}
        everyone = [q for g in self.param_groups for q in g["params"]]
        alone = _alone([p.grad for p in mine if p.grad is not None],
                       [q.grad for q in everyone] + [t for b in retired for t in b.grad_views],
                       [b.flat_grad for b in retired])
        buckets = []
        for (device, dtype, lent, pin), ps in by_key.items():
            if pin is not None:
                # stepped where they are: flat_param is their storage, at their offsets
                ps = sorted(ps, key=lambda p: p.storage_offset())
                offsets = [p.storage_offset() for p in ps]
                store = ps[0].untyped_storage()
                total = store.nbytes() // ps[0].element_size()
                flat_param = torch.empty(0, dtype=dtype, device=device).set_(
                    store, 0, (total,), (1,))
                flat_grad = torch.empty(total, dtype=dtype, device=device)
            elif lent is not None:
                # the parameters go where their gradients are in the lender's storage
                ps = sorted(ps, key=lambda p: p.grad.storage_offset())
                offsets = [p.grad.storage_offset() for p in ps]
                g0 = ps[0].grad
                total = g0.untyped_storage().nbytes() // g0.element_size()
                flat_grad = torch.empty(0, dtype=dtype, device=device).set_(
                    g0.untyped_storage(), 0, (total,), (1,))
            else:
                align = max(1, ALIGN_BYTES // ps[0].element_size())
                offsets, total = [], 0
                for p in ps:
                    offsets.append(total)
                    total += -(-p.numel() // align) * align
                flat_grad = torch.empty(total, dtype=dtype, device=device)
            if pin is None:
                flat_param = torch.zeros(total, dtype=dtype, device=device)
                if total:
                    _FLAT_STORAGES[_storage_key(flat_param)] = flat_param
            if total and lent is None:
                _FLAT_GRADS[_storage_key(flat_grad)] = flat_grad
            # a lender's (or a pinned parameter's) storage holds others' values between
            # ours: exact segments only
            # ... and on the CPU the bf16/fp16 bits depend on positions inside each tensor (as
            # torch's do): exact segments there too
            covers = (lent is None and pin is None and (
                self._backend_for(device) != "cpu" or dtype in (torch.float32, torch.float64)))
            b = _Bucket(params=ps, offsets=offsets, flat_param=flat_param, flat_grad=flat_grad,
                        grad_views=[], gptrs=[], meta=[], backend=self._backend_for(device),
                        segments=torch.tensor([[o, p.numel()] for o, p in zip(offsets, ps)],
                                              dtype=torch.int64).reshape(-1, 2), ptrs=[],
                        numel_before=[0], covers_padding=covers, lent=lent is not None,
                        pinned=pin is not None)
            if b.lent:
                b.neg_zero = [False] * len(ps)
            else:
                b.fill_neg_zero()
            b.first_flag = torch.ones((), dtype=torch.bool, device=device)  # (_first_on_device)
            hook_ref = weakref.ref(b)
            for i, p in enumerate(ps):
                view = b.view(flat_param, i)
                b.meta.append((p.shape, p.stride()))
                if pin is None:
                    view.copy_(p)
                    p.data = view
                g = p.grad
                if b.lent:  # read in place; no hook: autograd and the lender own .grad
                    gview = g
                else:
                    gview = b.new_grad_view(i)
                    if (g is not None and g.layout == torch.strided and g.stride() == p.stride()
                            and g.dtype == p.dtype and g.shape == p.shape and _plain(g)
                            and id(g) in alone):
                        # A gradient that exists goes on in the flat buffer (same values), the
                        # same object (g.data: a reference kept to it follows, as torch's .grad
                        # stays one tensor). One that someone else sees (_alone), a sparse one
                        # (torch's step keeps it sparse) or one in another memory layout
                        # (torch's stays so, and what reads it later sees that layout: a norm's
                        # order of summation, .view()) stays as it is: the per-tensor path
                        # steps it until it is None.
                        gview.copy_(g)
                        g.data = gview
                        gview = g
                        b.neg_zero[i] = False
                b.grad_views.append(gview)
                b.gptrs.append(gview.data_ptr())
                self._slot[id(p)] = (b, i)
                b.ptrs.append(p.data_ptr())
                b.numel_before.append(b.numel_before[-1] + p.numel())
                if p.is_leaf and not b.lent:  # only a leaf's .grad is stored by its accumulator
                    # the hook lives on the accumulator only while something holds it
                    acc = torch.autograd.graph.get_gradient_edge(p).node
                    b.accs.append(acc)
                    b.hooks.append(acc.register_prehook(_grad_hook(hook_ref, i)))
            weakref.finalize(b, _remove_hooks, b.hooks)  # no dead hooks left on the parameters
            buckets.append(b)
        return buckets, stuck

    @staticmethod
    def _pinned(ps, holders) -> dict:
        """storage key -> the parameters (of ps, layable but not private) that are stepped
        where they are by one flat call over their storage: two or more of one dtype that
        are the only optimizer parameters in that storage (holders: _storages), do not
        overlap, and fill at least half of it (the gradient and momentum buffers are the
        storage's size). ZeroRedundancyOptimizer with parameters_as_bucket_view=True makes
        each rank's parameters views of one such bucket. The kernel writes them in place, as
        torch's step does: nothing moves, every alias of the storage sees the step as with
        torch."""
        out = {}
        for key, group in _by([p for p in ps if p.untyped_storage().nbytes()],
                              _storage_key).items():
            if (len(group) > 1 and len(holders.get(key, ())) == len(group)
                    and len({(p.dtype, p.device) for p in group}) == 1
                    and not _overlapping(group)
                    and 2 * sum(p.nbytes for p in group) >= group[0].untyped_storage().nbytes()):
                out[key] = group
        return out

    @staticmethod
    def _lenders(ps, holders) -> dict:
        """id(p) -> the storage (key) p's gradient is a view of, for the parameters whose
        gradients can be read where they are (_lendable), in a storage that holds no
        parameter (holders: _storages) nor momentum_cuda's own gradients, not overlapping one
        another: DDP's buckets with gradient_as_bucket_view=True. The parameters then move to
        the same offsets in a flat buffer of the storage's size, and the step reads the
        gradients in place (_step_flat: one list call over all such buckets of a group)."""
        by_store = _by([p for p in ps if _lendable(p, p.grad)],
                       lambda p: _storage_key(p.grad))
        out = {}
        for key, group in by_store.items():
            if key not in holders and key not in _FLAT_GRADS and not _overlapping(
                    [p.grad for p in group]):
                out.update((id(p), key) for p in group)
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's zero_grad: set_to_none=True (the default) sets every .grad to None (flat
        gradients are refilled with -0.0 in one pass per buffer; backward attaches them again,
        see the module docstring); set_to_none=False zeroes every existing .grad in place (the
        flat ones in one pass per buffer) and leaves None ones None. A pending
        clip_grad_norm_ is dropped with the gradients it was for."""
        self._pending.clip = None
        layouts = self._group_layouts()
        if set_to_none:
            for _, lay in layouts:
                for b in lay.buckets:
                    if not b.lent:
                        b.fill_neg_zero()
            return super().zero_grad(set_to_none=True)
        with torch.no_grad():
            for _, lay in layouts:
                for b in lay.buckets:
                    if not b.lent:  # (a lent storage holds others' gradients: one by one)
                        b.flat_grad.zero_()
                        b.neg_zero = [False] * len(b.params)
            slot = self._slot
            for group in self.param_groups:
                for p in group["params"]:
                    g = p.grad
                    if g is None:
                        continue
                    b, i = slot.get(id(p), (None, 0))
                    if b is not None and not b.lent and b.holds_grad(i, g):
                        continue  # zeroed with its buffer
                    if g.grad_fn is not None:  # as torch's zero_grad does
                        g.detach_()
                    else:
                        g.requires_grad_(False)
                    g.zero_()

    # ---- state_dict: torch.optim.SGD's format, buffers copied into the flat layout -----------
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, except that a master-weights parameter keeps its state in
        its own dtypes (torch casts every state tensor to its parameter's): the momentum buffer
        fp32, the remainder int16, the tie bits uint8. The loaded remainder is taken to belong
        to the parameter as it is now (load the model first); without one (a plain torch.optim
        .SGD checkpoint) the master starts from the parameter's value. A momentum_dtype
        parameter's buffer is kept as saved (a bf16 one not widened) and stored narrow at once
        if it is not (torch's fp32 one: rounded or quantized as a step stores it). A saved group
        without the modes' keys (torch's) keeps this optimizer's setting."""
        saved = [i for g in state_dict["param_groups"] for i in g["params"]]
        ours = [(g, p) for g in self.param_groups for p in g["params"]]
        kept = {}
        for i, (g, p) in zip(saved, ours):
            st = state_dict["state"].get(i, {})
            if self._master(g, p):
                kept[id(p)] = {k: st[k] for k in _MASTER_STATE
                               if isinstance(st.get(k), torch.Tensor)
                               and (st[k].is_floating_point() or k != "momentum_buffer")}
                if isinstance(p, _DTensor):
                    for k, v in kept[id(p)].items():
                        if not (isinstance(v, _DTensor) and _same_shards(p, v)
                                and v.shape == p.shape):
                            raise ValueError(
                                f"load_state_dict: state {k!r} of the {_what(p)} (master "
                                f"weights) must be a DTensor sharded like it, got a "
                                f"{type(v).__name__} of shape {tuple(v.shape)} with placements "
                                f"{getattr(v, 'placements', None)}")
            elif self._mode(g, p) == "qmom" and isinstance(st.get("momentum_buffer"),
                                                            torch.Tensor):
                kept[id(p)] = {"momentum_buffer": st["momentum_buffer"],
                               "momentum_scales": st.get("momentum_scales"),
                               "momentum_blocks": st.get("momentum_blocks")}
        modes = [{k: g[k] for k in _MODE_KEYS if k in g} for g in self.param_groups]
        self._steady = None  # (it holds the state it replays: not kept alive past its use)
        for b in self._unsure.values():  # the loaded state says which buffers exist
            b.unsure = None
            b.first_flag.fill_(True)
        self._unsure.clear()
        super().load_state_dict(state_dict)
        for g, saved_g, m in zip(self.param_groups, state_dict["param_groups"], modes):
            if m and not any(k in saved_g for k in _MODE_KEYS):
                g.update(m)  # torch's checkpoint: the setting stays
        ours = [(g, p) for g in self.param_groups for p in g["params"]]
        for g, p in ours:
            if self._mode(g, p) == "qmom":
                buf = kept.get(id(p), {}).get("momentum_buffer")
                if isinstance(p, _DTensor) and buf is not None:
                    # each shard stored narrow (as saved where it is: int8 codes whose
                    # per-element scales are one per block of this shard); a buffer not sharded
                    # like p kept as saved, for the step to refuse with its reason
                    st = self.state[p]
                    st["momentum_buffer"] = buf.to(p.device, copy=True)
                    st.pop("momentum_scales", None)
                    st.pop("momentum_blocks", None)
                    if isinstance(buf, _DTensor) and _same_shards(p, buf):
                        with torch.no_grad():
                            local, scales = self._dtensor_qmom_buffer(
                                p, buf, kept[id(p)].get("momentum_scales"),
                                kept[id(p)].get("momentum_blocks"), g["momentum_dtype"])
                        st["momentum_buffer"] = _as_dtensor(local, p)
                        if scales is not None:
                            st["momentum_scales"] = scales
                    continue
                if id(p) in kept:
                    st = self.state[p]
                    with torch.no_grad():
                        st["momentum_buffer"], scales = self._qmom_buffer(
                            p, kept[id(p)]["momentum_buffer"].to(p.device, copy=True),
                            st.get("momentum_scales"), g["momentum_dtype"], True)
                    if scales is not None:
                        st["momentum_scales"] = scales
                    else:
                        st.pop("momentum_scales", None)
                continue
            for k, v in kept.get(id(p), {}).items():
                if k == "master_ties" and isinstance(p, _DTensor):  # (state_dict's form)
                    self.state[p][k] = pack_ties(v._local_tensor.to(p.device).bool())
                else:
                    self.state[p][k] = v.to(p.device, _MASTER_STATE[k], copy=True)
            if self._master(g, p):
                self._mark_master(p)
        self._adopt_buffers(self._group_layouts(), loaded=True)

    @torch.no_grad()
    def _adopt_buffers(self, layouts, loaded=False) -> None:
        """Momentum buffers of flat parameters go into the flat buffer: at a relayout each
        moves with its identity kept (buf.data = its flat view), so that a reference the
        training code keeps, or a tensor it put into the state, goes on being the buffer, as
        with torch; one that someone else sees (_alone: a view of it is held) stays as it is
        (per-tensor path), as torch keeps it. After load_state_dict (`loaded`) the loaded
        tensors are copied and the state holds the flat views: the dict is left as it was
        (README, Limits). A sparse buffer (torch's, after sparse-gradient steps) stays as it
        is: torch goes on with sparse ops on it; so does one of another dtype or layout, and
        one that an undecided first-step flag speaks for (another group's relayout does not
        read it: the flag must find its buffer in the state when it is read)."""
        held = {id(v) for u in self._unsure.values() for v in u.buf_views}
        moves = []
        for _, lay in layouts:
            for b in lay.buckets:
                for i, p in enumerate(b.params):
                    buf = self._buffer(p)
                    # a buffer of another dtype or layout (model.to after steps) stays as
                    # torch keeps it: copying would convert it and change the bits; so does
                    # the buffer of a parameter that left this bucket (the step lays it out),
                    # and one of another shape or device (a checkpoint's: torch loads it, and
                    # fails only at a step with a gradient, where _check_loose raises first)
                    if (buf is None or not isinstance(buf, torch.Tensor) or not _strided(buf)
                            or buf.dtype != p.dtype or buf.shape != p.shape or not _plain(buf)
                            or buf.device != p.device or buf.stride() != p.stride()
                            or not b.intact(i) or id(buf) in held):
                        continue
                    b.ensure_buf()
                    if buf is not b.buf_views[i]:
                        moves.append((b, i, p, buf))
        # a buffer two parameters share (a checkpoint saved so, or the code's doing) stays
        # one tensor, as torch keeps it; the group then steps with torch's ops
        shared = _sharing([buf for *_, buf in moves])
        moves = [m for m in moves if id(m[3]) not in shared]
        alone = set() if loaded or not moves else _alone(
            [buf for *_, buf in moves],
            [st.get("momentum_buffer") for st in self.state.values()]
            + [t for _, lay in layouts for r in lay.retired if r.flat_buf is not None
               for t in r.buf_views],
            [r.flat_buf for _, lay in layouts for r in lay.retired if r.flat_buf is not None])
        for _, lay in layouts:
            lay.retired = []
        for b, i, p, buf in moves:
            if loaded:
                b.buf_views[i].copy_(buf)
                self.state[p]["momentum_buffer"] = b.buf_views[i]
            elif id(buf) in alone:
                b.buf_views[i].copy_(buf)
                buf.data = b.buf_views[i]
                b.buf_views[i] = buf

    # ---- step ------------------------------------------------------------------------------
    def _hyper(self, group) -> dict:
        raise NotImplementedError

    @staticmethod
    def _hyper_values(g) -> tuple:
        """The values _hyper reads from group g, and master_weights (the replay checks that they
        are the same objects)."""
        raise NotImplementedError

    def _group_hyper(self, group) -> dict:
        """_hyper(group), checked, for the traced and the differentiable steps. A momentum
        tensor is read here (as torch's for-loop reads it at every step) while some parameter
        with a gradient has no momentum buffer: whether the step creates buffers is the host's
        decision. Once all exist, the kernels read it. (_plan decides the same from its plan,
        without a pass of its own.)"""
        h = self._hyper(group)
        _finite(h)
        m = h["momentum"]
        if isinstance(m, torch.Tensor) and any(
                p.grad is not None and self._buffer(p) is None for p in group["params"]):
            h["momentum"] = float(m.item())
            _finite(h)
        return h

    def step(self, closure=None):
        """One optimizer step; returns closure()'s loss if a closure is given.

        Every group is planned (hyper-parameters and tensors validated) before any memory is
        written, so a bad input raises with nothing updated."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = self._amp()
        if self._differentiable:
            self.last_step = []
            if self._pending.clip is not None:
                with torch.no_grad():
                    self._apply_clip(self._take_clip())
            clipped = self.last_step
            if amp is not None and self._amp_on_host(amp):
                return loss
            with torch.enable_grad():
                self._step_differentiable()
            self.last_step = clipped + self.last_step
            return loss
        if torch.compiler.is_compiling():
            with torch.no_grad():
                self._step_traced(amp)
            return loss
        # torch.no_grad() without its Python frames (a cold cache makes each one count)
        grad_was = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            self._step_eager(amp)
        finally:
            torch._C._set_grad_enabled(grad_was)
        return loss

    step = _observed_step(step)

    def _step_eager(self, amp) -> None:
        """step() outside torch.compile and differentiable=True, under no_grad."""
        if self._pending.clip is None and self._step_steady(amp):
            return
        self._steady = None
        if self._unsure:  # what the device has sent back since
            self._settle_unsure(False)
        # checked before planning: a relayout replaces .grad objects
        clip = None if self._pending.clip is None else self._take_clip()
        plans, planned = [], []
        try:
            for g, lay in self._group_layouts():
                plan = self._plan(g, lay, amp=amp)
                if plan is None:  # a parameter can go (back) into the flat layout
                    lay = self._layout_group(g)
                    self._adopt_buffers([(g, lay)])
                    plan = self._plan(g, lay, relayout=False, amp=amp)
                plans.append(plan)
                planned.append((g, lay))
        except Exception:
            self._pending.clip = clip  # a bad input raised: nothing was stepped
            if amp is not None and not _capturing() and self._amp_on_host(amp):
                # GradScaler found an overflow: torch's step, which would have raised, is not
                # run (its unscale_ wrote the gradients first, and so did _amp_on_host)
                self._pending.clip = None
                self.last_step = []
                if clip is not None:
                    self._apply_clip(clip)
                return
            raise
        except BaseException:
            self._pending.clip = clip
            raise
        try:  # GradScaler's found_inf read on the host first (or the device decides: _Unsure)
            if _capturing() and any(r == "sr" for _, _, loose in plans for *_, r, _ in loose):
                raise RuntimeError(
                    "momentum_cuda: stochastic_rounding=True cannot be captured in a CUDA graph: "
                    "each step's random bits are keyed on the host by the parameter's step count "
                    "(state 'sr_step'), which a replay would neither advance nor send again; "
                    "nothing was written")
            across = (amp is not None or clip is not None) and self._shares_across(plans)
            host = (amp is not None and (across or self._amp_needs_host(plans))
                    and not self._first_on_device(plans, amp))
        except BaseException:
            self._pending.clip = clip  # (a capture that would go wrong: nothing was stepped)
            raise
        self.last_step = []
        if clip is not None and (across or not self._clip_in_kernels(clip, plans, amp)):
            self._apply_clip(clip)
            clip = None
        if host:
            if self._amp_on_host(amp):
                if clip is not None:  # skipped; the gradients are clipped, as torch's
                    self._apply_clip(clip)
                return
            amp = None  # unscaled, and no overflow
        lent, kept = [], []  # each group's _LentCalls; its _ListCalls, or None where its
        for h, runs, loose in plans:  # per-tensor step cannot replay
            lent.append(self._step_flat(runs, h, amp, clip))
            kept.append(self._step_tensors(loose, h, amp, clip))
        self._keep_steady(planned, plans, lent, kept)
        if self._unsure:  # (host memory: read at once)
            self._settle_unsure(False)

    # ---- clip_grad_norm_ ---------------------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False, foreach: bool | None = None):
        """torch.nn.utils.clip_grad_norm_ over this optimizer's parameters (in param_groups
        order), with the clip applied inside the next step()'s kernels: returns the total norm
        (torch's own ops, so its bits; no host sync unless error_if_nonfinite), and step() then
        multiplies each gradient by min(max_norm / (total_norm + 1e-6), 1) in its own pass
        before the update and writes the clipped gradient back, as torch leaves it. Until that
        step .grad holds the unclipped values.

        The step checks that every gradient is still the one measured, unwritten, and raises
        (before anything is written) if one was replaced, written to (a further backward,
        GradScaler.unscale_, torch's own clip) or appeared; zero_grad() drops the clip. What the
        kernels cannot take (GradScaler's unscale still to come, mixed gradient dtypes, DTensor
        gradients, torch's own ops paths, a traced or differentiable step)
        is clipped first with torch's clip_grads_with_norm_, reported in last_step as path
        "torch-clip". While torch.compile traces, the clip is applied at once, as torch does."""
        max_norm = float(max_norm)
        params = [p for group in self.param_groups for p in group["params"]]
        if self._pending.clip is not None:  # torch's second clip measures the clipped gradients
            self._take_clip().apply()
        grads = [p.grad for p in params if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm(grads, norm_type, error_if_nonfinite, foreach)
        if not grads:
            return total_norm
        if torch.compiler.is_compiling():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total_norm, foreach)
            return total_norm
        self._pending.clip = _Clip(params, max_norm, total_norm, foreach)
        return total_norm

    def _take_clip(self) -> _Clip:
        """The pending clip, checked against the gradients now, and no longer pending."""
        clip = self._pending.clip
        i = clip.watch.changed([group["params"] for group in self.param_groups])
        if i >= 0:
            params = clip.params
            what = _what(params[i]) + f" (parameter {i} in param_groups order)" \
                if i < len(params) else f"parameter {i} in param_groups order"
            raise RuntimeError(
                f"clip_grad_norm_ measured the gradients, and then the {what} changed before "
                f"step() (or the next clip_grad_norm_): its .grad was replaced, written to (another backward, "
                f"GradScaler.unscale_, torch's own clip), given other memory or dtype "
                f"(.grad.data = ..., model.to()) or appeared, or the parameters of the "
                f"param groups changed. momentum_cuda applies the clip inside step(), so it "
                f"cannot clip a gradient that changed since. Call clip_grad_norm_ right before "
                f"step() (scaler.unscale_(opt) before it under GradScaler), zero_grad() to drop "
                f"it, or torch.nn.utils.clip_grad_norm_ to clip in place; nothing was written")
        self._pending.clip = None
        return clip

    def _apply_clip(self, clip) -> None:
        """A taken clip applied with torch's op to the current gradients (path "torch-clip")."""
        clip.apply()
        grads = [p.grad for p in clip.params if p.grad is not None]
        for idx in self._by_device_dtype(grads).values():
            self.last_step.append(self._entry("torch", "torch-clip", grads[idx[0]], len(idx),
                                              sum(_local(grads[j]).numel() for j in idx)))

    def _clip_in_kernels(self, clip, plans, amp) -> bool:
        """Whether every gradient of this step goes through kernels that take the clip: none
        is still scaled (GradScaler unscales before it clips), all of the coefficient's dtype,
        nothing on torch's own ops."""
        if not clip.fusable or (amp is not None and amp[0] is not None):
            return False
        return all(item[3] is None for _, _, loose in plans for item in loose)

    # ---- torch.amp.GradScaler -----------------------------------------------------------------
    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler.step then hands this optimizer its scale and found_inf as the attributes
        grad_scale and found_inf, and the kernels unscale the gradients in the step's own pass
        and skip an overflowed step on the device (no host sync), with the bits of GradScaler's
        unscale_ + torch.optim.SGD(foreach=False), on every backend (CPU: torch's own unscale
        before the kernel; CUDA and Triton: in the kernels)."""
        return True

    def _amp(self):
        """(grad_scale, found_inf) as GradScaler.step set them for this step, or None."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is None and found_inf is None:
            return None
        return grad_scale, found_inf

    @staticmethod
    def _amp_needs_host(plans) -> bool:
        """The step creates a momentum buffer (an overflow-skipped step must create none, as
        torch's for-loop creates none: so found_inf is read first) or runs torch's own ops.
        The modes' parameters decide in _step_modes, call by call (while a CUDA graph is
        captured, here: _first_on_device refuses them)."""
        for h, runs, loose in plans:
            use_buf = _use_buf(h)
            if any(run[3] or run[4] for run in runs):
                return True
            if any((reason is not None and (reason not in _MODE_FLAG or _capturing()))
                   or (reason is None and use_buf and buf is None)
                   for _, _, buf, reason, _ in loose):
                return True
        return False

    @staticmethod
    def _shares_across(plans) -> bool:
        """A tensor of one param group's step shares memory with one of another group's (a
        gradient made a view of another group's gradient or buffer, read in place by the
        per-tensor path or a lent bucket). GradScaler's unscale and a clip then go first, over
        every group, on the host with torch's ops, as torch orders them: folded into each
        group's kernels they would miss what another group's step reads."""
        if len(plans) < 2:
            return False
        spans, owner = [], []
        for k, (h, runs, loose) in enumerate(plans):
            use_buf = _use_buf(h)
            for b, _, ranges in _by_bucket(runs):
                for device, start, n in b.run_spans(ranges, use_buf):
                    spans.append((device.type, -1 if device.index is None else device.index,
                                  start, start + n))
                    owner.append(k)
            for p, g, buf, *_ in loose:
                for t in (p, g, buf):
                    t = _local(t)
                    if t is not None and t.layout == torch.strided and t.numel():
                        spans.append(_span(t))
                        owner.append(k)
        hit = sorted(_overlaps(spans))
        return any(owner[i] != owner[j] and _spans_overlap([spans[i], spans[j]])
                   for a, i in enumerate(hit) for j in hit[a + 1:])

    def _first_on_device(self, plans, amp) -> bool:
        """Whether the buffers this step creates have their first step decided on the device
        (_Unsure) instead of found_inf read on the host first: capturable=True, GradScaler gave
        found_inf, and every run that creates buffers is a whole bucket none of whose parameters
        has a buffer yet (or whose buffers an _Unsure holds; a lent bucket, DDP's, by a list
        call of its own while its flag is undecided), and every tensor of the per-tensor path
        (a DTensor's shard too, and a bucket's parameter whose first step is not the whole
        bucket's: _plan) whose buffer is made likewise (_LooseFirst), on any backend;
        nothing else needs the host (torch's ops, the modes). While a CUDA graph is captured,
        what the capture would get wrong raises here, before anything is written: a host read
        of found_inf, and buffers that would be made (allocated and zeroed by kernels the graph
        would hold)."""
        ok = amp[1] is not None and self._capturable
        held = self._loose_held()
        made = []
        for h, runs, loose in plans:
            use_buf = _use_buf(h)
            for p, _, buf, reason, dt in loose:
                if reason is not None:
                    ok = False
                elif use_buf and buf is None and id(p if dt is None else dt) not in held:
                    # a tensor (a DTensor's shard) takes a flag of its own call (_LooseFirst)
                    made.append(p)
            if any((r[3] or r[4]) and (r[1] != 0 or r[2] != len(r[0].params)) for r in runs):
                ok = False
            if ok and any(r[4] and r[0].unsure is None
                          and any(self._buffer(p) is not None for p in r[0].params)
                          for r in runs):  # (Momentum's runs join new and old buffers)
                ok = False
        if _capturing() and amp[1] is not None:
            made += [r[0] for _, runs, _ in plans for r in runs if r[4]
                     and (r[0].flat_buf is None or (r[0].unsure is None and self._ema))]
            if not ok or made:
                raise RuntimeError(
                    "momentum_cuda: this step creates momentum buffers under GradScaler while "
                    "a CUDA graph is captured: "
                    + ("whether GradScaler skips it is read on the host (found_inf), which a "
                       "capture cannot do" if not ok else "they would be allocated inside the "
                       "graph") + ". Construct the optimizer with capturable=True and run one "
                    "eager step before capturing (skipped or not); nothing was written")
        return ok

    def _settle_unsure(self, wait: bool, buckets=None, drop=False) -> None:
        """Buckets with an _Unsure (those of `buckets` only, if given) whose flag the host can
        read (all of them with wait=True, a sync on a GPU). If a step updated the buffers, the
        state is right: done. Else no step did, and the buffers that are still there leave the
        state (torch's holds none: GradScaler skipped every step; an entry that held None holds
        None again), kept for the next step (made, zeroed: a CUDA graph captured later holds no
        kernel of theirs) unless `drop` (the bucket is not stepped whole next, or goes; then
        a flag none of whose buffers the state holds is dropped unread). Per-tensor list
        calls' flags (_LooseFirst) are settled alike."""
        for key, b in list(self._unsure.items()):
            if buckets is not None and not any(b is x for x in buckets):
                continue
            u = b.unsure
            if drop and not any(self._buffer(q) is view for q, view in zip(b.params, b.buf_views)):
                # none of its buffers is in the state (taken out by hand, or hidden): what the
                # device did changes nothing here, so its flag is not read
                self._drop_unsure(key, b)
                continue
            never = u.never(wait)
            if never is None:
                continue
            if never:
                for q, view in zip(b.params, b.buf_views):
                    st = self.state.get(q)
                    if st is not None and st.get("momentum_buffer") is view:
                        if id(q) in u.nones:
                            st["momentum_buffer"] = None
                            continue
                        del st["momentum_buffer"]
                        if not st:
                            del self.state[q]
                u.hidden = True
                if not drop:
                    continue
            self._drop_unsure(key, b)

    def _fresh_flag(self, fresh: dict, p) -> _LooseFirst:
        """The _LooseFirst of the buffers this step makes without a host read on p's device
        and dtype (fresh: this step's, by (device, dtype)), made and registered at its first
        parameter."""
        loose = fresh.get((p.device, p.dtype))
        if loose is None:
            loose = fresh[(p.device, p.dtype)] = _LooseFirst(p.device)
            self._unsure[("new", id(p))] = loose
        return loose

    def _split_flag(self, key, b, parts: dict, idle=None) -> list:
        """b's undecided flag (a bucket's _Unsure or a _LooseFirst, at self._unsure[key]) split
        instead of read: `parts` maps a label to the (parameter, buffer as the state holds it)
        pairs stepped together from now on, each becoming a _LooseFirst with a copy of the flag
        (each copy then speaks for the buffers it is stepped with); b is dropped. The part
        labelled `idle` (not stepped now) keeps the flag's copy on its way to the host (an
        eager step's). Returns [(label, _LooseFirst)]."""
        u = b.unsure
        flags = [b.first_flag.clone() for _ in parts]  # (before the drop resets it)
        self._drop_unsure(key, b)
        out = []
        for (k, kept), flag in zip(parts.items(), flags):
            part = _LooseFirst(kept[0][0].device, flag)
            part.params, part.buf_views = [q for q, _ in kept], [v for _, v in kept]
            part.unsure.nones = {id(q) for q, _ in kept if id(q) in u.nones}
            if k == idle:
                part.unsure.host, part.unsure.event = u.host, u.event
            self._unsure[("split", id(kept[0][0]))] = part
            out.append((k, part))
        return out

    def _drop_unsure(self, key, b) -> None:
        """b (a bucket or _LooseFirst) no longer has its first step decided on the device."""
        del self._unsure[key]
        b.unsure = None
        b.first_flag.fill_(True)

    def _loose_firsts(self) -> list:
        """The undecided _LooseFirst (per-tensor list calls' flags)."""
        return [u for u in self._unsure.values() if type(u) is _LooseFirst]

    def _loose_held(self) -> dict:
        """id(parameter: the state's key) -> (its undecided _LooseFirst, the buffer it made, as
        the state holds it)."""
        return {id(q): (u, v) for u in self._loose_firsts() for q, v in zip(u.params, u.buf_views)}

    def _loose_stale(self, group, checked, split=False) -> tuple[list, bool]:
        """The undecided _LooseFirst of this group's parameters that this step would not step
        as made (each parameter a plain tensor on the kernels' path holding the buffer the call
        made (shown), or all of them without one (hidden: the buffers were taken out of the
        state, never stepped), or none of them stepped: no gradient), and whether any was
        split instead (`split`: a part per set stepped together, _split_flag), unless one of
        its parameters still holding its buffer goes to torch's ops. The host reads the flags
        of those returned first."""
        mine = self._loose_firsts()
        if mine:
            ids = {id(p) for p in group["params"]}
            mine = [u for u in mine if id(u.params[0]) in ids]
        if not mine:
            return [], False
        # by state key (a DTensor's buffer in the state is a DTensor over the local one)
        bufs = {}
        for p, _, buf, reason, dt in checked:
            if reason is None:
                bufs[id(p if dt is None else dt)] = buf if dt is None else self._buffer(dt)
        out, did = [], False
        for u in mine:
            now = [bufs.get(id(q), False) for q in u.params]  # False: not on the kernels' path
            if (all(b is v for b, v in zip(now, u.buf_views))
                    or (u.unsure.hidden and all(b is None for b in now) and all(
                        (v.shape, v.stride(), v.dtype, v.device)
                        == (q.shape, q.stride(), q.dtype, q.device)
                        for q, v in zip(map(_local, u.params), map(_local, u.buf_views))))):
                continue
            # by parameter: stepped as made (True), not stepped and holding its buffer (False),
            # left (its buffer replaced or taken out: None), or on torch's ops (a read)
            how = [True if b is v else None if self._buffer(q) is not v
                   else False if b is False and q.grad is None else "read"
                   for q, v, b in zip(u.params, u.buf_views, now)]
            if all(x is False for x in how):
                continue  # not stepped now: the flag still speaks for all its buffers
            if not split or "read" in how:
                out.append(u)
                continue
            parts: dict = {}
            for q, v, x in zip(u.params, u.buf_views, how):
                if x is not None:
                    parts.setdefault(x, []).append((q, v))
            key = next(k for k, x in self._unsure.items() if x is u)
            self._split_flag(key, u, parts, idle=False)
            did = True
        return out, did

    def _amp_on_host(self, amp) -> bool:
        """GradScaler's work done here instead of in the kernels: every gradient unscaled with
        torch's own op, as GradScaler.unscale_ does it (inv = float(1 / double(scale))), then
        found_inf read (a host sync). Returns whether the step is skipped."""
        grad_scale, found_inf = amp
        if grad_scale is not None:
            with torch.no_grad():
                self._unscale_all(grad_scale)
        return found_inf is not None and bool(found_inf.item())

    def _unscale_all(self, grad_scale) -> None:
        """Every gradient unscaled in place as GradScaler._unscale_grads_ does it."""
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:  # as GradScaler._unscale_grads_
                    if g.dtype is torch.float16:
                        p.grad = g = g.coalesce()
                    g = g._values()
                grads.append(g)
        _unscale(grads, grad_scale)

    @staticmethod
    def _hyper_args(h, device) -> dict:
        """The hyper-parameters h as the ops take them on `device`: those held in tensors there
        as lr_tensor, momentum_tensor, ... (read by the kernels; their floats 0.0, not read),
        those on another device read here, as torch does. h itself when none is a tensor."""
        tensors = [(name, arg) for name, arg in _HYPER_TENSOR_ARGS
                   if isinstance(h[name], torch.Tensor)]
        if not tensors:
            return h
        args = dict(h)
        for name, arg in tensors:
            t = h[name]
            if t.device == device:
                args[name], args[arg] = 0.0, t
            else:
                args[name] = _on_host(name, t)
        return args

    @classmethod
    def _kernel_args(cls, h, amp, device, clip=None) -> dict:
        """The ops' keyword arguments on `device`: the hyper-parameters (_hyper_args),
        GradScaler's grad_scale and found_inf, a clip's coefficient."""
        args = cls._hyper_args(h, device)
        if clip is None and amp is None:
            return args  # the common case: the hyper-parameters as they are (unpacked, not kept)
        if args is h:
            args = dict(h)
        if clip is not None:
            args["clip_coef"] = clip.coef_on(device)
        if amp is not None:
            for name, t in zip(("grad_scale", "found_inf"), amp):
                args[name] = None if t is None else t.to(device, non_blocking=True)
        return args

    def _step_traced(self, amp) -> None:
        """step() as torch.compile traces it (torch.compiler.is_compiling()): no data_ptr
        bookkeeping, which dynamo cannot trace. Every (param, grad, buffer) of a group goes
        into one list op call per (device, dtype, first step), over the tensors themselves
        wherever they live, so the bits hold whatever happened to the flat layout; what the
        kernels do not model runs torch's own for-loop ops. Checked while tracing: the
        hyper-parameters and each tensor's metadata (all of which dynamo guards on); the op
        checks the rest (overlaps, non-finite scalars) when the graph runs. New momentum
        buffers are tensors of their own, not flat views: eager steps after compiled ones step
        those parameters one by one (path "per-tensor"). capturable=True under GradScaler:
        the buffers made take a flag per call (_LooseFirst), and the flags found are stepped
        with their parameters or split (_traced_held), read only over DTensors and
        parameters on torch's ops."""
        # capturable (as _first_on_device): buffers made under GradScaler take a flag per call
        device_first = bool(self._capturable and amp is not None and amp[1] is not None)
        held = self._traced_held() if self._unsure else {}
        clip = self._pending.clip
        if clip is not None:  # torch's op; a compiled step does not check the gradients
            self._pending.clip = None
            clip.apply()
        plans = []
        try:
            for group in self.param_groups:
                h = self._group_hyper(group)
                raw = None if any(_modes(group)) else _raw_hyper(group, self._ema)
                if raw is not None:  # (as _plan: the whole group on torch's own ops)
                    h = dict(h, **raw)
                use_buf = _use_buf(h)
                items = []
                for p in group["params"]:
                    g = p.grad
                    if g is None:
                        continue
                    if self._mode(group, p):
                        raise RuntimeError(
                            f"{_MODE_FLAG[self._mode(group, p)]}: a step traced by "
                            f"torch.compile is not supported yet (a {_what(p)}); step it eagerly")
                    buf = self._buffer(p) if use_buf else None
                    reason = ("dtensor" if isinstance(p, _DTensor)
                              else self._check_loose(p, g, buf, h))
                    items.append((p, g, buf, "hyper" if raw is not None else reason))
                if raw is not None and items:  # eagerly, before any group is stepped
                    _rehearse_untraced(self, [item[:3] for item in items], h)
                plans.append((h, items))
        except Exception:
            # as _step_eager: GradScaler's unscale first, and a skipped step does not raise
            if amp is not None and self._amp_on_host(amp):
                self.last_step = []
                return
            raise
        if amp is not None and any(
                reason is not None or (_use_buf(h) and buf is None and not device_first)
                for h, items in plans for _, _, buf, reason in items):
            if self._amp_on_host(amp):  # reads found_inf: a graph break
                return
            amp = None
        report = []
        for h, items in plans:
            use_buf = _use_buf(h)
            calls: dict = {}
            fresh: dict = {}  # (device, dtype) -> the _LooseFirst of the buffers made there
            torch_ops = []
            copied = []
            for p, g, buf, reason in items:
                if reason is not None:
                    torch_ops.append((p, g, buf))
                    continue
                if not _same_layout(g, p):
                    copied.append((g, torch.empty_like(p).copy_(g)))
                    g = copied[-1][1]
                new = use_buf and buf is None
                owner = held.get(id(p)) if use_buf else None
                if new and amp is not None and device_first:
                    owner = self._fresh_flag(fresh, p)
                    owner.params.append(p)
                    owner.buf_views.append(torch.zeros_like(p))
                    buf = owner.buf_views[-1]
                elif new:
                    buf = torch.zeros_like(p) if self._ema else torch.empty_like(p)
                    self.state[p]["momentum_buffer"] = buf
                first = bool(use_buf and not self._ema and (new or owner is not None))
                ps, gs, bs, _ = calls.setdefault((p.device, p.dtype, first, id(owner)),
                                                 ([], [], [], owner))
                ps.append(p)
                gs.append(g)
                if use_buf:
                    bs.append(buf)
            for (device, _, first, _), (ps, gs, bs, owner) in calls.items():
                backend = self._backend_for(device)
                args = self._kernel_args(h, amp, device)
                if owner is not None and first:
                    args = dict(args, first_step_tensor=owner.first_flag)
                step_ops(backend)[1](ps, gs, bs, first_step=first, **args)
                if owner is not None:
                    owner.unsure.update(args.get("found_inf"))
                    for p, buf in zip(ps, bs):  # new buffers enter the state once it ran
                        if self._buffer(p) is None:
                            owner.unsure.show(self, p, buf)
                report.append(self._entry(backend, "per-tensor", ps[0], len(ps),
                                          sum(p.numel() for p in ps)))
            if amp is not None and amp[0] is not None:
                for g, copy in copied:
                    g.copy_(copy)
            if torch_ops:
                ps = _torch_ops_untraced(self, torch_ops, h)
                report.append(self._entry("torch", "torch-ops", ps[0], len(ps),
                                          sum(_local(p).numel() for p in ps)))
        self.last_step = report

    def _traced_held(self) -> dict:
        """id(parameter) -> its undecided bucket or _LooseFirst, whose flag a traced step reads
        (no host read): one stepped whole (its parameters plain tensors of one group on the
        kernels' path, each with a gradient and holding the buffer made for it) is kept; any
        other is split into _LooseFirst with copies of its flag, so that each flag still speaks
        for the buffers it was stepped with: one per group of those stepped now, one of those
        not stepped (no gradient, or out of the param groups); a parameter no longer holding
        its buffer (taken out of the state, replaced by hand) leaves it. One holding a DTensor
        or a parameter on torch's ops has the host read its flag first (a graph break)."""
        held, read = {}, []
        group_of = {id(q): k for k, group in enumerate(self.param_groups)
                    for q in group["params"]}
        for key, b in list(self._unsure.items()):
            u = b.unsure
            parts: dict = {}
            for q, v in zip(b.params, b.buf_views):
                if u.hidden or self._buffer(q) is not v:
                    continue
                g = q.grad
                k = group_of.get(id(q))
                if isinstance(q, _DTensor) or (g is not None and k is not None
                                               and self._torch_reason(q, g, v) is not None):
                    read.append(b)
                    break
                parts.setdefault(-1 if g is None or k is None else k, []).append((q, v))
            else:
                if len(parts) == 1 and len(next(iter(parts.values()))) == len(b.params) \
                        and -1 not in parts:
                    held.update((id(q), b) for q in b.params)  # stepped whole, as made
                    continue
                for k, part in self._split_flag(key, b, parts):
                    if k >= 0:
                        held.update((id(q), part) for q in part.params)
        if read:
            self._settle_unsure(True, read, drop=True)
        return held

    def _step_differentiable(self) -> None:
        """torch.optim.SGD(differentiable=True)'s step: torch's for-loop under grad mode, with
        the group's own lr / weight_decay objects (a tensor that requires grad gets its
        gradient). Reported as path "torch-differentiable"."""
        plans = []
        for group in self.param_groups:
            h = self._group_hyper(group)  # validates, as the kernel path does
            use_buf = _use_buf(h)
            ps, gs, bs = [], [], []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                buf = self._buffer(p) if use_buf else None
                self._check_torch_path(p, g, buf, h)
                if p.is_leaf and p.requires_grad:
                    raise RuntimeError(
                        f"differentiable=True updates the parameters in place under grad mode, "
                        f"which torch refuses for a leaf that requires grad (\"a leaf Variable "
                        f"that requires grad is being used in an in-place operation.\"): the "
                        f"{_what(p)} is one; "
                        f"optimize non-leaf tensors (e.g. p.clone())")
                ps.append(p)
                gs.append(g)
                bs.append(buf)
            plans.append((group, use_buf, ps, gs, bs))
        self.last_step = []
        for group, use_buf, ps, gs, bs in plans:
            if not ps:
                continue
            _torch_sgd(ps, gs, bs, has_sparse_grad=any(not _strided(g) for g in gs),
                       foreach=False, weight_decay=group["weight_decay"],
                       momentum=group["momentum"], lr=group["lr"],
                       dampening=group["dampening"], nesterov=group["nesterov"],
                       maximize=group["maximize"])
            if use_buf:
                for p, buf in zip(ps, bs):
                    self.state[p]["momentum_buffer"] = buf
            for idx in self._by_device_dtype(ps).values():
                self._report("torch", "torch-differentiable", ps[idx[0]], len(idx),
                             sum(ps[j].numel() for j in idx))

    @staticmethod
    def _by_device_dtype(ps) -> dict:
        out: dict = {}
        for j, p in enumerate(ps):
            out.setdefault((p.device, p.dtype), []).append(j)
        return out

    def _keep_steady(self, planned, plans, lent, kept) -> None:
        """After a step: keeps what _step_steady replays when the step was the steady state:
        the hyper-parameters Python numbers, dtypes or None (immutable, so the same objects
        give the same plan), or tensors the kernels read themselves (_replayable_hyper: filled
        in place, the same object gives the same plan; kept as the ops' *_tensor keywords,
        _hyper_args); each run of a bucket stepped is not a first step, its buffers all exist
        (or none is used) and the bucket's first step is not left to the device (_Unsure): a
        whole bucket's flat call, or the list call over the lent ones (`lent`, per group:
        _step_flat's _LentCalls); a bucket stepped in part (its other parameters without a
        gradient: an unused branch, DDP's find_unused_parameters) has each run's flat call
        (_FlatCall), as _step_flat made them, and those others kept without; a bucket with no
        run (its gradients elsewhere, e.g. p.grad = g) has its parameters with a gradient
        stepped by the list calls, those without kept without;
        the parameters outside the buckets are stepped by per-tensor list calls that
        _step_tensors kept (`kept`, per group: none on torch's ops, mixing DTensor shards with
        plain tensors, with a gradient copied to the parameter's layout or a first step). Else
        nothing is kept."""
        self._steady = None
        groups, calls, idle = [], [], []
        for (g, lay), (h, runs, loose), lends, lists in zip(planned, plans, lent, kept):
            vals = self._hyper_values(g)
            stepped = {id(r[0]) for r in runs}
            rest = [b for b in lay.buckets if id(b) not in stepped]
            if ((loose and lists is None)
                    or not _replayable_hyper(h, vals, [r[0].flat_param.device for r in runs]
                                             + [c.device for c in lists or []])
                    or any(r[3] or r[4] or r[0].unsure is not None for r in runs)
                    or any(b.unsure is not None for b in rest)):
                return
            # a bucket stepped in part: its parameters outside the runs have no gradient
            ran = {}  # bucket id -> (bucket, the indices its runs step)
            for b, i0, i1, *_ in runs:
                ran.setdefault(id(b), (b, set()))[1].update(range(i0, i1))
            unstepped = [p for b, idx in ran.values() for i, p in enumerate(b.params)
                         if i not in idx]
            if any(p.grad is not None for p in unstepped):
                return
            use_buf = _use_buf(h)
            groups.append((g, lay, vals))
            for b, _, ranges in _by_bucket(runs):
                args = (b.flat_param, b.flat_grad, b.flat_buf if use_buf else None,
                        b.runs_segments(ranges))
                views = b.buf_views if b.flat_buf is not None else None
                mem = b.run_spans(ranges, use_buf)
                if len(ranges) == 1 and ranges[0][:2] == (0, len(b.params)):
                    if not b.lent:  # (a lent one's: its _LentCall, in lends)
                        calls.append(_FlatCall(b, len(b.params), use_buf, b.checker(), views,
                                               args, self._hyper_args(h, b.device), b.entry,
                                               mem))
                    continue
                idx = [i for i0, i1, _ in ranges for i in range(i0, i1)]
                check = _C.BucketCheck([b.params[i] for i in idx], [b.grad_views[i] for i in idx],
                                       [b.ptrs[i] for i in idx], [b.gptrs[i] for i in idx],
                                       b.flat_param, b.flat_grad, [b.meta[i] for i in idx])
                calls.append(_FlatCall(
                    b, len(idx), use_buf, check,
                    None if views is None else [views[i] for i in idx], args,
                    self._hyper_args(h, b.device),
                    self._entry(b.backend, "flat", b.flat_param, *b.count(ranges)), mem))
            calls += lends
            for c in lists or []:  # (armed after the ops: versions as they left them)
                c.h = self._hyper_args(c.h, c.device)
                calls.append(c.arm())
            # must stay without a gradient
            bare = [p for p in lay.outside + [p for b in rest for p in b.params]
                    if p.grad is None] + unstepped
            if bare:
                idle.append(_C.ListCheck(bare, False, [], [[] for _ in bare], [False] * len(bare)))
            idle += [_Apart(b) for b in rest]
        _forbid(calls)
        fast = None  # one flat or plain list call is the step's only work: its check runs it
        c = calls[0] if len(calls) == 1 else None
        if (type(c) in (_FlatCall, _ListCall)
                and self._backend_for(c.b.device if type(c) is _FlatCall else c.device) != "triton"
                and not any(arg in c.h for _, arg in _HYPER_TENSOR_ARGS)):  # (floats only)
            if type(c) is _FlatCall:
                fast = c.check
                fast.arm(*c.args, **c.h)
            elif c.mode == "plain" and c.dts is None:
                fast = c.check
                fast.arm(**c.h)
        tensors = [(g[n], n == "lr", g[n].dtype, g[n].device) for g, _, _ in groups
                   for n in _HYPER_NAMES if isinstance(g.get(n), torch.Tensor)]
        self._steady = (list(self.param_groups), groups, calls, idle, fast, tensors)

    def _step_steady(self, amp) -> bool:
        """The step _keep_steady kept, run again if it still holds (returns whether it ran):
        the same group objects holding the same parameters and hyper-parameter objects, every
        bucket passing _plan's check (_whole_bucket_run: each parameter, gradient view and
        momentum buffer where the kept step left it; a lent one's for its _LentCall; none
        of a bucket run apart back in its flat views: _Apart), every list call's _C.ListCheck (each
        parameter where it was, with a gradient laid out like it, its state the objects the
        call used; the parameters without a gradient still without), all before anything is
        written. Then the ops in the kept order, version bumps and last_step entries. What this
        skips is planning's Python work: per group, and per parameter on the per-tensor path;
        a cold cache (a training step runs the forward and backward in between) makes it cost
        as much as the checks. A step whose only work is one flat bucket or one plain list
        call (`fast`, without GradScaler, no profiler recording) runs check, kernel and bumps
        in one C++ call (BucketCheck.replay, ListCheck.replay), without the op's Python call
        and dispatch. A list call's check also finds its gradients sharing memory with one
        another or with the step's other tensors (_forbid), which torch's for-loop would step
        one after the other: planned then. tests/test_steady.py holds it to the full step
        under every edit."""
        steady = self._steady
        if steady is None:
            return False
        groups, laid, calls, idle, fast, tensors = steady
        if len(groups) != len(self.param_groups) or not all(
                map(operator.is_, groups, self.param_groups)):
            return False
        for g, lay, vals in laid:
            if not _same_params(lay, g) or not all(map(operator.is_, self._hyper_values(g), vals)):
                return False
        if tensors and not _hyper_tensors_hold(tensors):
            return False
        state = self.state
        if fast is not None and amp is None and not _profiling():
            # check, op and bumps in one C++ call (a profiler sees the op: not this way)
            c = calls[0]
            if any(i.check(state) is None for i in idle):
                return False
            if type(c) is _FlatCall:
                if fast.replay(state if c.use_buf else None, c.buf_views, c.b.buf_storage):
                    return False
            elif not fast.replay(state):
                return False
            self.last_step = [dict(c.entry)]
            return True
        grads = []
        for c in calls:
            if type(c) is _ListCall:
                # stochastic rounding counts its steps on the host: under GradScaler planned
                # (found_inf read there, _amp_needs_host); while a CUDA graph is captured
                # planned too, which refuses it
                gs = (None if (amp is not None or _capturing()) and c.mode == "sr"
                      else c.check.check(state))
                if gs is None:
                    return False
                grads.append(gs)
                continue
            if type(c) is _LentCall:
                if not all(_bucket_holds(b, state, c.use_buf) for b in c.buckets):
                    return False
            elif c.check.check(state if c.use_buf else None, c.buf_views,
                               c.b.buf_storage):  # (_FlatCall)
                return False
        if any(c.check(state) is None for c in idle):
            return False
        if amp is not None and len(grads) > 1 and not _C.apart(grads):
            # gradients of two list calls share memory (a view of another group's): GradScaler's
            # unscale goes first, over every group (_shares_across): planned
            return False
        entries = []
        grads = iter(grads)
        for c in calls:
            if type(c) is _ListCall:
                self._replay_list(c, next(grads), amp)
                entries.append(dict(c.entry))
                continue
            # GradScaler's scale and found_inf go to the kernels (no buffer is created here:
            # nothing for the host to read, as _amp_needs_host finds for such a plan)
            if type(c) is _LentCall:
                c.op(*c.lists, first_step=False, **(c.h if amp is None else
                                                    self._kernel_args(c.h, amp, c.device)))
                for b in c.buckets:
                    b.check.bump(0, len(b.params))
                entries.append(dict(c.entry))
                continue
            c.b.op(*c.args, first_step=False, **(c.h if amp is None else
                                                 self._kernel_args(c.h, amp, c.b.device)))
            c.check.bump(0, c.n)
            entries.append(dict(c.entry))
        self.last_step = entries
        return True

    def _replay_list(self, c, gs, amp) -> None:
        """One kept list call (_ListCall) on this step's gradients, as _step_tensors or
        _step_modes ran it."""
        if c.mode == "plain":  # bumps ps (gs) and bs
            step_ops(c.backend)[1](c.ps, gs, c.bs, first_step=False,
                                   **(c.h if amp is None else
                                      self._kernel_args(c.h, amp, c.device)))
        else:
            self._replay_mode(c, gs, amp)
            return
        if c.bump:  # the DTensors over the local shards it wrote
            _bump(c.bump)

    def _replay_mode(self, c, gs, amp=None) -> None:
        """_replay_list for the modes' ops. Under GradScaler (not stochastic rounding, which
        _step_steady plans) without a host read: the gradients unscaled by torch's own op, as
        GradScaler.unscale_ and _unscale_all do it (the mode kernels read them only), then the
        op skips on the device when found_inf != 0, as torch skips the whole step."""
        args, kw = _mode_args(c.h, False)  # (c.h as _keep_steady kept it: _hyper_args)
        if amp is not None:
            grad_scale, found_inf = amp
            if grad_scale is not None:
                _unscale(gs, grad_scale)
            if found_inf is not None:
                kw["found_inf"] = found_inf.to(c.device, non_blocking=True)
        if c.mode == "sr":
            state = self.state
            owners = c.ps if c.dts is None else c.dts
            steps = [int(state.get(p, {}).get("sr_step", 0)) + 1 for p in owners]
            seed, streams, offsets = c.sr
            keys = _C.sr_keys(seed, steps, streams)
            sr_op(c.backend)(c.ps, gs, c.bs, keys, *args, offsets=offsets, **kw)
            for p, s in zip(owners, steps):
                state[p]["sr_step"] = s
        elif c.mode == "master":
            master_op(c.backend)(c.ps, gs, c.bs, c.xs, c.ys, *args, **kw)
        elif c.mode == "master16":
            fp16_master_op(c.backend)(c.ps, gs, c.bs, c.xs, *args, **kw)
        else:
            qmom_op(c.backend)(c.ps, gs, c.bs, c.xs, *args, **kw)
        if c.bump:  # the DTensors over the local shards it wrote
            _bump(c.bump)
        if c.mode in ("master", "master16"):  # a later write restarts the master
            c.check.commit(self._master_seen)  # (_master_written; after the bump)

    def _plan(self, group, lay, relayout=None, amp=None):
        """(hyper-parameters, flat runs, loose (param, grad) pairs) of one group; raises on bad
        input, changes nothing (but opt.state to what the device did, where a bucket's first
        step was left to it and is not stepped whole now: _settle_unsure). None (if
        `relayout`) when the group should be laid out again:
        a parameter with a gradient is off the flat path and could be on it (it moved, e.g.
        model.to(); it was frozen, meta or lazy when the group was laid out).
        amp: GradScaler's (grad_scale, found_inf) for this step, or None."""
        h = self._hyper(group)
        _finite(h)
        # capturable under GradScaler: a bucket's parameters whose buffers this step makes
        # while the rest of the bucket is not made whole with them go to the per-tensor path,
        # whose list call decides their first step on the device (_LooseFirst), and stay
        # there while that flag is undecided
        device_first = self._capturable and amp is not None and amp[1] is not None
        plan = self._plan_with(h, group, lay, relayout, device_first)
        if plan is not None and isinstance(h["momentum"], torch.Tensor) and (
                any(run[3] or run[4] for run in plan[1])
                or any(buf is None for _, _, buf, _, _ in plan[2])):
            # the step would create momentum buffers: whether it does is decided by
            # momentum != 0, read here (as torch's for-loop reads it), and planned again
            h["momentum"] = float(h["momentum"].item())
            _finite(h)
            plan = self._plan_with(h, group, lay, relayout, device_first)
        if plan is not None:
            _alpha_range(h, plan)
            raw = _raw_hyper(group, self._ema) if any(
                c[3] == "hyper" for c in plan[2]) else None
            if raw is not None:  # (_plan_with put the whole group on torch's ops)
                h = dict(h, **raw)
                self._rehearse([c[:3] for c in plan[2]], h)
                plan = (h,) + plan[1:]
        return plan

    def _plan_with(self, h, group, lay, relayout, device_first=False):
        """_plan for the hyper-parameters h."""
        use_buf = _use_buf(h)
        runs = []  # [bucket, first index, end index, first_step, some buffer is new]
        loose = [(p, p.grad) for p in lay.outside if p.grad is not None]
        relayout = self._lays_out if relayout is None else relayout
        if relayout and any(self._could_move(lay, p) for p, _ in loose):
            return None
        device_first = device_first and use_buf
        held = self._loose_held() if device_first and self._unsure else {}

        def whole(b):  # (a bucket holding a per-tensor flag's parameters is not stepped whole)
            if held and any(id(p) in held for p in b.params):
                return None
            return self._whole_bucket_run(b, use_buf)
        for b in lay.buckets:
            run = whole(b)
            if b.unsure is not None and use_buf:
                if run is None or (run[4] and not b.unsure.hidden):
                    # not stepped whole, or its buffers were taken out of the state by hand
                    if device_first:
                        # its flag split by whether each parameter is stepped now (those with
                        # a gradient then go to the per-tensor path, a list call per part)
                        parts: dict = {}
                        for q, v in zip(b.params, b.buf_views):
                            if self._buffer(q) is v:
                                parts.setdefault(q.grad is not None, []).append((q, v))
                        self._split_flag(id(b), b, parts, idle=False)
                        held = self._loose_held()
                    else:
                        # the host reads the flag (the state then says what the device did)
                        # before this step is planned
                        self._settle_unsure(True, [b], drop=True)
                    run = whole(b)
                elif not run[4]:  # its buffers, in the state: a first step while the flag says
                    run[3] = not self._ema
            if run is not None:
                runs.append(run)
                continue
            for i, p in enumerate(b.params):
                g = p.grad
                if g is None:
                    continue
                buf = self._buffer(p) if use_buf else None
                first = bool(use_buf and buf is None and not self._ema)
                moved = p.data_ptr() != b.ptrs[i]
                ok = not moved and b.intact(i) and b.holds_grad(i, g) and (
                    buf is None or b.holds_buf(i, buf))
                if not ok:
                    if relayout and moved and self._could_move(lay, p):
                        return None
                    if relayout and not moved and not b.pinned and (
                            b.lent or _lendable(p, g)) and (
                            buf is None or b.holds_buf(i, buf)):
                        # its gradient is in another storage now (DDP's bucket, or DDP's
                        # rebuilt one, or a tensor of its own): lay out to read it there
                        return None
                    loose.append((p, g))
                elif device_first and (buf is None or id(p) in held):
                    loose.append((p, g))  # its first step decided by a list call's flag
                elif runs and runs[-1][0] is b and runs[-1][2] == i and runs[-1][3] == first:
                    runs[-1][2] = i + 1
                    runs[-1][4] = runs[-1][4] or (use_buf and buf is None)
                else:
                    runs.append([b, i, i + 1, first, use_buf and buf is None])
        alias = bool(loose) and (self._overlap(lay, group)
                                 or self._loose_shares(runs, loose, use_buf))
        # the whole group on torch's ops: "alias", or "hyper" (_raw_hyper: a hyper-parameter
        # tensor that torch's for-loop uses with ops of its own)
        whole = "alias" if alias else "hyper" if (
            (runs or loose) and not any(_modes(group))
            and _raw_hyper(group, self._ema) is not None) else None
        if whole and use_buf and any(b.unsure is not None for b in lay.buckets):
            # torch's ops step the buffers of a flag they do not read: the host reads it first
            self._settle_unsure(True, [b for b in lay.buckets if b.unsure is not None],
                                drop=True)
            return self._plan_with(h, group, lay, relayout, device_first)
        if whole:
            # torch's for-loop steps overlapping parameters one after the other, each reading
            # what the one before wrote: so does the whole group here (torch's own ops)
            runs, loose = [], [(p, p.grad) for p in group["params"] if p.grad is not None]
        # (param, grad, buffer, why torch's ops step it or None, the DTensor param whose
        # local shards param, grad and buffer are, or None)
        checked = []
        if self._master_seen:
            self._drop_masters(group)
        if any(_modes(group)):
            self._check_mode_dtypes(group)
            stream = {}  # stochastic rounding: each parameter's position in the optimizer
            if group.get("stochastic_rounding"):
                k = next(i for i, g in enumerate(self.param_groups) if g is group)
                base = sum(len(g["params"]) for g in self.param_groups[:k])
                stream = {id(p): base + i for i, p in enumerate(group["params"])}
            modes = [self._mode(group, p) for p, _ in loose]
            modal = [(p, g, m) for (p, g), m in zip(loose, modes) if m]
            # what _check_mode asks, in one C++ call for the plain tensors (kernel_ready's
            # dense parameter and like gradient imply it); the others, and an alias, there
            plain = [] if alias else [k for k, (p, _, _) in enumerate(modal)
                                      if not isinstance(p, _DTensor)]
            ready = [False] * len(modal)
            if plain:
                for k, r in zip(plain, _C.kernel_ready([modal[k][0] for k in plain],
                                                       [modal[k][1] for k in plain],
                                                       [None] * len(plain))):
                    ready[k] = r
            dtype = group.get("momentum_dtype")
            for (p, g, mode), fast in zip(modal, ready):
                key = (group.get("sr_seed", 0), stream[id(p)], 0) if mode == "sr" else dtype
                buf = self._buffer(p) if use_buf else None
                if not fast:
                    self._check_mode(p, g, alias, mode, key, buf)
                    if mode == "sr" and isinstance(p, _DTensor):  # (raises where it cannot)
                        key = key[:2] + (_shard_offset(p),)
                checked.append((p, g, buf, mode, key))
            loose = [pg for pg, m in zip(loose, modes) if not m]
        bufs = [self._buffer(p) if use_buf else None for p, _ in loose]
        plain = [k for k, (p, _) in enumerate(loose) if not isinstance(p, _DTensor)
                 and isinstance(bufs[k], (torch.Tensor, type(None)))]
        ready = [False] * len(loose)
        if plain:  # the common case checked in C++, in one call (else _check_loose decides)
            for k, r in zip(plain, _C.kernel_ready([loose[k][0] for k in plain],
                                                   [loose[k][1] for k in plain],
                                                   [bufs[k] for k in plain])):
                ready[k] = r
        for (p, g), buf, fast in zip(loose, bufs, ready):
            if fast:
                checked.append((p, g, buf, whole, None))
                continue
            if p.device.type == "meta" and self._requested_backend is not None:
                self._backend_for(p.device)  # raises: see _check_backends
            if isinstance(p, _DTensor):
                if not _same_shards(p, g, buf):
                    # torch's ops redistribute (or refuse) as torch.optim.SGD's would
                    checked.append((p, g, buf, "dtensor", None))
                    continue
                reason = self._check_loose(_local(p), _local(g), _local(buf), h)
                if reason is None and not whole:
                    checked.append((_local(p), _local(g), _local(buf), None, p))
                    continue
            else:
                reason = self._check_loose(p, g, buf, h)
            checked.append((p, g, buf, whole or reason, None))
        if self._unsure and use_buf:
            stale, split = self._loose_stale(group, checked, device_first)
            if stale:  # the host reads their flags (the state then says what the device did)
                self._settle_unsure(True, stale, drop=True)
            if stale or split:
                return self._plan_with(h, group, lay, relayout, device_first)
        return h, runs, checked

    @staticmethod
    def _overlap(lay, group) -> bool:
        """Some parameters of the group (with a gradient) overlap in memory; the answer is
        kept with the layout until an address or size changes."""
        ps = [_local(p) for p in group["params"] if p.grad is not None]
        key = [(p.data_ptr(), p.nbytes) for p in ps]
        if key != lay.spans:
            lay.spans, lay.overlap = key, _overlapping(ps)
        return lay.overlap

    def _loose_shares(self, runs, loose, use_buf) -> bool:
        """Some tensor the per-tensor step of a loose (param, grad) pair reads or writes (the
        parameter, its gradient, its buffer) shares memory with another tensor of the group's
        step: another loose pair's, or the parameters, gradients and buffers of the flat runs.
        torch's for-loop steps the parameters one after the other, each reading what the one
        before wrote (a buffer that is a gradient or a parameter, two parameters' one buffer, a
        gradient that is another parameter); a kernel would read the others at once."""
        spans = [(d.type, -1 if d.index is None else d.index, lo, lo + n)
                 for b, i0, i1, *_ in runs for d, lo, n in b.run_spans([(i0, i1)], use_buf)]
        for p, g in loose:
            for t in (p, g, self._buffer(p) if use_buf else None):
                if isinstance(t, torch.Tensor):
                    t = _local(t)
                    if t.layout == torch.strided and t.numel() and t.device.type != "meta":
                        spans.append(_span(t))
        return _spans_overlap(spans)

    @staticmethod
    def _could_move(lay, p) -> bool:
        """p is outside the flat layout (or moved out of it) but could be laid out, and it
        is not known to be stuck where it is now."""
        return lay.stuck.get(id(p)) != p.data_ptr() and _layable(p)

    def _whole_bucket_run(self, b, use_buf):
        """The common case, checked in bulk: every parameter of the bucket is intact, has its
        flat gradient, and all buffers are flat views (or none exists yet). Returns its one
        run, or None to let the per-parameter classification decide."""
        # one C++ pass: addresses, flat gradient views, state[p]["momentum_buffer"]
        kind = b.checker().check(self.state if use_buf else None,
                                 b.buf_views if b.flat_buf is not None else None, b.buf_storage)
        if kind == 1:  # no buffers yet
            return [b, 0, len(b.params), not self._ema, True]
        if kind != 0:  # a parameter moved, has no gradient or another one, or mixed buffers
            return None
        return [b, 0, len(b.params), False, False]

    def _keep_buffer(self, p, buf) -> bool:
        """buf becomes p's momentum buffer unless it has one (returns whether it did). Not
        setdefault: an entry may hold None (older torch saved momentum_buffer=None; setting
        None resets momentum), which torch replaces with the new buffer."""
        st = self.state[p]
        if st.get("momentum_buffer") is None:
            st["momentum_buffer"] = buf
            return True
        return False

    def _buffer(self, p):
        state = self.state.get(p)  # .get: planning must not create state entries
        return None if state is None else state.get("momentum_buffer")

    @staticmethod
    def _torch_reason(p, g, buf, first=False) -> str | None:
        """Why (p, g, buf) must be stepped with torch's own ops, or None for the kernels.
        first: the step makes p's momentum buffer (torch's: a clone of the gradient)."""
        if p.is_complex():
            return "complex"
        if p.device.type == "meta":
            return "meta"
        if not (_strided(g) and _strided(buf)):
            return "sparse"
        if not p.is_contiguous() and not _dense(p):
            return "strided"
        if not (_plain(p) and _plain(g) and _plain(buf)):
            return "view"
        if g.dtype != p.dtype or (buf is not None and buf.dtype != p.dtype):
            return "dtype"  # torch's in-place ops cast between them; the kernels take one dtype
        narrow = p.dtype in (torch.bfloat16, torch.float16)
        if (buf is not None and not (_walked_alike(buf, p) if narrow else _same_layout(buf, p))
                ) or (narrow and not _walked_alike(g, p)):
            # torch's own bits here depend on how TensorIterator loops over operands of
            # different layouts (bf16/fp16: no vectorized body), which the kernel does not model
            return "layout"
        if _self_overlapping(g) or (first and not _same_layout(_clone_layout(g), p)):
            # a broadcast gradient (stride 0): torch's ops give its elements bits that depend
            # on their position; a first step's buffer is the gradient's clone, in its layout
            return "layout"
        return None

    def _check_loose(self, p, g, buf, h) -> str | None:
        """What the per-tensor kernels (or torch's ops) need, checked before any runs; returns
        why torch's own ops must step it (_torch_reason), or None."""
        if p.layout != torch.strided:
            raise RuntimeError(f"momentum_cuda needs strided parameters; got a {p.layout} "
                               f"{_what(p)}")
        for name, t in (("gradient", g), ("momentum_buffer", buf)):
            # A buffer or gradient of another dtype is torch's case too (model.to(dtype) after
            # steps, p.grad.data = g.double()): torch's ops promote and cast, and so does the
            # torch-ops path ("dtype").
            if t is not None and not isinstance(t, torch.Tensor):
                raise TypeError(f"the {name} of a {_what(p)} is a {type(t).__name__} ({t!r}), "
                                "not a tensor (torch.optim.SGD's step fails on it too)")
            if t is not None and (t.shape != p.shape or t.device != p.device):
                raise RuntimeError(f"the {name} of a {_what(p)} is a tensor of shape "
                                   f"{tuple(t.shape)} ({t.dtype}, {t.device})")
        reason = self._torch_reason(p, g, buf, buf is None and not self._ema and _use_buf(h))
        if reason in ("complex", "sparse", "meta", "strided"):
            self._check_torch_path(p, g, buf, h)
            if reason == "sparse":
                self._rehearse([(p, g, buf)], h)
        elif reason == "view" or reason == "dtype" and not all(
                t is None or t.dtype.is_floating_point for t in (g, buf)):
            # torch's ops may fail part-way on these (an integer, bool or complex one: its
            # in-place ops may not cast to it; a ZeroTensor buffer cannot be written)
            self._rehearse([(p, g, buf)], h)
        elif p.dtype not in _DTYPES:
            raise RuntimeError(f"momentum_cuda supports {_DTYPES} and complex, got a {_what(p)}")
        return reason

    @staticmethod
    def _check_torch_path(p, g, buf, h) -> None:
        """The cases where torch's for-loop raises part-way through a step (after updating
        the parameters before this one): raised here, before anything is written."""
        what = _what(p)
        if not _strided(g) and h["weight_decay"] != 0:
            raise RuntimeError(
                f"weight_decay={h['weight_decay']} cannot be used with the sparse gradient "
                f"({g.layout}) of a {what}: torch.optim.SGD fails there too (add(sparse, "
                f"dense) is not supported); use weight_decay=0 for this parameter's group")
        if not _strided(g) and h["nesterov"] and buf is not None and _strided(buf):
            raise RuntimeError(
                f"nesterov=True cannot be used with the sparse gradient ({g.layout}) of a {what} "
                f"whose momentum_buffer is dense (from steps with dense gradients): torch.optim."
                f"SGD fails there too (add(sparse, dense) is not supported)")
        if _strided(g) and not _strided(buf):
            raise RuntimeError(
                f"the momentum_buffer of a {what} is sparse ({buf.layout}, from steps with "
                f"sparse gradients) and its gradient is dense: torch.optim.SGD fails there "
                f"too (add(sparse, dense) is not supported)")

    def _step_flat(self, runs, h, amp=None, clip=None) -> list:
        """One kernel call per bucket and first step or not, over its runs of consecutive flat
        parameters (a bucket stepped in part: its others have no gradient); whole lent buckets
        (DDP's, one per bucket) together in one list call per (backend, device, dtype, first
        step). Returns those list calls (_LentCall: _keep_steady keeps them where the step
        replays)."""
        use_buf = _use_buf(h)
        lent: dict = {}
        found_inf = None if amp is None else amp[1]
        for b, first, ranges in _by_bucket(runs):
            if use_buf:
                b.ensure_buf()
            made = []  # new buffers: they enter the state once the kernel ran
            unsure = b.unsure if use_buf else None  # (set: a whole bucket, _plan)
            for i0, i1, new in ranges:
                if unsure is None and new and found_inf is not None:
                    # a whole bucket (_first_on_device): its first step decided on the device
                    unsure = b.unsure = _Unsure(b.first_flag)
                    self._unsure[id(b)] = b
                    if self._ema:
                        b.flat_buf.zero_()  # v starts at zero (the views may hold old values)
                if new:  # else every buffer of the run is its flat view already (_plan)
                    for i in range(i0, i1):
                        if unsure is not None:
                            unsure.show(self, b.params[i], b.buf_views[i])
                        elif self._buffer(b.params[i]) is None:
                            made.append((b.params[i], b.buf_views[i]))
                            if self._ema:
                                b.buf_views[i].zero_()  # v starts at zero (the view: old values)
                if new and unsure is not None:
                    unsure.hidden = False  # (in the state again)
            i0, i1 = ranges[0][0], ranges[-1][1]
            whole = len(ranges) == 1 and i0 == 0 and i1 == len(b.params)
            if b.lent and whole:
                # (a bucket whose flag is undecided: a call of its own, which reads its flag)
                key = (b.backend, b.flat_param.device, b.flat_param.dtype, first, unsure)
                lent.setdefault(key, []).append((b, made))
                continue
            segs = b.runs_segments(ranges)
            if b.op is None:
                b.op, b.device = step_ops(b.backend)[0], b.flat_param.device
            args = self._kernel_args(h, amp, b.device, clip)
            if unsure is not None and first:
                args = dict(args, first_step_tensor=unsure.flag)
            b.op(b.flat_param, b.flat_grad, b.flat_buf if use_buf else None, segs,
                 first_step=first, **args)
            if unsure is not None:
                unsure.update(args.get("found_inf"))
            for p, v in made:
                self._keep_buffer(p, v)
            if first and b.covers_padding:
                b.reset_buf_padding()
            for r0, r1, _ in ranges:
                b.bump(r0, r1)
            if whole:  # the common case: its entry made once
                if b.entry is None:
                    b.entry = self._entry(b.backend, "flat", b.flat_param, i1,
                                          b.numel_before[i1])
                self.last_step.append(dict(b.entry))
            else:
                self._report(b.backend, "flat", b.flat_param, *b.count(ranges))
        calls = []
        for (backend, device, _, first, unsure), bms in lent.items():
            bs = [b for b, _ in bms]
            spans = [x for b in bs for x in b.span_views(use_buf)]
            ps, gs, vs = (list(x) for x in zip(*spans))
            vs = vs if use_buf else []
            op = step_ops(backend)[1]
            hx = self._hyper_args(h, device)  # (kept for the replay; _kernel_args keeps it too)
            args = self._kernel_args(hx, amp, device, clip)
            if unsure is not None and first:
                args = dict(args, first_step_tensor=unsure.flag)
            op(ps, gs, vs, first_step=first, **args)
            if unsure is not None:
                unsure.update(args.get("found_inf"))
            for p, v in (pv for _, made in bms for pv in made):
                self._keep_buffer(p, v)
            for b in bs:
                b.bump(0, len(b.params))
            self._report(backend, "flat", bs[0].flat_param, sum(len(b.params) for b in bs),
                         sum(b.numel_before[-1] for b in bs))
            calls.append(_LentCall(bs, use_buf, device, op, (ps, gs, vs), hx,
                                   self.last_step[-1]))
        return calls

    def _new_buffer(self, p):
        """A momentum buffer for p's first step: its flat view while p is still in place."""
        b, i = self._slot.get(id(p), (None, 0))
        if b is not None and p.data_ptr() == b.ptrs[i]:
            b.ensure_buf()
            buf = b.buf_views[i]
            return buf.zero_() if self._ema else buf
        return torch.zeros_like(p) if self._ema else torch.empty_like(p)

    def _step_tensors(self, items, h, amp=None, clip=None) -> list | None:
        """The per-tensor path: one list call per (device, dtype, first step); torch's own
        ops for what the kernels do not model (items: _plan's checked list). Returns the calls
        the next step may replay (_ListCall, for _keep_steady), or None where it cannot: torch's
        ops, a call mixing DTensor shards with plain tensors, a gradient copied to its
        parameter's layout, a first step."""
        if not items:
            return []
        use_buf = _use_buf(h)
        calls: dict = {}
        torch_ops = []
        reasons = set()
        copied = []  # (gradient, its copy in the parameter's layout): written ones go back
        modal = [item for item in items if item[3] in _MODE_FLAG]
        kept = self._step_modes(modal, h, amp) if modal else []
        # capturable (_first_on_device): buffers made under GradScaler without a host read
        # take a flag per call (_LooseFirst), and so do those an undecided one holds
        undecided = self._loose_held() if self._unsure and use_buf else {}
        fresh: dict = {}
        device_first = use_buf and amp is not None and amp[1] is not None
        for p, g, buf, reason, dt in items:
            if reason in _MODE_FLAG:
                continue
            if reason is not None:
                torch_ops.append((p, g, buf))
                reasons.add(reason)
                continue
            if not _same_layout(g, p):
                copied.append((g, torch.empty_like(p).copy_(g)))
                g = copied[-1][1]  # fp32/fp64: the layout does not change bits
            new = use_buf and buf is None
            key = p if dt is None else dt  # (the state's)
            loose, obj = undecided.get(id(key), (None, None))
            if loose is None and new and device_first:
                loose = self._fresh_flag(fresh, p)
                buf = self._new_buffer(p)
                if not self._ema:
                    buf.zero_()  # (shown in the state until the flag is read)
                obj = buf if dt is None else _as_dtensor(buf, dt)
                loose.params.append(key)
                loose.buf_views.append(obj)
            elif new:
                # hidden (_LooseFirst): made, zeroed, taken out of the state, shown again
                buf = _local(obj) if loose is not None else self._new_buffer(p)
            first = bool(use_buf and not self._ema and (new or loose is not None))
            ps, gs, bs, owners = calls.setdefault((p.device, p.dtype, first, loose),
                                                  ([], [], [], []))
            ps.append(p)
            gs.append(g)
            if use_buf:
                bs.append(buf)
            if new or dt is not None:
                owners.append((dt, p, buf if new else None, obj))
        if torch_ops or copied:
            kept = None
        for (device, dtype, first, loose), (ps, gs, bs, owners) in calls.items():
            backend = self._backend_for(device)
            args = self._kernel_args(h, amp, device, clip)
            if loose is not None and first:
                args = dict(args, first_step_tensor=loose.first_flag)
            step_ops(backend)[1](ps, gs, bs, first_step=first, **args)  # bumps ps (gs) and bs
            if loose is not None:
                loose.unsure.update(args.get("found_inf"))
                loose.unsure.hidden = False  # (its buffers are in the state again)
            for dt, p, buf, obj in owners:  # new buffers enter the state once the kernel ran
                if dt is not None:
                    # a DTensor's buffer is a DTensor sharded like it, as torch's clone gives
                    _bump([dt] + ([self._buffer(dt)] if buf is None and use_buf else []))
                if buf is None:
                    continue
                if loose is not None:  # (obj: the buffer as the state holds it)
                    loose.unsure.show(self, p if dt is None else dt, obj)
                else:
                    self._keep_buffer(p if dt is None else dt,
                                      buf if dt is None else _as_dtensor(buf, dt))
            self._report(backend, "per-tensor", ps[0], len(ps), sum(p.numel() for p in ps))
            dts = [dt for dt, _, _, _ in owners if dt is not None]
            if kept is None or first or loose is not None or (dts and len(dts) != len(ps)):
                kept = None  # (a call mixing DTensor shards and plain tensors is not kept)
            elif dts:  # each DTensor's buffer as the state holds it now (over the local one)
                held = [[self._buffer(dt)] for dt in dts] if use_buf else [[] for _ in dts]
                kept.append(self._list_call("plain", backend, ps, bs, [], [], h,
                                            ["momentum_buffer"] if use_buf else [], held,
                                            dts=dts))
            else:
                kept.append(self._list_call("plain", backend, ps, bs, [], [], h,
                                            ["momentum_buffer"] if use_buf else [],
                                            [[b] for b in bs] if use_buf else None))
        if (amp is not None and amp[0] is not None) or clip is not None:
            for g, copy in copied:
                g.copy_(copy)
        if torch_ops:
            self._step_torch_ops(torch_ops, h, reasons)
        return kept

    def _list_call(self, mode, backend, ps, bs, xs, ys, h, keys, held, watch=False, sr=None,
                   dts=None):
        """The _ListCall of a list call just run (its entry the last one reported): `keys` the
        state entries it used, held[k] their objects for ps[k] (None: no keys); dts: the
        DTensors whose local shards ps are."""
        held = held if held is not None else [[] for _ in ps]
        return _ListCall(mode, backend, ps[0].device, ps, bs, xs, ys, h, keys, held, watch,
                         self.last_step[-1], sr, dts)

    @staticmethod
    def _check_mode(p, g, alias, mode, key=None, buf=None) -> None:
        """What the ops of the modes need (csrc/momentum_ops.cpp checks it again), raised
        before anything is written, naming the parameter (its description is made only then:
        this runs for every parameter at every step). A DTensor (FSDP2) parameter is taken by
        every mode (its local shard is stepped as a tensor of its own, its state DTensors
        sharded like it), with a gradient (and buffer) sharded like it."""
        flag = _MODE_FLAG[mode]
        if isinstance(p, _DTensor):
            if not _same_shards(p, g, buf if isinstance(buf, _DTensor) else None) or (
                    buf is not None and not isinstance(buf, _DTensor)):
                flag += f"={key}" if mode == "qmom" else ""
                raise RuntimeError(f"{flag} needs the gradient and momentum_buffer "
                                   f"of a DTensor parameter sharded like it; the {_what(p)} has "
                                   f"a gradient with placements {getattr(g, 'placements', None)}"
                                   f" and a buffer with {getattr(buf, 'placements', None)}")
            p, g = _local(p), _local(g)
        if not _strided(g) or g.dtype != p.dtype or g.shape != p.shape:
            raise RuntimeError(f"{flag} needs a dense {p.dtype} gradient of the parameter's "
                               f"shape; the {_what(p)} has a {g.layout} {g.dtype} one of shape "
                               f"{tuple(g.shape)}")
        if not _dense(p) or alias:
            raise RuntimeError(f"{flag} needs dense parameters that share no memory with "
                               f"others; got a {_what(p)}")

    def _step_modes(self, items, h, amp=None) -> list | None:
        """The bf16 parameters of a group with master_weights=True ("master") or
        stochastic_rounding=True ("sr"): one op call per (mode, device, first step or not), by
        the device's backend. A hyper-parameter tensor on the parameters' device is read by the
        kernels (_hyper_args: no host sync), as in the plain ops.
        master: each parameter's remainder and tie bits (state "master_remainder",
        "master_ties") start at zero (its master is its value) and restart so when the
        parameter was written or moved since its last step; its momentum buffer is fp32 (as
        torch's on the fp32 master).
        sr: the random bits of a step come from sr_key(the group's sr_seed, the parameter's
        own step count (state "sr_step", 1 at its first step), its position in the optimizer);
        its momentum buffer is bf16. A DTensor's local shard draws the bits of its elements'
        indices in the whole tensor (_shard_offset): the bits of the unsharded step.
        qmom: fp32 parameters of a group with momentum_dtype (the item's key): the buffer
        bf16, or int8 codes with state "momentum_scales" (a DTensor's: the blocks of its local
        shard, counted from the shard's start); a buffer stored otherwise (torch's
        fp32 one from a checkpoint, the other momentum_dtype's, another memory layout) is read
        back in fp32 and stored narrow first.
        amp: GradScaler's (grad_scale, found_inf) where the host has not read found_inf for
        the whole step (_amp_needs_host): the gradients are unscaled with torch's op first, as
        GradScaler.unscale_ does it (the mode kernels read them only); a call that makes
        state (a buffer, remainder, master or scales new or converted) or counts steps
        (stochastic rounding) has found_inf read on the host (once per step) and is not run
        when it is set, since a skipped step makes no state; the others take it and skip on
        the device.
        Returns the calls the next step may replay (_ListCall), or None (a first step, a
        gradient copied to its parameter's layout, a call GradScaler skipped)."""
        use_buf = _use_buf(h)
        buf_dtype = {"master": torch.float32, "master16": torch.float32, "sr": torch.bfloat16}
        calls: dict = {}
        offsets: dict = {}  # sr: a DTensor's local shard -> its index in the whole tensor
        replayable = True
        found_inf = None if amp is None else amp[1]
        if amp is not None and amp[0] is not None:
            _unscale([_local(g) for _, g, _, _, _ in items], amp[0])
        makes = set()  # the calls (keys of `calls`) that make state
        for p, g, buf, mode, key in items:
            st = self.state.get(p, {})
            owner = None  # a DTensor parameter (momentum_dtype bf16): its local shards step
            if isinstance(p, _DTensor):
                owner, p, g, buf = p, _local(p), _local(g), _local(buf)
            new = False
            if mode == "master":
                rem, ties = st.get("master_remainder"), st.get("master_ties")
                if owner is not None and rem is not None:  # (its local shard; the tie bits
                    rem = _local_state(owner, rem, "master_remainder")  # packed per shard)
                if (rem is None or ties is None or rem.shape != p.shape
                        or self._master_written(p if owner is None else owner)):
                    rem = torch.zeros_like(p, dtype=torch.int16)
                    ties = torch.zeros((p.numel() + 7) // 8, dtype=torch.uint8, device=p.device)
                    new = True
                elif not _same_layout(rem, p):
                    # loaded from a model in another memory layout: the remainders and the tie
                    # bits (packed in the remainders' memory order) on the parameter's layout
                    tie = unpack_ties(ties, rem)
                    rem = torch.empty_like(p, dtype=torch.int16).copy_(rem)
                    ties = pack_ties(torch.empty_like(p, dtype=torch.bool).copy_(tie))
                    new = True
                extra = (rem, ties)
            elif mode == "master16":
                m = st.get("master_weight")
                if owner is not None and m is not None:  # (its local shard)
                    m = _local_state(owner, m, "master_weight")
                if (m is None or self._master_written(p if owner is None else owner)
                        or m.shape != p.shape or m.dtype != torch.float32
                        or m.device != p.device):
                    m = torch.empty_like(p, dtype=torch.float32).copy_(p)
                    new = True
                elif not _same_layout(m, p):  # (loaded from a model in another memory layout)
                    m = torch.empty_like(p, dtype=torch.float32).copy_(m)
                    new = True
                extra = (m, None)
            elif mode == "sr":
                step = int(st.get("sr_step", 0)) + 1
                extra = (sr_key(key[0], step, key[1]), step)
                if owner is not None and key[2]:
                    offsets[id(p)] = key[2]
            first = bool(use_buf and buf is None and not self._ema)
            if mode == "qmom":
                old = (buf, _local(st.get("momentum_scales")))
                buf, scales = self._qmom_buffer(p, buf, old[1], key, use_buf)
                new = buf is not old[0] or (scales is not None and scales is not old[1])
                extra = (scales, None)
            elif use_buf and (buf is None or buf.dtype != buf_dtype[mode]
                              or not _same_layout(buf, p)):
                # a buffer of the other mode (fp32 -> bf16 rounds to nearest, bf16 -> fp32
                # exact), or in another memory layout (model.to(memory_format=...) after
                # steps): its values, on the parameter's layout
                buf = (torch.zeros_like(p, dtype=buf_dtype[mode]) if buf is None
                       else torch.empty_like(p, dtype=buf_dtype[mode]).copy_(buf))
                new = True
            if g.stride() != p.stride():
                g = torch.empty_like(p).copy_(g)
                replayable = False
            call = (mode, key if mode == "qmom" else None, p.device, first)
            if new or mode == "sr":
                makes.add(call)
            c = calls.setdefault(call, ([], [], [], [], [], []))
            for lst, t in zip(c, (p, g, buf) + extra):
                if t is not None:
                    lst.append(t)
            c[5].append(owner)
        kept = []
        skipped = None  # found_inf as read on the host, once
        for call, (ps, gs, bs, xs, ys, owners) in calls.items():
            mode, _, device, first = call
            backend = self._backend_for(device)
            args, kw = _mode_args(self._hyper_args(h, device), first)
            if found_inf is not None and call in makes:
                if skipped is None:
                    skipped = bool(found_inf.item())
                if skipped:  # GradScaler skips the step: no state made, nothing written
                    kept = None
                    continue
            elif found_inf is not None:
                kw["found_inf"] = found_inf.to(device, non_blocking=True)
            if mode == "master":
                master_op(backend)(ps, gs, bs, xs, ys, *args, **kw)
            elif mode == "master16":
                fp16_master_op(backend)(ps, gs, bs, xs, *args, **kw)
            elif mode == "qmom":
                qmom_op(backend)(ps, gs, bs, xs, *args, **kw)
            else:
                offs = [offsets.get(id(p), 0) for p in ps] if offsets else None
                sr_op(backend)(ps, gs, bs, xs, *args, offsets=offs, **kw)
            for k, p in enumerate(ps):
                owner = owners[k]
                st = self.state[p if owner is None else owner]
                for key in _OTHER_MASTER.get(mode, ()):  # (a dtype change moved p: unused)
                    st.pop(key, None)
                if owner is not None:  # the DTensor and its state DTensors were written
                    written = [owner]
                    for name, local, on in (("momentum_buffer", bs[k] if use_buf else None,
                                             use_buf),
                                            ("master_weight", xs[k] if mode == "master16"
                                             else None, mode == "master16"),
                                            ("master_remainder", xs[k] if mode == "master"
                                             else None, mode == "master")):
                        old = st.get(name)
                        if not on:
                            continue
                        if isinstance(old, _DTensor) and old._local_tensor is local:
                            written.append(old)
                            continue
                        # sharded like its parameter, as torch's clone of the gradient; the
                        # call keeps the DTensor's own local tensor (from_local may give it a
                        # view), which the next step finds there
                        st[name] = _as_dtensor(local, owner)
                        (bs if name == "momentum_buffer" else xs)[k] = st[name]._local_tensor
                    _bump(written)
                    if mode == "master":
                        st["master_ties"] = ys[k]
                    if mode in ("master", "master16"):
                        self._mark_master(owner)
                elif use_buf:
                    st["momentum_buffer"] = bs[k]
                if mode == "master":
                    if owner is None:  # (a DTensor's: above)
                        st["master_remainder"], st["master_ties"] = xs[k], ys[k]
                        self._mark_master(p)
                elif mode == "master16":
                    if owner is None:  # (a DTensor's: above)
                        st["master_weight"] = xs[k]
                        self._mark_master(p)
                elif mode == "qmom":
                    if xs:
                        st["momentum_scales"] = xs[k]
                    elif use_buf:
                        st.pop("momentum_scales", None)
                else:
                    st["sr_step"] = ys[k]
            self._report(backend, _MODE_PATH[mode], ps[0], len(ps), sum(p.numel() for p in ps))
            dts = [o for o in owners if o is not None]
            if kept is None or first or not replayable or (dts and len(dts) != len(ps)):
                kept = None
                continue
            sr = None
            if mode == "sr":  # (sr_seed, streams, offsets or None): the items' keys
                keys_of = {id(p): key for p, _, _, m, key in items if m == "sr"}
                sr = (keys_of[id((dts or ps)[0])][0], [keys_of[id(p)][1] for p in dts or ps],
                      offs)
            if dts:  # (each DTensor's state DTensors, over the local ones; the tie bits)
                keys = (["momentum_buffer"] if use_buf else []) + {
                    "master16": ["master_weight"],
                    "master": ["master_remainder", "master_ties"],
                    "qmom": ["momentum_scales"] if use_buf and xs else []}.get(mode, [])
                held = [[self.state[dt][k] for k in keys] for dt in dts]
                kept.append(self._list_call(mode, backend, ps, bs, xs, ys, h, keys, held,
                                            watch=mode in ("master", "master16"), sr=sr,
                                            dts=dts))
                continue
            # the state entries the next step reads, and their objects (now in the state)
            keys = ["momentum_buffer"] if use_buf else []
            held = [[b] for b in bs] if use_buf else [[] for _ in ps]
            if mode == "master":
                keys += ["master_remainder", "master_ties"]
                held = [hk + [x, y] for hk, x, y in zip(held, xs, ys)]
            elif mode == "master16":
                keys.append("master_weight")
                held = [hk + [x] for hk, x in zip(held, xs)]
            elif mode == "qmom" and use_buf:
                keys.append("momentum_scales")
                held = [hk + [xs[k] if xs else None] for k, hk in enumerate(held)]
            kept.append(self._list_call(mode, backend, ps, bs, xs, ys, h, keys, held,
                                        watch=mode in ("master", "master16"), sr=sr))
        return kept

    def _dtensor_qmom_buffer(self, p, buf, scales, marks, dtype) -> tuple:
        """load_state_dict's (local buffer, local scales or None) of a DTensor momentum_dtype
        parameter from a saved buffer sharded like it: int8 codes with per-element scales and
        block marks (state_dict's form) kept as they are where this shard's blocks are the
        saved ones, else read back in fp32 (code * scale, as the kernels read it) and stored
        narrow as a step stores it (in this shard's blocks); a bf16 or fp32 buffer stored
        narrow."""
        lp, lb = p._local_tensor, buf._local_tensor.to(p.device)
        if lb.dtype == torch.int8:
            if not (isinstance(scales, _DTensor) and _same_shards(p, scales)):
                raise ValueError(f"load_state_dict: the int8 momentum_buffer of the {_what(p)} "
                                 "needs its scales (state 'momentum_scales') as a DTensor "
                                 f"sharded like it, got a {type(scales).__name__}")
            per = scales._local_tensor.to(p.device, torch.float32)
            if dtype is torch.int8 and isinstance(marks, _DTensor) and _same_shards(p, marks):
                blocks = _scales_of_blocks(per, marks._local_tensor.to(p.device))
                if blocks is not None:
                    return lb.clone(), blocks
            lb = lb.float() * per  # (dequantize_momentum's read, the scales given per element)
        return self._qmom_buffer(lp, lb, None, dtype, True)

    @staticmethod
    def _qmom_buffer(p, buf, scales, dtype, use_buf) -> tuple:
        """(buffer, scales or None) of a momentum_dtype parameter for this step: new ones on
        its first step (zeros for the EMA form, whose buffer starts at zero; the SGD form's
        first step writes them whole), the state's where they are stored as the kernels take
        them, else the state's buffer read back in fp32, laid out like p, stored narrow."""
        if not use_buf:
            return None, None
        blocks = (p.numel() + QBLOCK - 1) // QBLOCK
        if buf is None:
            return (torch.zeros_like(p, dtype=dtype),
                    torch.zeros(blocks, device=p.device) if dtype is torch.int8 else None)
        scales_ok = (isinstance(scales, torch.Tensor) and scales.dtype == torch.float32
                     and scales.shape == (blocks,) and scales.is_contiguous()
                     and scales.device == p.device)
        if (buf.dtype == dtype and buf.stride() == p.stride() and buf.shape == p.shape
                and buf.device == p.device and (dtype is not torch.int8 or scales_ok)):
            return buf, scales if dtype is torch.int8 else None
        if buf.dtype == torch.int8 and not (isinstance(scales, torch.Tensor)
                                            and scales.numel() == blocks):
            raise ValueError(f"the {_what(p)} has an int8 momentum buffer without its "
                             f"{blocks} block scales (state 'momentum_scales'), got "
                             f"{None if scales is None else tuple(scales.shape)}")
        wide = _wide_buffer(buf, scales)
        if wide.stride() != p.stride() or wide.device != p.device:
            wide = torch.empty_like(p).copy_(wide)
        return _narrow_buffer(wide, dtype)

    def _step_torch_ops(self, items, h, reasons) -> None:
        """torch's own for-loop ops, for what the kernel does not model: complex parameters,
        sparse gradients, mixed bf16/fp16 layouts (reported in last_step as path 'torch-ops',
        one entry per device and dtype, with a warning the first time for each reason)."""
        for reason in sorted(reasons - self._warned_torch_ops):
            self._warned_torch_ops.add(reason)
            warnings.warn(_TORCH_OPS_WARNINGS[reason], stacklevel=5)
        params = self._torch_ops(items, h)
        for idx in self._by_device_dtype(params).values():
            self._report("torch", "torch-ops", params[idx[0]], len(idx),
                         sum(_local(params[j]).numel() for j in idx))

    def _torch_ops(self, items, h) -> list:
        """_torch_step over items' (param, grad, buffer), the new buffers kept in the state
        (Momentum's start at zero); returns the parameters."""
        ps, gs, bs = (list(x) for x in zip(*items))
        params = list(ps)
        use_buf = _use_buf(h)
        if self._ema:
            bs = [torch.zeros_like(p) if b is None else b for p, b in zip(ps, bs)]
        kept = list(bs)  # the buffer objects the state keeps
        # torch 2.13's CPU dense.add_(sparse) adds the dense tensor's storage offset twice when
        # the sparse tensor has no dense dimensions, writing elsewhere (out of bounds too), and
        # a flat view has an offset: such steps run on offset-0 clones, copied back after (on
        # every device: a copy is cheap next to a sparse step).
        back = []
        for k, g in enumerate(gs):
            if _strided(g) and _strided(bs[k]):
                continue
            for ts in (ps, bs):
                t = ts[k]
                if t is not None and _strided(t) and t.storage_offset():
                    ts[k] = t.clone()
                    back.append((t, ts[k]))
        self._torch_step(ps, gs, bs, h)
        for dst, src in back:
            dst.copy_(src)
        if use_buf:
            for p, old, new in zip(params, kept, bs):
                self.state[p]["momentum_buffer"] = new if old is None else old
        return params

    def _torch_step(self, ps, gs, bs, h) -> None:
        """torch's for-loop (momentum_cuda.reference's for Momentum) over the lists."""
        if self._ema:
            # (h's dampening: 1 - m as a momentum tensor's dtype rounds it, _dampening)
            momentum_reference_step(ps, gs, bs, lr=h["lr"], momentum=h["momentum"],
                                    weight_decay=h["weight_decay"], maximize=h["maximize"],
                                    dampening=h["dampening"])
        else:
            _torch_sgd(ps, gs, bs, foreach=False,
                       has_sparse_grad=any(not _strided(g) for g in gs), **h)

    def _rehearse(self, items, h) -> None:
        """torch's own step can fail part-way, after updating the parameters before the one it
        fails on: sparse ops torch lacks for a dtype (fp16 sparse + sparse), a buffer of a dtype
        the result cannot be cast to, hyper-parameter tensors it refuses (_raw_hyper). The same
        step runs first on one-element stand-ins of each (param, grad, buffer) of `items` (same
        dtypes, devices, layouts and dimensions; a sparse one's nnz at most 1): what would fail
        raises here, naming the parameter, before anything is written."""
        def stand_in(t, like, dtype=None):
            if t is not None and t._is_zerotensor():
                return torch._efficientzerotensor(shape, dtype=t.dtype, device=like.device)
            if t is None or not t.is_sparse:
                with torch.inference_mode(t is not None and t.is_inference()):
                    z = torch.zeros(shape, dtype=dtype or t.dtype, device=like.device)
                if t is not None and t.is_neg():
                    z = torch._neg_view(z)
                return z.conj() if t is not None and t.is_conj() else z
            n = min(t._nnz(), 1)  # (torch's sparse kernels skip work on an empty tensor)
            idx = torch.zeros(t.sparse_dim(), n, dtype=torch.int64, device=like.device)
            vals = torch.ones((n,) + shape[t.sparse_dim():], dtype=t.dtype, device=like.device)
            out = torch.sparse_coo_tensor(idx, vals, shape, check_invariants=False)
            return out.coalesce() if t.is_coalesced() else out
        runs = []
        for p, g, buf in items:
            p, g, buf = _local(p), _local(g), _local(buf)
            sparse = g if g.is_sparse else buf if buf is not None and buf.is_sparse else None
            k = sparse.sparse_dim() if sparse is not None else 0
            shape = (1,) * k + tuple(min(n, 1) if sparse is None else n
                                     for n in p.shape[k:])
            tb = stand_in(buf, p, p.dtype if buf is None else None) if (
                buf is not None or self._ema) else None
            runs.append((p, stand_in(p, p), stand_in(g, p), tb))
        try:
            self._torch_step([r[1] for r in runs], [r[2] for r in runs], [r[3] for r in runs],
                             h)
            return
        except Exception:
            pass
        for p, sp, sg, sb in runs:  # (again one by one, to name the parameter)
            try:
                self._torch_step([sp], [sg], [sb], h)
            except Exception as e:
                raise type(e)(f"torch.optim.SGD's own step fails on the {_what(p)}; raised "
                              f"before anything was written: {e}") from e
        self._torch_step([r[1] for r in runs], [r[2] for r in runs], [r[3] for r in runs], h)

    def _report(self, backend, path, t, tensors, numel) -> None:
        self.last_step.append(self._entry(backend, path, t, tensors, numel))

    @staticmethod
    def _entry(backend, path, t, tensors, numel) -> dict:
        return dict(backend=backend, path=path, device=str(t.device), dtype=t.dtype,
                    tensors=tensors, numel=numel)


class SGD(_FusedMomentum):
    """Drop-in for torch.optim.SGD: same signature, defaults, state_dict format and bits as
    torch.optim.SGD(foreach=False) on the same device and dtype.

    Extra keyword arguments: backend ("cpu", "cuda", "triton" or None: the fastest that can run
    on the parameters' device) and flat (see the module docstring). foreach and fused are
    accepted for compatibility and have no effect (every step is fused). differentiable=True
    runs torch's own for-loop under grad mode, as torch.optim.SGD(differentiable=True) does
    (path "torch-differentiable" in last_step; no flat layout, no kernel). For bf16
    parameters (README, "Master weights" and "Stochastic rounding"): master_weights=True (exact
    fp32 masters) or stochastic_rounding=True with sr_seed (an int in [0, 2**32): the random
    bits of every step follow from it, the parameter's step count and its position in the
    optimizer). For fp32 parameters (README, "Narrow momentum"): momentum_dtype=torch.bfloat16
    or torch.int8 stores the momentum buffers narrow (torch.float32 or None: torch's).
    capturable=True: under GradScaler the step that creates the momentum buffers decides on the
    device whether it was skipped (no host read of found_inf): whole flat buckets (DDP's
    bucket views included) and the per-tensor path's list calls (FSDP2's shards included, and
    the parameters of a bucket whose first step is not the whole bucket's; not the modes,
    which still read found_inf then), on every backend. Until the host has
    read it (a later step, or state_dict(), which never shows them), opt.state holds those
    buffers even after steps GradScaler skipped (_Unsure).
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 *, maximize=False, foreach=None, differentiable=False, fused=None,
                 backend: str | None = None, flat: bool = True, master_weights: bool = False,
                 stochastic_rounding: bool = False, sr_seed: int = 0,
                 momentum_dtype: torch.dtype | None = None, capturable: bool = False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if fused and differentiable:  # torch's checks, made before the layout is built
            raise RuntimeError("`fused` does not support `differentiable`")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        for flag, on in (("master_weights=True", master_weights),
                         ("stochastic_rounding=True", stochastic_rounding),
                         (f"momentum_dtype={momentum_dtype}",
                          _MOMENTUM_DTYPES.get(momentum_dtype, False))):
            if on and differentiable:
                raise ValueError(f"{flag} cannot be used with differentiable=True (that "
                                 "step is torch's own for-loop under autograd)")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=bool(differentiable), fused=fused)
        defaults.update(_mode_defaults(master_weights, stochastic_rounding, sr_seed,
                                       momentum_dtype))
        super().__init__(params, defaults, backend=backend, flat=flat, capturable=capturable)

    def _fill_group_defaults(self) -> None:
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)  # torch.optim.SGD.__setstate__'s default

    @staticmethod
    def _hyper_values(g) -> tuple:
        return (g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"],
                g["maximize"], g.get("master_weights"), g.get("stochastic_rounding"),
                g.get("sr_seed"), g.get("momentum_dtype"))

    def _hyper(self, group) -> dict:
        return dict(lr=_hyper_tensor(group["lr"], "lr"), momentum=_hyper_tensor(group["momentum"], "momentum"),
                    dampening=_hyper_tensor(group["dampening"], "dampening"),
                    weight_decay=_hyper_tensor(group["weight_decay"], "weight_decay"),
                    nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]))


class Momentum(_FusedMomentum):
    """Momentum in the EMA form: v = momentum * v + (1 - momentum) * g ; p = p - lr * v, with v
    starting at zero (momentum_cuda.reference.MomentumReference gives the same bits in plain
    PyTorch). weight_decay adds weight_decay * p to the gradient first, maximize negates it.
    The buffer is stored as state[p]["momentum_buffer"]. capturable as for SGD."""

    _ema = True

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0, *, maximize=False,
                 backend: str | None = None, flat: bool = True, master_weights: bool = False,
                 stochastic_rounding: bool = False, sr_seed: int = 0,
                 momentum_dtype: torch.dtype | None = None, capturable: bool = False):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        self._check_momentum(momentum)
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize)
        defaults.update(_mode_defaults(master_weights, stochastic_rounding, sr_seed,
                                       momentum_dtype))
        super().__init__(params, defaults, backend=backend, flat=flat, capturable=capturable)

    @staticmethod
    def _check_momentum(momentum) -> None:
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum} (the EMA form needs "
                             "0 < momentum < 1; for momentum=0 use SGD)")

    @staticmethod
    def _hyper_values(g) -> tuple:
        return (g["lr"], g["momentum"], g["weight_decay"], g["maximize"], g.get("master_weights"),
                g.get("stochastic_rounding"), g.get("sr_seed"), g.get("momentum_dtype"))

    def _hyper(self, group) -> dict:
        m = group["momentum"]
        if not (isinstance(m, torch.Tensor) or _scalar(m) or _numberlike(m)):
            raise TypeError(f"momentum must be a number or a 1-element tensor, got {m!r}")
        m = float(m)
        self._check_momentum(m)  # a scheduler may have changed it
        return dict(lr=_hyper_tensor(group["lr"], "lr"), momentum=m, dampening=_dampening(group["momentum"]),
                    weight_decay=_hyper_tensor(group["weight_decay"], "weight_decay"),
                    nesterov=False, maximize=bool(group["maximize"]))
