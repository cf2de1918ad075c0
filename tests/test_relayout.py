"""The flat layout follows the parameters: what training code does to them after the optimizer
exists (moves them, replaces their data, unfreezes them, materialises them, makes them views of
a tensor it keeps) is either laid out again or left where it is, never stepped wrongly.

Every case runs a twin model stepped by torch.optim.SGD(foreach=False) and compares, after
every step, parameters (and the tensors they alias), gradient presence and values, momentum
buffers and the state_dict bit for bit; and it checks which path ran (flat after a relayout;
per-tensor or torch-ops where the parameter must stay where it is)."""
import copy
import warnings

import pytest
import torch
from torch import nn

import momentum_cuda

H = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
FLAT = pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])


def _same_opt(opt, topt, what):
    for group, tgroup in zip(opt.param_groups, topt.param_groups):
        for p, q in zip(group["params"], tgroup["params"]):
            assert p.dtype == q.dtype and p.shape == q.shape and p.stride() == q.stride(), what
            assert torch.equal(p.detach(), q.detach()), what
            assert (p.grad is None) == (q.grad is None), what
            assert p.grad is None or torch.equal(p.grad, q.grad), what
            b = opt.state[p].get("momentum_buffer") if p in opt.state else None
            c = topt.state[q].get("momentum_buffer") if q in topt.state else None
            assert (b is None) == (c is None), what
            assert b is None or (b.dtype == c.dtype and torch.equal(b, c)), what
    sd, tsd = opt.state_dict(), topt.state_dict()
    strip = lambda groups: [{k: v for k, v in g.items() if k != "foreach"} for g in groups]
    assert strip(sd["param_groups"]) == strip(tsd["param_groups"]), what
    assert sd["state"].keys() == tsd["state"].keys(), what
    for k, st in tsd["state"].items():
        assert all(torch.equal(sd["state"][k][n], v) for n, v in st.items()), what


def _paths(opt):
    return {e["path"] for e in opt.last_step}


def _mlp(seed, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _twins(seed, flat=True, dtype=torch.float32, frozen=False):
    """A small model and its copy, stepped by momentum_cuda.SGD and torch.optim.SGD, and a
    generator for their inputs; frozen: the first layer frozen before the optimizers exist."""
    m = _mlp(seed, dtype)
    t = copy.deepcopy(m)
    for mm in (m, t) if frozen else ():
        mm[0].requires_grad_(False)
    opt = momentum_cuda.SGD(m.parameters(), flat=flat, **H)
    topt = torch.optim.SGD(t.parameters(), foreach=False, **H)
    return m, t, opt, topt, torch.Generator().manual_seed(seed + 1)


def _step_both(models, opts, x, zero=True, set_to_none=True):
    for m, o in zip(models, opts):
        if zero:
            o.zero_grad(set_to_none=set_to_none)
        m(x).square().sum().backward()
        o.step()


@FLAT
@pytest.mark.parametrize("change", ["double", "half", "bfloat16"])
@pytest.mark.parametrize("set_to_none", [True, False], ids=["none", "zero"])
def test_model_to_dtype_before_any_step_is_laid_out_again(flat, change, set_to_none):
    """model.to(dtype) between construction and the first step: no momentum buffer exists,
    so the group is laid out again in the new dtype and the steps are flat; zero_grad keeps
    zeroing (set_to_none=False was the case that kept stale gradients)."""
    m, t, opt, topt, gen = _twins(0, flat)
    x = torch.randn(3, 4, generator=gen)
    _step_both((m, t), (opt, topt), x, set_to_none=set_to_none)  # grads exist (fp32)
    opt.state.clear()  # no buffer: the case where nothing keeps the old dtype
    topt.state.clear()
    for mm in (m, t):
        getattr(mm, change)()
    dtype = m[0].weight.dtype
    for step in range(3):
        x = torch.randn(3, 4, generator=gen).to(dtype)
        _step_both((m, t), (opt, topt), x, set_to_none=set_to_none)
        _same_opt(opt, topt, f"step {step}")
        assert _paths(opt) == ({"flat"} if flat else {"per-tensor"}), opt.last_step


@FLAT
def test_zero_grad_false_after_model_double_with_buffers(flat):
    """model.double() after steps (fp32 buffers stay, torch-ops path), then
    zero_grad(set_to_none=False) every step: the converted gradients must be zeroed."""
    m, t, opt, topt, gen = _twins(2, flat)
    for step in range(5):
        if step == 2:
            m.double()
            t.double()
        x = torch.randn(3, 4, generator=gen).to(m[0].weight.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the torch-ops notice
            _step_both((m, t), (opt, topt), x, set_to_none=False)
        _same_opt(opt, topt, f"step {step}")


def test_grad_data_replaced_is_not_stepped_from_the_flat_buffer():
    """p.grad.data = other tensor (what Module._apply does to a gradient): the gradient object
    is still the flat view, but its memory is elsewhere; the step reads the new values, and
    after zero_grad backward gets a fresh flat view (the replaced tensor is left alone)."""
    m, t, opt, topt, gen = _twins(4)
    _step_both((m, t), (opt, topt), torch.randn(3, 4, generator=gen))
    new = torch.randn(m[2].weight.shape, generator=gen)
    held = m[2].weight.grad
    m[2].weight.grad.data = new.clone()
    t[2].weight.grad.data = new.clone()
    for o in (opt, topt):
        o.step()
    _same_opt(opt, topt, "after the replaced gradient")
    assert "per-tensor" in _paths(opt)
    before = held.clone()
    for step in range(2):
        _step_both((m, t), (opt, topt), torch.randn(3, 4, generator=gen))
        _same_opt(opt, topt, f"step {step}")
        assert _paths(opt) == {"flat"}, opt.last_step
    assert torch.equal(held, before)  # the user's tensor was not written


@FLAT
@pytest.mark.parametrize("overlap", [False, True], ids=["disjoint", "overlapping"])
def test_parameters_that_view_a_tensor_the_user_keeps(flat, overlap):
    """Parameters made as views of one bigger tensor that the training code keeps (and reads,
    and writes between them): they stay in it (never moved into a flat buffer), so the bigger
    tensor follows every step, as with torch. Disjoint views filling most of it are stepped in
    place by one flat call over its storage (exact segments: what lies between them is never
    written); overlapping views are stepped one after the other with torch's own ops."""
    bigs, opts, ps = [], [], []
    for kind in ("ours", "torch"):
        torch.manual_seed(6)
        big = torch.randn(40)
        a = nn.Parameter(big[:17])
        b = nn.Parameter(big[11:31] if overlap else big[17:37])
        c = nn.Parameter(torch.randn(7))  # its own storage: laid out as usual
        if kind == "ours":
            o = momentum_cuda.SGD([a, b, c], flat=flat, **H)
        else:
            o = torch.optim.SGD([a, b, c], foreach=False, **H)
        bigs.append(big)
        opts.append(o)
        ps.append((a, b, c))
    gen = torch.Generator().manual_seed(7)
    for step in range(4):
        w = torch.randn(3, generator=gen)
        for big in bigs:
            big[-1] = step - 0.5  # outside every parameter (its own once more when overlapping)
        for (a, b, c), o in zip(ps, opts):
            o.zero_grad()
            (a.sin().sum() * w[0] + (b * w[1]).cos().sum() + (c * w[2]).square().sum()).backward()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for o in opts:
                o.step()
        _same_opt(opts[0], opts[1], f"step {step}")
        assert torch.equal(bigs[0], bigs[1]), step
        a, b, c = ps[0]
        assert a.data_ptr() == bigs[0].data_ptr(), "the view was moved"
        if overlap:
            assert _paths(opts[0]) == {"torch-ops"}, opts[0].last_step
        else:
            assert "torch-ops" not in _paths(opts[0])
            assert _paths(opts[0]) == ({"flat"} if flat else {"per-tensor"}), opts[0].last_step
            assert big[-1] == step - 0.5 and big[37] == bigs[1][37]


def test_parameter_made_from_a_tensor_the_user_keeps():
    """nn.Parameter(t) shares t's storage; while t is alive the parameter is not moved (t would
    stop seeing the steps); once t is dropped a new optimizer lays it out."""
    t = torch.randn(9)
    p = nn.Parameter(t)
    opt = momentum_cuda.SGD([p], lr=0.1)
    p.grad = torch.randn(9)
    ref = t.clone().add_(p.grad, alpha=-0.1)  # torch.optim.SGD's update
    opt.step()
    assert torch.equal(t, ref) and p.data_ptr() == t.data_ptr()
    assert _paths(opt) == {"per-tensor"}
    del t, opt
    opt = momentum_cuda.SGD([p], lr=0.1)
    opt.zero_grad()
    (p * torch.randn(9)).sum().backward()  # into the flat gradient buffer
    opt.step()
    assert _paths(opt) == {"flat"}


def test_second_optimizer_over_a_laid_out_model():
    """A new optimizer over parameters another (still alive) momentum_cuda optimizer laid out,
    with another split into param groups: it lays them out in its own buffers; both go on
    with torch's bits (each checks its layout before stepping). The first optimizer, stepping
    again, lays them out once more; the gradients backward just gave are the second one's flat
    views (memory it does not own, _alone), so that step is per tensor and the next flat."""
    m, t, opt, topt, gen = _twins(8)
    _step_both((m, t), (opt, topt), torch.randn(3, 4, generator=gen))
    split = lambda mm: [{"params": [mm[0].weight, mm[2].weight]},
                        {"params": [mm[0].bias, mm[2].bias], "weight_decay": 0.0}]
    opt2 = momentum_cuda.SGD(split(m), **H)
    topt2 = torch.optim.SGD(split(t), foreach=False, **H)
    for step in range(3):
        _step_both((m, t), (opt2, topt2), torch.randn(3, 4, generator=gen))
        _same_opt(opt2, topt2, f"second optimizer, step {step}")
        assert _paths(opt2) == {"flat"}, opt2.last_step
    for step, paths in enumerate(({"per-tensor"}, {"flat"})):
        _step_both((m, t), (opt, topt), torch.randn(3, 4, generator=gen))
        _same_opt(opt, topt, f"first optimizer again, step {step}")
        assert _paths(opt) == paths, opt.last_step  # laid out again in its own buffers


@FLAT
def test_unfrozen_after_construction(flat):
    """Fine-tuning: the backbone is frozen when the optimizer is built and unfrozen later; its
    parameters then get gradients and are laid out (flat) from that step on."""
    m = _mlp(10)
    t = copy.deepcopy(m)
    for mm in (m, t):
        mm[0].requires_grad_(False)
    opt = momentum_cuda.SGD(m.parameters(), flat=flat, **H)
    topt = torch.optim.SGD(t.parameters(), foreach=False, **H)
    gen = torch.Generator().manual_seed(11)
    for step in range(5):
        if step == 2:
            for mm in (m, t):
                mm[0].requires_grad_(True)
        _step_both((m, t), (opt, topt), torch.randn(3, 4, generator=gen))
        _same_opt(opt, topt, f"step {step}")
        assert _paths(opt) == ({"flat"} if flat else {"per-tensor"}), opt.last_step
    if flat:
        key = lambda p: p.untyped_storage().data_ptr()
        assert key(m[0].weight) == key(m[2].weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_relayout_keeps_a_gradient_of_another_layout(layout, dtype):
    """A relayout (here: p.data replaced, so the parameter goes back into a flat buffer) does not
    copy a gradient of another memory layout into its flat view: torch's .grad keeps that
    layout, and what reads it later sees it (a norm sums in memory order; .view() may refuse).
    The step reads it where it is."""
    torch.manual_seed(12)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2)).to(dtype)
    t = copy.deepcopy(m)
    opt = momentum_cuda.SGD(m.parameters(), **H)
    topt = torch.optim.SGD(t.parameters(), foreach=False, **H)
    gen = torch.Generator().manual_seed(13)
    for step in range(3):
        x = torch.randn(2, 3, 4, 4, generator=gen).to(dtype)
        for mm, o in ((m, opt), (t, topt)):
            o.zero_grad()
            mm(x).float().square().sum().backward()
            if step == 1:
                w = mm[0].weight
                w.data = w.data.clone()
                g = torch.randn(w.shape, generator=torch.Generator().manual_seed(14)).to(dtype)
                w.grad = (g.contiguous(memory_format=torch.channels_last) if layout ==
                          "channels_last" else g.transpose(0, 1).contiguous().transpose(0, 1))
        strides = m[0].weight.grad.stride()
        opt.step()
        topt.step()
        assert m[0].weight.grad.stride() == t[0].weight.grad.stride() == strides, step
        _same_opt(opt, topt, f"step {step}")
        norms = [torch.nn.utils.get_total_norm([mm[0].weight.grad], 1.0) for mm in (m, t)]
        assert torch.equal(norms[0], norms[1]), step


@FLAT
def test_lazy_module_materialised_after_construction(flat):
    """nn.LazyLinear: the optimizer is built on uninitialised parameters (torch allows it);
    the first forward materialises them and the first step lays them out."""
    torch.manual_seed(12)
    m = nn.Sequential(nn.LazyLinear(5), nn.Tanh(), nn.Linear(5, 2))
    opt = momentum_cuda.SGD(m.parameters(), flat=flat, **H)
    gen = torch.Generator().manual_seed(13)
    x0 = torch.randn(3, 4, generator=gen)
    m(x0)  # materialise, then copy the materialised model for torch
    t = copy.deepcopy(m)
    topt = torch.optim.SGD(t.parameters(), foreach=False, **H)
    for step in range(3):
        _step_both((m, t), (opt, topt), torch.randn(3, 4, generator=gen))
        _same_opt(opt, topt, f"step {step}")
        assert _paths(opt) == ({"flat"} if flat else {"per-tensor"}), opt.last_step


@FLAT
@pytest.mark.parametrize("swap", [False, True], ids=["replace", "swap"])
def test_meta_parameters_then_to_empty(flat, swap):
    """An optimizer built on meta parameters (construction works, as torch's does), then
    model.to_empty(): by default Module._apply gives the module new Parameter objects (the
    optimizer's stay on meta, for torch too); with swap_module_params_on_conversion it swaps
    the data into the same objects, which are then laid out at the first step."""
    prev = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        models, opts = [], []
        for kind in ("ours", "torch"):
            with torch.device("meta"):
                m = _mlp(14)
            o = (momentum_cuda.SGD(m.parameters(), flat=flat, **H) if kind == "ours"
                 else torch.optim.SGD(m.parameters(), foreach=False, **H))
            m.to_empty(device="cpu")
            torch.manual_seed(15)
            for p in m.parameters():
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape))
            models.append(m)
            opts.append(o)
        gen = torch.Generator().manual_seed(16)
        for step in range(3):
            _step_both(models, opts, torch.randn(3, 4, generator=gen))
            for p, q in zip(models[0].parameters(), models[1].parameters()):
                assert torch.equal(p, q), step
            if swap:
                _same_opt(*opts, f"step {step}")
                assert _paths(opts[0]) == ({"flat"} if flat else {"per-tensor"})
            else:
                assert opts[0].last_step == []  # its parameters are the meta ones: no grads
    finally:
        torch.__future__.set_swap_module_params_on_conversion(prev)


def test_meta_parameters_step_with_torch_ops():
    """Gradients on meta parameters: torch steps them (meta ops); so does momentum_cuda."""
    p = nn.Parameter(torch.empty(5, device="meta"))
    opt = momentum_cuda.SGD([p], **H)
    p.grad = torch.empty(5, device="meta")
    with pytest.warns(UserWarning, match="meta"):
        opt.step()
    assert _paths(opt) == {"torch-ops"}
    assert opt.state[p]["momentum_buffer"].device.type == "meta"


def test_shared_memory_parameters_stay_shared():
    """model.share_memory() before the optimizer (Hogwild): the parameters must stay in shared
    memory, where other processes see them; they are not moved into a private flat buffer."""
    m = _mlp(17)
    m.share_memory()
    t = copy.deepcopy(m)
    opt = momentum_cuda.SGD(m.parameters(), **H)
    topt = torch.optim.SGD(t.parameters(), foreach=False, **H)
    gen = torch.Generator().manual_seed(18)
    for step in range(2):
        _step_both((m, t), (opt, topt), torch.randn(3, 4, generator=gen))
        _same_opt(opt, topt, f"step {step}")
        assert all(p.is_shared() for p in m.parameters())
        assert _paths(opt) == {"per-tensor"}


@FLAT
def test_strided_parameters_step_with_torch_ops(flat):
    """A parameter that is not dense in memory (a strided slice): torch's for-loop steps it,
    so does momentum_cuda, with torch's own ops (it was an error)."""
    opts, ps = [], []
    for kind in ("ours", "torch"):
        torch.manual_seed(19)
        a = nn.Parameter(torch.randn(6, 10)[:, ::3])
        b = nn.Parameter(torch.randn(5))
        o = (momentum_cuda.SGD([a, b], flat=flat, **H) if kind == "ours"
             else torch.optim.SGD([a, b], foreach=False, **H))
        opts.append(o)
        ps.append((a, b))
    assert not ps[0][0].is_contiguous()
    gen = torch.Generator().manual_seed(20)
    for step in range(3):
        w = torch.randn(2, generator=gen)
        for (a, b), o in zip(ps, opts):
            o.zero_grad()
            ((a * w[0]).sin().sum() + (b * w[1]).cos().sum()).backward()
        with pytest.warns(UserWarning, match="not dense") if step == 0 else warnings.catch_warnings():
            for o in opts:
                o.step()
        _same_opt(opts[0], opts[1], f"step {step}")
        assert "torch-ops" in _paths(opts[0]), opts[0].last_step


@FLAT
def test_optimizer_in_backward(flat):
    """torchtune's optimizer-in-backward: one optimizer per parameter, stepped and zeroed by a
    post-accumulate-grad hook while backward runs; model.zero_grad() (HF Trainer) between."""
    m = _mlp(21)
    t = copy.deepcopy(m)

    def setup(model, make):
        opts = {p: make([p]) for p in model.parameters()}

        def hook(p):
            opts[p].step()
            opts[p].zero_grad()
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(hook)
        return opts
    ours = setup(m, lambda ps: momentum_cuda.SGD(ps, flat=flat, **H))
    ref = setup(t, lambda ps: torch.optim.SGD(ps, foreach=False, **H))
    gen = torch.Generator().manual_seed(22)
    for step in range(4):
        x = torch.randn(3, 4, generator=gen)
        for mm in (m, t):
            mm.zero_grad()
            mm(x).square().sum().backward()
        for p, q in zip(m.parameters(), t.parameters()):
            _same_opt(ours[p], ref[q], f"step {step}")
        assert {e["path"] for o in ours.values() for e in o.last_step} == (
            {"flat"} if flat else {"per-tensor"})


def test_load_state_dict_after_model_to_dtype():
    """model.half() after a step, then load_state_dict before the next step: torch casts the
    loaded buffers to the parameters' new dtype; they must not be copied back into the old
    (bf16) flat buffer."""
    m, t, opt, topt, gen = _twins(23, dtype=torch.bfloat16)
    _step_both((m, t), (opt, topt), torch.randn(3, 4, generator=gen).bfloat16())
    for mm, o in ((m, opt), (t, topt)):
        mm.half()
        o.load_state_dict(copy.deepcopy(o.state_dict()))
    _same_opt(opt, topt, "after the load")
    for step in range(2):
        _step_both((m, t), (opt, topt), torch.randn(3, 4, generator=gen).half())
        _same_opt(opt, topt, f"step {step}")
        assert _paths(opt) == {"flat"}, opt.last_step


@FLAT
@pytest.mark.parametrize("how", ["set_", "data", "swap_tensors"])
def test_data_replaced_in_other_ways(flat, how):
    """p.set_(...) (under no_grad), p.data = ... and torch.utils.swap_tensors move a parameter
    out of its flat buffer: the group is laid out again, with torch's bits."""
    m, t, opt, topt, gen = _twins(25, flat)
    for step in range(4):
        if step == 2:
            new = torch.randn(m[0].weight.shape, generator=gen)
            for mm in (m, t):
                w = mm[0].weight
                if how == "set_":
                    with torch.no_grad():
                        w.set_(new.clone())
                elif how == "data":
                    w.data = new.clone()
                else:
                    torch.utils.swap_tensors(w, nn.Parameter(new.clone()))
        _step_both((m, t), (opt, topt), torch.randn(3, 4, generator=gen))
        _same_opt(opt, topt, f"step {step}")
        assert _paths(opt) == ({"flat"} if flat else {"per-tensor"}), opt.last_step


def test_without_storage_use_count(monkeypatch):
    """A torch without torch._C._storage_Use_Count: only a parameter that is exactly its own
    storage may move; a view of a bigger tensor stays in it (per-tensor path)."""
    from momentum_cuda import optim
    monkeypatch.setattr(optim, "_HAS_USE_COUNT", False)
    big = torch.randn(12)
    own, view = nn.Parameter(torch.randn(5)), nn.Parameter(big[2:9])
    opt = momentum_cuda.SGD([own, view], lr=0.1)
    key = lambda p: p.untyped_storage().data_ptr()
    assert key(view) == key(big) and key(own) != key(big)
    assert [p for b in list(opt._layouts.values())[0].buckets for p in b.params] == [own]
    opt.zero_grad()
    (own.sum() + 2 * view.sum()).backward()
    before = big.clone()
    opt.step()
    assert _paths(opt) == {"flat", "per-tensor"}
    assert torch.equal(big[2:9], before[2:9].add(torch.full((7,), 2.0), alpha=-0.1))


@FLAT
def test_loaded_state_dict_is_copied_or_kept_as_readme_says(flat):
    """README, Limits: with flat=True the buffers of the dict given to load_state_dict are
    copied into the flat buffers (the dict stays as it was); flat=False keeps its tensors as
    the live state, as torch does. The steps' bits are torch's either way."""
    m, t, opt, topt, gen = _twins(27, flat)
    _step_both((m, t), (opt, topt), torch.randn(3, 4, generator=gen))
    sd, tsd = copy.deepcopy(opt.state_dict()), copy.deepcopy(topt.state_dict())
    before = {k: v["momentum_buffer"].clone() for k, v in sd["state"].items()}
    opt.load_state_dict(sd)
    topt.load_state_dict(tsd)
    _step_both((m, t), (opt, topt), torch.randn(3, 4, generator=gen))
    _same_opt(opt, topt, "after the load")
    kept = [torch.equal(sd["state"][k]["momentum_buffer"], v) for k, v in before.items()]
    assert all(kept) if flat else not any(kept)
    assert not any(torch.equal(tsd["state"][k]["momentum_buffer"], v) for k, v in before.items())


def _relayout(how, mm):
    """What lays a flat group out again: a layer frozen at construction unfrozen, or another
    parameter's data replaced."""
    if how == "unfreeze":
        mm[0].requires_grad_(True)
    else:
        mm[0].bias.data = mm[0].bias.data * 0.5


@FLAT
@pytest.mark.parametrize("how", ["unfreeze", "data"])
def test_references_the_code_keeps_follow_a_relayout(flat, how):
    """torch's .grad (under zero_grad(set_to_none=False)) and momentum buffer stay one tensor
    each for as long as they exist, so training code may keep them: a list of gradients
    cached once and scaled through at every step, a buffer kept for logging, a tensor put into
    the state as the buffer. A relayout moves them into the new flat buffers with their
    identity kept: each stays .grad or the buffer, and writes through it reach the step, bit
    for bit as with torch, and the steps stay flat."""
    m, t, opt, topt, gen = _twins(21, flat, frozen=how == "unfreeze")
    kept = {}
    for step in range(5):
        x = torch.randn(3, 4, generator=gen)
        for mm, o, who in ((m, opt, "ours"), (t, topt, "torch")):
            if step == 0:  # a tensor of the code's own as the buffer (torch steps it in place)
                kept[who, "given"] = torch.full_like(mm[2].bias, 0.25)
                o.state[mm[2].bias]["momentum_buffer"] = kept[who, "given"]
            if step == 2:
                _relayout(how, mm)
            o.zero_grad(set_to_none=False)
            mm(x).square().sum().backward()
            if step == 1:
                kept[who, "grads"] = [p.grad for p in mm[2].parameters()]
            if step >= 1:
                for g in kept[who, "grads"]:
                    g.mul_(0.5)
            o.step()
            if step == 1:
                kept[who, "buf"] = o.state[mm[2].weight]["momentum_buffer"]
        _same_opt(opt, topt, f"{how}, step {step}")
        if step >= 1:
            assert all(a is p.grad for a, p in zip(kept["ours", "grads"], m[2].parameters()))
            assert opt.state[m[2].weight]["momentum_buffer"] is kept["ours", "buf"]
            assert torch.equal(kept["ours", "buf"], kept["torch", "buf"])
        assert opt.state[m[2].bias]["momentum_buffer"] is kept["ours", "given"]
        assert torch.equal(kept["ours", "given"], kept["torch", "given"])
        if step >= 3:  # moved into the new layout: one flat call
            assert _paths(opt) == ({"flat"} if flat else {"per-tensor"}), opt.last_step


@pytest.mark.parametrize("what", ["grad", "buffer"])
def test_a_relayout_leaves_what_someone_else_sees(what):
    """A gradient or momentum buffer of which the code holds a view (its memory seen from
    elsewhere) is not moved by a relayout: moving it would end the aliasing torch keeps. Its
    parameter takes the per-tensor path with it where it is; the view goes on seeing .grad (and
    writes through it reach the step) or the buffer, as with torch."""
    m, t, opt, topt, gen = _twins(23, frozen=True)
    views = {}
    for step in range(5):
        x = torch.randn(3, 4, generator=gen)
        for mm, o, who in ((m, opt, "ours"), (t, topt, "torch")):
            if step == 2:
                mm[0].requires_grad_(True)
            o.zero_grad(set_to_none=False)
            mm(x).square().sum().backward()
            if what == "grad" and step >= 1:
                if step == 1:
                    views[who] = mm[2].weight.grad.view(-1)
                views[who][::2] = 0.0  # through the view: the step must see it
            o.step()
            if what == "buffer" and step == 1:
                views[who] = o.state[mm[2].weight]["momentum_buffer"].view(-1)[:7]
        _same_opt(opt, topt, f"{what}, step {step}")
        if step >= 1:
            assert torch.equal(views["ours"], views["torch"]), f"{what}, step {step}"
        if step == 2:  # (later, a gradient held apart is read in place: a lent bucket)
            assert _paths(opt) == {"flat", "per-tensor"}, opt.last_step
        if what == "grad" and step >= 1:
            assert views["ours"].data_ptr() == m[2].weight.grad.data_ptr()


@pytest.mark.parametrize("how", ["view of a grad", "view of a buffer"])
def test_a_relayout_keeps_a_gradient_that_is_a_view_of_another(how):
    """A parameter's .grad made a view of another parameter's flat gradient (or momentum
    buffer) view: its memory is in the optimizer's own storage, but it overlaps another step
    tensor, so a relayout (the step finds the gradient elsewhere and lays the group out again)
    leaves both where they are. With zero_grad(set_to_none=False) torch's later backward
    passes accumulate into the shared memory, and so do these."""
    m, t, opt, topt, gen = _twins(31)
    for step in range(7):
        x = torch.randn(3, 4, generator=gen)
        for mm, o in ((m, opt), (t, topt)):
            o.zero_grad(set_to_none=False)
            mm(x).square().sum().backward()
            if step == 3:
                src = (mm[2].weight.grad if how == "view of a grad"
                       else o.state[mm[2].weight]["momentum_buffer"])
                mm[0].bias.grad = src[1]
            o.step()
        _same_opt(opt, topt, f"{how}, step {step}")
        if step >= 3:
            ours = m[0].bias.grad.data_ptr()
            src = (m[2].weight.grad if how == "view of a grad"
                   else opt.state[m[2].weight]["momentum_buffer"])
            assert ours == src[1].data_ptr(), f"step {step}: the view no longer shares"
