"""Memory the training code makes the step's tensors share: a momentum buffer that is a gradient,
another parameter's buffer or a parameter; a gradient that is another parameter, another
parameter's gradient or a buffer; a buffer given new memory through .data or set_. torch's
for-loop steps the parameters one after the other, each reading what the one before wrote; a
kernel that steps them all at once would read other values. momentum_cuda steps such a group with
torch's own ops in torch's order (path "torch-ops"), or steps the tensors where they now are,
and never raises where torch steps, nor leaves anything written by a step that raised.

Each case edits a model and its twin (stepped by torch.optim.SGD(foreach=False)) alike, then
compares parameters, gradients and their presence, buffers and the state_dict bit for bit after
every step, flat and per-tensor."""
import copy

import pytest
import torch
from torch import nn

import momentum_cuda

H = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
FLAT = pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])


def _same(m, t, opt, topt, what):
    for (n, p), q in zip(m.named_parameters(), t.parameters()):
        assert torch.equal(p.detach(), q.detach()), f"{what}: {n}"
        assert (p.grad is None) == (q.grad is None), f"{what}: {n}.grad presence"
        assert p.grad is None or torch.equal(p.grad, q.grad), f"{what}: {n}.grad"
        b = opt.state[p].get("momentum_buffer") if p in opt.state else None
        c = topt.state[q].get("momentum_buffer") if q in topt.state else None
        assert (b is None) == (c is None), f"{what}: {n} buffer presence"
        assert b is None or torch.equal(b, c), f"{what}: {n} buffer"
    sd, tsd = opt.state_dict()["state"], topt.state_dict()["state"]
    assert sd.keys() == tsd.keys(), what
    for k, st in tsd.items():
        assert all(torch.equal(sd[k][n], v) for n, v in st.items()), f"{what}: state {k}"


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))


def _twins(seed, flat):
    """A model and its copy, stepped by momentum_cuda.SGD and torch.optim.SGD, and a generator
    for their inputs."""
    m = _model(seed)
    t = copy.deepcopy(m)
    return (m, t, momentum_cuda.SGD(m.parameters(), flat=flat, **H),
            torch.optim.SGD(t.parameters(), foreach=False, **H),
            torch.Generator().manual_seed(seed + 1))


def _buf(opt, p):
    return opt.state[p]["momentum_buffer"]


# name -> (edit(model, opt), whether it is made again after every backward: a gradient edit)
EDITS = {
    "buffer-is-its-grad": (lambda m, o: o.state[m[0].bias].update(
        momentum_buffer=m[0].bias.grad), False),
    "buffer-is-a-param": (lambda m, o: o.state[m[2].bias].update(
        momentum_buffer=m[0].bias.data), False),
    "buffer-shared": (lambda m, o: o.state[m[0].weight].update(
        momentum_buffer=_buf(o, m[2].weight)), False),
    "buffer-overlaps": (lambda m, o: o.state[m[0].bias].update(
        momentum_buffer=_buf(o, m[2].weight)[1]), False),
    "buffer-data": (lambda m, o: setattr(_buf(o, m[2].weight), "data",
                                         _buf(o, m[2].weight).data.clone()), False),
    "buffer-set": (lambda m, o: _buf(o, m[0].bias).set_(_buf(o, m[0].bias).clone()), False),
    "grad-is-a-param": (lambda m, o: setattr(m[0].weight, "grad", m[2].weight.detach()), True),
    "grad-is-its-buffer": (lambda m, o: setattr(m[2].bias, "grad", _buf(o, m[2].bias)), True),
    "grad-shared": (lambda m, o: setattr(m[0].weight, "grad", m[2].weight.grad), True),
    "grad-in-a-param": (lambda m, o: setattr(m[0].bias, "grad", m[2].weight.detach()[3]), True),
}


@FLAT
@pytest.mark.parametrize("set_to_none", [True, False], ids=["none", "zero"])
@pytest.mark.parametrize("edit", list(EDITS))
def test_shared_memory_steps_as_torch(flat, set_to_none, edit):
    if flat and set_to_none and edit == "buffer-is-its-grad":
        pytest.skip("README, Limits: a .grad kept across zero_grad() (here by the state) reads "
                    "the flat gradient buffer's -0.0 refill")
    fn, each_step = EDITS[edit]
    m, t, opt, topt, gen = _twins(3, flat)
    for step in range(6):
        x = torch.randn(3, 5, generator=gen)
        for mm, o in ((m, opt), (t, topt)):
            o.zero_grad(set_to_none=set_to_none)
            mm(x).square().sum().backward()
            if step == 2 or (each_step and step > 2):
                fn(mm, o)
            o.step()
        _same(m, t, opt, topt, f"{edit}, step {step}")
        if step == 2 and edit not in ("buffer-data", "buffer-set"):  # (stepped in place)
            assert "torch-ops" in {e["path"] for e in opt.last_step}, opt.last_step


@FLAT
def test_a_checkpoint_sharing_one_buffer(flat):
    """A state_dict whose entries for two parameters are one tensor (saved that way, or edited):
    torch keeps them one tensor after load_state_dict, and so the steps here."""
    m, t, opt, topt, gen = _twins(5, flat)
    shared = torch.randn(5, 5, generator=gen)
    for step in range(5):
        x = torch.randn(3, 5, generator=gen)
        for mm, o in ((m, opt), (t, topt)):
            o.zero_grad()
            mm(x).square().sum().backward()
            if step == 1:
                sd = copy.deepcopy(topt.state_dict())
                one = shared.clone()
                sd["state"][0]["momentum_buffer"] = sd["state"][2]["momentum_buffer"] = one
                o.load_state_dict(sd)
            o.step()
        _same(m, t, opt, topt, f"step {step}")


@FLAT
@pytest.mark.parametrize("edit", ["buffer-is-its-grad", "grad-is-a-param", "grad-shared"])
def test_replayed_steps_meet_shared_memory(flat, edit):
    """The steady replay (steps after the first two keep their plan) checks the gradients it
    reads: memory shared from one step to the next is planned again, as torch steps it."""
    fn, each_step = EDITS[edit]
    m, t, opt, topt, gen = _twins(7, flat)
    for step in range(8):
        x = torch.randn(3, 5, generator=gen)
        for mm, o in ((m, opt), (t, topt)):
            o.zero_grad()
            mm(x).square().sum().backward()
            for p in mm.parameters():  # gradients of their own, assigned (the per-tensor path)
                p.grad = p.grad.clone()
            if step in (4, 6) or (each_step and step in (5, 7)):
                fn(mm, o)
            o.step()
        _same(m, t, opt, topt, f"{edit}, step {step}")


@FLAT
@pytest.mark.parametrize("mode", ["scaler", "clip", "unscale+clip"])
@pytest.mark.parametrize("source", ["grad", "buffer"])
def test_gradient_shared_across_groups_under_amp_and_clip(flat, mode, source):
    """A parameter of the second group given as .grad a view of the first group's gradient or
    momentum buffer, after steps that went steady: torch's GradScaler unscales (and the clip
    multiplies) every group's gradients before any group is stepped, so the shared elements are
    multiplied twice, and the first group steps with them so. Here too: the unscale and clip go
    first, on the host, over every group (planned again, a replay included)."""
    torch.manual_seed(41)
    a, b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(4))
    ta, tb = copy.deepcopy(a), copy.deepcopy(b)
    opt = momentum_cuda.SGD([{"params": [a]}, {"params": [b]}], flat=flat, **H)
    topt = torch.optim.SGD([{"params": [ta]}, {"params": [tb]}], foreach=False, **H)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2)]
    for k in range(7):
        x = torch.randn(5, 4, generator=torch.Generator().manual_seed(k))
        for A, B, o, sc, ours in ((a, b, opt, scalers[0], True),
                                  (ta, tb, topt, scalers[1], False)):
            o.zero_grad()
            loss = (torch.tanh(x @ A.t()).sum(1) ** 2).mean() + (x @ B).pow(2).mean()
            (sc.scale(loss) if mode != "clip" else loss).backward()
            if k >= 4:
                B.grad = (A.grad if source == "grad" else o.state[A]["momentum_buffer"])[1]
            if mode == "unscale+clip":
                sc.unscale_(o)
            if mode != "scaler":
                if ours:
                    o.clip_grad_norm_(0.05)
                else:
                    torch.nn.utils.clip_grad_norm_([A, B], 0.05, foreach=False)
            if mode == "clip":
                o.step()
            else:
                sc.step(o)
                sc.update()
        for p, q in ((a, ta), (b, tb)):
            assert torch.equal(p, q), f"{mode}, step {k}"
            assert torch.equal(opt.state[p]["momentum_buffer"],
                               topt.state[q]["momentum_buffer"]), f"{mode}, step {k}: buffer"
