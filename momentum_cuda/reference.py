"""The numeric contract in plain PyTorch, kept in the package so anyone can read it.

`MomentumReference` is the EMA form of momentum, one torch op per line:

    g = -g                               (maximize)
    g = g + weight_decay * p             (weight_decay != 0)
    v = momentum * v + (1 - momentum) * g,   v starting at zero
    p = p - lr * v

written exactly as torch.optim.SGD's for-loop writes its ops (mul_ then add_ with alpha), so
momentum_cuda.Momentum must reproduce its bits on every backend. torch.optim.SGD(foreach=False)
itself is the reference for momentum_cuda.SGD.
"""
from __future__ import annotations

import torch
from torch.optim import Optimizer


def momentum_reference_step(params, grads, bufs, *, lr: float, momentum: float,
                            weight_decay: float = 0.0, maximize: bool = False) -> None:
    """One EMA-momentum step over lists of tensors, in place (bufs start as zeros)."""
    for p, g, v in zip(params, grads, bufs):
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        v.mul_(momentum).add_(g, alpha=1 - momentum)
        p.add_(v, alpha=-lr)


class MomentumReference(Optimizer):
    """Plain-PyTorch EMA momentum: the bits momentum_cuda.Momentum must give."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                 *, maximize: bool = False):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if state.get("momentum_buffer") is None:  # absent or None: starts at zero
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                bufs.append(state["momentum_buffer"])
            momentum_reference_step(params, grads, bufs, lr=group["lr"], momentum=group["momentum"],
                                    weight_decay=group["weight_decay"], maximize=group["maximize"])
        return loss


def bf16_split(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An fp32 master as (bf16 parameter, int16 remainder, bool tie), as
    csrc/include/momentum_cuda/bf16_split.h splits it: the parameter is the master rounded to
    nearest even (torch's .to(torch.bfloat16)), the remainder its low 16 bits, the tie bit set
    where it rounded up from a halfway point. bf16_join gives the master back bit for bit (a
    NaN as a NaN; a NaN's parameter is 0x7FC0, as the kernels write it)."""
    if master.dtype != torch.float32:
        raise TypeError(f"bf16_split: master must be float32, got {master.dtype}")
    u = master.view(torch.int32)
    param = master.to(torch.bfloat16)
    # NaN: torch's CPU conversion gives 0xFFFF, c10's scalar one (and the kernels) 0x7FC0
    param.view(torch.int16).masked_fill_(master.isnan(), 0x7FC0)
    high = (u >> 16) & 0xFFFF
    low = u & 0xFFFF
    tie = (low == 0x8000) & (high != param.view(torch.int16).to(torch.int32) & 0xFFFF)
    rem = (low - ((low >> 15) << 16)).to(torch.int16)  # the low half as a signed 16-bit value
    return param, rem, tie


def bf16_join(param: torch.Tensor, rem: torch.Tensor, tie: torch.Tensor) -> torch.Tensor:
    """The fp32 master that bf16_split split into (param, rem, tie)."""
    if (param.dtype, rem.dtype, tie.dtype) != (torch.bfloat16, torch.int16, torch.bool):
        raise TypeError("bf16_join takes (bfloat16, int16, bool) tensors, got "
                        f"({param.dtype}, {rem.dtype}, {tie.dtype})")
    low = rem.to(torch.int32) & 0xFFFF
    up = ((low > 0x8000) | ((low == 0x8000) & tie)).to(torch.int32)
    high = (param.view(torch.int16).to(torch.int64) & 0xFFFF) - up
    u = (high << 16) | low  # the master's bits as an unsigned 32-bit value, in int64
    return (u - ((u >> 31) << 32)).to(torch.int32).view(torch.float32)


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's dims permuted by decreasing stride: a contiguous view whose elements
    are in memory order (the kernels' order; channels_last is NHWC)."""
    return t.permute(sorted(range(t.dim()), key=lambda d: -t.stride(d)))


def pack_ties(tie: torch.Tensor) -> torch.Tensor:
    """A dense bool tensor's elements in memory order as bits, 8 to a uint8: bit j of byte k is
    element 8k + j; the last byte's bits past the end are 0."""
    flat = _memory_order(tie).reshape(-1).to(torch.uint8)
    n = flat.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=tie.device)
    padded[:n] = flat
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=tie.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_ties(ties: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """pack_ties undone: a bool tensor shaped and laid out like the dense tensor `like`."""
    bits = (ties.to(torch.int32).unsqueeze(1) >> torch.arange(8, device=ties.device)) & 1
    out = torch.empty_like(like, dtype=torch.bool)
    view = _memory_order(out)
    view.copy_(bits.reshape(-1)[:like.numel()].bool().reshape(view.shape))
    return out


def sgd_master_reference_step(params, grads, bufs, rems, ties, *, lr: float, momentum: float,
                              dampening: float = 0.0, weight_decay: float = 0.0,
                              nesterov: bool = False, maximize: bool = False) -> list:
    """The master-weights contract in plain torch, in place: each bf16 parameter's fp32 master
    (bf16_join of the parameter, its int16 remainder and its packed tie bits) takes
    torch.optim.SGD(foreach=False)'s step with the gradient widened to fp32, then is split
    again into the three. bufs: fp32 momentum buffers, None where a first step creates one;
    returns the buffers after the step (torch's functional sgd). Dense tensors, the tie bits
    in memory order as the kernels keep them."""
    masters = [bf16_join(p, r, unpack_ties(t, p)) for p, r, t in zip(params, rems, ties)]
    bufs = list(bufs)
    from torch.optim.sgd import sgd as _sgd
    _sgd(masters, [g.float() for g in grads], bufs, foreach=False, lr=lr, momentum=momentum,
         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
    for m, p, r, t in zip(masters, params, rems, ties):
        param, rem, tie = bf16_split(m)
        p.copy_(param)
        r.copy_(rem)
        t.copy_(pack_ties(tie))
    return bufs
