"""momentum_cuda.SGD (a drop-in for torch.optim.SGD) and momentum_cuda.Momentum (the EMA form).

Both run the same kernel (sgd_math.h); Momentum is SGD's arithmetic with dampening = momentum, no
step-1 clone and the buffer starting at zero (momentum_cuda.reference has it in plain PyTorch).

Flat layout (flat=True, the default): on construction the parameters of each (param group,
device, dtype) that require grad are moved into one buffer and become views of it; gradients and
momentum buffers get matching flat buffers at the same offsets, and a step is ONE kernel call
over the whole span. Each parameter starts at a multiple of ALIGN_BYTES (64 bytes: a cache line,
the widest CPU vector (AVX-512) and a multiple of the 16 bytes a CUDA vector load needs); the
padding between parameters is zero in all three buffers and stays zero (the CPU kernel skips it,
the CUDA flat launch runs over it).

Correctness never depends on the layout surviving: before every step each parameter is checked
(its data still at its flat offset, its .grad still the flat view, its buffer still the flat
view); any that is not goes through the per-tensor path, with the same arithmetic.
"""
from __future__ import annotations

import logging
import math
import operator
import warnings
from dataclasses import dataclass, field

import torch
from torch.optim import Optimizer

from torch.optim.sgd import sgd as _torch_sgd

from ._backends import resolve_backend, step_fn
from ._util import is_dense as _dense
from .reference import momentum_reference_step

log = logging.getLogger("momentum_cuda")

ALIGN_BYTES = 64
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _to_float(x, name: str) -> float:
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(x.shape)}")
        return float(x.item())
    return float(x)


def _bump(tensors) -> None:
    torch.autograd.graph.increment_version(tensors)




@dataclass
class _Bucket:
    """The flat buffers of one (param group, device, dtype)."""

    params: list
    offsets: list
    flat_param: torch.Tensor
    flat_grad: torch.Tensor
    grad_views: list  # own tensors over flat_grad (set_, not views): each has its own version
    segments: torch.Tensor  # [k, 2] int64 (offset, numel) on CPU
    ptrs: list  # data_ptr() each parameter must still have
    numel_before: list  # numel_before[i]: elements of params[:i], for reports
    backend: str
    flat_buf: torch.Tensor | None = None
    buf_views: list = field(default_factory=list)
    # grad_seen[i]: grad_views[i]._version when the gradient was last zeroed; a gradient whose
    # version has not moved since received nothing and counts as None. -1: present regardless.
    grad_seen: list = field(default_factory=list)

    def present(self, i: int) -> bool:
        """Whether params[i] has a gradient this step (its .grad is its flat tensor)."""
        return self.grad_seen[i] == -1 or self.grad_views[i]._version != self.grad_seen[i]

    def cover(self, i0: int, i1: int) -> torch.Tensor:
        """One segment from params[i0] to the end of params[i1 - 1], padding included: what a
        GPU runs in one flat launch (the padding is zero everywhere and stays zero)."""
        end = self.offsets[i1 - 1] + self.params[i1 - 1].numel()
        return torch.tensor([[self.offsets[i0], end - self.offsets[i0]]], dtype=torch.int64)

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        return flat.as_strided(p.shape, p.stride(), self.offsets[i])

    def ensure_buf(self) -> None:
        if self.flat_buf is None:
            self.flat_buf = torch.zeros_like(self.flat_param)
            self.buf_views = [self.view(self.flat_buf, i) for i in range(len(self.params))]


class _FusedMomentum(Optimizer):
    """Shared machinery of SGD and Momentum: flat layout, backend choice, step, state_dict."""

    _ema = False  # Momentum: v starts at zero, dampening = momentum, no step-1 clone

    def __init__(self, params, defaults, *, backend: str | None, flat: bool):
        self._requested_backend = backend
        self._flat = bool(flat)
        self._buckets: list[list[_Bucket]] = []  # per param group
        self._outside: list[list] = []  # per param group: parameters in no bucket
        self._slot: dict[int, tuple] = {}  # id(param) -> (bucket, index)
        self._warned_torch_ops = False
        self._backend_by_device: dict[torch.device, str] = {}
        self.last_step: list[dict] = []
        super().__init__(params, defaults)
        for group in self.param_groups:  # fail now, not at the first step
            for p in group["params"]:
                self._backend_for(p.device)

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
        group = self.param_groups[-1]
        buckets = self._make_buckets(group["params"]) if self._flat else []
        bucketed = {id(p) for b in buckets for p in b.params}
        self._buckets.append(buckets)
        self._outside.append([p for p in group["params"] if id(p) not in bucketed])

    @torch.no_grad()
    def _make_buckets(self, params) -> list[_Bucket]:
        by_key: dict = {}
        for p in params:
            # Frozen, sparse, non-dense or non-float parameters stay where they are and, if
            # they ever get a gradient, take the per-tensor path.
            if p.requires_grad and p.dtype in _DTYPES and _dense(p):
                by_key.setdefault((p.device, p.dtype), []).append(p)
        buckets = []
        for (device, dtype), ps in by_key.items():
            align = max(1, ALIGN_BYTES // ps[0].element_size())
            offsets, total = [], 0
            for p in ps:
                offsets.append(total)
                total += -(-p.numel() // align) * align
            flat_param = torch.zeros(total, dtype=dtype, device=device)
            flat_grad = torch.zeros(total, dtype=dtype, device=device)
            b = _Bucket(params=ps, offsets=offsets, flat_param=flat_param, flat_grad=flat_grad,
                        grad_views=[], backend=self._backend_for(device),
                        segments=torch.tensor([[o, p.numel()] for o, p in zip(offsets, ps)],
                                              dtype=torch.int64).reshape(-1, 2), ptrs=[],
                        numel_before=[0])
            for i, p in enumerate(ps):
                view = b.view(flat_param, i)
                view.copy_(p)
                p.data = view
                # Not an autograd view: its own version counter tells whether backward (or
                # anyone) wrote into it since zero_grad().
                gview = torch.empty(0, dtype=dtype, device=device).set_(
                    flat_grad.untyped_storage(), offsets[i], p.shape, p.stride())
                had_grad = p.grad is not None
                if had_grad:
                    gview.copy_(p.grad)
                p.grad = gview
                b.grad_views.append(gview)
                b.grad_seen.append(-1 if had_grad else gview._version)
                self._slot[id(p)] = (b, i)
                b.ptrs.append(p.data_ptr())
                b.numel_before.append(b.numel_before[-1] + p.numel())
            buckets.append(b)
        return buckets

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        """flat=True: zeroes each flat gradient buffer in one pass and re-attaches any gradient
        that is no longer its flat tensor, keeping torch's semantics without giving up the
        layout: by default (torch's set_to_none=True) a parameter whose gradient nobody writes
        before the next step counts as having none and is skipped, as torch skips a None grad;
        with set_to_none=False a gradient that existed stays present (zero) and is applied.
        (Presence is read from each gradient tensor's version counter.) set_to_none=True given
        explicitly sets every .grad to None, as torch does; the next step then takes the
        per-tensor path. flat=False: exactly torch's zero_grad."""
        if not self._flat or set_to_none:
            return super().zero_grad(set_to_none=True if set_to_none is None else set_to_none)
        keep = set_to_none is False
        for buckets in self._buckets:
            for b in buckets:
                present = [p.grad is not None and (p.grad is not b.grad_views[i] or b.present(i))
                           for i, p in enumerate(b.params)]
                b.flat_grad.zero_()
                for i, p in enumerate(b.params):
                    if p.grad is not b.grad_views[i]:
                        p.grad = b.grad_views[i]
                    b.grad_seen[i] = -1 if keep and present[i] else b.grad_views[i]._version
        for outside in self._outside:
            for p in outside:
                if p.grad is None:
                    continue
                if keep:
                    p.grad.detach_().requires_grad_(False).zero_()
                else:
                    p.grad = None

    # ---- state_dict: torch.optim.SGD's format, buffers copied into the flat layout -----------
    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        with torch.no_grad():
            for buckets in self._buckets:
                for b in buckets:
                    for i, p in enumerate(b.params):
                        buf = self.state[p].get("momentum_buffer") if p in self.state else None
                        if buf is None:
                            continue
                        b.ensure_buf()
                        if buf is not b.buf_views[i]:
                            b.buf_views[i].copy_(buf)
                            self.state[p]["momentum_buffer"] = b.buf_views[i]

    # ---- step ------------------------------------------------------------------------------
    def _hyper(self, group) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; returns closure()'s loss if a closure is given.

        Every group is planned (hyper-parameters and tensors validated) before any memory is
        written, so a bad input raises with nothing updated."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = [self._plan(*gbo)
                 for gbo in zip(self.param_groups, self._buckets, self._outside)]
        self.last_step = []
        for h, runs, loose in plans:
            self._step_flat(runs, h)
            self._step_tensors(loose, h)
        return loss

    def _plan(self, group, buckets, outside):
        """(hyper-parameters, flat runs, loose (param, grad) pairs) of one group; raises on bad
        input, changes nothing."""
        h = self._hyper(group)
        for name in ("lr", "momentum", "dampening", "weight_decay"):
            if not math.isfinite(h[name]):
                raise ValueError(f"{name} must be a finite number, got {h[name]}")
        use_buf = h["momentum"] != 0
        runs = []  # [bucket, first index, end index, first_step]
        loose = [(p, p.grad) for p in outside if p.grad is not None]
        for b in buckets:
            run = self._whole_bucket_run(b, use_buf)
            if run is not None:
                runs.append(run)
                continue
            for i, p in enumerate(b.params):
                g = p.grad
                if g is None or (g is b.grad_views[i] and not b.present(i)):
                    continue
                buf = self._buffer(p) if use_buf else None
                first = bool(use_buf and buf is None and not self._ema)
                ok = g is b.grad_views[i] and p.data_ptr() == b.ptrs[i] and (
                    buf is None or (b.flat_buf is not None and buf is b.buf_views[i]))
                if not ok:
                    loose.append((p, g))
                elif runs and runs[-1][0] is b and runs[-1][2] == i and runs[-1][3] == first:
                    runs[-1][2] = i + 1
                else:
                    runs.append([b, i, i + 1, first])
        for p, g in loose:
            self._check_loose(p, g, self._buffer(p) if use_buf else None)
        return h, runs, loose

    def _whole_bucket_run(self, b, use_buf):
        """The common case, checked in bulk: every parameter of the bucket is intact, has its
        flat gradient, and all buffers are flat views (or none exists yet). Returns its one
        run, or None to let the per-parameter classification decide."""
        if not all(map(operator.is_, [p.grad for p in b.params], b.grad_views)):
            return None
        if not all(map(operator.ne, [g._version for g in b.grad_views], b.grad_seen)):
            return None  # some parameter got no gradient: classify one by one
        if [p.data_ptr() for p in b.params] != b.ptrs:
            return None
        first = False
        if use_buf:
            sget = self.state.get  # inlined _buffer(): this runs for every parameter, every step
            bufs = [None if (st := sget(p)) is None else st.get("momentum_buffer")
                    for p in b.params]
            if b.flat_buf is not None and all(map(operator.is_, bufs, b.buf_views)):
                first = False
            elif all(x is None for x in bufs):
                first = not self._ema
            else:
                return None
        return [b, 0, len(b.params), first]

    def _buffer(self, p):
        state = self.state.get(p)  # .get: planning must not create state entries
        return None if state is None else state.get("momentum_buffer")

    @staticmethod
    def _check_loose(p, g, buf) -> None:
        """What the per-tensor kernels need, checked before any kernel runs."""
        what = f"parameter of shape {tuple(p.shape)} ({p.dtype}, {p.device})"
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(f"momentum_cuda does not support sparse gradients: {what}")
        if p.dtype not in _DTYPES:
            raise RuntimeError(f"momentum_cuda supports {_DTYPES}, got a {what}")
        if not _dense(p):
            raise RuntimeError(f"momentum_cuda needs dense, non-overlapping parameters; got a "
                               f"{what} with strides {p.stride()}")
        for name, t in (("gradient", g), ("momentum_buffer", buf)):
            if t is not None and (t.shape != p.shape or t.dtype != p.dtype
                                  or t.device != p.device):
                raise RuntimeError(f"the {name} of a {what} is a tensor of shape "
                                   f"{tuple(t.shape)} ({t.dtype}, {t.device})")

    def _step_flat(self, runs, h) -> None:
        """One kernel call per run of consecutive flat parameters."""
        use_buf = h["momentum"] != 0
        for b, i0, i1, first in runs:
            if use_buf:
                b.ensure_buf()
                for i in range(i0, i1):
                    self.state[b.params[i]].setdefault("momentum_buffer", b.buf_views[i])
            # CPU: exact segments (torch's bf16 arithmetic depends on positions inside each
            # tensor); GPU (cuda, triton): one covering span, one launch.
            segs = b.segments[i0:i1] if b.backend == "cpu" else b.cover(i0, i1)
            step_fn(b.backend)[0](b.flat_param, b.flat_grad, b.flat_buf if use_buf else None,
                                  segs, first_step=first, **h)
            # The kernel wrote through raw pointers: tell autograd, as torch's in-place ops do
            # (a parameter saved for backward and then stepped must raise, not silently differ).
            _bump(b.params[i0:i1])
            if use_buf:
                _bump(b.flat_buf)  # the buffer views share its version counter
            self._report(b.backend, "flat", b.flat_param, i1 - i0,
                         b.numel_before[i1] - b.numel_before[i0])

    def _new_buffer(self, p):
        """A momentum buffer for p's first step: its flat view while p is still in place."""
        b, i = self._slot.get(id(p), (None, 0))
        if b is not None and p.data_ptr() == b.ptrs[i]:
            b.ensure_buf()
            buf = b.buf_views[i]
            return buf.zero_() if self._ema else buf
        return torch.zeros_like(p) if self._ema else torch.empty_like(p)

    def _step_tensors(self, pairs, h) -> None:
        """The per-tensor path: one list call per (device, dtype, first step)."""
        use_buf = h["momentum"] != 0
        calls: dict = {}
        torch_ops = []
        for p, g in pairs:
            buf = self._buffer(p) if use_buf else None
            if (buf is not None and buf.stride() != p.stride()) or (
                    g.stride() != p.stride() and p.dtype in (torch.bfloat16, torch.float16)):
                # torch's own bits here depend on how TensorIterator loops over operands of
                # different layouts (bf16/fp16: no vectorized body), which the kernel does not
                # model: run torch's ops for this tensor, and say so.
                torch_ops.append((p, g, buf))
                continue
            if g.stride() != p.stride():
                g = torch.empty_like(p).copy_(g)  # fp32/fp64: the layout does not change bits
            first = bool(use_buf and buf is None and not self._ema)
            if use_buf and buf is None:
                buf = self._new_buffer(p)
            ps, gs, bs = calls.setdefault((p.device, p.dtype, first), ([], [], []))
            ps.append(p)
            gs.append(g)
            if use_buf:
                bs.append(buf)
        for (device, dtype, first), (ps, gs, bs) in calls.items():
            backend = self._backend_for(device)
            step_fn(backend)[1](ps, gs, bs, first_step=first, **h)
            _bump(ps + bs)
            for p, buf in zip(ps, bs):  # new buffers enter the state once the kernel ran
                self.state[p].setdefault("momentum_buffer", buf)
            self._report(backend, "per-tensor", ps[0], len(ps), sum(p.numel() for p in ps))
        if torch_ops:
            self._step_torch_ops(torch_ops, h)

    def _step_torch_ops(self, items, h) -> None:
        """torch's own for-loop ops, for the layouts the kernel does not model (reported in
        last_step as path 'torch-ops', with a warning the first time)."""
        if not self._warned_torch_ops:
            self._warned_torch_ops = True
            warnings.warn("momentum_cuda: a bf16/fp16 gradient or a momentum buffer has another "
                          "memory layout than its parameter; stepping it with torch's own ops "
                          "to keep torch's bits (slower). See opt.last_step.", stacklevel=3)
        ps, gs, bs = (list(x) for x in zip(*items))
        use_buf = h["momentum"] != 0
        if self._ema:
            bs = [torch.zeros_like(p) if b is None else b for p, b in zip(ps, bs)]
            momentum_reference_step(ps, gs, bs, lr=h["lr"], momentum=h["momentum"],
                                    weight_decay=h["weight_decay"], maximize=h["maximize"])
        else:
            _torch_sgd(ps, gs, bs, foreach=False, **h)
        if use_buf:
            for p, buf in zip(ps, bs):
                self.state[p]["momentum_buffer"] = buf
        self._report("torch", "torch-ops", ps[0], len(ps), sum(p.numel() for p in ps))

    def _report(self, backend, path, t, tensors, numel) -> None:
        self.last_step.append(dict(backend=backend, path=path, device=str(t.device),
                                   dtype=t.dtype, tensors=tensors, numel=numel))


class SGD(_FusedMomentum):
    """Drop-in for torch.optim.SGD: same signature, defaults, state_dict format and bits as
    torch.optim.SGD(foreach=False) on the same device and dtype.

    Extra keyword arguments: backend ("cpu", "cuda", "triton" or None: the fastest that can run
    on the parameters' device) and flat (see the module docstring). foreach and fused are
    accepted for compatibility and have no effect (every step is fused); differentiable=True is
    not supported.
    """

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False,
                 *, maximize=False, foreach=None, differentiable=False, fused=None,
                 backend: str | None = None, flat: bool = True):
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
        if differentiable:
            raise NotImplementedError("momentum_cuda.SGD does not support differentiable=True")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=False, fused=fused)
        super().__init__(params, defaults, backend=backend, flat=flat)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)

    def _hyper(self, group) -> dict:
        return dict(lr=_to_float(group["lr"], "lr"), momentum=float(group["momentum"]),
                    dampening=float(group["dampening"]),
                    weight_decay=_to_float(group["weight_decay"], "weight_decay"),
                    nesterov=bool(group["nesterov"]), maximize=bool(group["maximize"]))


class Momentum(_FusedMomentum):
    """Momentum in the EMA form: v = momentum * v + (1 - momentum) * g ; p = p - lr * v, with v
    starting at zero (momentum_cuda.reference.MomentumReference gives the same bits in plain
    PyTorch). weight_decay adds weight_decay * p to the gradient first, maximize negates it.
    The buffer is stored as state[p]["momentum_buffer"]."""

    _ema = True

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0, *, maximize=False,
                 backend: str | None = None, flat: bool = True):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        self._check_momentum(momentum)
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, maximize=maximize)
        super().__init__(params, defaults, backend=backend, flat=flat)

    @staticmethod
    def _check_momentum(momentum) -> None:
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum} (the EMA form needs "
                             "0 < momentum < 1; for momentum=0 use SGD)")

    def _hyper(self, group) -> dict:
        m = float(group["momentum"])
        self._check_momentum(m)  # a scheduler may have changed it
        return dict(lr=_to_float(group["lr"], "lr"), momentum=m, dampening=m,
                    weight_decay=_to_float(group["weight_decay"], "weight_decay"),
                    nesterov=False, maximize=bool(group["maximize"]))
