"""Conformance with torch.optim.SGD(foreach=False) where torch's optimizer does more than the
kernels: copies of the optimizer (copy.deepcopy, pickle, torch.save), differentiable=True,
sparse gradients (nn.Embedding(sparse=True)) and complex parameters.

Every comparison is bitwise: floating tensors are compared as their integer bit patterns (so
-0.0 and +0.0 differ), complex ones through view_as_real, sparse ones by layout, coalesced flag,
indices and values. A test steps a twin with torch.optim.SGD(foreach=False) (momentum_cuda.
Momentum: momentum_cuda.reference.MomentumReference) on the same fresh random gradients and
compares after every step: parameters, momentum buffers, gradients and whether each .grad is
None, and state_dict() (structure and tensors).
"""
from __future__ import annotations

import copy
import gc
import io
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck

import momentum_cuda
from momentum_cuda.reference import MomentumReference
from conftest import backward_grads, bits, fresh_grads, make_values, momentum_buffer, storage_ptr

pytestmark = [
    # expected: the torch-ops path announces itself (test_torch_ops_warn_once_per_reason)
    pytest.mark.filterwarnings("ignore:momentum_cuda. (sparse gradients|complex parameters)"),
    pytest.mark.filterwarnings("ignore:Using backward.. with create_graph=True"),
]
FLAT = pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
REAL = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}
HYPERS = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9),
    "nesterov-wd": dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    "dampening-max-wd": dict(momentum=0.8, dampening=0.3, maximize=True, weight_decay=1e-2),
}
SIZES = [97, (9, 11), 1, 0, (4, 3, 5)]


# ---- bitwise comparison ----------------------------------------------------------------------
def same(a, b, what: str) -> None:
    """a and b are the same value: None, a Python value, or a tensor with the same layout,
    dtype, shape, device and bits (sparse: coalesced flag, indices, values)."""
    if a is None or b is None:
        assert a is None and b is None, (
            f"{what}: ours is {'None' if a is None else 'set'}, torch's "
            f"{'None' if b is None else 'set'}")
        return
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        assert not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor), what
        assert type(a) is type(b) and a == b, f"{what}: {a!r} != {b!r}"
        return
    assert (a.layout, a.dtype, a.shape, a.device) == (b.layout, b.dtype, b.shape, b.device), (
        f"{what}: {a.layout} {a.dtype} {tuple(a.shape)} {a.device} vs "
        f"{b.layout} {b.dtype} {tuple(b.shape)} {b.device}")
    if a.layout == torch.sparse_coo:
        assert a.is_coalesced() == b.is_coalesced(), f"{what}: coalesced flag"
        same(a._indices(), b._indices(), f"{what} (indices)")
        same(a._values(), b._values(), f"{what} (values)")
        return
    assert torch.equal(bits(a), bits(b)), (
        f"{what} differs in {(bits(a) != bits(b)).sum().item()} of {a.numel()} elements")


def same_state_dict(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys {a.keys()} vs {b.keys()}"
    assert len(a["param_groups"]) == len(b["param_groups"]), what
    for k, (ga, gb) in enumerate(zip(a["param_groups"], b["param_groups"])):
        assert ga.keys() == gb.keys(), f"{what}: group {k} keys {ga.keys()} vs {gb.keys()}"
        for key in ga:
            same(ga[key], gb[key], f"{what}: group {k} {key}")
    assert a["state"].keys() == b["state"].keys(), (
        f"{what}: state of params {sorted(a['state'])} vs {sorted(b['state'])}")
    for i in a["state"]:
        sa, sb = a["state"][i], b["state"][i]
        assert sa.keys() == sb.keys(), f"{what}: state[{i}] keys {sa.keys()} vs {sb.keys()}"
        for key in sa:
            same(sa[key], sb[key], f"{what}: state[{i}][{key}]")


def conform(ours, ref, opt, topt, what: str) -> None:
    """Parameters, momentum buffers, gradients (None where torch's is None) and state_dict."""
    assert len(ours) == len(ref)
    for i, (p, q) in enumerate(zip(ours, ref)):
        same(p, q, f"{what} param {i}")
        same(momentum_buffer(opt, p), momentum_buffer(topt, q), f"{what} momentum buffer {i}")
        same(p.grad, q.grad, f"{what} grad {i}")
    same_state_dict(opt.state_dict(), topt.state_dict(), f"{what} state_dict")


def paths(opt) -> set:
    return {e["path"] for e in opt.last_step}


def zero_grad(opt, how: str) -> None:
    if how == "default":
        opt.zero_grad()
    else:
        opt.zero_grad(set_to_none=how == "set_to_none=True")


def train(opt, ours, topt, ref, *, steps: int, gen, what="", expect=None) -> None:
    """The usual loop on both: zero_grad(), backward() delivering the same fresh random
    gradients, step(); compared after every step. expect: the set of paths of each step."""
    for step in range(steps):
        grads = fresh_grads(ours, gen)
        for o, ps in ((opt, ours), (topt, ref)):
            o.zero_grad()
            backward_grads([p for p in ps if p.requires_grad],
                           [g for p, g in zip(ps, grads) if p.requires_grad])
        opt.step()
        topt.step()
        conform(ours, ref, opt, topt, f"{what} step {step + 1}:")
        if expect is not None:
            assert paths(opt) == expect, f"{what} step {step + 1}: {opt.last_step}"


def twins(dtype, seed, sizes=SIZES):
    values = make_values(sizes, dtype, seed)
    return ([v.clone().requires_grad_() for v in values],
            [v.clone().requires_grad_() for v in values])


def storages(opt) -> set:
    """Every storage an optimizer's parameters, gradients and momentum buffers live in."""
    out = set()
    for group in opt.param_groups:
        for p in group["params"]:
            for t in (p, p.grad, momentum_buffer(opt, p)):
                if t is not None and t.layout == torch.strided and t.numel():
                    out.add(storage_ptr(t))
    return out


def make_sgd(params, flat, h, lr=0.05):
    """The twins: foreach=False in both so that the param_groups (state_dict) compare equal."""
    return (momentum_cuda.SGD(params[0], lr=lr, foreach=False, flat=flat, **h),
            torch.optim.SGD(params[1], lr=lr, foreach=False, **h))


# ---- 1. deepcopy / pickle / torch.save of the optimizer --------------------------------------
@pytest.mark.parametrize("before", ["after-step", "after-zero_grad"])
@pytest.mark.parametrize("hk", list(HYPERS))
@pytest.mark.parametrize("dk", list(REAL))
@FLAT
def test_deepcopy_optimizer_alone(flat, dk, hk, before):
    """copy.deepcopy(opt) copies the parameters too: the copy has its own flat buffers over
    them, buffers that are views of the copy's flat buffer (never shared with the original), and
    steps on like torch's deep-copied optimizer; the original is not disturbed. Plain tensors as
    parameters: deepcopy copies their .grad (the copy's flat gradient takes the values), and a
    None one stays None, as torch's does."""
    ours, ref = twins(REAL[dk], seed=11)
    opt, topt = make_sgd((ours, ref), flat, HYPERS[hk])
    gen = torch.Generator().manual_seed(12)
    train(opt, ours, topt, ref, steps=3, gen=gen, what="before the copy:")
    if before == "after-zero_grad":
        opt.zero_grad()
        topt.zero_grad()
    opt2, topt2 = copy.deepcopy(opt), copy.deepcopy(topt)
    ours2, ref2 = opt2.param_groups[0]["params"], topt2.param_groups[0]["params"]
    assert not any(a is b for a, b in zip(ours, ours2))
    conform(ours2, ref2, opt2, topt2, "the copy:")
    if before == "after-zero_grad":
        assert all(q.grad is None for q in ref2)
        opt2.step()  # no gradient anywhere: a no-op, as torch's (weight decay would show)
        topt2.step()
        conform(ours2, ref2, opt2, topt2, "the copy after a step without gradients:")
    assert not storages(opt) & storages(opt2), "the copy shares memory with the original"
    if flat:
        bucketed = [p for p in ours2 if p.numel()]
        assert len({storage_ptr(p) for p in bucketed}) == 1
        if HYPERS[hk]["momentum"]:
            assert len({storage_ptr(momentum_buffer(opt2, p)) for p in bucketed}) == 1
    expect = {"flat"} if flat else {"per-tensor"}
    train(opt2, ours2, topt2, ref2, steps=3, gen=torch.Generator().manual_seed(13),
          what="the copy:", expect=expect)
    train(opt, ours, topt, ref, steps=2, gen=gen, what="the original after the copy:",
          expect=expect)


def _model(dtype):
    torch.manual_seed(21)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _train_models(m, opt, tm, topt, steps, gen, what, expect=None):
    ours, ref = list(m.parameters()), list(tm.parameters())
    train(opt, ours, topt, ref, steps=steps, gen=gen, what=what, expect=expect)
    x = torch.randn(4, 6, generator=gen).to(ours[0].dtype)
    with torch.no_grad():
        same(m(x), tm(x), f"{what} model output")


def _copy(obj, how):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    f = io.BytesIO()
    torch.save(obj, f)
    f.seek(0)
    return torch.load(f, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("hk", ["momentum", "nesterov-wd"])
@pytest.mark.parametrize("dk", list(REAL))
@FLAT
def test_copy_model_and_optimizer_together(flat, dk, hk, how):
    """(model, opt) copied together: the copy's param_groups hold the model copy's parameters
    (one memo), the layout is rebuilt over them, and the copied model trains on with torch's
    bits, its own forward included."""
    m = _model(REAL[dk])
    tm = copy.deepcopy(m)
    opt = momentum_cuda.SGD(m.parameters(), lr=0.05, foreach=False, flat=flat, **HYPERS[hk])
    topt = torch.optim.SGD(tm.parameters(), lr=0.05, foreach=False, **HYPERS[hk])
    gen = torch.Generator().manual_seed(22)
    _train_models(m, opt, tm, topt, 3, gen, "before the copy:")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's "backward hooks will not be serialized"
        m2, opt2 = _copy((m, opt), how)
    tm2, topt2 = _copy((tm, topt), how)
    assert all(a is b for a, b in zip(opt2.param_groups[0]["params"], m2.parameters()))
    assert not storages(opt) & storages(opt2)
    expect = {"flat"} if flat else {"per-tensor"}
    _train_models(m2, opt2, tm2, topt2, 3, torch.Generator().manual_seed(23), "the copy:",
                  expect)
    _train_models(m, opt, tm, topt, 2, gen, "the original after the copy:", expect)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
@FLAT
def test_pickle_optimizer_of_plain_tensors(flat, how):
    """Plain tensors (not nn.Parameter) as parameters, two param groups: pickling raises no
    hook warning, and the loaded optimizer steps on with torch's bits."""
    ours, ref = twins(torch.float32, seed=31)
    h = HYPERS["nesterov-wd"]
    opt = momentum_cuda.SGD([dict(params=ours[:3]), dict(params=ours[3:], lr=0.02)], lr=0.05,
                            foreach=False, flat=flat, **h)
    topt = torch.optim.SGD([dict(params=ref[:3]), dict(params=ref[3:], lr=0.02)], lr=0.05,
                           foreach=False, **h)
    gen = torch.Generator().manual_seed(32)
    train(opt, ours, topt, ref, steps=2, gen=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt2 = _copy(opt, how)
    topt2 = _copy(topt, how)
    ours2 = [p for g in opt2.param_groups for p in g["params"]]
    ref2 = [p for g in topt2.param_groups for p in g["params"]]
    train(opt2, ours2, topt2, ref2, steps=3, gen=gen, what="loaded:",
          expect={"flat"} if flat else {"per-tensor"})


def test_deepcopy_copies_all_public_attrs():
    """torch's test_deepcopy_copies_all_public_attrs, for both classes."""
    for cls in (momentum_cuda.SGD, momentum_cuda.Momentum):
        ps = [nn.Parameter(torch.randn(2, 3)) for _ in range(2)]
        opt = cls(ps, lr=0.1, momentum=0.9)
        for _ in range(3):
            for p in ps:
                p.grad = torch.rand_like(p)
            opt.step()
        public = {k for k in opt.__dict__ if not k.startswith("_")}
        assert public == {k for k in copy.deepcopy(opt).__dict__ if not k.startswith("_")}


@pytest.mark.parametrize("dk", ["fp32", "bf16"])
@FLAT
def test_deepcopy_momentum_class(flat, dk):
    """momentum_cuda.Momentum copies the same way (against MomentumReference)."""
    ours, ref = twins(REAL[dk], seed=41)
    opt = momentum_cuda.Momentum(ours, lr=0.05, momentum=0.9, weight_decay=1e-2, flat=flat)
    topt = MomentumReference(ref, lr=0.05, momentum=0.9, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(42)
    train(opt, ours, topt, ref, steps=2, gen=gen)
    opt2, topt2 = copy.deepcopy(opt), copy.deepcopy(topt)
    ours2, ref2 = opt2.param_groups[0]["params"], topt2.param_groups[0]["params"]
    train(opt2, ours2, topt2, ref2, steps=3, gen=gen, what="the copy:",
          expect={"flat"} if flat else {"per-tensor"})


# ---- 2. differentiable=True ------------------------------------------------------------------
def _diff_fn(p, grad, opt_differentiable_state, opt_class, kwargs, *ignored):
    """torch's TestDifferentiableOptimizer._diff_fn: one step on a non-leaf clone, with the
    gradient and the state as differentiable inputs."""
    p = p.clone()
    p.grad = grad
    opt_differentiable_state = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                for k, v in opt_differentiable_state.items()}
    opt = opt_class([p], **kwargs)
    opt.state[p].update(opt_differentiable_state)
    opt.step()
    if isinstance(opt, momentum_cuda.SGD):
        assert paths(opt) == {"torch-differentiable"}
    return (p,) + tuple(v for v in opt.state[p].values()
                        if isinstance(v, torch.Tensor) and v.requires_grad)


def _multistep_fn(params, grad, opt_differentiable_state, opt_class, kwargs, *ignored):
    """torch's _multistep_backprop_diff_hyperparams_fn: two steps with create_graph=True, then
    the gradient of the last loss with respect to the tensor hyper-parameters."""
    params = params.clone()
    params.grad = grad
    opt_differentiable_state = {k: v.clone() if isinstance(v, torch.Tensor) else v
                                for k, v in opt_differentiable_state.items()}
    kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    differentiable_kwargs = [v for v in kwargs.values()
                             if isinstance(v, torch.Tensor) and v.requires_grad]
    optimizer = opt_class([params], **kwargs)
    optimizer.state[params].update(opt_differentiable_state)
    x = torch.tensor([1.0], dtype=torch.float64)
    y = torch.tensor([2.0], dtype=torch.float64)
    for _ in range(2):
        loss = nn.MSELoss()(x * torch.sum(params), y)
        loss.backward(inputs=(params,), create_graph=True)
        optimizer.step()
        optimizer.zero_grad()
    loss.backward(inputs=tuple(differentiable_kwargs), create_graph=True)
    assert all(k.grad is not None for k in differentiable_kwargs)
    return ((loss,) + tuple(v for v in optimizer.state[params].values()
                            if isinstance(v, torch.Tensor) and v.requires_grad)
            + tuple(differentiable_kwargs))


def _rand64(n, gen, requires_grad=True):
    return torch.rand(n, generator=gen, dtype=torch.float64).requires_grad_(requires_grad)


def _same_outputs_and_gradients(fn, inputs, kwargs_ours, kwargs_torch, what):
    """fn's outputs and the gradients of a random combination of them with respect to every
    differentiable input: the same bits with momentum_cuda.SGD as with torch.optim.SGD."""
    tensors = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    results = []
    for cls, kw in ((momentum_cuda.SGD, kwargs_ours), (torch.optim.SGD, kwargs_torch)):
        out = fn(*inputs[:3], cls, kw, *inputs[3:])
        w = torch.Generator().manual_seed(7)
        loss = sum((o * torch.rand(o.shape, generator=w, dtype=o.dtype)).sum() for o in out)
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        results.append((out, grads))
    (out_a, gr_a), (out_b, gr_b) = results
    assert len(out_a) == len(out_b)
    for k, (a, b) in enumerate(zip(out_a, out_b)):
        same(a, b, f"{what} output {k}")
    for k, (a, b) in enumerate(zip(gr_a, gr_b)):
        same(a, b, f"{what} gradient {k}")


@pytest.mark.parametrize("hk", list(HYPERS))
@FLAT
def test_differentiable_one_step(flat, hk):
    """torch's TestDifferentiableOptimizer.test_sgd across the hyper-parameters: the step's
    outputs and gradients through it equal torch's bit for bit, and gradcheck passes."""
    gen = torch.Generator().manual_seed(51)
    p, grad, mbuff = (_rand64(10, gen) for _ in range(3))
    state = {"momentum_buffer": mbuff}
    kw = dict(lr=0.9, differentiable=True, **HYPERS[hk])
    _same_outputs_and_gradients(_diff_fn, (p, grad, state, *state.values()),
                                dict(kw, flat=flat), kw, hk)
    assert gradcheck(_diff_fn, (p, grad, state, momentum_cuda.SGD, dict(kw, flat=flat),
                                *state.values()))


@pytest.mark.parametrize("which", ["lr", "weight_decay", "lr+weight_decay"])
@FLAT
def test_differentiable_tensor_hyperparameters(flat, which):
    """torch's test_differentiable_lr / _weight_decay / _weight_decay_and_lr: gradients reach
    tensor hyper-parameters through two steps, with torch's bits; gradcheck passes."""
    gen = torch.Generator().manual_seed(52)
    params, grad, mbuff = (_rand64(10, gen) for _ in range(3))
    kw = {"differentiable": True}
    if "lr" in which:
        kw["lr"] = torch.tensor(0.001, requires_grad=True, dtype=torch.float64)
    if "weight_decay" in which:
        kw["weight_decay"] = torch.tensor(0.9, requires_grad=True, dtype=torch.float64)
    state = {"momentum_buffer": mbuff}
    inputs = (params, grad, state, *state.values(), *[v for v in kw.values()
                                                        if isinstance(v, torch.Tensor)])
    _same_outputs_and_gradients(_multistep_fn, inputs, dict(kw, flat=flat), kw, which)
    assert gradcheck(_multistep_fn, (params, grad, state, momentum_cuda.SGD,
                                     dict(kw, flat=flat), *inputs[3:]))


@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
@pytest.mark.parametrize("hk", ["momentum", "nesterov-wd", "dampening-max-wd"])
@FLAT
def test_differentiable_training_loop(flat, hk):
    """Non-leaf parameters (clones of leaves, as torch's differentiable tests use), several
    steps with fresh random gradients, one parameter without a gradient at step 2, zero_grad
    between steps: parameters, buffers, gradients and state_dict equal torch's after every
    step, and a loss on the final parameters backpropagates to the leaves with torch's bits."""
    values = make_values([7, (3, 4), 1], torch.float64, seed=53)
    runs = []
    for cls, extra in ((momentum_cuda.SGD, dict(flat=flat)), (torch.optim.SGD, {})):
        leaves = [v.clone().requires_grad_() for v in values]
        ps = [leaf.clone() for leaf in leaves]
        opt = cls(ps, lr=0.1, foreach=False, differentiable=True, **HYPERS[hk], **extra)
        runs.append((leaves, ps, opt))
    (leaves, ours, opt), (tleaves, ref, topt) = runs
    gen = torch.Generator().manual_seed(54)
    for step in range(4):
        grads = fresh_grads(ours, gen)
        for _, ps, o in runs:
            o.zero_grad()
            for i, (p, g) in enumerate(zip(ps, grads)):
                if not (step == 1 and i == 1):
                    p.grad = g.clone()
            o.step()
        conform(ours, ref, opt, topt, f"step {step + 1}:")
        assert paths(opt) == {"torch-differentiable"}
    w = fresh_grads(ours, gen)
    for leaves_, ps, _ in runs:
        sum((p * g).sum() for p, g in zip(ps, w)).backward()
    for i, (a, b) in enumerate(zip(leaves, tleaves)):
        same(a.grad, b.grad, f"leaf {i} gradient through the steps")


@FLAT
def test_differentiable_leaf_parameter_raises_before_touching(flat):
    """A leaf that requires grad cannot be updated in place under grad mode: torch raises part
    way through its step; momentum_cuda raises the same error before touching anything."""
    values = make_values([5, 3], torch.float64, seed=55)
    ours = [v.clone().requires_grad_() for v in values]
    ref = [v.clone().requires_grad_() for v in values]
    opt = momentum_cuda.SGD(ours, lr=0.1, momentum=0.9, differentiable=True, flat=flat)
    topt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, differentiable=True, foreach=False)
    for ps in (ours, ref):
        for p, g in zip(ps, fresh_grads(ps, torch.Generator().manual_seed(56))):
            p.grad = g
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        topt.step()
    before = [p.detach().clone() for p in ours]
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad") as e:
        opt.step()
    assert "shape (5,)" in str(e.value)
    for p, b in zip(ours, before):
        same(p, b, "a parameter after the failed step")
    assert len(opt.state) == 0


def test_differentiable_fused_error_matches_torch():
    ps = [torch.randn(3, requires_grad=True)]
    with pytest.raises(RuntimeError) as theirs:
        torch.optim.SGD(ps, lr=0.1, fused=True, differentiable=True)
    with pytest.raises(RuntimeError) as ours:
        momentum_cuda.SGD(ps, lr=0.1, fused=True, differentiable=True)
    assert str(ours.value) == str(theirs.value)
    assert ps[0].grad is None and ps[0]._base is None


# ---- 3. sparse gradients ---------------------------------------------------------------------
class _EmbNet(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(61)
        self.emb = nn.Embedding(20, 4, sparse=True).to(dtype)
        self.lin = nn.Linear(4, 3).to(dtype)

    def forward(self, idx):
        return self.lin(self.emb(idx))


def _emb_twins(dtype, flat):
    """_EmbNet and its copy, with momentum_cuda.SGD and torch.optim.SGD (momentum 0.9)."""
    net = _EmbNet(dtype)
    tnet = copy.deepcopy(net)
    opt = momentum_cuda.SGD(net.parameters(), lr=0.05, momentum=0.9, flat=flat)
    topt = torch.optim.SGD(tnet.parameters(), lr=0.05, momentum=0.9, foreach=False)
    return net, tnet, opt, topt


def _emb_backward(net, gen, dtype):
    """Fresh random indices (with repeats: the sparse gradient is uncoalesced) and a fresh
    random upstream gradient."""
    idx = torch.randint(0, 20, (12,), generator=gen)
    idx[1] = idx[0]
    w = torch.randn(12, 3, generator=gen).to(dtype)
    return idx, w


SPARSE_HYPERS = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9),
    "nesterov": dict(momentum=0.9, nesterov=True),
    "dampening-max": dict(momentum=0.8, dampening=0.3, maximize=True),
}


@pytest.mark.parametrize("zero", ["default", "set_to_none=False", "set_to_none=True"])
@pytest.mark.parametrize("hk", list(SPARSE_HYPERS))
@pytest.mark.parametrize("dk", list(REAL))
@FLAT
def test_sparse_embedding(flat, dk, hk, zero):
    """nn.Embedding(sparse=True) next to a dense Linear in one group: the embedding's gradient
    stays sparse exactly where torch's is (it is never summed into a dense flat gradient), and
    parameters, buffers (sparse after sparse steps, as torch's), gradients and state_dict
    equal torch's after every step, whichever zero_grad the loop uses. Step 3 accumulates two
    backward passes; after step 4, (model, optimizer) are deep-copied and the copies go on."""
    dtype = REAL[dk]
    net = _EmbNet(dtype)
    tnet = copy.deepcopy(net)
    h = SPARSE_HYPERS[hk]
    opt = momentum_cuda.SGD(net.parameters(), lr=0.05, foreach=False, flat=flat, **h)
    topt = torch.optim.SGD(tnet.parameters(), lr=0.05, foreach=False, **h)
    ours, ref = list(net.parameters()), list(tnet.parameters())
    gen = torch.Generator().manual_seed(62)
    for step in range(6):
        if step == 4:
            net, opt = copy.deepcopy((net, opt))
            tnet, topt = copy.deepcopy((tnet, topt))
            ours, ref = list(net.parameters()), list(tnet.parameters())
        passes = [_emb_backward(net, gen, dtype) for _ in range(2 if step == 2 else 1)]
        for n, o in ((net, opt), (tnet, topt)):
            zero_grad(o, zero)
            for idx, w in passes:
                (n(idx) * w).sum().backward()
        assert ours[0].grad.layout == ref[0].grad.layout
        opt.step()
        topt.step()
        conform(ours, ref, opt, topt, f"step {step + 1}:")
        entries = {(e["path"], e["tensors"]) for e in opt.last_step}
        if ref[0].grad.layout == torch.sparse_coo:
            assert ("torch-ops", 1) in entries, opt.last_step
        if flat and zero != "set_to_none=True":
            assert ("flat", 2) in entries, opt.last_step  # the Linear stays in the layout


@FLAT
def test_sparse_embedding_momentum_class(flat):
    """momentum_cuda.Momentum with a sparse gradient: MomentumReference's bits."""
    net = _EmbNet(torch.float32)
    tnet = copy.deepcopy(net)
    opt = momentum_cuda.Momentum(net.parameters(), lr=0.05, momentum=0.9, flat=flat)
    topt = MomentumReference(tnet.parameters(), lr=0.05, momentum=0.9)
    ours, ref = list(net.parameters()), list(tnet.parameters())
    gen = torch.Generator().manual_seed(63)
    for step in range(3):
        idx, w = _emb_backward(net, gen, torch.float32)
        for n, o in ((net, opt), (tnet, topt)):
            o.zero_grad()
            (n(idx) * w).sum().backward()
        opt.step()
        topt.step()
        for i, (p, q) in enumerate(zip(ours, ref)):
            same(p, q, f"step {step + 1} param {i}")
            same(momentum_buffer(opt, p), momentum_buffer(topt, q), f"step {step + 1} buf {i}")


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            [None if p.grad is None else p.grad.detach().clone() for p in params],
            copy.deepcopy(opt.state_dict()))


def _assert_untouched(opt, params, snap):
    for i, (p, b, g) in enumerate(zip(params, snap[0], snap[1])):
        same(p, b, f"param {i} after a failed step")
        same(None if p.grad is None else p.grad.detach(), g, f"grad {i} after a failed step")
    same_state_dict(opt.state_dict(), snap[2], "state_dict after a failed step")


@FLAT
def test_sparse_with_weight_decay_raises_before_touching(flat):
    """torch.optim.SGD fails on a sparse gradient with weight_decay != 0 (after updating the
    parameters before it); momentum_cuda raises first, naming weight_decay and its value."""
    net = _EmbNet(torch.float32)
    tnet = copy.deepcopy(net)
    # the Linear first, so that torch updates it before failing on the embedding
    order = lambda n: [n.lin.weight, n.lin.bias, n.emb.weight]  # noqa: E731
    opt = momentum_cuda.SGD(order(net), lr=0.05, momentum=0.9, weight_decay=0.01, flat=flat)
    topt = torch.optim.SGD(order(tnet), lr=0.05, momentum=0.9, weight_decay=0.01,
                           foreach=False)
    gen = torch.Generator().manual_seed(64)
    idx, w = _emb_backward(net, gen, torch.float32)
    for n, o in ((net, opt), (tnet, topt)):
        o.zero_grad()
        (n(idx) * w).sum().backward()
    tbefore = tnet.lin.weight.detach().clone()
    with pytest.raises(RuntimeError, match="add\\(sparse, dense\\) is not supported"):
        topt.step()
    assert not torch.equal(tbefore, tnet.lin.weight)  # torch did update the Linear
    snap = _snapshot(opt, order(net))
    with pytest.raises(RuntimeError, match="weight_decay=0.01 .*sparse") as e:
        opt.step()
    assert "shape (20, 4)" in str(e.value)
    _assert_untouched(opt, order(net), snap)


@FLAT
@pytest.mark.parametrize("hk", ["momentum", "nesterov"])
def test_sparse_op_torch_lacks_raises_before_touching(flat, hk):
    """fp16 sparse gradients with momentum: torch's step fails part-way ("cadd_sparse" not
    implemented for 'Half': sparse + sparse, after updating the parameters before it);
    momentum_cuda runs the same step on tiny stand-ins first and raises torch's error type
    before anything is written."""
    net = _EmbNet(torch.float16)
    tnet = copy.deepcopy(net)
    order = lambda n: [n.lin.weight, n.lin.bias, n.emb.weight]  # noqa: E731
    opt = momentum_cuda.SGD(order(net), lr=0.05, flat=flat, **SPARSE_HYPERS[hk])
    topt = torch.optim.SGD(order(tnet), lr=0.05, foreach=False, **SPARSE_HYPERS[hk])
    gen = torch.Generator().manual_seed(65)
    for step in range(2):  # momentum: the first step works (buf = clone), the second fails
        idx, w = _emb_backward(net, gen, torch.float16)
        for n, o in ((net, opt), (tnet, topt)):
            o.zero_grad()
            (n(idx) * w).sum().float().backward()
        tbefore = tnet.lin.weight.detach().clone()
        try:
            topt.step()
        except NotImplementedError as e:
            assert "cadd_sparse" in str(e) and not torch.equal(tbefore, tnet.lin.weight)
            break
        opt.step()
        assert torch.equal(net.emb.weight, tnet.emb.weight)
    else:
        pytest.fail("torch's step did not fail")
    snap = _snapshot(opt, order(net))
    with pytest.raises(NotImplementedError, match="before anything was written.*cadd_sparse"):
        opt.step()
    _assert_untouched(opt, order(net), snap)


@FLAT
def test_empty_fp16_sparse_gradient_steps_as_torch(flat):
    """The other side of the rehearsal above: an fp16 sparse gradient with no entries (zeroed
    in place by zero_grad(set_to_none=False), then a backward that skips the embedding) goes
    through torch's sparse + sparse, which works when it is empty: no error, torch's bits."""
    net, tnet, opt, topt = _emb_twins(torch.float16, flat)
    gen = torch.Generator().manual_seed(66)
    idx, w = _emb_backward(net, gen, torch.float16)
    x = torch.randn(5, 4, generator=gen).half()
    for n, o in ((net, opt), (tnet, topt)):
        (n(idx) * w).sum().float().backward()
        o.step()
        o.zero_grad(set_to_none=False)
        n.lin(x).sum().float().backward()  # the embedding's sparse gradient stays empty
        assert n.emb.weight.grad._nnz() == 0
        o.step()
    for p, q in zip(net.parameters(), tnet.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"].to_dense(),
                           topt.state[q]["momentum_buffer"].to_dense())


@FLAT
def test_sparse_buffer_with_dense_gradient_raises_before_touching(flat):
    """After a sparse step with momentum the buffer is sparse (torch's too); a dense gradient
    then fails in torch; momentum_cuda raises before touching anything."""
    net, tnet, opt, topt = _emb_twins(torch.float32, flat)
    gen = torch.Generator().manual_seed(65)
    idx, w = _emb_backward(net, gen, torch.float32)
    for n, o in ((net, opt), (tnet, topt)):
        o.zero_grad()
        (n(idx) * w).sum().backward()
        o.step()
    assert momentum_buffer(opt, net.emb.weight).layout == torch.sparse_coo
    g = torch.randn(20, 4, generator=gen)
    for n in (net, tnet):
        n.emb.weight.grad = g.clone()
    with pytest.raises(RuntimeError, match="add\\(sparse, dense\\) is not supported"):
        topt.step()
    snap = _snapshot(opt, list(net.parameters()))
    with pytest.raises(RuntimeError, match="momentum_buffer .* is sparse"):
        opt.step()
    _assert_untouched(opt, list(net.parameters()), snap)


def _sparse_of(g, gen, coalesced=False):
    """g as a sparse tensor with no dense dimension: g.to_sparse() (coalesced), or every entry
    split in two, in shuffled order (uncoalesced, as torch's rosenbrock_sparse test builds)."""
    if coalesced:
        return g.to_sparse()
    idx = torch.nonzero(torch.ones(g.shape, dtype=torch.bool)).t()
    vals = g.flatten()
    part = torch.rand(vals.shape, generator=gen).to(g.dtype) * vals
    order = torch.randperm(2 * vals.numel(), generator=gen)
    i = torch.cat([idx, idx], dim=1)[:, order]
    v = torch.cat([part, vals - part])[order]
    return torch.sparse_coo_tensor(i, v, g.shape, check_invariants=True)


@pytest.mark.parametrize("coalesced", [True, False], ids=["coalesced", "uncoalesced"])
@pytest.mark.parametrize("hk", list(SPARSE_HYPERS))
@FLAT
def test_sparse_gradients_of_flat_views(flat, hk, coalesced):
    """Sparse gradients without dense dimensions (1-D and 2-D) on parameters that sit at
    non-zero offsets of the flat buffer, between dense ones: torch's bits, and no write lands
    elsewhere (torch 2.13's CPU dense.add_(sparse) misplaces them for a tensor with a storage
    offset; momentum_cuda steps such tensors on offset-0 copies)."""
    sizes = [97, 10, (5, 4), 300]
    sparse_at = (1, 2)
    ours, ref = twins(torch.float32, seed=81, sizes=sizes)
    opt, topt = make_sgd((ours, ref), flat, SPARSE_HYPERS[hk])
    if flat:
        assert all(ours[i].storage_offset() for i in sparse_at)
    gen = torch.Generator().manual_seed(82)
    for step in range(4):
        grads = fresh_grads(ours, gen)
        sparse = {i: _sparse_of(grads[i], gen, coalesced) for i in sparse_at}
        for o, ps in ((opt, ours), (topt, ref)):
            o.zero_grad()
            dense = [i for i in range(len(ps)) if i not in sparse]
            backward_grads([ps[i] for i in dense], [grads[i] for i in dense])
            for i, g in sparse.items():
                ps[i].grad = g.clone()
        opt.step()
        topt.step()
        conform(ours, ref, opt, topt, f"step {step + 1}:")


@FLAT
def test_dense_then_sparse_gradients(flat):
    """A parameter first stepped with dense gradients (its buffer a flat view), then with
    sparse ones: torch adds them into the dense buffer; the same bits here. With nesterov
    torch fails on that step (after updating the parameters before it); momentum_cuda raises
    first and changes nothing."""
    for hk, coalesced in (("momentum", True), ("momentum", False), ("nesterov", True)):
        # the last parameter keeps a misplaced write inside the flat buffer, so that a
        # regression fails the comparison instead of corrupting the heap
        ours, ref = twins(torch.float32, seed=83, sizes=[33, (6, 5), 200])
        opt, topt = make_sgd((ours, ref), flat, SPARSE_HYPERS[hk])
        gen = torch.Generator().manual_seed(84)
        train(opt, ours, topt, ref, steps=2, gen=gen, what=f"{hk} dense:")
        for step in range(2):
            grads = fresh_grads(ours, gen)
            g1 = _sparse_of(grads[1], gen, coalesced)
            for o, ps in ((opt, ours), (topt, ref)):
                o.zero_grad()
                backward_grads([ps[0], ps[2]], [grads[0], grads[2]])
                ps[1].grad = g1.clone()
            if hk == "nesterov":
                with pytest.raises(RuntimeError, match="add\\(sparse, dense\\)"):
                    topt.step()
                snap = _snapshot(opt, ours)
                with pytest.raises(RuntimeError, match="nesterov=True .*sparse"):
                    opt.step()
                _assert_untouched(opt, ours, snap)
                break
            opt.step()
            topt.step()
            conform(ours, ref, opt, topt, f"{hk} sparse step {step + 1}:")


def _accumulator_hooks(p) -> int:
    """How many pre-hooks p's gradient accumulator has (read through a probe hook's handle)."""
    node = torch.autograd.graph.get_gradient_edge(p).node  # held: its hook dict lives with it
    handle = node.register_prehook(lambda g: None)
    n = len(handle.hooks_dict_ref()) - 1
    handle.remove()
    return n


def test_grad_hooks_go_with_the_optimizer():
    """The gradient hooks of the flat layout (on each parameter's gradient accumulator) are
    removed once the optimizer is gone (no dead hooks pile up on a model that gets a new
    optimizer every epoch); backward then stores its own tensors, as without an optimizer."""
    net = _EmbNet(torch.float32)
    ps = list(net.parameters())
    opt = momentum_cuda.SGD(ps, lr=0.05)
    assert [_accumulator_hooks(p) for p in ps] == [1] * len(ps)
    opt2 = momentum_cuda.SGD(ps, lr=0.05)
    assert [_accumulator_hooks(p) for p in ps] == [2] * len(ps)
    assert all(p._backward_hooks is None or len(p._backward_hooks) == 0 for p in ps)
    del opt, opt2
    gc.collect()
    assert [_accumulator_hooks(p) for p in ps] == [0] * len(ps)
    net(torch.tensor([1, 2])).sum().backward()
    assert net.lin.weight.grad.storage_offset() == 0  # not a view of a dead flat buffer


def test_torch_ops_warn_once_per_reason():
    """The torch-ops path is never silent: a warning the first time for each reason (sparse,
    complex), and every step reports it in last_step."""
    net = _EmbNet(torch.float32)
    c = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    opt = momentum_cuda.SGD([*net.parameters(), c], lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(66)
    for step in range(3):
        idx, w = _emb_backward(net, gen, torch.float32)
        opt.zero_grad()
        (net(idx) * w).sum().backward()
        c.grad = torch.randn(3, dtype=torch.complex64, generator=gen)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        messages = sorted(str(x.message).split(" ")[1] for x in caught)
        assert messages == (["complex", "sparse"] if step == 0 else []), messages
        ops = {(e["dtype"], e["tensors"]) for e in opt.last_step if e["path"] == "torch-ops"}
        assert ops == {(torch.float32, 1), (torch.complex64, 1)}, opt.last_step


# ---- 4. complex parameters -------------------------------------------------------------------
COMPLEX = {"complex64": (torch.complex64, torch.float32),
           "complex128": (torch.complex128, torch.float64)}


def _complex_grads(params, gen):
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if p.is_complex():
            g = torch.complex(g, torch.randn(p.shape, generator=gen, dtype=torch.float64))
        out.append(g.to(p.dtype))
    return out


def _complex_backward(params, grads):
    """backward() delivering exactly `grads`: d/dp of Re(sum(p * conj(g))) is g."""
    terms = [((p * g.conj()).real if p.is_complex() else p * g).sum().double()
             for p, g in zip(params, grads)]
    torch.stack(terms).sum().backward()


@pytest.mark.parametrize("hk", list(HYPERS))
@pytest.mark.parametrize("ck", list(COMPLEX))
@FLAT
def test_complex_parameters(flat, ck, hk):
    """Complex parameters next to a real one in one group (torch's test_complex layout): torch's
    complex arithmetic bit for bit (path torch-ops), the real parameter on the kernel path."""
    cdtype, rdtype = COMPLEX[ck]
    gen = torch.Generator().manual_seed(71)
    values = _complex_grads([torch.empty(10, 5, dtype=cdtype), torch.empty(10, dtype=cdtype),
                             torch.empty(10, 5, dtype=rdtype)], gen)
    ours = [v.clone().requires_grad_() for v in values]
    ref = [v.clone().requires_grad_() for v in values]
    opt, topt = make_sgd((ours, ref), flat, HYPERS[hk])
    for step in range(4):
        grads = _complex_grads(ours, gen)
        for o, ps in ((opt, ours), (topt, ref)):
            o.zero_grad()
            _complex_backward(ps, grads)
        for p, g in zip(ours, grads):
            same(p.grad, g, "the delivered gradient")
        opt.step()
        topt.step()
        conform(ours, ref, opt, topt, f"step {step + 1}:")
        entries = {(e["path"], e["dtype"], e["tensors"]) for e in opt.last_step}
        assert entries == {("torch-ops", cdtype, 2),
                           ("flat" if flat else "per-tensor", rdtype, 1)}, opt.last_step


@pytest.mark.parametrize("ck", list(COMPLEX))
@FLAT
def test_complex_momentum_class(flat, ck):
    cdtype, _ = COMPLEX[ck]
    gen = torch.Generator().manual_seed(72)
    values = _complex_grads([torch.empty(6, 4, dtype=cdtype)], gen)
    ours = [v.clone().requires_grad_() for v in values]
    ref = [v.clone().requires_grad_() for v in values]
    opt = momentum_cuda.Momentum(ours, lr=0.05, momentum=0.9, weight_decay=1e-2, flat=flat)
    topt = MomentumReference(ref, lr=0.05, momentum=0.9, weight_decay=1e-2)
    for step in range(3):
        grads = _complex_grads(ours, gen)
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        topt.step()
        same(ours[0], ref[0], f"step {step + 1} param")
        same(momentum_buffer(opt, ours[0]), momentum_buffer(topt, ref[0]), f"step {step + 1}")


@FLAT
def test_complex_deepcopy(flat):
    """Items 1 and 4 together: a copied optimizer with complex parameters steps on."""
    gen = torch.Generator().manual_seed(73)
    values = _complex_grads([torch.empty(8, dtype=torch.complex64),
                             torch.empty(5, dtype=torch.float32)], gen)
    ours = [v.clone().requires_grad_() for v in values]
    ref = [v.clone().requires_grad_() for v in values]
    opt, topt = make_sgd((ours, ref), flat, HYPERS["nesterov-wd"])
    for o, ps in ((opt, ours), (topt, ref)):
        _complex_backward(ps, _complex_grads(ps, torch.Generator().manual_seed(74)))
        o.step()
    opt2, topt2 = copy.deepcopy(opt), copy.deepcopy(topt)
    ours2, ref2 = opt2.param_groups[0]["params"], topt2.param_groups[0]["params"]
    for step in range(3):
        grads = _complex_grads(ours2, gen)
        for o, ps in ((opt2, ours2), (topt2, ref2)):
            o.zero_grad()
            _complex_backward(ps, grads)
        opt2.step()
        topt2.step()
        conform(ours2, ref2, opt2, topt2, f"copy step {step + 1}:")
