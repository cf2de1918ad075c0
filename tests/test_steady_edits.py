"""Edits between steps that keep a tensor's memory where it was, made after the step has gone
steady (planned once, then replayed): an in-place transpose or reshape of a gradient or a
momentum buffer, `p.data` given another view of its own memory, `.grad.data` given a view of
another dtype, a negative view or a ZeroTensor as gradient or buffer. The check before a replay
compares addresses, so each of these keeps it; the kernels would read the memory as the layout
placed it. Each must give torch.optim.SGD(foreach=False)'s bits (a twin edited alike), or raise
where torch's step raises, with nothing written; flat and per-tensor, both zero_grad forms.

And a replayed step bumps what it wrote, the momentum buffers included: a graph that saved a
buffer before step() cannot backpropagate after it, as with torch."""
import copy

import pytest
import torch

import momentum_cuda

H = dict(lr=0.05, momentum=0.9, weight_decay=0.01)
FLAT = pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
ZERO = pytest.mark.parametrize("set_to_none", [True, False], ids=["none", "zeros"])


def _twins(flat, n=4):
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(n, n, generator=gen))
    b = torch.nn.Parameter(torch.randn(n, generator=gen))
    tw, tb = copy.deepcopy(w), copy.deepcopy(b)
    return ([w, b], [tw, tb], momentum_cuda.SGD([w, b], flat=flat, **H),
            torch.optim.SGD([tw, tb], foreach=False, **H))


def _backward(ps, k):
    x = torch.randn(8, ps[0].shape[1], generator=torch.Generator().manual_seed(k))
    (torch.tanh(x @ ps[0].t() + ps[1]) ** 2).sum().backward()


def _same(ps, qs, opt, topt, what):
    for i, (p, q) in enumerate(zip(ps, qs)):
        assert torch.equal(p, q), f"{what}: param {i}"
        assert (p.grad is None) == (q.grad is None), f"{what}: grad {i} presence"
        assert p.grad is None or torch.equal(p.grad, q.grad), f"{what}: grad {i}"
        a = opt.state.get(p, {}).get("momentum_buffer")
        c = topt.state.get(q, {}).get("momentum_buffer")
        assert (a is None) == (c is None), f"{what}: buffer {i} presence"
        assert a is None or torch.equal(a, c), f"{what}: buffer {i}"


def _buf(o, p):
    return o.state[p]["momentum_buffer"]


# edit(params, optimizer) after backward at step 4; raises: torch's step raises then
EDITS = {
    "grad t_()": (lambda P, O: P[0].grad.t_(), None),
    "buffer t_()": (lambda P, O: _buf(O, P[0]).t_(), None),
    "p.data transposed": (lambda P, O: setattr(P[0], "data", P[0].data.t()), None),
    "grad.data int32 view": (
        lambda P, O: setattr(P[1].grad, "data", P[1].grad.data.view(torch.int32)), None),
    "grad unsqueeze_": (lambda P, O: P[1].grad.unsqueeze_(0), RuntimeError),
    "p.data reshaped": (lambda P, O: setattr(P[0], "data", P[0].data.view(16)), RuntimeError),
    "grad neg view": (lambda P, O: setattr(P[0], "grad", torch._neg_view(P[0].grad.clone())),
                      None),
    "buffer neg view": (lambda P, O: O.state[P[0]].update(
        momentum_buffer=torch._neg_view(_buf(O, P[0]).neg())), None),
    "grad ZeroTensor": (lambda P, O: setattr(P[0], "grad",
                                             torch._efficientzerotensor(P[0].shape)), None),
    "buffer ZeroTensor": (lambda P, O: O.state[P[0]].update(
        momentum_buffer=torch._efficientzerotensor(P[0].shape)), RuntimeError),
}


@FLAT
@ZERO
@pytest.mark.parametrize("edit", list(EDITS))
def test_edit_after_steady_steps(flat, set_to_none, edit):
    """EDITS[edit] after four steps (the step replays by then), on both twins: the steps after
    give torch's bits, or where torch's step raises this one raises too, nothing written."""
    change, raises = EDITS[edit]
    ps, qs, opt, topt = _twins(flat)
    for k in range(7):
        for P, O in ((ps, opt), (qs, topt)):
            # (after the edit, gradients start again: a ZeroTensor or int32 one cannot be
            # zeroed nor accumulated into, for torch's optimizer too)
            O.zero_grad(set_to_none=set_to_none or k == 5)
            _backward(P, k)
            if k == 4:
                change(P, O)
        if k == 4 and raises is not None:
            with pytest.raises(raises):
                topt.step()
            before = [p.detach().clone() for p in ps]
            bufs = [_buf(opt, p).clone() for p in ps]
            with pytest.raises(raises):
                opt.step()
            assert all(torch.equal(a, p) for a, p in zip(before, ps)), "written"
            assert all(torch.equal(a, _buf(opt, p)) for a, p in zip(bufs, ps)), "written"
            return
        opt.step()
        topt.step()
        _same(ps, qs, opt, topt, f"{edit}, step {k}")


@FLAT
def test_replayed_step_bumps_the_buffers(flat):
    """A graph that saved a momentum buffer, then step(), then backward: torch's in-place update
    of the buffer makes autograd raise; so does every step here, planned or replayed."""
    ps, qs, opt, topt = _twins(flat)
    for k in range(6):
        for P, O in ((ps, opt), (qs, topt)):
            O.zero_grad()
            _backward(P, k)
            aux = (P[1] * _buf(O, P[1])).sum() if P[1] in O.state else None
            O.step()
            if aux is not None:
                with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                    aux.backward()
        _same(ps, qs, opt, topt, f"step {k}")
