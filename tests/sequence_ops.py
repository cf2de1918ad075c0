"""The machinery of tests/test_sequences.py: two twin models, one stepped by momentum_cuda, the
other by torch (torch.optim.SGD(foreach=False), or momentum_cuda.reference.MomentumReference for
momentum_cuda.Momentum), the operations a training script may apply between steps, and a bitwise
comparison of the twins. No hypothesis here: a failing sequence replays from its printed form,

    import sys; sys.path.insert(0, "tests")
    from sequence_ops import Config, run_sequence
    run_sequence(Config(...), [("backward", 3, 7), ("step",), ...])

An operation is a tuple of plain Python values (its name first), applied identically to both
twins: every random value comes from a torch.Generator seeded by the operation itself (fresh
random values, never zeros). After every operation both twins are compared bit for bit
(compare()): every parameter (dtype, shape, strides, requires_grad, bits; a lazy one not yet
materialised: its dtype), the tensor the Config.views parameters are views of (bits, strides,
and which parameters still share its storage, at which offset), each gradient's
presence, layout, dtype, shape and bits, each momentum buffer's presence, layout, dtype, shape
and bits, the param groups (which parameters, in which order), and the state_dict (state keys
and tensors; param_groups without 'foreach', which differs by construction: the torch twin is
built with foreach=False). An operation that raises must raise on both sides; where torch's
step raises, momentum_cuda's must raise before writing anything (checked against a snapshot),
and the sequence ends there (torch has updated the parameters before the one that failed).
Warnings other than momentum_cuda's own "torch's own ops" notice must be the same on both sides.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

import momentum_cuda
from momentum_cuda._util import is_dense
from momentum_cuda.reference import MomentumReference

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}
MODULES = ("conv", "lin", "head_a", "head_b", "emb", "views")
SCHEDULERS = (None, "step", "exp", "cosine", "multistep", "onecycle", "lambda")
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class Config:
    """One twin pair. defaults: the optimizer's keyword arguments as (key, value) pairs;
    groups: () for one group of every parameter, else one (module names, (key, value) pairs)
    per param group; lr_tensor: the default lr is a 1-element tensor (SGD only);
    hyper_tensors: the default momentum, dampening and weight_decay given are 1-element tensors
    (float64 when hyper_tensors == 2, else float32)."""

    dtype: str = "float32"
    flat: bool = True
    kind: str = "sgd"  # "sgd": SGD vs torch.optim.SGD; "momentum": Momentum vs MomentumReference
    embedding: bool = False
    defaults: tuple = (("lr", 0.1),)
    groups: tuple = ()
    scheduler: str | None = None
    lr_tensor: bool = False
    hyper_tensors: int = 0
    seed: int = 0
    # views "disjoint" / "overlap": Net.views holds a tensor `base` (a buffer when base_buffer,
    # else a plain attribute) and two parameters that are views of it (README, "Flat layout")
    views: str | None = None
    base_buffer: bool = False
    frozen: tuple = ()  # modules whose parameters have requires_grad=False when built
    lazy: bool = False  # lin is an nn.LazyLinear, materialised by the first backward using it
    # each side's torch.amp.GradScaler starts at scaler (None: scaler_step does nothing);
    # capturable: momentum_cuda's optimizer decides first steps on the device (optim._Unsure)
    scaler: float | None = None
    capturable: bool = False
    # compiled: momentum_cuda's steps (step, clip_step's, GradScaler's) run through
    # torch.compile(opt.step) (the traced step: optim._step_traced), with the flags of
    # capturable read back only when state_dict() or a waiting step reads them (as on a GPU)
    compiled: bool = False
    # late_flags: the same late reads for eager steps (a GPU whose copies have not come back)
    late_flags: bool = False


BASE_NUMEL = 16


class Views(nn.Module):
    """Two parameters that are views of one tensor the module keeps (self.base): a =
    base[0:6] as (2, 3), b = base[7:14] ("disjoint") or base[4:11] ("overlap"). torch's steps
    write into base; base[6] and base[14:] belong to no parameter."""

    def __init__(self, how: str, buffer: bool, dtype):
        super().__init__()
        base = torch.zeros(BASE_NUMEL, dtype=dtype)
        if buffer:
            self.register_buffer("base", base)
        else:
            self.base = base
        self.a = nn.Parameter(base[0:6].view(2, 3))
        self.b = nn.Parameter(base[7:14] if how == "disjoint" else base[4:11])


class Net(nn.Module):
    """A conv trunk (so memory_format matters), two heads (head_b only sometimes used), an
    optional sparse embedding, optional views of a kept tensor (Views), and extra parameters
    added by add_group operations. With cfg.lazy, lin is an nn.LazyLinear (27 inputs)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)  # (2, 5, 5) -> (3, 3, 3)
        self.lin = nn.LazyLinear(6) if cfg.lazy else nn.Linear(27, 6)
        self.head_a = nn.Linear(6, 3)
        self.head_b = nn.Linear(6, 2, bias=False)
        self.emb = nn.Embedding(7, 3, sparse=True) if cfg.embedding else None
        self.views = Views(cfg.views, cfg.base_buffer, DTYPES[cfg.dtype]) if cfg.views else None
        self.extras = nn.ParameterList()


def _by_dtype(ps) -> dict:
    out: dict = {}
    for p in ps:
        out.setdefault(p.dtype, []).append(p)
    return out


def _uninit(p) -> bool:
    return isinstance(p, nn.parameter.UninitializedTensorMixin)


def _base(model):
    v = getattr(model, "views", None)
    return None if v is None else v.base


class Side:
    """One twin: model, optimizer, scheduler (or None), GradScaler (or None)."""

    def __init__(self, model, opt, sched, scaler=None):
        self.model, self.opt, self.sched, self.scaler = model, opt, sched, scaler
        self.ddp = []  # (param, its view of the bucket) of a sticky grad_bucket: _rebucket

    def params(self):
        return list(self.model.parameters())


def _lambda(epoch):
    return 0.9 ** epoch


def _scheduler(kind, opt):
    S = torch.optim.lr_scheduler
    if kind is None:
        return None
    return {
        "step": lambda: S.StepLR(opt, step_size=2, gamma=0.5),
        "exp": lambda: S.ExponentialLR(opt, gamma=0.8),
        "cosine": lambda: S.CosineAnnealingLR(opt, T_max=4),
        "multistep": lambda: S.MultiStepLR(opt, milestones=[1, 3], gamma=0.3),
        "onecycle": lambda: S.OneCycleLR(opt, max_lr=0.2, total_steps=40),
        "lambda": lambda: S.LambdaLR(opt, _lambda),
    }[kind]()


def valid_hyper(kind: str, h: dict) -> dict:
    """h restricted to what the optimizer kind takes, nesterov dropped where torch's
    constructor would refuse it."""
    if kind == "momentum":
        return {k: v for k, v in h.items() if k in ("lr", "momentum", "weight_decay", "maximize")}
    h = dict(h)
    if h.get("nesterov") and (h.get("momentum", 0) <= 0 or h.get("dampening", 0) != 0):
        h["nesterov"] = False
    return h


def _make_opt(cfg: Config, model: Net, ours: bool):
    defaults = valid_hyper(cfg.kind, dict(cfg.defaults))
    if cfg.lr_tensor and cfg.kind == "sgd":
        defaults["lr"] = torch.tensor(float(defaults.get("lr", 1e-3)))  # one per side
    if cfg.hyper_tensors:
        hdtype = torch.float64 if cfg.hyper_tensors == 2 else torch.float32
        for key in ("momentum", "dampening", "weight_decay"):
            if key in defaults:
                defaults[key] = torch.tensor(float(defaults[key]), dtype=hdtype)
        if defaults.get("nesterov") and float(defaults["momentum"]) <= 0:
            defaults["nesterov"] = False  # a tiny momentum that is 0 in the tensor's dtype
    if not cfg.groups:
        params = list(model.parameters())
    else:
        params = []
        for mods, hyper in cfg.groups:
            ps = [p for m in mods if getattr(model, m, None) is not None
                  for p in getattr(model, m).parameters()]
            if not ps:
                continue
            g = valid_hyper(cfg.kind, dict(hyper))
            merged = {**defaults, **g}
            if cfg.kind == "sgd" and merged.get("nesterov") and (
                    merged.get("momentum", 0) <= 0 or merged.get("dampening", 0) != 0):
                g["nesterov"] = False
            params.append({"params": ps, **g})
        if not params:
            params = list(model.parameters())
    if cfg.kind == "sgd":
        if ours:
            return momentum_cuda.SGD(params, flat=cfg.flat, capturable=cfg.capturable,
                                     **defaults)
        return torch.optim.SGD(params, foreach=False, **defaults)
    if ours:
        return momentum_cuda.Momentum(params, flat=cfg.flat, capturable=cfg.capturable,
                                      **defaults)
    return MomentumReference(params, **defaults)


def make_model(cfg: Config) -> Net:
    """The same values every call (each twin gets its own: copy.deepcopy would not keep the
    views' aliasing, and lazy parameters must be materialised by each twin's first forward)."""
    model = Net(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        base = _base(model)
        if base is not None:  # (already in cfg.dtype: model.to(dtype) keeps the aliasing)
            base.copy_(torch.randn(base.shape, generator=gen))
        for p in model.parameters():
            if not _uninit(p):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.to(DTYPES[cfg.dtype])
    for name in cfg.frozen:
        mod = getattr(model, name, None)
        if mod is not None:
            for p in mod.parameters():
                p.requires_grad = False  # (requires_grad_ refuses lazy parameters)
    return model


def build(cfg: Config) -> tuple[Side, Side]:
    """(ours, theirs): twin models with the same values, their optimizers and schedulers."""
    sides = []
    for ours in (True, False):
        m = make_model(cfg)
        opt = _make_opt(cfg, m, ours)
        scaler = None if cfg.scaler is None else torch.amp.GradScaler(
            "cpu", init_scale=cfg.scaler, growth_interval=2)
        if scaler is not None:
            scaler.scale(torch.ones(()))  # (GradScaler makes its scale tensor here)
        sides.append(Side(m, opt, _scheduler(cfg.scheduler, opt), scaler))
    return sides[0], sides[1]


# ---- the operations ------------------------------------------------------------------------
def _rand(gen, shape, dtype):
    return torch.randn(shape, generator=gen).to(dtype)


def _rebucket(side):
    """DDP's reducer at the end of a backward, after a sticky grad_bucket: each dense gradient
    of the bucket's dtype and shape goes into the parameter's view of the same bucket, which
    becomes its .grad again (a gradient already there was accumulated in place)."""
    for p, v in side.ddp:
        g = p.grad
        if (g is None or g is v or g.layout != torch.strided or g.dtype != v.dtype
                or g.shape != v.shape):
            continue
        v.copy_(g)
        p.grad = v


def op_backward(side, mask, seed):
    """One forward/backward through the branches in mask (bits: 1 trunk->head_a, 2 trunk->
    head_b, 4 head_b alone, 8 lin alone, 16 embedding, 32 extras, 64 views), accumulating into
    existing gradients. Returns "no-grad" when nothing selected requires grad. A lazy lin is
    materialised from torch's global generator, seeded here with seed (the same on both
    twins; the caller's generator state is restored)."""
    m = side.model
    if any(_uninit(p) for p in m.parameters()):
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return _backward(m, mask, seed)
    return _backward(m, mask, seed)


def _backward(m, mask, seed):
    g = torch.Generator().manual_seed(seed)
    x, z, y = torch.randn(2, 2, 5, 5, generator=g), torch.randn(2, 6, generator=g), \
        torch.randn(2, 27, generator=g)
    ra, rb, rc, rd = (torch.randn(2, n, generator=g) for n in (3, 2, 2, 6))
    idx = torch.randint(0, 7, (5,), generator=g)
    re = torch.randn(5, 3, generator=g)
    rx = [torch.randn(e.shape, generator=g) for e in m.extras]

    def dt(mod):
        return mod.weight.dtype

    terms = []
    if mask & 3:
        h = m.conv(x.to(dt(m.conv))).flatten(1)
        h = torch.tanh(m.lin(h.to(dt(m.lin))))
        if mask & 1:
            terms.append((m.head_a(h.to(dt(m.head_a))) * ra.to(dt(m.head_a))).sum())
        if mask & 2:
            terms.append((m.head_b(h.to(dt(m.head_b))) * rb.to(dt(m.head_b))).sum())
    if mask & 4:
        terms.append((m.head_b(z.to(dt(m.head_b))) * rc.to(dt(m.head_b))).sum())
    if mask & 8:
        terms.append((m.lin(y.to(dt(m.lin))) * rd.to(dt(m.lin))).sum())
    if mask & 16 and m.emb is not None:
        terms.append((m.emb(idx) * re.to(dt(m.emb))).sum())
    if mask & 32:
        terms += [(e * r.to(e.dtype)).sum() for e, r in zip(m.extras, rx)]
    if mask & 64 and m.views is not None:
        va, vb = m.views.a, m.views.b
        rva, rvb = torch.randn(2, 3, generator=g), torch.randn(7, generator=g)
        terms += [(va.sin() * rva.to(va.dtype)).sum(), (vb * rvb.to(vb.dtype)).cos().sum()]
    terms = [t.double() for t in terms if t.requires_grad]
    if not terms:
        return "no-grad"
    sum(terms).backward()
    return None


def _dense_grads(side):
    return [p for p in side.params() if p.grad is not None and p.grad.layout == torch.strided]


def _pick(side, k):
    ps = side.params()
    return ps[k % len(ps)]


def _group_hyper(kind, pairs):
    return valid_hyper(kind, dict(pairs))


def _owned(opt):
    return {id(p) for g in opt.param_groups for p in g["params"]}


def op_add_group(side, cfg, how, seed, shape, pairs):
    """how "fresh": a new parameter (registered in model.extras) in a new group; "orphans": the
    model's parameters in no group (after del_group) in a new group (a fresh one if none);
    "append": a fresh parameter appended to the first group's params list."""
    m, opt = side.model, side.opt
    dtype = m.lin.weight.dtype
    owned = _owned(opt)
    orphans = [p for p in m.parameters() if id(p) not in owned]
    if how == "orphans" and orphans:
        ps = orphans
    else:
        gen = torch.Generator().manual_seed(seed)
        p = nn.Parameter(_rand(gen, shape, dtype))
        m.extras.append(p)
        ps = [p]
    if how == "append":
        opt.param_groups[0]["params"].extend(ps)
        return None
    hyper = _group_hyper(cfg.kind, pairs)
    if cfg.kind == "sgd":
        merged = {**opt.defaults, **hyper}
        if merged.get("nesterov") and (merged["momentum"] <= 0 or merged["dampening"] != 0):
            hyper["nesterov"] = False
    opt.add_param_group({"params": ps, **hyper})
    return None


def op_edit_group(side, cfg, k, key, value):
    """Sets one hyper-parameter of group k, keeping the group valid for both optimizers."""
    groups = side.opt.param_groups
    g = groups[k % len(groups)]
    if key not in g:
        return "skipped"
    if cfg.kind == "momentum" and key == "momentum" and not 0 < value < 1:
        return "skipped"
    if key in ("momentum", "dampening", "nesterov") and cfg.kind == "sgd":
        new = {**g, key: value}
        if new["nesterov"] and (new["momentum"] <= 0 or new["dampening"] != 0):
            return "skipped"
    if isinstance(g[key], torch.Tensor):  # a tensor hyper-parameter: changed in place
        g[key].fill_(value)
    else:
        g[key] = value
    return None


def op_del_group(side, k, pop_state):
    groups = side.opt.param_groups
    if len(groups) < 2:
        return "skipped"
    g = groups.pop(k % len(groups))
    if pop_state:
        for p in g["params"]:
            side.opt.state.pop(p, None)
    return None


def _to_dtype(model, name, how):
    dtype = DTYPES[name]
    if how == "method":
        {torch.float32: model.float, torch.float64: model.double, torch.bfloat16: model.bfloat16,
         torch.float16: model.half}[dtype]()
    else:
        model.to(dtype)


def _mistyped_view(t) -> bool:
    """t is a view of a base of another dtype: what model.to(dtype) leaves of a gradient that
    was a bucket's view (grad_bucket). dynamo cannot make a fake tensor of it (torch 2.13:
    AssertionError in meta_utils), for torch's own compiled SGD as for ours: that step runs
    eagerly."""
    return isinstance(t, torch.Tensor) and t._base is not None and t._base.dtype != t.dtype


@contextlib.contextmanager
def _stepping(opt, cfg):
    """opt.step as cfg says: compiled (fullgraph=False: what the traced step cannot do breaks
    the graph) for momentum_cuda's optimizer when cfg.compiled, on the instance for the
    duration, so that GradScaler.step calls it too (a scheduler's wrapper, which it then
    wraps, runs eagerly: dynamo skips its file)."""
    if not (cfg.compiled and isinstance(opt, momentum_cuda.optim._FusedMomentum)) or any(
            _mistyped_view(p.grad) for g in opt.param_groups for p in g["params"]):
        yield
        return
    saved = vars(opt).get("step")
    opt.step = torch.compile(opt.step, backend="eager")
    try:
        yield
    finally:
        if saved is None:
            vars(opt).pop("step", None)
        else:
            opt.step = saved


def apply_one(op, side, cfg):
    """Applies op to one side; returns a comparable result (or None)."""
    name, *a = op
    m, opt = side.model, side.opt
    if name in ("step", "scaler_step", "clip_step"):
        with _stepping(opt, cfg):
            return _apply_one(op, side, cfg)
    return _apply_one(op, side, cfg)


def _apply_one(op, side, cfg):
    name, *a = op
    m, opt = side.model, side.opt
    if name == "backward":
        out = op_backward(side, *a)
        _rebucket(side)
        return out
    if name == "zero_grad":
        set_to_none, via = a
        (opt if via == "opt" else m).zero_grad(set_to_none=set_to_none)
        return None
    if name == "step":
        opt.step()
        return None
    if name == "scaler_step":  # GradScaler's step and update over the gradients as they are
        if side.scaler is None:  # (their scale is whatever it is: GradScaler cannot tell)
            return "no-scaler"
        grads = [p.grad for p in side.params() if p.grad is not None]
        if not grads or any(g.dtype == torch.float16 for g in grads):
            # torch refuses fp16 gradients (GradScaler.unscale_), ours does not: not compared
            return "skipped"
        if a[0]:  # an overflow: GradScaler skips the step
            g = next((g for g in grads if g.layout == torch.strided and g.numel()), None)
            if g is not None:
                with torch.no_grad():
                    g.view(-1)[0] = float("inf")
        side.scaler.step(opt)
        side.scaler.update()
        return torch.tensor(side.scaler.get_scale())
    if name == "clip_norm":
        max_norm, norm_type = a
        return nn.utils.clip_grad_norm_(_dense_grads(side), max_norm, norm_type=norm_type)
    if name == "clip_step":  # ours: opt.clip_grad_norm_ (the clip applied inside step());
        max_norm, norm_type = a  # torch: clip_grad_norm_ over the same parameters, then step
        if isinstance(opt, momentum_cuda.optim._FusedMomentum):
            norm = opt.clip_grad_norm_(max_norm, norm_type=norm_type)
        else:
            norm = nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]],
                                            max_norm, norm_type=norm_type)
        opt.step()
        return norm
    if name == "clip_value":
        nn.utils.clip_grad_value_(_dense_grads(side), a[0])
        return None
    if name == "grad_mul":
        for p in side.params():
            if p.grad is not None:
                p.grad.mul_(a[0])
        return None
    if name == "grad_none":
        _pick(side, a[0]).grad = None
        return None
    if name == "grad_set":
        k, seed, layout = a
        p = _pick(side, k)
        gr = _rand(torch.Generator().manual_seed(seed), p.shape, p.dtype)
        if layout == "channels_last" and gr.dim() == 4:
            gr = gr.contiguous(memory_format=torch.channels_last)
        elif layout == "size1" and 1 in gr.shape:  # other strides on its size-1 dimensions
            gr = torch.empty_strided(gr.shape, [s + 5 if n == 1 else s for n, s in
                                                zip(gr.shape, gr.stride())],
                                     dtype=gr.dtype).copy_(gr)
        p.grad = gr
        return None
    if name == "grad_bucket":  # DDP with gradient_as_bucket_view=True: .grad become views
        pad, reverse, *sticky = a  # of one new bucket per dtype, in (reversed) parameter
        # order; sticky: every later backward ends with them there again (_rebucket)
        side.ddp = []
        for ps in _by_dtype([p for p in side.params() if p.grad is not None
                             and p.grad.layout == torch.strided]).values():
            ps = ps[::-1] if reverse else ps
            bucket = torch.full((pad + sum(p.numel() for p in ps),), 1.5, dtype=ps[0].dtype)
            off = pad  # (what lies before: someone else's gradients)
            for p in ps:
                # DDP's bucket views take the parameter's strides when it is dense
                v = (bucket.as_strided(p.shape, p.stride(), off) if is_dense(p)
                     else bucket[off:off + p.numel()].view(p.shape))
                v.copy_(p.grad)
                p.grad = v
                off += p.numel()
                if sticky and sticky[0]:
                    side.ddp.append((p, v))
        return None
    if name == "data_clone":
        p = _pick(side, a[0])
        p.data = p.data.clone()
        return None
    if name == "data_new":
        k, seed = a
        p = _pick(side, k)
        p.data = torch.empty_like(p).copy_(_rand(torch.Generator().manual_seed(seed), p.shape,
                                                 p.dtype))
        return None
    if name == "param_mul":
        with torch.no_grad():
            for p in side.params():
                p.mul_(a[0])
        return None
    if name == "to_dtype":
        _to_dtype(m, *a)
        return None
    if name == "memory_format":
        m.to(memory_format=torch.channels_last if a[0] == "channels_last"
             else torch.contiguous_format)
        if cfg.compiled:
            # dynamo does not see a Parameter's new strides through the optimizer's dicts: a
            # compiled step must be compiled again (README, torch.compile)
            torch._dynamo.reset()
        return None
    if name == "add_group":
        return op_add_group(side, cfg, *a)
    if name == "edit_group":
        return op_edit_group(side, cfg, *a)
    if name == "del_group":
        return op_del_group(side, *a)
    if name == "save_load":  # mode "self" (mode "swap" is handled by apply_both)
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        return None
    if name == "deepcopy":
        side.model, side.opt, side.sched = copy.deepcopy((m, opt, side.sched))
        side.ddp = []  # (a new model: DDP would wrap it anew)
        return None
    if name == "sched_step":
        if side.sched is None:
            return "no-scheduler"
        side.sched.step()
        return None
    if name == "freeze":
        k, flag = a
        _pick(side, k).requires_grad_(flag)
        return None
    if name == "freeze_module":  # module.requires_grad_(flag); "all": the model; "frozen":
        which, flag = a  # the modules frozen at construction (cfg.frozen)
        names = cfg.frozen if which == "frozen" else (which,)
        mods = [m] if which == "all" else [getattr(m, n) for n in names
                                           if getattr(m, n, None) is not None]
        if not mods:
            return "no-module"
        for mod in mods:
            mod.requires_grad_(flag)
        return None
    if name == "reset_state":  # momentum reset by hand: the whole state, or None buffers (one
        # parameter's, or every one's)
        how, k = a
        if isinstance(opt, momentum_cuda.optim._FusedMomentum) and undecided_flags(opt):
            # editing opt.state by hand while capturable's flags are unread: opt.state may
            # hold buffers torch's has not (README, capturable=True); state_dict() reads them
            opt.state_dict()
        if how == "clear":
            opt.state.clear()
        elif how == "all-none":
            for st in opt.state.values():
                st["momentum_buffer"] = None
        else:
            p = _pick(side, k)
            if p in opt.state:
                opt.state[p]["momentum_buffer"] = None
        return None
    raise ValueError(f"unknown op {op!r}")


# torch's TORCH_WARN_ONCE warnings: only the first side (and sequence) to trigger one sees it
_ONCE = ("do not obey the gradient layout contract",)
_SCHED_ORDER = "Detected call of `lr_scheduler.step()` before `optimizer.step()`"


def _run(fn):
    """(result, exception, warnings other than momentum_cuda's own)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            res, exc = fn(), None
        except Exception as e:  # noqa: BLE001 - compared between the sides
            res, exc = None, e
    msgs = [f"{x.category.__name__}: {x.message}" for x in w
            if not str(x.message).startswith("momentum_cuda:")
            and not any(s in str(x.message) for s in _ONCE)]
    return res, exc, msgs


def apply_both(op, ours, theirs, cfg):
    """[(result, exception, warnings) of theirs, same of ours]."""
    if op[0] == "save_load" and op[1] == "swap":
        # each loads the other's checkpoint (deep-copied): the formats must be the same
        sd_t, e_t, w_t = _run(lambda: copy.deepcopy(theirs.opt.state_dict()))
        sd_o, e_o, w_o = _run(lambda: copy.deepcopy(ours.opt.state_dict()))
        if e_t is None and e_o is None:
            _, e_t, w2 = _run(lambda: theirs.opt.load_state_dict(sd_o))
            w_t += w2
            for g in theirs.opt.param_groups:  # ours' checkpoint says foreach=None
                if "foreach" in g:
                    g["foreach"] = False
            _, e_o, w2 = _run(lambda: ours.opt.load_state_dict(sd_t))
            w_o += w2
        return [(None, e_t, w_t), (None, e_o, w_o)]
    return [_run(lambda: apply_one(op, theirs, cfg)), _run(lambda: apply_one(op, ours, cfg))]


# ---- comparison ------------------------------------------------------------------------------
class Mismatch(AssertionError):
    pass


def _bits(t):
    t = t.detach()
    return t.view(_INT[t.element_size()]) if t.is_floating_point() else t


def same(a, b, what, strides=False):
    if a is None or b is None:
        if not (a is None and b is None):
            raise Mismatch(f"{what}: ours is {'None' if a is None else 'set'}, torch's "
                           f"{'None' if b is None else 'set'}")
        return
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b) \
                or not (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))):
            raise Mismatch(f"{what}: {a!r} != {b!r}")
        return
    if (a.layout, a.dtype, a.shape, a.device) != (b.layout, b.dtype, b.shape, b.device):
        raise Mismatch(f"{what}: {a.layout} {a.dtype} {tuple(a.shape)} {a.device} vs "
                       f"{b.layout} {b.dtype} {tuple(b.shape)} {b.device}")
    if a.layout == torch.sparse_coo:
        if a.is_coalesced() != b.is_coalesced():
            raise Mismatch(f"{what}: coalesced flag {a.is_coalesced()} vs {b.is_coalesced()}")
        same(a._indices(), b._indices(), f"{what} (indices)")
        same(a._values(), b._values(), f"{what} (values)")
        return
    if strides and a.stride() != b.stride():
        raise Mismatch(f"{what}: strides {a.stride()} vs {b.stride()}")
    if a.is_floating_point():
        # NaN: the same positions; its sign and payload bits are not part of the contract
        # (README, "The numeric contract"): every NaN compares as one pattern
        na, nb = a.detach().isnan(), b.detach().isnan()
        if not torch.equal(na, nb):
            raise Mismatch(f"{what}: NaN at other positions ({int(na.sum())} vs {int(nb.sum())})")
        if na.any():
            nan = torch.tensor(float("nan"), dtype=a.dtype)
            a, b = a.detach().masked_fill(na, nan), b.detach().masked_fill(nb, nan)
    if not torch.equal(_bits(a), _bits(b)):
        n = (_bits(a) != _bits(b)).sum().item()
        d = (a.detach().double() - b.detach().double()).abs().nan_to_num().max().item()
        raise Mismatch(f"{what}: differs in {n} of {a.numel()} elements (max |diff| {d:g})")


def _buffer(opt, p):
    st = opt.state.get(p)
    return None if st is None else st.get("momentum_buffer")


def _strip(groups):
    return [{k: v for k, v in g.items() if k != "foreach"} for g in groups]


def _state_dict(opt):
    res, exc, _ = _run(opt.state_dict)
    return res, exc


def undecided_flags(opt) -> bool:
    """opt holds buffers whose first step the host has not read back yet (capturable: the
    state may hold buffers torch's has not, until state_dict() reads the flags)."""
    return any(not b.unsure.hidden for b in getattr(opt, "_unsure", {}).values())


def compare(ours: Side, theirs: Side) -> None:
    """Raises Mismatch at the first difference. While ours has flags the host has not read
    (undecided_flags), its state is not compared: run_sequence compares it at the end, after
    state_dict() has read them."""
    undecided = undecided_flags(ours.opt)
    no, nt = list(ours.model.named_parameters()), list(theirs.model.named_parameters())
    if [n for n, _ in no] != [n for n, _ in nt]:
        raise Mismatch(f"parameter names {[n for n, _ in no]} vs {[n for n, _ in nt]}")
    base_o, base_t = _base(ours.model), _base(theirs.model)
    same(base_o, base_t, "views.base", strides=True)
    for (name, p), (_, q) in zip(no, nt):
        if _uninit(p) or _uninit(q):
            if not (_uninit(p) and _uninit(q)) or p.dtype != q.dtype:
                raise Mismatch(f"param {name}: {type(p).__name__} {p.dtype} vs "
                               f"{type(q).__name__} {q.dtype}")
        else:
            same(p, q, f"param {name}", strides=True)
            if _alias(p, base_o) != _alias(q, base_t):
                raise Mismatch(f"param {name}: (views.base storage, offset) "
                               f"{_alias(p, base_o)} vs {_alias(q, base_t)}")
        if p.requires_grad != q.requires_grad:
            raise Mismatch(f"param {name}: requires_grad {p.requires_grad} vs {q.requires_grad}")
        same(p.grad, q.grad, f"grad of {name}")
        if undecided:
            continue
        same(_buffer(ours.opt, p), _buffer(theirs.opt, q), f"momentum_buffer of {name}")
        so, st = ours.opt.state.get(p), theirs.opt.state.get(q)
        if (so is None) != (st is None) or (so is not None and so.keys() != st.keys()):
            raise Mismatch(f"state of {name}: {None if so is None else sorted(so)} vs "
                           f"{None if st is None else sorted(st)}")
    names_o = {id(p): n for n, p in no}
    names_t = {id(p): n for n, p in nt}
    go = [[names_o.get(id(p), "?") for p in g["params"]] for g in ours.opt.param_groups]
    gt = [[names_t.get(id(p), "?") for p in g["params"]] for g in theirs.opt.param_groups]
    if go != gt:
        raise Mismatch(f"param groups {go} vs {gt}")
    if undecided:
        return
    sd_o, e_o = _state_dict(ours.opt)
    sd_t, e_t = _state_dict(theirs.opt)
    if (e_o is None) != (e_t is None) or (e_o is not None and type(e_o) is not type(e_t)):
        raise Mismatch(f"state_dict(): ours {_exc(e_o)}, torch's {_exc(e_t)}")
    if e_o is not None:
        return
    ga, gb = _strip(sd_o["param_groups"]), _strip(sd_t["param_groups"])
    if len(ga) != len(gb):
        raise Mismatch(f"state_dict: {len(ga)} param groups vs {len(gb)}")
    for k, (a, b) in enumerate(zip(ga, gb)):
        if a.keys() != b.keys():
            raise Mismatch(f"state_dict group {k} keys {sorted(a)} vs {sorted(b)}")
        for key in a:
            same(a[key], b[key], f"state_dict group {k} {key!r}")
    if sd_o["state"].keys() != sd_t["state"].keys():
        raise Mismatch(f"state_dict state of params {sorted(sd_o['state'])} vs "
                       f"{sorted(sd_t['state'])}")
    for i, st in sd_t["state"].items():
        so = sd_o["state"][i]
        if so.keys() != st.keys():
            raise Mismatch(f"state_dict state[{i}] keys {sorted(so)} vs {sorted(st)}")
        for key in st:
            same(so[key], st[key], f"state_dict state[{i}][{key!r}]")


def _alias(p, base):
    """(shares base's storage, storage offset if it does)."""
    if base is None:
        return None
    shares = p.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    return shares, p.storage_offset() if shares else None


def _exc(e):
    if e is None:
        return "did not raise"
    return f"raised {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def snapshot(side: Side):
    base = _base(side.model)
    out = [(None if base is None else base.clone(),
            isinstance(side.opt, momentum_cuda.optim._FusedMomentum)
            and undecided_flags(side.opt))]
    for p in side.params():
        g, b = p.grad, _buffer(side.opt, p)
        out.append((None if _uninit(p) else p.detach().clone(),
                    None if g is None else g.detach().clone(), None if b is None else b.clone()))
    return out


def unchanged(side: Side, snap, what, grads=True) -> None:
    """side's parameters, momentum buffers (and gradients) as snapshot() saw them. A buffer
    shown under a first-step flag the host had not read may have left the state since: a
    raising step may read the flag first, and the state then says what the device did."""
    ps = side.params()
    base, undecided = snap[0]
    same(_base(side.model), base, f"{what}: views.base (vs before)")
    snap = snap[1:]
    if len(ps) != len(snap):
        raise Mismatch(f"{what}: the parameter list changed")
    for i, (p, (p0, g0, b0)) in enumerate(zip(ps, snap)):
        if _uninit(p) != (p0 is None):
            raise Mismatch(f"{what}: param {i} (vs before): materialised or not")
        if p0 is not None:
            same(p, p0, f"{what}: param {i} (vs before)")
        if grads:
            same(p.grad, g0, f"{what}: grad {i} (vs before)")
        b = _buffer(side.opt, p)
        if not (undecided and b is None):
            same(b, b0, f"{what}: momentum_buffer {i} (vs before)")


def parts(op) -> list:
    """("train_step", mask, seed, set_to_none), one iteration of the usual loop, is
    opt.zero_grad(set_to_none) + backward + step, each checked as its own operation;
    ("scaler_train_step", seed, overflow) is zero_grad + a backward through every branch +
    scaler_step (a whole flat bucket's first step: capturable's device decision);
    ("scaler_partial_step", mask, seed, overflow) the same through the branches of mask (a
    first step of only some parameters of a bucket, a flag split)."""
    if op[0] == "train_step":
        _, mask, seed, set_to_none = op
        return [("zero_grad", set_to_none, "opt"), ("backward", mask, seed), ("step",)]
    if op[0] == "scaler_train_step":  # the same with every branch and GradScaler's step
        _, seed, overflow = op
        return [("zero_grad", True, "opt"), ("backward", 127, seed), ("scaler_step", overflow)]
    if op[0] == "scaler_partial_step":
        _, mask, seed, overflow = op
        return [("zero_grad", True, "opt"), ("backward", mask, seed), ("scaler_step", overflow)]
    return [op]


def replay(cfg, ops, i) -> str:
    body = "".join(f"    {op!r},\n" for op in ops[:i + 1])
    return f"from math import inf, nan\nrun_sequence(\n  {cfg!r},\n  [\n{body}  ])"


def run_sequence(cfg: Config, ops) -> str:
    """Builds the twins, applies ops to both, compares after each; raises Mismatch (with the
    replayable sequence so far) at the first difference. Returns how the sequence ended."""
    if not (cfg.compiled or cfg.late_flags):
        return _run_sequence(cfg, ops)
    ready = momentum_cuda.optim._Unsure.host_ready
    momentum_cuda.optim._Unsure.host_ready = False  # read back only when waited for
    try:
        if not cfg.compiled:
            return _run_sequence(cfg, ops)
        torch._dynamo.reset()
        # (the default 8 graphs per function would leave the later steps of a sequence with
        # many edits eager)
        with torch._dynamo.config.patch(recompile_limit=64, accumulated_recompile_limit=4096):
            return _run_sequence(cfg, ops)
    finally:
        momentum_cuda.optim._Unsure.host_ready = ready
        if cfg.compiled:
            torch._dynamo.reset()


def _run_sequence(cfg: Config, ops) -> str:
    ours, theirs = build(cfg)
    try:
        compare(ours, theirs)
    except Mismatch as e:
        raise Mismatch(f"{e}\n  before any op; replay with:\n{replay(cfg, ops, -1)}") from None
    for i, op in enumerate(ops):
        for part in parts(op):
            stepping = part[0] in ("step", "clip_step", "scaler_step")
            snap = snapshot(ours) if stepping else None
            (r_t, e_t, w_t), (r_o, e_o, w_o) = apply_both(part, ours, theirs, cfg)
            try:
                if (e_o is None) != (e_t is None) or (
                        e_o is not None and type(e_o) is not type(e_t)):
                    raise Mismatch(f"ours {_exc(e_o)}; torch's {_exc(e_t)}")
                if cfg.scaler is not None:
                    # GradScaler calls an optimizer that sets _step_supports_amp_scaling (ours,
                    # as torch's fused ones) also on a step it skips, and torch's SGD not: the
                    # scheduler's "lr_scheduler.step() before optimizer.step()" then differs
                    w_o, w_t = ([w for w in ws if _SCHED_ORDER not in w] for ws in (w_o, w_t))
                if w_o != w_t:
                    raise Mismatch(f"warnings: ours {w_o}; torch's {w_t}")
                if e_o is not None and stepping:
                    # torch raised part-way through its step; ours must have written nothing
                    # (but GradScaler's unscale_, which runs first on both)
                    scaled = part[0] == "scaler_step"
                    unchanged(ours, snap, f"after both raised in step() (torch {_exc(e_t)})",
                              grads=not scaled)
                    if scaled:
                        for j, (p, q) in enumerate(zip(ours.params(), theirs.params())):
                            same(p.grad, q.grad, f"grad {j} after both raised")
                    return f"both raised at op {i}: {_exc(e_t)}"
                same(r_o, r_t, "result")
                compare(ours, theirs)
            except Mismatch as e:
                where = f"op {i} {op!r}" + (f" (its {part[0]})" if part is not op else "")
                raise Mismatch(f"{e}\n  at {where}; replay with:\n{replay(cfg, ops, i)}") \
                    from None
    if undecided_flags(ours.opt):
        try:
            _state_dict(ours.opt)  # reads the flags
            if undecided_flags(ours.opt):
                raise Mismatch("state_dict() left flags unread")
            compare(ours, theirs)
        except Mismatch as e:
            raise Mismatch(f"{e}\n  at the end, after state_dict(); replay with:\n"
                           f"{replay(cfg, ops, len(ops) - 1)}") from None
    return "completed"
