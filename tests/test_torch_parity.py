"""Parity with PyTorch's own optimizer conformance tests, bit for bit.

PyTorch's test/test_optim.py (class TestOptimRenewed) runs every optimizer of optim_db
(torch/testing/_internal/common_optimizers.py) through ~50 generic tests: the loss goes the
right direction with every configuration, LR scheduler and memory layout; tensor lr; sparse
and complex parameters; foreach/fused against the for-loop with a layer frozen half-way;
param groups; no-op steps; state_dict determinism, old and named state dicts, save/load;
state_dict, load_state_dict and step hooks; deepcopy; the errors it raises. Most of those
checks are "it runs" or "the loss went down". Here each one that applies to
momentum_cuda.SGD is a bitwise comparison, on flat=True and flat=False, with a twin stepped by
torch.optim.SGD(foreach=False) on the same inputs: parameters, gradients (presence and bits),
momentum buffers and state keys, param groups, state_dict() and the values step() returns.
Floating tensors are compared as integer bit patterns (-0.0 != +0.0), never with a tolerance.

The hyper-parameter configurations, LR scheduler sets, sparse metadata, the flags older state
dicts lack, and the error inputs are torch's own: read from the SGD entry of optim_db in the
installed torch. common_optimizers.py ships in the wheel but importing it needs expecttest
(not a dependency here), so its source is parsed and only those pieces are evaluated.

Not checked (implementation details of torch's kernels, not of the for-loop momentum_cuda
matches): which of torch's foreach/fused kernels runs (test_defaults_changed_to_foreach), fused's
device/dtype errors (test_fused_error_on_params_on_meta's message), fused's AMP unscaling
(_step_supports_amp_scaling), profiler op names, peak memory, CUDA-only tests.
"""
from __future__ import annotations

import ast
import copy
import enum
import functools
import io
import itertools
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import momentum_cuda
from conftest import (SIZE1_LAYOUTS, SIZES, bits, free_size1, make_values, run_steps, size1_param,
                      twin_params)

pytestmark = [
    # expected: the torch-ops path announces itself (complex parameters, sparse gradients,
    # and whatever else momentum_cuda hands to torch's own ops)
    pytest.mark.filterwarnings("ignore:momentum_cuda. .*torch's own"),
    pytest.mark.filterwarnings("ignore:Using backward.. with create_graph=True"),
    pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate"),
]
FLAT = pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these tests step many tiny tensors, for which torch's thread pool
    on a busy 2-core machine costs 20x the work (a BatchNorm2d forward: 0.6 ms -> 14-30 ms).
    Both twins run under the same count, so the comparison is unchanged (bf16/fp16 bits depend
    on the thread count alike: test_sgd_bitwise.py covers 1 and 2 threads)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ---- torch's SGD entry of optim_db ---------------------------------------------------------
class OptimizerInput:
    def __init__(self, params, kwargs, desc=""):
        self.params, self.kwargs, self.desc = params, kwargs, desc


class OptimizerErrorEnum(enum.Enum):
    CONSTRUCTION_ERROR = 0
    STEP_ERROR = 1


class ErrorOptimizerInput:
    def __init__(self, optimizer_error_input, *, error_on=OptimizerErrorEnum.CONSTRUCTION_ERROR,
                 error_type=RuntimeError, error_regex=""):
        self.optimizer_error_input = optimizer_error_input
        self.error_on, self.error_type, self.error_regex = error_on, error_type, error_regex


_COMMON = Path(torch.__file__).parent / "testing" / "_internal" / "common_optimizers.py"


def _device_type(device) -> str:
    return device.type if isinstance(device, torch.device) else str(device).split(":")[0]


@functools.cache
def _torch_sgd_info() -> SimpleNamespace:
    """optim_inputs_func_sgd, optim_error_inputs_func_sgd and the SGD OptimizerInfo's
    scheduler_inputs, supported_impls, not_og_supported_flags and metadata_for_sparse, as the
    installed torch defines them."""
    tree = ast.parse(_COMMON.read_text(), str(_COMMON))
    ns = {"torch": torch, "Tensor": torch.Tensor, "Parameter": nn.Parameter,
          "OptimizerInput": OptimizerInput, "ErrorOptimizerInput": ErrorOptimizerInput,
          "OptimizerErrorEnum": OptimizerErrorEnum, "_get_device_type": _device_type}
    ns.update({k: v for k, v in vars(torch.optim.lr_scheduler).items() if not k.startswith("_")})
    funcs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    for name in ("get_error_inputs_for_all_optims", "optim_inputs_func_sgd",
                 "optim_error_inputs_func_sgd"):
        exec(compile(ast.Module(body=[funcs[name]], type_ignores=[]), str(_COMMON), "exec"), ns)
    entry = None
    for node in tree.body:
        target = (node.target if isinstance(node, ast.AnnAssign)
                  else node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "optim_db":
            for call in node.value.elts:
                if (isinstance(call, ast.Call) and call.args
                        and isinstance(call.args[0], ast.Name) and call.args[0].id == "SGD"):
                    entry = {k.arg: k.value for k in call.keywords}
    assert entry is not None, f"no SGD entry in optim_db of {_COMMON}"

    def ev(key):
        return eval(compile(ast.Expression(entry[key]), str(_COMMON), "eval"), ns)

    return SimpleNamespace(
        inputs=ns["optim_inputs_func_sgd"], errors=ns["optim_error_inputs_func_sgd"],
        scheduler_inputs=ev("scheduler_inputs"), supported_impls=ev("supported_impls"),
        not_og_supported_flags=ev("not_og_supported_flags"),
        metadata_for_sparse=ev("metadata_for_sparse"))


def configs(flags=("foreach", "fused"), skip=()):
    """torch's SGD configurations (fresh: a tensor lr is a new tensor each call), each also with
    every flag of `flags` set, as _get_optim_inputs_including_global_cliquey_kwargs does
    (foreach included: momentum_cuda ignores it on every device)."""
    out = []
    for oi in _torch_sgd_info().inputs("cpu"):
        base = dict(oi.kwargs)
        fl = [f for f in flags if f in _torch_sgd_info().supported_impls and f not in skip]
        for f in fl:
            base[f] = False
        out.append((oi.desc, base))
        for f in fl:
            out.append((f"{oi.desc} & {f}", {**copy.deepcopy(base), f: True}))
    return out


def test_torch_configurations_are_read():
    """The pieces of optim_db this file uses are there (a torch upgrade that moves them fails
    here, not silently with fewer cases)."""
    info = _torch_sgd_info()
    descs = [oi.desc for oi in info.inputs("cpu")]
    assert len(descs) >= 9 and "nesterov" in descs and "tensor lr" in descs, descs
    assert len(info.scheduler_inputs) >= 7
    assert {"foreach", "differentiable", "fused"} <= set(info.supported_impls)
    assert {"foreach", "differentiable", "fused", "maximize"} <= set(info.not_og_supported_flags)
    assert len(info.errors("cpu", torch.float32)) >= 7


# ---- bitwise comparison ----------------------------------------------------------------------
def same(a, b, what: str) -> None:
    """a and b are the same value: None, a Python value (type and ==), a container of them
    (dicts: the same keys, in any order), or
    tensors with the same layout, dtype, shape, device, requires_grad and bits (meta: no bits;
    sparse: coalesced flag, indices and values)."""
    if isinstance(a, dict) or isinstance(b, dict):
        assert isinstance(a, dict) and isinstance(b, dict), f"{what}: {a!r} vs {b!r}"
        assert set(a) == set(b), f"{what}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            same(a[k], b[k], f"{what}[{k!r}]")
        return
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{what}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{what}[{i}]")
        return
    if a is None or b is None:
        assert a is None and b is None, (
            f"{what}: ours is {'None' if a is None else 'set'}, torch's "
            f"{'None' if b is None else 'set'}")
        return
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        assert not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor), (
            f"{what}: {a!r} vs {b!r}")
        assert type(a) is type(b) and (a == b or (a != a and b != b)), f"{what}: {a!r} != {b!r}"
        return
    meta = lambda t: (t.layout, t.dtype, tuple(t.shape), t.device, t.requires_grad)  # noqa: E731
    assert meta(a) == meta(b), f"{what}: {meta(a)} vs {meta(b)}"
    if a.device.type == "meta":
        return
    if a.layout == torch.sparse_coo:
        assert a.is_coalesced() == b.is_coalesced(), f"{what}: coalesced flag"
        same(a._indices(), b._indices(), f"{what} (indices)")
        same(a._values(), b._values(), f"{what} (values)")
        return
    assert torch.equal(bits(a), bits(b)), (
        f"{what} differs in {(bits(a) != bits(b)).sum().item()} of {a.numel()} elements")


_FLAGS = ("foreach", "fused")


def _groups(opt, mask=False, names=True):
    """The param groups without 'params'. mask: the values of foreach and fused (which
    momentum_cuda ignores; its torch twin always runs foreach=False) are not compared; names:
    whether param_names is."""
    return [{k: ("<flag>" if mask and k in _FLAGS else v) for k, v in g.items()
             if k != "params" and (names or k != "param_names")} for g in opt.param_groups]


def same_opt(o, r, ps, qs, what: str, names=True) -> None:
    """Parameters, gradients, per-parameter state and param groups of momentum_cuda `o` over
    `ps` and the torch twin `r` over `qs`. The values of foreach and fused are not compared:
    the twin always runs foreach=False (build() checks momentum_cuda keeps the given ones;
    test_load_older_state_dict_bitwise compares the defaults it fills in exactly)."""
    assert len(ps) == len(qs)
    for i, (p, q) in enumerate(zip(ps, qs)):
        same(p, q, f"{what} param {i}")
        same(p.grad, q.grad, f"{what} grad {i}")
        assert (p in o.state) == (q in r.state), (
            f"{what} state entry of param {i}: ours {'present' if p in o.state else 'absent'}")
        same(dict(o.state.get(p, {})), dict(r.state.get(q, {})), f"{what} state {i}")
    same(_groups(o, True, names), _groups(r, True, names), f"{what} param_groups")


def same_state_dict(a: dict, b: dict, what: str) -> None:
    """state_dicts equal, foreach and fused values aside (as same_opt)."""
    a, b = ({**sd, "param_groups": [{k: ("<flag>" if k in _FLAGS else v) for k, v in g.items()}
                                    for g in sd["param_groups"]]} for sd in (a, b))
    same(a, b, what)


# ---- twins -----------------------------------------------------------------------------------
def ref_kwargs(kw: dict) -> dict:
    """torch's for-loop: the reference momentum_cuda.SGD's contract names."""
    kw = copy.deepcopy(kw)
    kw["foreach"] = False
    kw.pop("fused", None)
    return kw


def build(params_o, params_r, kw, flat):
    """momentum_cuda.SGD and its torch twin, each with its own copy of kw (a tensor lr is
    changed in place by schedulers)."""
    o = momentum_cuda.SGD(params_o, **copy.deepcopy(kw), flat=flat)
    r = torch.optim.SGD(params_r, **ref_kwargs(kw))
    for f in _FLAGS:  # kept as given, as torch keeps them
        assert o.param_groups[0][f] == kw.get(f), (f, o.param_groups[0][f], kw.get(f))
    return o, r


def leaf_pair(t: torch.Tensor, requires_grad=True):
    """Two Parameters with t's values and strides (a strided slice stays a strided slice)."""
    def one():
        if t.is_contiguous() or t.numel() == 0:
            v = t.detach().clone()
        else:  # same layout: a copy of the whole base, viewed alike
            base = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype)
            v = base.as_strided(t.shape, t.stride(), t.storage_offset())
            v.copy_(t)
        return nn.Parameter(v, requires_grad=requires_grad)
    return one(), one()


def model_pair(make, seed=1):
    torch.manual_seed(seed)
    m = make()
    return m, copy.deepcopy(m)


def _randn(q, gen):
    return torch.randn(q.shape, generator=gen)


def _step_twins(o, r, ps_o, ps_r, gen, steps, what=None, *, draw=_randn, compare=None):
    """`steps` steps of momentum_cuda `o` and its torch twin `r`: before each, every parameter
    pair of ps_o, ps_r gets a fresh gradient, draw(q, gen) on torch's side and a clone of it on
    ours; after each (unless what is None) same_opt over `compare` (default: ps_o, ps_r) with
    the message what(step)."""
    for step in range(steps):
        for p, q in zip(ps_o, ps_r):
            q.grad = draw(q, gen)
            p.grad = q.grad.clone()
        o.step()
        r.step()
        if what is not None:
            same_opt(o, r, *(compare or (ps_o, ps_r)), what(step))


def _layout(name, gen):
    """torch's test_forloop_goes_right_direction problem: weight (10, 5), bias (10)."""
    if name == "contiguous":
        w, b = torch.randn(10, 5, generator=gen), torch.randn(10, generator=gen)
    elif name == "strided":  # torch's "contiguous=False": a slice of a larger tensor
        w = torch.randn(10, 5, 2, generator=gen)[..., 0]
        b = torch.randn(10, 2, generator=gen)[..., 0]
    else:  # "permuted": dense but not contiguous
        w, b = torch.randn(5, 10, generator=gen).t(), torch.randn(10, generator=gen)
    return leaf_pair(w), leaf_pair(b), torch.randn(5, generator=gen)


def _sched_step(scheds, loss):
    for s in scheds:
        if isinstance(s, ReduceLROnPlateau):
            s.step(loss)
        else:
            s.step()


def _linear_loss(opt, w, b, x):
    opt.zero_grad()
    loss = (w.mv(x) + b).pow(2).sum()
    loss.backward()
    return loss


# ---- test_errors -----------------------------------------------------------------------------
def _tensors(params):
    if isinstance(params, torch.Tensor):
        return [params]
    out = []
    for x in params if isinstance(params, (list, tuple)) else []:
        if isinstance(x, dict):
            ps = x.get("params", [])
            out += _tensors(ps if isinstance(ps, (list, tuple)) else [ps])
        elif isinstance(x, tuple):
            out.append(x[1])
        elif isinstance(x, torch.Tensor):
            out.append(x)
    return out


def _outcome(fn):
    """('ok', warnings) or (exception type, message, warnings)."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        try:
            fn()
            out = ("ok",)
        except Exception as e:  # noqa: BLE001 - compared with torch's below
            out = (type(e), str(e))
    return out + (sorted((x.category.__name__, str(x.message)) for x in w
                         if not str(x.message).startswith("momentum_cuda")),)


@FLAT
def test_error_inputs_match_torch(flat):
    """test_errors: every error input of torch's SGD entry raises (or warns) in momentum_cuda
    with torch's exception type and message, before a parameter is touched."""
    info = _torch_sgd_info()
    ours_in, torch_in = info.errors("cpu", torch.float32), info.errors("cpu", torch.float32)
    assert len(ours_in) == len(torch_in)
    for e_o, e_t in zip(ours_in, torch_in):
        oi_o, oi_t = e_o.optimizer_error_input, e_t.optimizer_error_input
        ptrs = [t.data_ptr() for t in _tensors(oi_o.params)]
        assert e_o.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
        got = _outcome(lambda: momentum_cuda.SGD(oi_o.params, **oi_o.kwargs, flat=flat))
        want = _outcome(lambda: torch.optim.SGD(oi_t.params, **oi_t.kwargs))
        assert got == want, f"{oi_o.desc}: ours {got}, torch {want}"
        if want[0] != "ok":
            assert [t.data_ptr() for t in _tensors(oi_o.params)] == ptrs, oi_o.desc


def _p(*shape):
    return nn.Parameter(torch.randn(*shape))


_EXTRA_ERRORS = {
    "fused+foreach": lambda: ([_p(3)], dict(fused=True, foreach=True)),
    "fused+differentiable": lambda: ([_p(3)], dict(fused=True, differentiable=True)),
    "negative lr": lambda: ([_p(3)], dict(lr=-0.1)),
    "negative tensor lr": lambda: ([_p(3)], dict(lr=torch.tensor(-0.1))),
    "negative weight_decay": lambda: ([_p(3)], dict(weight_decay=-1e-2)),
    "nesterov without momentum": lambda: ([_p(3)], dict(nesterov=True)),
    "nesterov with dampening": lambda: ([_p(3)], dict(nesterov=True, momentum=0.9,
                                                      dampening=0.1)),
    "empty parameter list": lambda: ([], {}),
    "non-leaf tensor": lambda: ([_p(3) * 2], {}),
    "string lr": lambda: ([_p(3)], dict(lr="0.1")),
    "group without params": lambda: ([{"lr": 0.1}], {}),
    "same tensor in two groups": lambda: (lambda p: ([{"params": [p]}, {"params": [p]}], {}))(
        _p(3)),
}


@FLAT
@pytest.mark.parametrize("case", list(_EXTRA_ERRORS))
def test_constructor_errors_match_torch(case, flat):
    """torch.optim.SGD's other constructor errors: same type and message, parameters not
    moved; where torch constructs, momentum_cuda constructs too (same warnings)."""
    params, kw = _EXTRA_ERRORS[case]()
    ptrs = [t.data_ptr() for t in _tensors(params)]
    want = _outcome(lambda: torch.optim.SGD(copy.copy(params), **kw))
    got = _outcome(lambda: momentum_cuda.SGD(copy.copy(params), **kw, flat=flat))
    assert got == want, f"ours {got}, torch {want}"
    if want[0] != "ok":
        assert [t.data_ptr() for t in _tensors(params)] == ptrs


@FLAT
def test_add_param_group_matches_torch(flat):
    """add_param_group: names with and without, duplicates and missing 'params' raise as in
    torch and leave param_groups as torch leaves them; the added groups then step alike."""
    (a_o, a_r), (b_o, b_r), (c_o, c_r) = (leaf_pair(torch.randn(n)) for n in (4, 5, 6))
    c_ptr = c_o.data_ptr()
    for named in (False, True):
        o = momentum_cuda.SGD([("a", a_o)] if named else [a_o], lr=0.1, momentum=0.9, flat=flat)
        r = torch.optim.SGD([("a", a_r)] if named else [a_r], lr=0.1, momentum=0.9,
                            foreach=False)
        for mk in (lambda a, c: {"params": [c] if named else [("c", c)]},  # other naming
                   lambda a, c: {"params": [("a", a) if named else a]},  # a second time
                   lambda a, c: {"lr": 0.2}):  # no 'params'
            got = _outcome(lambda: o.add_param_group(mk(a_o, c_o)))
            want = _outcome(lambda: r.add_param_group(mk(a_r, c_r)))
            assert got == want and got[0] != "ok", f"ours {got}, torch {want}"
            assert len(o.param_groups) == len(r.param_groups)
            same(c_o, c_r, "a parameter of a group that was not added")
            assert c_o.data_ptr() == c_ptr, "a group that was not added moved its parameter"
        o.add_param_group({"params": [("b", b_o)] if named else [b_o], "lr": 0.3, "nesterov": True,
                           "momentum": 0.5})
        r.add_param_group({"params": [("b", b_r)] if named else [b_r], "lr": 0.3, "nesterov": True,
                           "momentum": 0.5})
        gen = torch.Generator().manual_seed(int(named))
        _step_twins(o, r, [a_o, b_o], [a_r, b_r], gen, 3, lambda s: f"named={named} step {s}",
                    compare=([a_o, b_o, c_o], [a_r, b_r, c_r]))
        same_state_dict(o.state_dict(), r.state_dict(), f"named={named} state_dict")


# ---- test_forloop_goes_right_direction, test_param_group_with_lrscheduler_goes_right_direction
_N_SCHED = 7


@FLAT
@pytest.mark.parametrize("layout,sched", [("contiguous", None), ("strided", None),
                                          ("permuted", None)]
                         + [("contiguous", i) for i in range(_N_SCHED)])
def test_forloop_direction_bitwise(layout, sched, flat):
    """Every torch configuration, 12 steps (torch: 20) of closure() then step() on weight
    (10, 5) and bias (10) (torch's "contiguous=False" is the strided layout), with each of
    torch's LR scheduler sets: parameters, gradients, buffers, lrs and losses equal torch's
    after every step."""
    info = _torch_sgd_info()
    scheds = [] if sched is None else info.scheduler_inputs[sched]
    for desc, kw in configs(flags=()):
        gen = torch.Generator().manual_seed(0)
        (w_o, w_r), (b_o, b_r), x = _layout(layout, gen)
        o, r = build([w_o, b_o], [w_r, b_r], kw, flat)
        s_o, s_r = [s(o) for s in scheds], [s(r) for s in scheds]
        first_o, first_r = _linear_loss(o, w_o, b_o, x), _linear_loss(r, w_r, b_r, x)
        same(first_o, first_r, f"{desc}: initial loss")
        for step in range(12):
            loss_o, loss_r = _linear_loss(o, w_o, b_o, x), _linear_loss(r, w_r, b_r, x)
            o.step()
            r.step()
            same(loss_o, loss_r, f"{desc} step {step}: loss")
            same_opt(o, r, [w_o, b_o], [w_r, b_r], f"{desc} step {step}:")
            _sched_step(s_o, loss_o.detach())
            _sched_step(s_r, loss_r.detach())
            same(_groups(o, True), _groups(r, True), f"{desc} step {step}: groups after the "
                 "schedulers")


@FLAT
@pytest.mark.parametrize("sched", range(_N_SCHED))
def test_param_group_with_lrscheduler_bitwise(sched, flat):
    """Two param groups (the second with lr 0.01), each scheduler set, step(closure)."""
    gen = torch.Generator().manual_seed(sched)
    (w_o, w_r), (v_o, v_r) = leaf_pair(torch.randn(10, 5, generator=gen)), leaf_pair(
        torch.randn(10, 5, generator=gen))
    x = torch.randn(5, generator=gen)
    o = momentum_cuda.SGD([{"params": [w_o]}, {"params": [v_o], "lr": 0.01}], flat=flat)
    r = torch.optim.SGD([{"params": [w_r]}, {"params": [v_r], "lr": 0.01}], foreach=False)
    s_o = [s(o) for s in _torch_sgd_info().scheduler_inputs[sched]]
    s_r = [s(r) for s in _torch_sgd_info().scheduler_inputs[sched]]

    def closure(opt, w, v):
        opt.zero_grad()
        loss = (w.mv(x) + v.mv(x)).pow(2).sum()
        loss.backward()
        return loss

    for step in range(12):
        loss_o = o.step(functools.partial(closure, o, w_o, v_o))
        loss_r = r.step(functools.partial(closure, r, w_r, v_r))
        same(loss_o, loss_r, f"step {step}: returned loss")
        same_opt(o, r, [w_o, v_o], [w_r, v_r], f"step {step}:")
        _sched_step(s_o, loss_o.detach())
        _sched_step(s_r, loss_r.detach())


# ---- test_tensor_lr --------------------------------------------------------------------------
@FLAT
@pytest.mark.parametrize("num_dim", [0, 1, 2])
def test_tensor_lr_bitwise(num_dim, flat):
    """A 1-element lr tensor of 0, 1 or 2 dimensions in every configuration (differentiable
    aside): 5 steps equal torch's with the same tensor lr, and the group keeps the tensor."""
    for desc, kw in configs(flags=("foreach", "fused")):
        kw = dict(kw)
        kw["lr"] = torch.tensor(1e-3).reshape([1] * num_dim)
        gen = torch.Generator().manual_seed(3)
        (w_o, w_r), (b_o, b_r), x = _layout("contiguous", gen)
        o, r = build([w_o, b_o], [w_r, b_r], kw, flat)
        for step in range(5):
            _linear_loss(o, w_o, b_o, x)
            o.step()
            _linear_loss(r, w_r, b_r, x)
            r.step()
            same_opt(o, r, [w_o, b_o], [w_r, b_r], f"{desc} step {step}:")
        assert isinstance(o.param_groups[0]["lr"], torch.Tensor)


# ---- test_rosenbrock_sparse ------------------------------------------------------------------
def _rosenbrock(t):
    x, y = t
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def _drosenbrock(t):
    x, y = t
    return torch.stack((-400 * x * (y - x**2) - 2 * (1 - x), 200 * (y - x**2)))


def _sparse_configs():
    """torch's test_rosenbrock_sparse inputs: the configurations without the keys of
    metadata_for_sparse, deduplicated, with its lr (on the CPU: no flags)."""
    updates, _ = _torch_sgd_info().metadata_for_sparse
    out, seen = [], set()
    for desc, kw in configs(flags=()):
        for k in updates:
            kw.pop(k, None)
        key = tuple(sorted((k, str(v)) for k, v in kw.items()))
        if kw and key not in seen:
            seen.add(key)
            if "lr" in updates:
                kw["lr"] = updates["lr"]
            out.append((desc, kw))
    return out


@FLAT
@pytest.mark.parametrize("grads", ["sparse", "dense"])
def test_rosenbrock_sparse_bitwise(grads, flat):
    """Cyclic coordinate descent on Rosenbrock with uncoalesced sparse gradients (and their
    dense twins), torch's configurations and scheduler, plus plain, momentum and two-parameter
    (fp32 and fp64, torch's foreach case) ones: 20 steps equal torch's, compared after every
    step (torch's test runs 1800 and compares sparse with dense to 5e-6)."""
    _, sched_ctors = _torch_sgd_info().metadata_for_sparse
    cases = _sparse_configs() + [("plain", {"lr": 4.8e-3}),
                                 ("momentum 0.9", {"lr": 4.8e-3, "momentum": 0.9}),
                                 ("two parameters", {"lr": 4.8e-3, "foreach": True})]
    for desc, kw in cases:
        multi = kw.get("foreach", False)
        vals = [torch.tensor([1.5, 1.5])] + ([torch.tensor([1.5, 1.5], dtype=torch.float64)]
                                             if multi else [])
        ps_o = [nn.Parameter(v.clone()) for v in vals]
        ps_r = [nn.Parameter(v.clone()) for v in vals]
        o, r = build(ps_o, ps_r, kw, flat)
        s_o, s_r = [s(o) for s in sched_ctors], [s(r) for s in sched_ctors]

        def grad_of(p, w):
            g = _drosenbrock(p.detach())
            if grads == "dense":
                return torch.tensor([g[0], 0] if w else [0, g[1]], dtype=p.dtype)
            i = torch.tensor([[0, 0]] if w else [[1, 1]], dtype=torch.int64)
            v = torch.tensor([g[0] / 4.0, g[0] - g[0] / 4.0] if w
                             else [g[1] - g[1] / 4.0, g[1] / 4.0])
            return torch.sparse_coo_tensor(i, v, (2,), dtype=v.dtype).to(p.dtype)

        def closure(opt, ps, w):
            opt.zero_grad()
            loss = sum(_rosenbrock(p) for p in ps)
            loss.backward()
            with torch.no_grad():
                for p in ps:
                    p.grad = grad_of(p, w)
            return loss

        for step in range(20):
            w = step % 2
            loss_o = o.step(functools.partial(closure, o, ps_o, w))
            loss_r = r.step(functools.partial(closure, r, ps_r, w))
            same(loss_o, loss_r, f"{desc} step {step}: loss")
            same_opt(o, r, ps_o, ps_r, f"{desc} step {step}:")
            for s_list, ps in ((s_o, ps_o), (s_r, ps_r)):
                for s in s_list:
                    s.step(_rosenbrock(ps[0]).detach()) if isinstance(
                        s, ReduceLROnPlateau) else s.step()


# ---- test_complex, test_complex_2d -----------------------------------------------------------
@FLAT
def test_complex_bitwise(flat):
    """Complex parameters mixed with a real one, and their view_as_real twins, 3 steps of random
    gradients in every configuration (differentiable and fused aside, as torch's test)."""
    for desc, kw in configs(flags=("foreach",)):
        gen = torch.Generator().manual_seed(5)
        vals = [torch.randn(10, 5, dtype=torch.complex64, generator=gen),
                torch.randn(10, dtype=torch.complex64, generator=gen),
                torch.randn(10, 5, generator=gen)]
        for form in ("complex", "real"):
            vs = [torch.view_as_real(v) if form == "real" and v.is_complex() else v for v in vals]
            pairs = [leaf_pair(v) for v in vs]
            ps_o, ps_r = [a for a, _ in pairs], [b for _, b in pairs]
            o, r = build(ps_o, ps_r, kw, flat)
            g = torch.Generator().manual_seed(6)
            _step_twins(o, r, ps_o, ps_r, g, 3, lambda s: f"{desc} ({form}) step {s}:",
                        draw=lambda q, g: torch.randn(q.shape, dtype=q.dtype, generator=g))


@FLAT
def test_complex_2d_bitwise(flat):
    """torch's test_complex_2d: Rosenbrock on a complex pair and on its real/imag parts."""
    for desc, kw in configs(flags=("foreach",)):
        gen = torch.Generator().manual_seed(7)
        a = torch.randn(2, dtype=torch.complex64, generator=gen)
        for form in ("complex", "split"):
            if form == "complex":
                pairs = [leaf_pair(a)]
                f = lambda ps: _rosenbrock(ps[0]).abs()  # noqa: E731
            else:
                pairs = [leaf_pair(a.real.clone()), leaf_pair(a.imag.clone())]
                f = lambda ps: _rosenbrock(torch.complex(ps[0], ps[1])).abs()  # noqa: E731
            ps_o, ps_r = [x for x, _ in pairs], [y for _, y in pairs]
            o, r = build(ps_o, ps_r, kw, flat)
            for step in range(3):
                for opt, ps in ((o, ps_o), (r, ps_r)):
                    opt.zero_grad()
                    f(ps).backward()
                    opt.step()
                same_opt(o, r, ps_o, ps_r, f"{desc} ({form}) step {step}:")


# ---- test_foreach_matches_forloop, test_fused_matches_forloop (_compare_between) ------------
def _small_mlp():
    return nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1), nn.Sigmoid())


_DT = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16,
       "fp16": torch.float16}


@FLAT
@pytest.mark.parametrize("flag,dt", [("foreach", "fp64"),  # torch's foreach test: fp64
                                     ("fused", "fp32"), ("fused", "fp64"), ("fused", "bf16"),
                                     ("fused", "fp16"),  # torch's fused test: every float
                                     (None, "bf16"), (None, "fp16")])
def test_flags_match_forloop(flag, dt, flat):
    """torch's _test_derived_optimizers / _compare_between: a small MLP plus a 0-dim parameter
    whose gradient is set before construction; 7 iterations, no backward at iteration 2, the
    second Linear frozen at iteration 3 and unfrozen at 5. momentum_cuda with foreach=True or
    fused=True (both ignored) equals torch's for-loop after every step."""
    dtype = _DT[dt]
    for desc, kw in configs(flags=()):
        if flag is not None:
            kw[flag] = True
        m_o, m_r = model_pair(lambda: _small_mlp().to(dtype))
        e = torch.rand((), dtype=dtype)
        e_o, e_r = leaf_pair(e)
        e_o.grad = torch.rand_like(e)
        e_r.grad = e_o.grad.clone()
        ps_o, ps_r = list(m_o.parameters()) + [e_o], list(m_r.parameters()) + [e_r]
        o, r = build(ps_o, ps_r, kw, flat)
        x = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], dtype=dtype).reshape(3, 2)
        for i in range(7):
            for opt, m in ((o, m_o), (r, m_r)):
                opt.zero_grad()
                if i == 3:
                    m[2].requires_grad_(False)
                if i == 5:
                    m[2].requires_grad_(True)
                if i != 2:
                    m(x).sum().backward()
                opt.step()
            same_opt(o, r, ps_o, ps_r, f"{desc} iteration {i}:")


# ---- test_fused_error_on_params_on_meta (without fused: torch's for-loop steps meta tensors) --
@FLAT
def test_meta_parameters_step_like_torch(flat):
    """Parameters and gradients on the meta device: torch.optim.SGD(foreach=False) constructs
    and steps them (creating meta momentum buffers); momentum_cuda must as well."""
    with torch.device("meta"):
        m_o, m_r = _small_mlp(), _small_mlp()
    ps_o, ps_r = list(m_o.parameters()), list(m_r.parameters())
    o, r = build(ps_o, ps_r, dict(lr=0.1, momentum=0.9, weight_decay=0.1), flat)
    for step in range(2):
        for ps in (ps_o, ps_r):
            for p in ps:
                p.grad = torch.ones_like(p)
        o.step()
        r.step()
        same_opt(o, r, ps_o, ps_r, f"step {step}:")


@FLAT
def test_meta_init_then_to_empty_with_swap(flat):
    """Deferred initialisation: an optimizer built over meta parameters, then
    model.to_empty(device="cpu") with torch.__future__.set_swap_module_params_on_conversion(True)
    (the Parameter objects stay, now on the CPU): training equals torch's bit for bit."""
    prev = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with torch.device("meta"):
            m_o, m_r = _small_mlp(), _small_mlp()
        o, r = build(list(m_o.parameters()), list(m_r.parameters()),
                     dict(lr=0.1, momentum=0.9, nesterov=True), flat)
        for m in (m_o, m_r):
            w = m[0].weight
            m.to_empty(device="cpu")
            assert m[0].weight is w
            gen = torch.Generator().manual_seed(11)
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen))
        x = torch.rand(4, 2, generator=torch.Generator().manual_seed(12))
        for step in range(3):
            for opt, m in ((o, m_o), (r, m_r)):
                opt.zero_grad()
                m(x).sum().backward()
                opt.step()
            same_opt(o, r, list(m_o.parameters()), list(m_r.parameters()), f"step {step}:")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(prev)


# ---- test_param_groups_weight_decay, test_param_groups_lr ------------------------------------
@FLAT
def test_param_groups_weight_decay_bitwise(flat):
    """A weight group with each configuration and a bias group with weight_decay 0."""
    for desc, kw in configs(flags=()):
        gen = torch.Generator().manual_seed(13)
        (w_o, w_r), (b_o, b_r), x = _layout("contiguous", gen)
        bias_kw = {**copy.deepcopy(kw), "weight_decay": 0.0}
        o = momentum_cuda.SGD([dict(params=[w_o], **copy.deepcopy(kw)),
                               dict(params=[b_o], **copy.deepcopy(bias_kw))], flat=flat)
        r = torch.optim.SGD([dict(params=[w_r], **ref_kwargs(kw)),
                             dict(params=[b_r], **ref_kwargs(bias_kw))])
        for step in range(20):
            for opt, w, b in ((o, w_o, b_o), (r, w_r, b_r)):
                _linear_loss(opt, w, b, x)
                opt.step()
            same_opt(o, r, [w_o, b_o], [w_r, b_r], f"{desc} step {step}:")


@FLAT
def test_param_groups_lr_bitwise(flat):
    """A group with each configuration and a group of an 'irrelevant' parameter with the
    outer lr 1e-28: everything equals torch's, and the irrelevant parameter keeps its bits."""
    for desc, kw in configs(flags=()):
        if not kw.get("lr"):
            kw["lr"] = 1e-3
        gen = torch.Generator().manual_seed(17)
        (w_o, w_r), (b_o, b_r), x = _layout("contiguous", gen)
        z_o, z_r = leaf_pair(torch.randn(2, generator=gen))
        z0 = z_o.detach().clone()
        o = momentum_cuda.SGD([dict(params=[w_o, b_o], **copy.deepcopy(kw)),
                               dict(params=[z_o])], lr=1e-28, flat=flat)
        r = torch.optim.SGD([dict(params=[w_r, b_r], **ref_kwargs(kw)), dict(params=[z_r])],
                            lr=1e-28, foreach=False)
        for step in range(20):
            gz = torch.rand(2, generator=gen)
            for opt, w, b, z in ((o, w_o, b_o, z_o), (r, w_r, b_r, z_r)):
                _linear_loss(opt, w, b, x)
                z.grad = gz.clone()
                opt.step()
            same_opt(o, r, [w_o, b_o, z_o], [w_r, b_r, z_r], f"{desc} step {step}:")
        same(z_o.detach(), z0, f"{desc}: the irrelevant parameter")


# ---- test_step_is_noop_when_params_have_no_grad, test_step_is_noop_for_zero_grads ------------
@FLAT
def test_step_without_grads_is_noop(flat):
    """Parameters that do not require grad (so never get one): step(closure) returns the
    closure's own object, changes nothing and creates no state, in every configuration."""
    for desc, kw in configs(flags=("foreach", "fused", "differentiable")):
        vals = [torch.randn(2, 3) for _ in range(2)]
        pairs = [leaf_pair(v, requires_grad=False) for v in vals]
        ps_o, ps_r = [a for a, _ in pairs], [b for _, b in pairs]
        o, r = build(ps_o, ps_r, kw, flat)
        ret = torch.tensor([1.0])
        assert o.step(lambda: ret) is ret and r.step(lambda: ret) is ret
        assert o.step() is None and r.step() is None
        same_opt(o, r, ps_o, ps_r, desc)
        for p, v in zip(ps_o, vals):
            same(p.detach(), v, f"{desc}: parameter")
        assert len(o.state) == 0, desc


@FLAT
def test_zero_grads_leave_parameters(flat):
    """Zero gradients (weight_decay 0): every configuration, differentiable=True included
    (on a non-leaf clone), leaves the parameter's bits, and the momentum buffers equal
    torch's, signs of zero included (maximize stores -0.0)."""
    for desc, kw in configs(flags=("foreach", "fused", "differentiable")):
        if kw.get("weight_decay", 0) != 0:
            continue
        v = torch.randn(5, 1, generator=torch.Generator().manual_seed(19))
        p_o, p_r = leaf_pair(v)
        if kw.get("differentiable"):
            p_o, p_r = p_o.clone(), p_r.clone()
        o, r = build([p_o], [p_r], kw, flat)
        for step in range(2):
            p_o.grad, p_r.grad = torch.zeros_like(v), torch.zeros_like(v)
            loss_o = o.step(lambda: torch.tensor([1.0]))
            loss_r = r.step(lambda: torch.tensor([1.0]))
            same(loss_o, loss_r, desc)
            same(p_o.detach(), v, f"{desc} step {step}: parameter moved")
            same_opt(o, r, [p_o], [p_r], f"{desc} step {step}:")


# ---- test_optimizer_can_be_printed -----------------------------------------------------------
@FLAT
def test_repr_extends_torch(flat):
    """repr(): torch's text (every group key) with momentum_cuda's backend and flat added."""
    for desc, kw in configs(flags=("foreach", "fused", "differentiable")):
        pairs = [leaf_pair(torch.randn(2, 3)) for _ in range(2)]
        o, r = build([a for a, _ in pairs], [b for _, b in pairs], kw, flat)
        r.param_groups[0]["foreach"] = kw.get("foreach")
        r.param_groups[0]["fused"] = kw.get("fused")
        assert repr(o) == repr(r)[:-1] + f"backend: cpu\nflat: {flat}\n)", desc


# ---- state_dict: determinism, named, older, save/load ----------------------------------------
def _named(ps, names):
    return [(f"name{i}", p) for i, p in enumerate(ps)] if names else ps


def _without_names(sd):
    sd = copy.deepcopy(sd)
    for g in sd["param_groups"]:
        g.pop("param_names", None)
    return sd


@FLAT
@pytest.mark.parametrize("named0,named1", list(itertools.product([True, False], repeat=2)))
def test_state_dict_deterministic_bitwise(named0, named1, flat):
    """torch's test_state_dict_deterministic: 10 steps, a new optimizer over clones loads
    deepcopy(state_dict()), both go on 10 steps with equal bits (and equal torch's), their
    state_dicts are equal, repeated param groups pack alike; param_names as torch keeps them."""
    for desc, kw in configs(flags=()):
        gen = torch.Generator().manual_seed(23)
        (w_o, w_r), (b_o, b_r) = leaf_pair(torch.randn(2, 3, generator=gen)), leaf_pair(
            torch.randn(2, generator=gen))
        x = torch.randn(3, generator=gen)
        o, r = build(_named([w_o, b_o], named0), _named([w_r, b_r], named0), kw, flat)
        for _ in range(10):
            for opt, w, b in ((o, w_o, b_o), (r, w_r, b_r)):
                _linear_loss(opt, w, b, x)
                opt.step()
        same_state_dict(o.state_dict(), r.state_dict(), f"{desc}: primed")
        (wc_o, wc_r), (bc_o, bc_r) = leaf_pair(w_o), leaf_pair(b_o)
        oc, rc = build(_named([wc_o, bc_o], named1), _named([wc_r, bc_r], named1), kw, flat)
        oc.load_state_dict(copy.deepcopy(o.state_dict()))
        rc.load_state_dict(copy.deepcopy(r.state_dict()))
        for step in range(10):
            for opt, w, b in ((o, w_o, b_o), (r, w_r, b_r), (oc, wc_o, bc_o), (rc, wc_r, bc_r)):
                _linear_loss(opt, w, b, x)
                opt.step()
            same_opt(oc, o, [wc_o, bc_o], [w_o, b_o], f"{desc} step {step}: loaded vs original",
                     names=False)
            same_opt(oc, rc, [wc_o, bc_o], [wc_r, bc_r], f"{desc} step {step}: loaded")
        same(_without_names(o.state_dict()), _without_names(oc.state_dict()), desc)
        same_state_dict(oc.state_dict(), rc.state_dict(), f"{desc}: loaded")
        oc.param_groups.extend(oc.param_groups)
        rc.param_groups.extend(rc.param_groups)
        same(_without_names(o.state_dict())["param_groups"][-1],
             _without_names(oc.state_dict())["param_groups"][-1], f"{desc}: repeated group")
        same_state_dict(oc.state_dict(), rc.state_dict(), f"{desc}: repeated groups")


def _conv_bn():
    return nn.Sequential(nn.Conv2d(4, 2, 1, stride=2), nn.BatchNorm2d(2, eps=1e-05, momentum=0.1))


def _conv_steps(pairs, n, x):
    for _ in range(n):
        for opt, m in pairs:
            opt.zero_grad()
            m(x).sum().backward()
            opt.step()


_OLD_KEYS = {
    # torch's OptimizerInfo.not_og_supported_flags for SGD (foreach, differentiable, fused,
    # maximize, capturable), then also nesterov, which older state dicts lack as well
    "not_og_flags": lambda: tuple(_torch_sgd_info().not_og_supported_flags),
    "and_nesterov": lambda: tuple(_torch_sgd_info().not_og_supported_flags) + ("nesterov",),
}


@FLAT
@pytest.mark.parametrize("drop", list(_OLD_KEYS))
def test_load_older_state_dict_bitwise(drop, flat):
    """torch's test_can_load_older_state_dict: a state dict without the flags older versions
    did not save loads, fills the same defaults as torch (param_groups and state_dict()
    equal torch's), and training goes on with torch's bits."""
    keys = _OLD_KEYS[drop]()
    x = torch.rand(1, 4, 8, 8, generator=torch.Generator().manual_seed(29))
    for desc, kw in configs(flags=("foreach", "fused")):
        m_o, m_r = model_pair(_conv_bn)
        o, r = build(m_o.parameters(), m_r.parameters(), kw, flat)
        _conv_steps([(o, m_o), (r, m_r)], 3, x)
        for opt in (o, r):
            old = copy.deepcopy(opt.state_dict())
            for g in old["param_groups"]:
                for k in keys:
                    g.pop(k, None)
            opt.load_state_dict(old)
        groups_r = _groups(r)
        same(_groups(o), groups_r, f"{desc}: param_groups after loading")
        _conv_steps([(o, m_o), (r, m_r)], 2, x)
        same_opt(o, r, list(m_o.parameters()), list(m_r.parameters()), f"{desc}: after steps")
        same(o.state_dict(), r.state_dict(), f"{desc}: state_dict")


@FLAT
def test_load_state_dict_with_none_momentum_buffers(flat):
    """Older torch versions' SGD stored state[p]['momentum_buffer'] = None for every parameter
    that had a gradient when momentum was 0 (and setting it to None resets momentum). Loaded
    into an optimizer with momentum, torch's next step starts a new buffer and keeps it: the
    bits, buffers and state_dict() must be torch's."""
    gen = torch.Generator().manual_seed(31)
    pairs = [leaf_pair(torch.randn(n, generator=gen)) for n in (4, 3)]
    ps_o, ps_r = [a for a, _ in pairs], [b for _, b in pairs]
    for momentum in (0.0, 0.9):
        o, r = build(ps_o, ps_r, dict(lr=0.1, momentum=momentum), flat)
        old = {"state": {0: {"momentum_buffer": None}, 1: {"momentum_buffer": None}},
               "param_groups": [{"lr": 0.1, "momentum": momentum, "dampening": 0,
                                 "weight_decay": 0, "nesterov": False, "params": [0, 1]}]}
        o.load_state_dict(copy.deepcopy(old))
        r.load_state_dict(copy.deepcopy(old))
        _step_twins(o, r, ps_o, ps_r, gen, 4, lambda s: f"momentum={momentum} step {s}:")
        same_state_dict(o.state_dict(), r.state_dict(), f"momentum={momentum}: state_dict")


@FLAT
@pytest.mark.parametrize("named0,named1", list(itertools.product([True, False], repeat=2)))
def test_named_state_dict_round_trip(named0, named1, flat):
    """torch's test_can_load_from_to_named_state_dict: named_parameters() or parameters() on
    either side; param_names kept as torch keeps them, steps and state_dict equal torch's."""
    x = torch.rand(1, 4, 8, 8, generator=torch.Generator().manual_seed(37))
    for desc, kw in configs(flags=()):
        m_o, m_r = model_pair(_conv_bn)
        it = (lambda m, named: m.named_parameters() if named else m.parameters())
        o, r = build(it(m_o, named0), it(m_r, named0), kw, flat)
        _conv_steps([(o, m_o), (r, m_r)], 3, x)
        sd_o, sd_r = copy.deepcopy(o.state_dict()), copy.deepcopy(r.state_dict())
        o2, r2 = build(it(m_o, named1), it(m_r, named1), kw, flat)
        o2.load_state_dict(sd_o)
        r2.load_state_dict(sd_r)
        _conv_steps([(o2, m_o), (r2, m_r)], 2, x)
        same_opt(o2, r2, list(m_o.parameters()), list(m_r.parameters()), desc)
        same_state_dict(o2.state_dict(), r2.state_dict(), f"{desc}: state_dict")
        if named0 or named1:
            assert o2.state_dict()["param_groups"][0]["param_names"] == [
                "0.weight", "0.bias", "1.weight", "1.bias"]


@FLAT
@pytest.mark.parametrize("named", [True, False])
def test_save_load_state_dict_bitwise(named, flat):
    """torch's test_save_load_equality_with_weights_only and test_load_nontensor_step:
    torch.save(state_dict()) loads back (weights_only False and True) bit for bit equal to the
    saved one and to torch's; the loaded dict loads into a fresh optimizer that steps on like
    torch's."""
    for desc, kw in configs(flags=()):
        gen = torch.Generator().manual_seed(41)
        (w_o, w_r), (b_o, b_r) = leaf_pair(torch.randn(2, 3, generator=gen)), leaf_pair(
            torch.randn(2, generator=gen))
        x = torch.randn(3, generator=gen)
        o, r = build(_named([w_o, b_o], named), _named([w_r, b_r], named), kw, flat)
        for _ in range(3):
            o.step(functools.partial(_linear_loss, o, w_o, b_o, x))
            r.step(functools.partial(_linear_loss, r, w_r, b_r, x))
        sd = o.state_dict()
        same_state_dict(sd, r.state_dict(), desc)
        for weights_only in (False, True):
            f = io.BytesIO()
            torch.save(sd, f)
            f.seek(0)
            loaded = torch.load(f, weights_only=weights_only)
            same(loaded, sd, f"{desc}: weights_only={weights_only}")
        o2, r2 = build([leaf_pair(w_o)[0], leaf_pair(b_o)[0]],
                       [leaf_pair(w_r)[0], leaf_pair(b_r)[0]], kw, flat)
        o2.load_state_dict(loaded)
        r2.load_state_dict(copy.deepcopy(r.state_dict()))
        ps_o, ps_r = o2.param_groups[0]["params"], r2.param_groups[0]["params"]
        for step in range(2):
            for opt, (w, b) in ((o2, ps_o), (r2, ps_r)):
                _linear_loss(opt, w, b, x)
                opt.step()
            same_opt(o2, r2, ps_o, ps_r, f"{desc} loaded step {step}:")


@FLAT
def test_state_dict_is_live_and_deepcopy_independent(flat):
    """As torch's: state_dict()['state'][i] is the optimizer's own state (writing its momentum
    buffer in place changes the next step), a deepcopy of it is independent, and its
    param_groups are copies (changing their lr does not change the optimizer's)."""
    gen = torch.Generator().manual_seed(43)
    pairs = [leaf_pair(torch.randn(n, generator=gen)) for n in (5, 7)]
    ps_o, ps_r = [a for a, _ in pairs], [b for _, b in pairs]
    o, r = build(ps_o, ps_r, dict(lr=0.1, momentum=0.9), flat)

    def step():
        _step_twins(o, r, ps_o, ps_r, gen, 1)

    step()
    sd_o, sd_r = o.state_dict(), r.state_dict()
    deep_o, deep_r = copy.deepcopy(sd_o), copy.deepcopy(sd_r)
    sd_o["state"][0]["momentum_buffer"].mul_(0.5)
    sd_r["state"][0]["momentum_buffer"].mul_(0.5)
    sd_o["param_groups"][0]["lr"] = sd_r["param_groups"][0]["lr"] = 123.0
    step()
    same_opt(o, r, ps_o, ps_r, "after writing through state_dict()")
    same(sd_o["state"], sd_r["state"], "the earlier state_dict() after a step")
    same_state_dict(deep_o, deep_r, "deep copies")
    assert deep_o["state"][0]["momentum_buffer"] is not o.state[ps_o[0]]["momentum_buffer"]


@FLAT
def test_load_state_dict_with_tensor_lr(flat):
    """A state dict whose lr is a tensor (and one whose momentum buffers share one storage, as
    torch.load gives for momentum_cuda's) loads and steps like torch."""
    gen = torch.Generator().manual_seed(47)
    pairs = [leaf_pair(torch.randn(s, generator=gen)) for s in ((5,), (2, 3))]
    ps_o, ps_r = [a for a, _ in pairs], [b for _, b in pairs]
    src_p = [leaf_pair(torch.randn(s, generator=gen))[0] for s in ((5,), (2, 3))]
    src = momentum_cuda.SGD(src_p, lr=0.3, momentum=0.9, flat=True)
    for p in src_p:
        p.grad = torch.randn(p.shape, generator=gen)
    src.step()
    f = io.BytesIO()
    torch.save(src.state_dict(), f)
    f.seek(0)
    sd = torch.load(f, weights_only=True)
    sd["param_groups"][0]["lr"] = torch.tensor(0.05)
    o, r = build(ps_o, ps_r, dict(lr=0.3, momentum=0.9), flat)
    o.load_state_dict(copy.deepcopy(sd))
    r.load_state_dict(copy.deepcopy(sd))
    _step_twins(o, r, ps_o, ps_r, gen, 3, lambda s: f"step {s}:")
    same(o.state_dict(), r.state_dict(), "state_dict")


# ---- state_dict and load_state_dict hooks ----------------------------------------------------
def _sd_pre_hook(opt):
    opt.state["test"] = 1


def _sd_post_hook(opt, sd):
    if "test" in sd["state"]:
        sd["state"].pop("test")
        sd["ran_state_dict_pre_hook"] = True
    else:
        sd["ran_state_dict_pre_hook"] = False
    return sd


def _rand(q, gen):
    return torch.rand(q.shape, generator=gen)


def _primed(kw, flat, steps=2):
    gen = torch.Generator().manual_seed(53)
    p_o, p_r = leaf_pair(torch.rand(2, 3, generator=gen))
    o, r = build([p_o], [p_r], kw, flat)
    _step_twins(o, r, [p_o], [p_r], gen, steps, draw=_rand)
    return o, r, p_o, p_r


@FLAT
@pytest.mark.parametrize("hooks", ["pre", "post", "pre+post"])
def test_state_dict_hooks(hooks, flat):
    """torch's test_state_dict_pre_hook / _post_hook / _pre_post_hook, with the state dicts
    compared with torch's."""
    for desc, kw in configs(flags=("foreach", "fused", "differentiable")):
        if kw.get("differentiable"):
            continue  # its parameters must be non-leaf: covered by test_conformance.py
        o, r, _, _ = _primed(kw, flat)
        for opt in (o, r):
            if "pre" in hooks:
                opt.register_state_dict_pre_hook(_sd_pre_hook)
            if "post" in hooks:
                opt.register_state_dict_post_hook(_sd_post_hook)
        sd_o, sd_r = o.state_dict(), r.state_dict()
        same_state_dict(sd_o, sd_r, desc)
        if hooks == "pre":
            assert sd_o["state"]["test"] == 1
        else:
            assert sd_o["ran_state_dict_pre_hook"] is (hooks == "pre+post")


def _lsd_pre_hook1(opt, sd):
    sd["param_groups"][0]["lr"] = 0.002


def _lsd_pre_hook2(opt, sd):
    sd = copy.deepcopy(sd)
    sd["param_groups"][0]["lr"] = 0.003
    for st in sd["state"].values():  # a hook that rewrites the loaded state
        if isinstance(st, dict) and st.get("momentum_buffer") is not None:
            st["momentum_buffer"] = st["momentum_buffer"] * 0.5
    return sd


def _lsd_post_hook(opt):
    opt.state["ran_load_state_dict_pre_hook2"] = opt.param_groups[0]["lr"] == 0.003
    opt.state["ran_load_state_dict_post_hook"] = True
    for p in opt.param_groups[0]["params"]:  # a hook that edits the loaded buffers in place
        buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
        if buf is not None:
            buf.add_(1.0)


@FLAT
@pytest.mark.parametrize("hooks", ["pre+prepend", "post", "pre+post"])
def test_load_state_dict_hooks(hooks, flat):
    """torch's test_load_state_dict_pre_hook_and_prepend / _post_hook / _pre_post_hook, with
    hooks that also rewrite the loaded momentum buffers; the next steps equal torch's."""
    for desc, kw in configs(flags=("foreach", "fused")):
        o, r, p_o, p_r = _primed(kw, flat)
        for opt in (o, r):
            sd = copy.deepcopy(opt.state_dict())
            if hooks == "pre+prepend":
                opt.register_load_state_dict_pre_hook(_lsd_pre_hook1)
                opt.load_state_dict(sd)
                assert opt.param_groups[0]["lr"] == 0.002
                opt.register_load_state_dict_pre_hook(_lsd_pre_hook2, prepend=True)
                opt.load_state_dict(sd)
                assert opt.param_groups[0]["lr"] == 0.002
            else:
                if hooks == "pre+post":
                    opt.register_load_state_dict_pre_hook(_lsd_pre_hook2)
                opt.register_load_state_dict_post_hook(_lsd_post_hook)
                opt.load_state_dict(sd)
                assert bool(opt.state["ran_load_state_dict_pre_hook2"]) is (hooks == "pre+post")
                assert opt.state["ran_load_state_dict_post_hook"] is True
        same_opt(o, r, [p_o], [p_r], f"{desc}: loaded")
        gen = torch.Generator().manual_seed(59)
        _step_twins(o, r, [p_o], [p_r], gen, 2, lambda s: f"{desc} step {s}:", draw=_rand)
        same_state_dict(o.state_dict(), r.state_dict(), desc)


# ---- step hooks ------------------------------------------------------------------------------
@FLAT
def test_step_hooks_fire_like_torch(flat):
    """torch's test_step_pre_hook / _post_hook / _all_hooks: order global pre, local pre,
    local post, global post; the arguments the hooks see; removal."""
    for desc, kw in configs(flags=("foreach", "fused", "differentiable")):
        logs = []
        for make in (lambda ps: momentum_cuda.SGD(ps, **copy.deepcopy(kw), flat=flat),
                     lambda ps: torch.optim.SGD(ps, **ref_kwargs(kw))):
            params = [torch.tensor([1.0, 1.0])]
            opt, other = make(params), torch.optim.SGD(params)
            log = []
            rec = lambda tag: (lambda o, args, kwargs: log.append(  # noqa: E731
                (tag, o is opt, len(args), [type(a).__name__ for a in args[1:]],
                 sorted(kwargs))))
            handles = [register_optimizer_step_pre_hook(rec("global pre")),
                       register_optimizer_step_post_hook(rec("global post"))]
            try:
                handles += [opt.register_step_pre_hook(rec("pre")),
                            opt.register_step_post_hook(rec("post")),
                            other.register_step_pre_hook(rec("other pre")),
                            other.register_step_post_hook(rec("other post"))]
                opt.step()
                other.step()
                opt.step(lambda: 1)
                opt.step(closure=lambda: 2)
            finally:
                for h in handles:
                    h.remove()
            opt.step()
            other.step()
            logs.append(log)
        assert logs[0] == logs[1], f"{desc}: ours {logs[0]}\ntorch {logs[1]}"


@FLAT
def test_step_is_wrapped_once_and_profiled_like_torch(flat):
    """step() carries its own wrapper (marked hooked, so Optimizer.__init__ adds none): under a
    profiler it opens torch's range, "Optimizer.step#<class>.step", as torch.optim.SGD's does;
    with no profiler and no hook it does not enter record_function at all (that is host time
    per step); with a hook registered it runs torch's own wrapper (the hooks' order and
    arguments: test_step_hooks_fire_like_torch). Bits: the same steps as torch's either way."""
    for cls, name in ((momentum_cuda.SGD, "SGD"), (momentum_cuda.Momentum, "Momentum")):
        params = [torch.nn.Parameter(torch.randn(5))]
        opt = cls(params, lr=0.1, momentum=0.9, flat=flat)
        assert cls.step.hooked and not hasattr(cls.step.__wrapped__, "__wrapped__")
        params[0].grad = torch.randn(5)
        with torch.profiler.profile() as prof:
            opt.step()
        assert f"Optimizer.step#{name}.step" in {e.name for e in prof.events()}, name
    entered = []
    real = torch.autograd.profiler.record_function.__enter__

    def spy(self):
        entered.append(self.name)
        return real(self)
    ours, ref = twin_params(make_values(SIZES, torch.float32, seed=3))
    opt = momentum_cuda.SGD(ours, lr=0.1, momentum=0.9, flat=flat)
    topt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, foreach=False)
    torch.autograd.profiler.record_function.__enter__ = spy
    try:
        # torch's twin enters its range at each of its steps: 3, and none of ours
        run_steps(opt, ours, topt, ref, steps=3, seed=4)
        assert entered.count("Optimizer.step#SGD.step") == 3, entered
        h = opt.register_step_post_hook(lambda *a: None)
        run_steps(opt, ours, topt, ref, steps=1, seed=5)  # and now both
        h.remove()
        assert entered.count("Optimizer.step#SGD.step") == 5, entered
    finally:
        torch.autograd.profiler.record_function.__enter__ = real


def _grad_hooks(kind, gen_seed):
    """Step pre-hooks that change what the step sees, and a post hook recording the result."""
    def pre(opt, args, kwargs):
        ps = [p for g in opt.param_groups for p in g["params"]]
        if kind == "scale-in-place":
            for p in ps:
                p.grad.mul_(0.5)
        elif kind == "replace-grad":
            for p in ps:
                p.grad = p.grad * 3.0
        elif kind == "drop-grad":
            ps[0].grad = None
        elif kind == "change-lr":
            opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"] * 0.5
        elif kind == "new-closure":
            gen = torch.Generator().manual_seed(gen_seed)

            def closure():
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=gen)
                return "closure ran"
            return (args[0], closure), {}
        return None
    return pre


@FLAT
@pytest.mark.parametrize("kind", ["scale-in-place", "replace-grad", "drop-grad", "change-lr",
                                  "new-closure"])
def test_step_pre_hook_changes_take_effect(kind, flat):
    """A step pre-hook that scales the gradients in place, replaces or drops them, changes the
    lr, or returns new arguments (another closure) changes the step as it does torch's; a post
    hook sees the stepped parameters."""
    for desc, kw in configs(flags=()):
        gen = torch.Generator().manual_seed(61)
        pairs = [leaf_pair(torch.randn(s, generator=gen)) for s in ((4,), (2, 3))]
        ps_o, ps_r = [a for a, _ in pairs], [b for _, b in pairs]
        o, r = build(ps_o, ps_r, kw, flat)
        seen = {id(o): [], id(r): []}
        for opt in (o, r):
            opt.register_step_pre_hook(_grad_hooks(kind, 67))
            opt.register_step_post_hook(lambda opt, a, k: seen[id(opt)].append(
                [p.detach().clone() for p in opt.param_groups[0]["params"]]))
        for step in range(3):
            for opt, ps in ((o, ps_o), (r, ps_r)):
                opt.zero_grad()
                (sum((p * p).sum() for p in ps)).backward()
            ret_o, ret_r = o.step(), r.step()
            assert ret_o == ret_r, desc
            same_opt(o, r, ps_o, ps_r, f"{desc} step {step}:")
        same(seen[id(o)], seen[id(r)], f"{desc}: what the post hook saw")


# ---- test_deepcopy_copies_all_public_attrs, copies that step on ------------------------------
def _public(obj):
    return {k for k in obj.__dict__ if not k.startswith("_")}


@FLAT
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_keep_attrs_and_step_on(how, flat):
    """The copy has the original's public attributes (torch's test); copied after 3 steps, the
    copy's parameters step on as torch's copy's do, and the original is untouched by that."""
    for desc, kw in configs(flags=()):
        gen = torch.Generator().manual_seed(71)
        pairs = [leaf_pair(torch.randn(2, 3, generator=gen)) for _ in range(2)]
        ps_o, ps_r = [a for a, _ in pairs], [b for _, b in pairs]
        o, r = build(ps_o, ps_r, kw, flat)
        _step_twins(o, r, ps_o, ps_r, gen, 3, draw=_rand)

        def cp(opt):
            if how == "deepcopy":
                return copy.deepcopy(opt)
            f = io.BytesIO()
            torch.save(opt, f)
            f.seek(0)
            return torch.load(f, weights_only=False)

        c_o, c_r = cp(o), cp(r)
        assert _public(c_o) == _public(o), desc
        assert _public(o) - {"last_step"} == _public(r), desc
        cps_o, cps_r = c_o.param_groups[0]["params"], c_r.param_groups[0]["params"]
        before = [p.detach().clone() for p in ps_o]
        _step_twins(c_o, c_r, cps_o, cps_r, gen, 2, lambda s: f"{desc} copy step {s}:",
                    draw=_rand)
        for p, b in zip(ps_o, before):
            same(p.detach(), b, f"{desc}: the original's parameter after the copy stepped")


# ---- test_non_empty_state --------------------------------------------------------------------
@FLAT
def test_state_entries_like_torch(flat):
    """torch's test_non_empty_state, made exact: after one step of an nn.Linear, which
    parameters have state and its keys and values equal torch's (no empty entries where torch
    has none: with momentum 0 it has none at all)."""
    x = torch.rand(2, 5, generator=torch.Generator().manual_seed(73))
    for desc, kw in configs(flags=("foreach", "fused")):
        m_o, m_r = model_pair(lambda: nn.Linear(5, 5))
        o, r = build(m_o.parameters(), m_r.parameters(), kw, flat)
        for opt, m in ((o, m_o), (r, m_r)):
            opt.zero_grad()
            m(x).sum().backward()
            opt.step()
        same_opt(o, r, list(m_o.parameters()), list(m_r.parameters()), desc)
        assert len(o.state) == len(r.state), desc


# ---- zero_grad, closures, layouts, groups, schedulers, GradScaler ----------------------------
@FLAT
def test_zero_grad_semantics(flat):
    """zero_grad() and zero_grad(set_to_none=False) as torch's: presence, bits (+0.0),
    requires_grad and grad_fn of each gradient (create_graph gradients are detached), for
    parameters that never got one too; then steps on the zeroed gradients."""
    m_o, m_r = model_pair(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    unused_o, unused_r = leaf_pair(torch.randn(3))
    ps_o, ps_r = list(m_o.parameters()) + [unused_o], list(m_r.parameters()) + [unused_r]
    o, r = build(ps_o, ps_r, dict(lr=0.1, momentum=0.9), flat)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(79))

    def grads(create_graph):
        for m in (m_o, m_r):
            m(x).pow(2).sum().backward(create_graph=create_graph)

    def check(what):
        same_opt(o, r, ps_o, ps_r, what)
        for p, q in zip(ps_o, ps_r):
            if q.grad is not None:
                assert (p.grad.grad_fn is None) == (q.grad.grad_fn is None), what

    for set_to_none, create_graph in itertools.product((True, False), repeat=2):
        what = f"set_to_none={set_to_none} create_graph={create_graph}"
        grads(create_graph)
        check(f"{what}: after backward")
        o.zero_grad(set_to_none=set_to_none)
        r.zero_grad(set_to_none=set_to_none)
        check(f"{what}: after zero_grad")
        grads(False)
        o.step()
        r.step()
        check(f"{what}: after a step")
        o.zero_grad(set_to_none=False)
        r.zero_grad(set_to_none=False)
        o.step()
        r.step()
        check(f"{what}: after a step on zeroed gradients")


@FLAT
def test_closure_semantics(flat):
    """step(closure): the closure runs with grad enabled even under no_grad, its return value
    is returned as is (a tensor, a number, None), and its gradients are the step's."""
    m_o, m_r = model_pair(lambda: nn.Linear(4, 2))
    o, r = build(m_o.parameters(), m_r.parameters(), dict(lr=0.1, momentum=0.5), flat)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(83))
    for ret in ("loss", 7, None):
        for opt, m in ((o, m_o), (r, m_r)):
            out = {}

            def closure():
                opt.zero_grad()
                out["enabled"] = torch.is_grad_enabled()
                loss = m(x).sum()
                loss.backward()
                out["v"] = loss if ret == "loss" else ret
                return out["v"]

            with torch.no_grad():
                got = opt.step(closure)
            assert out["enabled"] and got is out["v"]
        same_opt(o, r, list(m_o.parameters()), list(m_r.parameters()), f"return {ret!r}")


_MIXED = [((7,), torch.float32, "c"), ((3, 4), torch.float64, "c"), ((33,), torch.bfloat16, "c"),
          ((5, 5), torch.float16, "c"), ((0,), torch.float32, "c"), ((), torch.float32, "c"),
          ((), torch.bfloat16, "c"), ((4,), torch.float32, "frozen"),
          ((2, 3, 4, 5), torch.float32, "channels_last"), ((2, 3, 4, 5), torch.bfloat16,
                                                         "channels_last"),
          ((4, 3), torch.float32, "t"), ((0, 3), torch.float64, "c")]


def _mixed_value(shape, dtype, form, gen):
    v = torch.randn(shape, generator=gen).to(dtype)
    if form == "channels_last":
        v = v.contiguous(memory_format=torch.channels_last)
    elif form == "t":
        v = torch.randn(shape[::-1], generator=gen).to(dtype).t()
    return v


@FLAT
@pytest.mark.parametrize("how", ["assign", "backward"])
def test_mixed_dtypes_layouts_and_empty_params(how, flat):
    """One group of fp32/fp64/bf16/fp16, empty and 0-dim, frozen, channels_last and transposed
    parameters, every configuration: 4 steps equal torch's (gradients assigned, or through
    backward with one parameter skipped at every other step)."""
    for desc, kw in configs(flags=()):
        gen = torch.Generator().manual_seed(89)
        pairs = [leaf_pair(_mixed_value(s, d, f, gen), requires_grad=f != "frozen")
                 for s, d, f in _MIXED]
        ps_o, ps_r = [a for a, _ in pairs], [b for _, b in pairs]
        o, r = build(ps_o, ps_r, kw, flat)
        for step in range(4):
            live = [i for i, p in enumerate(ps_r) if p.requires_grad and (step % 2 == 0 or i != 1)]
            gs = {i: torch.empty_like(ps_r[i]).copy_(torch.randn(ps_r[i].shape, generator=gen))
                  for i in live}
            for opt, ps in ((o, ps_o), (r, ps_r)):
                opt.zero_grad()
                if how == "assign":
                    for i in live:
                        ps[i].grad = gs[i].clone()
                else:
                    torch.stack([(ps[i] * gs[i]).sum().double() for i in live]).sum().backward()
                opt.step()
            same_opt(o, r, ps_o, ps_r, f"{desc} step {step}:")


@FLAT
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=["fp32", "fp64", "bf16", "fp16"])
def test_gradients_and_buffers_with_other_size1_strides(dtype, flat):
    """Gradients, and momentum buffers loaded from torch's state_dict (torch's clone of such a
    gradient keeps its strides), that differ from their parameter's strides only on dimensions
    of size 1: they place every element where the parameter does, so the kernels take them as
    they are (the ops check strides on the other dimensions only). For bf16/fp16, whose bits
    depend on how torch's TensorIterator walks the operands, only where it walks them as one
    block (contiguous or channels_last parameters); the permuted one takes torch's ops. Every
    configuration, 4 steps with a state_dict round trip from torch's twin after the second,
    bitwise; which path ran is checked too."""
    narrow = dtype in (torch.bfloat16, torch.float16)
    for desc, kw in configs(flags=()):
        gen = torch.Generator().manual_seed(131)
        pairs = [leaf_pair(size1_param(s, f, dtype, gen)) for s, f in SIZE1_LAYOUTS]
        ps_o, ps_r = [a for a, _ in pairs], [b for _, b in pairs]
        o, r = build(ps_o, ps_r, kw, flat)
        for step in range(4):
            for p, q in zip(ps_o, ps_r):
                q.grad = free_size1(q, gen)
                p.grad = q.grad.clone()  # (clone keeps the strides)
                assert p.grad.stride() == q.grad.stride()
            o.step()
            r.step()
            same_opt(o, r, ps_o, ps_r, f"{desc} step {step}:")
            torch_ops = sum(e["tensors"] for e in o.last_step if e["path"] == "torch-ops")
            assert torch_ops == (1 if narrow else 0), (desc, step, o.last_step)
            if step == 1:
                sd = copy.deepcopy(r.state_dict())  # (torch's load keeps the tensors given)
                bufs = [v.get("momentum_buffer") for v in sd["state"].values()]
                assert any(b is not None and b.stride() != p.stride()
                           for b, p in zip(bufs, ps_r)) or kw.get("momentum", 0) == 0, desc
                o.load_state_dict(sd)


@FLAT
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_non_dense_parameters(dtype, flat):
    """Parameters that are strided slices of larger tensors (torch's "contiguous=False"
    parameters): torch.optim.SGD steps them; momentum_cuda must give the same bits."""
    for desc, kw in configs(flags=()):
        gen = torch.Generator().manual_seed(97)
        vals = [torch.randn(10, 5, 2, generator=gen).to(dtype)[..., 0],
                torch.randn(20, generator=gen).to(dtype)[::2],
                torch.randn(6, 6, generator=gen).to(dtype)[1:4, 2:5]]
        pairs = [leaf_pair(v) for v in vals]
        ps_o, ps_r = [a for a, _ in pairs], [b for _, b in pairs]
        o, r = build(ps_o, ps_r, kw, flat)
        _step_twins(o, r, ps_o, ps_r, gen, 3, lambda s: f"{desc} step {s}:",
                    draw=lambda q, g: torch.randn(q.shape, generator=g).to(dtype))


@FLAT
def test_step_with_no_grads_then_some(flat):
    """opt.step() before any gradient exists does nothing and creates no state (as torch);
    then gradients for some parameters only: the others keep no gradient and no state."""
    gen = torch.Generator().manual_seed(101)
    pairs = [leaf_pair(torch.randn(n, generator=gen)) for n in (3, 130, 17)]
    ps_o, ps_r = [a for a, _ in pairs], [b for _, b in pairs]
    o, r = build(ps_o, ps_r, dict(lr=0.1, momentum=0.9, weight_decay=0.1), flat)
    o.step()
    r.step()
    same_opt(o, r, ps_o, ps_r, "no gradients")
    assert len(o.state) == 0
    _step_twins(o, r, ps_o[::2], ps_r[::2], gen, 3, lambda s: f"some gradients, step {s}:",
                compare=(ps_o, ps_r))
    same_state_dict(o.state_dict(), r.state_dict(), "state_dict")


@FLAT
def test_param_groups_with_different_options(flat):
    """Param groups with different momentum, dampening, nesterov, maximize, weight decay (a
    tensor too) and lr (a tensor too) equal torch's, as one optimizer each would be."""
    gen = torch.Generator().manual_seed(103)
    opts = [dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
            dict(momentum=0.5, dampening=0.3, maximize=True, lr=0.05),
            dict(momentum=0.0, lr=torch.tensor(0.2), weight_decay=torch.tensor(0.1)),
            dict(momentum=0.99, dampening=0.99, weight_decay=0.5, maximize=True)]
    pairs = [[leaf_pair(torch.randn(s, generator=gen)) for s in ((7,), (3, 5))] for _ in opts]
    o = momentum_cuda.SGD([dict(params=[a for a, _ in ps], **copy.deepcopy(h))
                           for ps, h in zip(pairs, opts)], lr=0.1, flat=flat)
    r = torch.optim.SGD([dict(params=[b for _, b in ps], **copy.deepcopy(h))
                         for ps, h in zip(pairs, opts)], lr=0.1, foreach=False)
    ps_o = [a for ps in pairs for a, _ in ps]
    ps_r = [b for ps in pairs for _, b in ps]
    _step_twins(o, r, ps_o, ps_r, gen, 5, lambda s: f"step {s}:")
    same_state_dict(o.state_dict(), r.state_dict(), "state_dict")


@FLAT
def test_lr_scheduler_step_order_warnings(flat):
    """LR schedulers see momentum_cuda's step as torch's: no warning after optimizer.step(),
    torch's warning when the scheduler steps first."""
    results = []
    for make in (lambda ps: momentum_cuda.SGD(ps, lr=0.1, flat=flat),
                 lambda ps: torch.optim.SGD(ps, lr=0.1, foreach=False)):
        m = nn.Linear(3, 2)
        opt = make(m.parameters())
        s = torch.optim.lr_scheduler.StepLR(opt, 1)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            m(torch.randn(4, 3)).sum().backward()
            opt.step()
            s.step()
            ok = len(w)
            s2 = torch.optim.lr_scheduler.StepLR(make(nn.Linear(3, 2).parameters()), 1)
            s2.step()
        results.append((ok, [str(x.message)[:60] for x in w]))
    assert results[0] == results[1]


@FLAT
def test_grad_scaler_on_cpu(flat):
    """torch.amp.GradScaler('cpu') unscales, skips the step on an inf gradient and updates the
    scale around momentum_cuda's step as around torch's for-loop."""
    m_o, m_r = model_pair(lambda: nn.Linear(4, 3))
    o, r = build(m_o.parameters(), m_r.parameters(), dict(lr=0.1, momentum=0.9), flat)
    s_o, s_r = (torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2))
    gen = torch.Generator().manual_seed(107)
    for step in range(5):
        x = torch.randn(2, 4, generator=gen)
        for opt, m, s in ((o, m_o, s_o), (r, m_r, s_r)):
            opt.zero_grad()
            s.scale(m(x).sum()).backward()
            if step == 2:
                m.weight.grad[0, 0] = float("inf")
            s.step(opt)
            s.update()
        assert s_o.get_scale() == s_r.get_scale()
        same_opt(o, r, list(m_o.parameters()), list(m_r.parameters()), f"step {step}:")
