"""Training code that changes the model after the optimizer exists: model.to(dtype),
model.half(), model.to(memory_format=channels_last). torch.optim.SGD(foreach=False) keeps
going (its momentum buffers keep their old dtype or layout; its in-place ops cast); so must
momentum_cuda, with the same bits: parameters, buffers, gradient presence, state_dict, after
every step, flat=True and flat=False."""
import copy

import pytest
import torch

import momentum_cuda

H = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)


def _model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 5 * 5, 3))


def _train(model, twin, opt, topt, steps, gen):
    dtype = next(model.parameters()).dtype
    fmt = (torch.channels_last if model[0].weight.is_contiguous(
        memory_format=torch.channels_last) and not model[0].weight.is_contiguous()
        else torch.contiguous_format)
    for _ in range(steps):
        x = torch.randn(2, 3, 7, 7, generator=gen).to(dtype).contiguous(memory_format=fmt)
        for m, o in ((model, opt), (twin, topt)):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            assert p.dtype == q.dtype and p.stride() == q.stride(), name
            assert torch.equal(p, q), name
            assert (p.grad is None) == (q.grad is None), name
            b, c = opt.state[p].get("momentum_buffer"), topt.state[q].get("momentum_buffer")
            assert (b is None) == (c is None), name
            assert b is None or (b.dtype == c.dtype and torch.equal(b, c)), name
    sd, tsd = opt.state_dict(), topt.state_dict()
    # foreach is the one key that differs by construction (the twin is built foreach=False)
    strip = lambda groups: [{k: v for k, v in g.items() if k != "foreach"} for g in groups]
    assert strip(sd["param_groups"]) == strip(tsd["param_groups"])
    assert sd["state"].keys() == tsd["state"].keys()
    for k, st in tsd["state"].items():
        assert sd["state"][k].keys() == st.keys(), k
        assert all(torch.equal(sd["state"][k][n], v) for n, v in st.items()), k


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("change", ["double", "half", "bfloat16", "channels_last"])
def test_model_changed_after_steps(flat, change):
    model = _model(0)
    twin = copy.deepcopy(model)
    opt = momentum_cuda.SGD(model.parameters(), flat=flat, **H)
    topt = torch.optim.SGD(twin.parameters(), foreach=False, **H)
    gen = torch.Generator().manual_seed(1)
    _train(model, twin, opt, topt, 2, gen)
    for m in (model, twin):
        if change == "channels_last":
            m.to(memory_format=torch.channels_last)
        else:
            getattr(m, change)()
    with pytest.warns(UserWarning, match="torch's own ops"):
        _train(model, twin, opt, topt, 3, gen)
    paths = {e["path"] for e in opt.last_step}
    # a dtype change reaches every parameter; channels_last only the conv weight
    assert paths == {"torch-ops"} if change != "channels_last" else "torch-ops" in paths


def test_buffer_on_another_device_still_raises_before_writing():
    """A buffer on another device is not torch's case (its in-place ops fail part-way): the
    step raises first. Simulated with a meta-device buffer, which no kernel can read."""
    p = torch.nn.Parameter(torch.randn(5))
    opt = momentum_cuda.SGD([p], **H)
    p.grad = torch.randn(5)
    opt.step()
    opt.state[p]["momentum_buffer"] = torch.empty(5, device="meta")
    before = p.detach().clone()
    p.grad = torch.randn(5)
    with pytest.raises(RuntimeError, match="momentum_buffer"):
        opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_group_laid_out_again_after_model_double(flat):
    """model.double() after steps, then a parameter added to the group by hand: the group is
    laid out again in fp64, and the fp32 momentum buffers must stay fp32, as torch keeps them."""
    model = _model(0)
    twin = copy.deepcopy(model)
    opt = momentum_cuda.SGD(model.parameters(), flat=flat, **H)
    topt = torch.optim.SGD(twin.parameters(), foreach=False, **H)
    gen = torch.Generator().manual_seed(2)
    _train(model, twin, opt, topt, 2, gen)
    model.double()
    twin.double()
    for m, o in ((model, opt), (twin, topt)):
        m.extra = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
        o.param_groups[0]["params"].append(m.extra)
    with pytest.warns(UserWarning, match="torch's own ops"):
        _train(model, twin, opt, topt, 2, gen)
