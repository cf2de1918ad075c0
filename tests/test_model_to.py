"""Training code that changes the model after the optimizer exists: model.to(dtype),
model.half(), model.to(memory_format=channels_last). torch.optim.SGD(foreach=False) keeps
going (its momentum buffers keep their old dtype or layout; its in-place ops cast); so must
momentum_cuda, with the same bits: parameters, buffers, gradient presence, state_dict, after
every step, flat=True and flat=False."""
import copy
import warnings

import pytest
import torch

import momentum_cuda
from momentum_cuda.reference import (bf16_join, bf16_split, pack_ties,
                                     sgd_fp16_master_reference_step, sgd_master_reference_step,
                                     sgd_sr_reference_step, sr_key, unpack_ties)

from conftest import bits

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


# the modes whose state lies in the parameter's memory order: (parameter dtype, keywords)
MODES = {"master": (torch.bfloat16, dict(master_weights=True)),
         "fp16-master": (torch.float16, dict(master_weights=True)),
         "sr": (torch.bfloat16, dict(stochastic_rounding=True, sr_seed=5))}


class _ModeTwin:
    """A conv weight's steps in a mode, by momentum_cuda.reference: its state starts as the
    mode's first step makes it; relaid() is what model.to(memory_format=...) does to the
    contract: the parameter and the momentum buffer keep their values on the new layout, and
    a master restarts from the parameter (it moved: remainder and tie bits zero)."""

    def __init__(self, mode, p):
        self.mode, self.p, self.buf, self.steps = mode, p.detach().clone(), None, 0
        self.restart()

    def restart(self):
        p = self.p
        self.rem = torch.zeros_like(p, dtype=torch.int16)
        self.ties = torch.zeros((p.numel() + 7) // 8, dtype=torch.uint8)
        self.master = p.float()

    def bf16_master(self):
        """The bf16 mode's master: the parameter joined with its remainder and tie bits."""
        return bf16_join(self.p, self.rem, unpack_ties(self.ties, self.p))

    def relaid(self, fmt):
        self.p = self.p.contiguous(memory_format=fmt)
        if self.buf is not None:
            self.buf = torch.empty_like(self.p, dtype=self.buf.dtype).copy_(self.buf)
        self.restart()

    def step(self, g, h):
        self.steps += 1
        if self.mode == "master":
            (self.buf,) = sgd_master_reference_step([self.p], [g], [self.buf], [self.rem],
                                                    [self.ties], **h)
        elif self.mode == "fp16-master":
            (self.buf,) = sgd_fp16_master_reference_step([self.p], [g], [self.buf],
                                                         [self.master], **h)
        else:
            (self.buf,) = sgd_sr_reference_step([self.p], [g], [self.buf],
                                                [sr_key(5, self.steps, 0)], **h)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("mode", list(MODES))
def test_modes_after_model_to_channels_last(mode, flat):
    """model.to(memory_format=channels_last) after steps of master weights (bf16, fp16) or
    stochastic rounding: the momentum buffer is laid out again with its values (it was
    refused by the ops before: a step that raised), the master restarts (the parameter
    moved), and stochastic rounding draws its bits in the new memory order: the bits of the
    mode's reference (momentum_cuda.reference) on the new layout, buffer laid out like the
    parameter."""
    dtype, kw = MODES[mode]
    h = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(41)
    conv = torch.nn.Conv2d(3, 4, 3, bias=False).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
    p = conv.weight
    opt = momentum_cuda.SGD(conv.parameters(), flat=flat, **h, **kw)
    twin = _ModeTwin(mode, p)
    for k in range(5):
        if k == 2:
            conv.to(memory_format=torch.channels_last)
            twin.relaid(torch.channels_last)
            assert p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
        g = torch.randn(p.shape, generator=gen).to(dtype).contiguous(
            memory_format=torch.channels_last if k >= 2 else torch.contiguous_format)
        opt.zero_grad()
        p.grad = g.clone()
        opt.step()
        twin.step(g, h)
        buf = opt.state[p]["momentum_buffer"]
        assert torch.equal(bits(p.detach()), bits(twin.p)), f"step {k + 1}: parameter"
        assert buf.stride() == p.stride(), f"step {k + 1}: buffer layout"
        assert torch.equal(bits(buf), bits(twin.buf)), f"step {k + 1}: momentum buffer"


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_stochastic_rounding_after_model_half_raises_before_writing(flat):
    """model.half() after steps of a stochastic-rounding group: its parameters are fp16, which
    it does not round to, and the step refuses it as the constructor does, with nothing
    written (flat=False too, whose group is not laid out again: checked at every planned
    step; the step before was replayed)."""
    torch.manual_seed(43)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)).bfloat16()
    opt = momentum_cuda.SGD(model.parameters(), lr=0.1, momentum=0.9, flat=flat,
                            stochastic_rounding=True)
    x = torch.randn(3, 5)
    for _ in range(3):
        opt.zero_grad()
        model(x.bfloat16()).float().square().sum().backward()
        opt.step()
    assert opt._steady is not None
    model.half()
    opt.zero_grad()
    model(x.half()).float().square().sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    state = {(i, k): v.clone() for i, p in enumerate(model.parameters())
             for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"stochastic_rounding=True rounds to bfloat16; a "
                                         r"float16 parameter \(parameter of shape"):
        opt.step()
    assert all(torch.equal(bits(p.detach()), bits(b)) for p, b in zip(model.parameters(), before))
    ps = list(model.parameters())
    assert state and all(torch.equal(bits(opt.state[ps[i]][k]), bits(v))
                         for (i, k), v in state.items())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_masters_loaded_from_another_memory_layout(dtype):
    """A checkpoint of a channels_last model loaded into a contiguous one (model first, then
    optimizer): the masters' state (bf16: remainders, and tie bits packed in their memory
    order; fp16: the fp32 masters) and the momentum buffers come in channels_last. The masters
    are the loaded ones (opt.master_weight), and the steps are torch.optim.SGD's on them in
    fp32: the state is laid out again with its values (it restarted from the bf16 values, or
    raised in the op, before). Half of the bf16 masters sit on halfway points, so the tie
    bits count."""
    gen = torch.Generator().manual_seed(47)
    cl = torch.channels_last
    conv = torch.nn.Conv2d(3, 4, 3, bias=False).to(dtype)
    p = conv.weight
    h = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt = momentum_cuda.SGD(conv.parameters(), **h, master_weights=True)
    p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    opt.step()  # (its state exists: the checkpoint's keys)
    master = torch.randn(p.shape, generator=gen).contiguous(memory_format=cl)
    if dtype is torch.bfloat16:  # low 16 bits 0x8000 on every other element: halfway points
        u = master.view(torch.int32)
        u[..., ::2] = (u[..., ::2] & ~0xFFFF) | 0x8000
    buf = torch.randn(p.shape, generator=gen).contiguous(memory_format=cl)
    sd = opt.state_dict()
    st = sd["state"][0]
    st["momentum_buffer"] = buf.clone()
    with torch.no_grad():
        if dtype is torch.bfloat16:
            value, rem, tie = bf16_split(master)
            assert tie.any() and rem.stride() == master.stride()
            st["master_remainder"], st["master_ties"] = rem, pack_ties(tie)
        else:
            value = master.to(dtype)
            st["master_weight"] = master.clone()
        p.copy_(value)  # the model's checkpoint, loaded first
    opt.load_state_dict(sd)
    assert p.is_contiguous() and not opt.state[p]["momentum_buffer"].is_contiguous()
    assert torch.equal(bits(opt.master_weight(p)), bits(master)), "the loaded master"
    twin = master.clone().contiguous().requires_grad_()
    topt = torch.optim.SGD([twin], foreach=False, **h)
    topt.state[twin]["momentum_buffer"] = buf.clone()
    for k in range(3):
        g = torch.randn(p.shape, generator=gen).to(dtype)
        p.grad, twin.grad = g.clone(), g.float()
        opt.step()
        topt.step()
        assert torch.equal(bits(opt.master_weight(p)), bits(twin.detach())), f"step {k + 1}"
        assert torch.equal(bits(p.detach()), bits(twin.detach().to(dtype))), f"step {k + 1}"
        assert torch.equal(opt.state[p]["momentum_buffer"], topt.state[twin]["momentum_buffer"])
        assert opt.state[p]["momentum_buffer"].stride() == p.stride()


H = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)


def _bf16_master_linear(flat, seed):
    """(a bf16 Linear of fresh random weights, master_weights=True over it with H, its weight's
    _ModeTwin, the generator for what follows)."""
    gen = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(7, 5, bias=False).bfloat16()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen))
    opt = momentum_cuda.SGD(lin.parameters(), flat=flat, master_weights=True, **H)
    return lin, opt, _ModeTwin("master", lin.weight), gen


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_master_weights_across_model_half_and_bfloat16(flat):
    """model.half() and model.bfloat16() between steps of master weights: each dtype change
    moves the parameter, so its master restarts from it in the new mode (bf16: remainder and
    tie bits; fp16: an fp32 master) while the fp32 momentum buffer keeps its values; the state
    holds only the current mode's entries (the other mode's would be stale), and the steps
    are the modes' references' (momentum_cuda.reference) on the converted parameter."""
    lin, opt, twin, gen = _bf16_master_linear(flat, 43)
    p = lin.weight
    keys = {"master": {"momentum_buffer", "master_remainder", "master_ties"},
            "fp16-master": {"momentum_buffer", "master_weight"}}
    for k, mode in enumerate(["master"] * 2 + ["fp16-master"] * 2 + ["master"] * 2
                             + ["fp16-master"] * 2):
        dtype = MODES[mode][0]
        if p.dtype != dtype:
            lin.to(dtype)
            twin.mode, twin.p = mode, twin.p.to(dtype)
            twin.restart()
        g = torch.randn(p.shape, generator=gen).to(dtype)
        opt.zero_grad()
        p.grad = g.clone()
        opt.step()
        twin.step(g, H)
        assert torch.equal(bits(p.detach()), bits(twin.p)), f"step {k + 1}: parameter"
        assert torch.equal(bits(opt.state[p]["momentum_buffer"]), bits(twin.buf)), \
            f"step {k + 1}: momentum buffer"
        if mode == "master":
            assert torch.equal(opt.master_weight(p), twin.bf16_master()), f"step {k + 1}: master"
        else:
            assert torch.equal(opt.master_weight(p), twin.master), f"step {k + 1}: master"
        assert set(opt.state[p]) == keys[mode], f"step {k + 1}: state keys"
        assert set(opt.state_dict()["state"][0]) == keys[mode], f"step {k + 1}: state_dict"


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("change", ["model-float", "flag-off"])
def test_master_state_goes_with_master_weights(change, flat):
    """Steps of bf16 master weights, then the parameter leaves the mode (model.float(), or the
    group's master_weights turned off): the steps after it are torch.optim.SGD(foreach=False)'s
    on the parameter as it is with the fp32 momentum buffer kept (flag-off: a bf16 parameter
    and an fp32 buffer, mixed as torch mixes them), and the master's state entries go; turned
    on again, the master restarts from the parameter."""
    lin, opt, twin, gen = _bf16_master_linear(flat, 47)
    p = lin.weight
    for _ in range(2):
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        p.grad = g.clone()
        opt.step()
        twin.step(g, H)
    if change == "model-float":
        lin.float()
    else:
        opt.param_groups[0]["master_weights"] = False
    q = torch.nn.Parameter(twin.p.to(p.dtype))
    topt = torch.optim.SGD([q], foreach=False, **H)
    topt.state[q]["momentum_buffer"] = twin.buf.clone()
    for k in range(2):
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        p.grad, q.grad = g.clone(), g.clone()
        with warnings.catch_warnings():  # flag-off: the dtypes mix on torch's ops, as said
            warnings.simplefilter("ignore")
            opt.step()
        topt.step()
        assert torch.equal(bits(p.detach()), bits(q.detach())), f"step {k + 3}: parameter"
        assert torch.equal(bits(opt.state[p]["momentum_buffer"]),
                           bits(topt.state[q]["momentum_buffer"])), f"step {k + 3}: buffer"
        assert set(opt.state[p]) == {"momentum_buffer"}, f"step {k + 3}: state keys"
    if change == "flag-off":
        opt.param_groups[0]["master_weights"] = True
        twin.p, twin.buf = q.detach().clone(), topt.state[q]["momentum_buffer"].clone()
        twin.restart()
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        p.grad = g.clone()
        opt.step()
        twin.step(g, H)
        assert torch.equal(bits(p.detach()), bits(twin.p)), "master again: parameter"
        assert torch.equal(opt.master_weight(p), twin.bf16_master())
