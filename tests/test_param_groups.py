"""Param-group edits between steps, as training code makes them, bitwise against a torch twin
(torch.optim.SGD(foreach=False)) after every step: deleting, reordering and adding groups,
changing a group's parameter list by hand, load_state_dict. The flat layout is kept with each
group's identity, not its position, so an edit can never pair a group with another's buffers
or hyper-parameters; a removed group's parameters are no longer touched, as with torch."""
import pytest
import torch

import momentum_cuda

H = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)


def _params(k, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3 + 5 * i, generator=g)) for i in range(k)]


class Twins:
    """momentum_cuda and torch optimizers over equal copies of the same parameters."""

    def __init__(self, flat, groups_of_sizes=(2, 2, 2)):
        self.ours = _params(sum(groups_of_sizes), 0)
        self.ref = [torch.nn.Parameter(p.detach().clone()) for p in self.ours]
        self.gen = torch.Generator().manual_seed(1)
        cut, go, gr = 0, [], []
        for j, n in enumerate(groups_of_sizes):
            go.append({"params": self.ours[cut:cut + n], "lr": 0.05 * (j + 1)})
            gr.append({"params": self.ref[cut:cut + n], "lr": 0.05 * (j + 1)})
            cut += n
        self.opt = momentum_cuda.SGD(go, flat=flat, **H)
        self.topt = torch.optim.SGD(gr, foreach=False, **H)

    def step(self, n=1):
        for _ in range(n):
            for o in (self.opt, self.topt):
                o.zero_grad()
            for p, q in zip(self.ours, self.ref):
                g = torch.randn(p.shape, generator=self.gen)
                (p * g).sum().backward()
                (q * g).sum().backward()
            self.opt.step()
            self.topt.step()
            self.check()

    def check(self):
        for i, (p, q) in enumerate(zip(self.ours, self.ref)):
            assert torch.equal(p, q), f"param {i}"
            assert (p.grad is None) == (q.grad is None), f"grad presence {i}"
            b = self.opt.state[p].get("momentum_buffer") if p in self.opt.state else None
            c = self.topt.state[q].get("momentum_buffer") if q in self.topt.state else None
            assert (b is None) == (c is None) and (b is None or torch.equal(b, c)), f"buf {i}"


@pytest.fixture(params=[True, False], ids=["flat", "pertensor"])
def flat(request):
    return request.param


def test_delete_first_group(flat):
    t = Twins(flat)
    t.step(2)
    del t.opt.param_groups[0]
    del t.topt.param_groups[0]
    t.step(3)


def test_delete_then_add_group(flat):
    t = Twins(flat)
    t.step(2)
    del t.opt.param_groups[1]
    del t.topt.param_groups[1]
    extra = _params(2, 7)
    t.ours += extra
    t.ref += [torch.nn.Parameter(p.detach().clone()) for p in extra]
    t.opt.add_param_group({"params": extra, "lr": 0.3, "momentum": 0.5})
    t.topt.add_param_group({"params": t.ref[-2:], "lr": 0.3, "momentum": 0.5})
    t.step(3)


def test_reorder_groups(flat):
    t = Twins(flat)
    t.step(2)
    t.opt.param_groups.reverse()
    t.topt.param_groups.reverse()
    t.step(2)


def test_parameter_appended_to_a_group_by_hand(flat):
    t = Twins(flat)
    t.step(2)
    extra = _params(1, 9)[0]
    t.ours.append(extra)
    t.ref.append(torch.nn.Parameter(extra.detach().clone()))
    t.opt.param_groups[0]["params"].append(extra)
    t.topt.param_groups[0]["params"].append(t.ref[-1])
    t.step(3)
    if flat:  # the group was laid out again: its step is one flat call once more
        assert [e["path"] for e in t.opt.last_step].count("flat") == 3


def test_load_state_dict_keeps_flat_and_backend(flat):
    t = Twins(flat)
    t.step(2)
    t.opt.load_state_dict(t.opt.state_dict())
    assert t.opt._flat is flat and t.opt._requested_backend is None
    opt = momentum_cuda.SGD(_params(2, 3), lr=0.1, flat=flat, backend="cpu")
    opt.load_state_dict(opt.state_dict())
    assert opt._flat is flat and opt._requested_backend == "cpu"
    t.step(2)
    assert {e["path"] for e in t.opt.last_step} == {"flat" if flat else "per-tensor"}
