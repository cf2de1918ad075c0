"""The step ops in torch's dispatcher: torch.ops.momentum_cuda.*.

    sgd_step_flat_(param, grad, momentum_buffer, segments, lr, momentum, dampening,
                   weight_decay, nesterov, maximize, first_step)
    sgd_step_list_(params, grads, momentum_buffers, lr, ...)
        Declared with their schemas in csrc/momentum_ops.cpp (TORCH_LIBRARY), with a CPU and a
        CUDA implementation there; importing momentum_cuda._C registers them.
    triton_sgd_step_flat_, triton_sgd_step_list_
        The same schemas for the Triton kernels (torch.library.custom_op, below), less
        GradScaler's two tensors and the clip coefficient, which the Triton kernels do not read
        yet (an optimizer on that backend does not claim _step_supports_amp_scaling, and
        multiplies a pending clip into the gradients with torch's op): the kernels read a
        pointer table, which inductor cannot trace into, so the op is opaque to it.

Each op writes param(s) and momentum buffer(s) in place, reads the gradients (and, given
GradScaler's grad_scale or a clip coefficient, writes them back unscaled and clipped;
found_inf != 0 skips the update) and returns nothing; lr_tensor (a 1-element fp32/fp64 tensor on the parameters' device) is read in place of
lr, on the device (no host sync); its fake kernel (for FakeTensor, torch.compile and opcheck) has
nothing to compute and checks only that the tensors share a device. `step_ops(backend)` gives (flat op, list op) of a backend.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._backends import _C

_FLAT = "momentum_cuda::sgd_step_flat_"
_LIST = "momentum_cuda::sgd_step_list_"
_TRITON_FLAT = "momentum_cuda::triton_sgd_step_flat_"
_TRITON_LIST = "momentum_cuda::triton_sgd_step_list_"

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
               lr_tensor=None, clip_coef=None) -> None:
    _one_device([(param, "param"), (grad, "grad"), (momentum_buffer, "momentum_buffer"),
                 (grad_scale, "grad_scale"), (found_inf, "found_inf"),
                 (lr_tensor, "lr_tensor"), (clip_coef, "clip_coef")])
    if segments.device.type != "cpu":
        raise RuntimeError(f"segments must be a CPU tensor, got one on {segments.device}")


def _list_fake(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
               nesterov, maximize, first_step, grad_scale=None, found_inf=None,
               lr_tensor=None, clip_coef=None) -> None:
    named = [(t, f"{name}[{i}]") for ts, name in ((params, "params"), (grads, "grads"),
                                                  (momentum_buffers, "momentum_buffers"))
             for i, t in enumerate(ts)]
    if named:
        _one_device(named + [(grad_scale, "grad_scale"), (found_inf, "found_inf"),
                             (lr_tensor, "lr_tensor"), (clip_coef, "clip_coef")])


if _C is not None:
    torch.library.register_fake(_FLAT)(_flat_fake)
    torch.library.register_fake(_LIST)(_list_fake)


@torch.library.custom_op(_TRITON_FLAT, mutates_args=("param", "momentum_buffer"))
def triton_sgd_step_flat_(param: torch.Tensor, grad: torch.Tensor,
                          momentum_buffer: Optional[torch.Tensor], segments: torch.Tensor,
                          lr: float, momentum: float, dampening: float, weight_decay: float,
                          nesterov: bool, maximize: bool, first_step: bool,
                          lr_tensor: Optional[torch.Tensor] = None) -> None:
    from . import triton_kernels as tk  # triton is imported only when a Triton step runs
    tk.triton_sgd_step_flat_(param, grad, momentum_buffer, segments, lr=lr, momentum=momentum,
                             dampening=dampening, weight_decay=weight_decay,
                             nesterov=nesterov, maximize=maximize, first_step=first_step,
                             lr_tensor=lr_tensor)


triton_sgd_step_flat_.register_fake(_flat_fake)


@torch.library.custom_op(_TRITON_LIST, mutates_args=("params", "momentum_buffers"))
def triton_sgd_step_list_(params: list[torch.Tensor], grads: list[torch.Tensor],
                          momentum_buffers: list[torch.Tensor], lr: float, momentum: float,
                          dampening: float, weight_decay: float, nesterov: bool,
                          maximize: bool, first_step: bool,
                          lr_tensor: Optional[torch.Tensor] = None) -> None:
    from . import triton_kernels as tk
    tk.triton_sgd_step_list_(params, grads, momentum_buffers, lr=lr, momentum=momentum,
                             dampening=dampening, weight_decay=weight_decay,
                             nesterov=nesterov, maximize=maximize, first_step=first_step,
                             lr_tensor=lr_tensor)


triton_sgd_step_list_.register_fake(_list_fake)


def step_ops(backend: str):
    """(flat step op, list step op) of a backend: the dispatcher picks the CPU or the CUDA
    implementation by the tensors' device; "triton" has ops of its own."""
    if backend == "triton":
        ops = torch.ops.momentum_cuda
        return ops.triton_sgd_step_flat_.default, ops.triton_sgd_step_list_.default
    if backend not in ("cpu", "cuda"):
        raise ValueError(f"backend must be 'cpu', 'cuda' or 'triton', got {backend!r}")
    if _C is None or (backend == "cuda" and not _C.built_with_cuda):
        raise RuntimeError(f"backend {backend!r} has no kernels in this build")
    ops = torch.ops.momentum_cuda
    return ops.sgd_step_flat_.default, ops.sgd_step_list_.default
