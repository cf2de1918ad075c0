"""The step ops in torch's dispatcher: torch.ops.momentum_cuda.*.

    sgd_step_flat_(param, grad, momentum_buffer, segments, lr, momentum, dampening,
                   weight_decay, nesterov, maximize, first_step)
    sgd_step_list_(params, grads, momentum_buffers, lr, ...)
        Declared with their schemas in csrc/momentum_ops.cpp (TORCH_LIBRARY), with a CPU and a
        CUDA implementation there; importing momentum_cuda._C registers them.
    sgd_step_master_list_(params, grads, momentum_buffers, remainders, ties, lr, ...)
        bf16 parameters with exact fp32 masters (csrc/include/momentum_cuda/bf16_split.h):
        fp32 momentum buffers, int16 remainders, uint8 tie bytes (a bit per element); torch's
        fp32 step on each master; a CPU and a CUDA implementation.
    sgd_step_sr_list_(params, grads, momentum_buffers, keys, lr, ...)
        Stochastic rounding (csrc/include/momentum_cuda/stochastic.h): bf16 parameters,
        gradients and momentum buffers, keys (one uint32 per parameter, as an int) seeding each
        parameter's random bits; torch's fp32 step on the widened values, the parameter rounded
        stochastically, the buffer to nearest even.
    sgd_step_qmom_list_(params, grads, momentum_buffers, scales, lr, ...)
        momentum_dtype (csrc/include/momentum_cuda/momentum_dtype.h): fp32 parameters and
        gradients, momentum buffers stored bf16 (scales empty) or as int8 codes with one fp32
        scale per 256 elements (scales, one tensor per parameter); torch's fp32 step on the
        widened buffer, which is then stored narrow again.
    sgd_step_fp16_master_list_(params, grads, momentum_buffers, masters, lr, ...)
        fp16 parameters with separate fp32 masters (csrc/include/momentum_cuda/fp16_master.h):
        torch's fp32 step on each master with the fp16 gradient widened, the parameter its
        rounding to nearest even; fp32 momentum buffers.
        The master, fp16 master and momentum_dtype ops take GradScaler's found_inf (keyword,
        a 1-element fp32 tensor on the parameters' device): != 0 skips the step (nothing is
        written; on CUDA read by the kernel, no host sync). They never unscale: their
        gradients are read only. All four take lr_tensor, momentum_tensor, dampening_tensor
        and weight_decay_tensor as the ops above do (below).
    triton_sgd_step_flat_, triton_sgd_step_list_
        The Triton kernels (torch.library.custom_op, below) without gradient writes: the
        schemas above less grad_scale and clip_coef (found_inf, which only skips the update, is
        taken); the gradients are read only.
    triton_sgd_step_amp_flat_, triton_sgd_step_amp_list_
        The same with GradScaler's grad_scale and found_inf and the clip coefficient, the
        keywords of the schemas above; they declare the gradients written (unscaled and
        clipped in place), which a custom_op bumps on every call, so they are called only
        when grad_scale or clip_coef is given. The Triton ops are opaque to inductor (the list
        kernel reads a pointer table, which it cannot trace into).
    triton_sgd_step_master_list_, triton_sgd_step_sr_list_, triton_sgd_step_qmom_list_,
    triton_sgd_step_fp16_master_list_
        The Triton kernels of sgd_step_master_list_, sgd_step_sr_list_, sgd_step_qmom_list_
        and sgd_step_fp16_master_list_ (same schemas; any device the Triton backend runs on).

Each op writes param(s) and momentum buffer(s) in place, reads the gradients (and, given
GradScaler's grad_scale or a clip coefficient, writes them back unscaled and clipped;
found_inf != 0 skips the update) and returns nothing; lr_tensor, momentum_tensor,
dampening_tensor and weight_decay_tensor (1-element fp32/fp64 tensors on the parameters' device)
are read in place of the floats, on the device (no host sync), and so is first_step_tensor (a
1-element bool, with first_step=True: whether the buffers were never stepped, so that a first
step is decided where found_inf lives); its fake kernel
(for FakeTensor, torch.compile and opcheck) has nothing to compute and checks only that the
tensors share a device. `step_ops(backend)` gives (flat op, list op) of a backend: for "triton"
two small functions that call the amp op when grad_scale or clip_coef is given and the plain
one otherwise; `master_op(backend)`, `fp16_master_op(backend)`, `sr_op(backend)` and
`qmom_op(backend)` give the bf16 and fp16 master-weights, the stochastic-rounding and the
momentum_dtype op of a backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._backends import _C

_FLAT = "momentum_cuda::sgd_step_flat_"
_LIST = "momentum_cuda::sgd_step_list_"
_MASTER_LIST = "momentum_cuda::sgd_step_master_list_"
_TRITON_FLAT = "momentum_cuda::triton_sgd_step_flat_"
_TRITON_LIST = "momentum_cuda::triton_sgd_step_list_"
_TRITON_AMP_FLAT = "momentum_cuda::triton_sgd_step_amp_flat_"
_TRITON_AMP_LIST = "momentum_cuda::triton_sgd_step_amp_list_"
_TRITON_MASTER_LIST = "momentum_cuda::triton_sgd_step_master_list_"
_SR_LIST = "momentum_cuda::sgd_step_sr_list_"
_TRITON_SR_LIST = "momentum_cuda::triton_sgd_step_sr_list_"
_QMOM_LIST = "momentum_cuda::sgd_step_qmom_list_"
_TRITON_QMOM_LIST = "momentum_cuda::triton_sgd_step_qmom_list_"
_FP16_MASTER_LIST = "momentum_cuda::sgd_step_fp16_master_list_"
_TRITON_FP16_MASTER_LIST = "momentum_cuda::triton_sgd_step_fp16_master_list_"

def _one_device(named) -> None:
    """The fake kernels' check. A meta tensor among cpu or cuda ones sends the call to the
    Meta key, i.e. here, not to the kernel that would refuse it: refuse it here. (Calls with
    meta tensors only are shape-only calls: they compute nothing.)"""
    (t0, n0), *rest = [(t, n) for t, n in named if t is not None]
    for t, n in rest:
        if t.device != t0.device:
            raise RuntimeError(f"{n} is on {t.device} but {n0} is on {t0.device}; one call "
                               f"takes one device")


def _flat_fake(param, grad, momentum_buffer, segments, lr, momentum, dampening, weight_decay,
               nesterov, maximize, first_step, grad_scale=None, found_inf=None,
               lr_tensor=None, clip_coef=None, momentum_tensor=None, dampening_tensor=None,
               weight_decay_tensor=None, first_step_tensor=None) -> None:
    _one_device([(param, "param"), (grad, "grad"), (momentum_buffer, "momentum_buffer"),
                 (grad_scale, "grad_scale"), (found_inf, "found_inf"),
                 (lr_tensor, "lr_tensor"), (clip_coef, "clip_coef"),
                 (momentum_tensor, "momentum_tensor"), (dampening_tensor, "dampening_tensor"),
                 (weight_decay_tensor, "weight_decay_tensor"),
                 (first_step_tensor, "first_step_tensor")])
    if segments.device.type != "cpu":
        raise RuntimeError(f"segments must be a CPU tensor, got one on {segments.device}")


def _list_fake(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
               nesterov, maximize, first_step, grad_scale=None, found_inf=None,
               lr_tensor=None, clip_coef=None, momentum_tensor=None, dampening_tensor=None,
               weight_decay_tensor=None, first_step_tensor=None) -> None:
    named = [(t, f"{name}[{i}]") for ts, name in ((params, "params"), (grads, "grads"),
                                                  (momentum_buffers, "momentum_buffers"))
             for i, t in enumerate(ts)]
    if named:
        _one_device(named + [(grad_scale, "grad_scale"), (found_inf, "found_inf"),
                             (lr_tensor, "lr_tensor"), (clip_coef, "clip_coef"),
                             (momentum_tensor, "momentum_tensor"),
                             (dampening_tensor, "dampening_tensor"),
                             (weight_decay_tensor, "weight_decay_tensor"),
                             (first_step_tensor, "first_step_tensor")])


def _lists_fake(tensors, **lists) -> None:
    """The fake kernel of an op over lists of tensors: one device for all of them and for
    `tensors` (the given ones of its other tensor arguments, by name), where the lists are not
    empty."""
    named = [(t, f"{name}[{i}]") for name, ts in lists.items() for i, t in enumerate(ts)]
    if named:
        _one_device(named + [(t, name) for name, t in tensors.items()])


def _master_list_fake(params, grads, momentum_buffers, remainders, ties, lr, momentum,
                      dampening, weight_decay, nesterov, maximize, first_step, found_inf=None,
                      lr_tensor=None, momentum_tensor=None, dampening_tensor=None,
                      weight_decay_tensor=None) -> None:
    _lists_fake(dict(found_inf=found_inf, lr_tensor=lr_tensor, momentum_tensor=momentum_tensor,
                     dampening_tensor=dampening_tensor, weight_decay_tensor=weight_decay_tensor),
                params=params, grads=grads, momentum_buffers=momentum_buffers,
                remainders=remainders, ties=ties)


def _sr_list_fake(params, grads, momentum_buffers, keys, lr, momentum, dampening, weight_decay,
                  nesterov, maximize, first_step, offsets=None, lr_tensor=None,
                  momentum_tensor=None, dampening_tensor=None, weight_decay_tensor=None) -> None:
    _lists_fake(dict(lr_tensor=lr_tensor, momentum_tensor=momentum_tensor,
                     dampening_tensor=dampening_tensor, weight_decay_tensor=weight_decay_tensor),
                params=params, grads=grads, momentum_buffers=momentum_buffers)


def _qmom_list_fake(params, grads, momentum_buffers, scales, lr, momentum, dampening,
                    weight_decay, nesterov, maximize, first_step, found_inf=None, lr_tensor=None,
                    momentum_tensor=None, dampening_tensor=None,
                    weight_decay_tensor=None) -> None:
    _lists_fake(dict(found_inf=found_inf, lr_tensor=lr_tensor, momentum_tensor=momentum_tensor,
                     dampening_tensor=dampening_tensor, weight_decay_tensor=weight_decay_tensor),
                params=params, grads=grads, momentum_buffers=momentum_buffers, scales=scales)


def _fp16_master_list_fake(params, grads, momentum_buffers, masters, lr, momentum, dampening,
                           weight_decay, nesterov, maximize, first_step, found_inf=None,
                           lr_tensor=None, momentum_tensor=None, dampening_tensor=None,
                           weight_decay_tensor=None) -> None:
    _lists_fake(dict(found_inf=found_inf, lr_tensor=lr_tensor, momentum_tensor=momentum_tensor,
                     dampening_tensor=dampening_tensor, weight_decay_tensor=weight_decay_tensor),
                params=params, grads=grads, momentum_buffers=momentum_buffers, masters=masters)


if _C is not None:
    torch.library.register_fake(_FLAT)(_flat_fake)
    torch.library.register_fake(_LIST)(_list_fake)
    torch.library.register_fake(_MASTER_LIST)(_master_list_fake)
    torch.library.register_fake(_SR_LIST)(_sr_list_fake)
    torch.library.register_fake(_QMOM_LIST)(_qmom_list_fake)
    torch.library.register_fake(_FP16_MASTER_LIST)(_fp16_master_list_fake)


@torch.library.custom_op(_TRITON_FLAT, mutates_args=("param", "momentum_buffer"))
def triton_sgd_step_flat_(param: torch.Tensor, grad: torch.Tensor,
                          momentum_buffer: Optional[torch.Tensor], segments: torch.Tensor,
                          lr: float, momentum: float, dampening: float, weight_decay: float,
                          nesterov: bool, maximize: bool, first_step: bool,
                          lr_tensor: Optional[torch.Tensor] = None,
                          found_inf: Optional[torch.Tensor] = None,
                          momentum_tensor: Optional[torch.Tensor] = None,
                          dampening_tensor: Optional[torch.Tensor] = None,
                          weight_decay_tensor: Optional[torch.Tensor] = None,
                          first_step_tensor: Optional[torch.Tensor] = None) -> None:
    from . import triton_kernels as tk  # triton is imported only when a Triton step runs
    tk.triton_sgd_step_flat_(param, grad, momentum_buffer, segments, lr=lr, momentum=momentum,
                             dampening=dampening, weight_decay=weight_decay,
                             nesterov=nesterov, maximize=maximize, first_step=first_step,
                             lr_tensor=lr_tensor, found_inf=found_inf,
                             momentum_tensor=momentum_tensor, dampening_tensor=dampening_tensor,
                             weight_decay_tensor=weight_decay_tensor,
                             first_step_tensor=first_step_tensor)


triton_sgd_step_flat_.register_fake(_flat_fake)


@torch.library.custom_op(_TRITON_LIST, mutates_args=("params", "momentum_buffers"))
def triton_sgd_step_list_(params: list[torch.Tensor], grads: list[torch.Tensor],
                          momentum_buffers: list[torch.Tensor], lr: float, momentum: float,
                          dampening: float, weight_decay: float, nesterov: bool,
                          maximize: bool, first_step: bool,
                          lr_tensor: Optional[torch.Tensor] = None,
                          found_inf: Optional[torch.Tensor] = None,
                          momentum_tensor: Optional[torch.Tensor] = None,
                          dampening_tensor: Optional[torch.Tensor] = None,
                          weight_decay_tensor: Optional[torch.Tensor] = None,
                          first_step_tensor: Optional[torch.Tensor] = None) -> None:
    from . import triton_kernels as tk
    tk.triton_sgd_step_list_(params, grads, momentum_buffers, lr=lr, momentum=momentum,
                             dampening=dampening, weight_decay=weight_decay,
                             nesterov=nesterov, maximize=maximize, first_step=first_step,
                             lr_tensor=lr_tensor, found_inf=found_inf,
                             momentum_tensor=momentum_tensor, dampening_tensor=dampening_tensor,
                             weight_decay_tensor=weight_decay_tensor,
                             first_step_tensor=first_step_tensor)


triton_sgd_step_list_.register_fake(_list_fake)


@torch.library.custom_op(_TRITON_AMP_FLAT, mutates_args=("param", "grad", "momentum_buffer"))
def triton_sgd_step_amp_flat_(param: torch.Tensor, grad: torch.Tensor,
                              momentum_buffer: Optional[torch.Tensor], segments: torch.Tensor,
                              lr: float, momentum: float, dampening: float, weight_decay: float,
                              nesterov: bool, maximize: bool, first_step: bool,
                              grad_scale: Optional[torch.Tensor] = None,
                              found_inf: Optional[torch.Tensor] = None,
                              lr_tensor: Optional[torch.Tensor] = None,
                              clip_coef: Optional[torch.Tensor] = None,
                              momentum_tensor: Optional[torch.Tensor] = None,
                              dampening_tensor: Optional[torch.Tensor] = None,
                              weight_decay_tensor: Optional[torch.Tensor] = None,
                              first_step_tensor: Optional[torch.Tensor] = None) -> None:
    from . import triton_kernels as tk
    tk.triton_sgd_step_flat_(param, grad, momentum_buffer, segments, lr=lr, momentum=momentum,
                             dampening=dampening, weight_decay=weight_decay,
                             nesterov=nesterov, maximize=maximize, first_step=first_step,
                             lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
                             clip_coef=clip_coef, momentum_tensor=momentum_tensor,
                             dampening_tensor=dampening_tensor,
                             weight_decay_tensor=weight_decay_tensor,
                             first_step_tensor=first_step_tensor)


triton_sgd_step_amp_flat_.register_fake(_flat_fake)


@torch.library.custom_op(_TRITON_AMP_LIST, mutates_args=("params", "grads", "momentum_buffers"))
def triton_sgd_step_amp_list_(params: list[torch.Tensor], grads: list[torch.Tensor],
                              momentum_buffers: list[torch.Tensor], lr: float, momentum: float,
                              dampening: float, weight_decay: float, nesterov: bool,
                              maximize: bool, first_step: bool,
                              grad_scale: Optional[torch.Tensor] = None,
                              found_inf: Optional[torch.Tensor] = None,
                              lr_tensor: Optional[torch.Tensor] = None,
                              clip_coef: Optional[torch.Tensor] = None,
                              momentum_tensor: Optional[torch.Tensor] = None,
                              dampening_tensor: Optional[torch.Tensor] = None,
                              weight_decay_tensor: Optional[torch.Tensor] = None,
                              first_step_tensor: Optional[torch.Tensor] = None) -> None:
    from . import triton_kernels as tk
    tk.triton_sgd_step_list_(params, grads, momentum_buffers, lr=lr, momentum=momentum,
                             dampening=dampening, weight_decay=weight_decay,
                             nesterov=nesterov, maximize=maximize, first_step=first_step,
                             lr_tensor=lr_tensor, grad_scale=grad_scale, found_inf=found_inf,
                             clip_coef=clip_coef, momentum_tensor=momentum_tensor,
                             dampening_tensor=dampening_tensor,
                             weight_decay_tensor=weight_decay_tensor,
                             first_step_tensor=first_step_tensor)


triton_sgd_step_amp_list_.register_fake(_list_fake)


@torch.library.custom_op(_TRITON_MASTER_LIST,
                         mutates_args=("params", "momentum_buffers", "remainders", "ties"))
def triton_sgd_step_master_list_(params: list[torch.Tensor], grads: list[torch.Tensor],
                                 momentum_buffers: list[torch.Tensor],
                                 remainders: list[torch.Tensor], ties: list[torch.Tensor],
                                 lr: float, momentum: float, dampening: float,
                                 weight_decay: float, nesterov: bool, maximize: bool,
                                 first_step: bool,
                                 found_inf: Optional[torch.Tensor] = None,
                                 lr_tensor: Optional[torch.Tensor] = None,
                                 momentum_tensor: Optional[torch.Tensor] = None,
                                 dampening_tensor: Optional[torch.Tensor] = None,
                                 weight_decay_tensor: Optional[torch.Tensor] = None) -> None:
    from . import triton_kernels as tk
    tk.triton_sgd_step_master_list_(params, grads, momentum_buffers, remainders, ties, lr=lr,
                                    momentum=momentum, dampening=dampening,
                                    weight_decay=weight_decay, nesterov=nesterov,
                                    maximize=maximize, first_step=first_step,
                                    found_inf=found_inf, lr_tensor=lr_tensor, momentum_tensor=momentum_tensor,
                                    dampening_tensor=dampening_tensor,
                                    weight_decay_tensor=weight_decay_tensor)


triton_sgd_step_master_list_.register_fake(_master_list_fake)


@torch.library.custom_op(_TRITON_SR_LIST, mutates_args=("params", "momentum_buffers"))
def triton_sgd_step_sr_list_(params: list[torch.Tensor], grads: list[torch.Tensor],
                             momentum_buffers: list[torch.Tensor], keys: list[int], lr: float,
                             momentum: float, dampening: float, weight_decay: float,
                             nesterov: bool, maximize: bool, first_step: bool,
                             offsets: list[int] | None = None,
                             lr_tensor: Optional[torch.Tensor] = None,
                             momentum_tensor: Optional[torch.Tensor] = None,
                             dampening_tensor: Optional[torch.Tensor] = None,
                             weight_decay_tensor: Optional[torch.Tensor] = None) -> None:
    from . import triton_kernels as tk
    tk.triton_sgd_step_sr_list_(params, grads, momentum_buffers, keys, lr=lr,
                                momentum=momentum, dampening=dampening,
                                weight_decay=weight_decay, nesterov=nesterov,
                                maximize=maximize, first_step=first_step, offsets=offsets,
                                lr_tensor=lr_tensor, momentum_tensor=momentum_tensor,
                                dampening_tensor=dampening_tensor,
                                weight_decay_tensor=weight_decay_tensor)


triton_sgd_step_sr_list_.register_fake(_sr_list_fake)


@torch.library.custom_op(_TRITON_QMOM_LIST, mutates_args=("params", "momentum_buffers", "scales"))
def triton_sgd_step_qmom_list_(params: list[torch.Tensor], grads: list[torch.Tensor],
                               momentum_buffers: list[torch.Tensor], scales: list[torch.Tensor],
                               lr: float, momentum: float, dampening: float, weight_decay: float,
                               nesterov: bool, maximize: bool, first_step: bool,
                               found_inf: Optional[torch.Tensor] = None,
                               lr_tensor: Optional[torch.Tensor] = None,
                               momentum_tensor: Optional[torch.Tensor] = None,
                               dampening_tensor: Optional[torch.Tensor] = None,
                               weight_decay_tensor: Optional[torch.Tensor] = None) -> None:
    from . import triton_kernels as tk
    tk.triton_sgd_step_qmom_list_(params, grads, momentum_buffers, scales, lr=lr,
                                  momentum=momentum, dampening=dampening,
                                  weight_decay=weight_decay, nesterov=nesterov,
                                  maximize=maximize, first_step=first_step, found_inf=found_inf,
                                  lr_tensor=lr_tensor, momentum_tensor=momentum_tensor,
                                  dampening_tensor=dampening_tensor,
                                  weight_decay_tensor=weight_decay_tensor)


triton_sgd_step_qmom_list_.register_fake(_qmom_list_fake)


@torch.library.custom_op(_TRITON_FP16_MASTER_LIST,
                         mutates_args=("params", "momentum_buffers", "masters"))
def triton_sgd_step_fp16_master_list_(params: list[torch.Tensor], grads: list[torch.Tensor],
                                      momentum_buffers: list[torch.Tensor],
                                      masters: list[torch.Tensor], lr: float, momentum: float,
                                      dampening: float, weight_decay: float, nesterov: bool,
                                      maximize: bool, first_step: bool,
                                      found_inf: Optional[torch.Tensor] = None,
                                      lr_tensor: Optional[torch.Tensor] = None,
                                      momentum_tensor: Optional[torch.Tensor] = None,
                                      dampening_tensor: Optional[torch.Tensor] = None,
                                      weight_decay_tensor: Optional[torch.Tensor] = None) -> None:
    from . import triton_kernels as tk
    tk.triton_sgd_step_fp16_master_list_(params, grads, momentum_buffers, masters, lr=lr,
                                         momentum=momentum, dampening=dampening,
                                         weight_decay=weight_decay, nesterov=nesterov,
                                         maximize=maximize, first_step=first_step,
                                         found_inf=found_inf, lr_tensor=lr_tensor,
                                         momentum_tensor=momentum_tensor,
                                         dampening_tensor=dampening_tensor,
                                         weight_decay_tensor=weight_decay_tensor)


triton_sgd_step_fp16_master_list_.register_fake(_fp16_master_list_fake)


def _triton_step(name, plain, amp):
    """One of step_ops("triton"): the call of the C++ ops (same arguments and keywords) routed
    to `amp` when the gradients are written (grad_scale or clip_coef given), to `plain`
    otherwise (found_inf alone only skips: the gradients keep their version counters, as the
    C++ ops and torch's SGD leave them)."""
    def step(*args, grad_scale=None, found_inf=None, clip_coef=None, **kwargs):
        if grad_scale is not None or clip_coef is not None:
            return amp(*args, grad_scale=grad_scale, found_inf=found_inf, clip_coef=clip_coef,
                       **kwargs)
        if found_inf is not None:
            kwargs["found_inf"] = found_inf
        return plain(*args, **kwargs)
    step.__name__ = step.__qualname__ = name
    return step


_TRITON_STEP_OPS = (
    _triton_step("triton_sgd_step_flat", torch.ops.momentum_cuda.triton_sgd_step_flat_.default,
                 torch.ops.momentum_cuda.triton_sgd_step_amp_flat_.default),
    _triton_step("triton_sgd_step_list", torch.ops.momentum_cuda.triton_sgd_step_list_.default,
                 torch.ops.momentum_cuda.triton_sgd_step_amp_list_.default))


def step_ops(backend: str):
    """(flat step op, list step op) of a backend: the dispatcher picks the CPU or the CUDA
    implementation by the tensors' device; "triton" has ops of its own, the flat and the list
    one each a function over two of them (_triton_step)."""
    if backend == "triton":
        return _TRITON_STEP_OPS
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"backend must be 'cpu', 'cuda' or 'triton', got {backend!r}")
    if _C is None or (backend == "cuda" and not _C.built_with_cuda):
        raise RuntimeError(f"backend {backend!r} has no kernels in this build")
    ops = torch.ops.momentum_cuda
    return ops.sgd_step_flat_.default, ops.sgd_step_list_.default


def _mode_op(backend: str, name: str):
    """torch.ops.momentum_cuda.<name> of a backend: the C++ op on cpu and cuda (raising for an
    unknown backend or one this build has no kernels for), its triton_ twin on triton."""
    if backend != "triton":
        step_ops(backend)
    return getattr(torch.ops.momentum_cuda,
                   f"triton_{name}" if backend == "triton" else name).default


def master_op(backend: str):
    """The master-weights step op of a backend (sgd_step_master_list_'s arguments)."""
    return _mode_op(backend, "sgd_step_master_list_")


def fp16_master_op(backend: str):
    """The fp16 master-weights step op of a backend (sgd_step_fp16_master_list_'s arguments)."""
    return _mode_op(backend, "sgd_step_fp16_master_list_")


def sr_op(backend: str):
    """The stochastic-rounding step op of a backend (sgd_step_sr_list_'s arguments)."""
    return _mode_op(backend, "sgd_step_sr_list_")


def qmom_op(backend: str):
    """The momentum_dtype step op of a backend (sgd_step_qmom_list_'s arguments)."""
    return _mode_op(backend, "sgd_step_qmom_list_")
