"""The steady-state step (optim._FusedMomentum._step_steady): once a flat step has run with
every group wholly laid out, later steps replay it after checking that nothing it depends on
changed. Every edit training code can make between two such steps must send the step back to
the full planning (or be one the replay reads anyway), bitwise against a torch twin. Each case
first checks that the replay is live when the edit is made, so a check missing from the replay
shows up here as a difference."""
import contextlib

import pytest
import torch

import momentum_cuda
from momentum_cuda.reference import MomentumReference

from conftest import (Lender, assert_twins, backward_grads, forbid_planning, fresh_grads,
                      make_values, no_host_reads, twin_params, write_grads)

SIZES = [1, 3, 97, 16, 5, 33]  # two groups of three
UNUSED = [4, 9]  # (the "-unused" layouts) parameters 6 and 7, in the middle of each group
STEPS, EDIT_AT = 6, 3


def _buf(opt, p):
    return opt.state[p]["momentum_buffer"]


def _new_param(opt, ps, seed):
    """Adds a group with one new parameter (the same values on both sides)."""
    v = make_values([7], torch.float32, seed)[0]
    p = v.clone().requires_grad_()
    ps.append(p)
    opt.add_param_group({"params": [p], "lr": 0.03})


# edit name -> (optimizers it applies to, edit(opt, params, side)); `side` is 0 for ours and
# 1 for torch's, where an edit needs a new object per side; param_groups[-1] is the second
# group of two, the only one of one
EDITS = {
    "lr-new": ("sgd ema", lambda o, ps, s: o.param_groups[0].__setitem__(
        "lr", o.param_groups[0]["lr"] * 0.5)),
    "lr-equal-value": ("sgd ema", lambda o, ps, s: o.param_groups[-1].__setitem__(
        "lr", float(repr(o.param_groups[-1]["lr"])))),
    "momentum": ("sgd ema", lambda o, ps, s: o.param_groups[-1].__setitem__("momentum", 0.5)),
    "momentum-zero": ("sgd", lambda o, ps, s: o.param_groups[0].__setitem__("momentum", 0)),
    "dampening": ("sgd", lambda o, ps, s: o.param_groups[0].__setitem__("dampening", 0.25)),
    "weight-decay": ("sgd ema", lambda o, ps, s: o.param_groups[-1].__setitem__(
        "weight_decay", 0.1)),
    "nesterov": ("sgd", lambda o, ps, s: o.param_groups[-1].__setitem__("nesterov", True)),
    "maximize": ("sgd ema", lambda o, ps, s: o.param_groups[0].__setitem__("maximize", True)),
    "params-pop": ("sgd ema", lambda o, ps, s: o.param_groups[0]["params"].pop()),
    "params-append": ("sgd ema", lambda o, ps, s: o.param_groups[0]["params"].append(
        o.param_groups[-1]["params"].pop())),
    "params-reorder": ("sgd ema", lambda o, ps, s: o.param_groups[-1]["params"].reverse()),
    "params-new-list": ("sgd ema", lambda o, ps, s: o.param_groups[0].__setitem__(
        "params", list(o.param_groups[0]["params"][::-1]))),
    "grad-none": ("sgd ema", lambda o, ps, s: setattr(ps[2], "grad", None)),
    "grad-assigned": ("sgd ema", lambda o, ps, s: setattr(ps[4], "grad", ps[4].grad.clone())),
    "grad-data": ("sgd ema", lambda o, ps, s: setattr(ps[1].grad, "data",
                                                       ps[1].grad.data.clone())),
    "buffer-clone": ("sgd ema", lambda o, ps, s: o.state[ps[3]].__setitem__(
        "momentum_buffer", _buf(o, ps[3]).clone())),
    "buffer-none": ("sgd ema", lambda o, ps, s: o.state[ps[0]].__setitem__(
        "momentum_buffer", None)),
    "buffer-deleted": ("sgd ema", lambda o, ps, s: o.state[ps[5]].pop("momentum_buffer")),
    "state-dropped": ("sgd ema", lambda o, ps, s: o.state.pop(ps[1])),
    "buffer-written": ("sgd ema", lambda o, ps, s: _buf(o, ps[2]).mul_(0.5)),
    "param-moved": ("sgd ema", lambda o, ps, s: setattr(ps[3], "data", ps[3].data.clone())),
    "param-written": ("sgd ema", lambda o, ps, s: ps[5].data.add_(1.0)),
    "group-added": ("sgd ema", lambda o, ps, s: _new_param(o, ps, 7)),
    "group-deleted": ("sgd ema", lambda o, ps, s: o.param_groups.pop(0)),
    "groups-swapped": ("sgd ema", lambda o, ps, s: o.param_groups.reverse()),
    "load-state-dict": ("sgd ema", lambda o, ps, s: o.load_state_dict(o.state_dict())),
    "zero-grad-keep": ("sgd ema", lambda o, ps, s: o.zero_grad(set_to_none=False)),
}


def _twins(kind, flat, n_groups=2, frozen=(), unused=False):
    """(ours, torch's, our optimizer, torch's) over SIZES, in two groups or one (one bucket,
    or one list call, whose replay runs check, op and bumps in one C++ call); the
    parameters at the indices `frozen` frozen before the optimizers are made. unused: two
    parameters of UNUSED sizes more, at the end of the lists (6 and 7) but in the middle of
    the groups ([0, 6, 1, 2], [3, 4, 7, 5]): an unused branch, which no gradient reaches."""
    ours, ref = twin_params(make_values(SIZES + (UNUSED if unused else []), torch.float32, 0))
    for i in frozen:
        ours[i].requires_grad_(False)
        ref[i].requires_grad_(False)
    order = [0, 6, 1, 2, 3, 4, 7, 5] if unused else list(range(len(SIZES)))
    if n_groups == 1:
        groups = lambda ps: [{"params": [ps[i] for i in order]}]  # noqa: E731
    else:
        groups = lambda ps: [{"params": [ps[i] for i in order[:len(order) // 2]]},  # noqa: E731
                             {"params": [ps[i] for i in order[len(order) // 2:]], "lr": 0.02}]
    if kind == "sgd":
        h = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
        return (ours, ref, momentum_cuda.SGD(groups(ours), flat=flat, **h),
                torch.optim.SGD(groups(ref), foreach=False, **h))
    h = dict(lr=0.05, momentum=0.8, weight_decay=1e-2)
    return (ours, ref, momentum_cuda.Momentum(groups(ours), flat=flat, **h),
            MomentumReference(groups(ref), **h))


CASES = [(kind, name) for name, (kinds, _) in EDITS.items() for kind in kinds.split()]

# how the gradients reach our parameters, flat=True: "backward" into the flat views the hooks
# attach (a bucket's flat call); "assigned", p.grad = g (the buckets stepped by list calls);
# "lent", DDP's bucket views (gradient_as_bucket_view=True: the lent bucket's list call);
# "-unused": the parameters of an unused branch in the middle of each group get none (each
# bucket stepped in part: a flat call per run; DDP's find_unused_parameters)
LAYOUTS = [(True, "backward"), (False, "backward"), (True, "assigned"), (True, "lent"),
           (True, "backward-unused"), (False, "backward-unused"), (True, "lent-unused")]
LAYOUT_IDS = ["flat", "pertensor", "flat-assigned", "flat-lent", "flat-unused",
              "pertensor-unused", "flat-lent-unused"]


class _Deliver:
    """Gives our parameters and torch's twins `grads` after zero_grad() as `how` says
    (LAYOUTS): assigned to both, or through backward (which accumulates into a parameter the
    optimizers no longer hold) and then, on ours, DDP's bucket views."""

    def __init__(self, how, ours, ref):
        self.how, self.used = how.removesuffix("-unused"), len(SIZES)
        self.ours, self.ref = ours, ref
        self.lend = Lender(ours) if self.how == "lent" else None

    def __call__(self, opt, topt, grads):
        grads = grads[:self.used]  # (an unused branch's parameters get none)
        if self.how == "assigned":
            for o, ps in ((opt, self.ours), (topt, self.ref)):
                o.zero_grad()
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
            return
        write_grads(opt, self.ours[:self.used], grads)  # zero_grad(), backward(): the flat
        write_grads(topt, self.ref[:self.used], grads)  # views come back
        if self.lend is not None:
            self.lend()


@pytest.mark.parametrize("n_groups", [2, 1], ids=["2groups", "1group"])
@pytest.mark.parametrize("flat,how", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("kind,edit", CASES, ids=[f"{k}-{e}" for k, e in CASES])
def test_edit_between_steady_steps(kind, edit, flat, how, n_groups):
    ours, ref, opt, topt = _twins(kind, flat, n_groups, unused=how.endswith("-unused"))
    deliver = _Deliver(how, ours, ref)
    gen = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        deliver(opt, topt, fresh_grads(ours, gen))
        if step == EDIT_AT:
            assert opt._steady is not None, "the replay is live before the edit"
            # one flat bucket's call or one list call (the per-tensor path, the assigned
            # gradients): the one-call replay (BucketCheck.replay, ListCheck.replay) is the
            # one live; not for DDP's lent buckets (a list call over their spans)
            assert (opt._steady[4] is not None) == (n_groups == 1 and how in (
                "backward", "backward-unused", "assigned"))
            for side, (o, ps) in enumerate(((opt, ours), (topt, ref))):
                EDITS[edit][1](o, ps, side)
        opt.step()
        topt.step()
        assert_twins(ours, ref, opt, topt, f"{kind} {edit} step {step + 1}")


def _no_op(*args, **kw):
    raise AssertionError("the bucket's op ran: not the one-call replay")


@pytest.mark.parametrize("n_groups", [2, 1], ids=["2groups", "1group"])
@pytest.mark.parametrize("flat,how", LAYOUTS, ids=LAYOUT_IDS)
def test_the_training_loop_replays(flat, how, n_groups, monkeypatch):
    """zero_grad(), backward, step(): from the third step on no planning runs (the replay),
    the bits stay torch's and each parameter's version moves by one a step, as the op's in-place
    write moves it. With one group, flat (one bucket), the replay is BucketCheck.replay (check,
    kernel and version bumps in one C++ call): the bucket's op does not run either. So with
    the gradients assigned (the flat buckets' parameters stepped by list calls) or DDP's bucket
    views (the lent bucket's list call), or with an unused branch in each group (each bucket
    stepped in part: one flat call over its runs of parameters with a gradient; the unused
    ones keep their version)."""
    unused = how.endswith("-unused")
    ours, ref, opt, topt = _twins("sgd", flat, n_groups, unused=unused)
    deliver = _Deliver(how, ours, ref)
    gen = torch.Generator().manual_seed(2)
    path = "flat" if flat and how != "assigned" else "per-tensor"
    # last_step's entries: one call per group (a bucket stepped in part: one flat call over
    # its runs; DDP's views: the lent bucket holds the parameters with a gradient)
    calls = n_groups
    for step in range(5):
        if step == 2:
            forbid_planning(monkeypatch, opt)
            if flat and n_groups == 1 and how in ("backward", "backward-unused"):
                monkeypatch.setattr(opt._steady[2][0].b, "op", _no_op)
        versions = [p._version for p in ours]
        deliver(opt, topt, fresh_grads(ours, gen))
        opt.step()
        topt.step()
        assert_twins(ours, ref, opt, topt, f"step {step + 1}")
        assert [e["path"] for e in opt.last_step] == [path] * calls
        assert [p._version for p in ours] == [v + (i < len(SIZES))
                                              for i, v in enumerate(versions)]


@pytest.mark.parametrize("n_groups", [2, 1], ids=["2groups", "1group"])
@pytest.mark.parametrize("first", ["assigned", "lent"])
def test_gradients_back_in_the_flat_views_step_flat_again(first, n_groups, monkeypatch):
    """Gradients assigned (or DDP's bucket views) for four steps, replayed from the third;
    then backward into the flat views again (zero_grad, backward): the replay of the list
    calls stops (a flat view is back: _Apart; the lent bucket's views are gone: laid out
    again), the steps are flat calls over our own buckets from the first such step, replayed
    again later. Torch's bits throughout."""
    ours, ref, opt, topt = _twins("sgd", True, n_groups)
    gen = torch.Generator().manual_seed(9)
    deliver, back = _Deliver(first, ours, ref), _Deliver("backward", ours, ref)
    for step in range(9):
        if step in (2, 3, 7, 8):
            forbid_planning(monkeypatch, opt)
        else:
            monkeypatch.undo()
        (deliver if step < 4 else back)(opt, topt, fresh_grads(ours, gen))
        opt.step()
        topt.step()
        assert_twins(ours, ref, opt, topt, f"step {step + 1}")
        flat = step >= 4 or first == "lent"
        assert [e["path"] for e in opt.last_step] == ["flat" if flat else "per-tensor"] * n_groups
    assert not any(b.lent for lay in opt._layouts.values() for b in lay.buckets)


@pytest.mark.parametrize("n_groups", [2, 1], ids=["2groups", "1group"])
def test_a_gradient_appears_outside_the_bucket(n_groups):
    """A parameter frozen while its group was laid out stays outside the flat bucket; the
    replay checks it still has no gradient (its idle check, before the one-call replay too):
    when it is unfrozen and a backward gives it one, the step is planned and it takes torch's
    step."""
    ours, ref, opt, topt = _twins("sgd", True, n_groups, frozen=[5])
    gen = torch.Generator().manual_seed(6)
    for step in range(6):
        grads = fresh_grads(ours, gen)
        if step == 4:
            assert opt._steady is not None and (opt._steady[4] is not None) == (n_groups == 1)
            for ps in (ours, ref):
                ps[5].requires_grad_(True)
        with_grad = [i for i, p in enumerate(ours) if p.requires_grad]
        for o, ps in ((opt, ours), (topt, ref)):
            o.zero_grad()
            backward_grads([ps[i] for i in with_grad], [grads[i] for i in with_grad])
        opt.step()
        topt.step()
        assert_twins(ours, ref, opt, topt, f"step {step + 1}")


@pytest.mark.parametrize("n_groups", [2, 1], ids=["2groups", "1group"])
def test_a_gradient_appears_in_a_bucket_stepped_apart(n_groups):
    """flat=True with gradients assigned to all parameters but one (its bucket stepped by list
    calls, replayed from the second step); from the fifth step that one has a gradient too:
    the replay checks it still had none (its idle check), so the step is planned and steps
    it, with torch's bits."""
    ours, ref, opt, topt = _twins("sgd", True, n_groups)
    gen = torch.Generator().manual_seed(12)
    for step in range(7):
        grads = fresh_grads(ours, gen)
        if step == 4:
            assert opt._steady is not None, "the replay is live before the gradient appears"
        for o, ps in ((opt, ours), (topt, ref)):
            o.zero_grad()
            for i, (p, g) in enumerate(zip(ps, grads)):
                if i != 1 or step >= 4:
                    p.grad = g.clone()
        opt.step()
        topt.step()
        assert_twins(ours, ref, opt, topt, f"step {step + 1}")


@pytest.mark.parametrize("n_groups", [2, 1], ids=["2groups", "1group"])
@pytest.mark.parametrize("how", ["backward", "lent"])
def test_a_gradient_reaches_the_unused_branch(how, n_groups, monkeypatch):
    """flat=True with an unused branch in the middle of each group (each bucket stepped in
    part, replayed from the third step); at the fifth step the branch is used, its parameters
    get gradients: the replay checks they still had none (the idle check), so the step is
    planned and steps them, with torch's bits; unused again from the seventh, replayed again
    from the ninth."""
    ours, ref, opt, topt = _twins("sgd", True, n_groups, unused=True)
    deliver = _Deliver(how + "-unused", ours, ref)
    lend = Lender(ours) if how == "lent" else None
    gen = torch.Generator().manual_seed(14)
    for step in range(10):
        if step in (2, 3, 8, 9):
            forbid_planning(monkeypatch, opt)
        else:
            monkeypatch.undo()
        grads = fresh_grads(ours, gen)
        if step in (4, 5):
            write_grads(opt, ours, grads)
            write_grads(topt, ref, grads)
            if lend is not None:
                lend()
        else:
            deliver(opt, topt, grads)
        opt.step()
        topt.step()
        assert_twins(ours, ref, opt, topt, f"step {step + 1}")


# hyper-parameters in tensors: (kind, {name: (dtype, device-read)}): the tensors the kernels
# read are filled in place at every step and replayed; a tensor read on the host (bf16: of
# another dtype; Momentum's momentum) keeps every step planned
TENSOR_CASES = {
    "sgd-all": ("sgd", {"lr": torch.float32, "momentum": torch.float32,
                        "dampening": torch.float64, "weight_decay": torch.float64}),
    "sgd-lr-bf16": ("sgd", {"lr": torch.bfloat16}),
    "ema-lr-wd": ("ema", {"lr": torch.float32, "weight_decay": torch.float64}),
    "ema-momentum": ("ema", {"lr": torch.float32, "momentum": torch.float32}),
}


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_tensor_hyper_parameters_filled_in_place_replay(monkeypatch, case, flat):
    """Hyper-parameters in tensors that the kernels read (fp32/fp64 on the parameters'
    device), filled in place at every step (a zero weight_decay and momentum among the
    values): from the third step on the step replays, no planning and no host read, with the
    bits of torch's optimizer given the values (parameters, gradients, buffers). A tensor read
    on the host (a bf16 lr; Momentum's momentum, which it checks) is planned at every step,
    with the same bits; so is a step after the group is given a new tensor object."""
    kind, dtypes = TENSOR_CASES[case]
    ours, ref, opt, topt = _twins(kind, flat)
    replays = not any(dt is torch.bfloat16 for dt in dtypes.values()) and not (
        kind == "ema" and "momentum" in dtypes)
    gen = torch.Generator().manual_seed(31)

    def values(k):
        v = {"lr": 0.05 * 0.9 ** k, "weight_decay": 0.0 if k == 3 else 1e-2,
             "dampening": 0.1 + 0.01 * k}
        v["momentum"] = (0.8 - 0.01 * k if kind == "ema" else 0.0 if k == 4 else 0.9 - 0.01 * k)
        return {n: v[n] for n in dtypes}

    for g in opt.param_groups:
        g.update({n: torch.tensor(x, dtype=dtypes[n]) for n, x in values(0).items()})
    for step in range(7):
        if step == 5:  # a new object: planned once, then replayed again
            opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"].clone()
        for g, tg in zip(opt.param_groups, topt.param_groups):
            for n, x in values(step).items():
                g[n].fill_(x)
                tg[n] = float(g[n])
        if replays and step in (2, 3, 4, 6):
            forbid_planning(monkeypatch, opt)
        else:
            monkeypatch.undo()
        write_grads(opt, ours, fresh_grads(ours, gen))
        write_grads(topt, ref, [p.grad.clone() for p in ours])
        with no_host_reads() if replays and step >= 2 else contextlib.nullcontext():
            opt.step()
        topt.step()
        assert_twins(ours, ref, opt, topt, f"{case} step {step + 1}")
    assert (opt._steady is not None) == replays


@pytest.mark.parametrize("how", ["backward", "assigned", "lent", "backward-unused"])
def test_gradscaler_steps_replay(monkeypatch, how):
    """Under GradScaler (the kernels unscale and skip an overflowed step): from the third step
    on no planning runs, overflowed steps included, and the bits stay those of GradScaler with
    torch.optim.SGD(foreach=False); so with our gradients assigned after backward (p.grad = a
    copy), DDP's bucket views or an unused branch (LAYOUTS)."""
    ours, ref, opt, topt = _twins("sgd", True, unused=how.endswith("-unused"))
    lend = Lender(ours) if how == "lent" else None
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
               for _ in range(2)]
    gen = torch.Generator().manual_seed(4)
    for step in range(7):
        if step == 2:
            forbid_planning(monkeypatch, opt)
        grads = fresh_grads(ours, gen)
        if step in (3, 4):  # two overflows in a row
            grads[step].view(-1)[0] = float("inf")
        for o, ps, sc in ((opt, ours, scalers[0]), (topt, ref, scalers[1])):
            o.zero_grad()
            sc.scale(torch.stack([(p * g).sum() for p, g in zip(ps[:len(SIZES)], grads)])
                     .sum()).backward()
            if o is opt and how == "assigned":
                for p in ps:
                    p.grad = p.grad.clone()
            elif o is opt and lend is not None:
                lend()
            sc.step(o)
            sc.update()
        assert_twins(ours, ref, opt, topt, f"step {step + 1}")
        assert scalers[0].get_scale() == scalers[1].get_scale()
