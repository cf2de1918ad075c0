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
                            weight_decay: float = 0.0, maximize: bool = False,
                            dampening: float | None = None) -> None:
    """One EMA-momentum step over lists of tensors, in place (bufs start as zeros). dampening,
    if given, stands for momentum in the gradient's weight 1 - dampening: momentum_cuda.Momentum
    passes a float whose 1 - d is the 1 - m that MomentumReference computes from a momentum
    tensor (a tensor op in the tensor's dtype), with momentum that tensor's value as a float."""
    alpha = 1 - (momentum if dampening is None else dampening)
    for p, g, v in zip(params, grads, bufs):
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        v.mul_(momentum).add_(g, alpha=alpha)
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


def _bf16_rne(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 rounded to nearest even (torch's .to), a NaN as 0x7FC0: torch's CPU
    conversion gives 0xFFFF, c10's scalar one (and the kernels) 0x7FC0."""
    out = x.to(torch.bfloat16)
    out.view(torch.int16).masked_fill_(x.isnan(), 0x7FC0)
    return out


def bf16_split(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An fp32 master as (bf16 parameter, int16 remainder, bool tie), as
    csrc/include/momentum_cuda/bf16_split.h splits it: the parameter is the master rounded to
    nearest even (torch's .to(torch.bfloat16)), the remainder its low 16 bits, the tie bit set
    where it rounded up from a halfway point. bf16_join gives the master back bit for bit (a
    NaN as a NaN; a NaN's parameter is 0x7FC0, as the kernels write it)."""
    if master.dtype != torch.float32:
        raise TypeError(f"bf16_split: master must be float32, got {master.dtype}")
    u = master.view(torch.int32)
    param = _bf16_rne(master)
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


def sgd_fp16_master_reference_step(params, grads, bufs, masters, *, lr: float, momentum: float,
                                   dampening: float = 0.0, weight_decay: float = 0.0,
                                   nesterov: bool = False, maximize: bool = False) -> list:
    """fp16 master weights in plain torch (csrc/include/momentum_cuda/fp16_master.h), in place:
    each fp32 master takes torch.optim.SGD(foreach=False)'s step with its fp16 gradient widened
    to fp32; its fp16 parameter becomes the master rounded to nearest even (torch's
    .to(torch.float16)). bufs: fp32, None where a first step creates one; returns them."""
    bufs = list(bufs)
    from torch.optim.sgd import sgd as _sgd
    _sgd(list(masters), [g.float() for g in grads], bufs, foreach=False, lr=lr,
         momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
         maximize=maximize)
    for p, m in zip(params, masters):
        p.copy_(m)
    return bufs


# ---- stochastic rounding (csrc/include/momentum_cuda/stochastic.h) --------------------------
_U32 = 0xFFFFFFFF


def _mul32(x, c: int):
    """(x * c) mod 2^32 for uint32 values x (ints or int64 tensors) and a 32-bit constant c,
    without int64 overflow: the product is split at 16 bits."""
    return ((x & 0xFFFF) * c + (((x >> 16) * c & 0xFFFF) << 16)) & _U32


def lowbias32(x):
    """A bijective 32-bit mixer (C. Wellons' "lowbias32"), on ints or int64 tensors of uint32
    values: the stochastic-rounding random bits are built from it on every backend."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sr_key(seed: int, step: int, stream: int) -> int:
    """The 32-bit key of one tensor's stochastic rounding at one step: seed (the optimizer's),
    step (the parameter's own step count, 1 on its first step) and stream (the parameter's
    position in the optimizer's param_groups), each taken mod 2^32."""
    return lowbias32(lowbias32(lowbias32(seed & _U32) ^ (step & _U32)) ^ (stream & _U32))


def sr_random(key: int, numel: int, device=None, offset: int = 0) -> torch.Tensor:
    """32 random bits (int64 tensor of uint32 values) for elements 0 .. numel-1 in memory
    order, whose indices in their whole tensor are i = offset .. offset + numel - 1 (a shard's
    offset; 0 for a whole tensor): lowbias32(lowbias32(key ^ (i >> 32)) ^ (i mod 2^32)). For
    one key, distinct indices below 2^32 get distinct values (lowbias32 is a bijection)."""
    i = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    return lowbias32(lowbias32(key ^ (i >> 32)) ^ (i & _U32))


def bf16_round_stochastic(m: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 rounded up (in magnitude) with probability low16(m) / 2^16: the low 16
    bits of r (uniform) are added to m's bits and the sum truncated, so the result's mean is
    m. NaN gives 0x7FC0 (as the round-to-nearest conversion); a finite value above the
    largest bf16 may round to inf."""
    if m.dtype != torch.float32:
        raise TypeError(f"bf16_round_stochastic: m must be float32, got {m.dtype}")
    u = m.view(torch.int32).to(torch.int64) & _U32
    bits = ((u + (r.reshape(m.shape) & 0xFFFF)) >> 16) & 0xFFFF
    bits = torch.where(m.isnan(), 0x7FC0, bits)
    return (bits - ((bits >> 15) << 16)).to(torch.int16).view(torch.bfloat16)


def sgd_sr_reference_step(params, grads, bufs, keys, *, lr: float, momentum: float,
                          dampening: float = 0.0, weight_decay: float = 0.0,
                          nesterov: bool = False, maximize: bool = False,
                          offsets=None) -> list:
    """stochastic_rounding=True in plain torch, in place: each bf16 parameter widened to fp32
    takes torch.optim.SGD(foreach=False)'s fp32 step with its gradient and its bf16 momentum
    buffer widened (None: a first step creates it), then is rounded stochastically back to bf16
    with sr_random(key, offset) over its elements in memory order; the buffer is rounded to
    nearest even (a NaN as 0x7FC0). keys: one sr_key per parameter; offsets: each parameter's
    first index in its whole tensor (a shard's; None: all 0). Returns the bf16 buffers."""
    from torch.optim.sgd import sgd as _sgd
    ms = [p.float() for p in params]
    b32 = [None if b is None else b.float() for b in bufs]
    _sgd(ms, [g.float() for g in grads], b32, foreach=False, lr=lr, momentum=momentum,
         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
    for p, m, key, off in zip(params, ms, keys, offsets or [0] * len(params)):
        view = _memory_order(m)
        r = sr_random(key, m.numel(), m.device, off)
        rounded = bf16_round_stochastic(view.contiguous(), r)
        _memory_order(p).copy_(rounded.view(view.shape))
    return [None if b is None else _bf16_rne(b) for b in b32]


# ---- momentum_dtype (csrc/include/momentum_cuda/momentum_dtype.h) ---------------------------
QBLOCK = 256  # elements per int8 block (one fp32 scale each)


def _div32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 a / b correctly rounded, whatever torch's own fp32 division does (a scalar divisor
    may become a multiply by its reciprocal): the quotient in fp64 rounded once to fp32, which
    is the correctly rounded fp32 quotient (53 >= 2 * 24 + 2: double rounding is innocuous)."""
    return (a.double() / b.double()).float()


def quantize_momentum(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An fp32 momentum buffer as (int8 codes laid out like v, fp32 scales, one per QBLOCK
    elements of v in memory order): per block a = max |v| (a NaN as inf), scale = a / 127 (NaN
    where a is inf), code = round(clamp(v / scale, -127, 127)) ties to even, 0 where scale is 0
    or NaN."""
    if v.dtype != torch.float32:
        raise TypeError(f"quantize_momentum: v must be float32, got {v.dtype}")
    flat = _memory_order(v).reshape(-1)
    n = flat.numel()
    blocks = (n + QBLOCK - 1) // QBLOCK
    padded = torch.zeros(blocks * QBLOCK, dtype=torch.float32, device=v.device)
    padded[:n] = flat
    rows = padded.view(blocks, QBLOCK)
    a = torch.where(rows.isnan(), torch.inf, rows.abs()).amax(1) if blocks else padded[:0]
    scale = torch.where(a.isinf(), torch.nan, _div32(a, torch.full_like(a, 127.0)))
    ok = (scale > 0).unsqueeze(1)
    x = _div32(rows, torch.where(ok, scale.unsqueeze(1), 1.0))
    x = torch.where(ok, x, 0.0).clamp(-127, 127).round()
    codes = torch.empty_like(v, dtype=torch.int8)
    _memory_order(codes).copy_(x.reshape(-1)[:n].to(torch.int8).view(_memory_order(v).shape))
    return codes, scale


def block_scales(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Each int8 code's block scale: fp32 laid out like the codes, element i (memory order)
    holding scales[i // QBLOCK]."""
    idx = torch.arange(codes.numel(), device=codes.device) // QBLOCK
    out = torch.empty_like(codes, dtype=torch.float32)
    _memory_order(out).copy_(scales[idx].view(_memory_order(codes).shape))
    return out


def dequantize_momentum(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """quantize_momentum's buffer read back in fp32: code * its block's scale (one fp32
    multiply; every element of a block with a NaN scale is NaN)."""
    return codes.float() * block_scales(codes, scales)


def sgd_momentum_dtype_reference_step(params, grads, bufs, scales=None, *, lr: float,
                                      momentum: float, dampening: float = 0.0,
                                      weight_decay: float = 0.0, nesterov: bool = False,
                                      maximize: bool = False):
    """momentum_dtype= in plain torch, in place on the fp32 parameters: each takes
    torch.optim.SGD(foreach=False)'s step with its momentum buffer widened to fp32 (bf16
    buffers exactly; int8 codes times their block's scale; None: a first step creates it); the
    new buffer is then stored narrow again: bf16 rounded to nearest even (NaN as 0x7FC0), or
    int8 by quantize_momentum. scales: None for bf16 buffers, else one fp32 scales tensor per
    int8 buffer (None for one a first step creates). Returns (bufs, scales) after the step
    (scales None for bf16)."""
    from torch.optim.sgd import sgd as _sgd
    int8 = scales is not None
    if int8:
        b32 = [None if b is None else dequantize_momentum(b, s) for b, s in zip(bufs, scales)]
    else:
        b32 = [None if b is None else b.float() for b in bufs]
    _sgd(list(params), list(grads), b32, foreach=False, lr=lr, momentum=momentum,
         dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize)
    if not int8:
        return [None if b is None else _bf16_rne(b) for b in b32], None
    out = [None if b is None else quantize_momentum(b) for b in b32]
    return [None if o is None else o[0] for o in out], [None if o is None else o[1] for o in out]
