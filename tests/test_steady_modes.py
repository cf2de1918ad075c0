"""The replay of per-tensor list calls (optim._ListCall, replayed by _step_steady) for the modes
of issue 14 (master weights bf16 and fp16, stochastic rounding, momentum_dtype int8 and bf16)
and the plain per-tensor path: under every edit training code can make between two steps, an
optimizer that replays gives the bits (parameters, gradients, the whole state) of a twin that
plans every step. The planned step is held to each mode's reference elsewhere
(test_master_weights, test_stochastic_rounding, test_momentum_dtype, test_fp16_master,
test_master_sequences); this file holds the replay to the planned step. Each case first checks
that the replay is live when the edit is made."""
import contextlib
import copy

import pytest
import torch

import momentum_cuda

from conftest import (bits, forbid_planning, fresh_grads, make_values, no_host_reads,
                      twin_params, write_grads)

STEPS, EDIT_AT = 6, 3

# config -> (optimizer class, parameter dtypes, group options)
BF, F16, F32 = torch.bfloat16, torch.float16, torch.float32
CONFIGS = {
    "int8": (momentum_cuda.SGD, [F32] * 4, dict(momentum_dtype=torch.int8)),
    "bf16mom": (momentum_cuda.SGD, [F32] * 4, dict(momentum_dtype=torch.bfloat16)),
    "master": (momentum_cuda.SGD, [BF] * 4, dict(master_weights=True)),
    "master16": (momentum_cuda.SGD, [F16] * 4, dict(master_weights=True)),
    "sr": (momentum_cuda.SGD, [BF] * 4, dict(stochastic_rounding=True, sr_seed=5)),
    # a master group with bf16, fp16 and fp32 (flat, or plain per-tensor) parameters
    "mixed": (momentum_cuda.SGD, [BF, F16, F32, BF], dict(master_weights=True)),
    "ema-int8": (momentum_cuda.Momentum, [F32] * 4, dict(momentum_dtype=torch.int8)),
    "ema-master": (momentum_cuda.Momentum, [BF] * 4, dict(master_weights=True)),
    "plain": (momentum_cuda.SGD, [F32] * 4, {}),
}
SHAPES = [(300,), (5, 7), (1,), (97,)]  # 300: two int8 blocks, the second partial


def _make(config, flat, values):
    cls, _, opts = CONFIGS[config]
    hyper = dict(lr=0.05, momentum=0.8, weight_decay=1e-2)
    if cls is momentum_cuda.SGD:
        hyper.update(dampening=0.1)
    ps = [v.clone().requires_grad_() for v in values]
    groups = [{"params": ps[:2]}, {"params": ps[2:], "lr": 0.02}]
    return ps, cls(groups, flat=flat, **hyper, **opts)


def _twins(config, flat):
    """(ours, its optimizer, the planning twin's parameters, its optimizer): the twin never
    replays."""
    dtypes = CONFIGS[config][1]
    values = [make_values([s], d, 10 + i)[0] for i, (s, d) in enumerate(zip(SHAPES, dtypes))]
    ours, opt = _make(config, flat, values)
    ref, topt = _make(config, flat, values)
    topt._step_steady = lambda amp: False
    return ours, opt, ref, topt


def _state_bits(opt, p):
    st = opt.state.get(p, {})
    return {k: (bits(v) if isinstance(v, torch.Tensor) else v) for k, v in st.items()}


def assert_same_steps(ours, opt, ref, topt, what):
    """Parameters, gradient presence and bits, every state entry (tensors bitwise), masters and
    last_step: the replaying optimizer and the planning twin alike."""
    for i, (p, q) in enumerate(zip(ours, ref)):
        assert torch.equal(bits(p), bits(q)), f"{what}: parameter {i}"
        assert (p.grad is None) == (q.grad is None), f"{what}: gradient presence {i}"
        if p.grad is not None:
            assert torch.equal(bits(p.grad), bits(q.grad)), f"{what}: gradient {i}"
        a, b = _state_bits(opt, p), _state_bits(topt, q)
        assert a.keys() == b.keys(), f"{what}: state keys {i}"
        for k in a:
            assert (torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]), \
                f"{what}: state {k!r} of {i}"
        group = opt._group_of(p)
        if group is not None and opt._master(group, p):
            assert torch.equal(bits(opt.master_weight(p)), bits(topt.master_weight(q))), \
                f"{what}: master {i}"
    assert opt.last_step == topt.last_step, f"{what}: last_step"


def _st(o, ps, i, key):
    return o.state[ps[i]][key]


def _replace(o, ps, i, key):
    st = o.state[ps[i]]
    if key in st:
        st[key] = st[key].clone()


def _strided_grad(o, ps, i):
    g = ps[i].grad
    if g is not None and g.dim() == 2:  # the same values, transposed in memory
        ps[i].grad = g.t().contiguous().t()


def _torch_clip_unused(o, ps, s):
    """torch's clip_grad_norm_ in place, with a parameter left without a gradient."""
    ps[1].grad = None
    torch.nn.utils.clip_grad_norm_(ps, 0.5)


def _new_group(o, ps, s):
    p = make_values([(9,)], ps[0].dtype, 77)[0].requires_grad_()
    ps.append(p)
    o.add_param_group({"params": [p], "lr": 0.03})


# edit name -> edit(opt, params, side); side is 0 for ours and 1 for the twin
EDITS = {
    "none": lambda o, ps, s: None,
    "lr-new": lambda o, ps, s: o.param_groups[0].__setitem__("lr", 0.025),
    "momentum": lambda o, ps, s: o.param_groups[1].__setitem__("momentum", 0.5),
    "momentum-zero": lambda o, ps, s: (o.param_groups[0].__setitem__("momentum", 0)
                                       if isinstance(o, momentum_cuda.SGD) else None),
    "weight-decay": lambda o, ps, s: o.param_groups[1].__setitem__("weight_decay", 0.1),
    "maximize": lambda o, ps, s: o.param_groups[0].__setitem__("maximize", True),
    "momentum-dtype-bf16": lambda o, ps, s: o.param_groups[0].__setitem__(
        "momentum_dtype", torch.bfloat16),
    "momentum-dtype-off": lambda o, ps, s: o.param_groups[1].pop("momentum_dtype", None),
    "master-off": lambda o, ps, s: o.param_groups[0].__setitem__("master_weights", False),
    "sr-seed": lambda o, ps, s: o.param_groups[1].__setitem__("sr_seed", 9),
    "sr-step": lambda o, ps, s: (o.state[ps[2]].__setitem__("sr_step", 40)
                                 if "sr_step" in o.state[ps[2]] else None),
    "params-pop": lambda o, ps, s: o.param_groups[1]["params"].pop(),
    "params-reorder": lambda o, ps, s: o.param_groups[0]["params"].reverse(),
    "params-move-group": lambda o, ps, s: o.param_groups[0]["params"].append(
        o.param_groups[1]["params"].pop()),
    "group-added": _new_group,
    "groups-swapped": lambda o, ps, s: o.param_groups.reverse(),
    "grad-none": lambda o, ps, s: setattr(ps[2], "grad", None),
    "grad-assigned": lambda o, ps, s: setattr(ps[0], "grad", ps[0].grad.clone()),
    "grad-strided": lambda o, ps, s: _strided_grad(o, ps, 1),
    "param-written": lambda o, ps, s: ps[3].data.add_(1.0),
    "param-copied": lambda o, ps, s: ps[0].detach().copy_(ps[0].detach() * 2),
    "param-moved": lambda o, ps, s: setattr(ps[1], "data", ps[1].data.clone()),
    "buffer-clone": lambda o, ps, s: _replace(o, ps, 3, "momentum_buffer"),
    "buffer-written": lambda o, ps, s: _st(o, ps, 0, "momentum_buffer").zero_(),
    "scales-clone": lambda o, ps, s: _replace(o, ps, 0, "momentum_scales"),
    "remainder-clone": lambda o, ps, s: _replace(o, ps, 2, "master_remainder"),
    "ties-clone": lambda o, ps, s: _replace(o, ps, 2, "master_ties"),
    "master-clone": lambda o, ps, s: _replace(o, ps, 1, "master_weight"),
    "state-dropped": lambda o, ps, s: o.state.pop(ps[1]),
    "load-state-dict": lambda o, ps, s: o.load_state_dict(o.state_dict()),
    "state-dict-taken": lambda o, ps, s: o.state_dict(),
    "deepcopy": lambda o, ps, s: copy.deepcopy(o),
    "torch-clip-unused": _torch_clip_unused,
    "opt-clip": lambda o, ps, s: o.clip_grad_norm_(0.5),
    "zero-grad-keep": lambda o, ps, s: o.zero_grad(set_to_none=False),
}


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_edit_between_replayed_steps(config, edit, flat):
    ours, opt, ref, topt = _twins(config, flat)
    gen = torch.Generator().manual_seed(3)
    for step in range(STEPS):
        grads = fresh_grads(ours, gen)
        edited = step == EDIT_AT
        if edited:
            assert opt._steady is not None, "the replay is live before the edit"
            assert (config == "plain" and flat) or any(
                e["path"] != "flat" for e in opt.last_step), "a list call is kept"
        for side, (o, ps) in enumerate(((opt, ours), (topt, ref))):
            write_grads(o, ps, grads)
            if edited:
                EDITS[edit](o, ps, side)
        opt.step()
        topt.step()
        assert_same_steps(ours, opt, ref, topt, f"{config} {edit} step {step + 1}")


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_the_training_loop_replays_list_calls(config, flat, monkeypatch):
    """zero_grad(), backward, step(): from the third step on no planning runs, and the bits
    stay the planning twin's."""
    ours, opt, ref, topt = _twins(config, flat)
    gen = torch.Generator().manual_seed(4)
    for step in range(5):
        if step == 2:
            forbid_planning(monkeypatch, opt)
        grads = fresh_grads(ours, gen)
        for o, ps in ((opt, ours), (topt, ref)):
            write_grads(o, ps, grads)
            o.step()
        assert_same_steps(ours, opt, ref, topt, f"{config} step {step + 1}")


def test_a_write_between_replayed_steps_restarts_the_master():
    """The version counter the replay watches: a parameter written between two replayed steps
    restarts its master from the written value (its fp32 master becomes exactly the bf16
    value), as a planned step does, and the next steps replay again."""
    ours, opt, ref, topt = _twins("master", False)
    gen = torch.Generator().manual_seed(6)
    for step in range(6):
        grads = fresh_grads(ours, gen)
        for o, ps in ((opt, ours), (topt, ref)):
            write_grads(o, ps, grads)
            if step == 3:
                ps[0].data.copy_(torch.full_like(ps[0], 0.5))
        if step == 3:
            assert opt._steady is not None
            assert not torch.equal(opt.master_weight(ours[0]), ours[0].detach().float())
        opt.step()
        topt.step()
        assert_same_steps(ours, opt, ref, topt, f"step {step + 1}")
    assert opt._steady is not None


def test_sparse_gradient_after_replayed_steps():
    """A sparse gradient where the kept call had a dense one: planned (torch's ops), as the
    twin does."""
    values = make_values([(6, 4)], F32, 1)
    ours, ref = twin_params(values)
    opt = momentum_cuda.SGD(ours, lr=0.1, momentum=0.9, flat=False)
    topt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, foreach=False)
    gen = torch.Generator().manual_seed(7)
    for step in range(5):
        for o, ps in ((opt, ours), (topt, ref)):
            o.zero_grad()
        g = fresh_grads(ours, gen)[0]
        if step == 3:
            assert opt._steady is not None
            g = g.to_sparse()
        ours[0].grad, ref[0].grad = g.clone(), g.clone()
        with pytest.warns(UserWarning) if step == 3 else _nothing():
            opt.step()
        topt.step()
        assert torch.equal(bits(ours[0]), bits(ref[0])), f"step {step + 1}"
        assert torch.equal(bits(opt.state[ours[0]]["momentum_buffer"]),
                           bits(topt.state[ref[0]]["momentum_buffer"])), f"step {step + 1}"


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_a_gradient_appears_after_replayed_steps(config, flat):
    """A parameter without a gradient during the replayed steps (frozen for a while) gets one:
    planned (its first step), as the twin."""
    ours, opt, ref, topt = _twins(config, flat)
    gen = torch.Generator().manual_seed(8)
    for step in range(6):
        grads = fresh_grads(ours, gen)
        for o, ps in ((opt, ours), (topt, ref)):
            write_grads(o, ps, grads)
            if step < 4:
                ps[3].grad = None
        if step == 4:  # (a flat bucket with a parameter left out is not replayed)
            assert (opt._steady is not None) or (config == "plain" and flat)
        opt.step()
        topt.step()
        assert_same_steps(ours, opt, ref, topt, f"{config} step {step + 1}")


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_gradscaler_with_replayed_list_calls(config, flat, monkeypatch):
    """GradScaler hands the step its scale and found_inf: the kept calls replay with them from
    the third step on: the plain per-tensor calls unscale and skip in their kernels; the
    master, fp16 master and momentum_dtype calls unscale their gradients with torch's op, as
    GradScaler.unscale_, and skip in their kernels. No host read from the second step on, on
    either side (the planning twin's calls make no state then, so they skip on the device
    too); stochastic rounding counts its steps on the host, so it reads found_inf there and
    its steps under GradScaler are planned. Overflows on two steps in a row; bits and
    last_step the planning twin's."""
    ours, opt, ref, topt = _twins(config, flat)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
               for _ in range(2)]
    gen = torch.Generator().manual_seed(9)
    plan = opt._plan
    for step in range(7):
        grads = fresh_grads(ours, gen)
        if step in (3, 4):
            grads[1].view(-1)[0] = float("inf")
        if step >= 2 and config != "sr":
            forbid_planning(monkeypatch, opt)
        for o, ps, sc in ((opt, ours, scalers[0]), (topt, ref, scalers[1])):
            o.zero_grad()
            loss = torch.stack([(p * g).sum().float() for p, g in zip(ps, grads)]).sum()
            sc.scale(loss).backward()
            with no_host_reads() if step >= 1 and config != "sr" else contextlib.nullcontext():
                sc.step(o)
            sc.update()
        monkeypatch.setattr(opt, "_plan", plan)
        assert_same_steps(ours, opt, ref, topt, f"{config} step {step + 1}")
        assert scalers[0].get_scale() == scalers[1].get_scale()
