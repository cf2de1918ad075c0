"""torch.amp.GradScaler in the step (_step_supports_amp_scaling): GradScaler hands the optimizer
grad_scale and found_inf, and the ops unscale the gradients in place and skip an overflowed
step themselves. Compared bitwise, every step, with the same GradScaler driving
torch.optim.SGD(foreach=False) (or MomentumReference), which takes GradScaler's own path
(unscale_, a host sync on found_inf, no step): parameters, gradients (bit patterns: they hold
NaN and inf after an overflow), momentum buffers and their presence, and the scale. Overflows
on step 1 (the state must stay "never stepped"), several in a row, a scale that is not a power
of two (so unscaling by multiplication is exercised bit for bit), bf16 autocast. Steps after
the buffers exist read no tensor on the host in Python (conftest.no_host_reads); on the CPU
the C++ op reads GradScaler's tensors from host memory, on CUDA the kernels read them on the
device (tests/cuda/host_kernel_test.cpp, amp_suite). With capturable=True no step reads one,
the first ones included: the first step is decided by each bucket's flag (optim._Unsure; DDP's
bucket views too) or each per-tensor list call's (optim._LooseFirst), also while the host has
not read it back (_Unsure.host_ready False) and under the edits training code makes between
steps, in eager steps and in steps compiled with fullgraph=True."""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

import momentum_cuda
from momentum_cuda.reference import MomentumReference
from conftest import Lender, assert_twins, bits, no_host_reads

STEPS = 9
OVERFLOW_DEFAULT = (0, 3, 4)  # step 1, and two in a row


def _model(seed):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(7, 97), torch.nn.Tanh(), torch.nn.Linear(97, 3))
    return m, copy.deepcopy(m)


def _pair(kind, ours, ref, flat, capturable=False):
    if kind == "sgd":
        h = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)
        return (momentum_cuda.SGD(ours.parameters(), flat=flat, capturable=capturable, **h),
                torch.optim.SGD(ref.parameters(), foreach=False, **h))
    if kind == "tensors":  # every hyper-parameter a tensor (one per side), read by the kernels
        def h():
            return dict(lr=torch.tensor(0.05), momentum=torch.tensor(0.9),
                        dampening=torch.tensor(0.1, dtype=torch.float64),
                        weight_decay=torch.tensor(1e-2))
        return (momentum_cuda.SGD(ours.parameters(), flat=flat, **h()),
                torch.optim.SGD(ref.parameters(), foreach=False, **h()))
    if kind == "nesterov":
        h = dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)
        return (momentum_cuda.SGD(ours.parameters(), flat=flat, capturable=capturable, **h),
                torch.optim.SGD(ref.parameters(), foreach=False, **h))
    h = dict(lr=0.05, momentum=0.8, weight_decay=1e-3)
    return (momentum_cuda.Momentum(ours.parameters(), flat=flat, capturable=capturable, **h),
            MomentumReference(ref.parameters(), **h))


def _train(kind, flat, *, init_scale=1000.0, overflow=OVERFLOW_DEFAULT, autocast=None,
           check_no_reads=True, capturable=False, lent=False):
    ours, ref = _model(seed=21)
    lend = Lender(ours.parameters()) if lent else (lambda: None)
    opt, topt = _pair(kind, ours, ref, flat, capturable)
    assert opt._step_supports_amp_scaling and not getattr(topt, "_step_supports_amp_scaling",
                                                          False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
               for _ in range(2)]
    gen = torch.Generator().manual_seed(22)
    for k in range(STEPS):
        x = torch.randn(5, 7, generator=gen)
        for model, o, scaler in ((ours, opt, scalers[0]), (ref, topt, scalers[1])):
            o.zero_grad()
            ctx = (torch.autocast("cpu", dtype=autocast) if autocast is not None
                   else contextlib.nullcontext())
            with ctx:
                loss = model(x).float().square().mean()
            if k in overflow:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            if o is opt:
                lend()
            steady = o is opt and check_no_reads and (check_no_reads == "all" or any(
                "momentum_buffer" in st for st in opt.state.values()))
            with no_host_reads() if steady else contextlib.nullcontext():
                scaler.step(o)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale(), f"step {k + 1}: scale"
        assert_twins(ours, ref, opt, topt, f"step {k + 1}{' (overflow)' if k in overflow else ''}")
    return opt


@pytest.mark.parametrize("kind", ["sgd", "nesterov", "momentum", "tensors"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_gradscaler_bitwise(kind, flat):
    opt = _train(kind, flat)
    want = "flat" if flat else "per-tensor"
    assert [e["path"] for e in opt.last_step] == [want]


@pytest.mark.parametrize("kind", ["sgd", "nesterov", "momentum"])
def test_first_step_decided_on_the_device(kind):
    """capturable=True, flat: the steps that create the momentum buffers read nothing on the
    host either (steps 1 and 2 overflow): found_inf stays where GradScaler left it, and the
    kernels decide the first step from the bucket's flag (optim._Unsure), with torch's bits
    and state. (Without capturable the host reads found_inf then: the other tests here.)"""
    opt = _train(kind, True, overflow=(0, 1, 4), check_no_reads="all", capturable=True)
    assert [e["path"] for e in opt.last_step] == ["flat"]


@pytest.mark.parametrize("kind", ["sgd", "nesterov", "momentum"])
def test_first_step_decided_on_the_device_lent(kind):
    """The same with DDP's bucket views as gradients (a lent bucket: one list call, given the
    bucket's flag while it is undecided)."""
    opt = _train(kind, True, overflow=(0, 1, 4), check_no_reads="all", capturable=True,
                 lent=True)
    assert [e["path"] for e in opt.last_step] == ["flat"]
    assert all(b.lent for lay in opt._layouts.values() for b in lay.buckets)


@pytest.mark.parametrize("kind", ["sgd", "nesterov", "momentum"])
def test_first_step_decided_on_the_device_per_tensor(kind):
    """The same with flat=False: the list call that makes the buffers takes a flag of its own
    (optim._LooseFirst)."""
    opt = _train(kind, False, overflow=(0, 1, 4), check_no_reads="all", capturable=True)
    assert [e["path"] for e in opt.last_step] == ["per-tensor"]


def test_without_capturable_the_first_step_reads_found_inf():
    """Control for the test above: without capturable=True (and outside a CUDA graph capture)
    the step that creates the buffers reads found_inf on the host, which no_host_reads sees;
    opt.state then always matches torch's at once."""
    with pytest.raises(AssertionError, match="read on the host"):
        _train("sgd", True, overflow=(0,), check_no_reads="all")


@contextlib.contextmanager
def _no_flag_waits():
    """no_host_reads, and no flag read that waits for the device (_Unsure.never(wait=True):
    .item() on a GPU; on the CPU the flag is host memory, which no_host_reads cannot see)."""
    real = momentum_cuda.optim._Unsure.never

    def never(self, wait):
        assert not wait, "a step waited for a first-step flag (a host read on a GPU)"
        return real(self, wait)
    momentum_cuda.optim._Unsure.never = never
    try:
        with no_host_reads():
            yield
    finally:
        momentum_cuda.optim._Unsure.never = real


def _first_on_device_late(kind, edit=None, overflow=(0, 1, 4), host_reads=(), where="own"):
    """_train's loop with the flag never read back by a step (_Unsure.host_ready False:
    a GPU whose copy has not arrived), no host read in any step, and `edit(k, opt, topt, ours,
    ref)` before each step on both sides (steps in `host_reads` may read the host: a flag
    read first after an edit, _EDIT_WAITS; no other step waits for one). Parameters and
    gradients are compared after every
    step; while the host has not read a flag its buffers are in opt.state (torch has none
    after steps 1 and 2); state_dict(), which reads the flags, and then every buffer at the
    end. where: "own" (flat, the bucket's own gradients), "lent" (flat, DDP's bucket views
    as gradients: Lender), "pertensor" (flat=False: _LooseFirst), "compiled" (every step
    through torch.compile(opt.step, fullgraph=True): the flags made and split in the traced
    step, optim._traced_held) or "compiled-mixed" (eager flat steps and compiled ones in
    turn, each taking over the other's flags)."""
    ours, ref = _model(seed=31)
    lend = Lender(ours.parameters()) if where == "lent" else (lambda: None)
    opt, topt = _pair(kind, ours, ref, where != "pertensor", capturable=True)
    compiled = None
    if where.startswith("compiled"):
        torch._dynamo.reset()
        compiled = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    scalers = [torch.amp.GradScaler("cpu", init_scale=1000.0, growth_interval=2)
               for _ in range(2)]
    gen = torch.Generator().manual_seed(32)
    saw_unsure = False
    for k in range(STEPS):
        if edit is not None:
            edit(k, opt, topt, ours, ref)
        x = torch.randn(5, 7, generator=gen)
        for model, o, scaler in ((ours, opt, scalers[0]), (ref, topt, scalers[1])):
            o.zero_grad()
            loss = model(x).square().mean() * (float("inf") if k in overflow else 1.0)
            scaler.scale(loss).backward()
            if o is opt:
                lend()
            traced = o is opt and compiled is not None and (where == "compiled" or k % 2)
            if traced:  # fullgraph=True: a host read would be a graph break, which raises
                opt.step = compiled  # (an attribute of the instance: GradScaler.step calls it)
            try:
                # (not while dynamo compiles: it reads a float it makes dynamic with .item())
                with (_no_flag_waits() if o is opt and k not in host_reads and not traced
                      else contextlib.nullcontext()):
                    scaler.step(o)
            finally:
                vars(o).pop("step", None)
            scaler.update()
        for i, (p, q) in enumerate(zip(ours.parameters(), ref.parameters())):
            assert torch.equal(bits(p), bits(q)), f"step {k + 1}: parameter {i}"
            assert (p.grad is None) == (q.grad is None), f"step {k + 1}: gradient presence {i}"
            if p.grad is not None:
                assert torch.equal(bits(p.grad), bits(q.grad)), f"step {k + 1}: gradient {i}"
        if opt._unsure:
            saw_unsure = True
            # the step that makes them puts them into opt.state (torch's has none after a
            # skipped step 1 or 2; the host has not read the flag that says so)
            held = {id(p) for b in opt._unsure.values() for p in b.params}
            assert all("momentum_buffer" in opt.state.get(p, {})
                       for p in ours.parameters() if id(p) in held), f"step {k + 1}"
    assert saw_unsure, "no step left its buffers to the device"
    ours_sd, torch_sd = opt.state_dict(), topt.state_dict()
    assert not opt._unsure
    assert ours_sd["state"].keys() == torch_sd["state"].keys()
    for i, st in torch_sd["state"].items():
        assert torch.equal(bits(ours_sd["state"][i]["momentum_buffer"]),
                           bits(st["momentum_buffer"])), f"state {i}"
    assert_twins(ours, ref, opt, topt, "end")
    return opt


@pytest.mark.parametrize("where", ["own", "lent", "pertensor", "compiled", "compiled-mixed"])
@pytest.mark.parametrize("kind", ["sgd", "momentum"])
def test_first_step_on_the_device_read_late(kind, where, monkeypatch):
    """Steps 3 to 9 (after two skipped ones) run with buffers the host has not seen stepped:
    the flag, false since step 3, makes each a momentum step, not a first one."""
    monkeypatch.setattr(momentum_cuda.optim._Unsure, "host_ready", False)
    _first_on_device_late(kind, where=where)


def _edit_state_dict(k, opt, topt, ours, ref):
    if k in (1, 3):  # after a skipped first step (no buffer), and after a stepped one
        a, b = opt.state_dict(), topt.state_dict()
        assert a["state"].keys() == b["state"].keys(), f"before step {k + 1}"


def _edit_load(k, opt, topt, ours, ref):
    if k == 3:  # torch's state (buffers from step 3) loaded into both
        sd = topt.state_dict()
        opt.load_state_dict(copy.deepcopy(sd))
        topt.load_state_dict(copy.deepcopy(sd))


def _edit_momentum_off(k, opt, topt, ours, ref):
    for o in (opt, topt):  # momentum off for step 4 only (the flag waits, unread)
        o.param_groups[0]["momentum"] = 0.0 if k == 3 else 0.9


def _edit_unused(k, opt, topt, ours, ref):
    if k == 3:  # the first layer frozen for a step: its flag split, the layer's part idle
        for m in (ours, ref):
            m[0].weight.requires_grad_(False)
    if k == 4:
        for m in (ours, ref):
            m[0].weight.requires_grad_(True)


def _edit_unused_after_a_skip(k, opt, topt, ours, ref):
    if k == 1:  # frozen at step 2, after skipped step 1: its flag, still "never stepped", split
        for m in (ours, ref):
            m[0].weight.requires_grad_(False)
    if k == 2:  # and its first real step at step 3
        for m in (ours, ref):
            m[0].weight.requires_grad_(True)


def _edit_unfrozen_later(k, opt, topt, ours, ref):
    if k == 0:  # the last layer frozen from step 1 (the bucket's first step is partial) ...
        for m in (ours, ref):
            m[2].requires_grad_(False)
    if k == 4:  # ... and unfrozen at an overflowed step 5: its first step, skipped, then 6
        for m in (ours, ref):
            m[2].requires_grad_(True)


def _edit_clear(k, opt, topt, ours, ref):
    if k in (1, 3):  # momentum reset by hand after a skipped step and after a stepped one
        opt.state.clear()
        topt.state.clear()


def _edit_none(k, opt, topt, ours, ref):
    if k == 3:  # one buffer reset by hand (torch: a first step for that parameter)
        for o, m in ((opt, ours), (topt, ref)):
            o.state[m[0].weight]["momentum_buffer"] = None


def _edit_all_none(k, opt, topt, ours, ref):
    if k == 4:  # every buffer reset by hand before a skipped step: torch's entries keep None
        for o in (opt, topt):
            for st in o.state.values():
                st["momentum_buffer"] = None
    if k == 5:
        a, b = opt.state_dict()["state"], topt.state_dict()["state"]
        assert a == b and all(st == {"momentum_buffer": None} for st in b.values()), (a, b)


def _edit_group_added(k, opt, topt, ours, ref):
    if k in (1, 3):  # a group added after a skipped step 1 (buffers under an unread flag) and
        # after a stepped one: laid out at once, it must leave the other groups' buffers where
        # the flags find them
        w = torch.randn(5, generator=torch.Generator().manual_seed(k))
        for o in (opt, topt):
            o.add_param_group({"params": [torch.nn.Parameter(w.clone())]})


# The steps that read a first-step flag the device has not sent back yet (a wait): a relayout
# has the host learn what the device did first (optim._settle_unsure), and DDP's views of the
# gradients of the layer unfrozen at step 5 are a bucket the group is laid out again for
# (lent). Every other edit splits the flags it changes (optim._split_flag) or drops those it
# empties, unread.
_EDIT_WAITS = {(_edit_unfrozen_later, "lent"): (4,)}

_EDITS = {"state_dict": _edit_state_dict, "all-None": _edit_all_none, "load": _edit_load,
          "momentum-off": _edit_momentum_off, "frozen-for-a-step": _edit_unused,
          "unfrozen-later": _edit_unfrozen_later, "frozen-after-a-skip": _edit_unused_after_a_skip,
          "state-cleared": _edit_clear, "buffer-None": _edit_none,
          "group-added": _edit_group_added}


@pytest.mark.parametrize("where", ["own", "lent", "pertensor", "compiled", "compiled-mixed"])
@pytest.mark.parametrize("kind, edit", [(k, e) for k in ("sgd", "momentum") for e in _EDITS
                                        if not (k == "momentum" and e == "momentum-off")])
def test_first_step_on_the_device_with_edits(edit, kind, where, monkeypatch):
    """(Momentum needs 0 < momentum < 1: no momentum-off for it.) where: as
    _first_on_device_late's."""
    edit = _EDITS[edit]
    monkeypatch.setattr(momentum_cuda.optim._Unsure, "host_ready", False)
    waits = _EDIT_WAITS.get((edit, where), ())
    _first_on_device_late(kind, edit, where=where, host_reads=waits)


@pytest.mark.parametrize("where", ["own", "pertensor"])
@pytest.mark.parametrize("what", ["deepcopy", "moved"])
def test_first_step_on_the_device_copy_and_relayout(what, where, monkeypatch):
    """While the flag is unread: a deepcopy of model and optimizer (the copy's state is
    torch's), or a parameter moved out of the flat buffer (p.data = ..., the bucket no longer
    stepped whole): each reads the flag first, and the steps go on with torch's bits."""
    monkeypatch.setattr(momentum_cuda.optim._Unsure, "host_ready", False)

    def edit(k, opt, topt, ours, ref):
        if k != 3:
            return
        assert opt._unsure
        if what == "deepcopy":
            twin = copy.deepcopy({"m": ours, "o": opt})
            assert not opt._unsure and twin["o"].state_dict()["state"].keys() == \
                topt.state_dict()["state"].keys()
            assert twin["o"]._capturable
        else:
            for m in (ours, ref):
                m[0].weight.data = m[0].weight.data.clone()
    # the moved parameter can go back into a flat buffer: a relayout, which reads the flag first
    waits = (3,) if what == "moved" and where == "own" else ()
    _first_on_device_late("sgd", edit, where=where, host_reads=waits)


@pytest.mark.parametrize("where", ["own", "pertensor", "compiled"])
@pytest.mark.parametrize("plant", ["flag-not-updated", "flag-false-from-the-start"])
def test_planted_first_step_bugs_are_caught(plant, where, monkeypatch):
    """Controls: a flag that no step clears (every step a first step), and one that says
    "stepped" from the start (the first real step not a first step), each fail."""
    monkeypatch.setattr(momentum_cuda.optim._Unsure, "host_ready", False)
    if plant == "flag-not-updated":
        monkeypatch.setattr(momentum_cuda.optim._Unsure, "update", lambda self, f: None)
        with pytest.raises(AssertionError, match="parameter"):
            _first_on_device_late("sgd", where=where)
    else:
        real = momentum_cuda.optim._Unsure.__init__

        def stepped(self, flag):
            real(self, flag)
            self.flag.fill_(False)
        monkeypatch.setattr(momentum_cuda.optim._Unsure, "__init__", stepped)
        with pytest.raises(AssertionError):
            _first_on_device_late("sgd", where=where)


@pytest.mark.parametrize("where", ["own", "pertensor", "compiled"])
@pytest.mark.parametrize("plant", ["copies-say-stepped", "copies-say-never"])
def test_planted_split_bugs_are_caught(plant, where, monkeypatch):
    """Controls for the split flags (optim._split_flag): copies that say "stepped" when the
    flag said "never" (a layer frozen right after a skipped first step, then stepped), and
    copies that say "never" when the flag said "stepped" (a layer frozen for a step after its
    first one), each fail."""
    monkeypatch.setattr(momentum_cuda.optim._Unsure, "host_ready", False)
    real = momentum_cuda.optim._FusedMomentum._split_flag

    def split(self, *args, **kwargs):
        parts = real(self, *args, **kwargs)
        for _, part in parts:
            part.first_flag.fill_(plant == "copies-say-never")
        return parts
    monkeypatch.setattr(momentum_cuda.optim._FusedMomentum, "_split_flag", split)
    edit = _edit_unused_after_a_skip if plant == "copies-say-stepped" else _edit_unused
    with pytest.raises(AssertionError, match="parameter"):
        _first_on_device_late("sgd", edit, where=where)


@pytest.mark.parametrize("init_scale", [2.0 ** 16, 3.0])
def test_gradscaler_scales(init_scale):
    _train("sgd", True, init_scale=init_scale, overflow=(1, 2))


def test_gradscaler_bf16_autocast():
    _train("sgd", True, autocast=torch.bfloat16)


def test_gradscaler_every_step_overflows_leaves_no_state():
    opt = _train("sgd", True, overflow=tuple(range(STEPS)))
    assert not any("momentum_buffer" in st for st in opt.state.values())


def test_planted_skip_ignored_is_caught(monkeypatch):
    """Control: an optimizer that drops found_inf (steps through overflows) fails the
    comparison, so the passes above mean something."""
    real = momentum_cuda.SGD._amp

    def drop_found_inf(self):
        amp = real(self)
        return None if amp is None else (amp[0], None)
    monkeypatch.setattr(momentum_cuda.SGD, "_amp", drop_found_inf)
    with pytest.raises(AssertionError, match="overflow"):
        _train("sgd", True, overflow=(5,))


def test_unscaled_gradient_of_another_layout_is_written_back():
    """A gradient in another memory layout than its parameter (fp32) is copied for the kernel;
    the unscaled values must still land in the gradient itself."""
    gen = torch.Generator().manual_seed(23)
    w0 = torch.randn(6, 5, generator=gen)
    g0 = torch.randn(5, 6, generator=gen).t()  # transposed: other strides than w
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = momentum_cuda.SGD([ours], lr=0.1, momentum=0.9, flat=False)
    topt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1000.0) for _ in range(2)]
    for s in scalers:
        s.scale(torch.ones(()))  # GradScaler makes its scale tensor here
    for step in range(3):
        for p, o, s in ((ours, opt, scalers[0]), (ref, topt, scalers[1])):
            p.grad = (g0 * 1000.0).clone().t().contiguous().t()
            s.step(o)
            s.update()
        assert torch.equal(ours.grad, ref.grad) and torch.equal(ours, ref), f"step {step + 1}"


@pytest.mark.parametrize("bad,frag", [
    (lambda: torch.ones(2), "grad_scale must be a 1-element float32 tensor on cpu"),
    (lambda: torch.ones((), dtype=torch.float64), "got Double"),
    (lambda: torch.ones((), device="meta"), "grad_scale"),
])
def test_op_rejects_bad_amp_tensors(bad, frag):
    gen = torch.Generator().manual_seed(24)
    p, g, b = (torch.randn(9, generator=gen) for _ in range(3))
    before = [t.clone() for t in (p, g, b)]
    with pytest.raises(RuntimeError, match=frag):
        torch.ops.momentum_cuda.sgd_step_list_(
            [p], [g], [b], lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0,
            nesterov=False, maximize=False, first_step=False, grad_scale=bad())
    assert all(torch.equal(t, u) for t, u in zip((p, g, b), before))


def test_triton_backend_claims_amp_scaling():
    """The Triton kernels read grad_scale and found_inf (tests/test_triton_amp.py)."""
    if not momentum_cuda.available_backends()["triton"][0]:
        pytest.skip("triton not installed")
    p = torch.nn.Parameter(torch.randn(3, device="meta"))
    opt = momentum_cuda.SGD([p], lr=0.1)
    opt._backend_by_device[torch.device("cuda", 0)] = "triton"
    assert opt._step_supports_amp_scaling


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_gradscaler_unscale_clip_step(flat):
    """scaler.unscale_(opt); clip_grad_norm_(...); scaler.step(opt): GradScaler has unscaled
    already and hands over found_inf alone (grad_scale None); overflowed steps are skipped. The
    model has a parameter no step uses: its gradient stays None and it never gets a buffer."""
    ours, ref = _model(seed=25)
    unused = torch.randn(3, 2, generator=torch.Generator().manual_seed(27))
    for m in (ours, ref):  # a parameter of the model that forward never reads
        m.register_parameter("unused", torch.nn.Parameter(unused.clone()))
    opt, topt = _pair("sgd", ours, ref, flat)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1000.0, growth_interval=2)
               for _ in range(2)]
    gen = torch.Generator().manual_seed(26)
    for k in range(STEPS):
        x = torch.randn(5, 7, generator=gen)
        for model, o, scaler in ((ours, opt, scalers[0]), (ref, topt, scalers[1])):
            o.zero_grad()
            loss = model(x).square().mean() * (float("inf") if k in (0, 4) else 1.0)
            scaler.scale(loss).backward()
            scaler.unscale_(o)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
            scaler.step(o)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale(), f"step {k + 1}: scale"
        assert_twins(ours, ref, opt, topt, f"step {k + 1}")


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_gradscaler_checkpoint_mid_training(flat):
    """Model, optimizer and GradScaler saved (torch.save) after an overflow and loaded into new
    ones, which train on: the bits of torch's optimizer and GradScaler doing the same. The
    scale, its growth tracker and the momentum buffers come back from the checkpoints."""
    import io
    ours, ref = _model(seed=28)
    opt, topt = _pair("sgd", ours, ref, flat)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1000.0, growth_interval=2)
               for _ in range(2)]
    gen = torch.Generator().manual_seed(29)

    def train(k, model, o, scaler):
        o.zero_grad()
        loss = model(torch.randn(5, 7, generator=torch.Generator().manual_seed(100 + k)))
        scaler.scale(loss.square().mean() * (math.inf if k == 2 else 1.0)).backward()
        scaler.step(o)
        scaler.update()
    for k in range(4):
        for model, o, scaler in ((ours, opt, scalers[0]), (ref, topt, scalers[1])):
            train(k, model, o, scaler)
    sides = []
    for model, o, scaler, make in ((ours, opt, scalers[0], lambda m: _pair("sgd", m, m, flat)[0]),
                                   (ref, topt, scalers[1], lambda m: _pair("sgd", m, m, flat)[1])):
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": o.state_dict(),
                    "scaler": scaler.state_dict()}, buf)
        buf.seek(0)
        ck = torch.load(buf)
        m2 = copy.deepcopy(model)
        with torch.no_grad():
            for p in m2.parameters():
                p.zero_()
        m2.load_state_dict(ck["model"])
        o2 = make(m2)
        o2.load_state_dict(ck["opt"])
        s2 = torch.amp.GradScaler("cpu")
        s2.load_state_dict(ck["scaler"])
        sides.append((m2, o2, s2))
    (m_o, o_o, s_o), (m_t, o_t, s_t) = sides
    for k in range(4, 9):
        train(k, m_o, o_o, s_o)
        train(k, m_t, o_t, s_t)
        assert s_o.get_scale() == s_t.get_scale(), f"step {k + 1}: scale"
        assert_twins(m_o, m_t, o_o, o_t, f"resumed step {k + 1}")


@pytest.mark.parametrize("kind", ["sgd", "momentum"])
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_capture_refuses_what_it_would_get_wrong(kind, flat, monkeypatch):
    """While a CUDA graph is captured (optim._capturing made true here; the real capture is in
    tests/test_gpu.py), a step that would create momentum buffers under GradScaler raises
    before anything is written: without capturable=True (found_inf would be read on the host),
    and with it before any eager step (the buffers would be allocated and zeroed inside the
    graph). After one eager step, skipped by an overflow, the captured-like steps run without
    a host read and give torch's bits; flat or per-tensor (flat=False)."""
    ours, ref = _model(seed=33)
    scaler = torch.amp.GradScaler("cpu", init_scale=1000.0)

    def step(o, model, overflow):
        o.zero_grad()
        loss = model(torch.ones(5, 7)).square().mean() * (math.inf if overflow else 1.0)
        scaler.scale(loss).backward()
        scaler.step(o)
        scaler.update()

    for capturable in (False, True):
        opt, _ = _pair(kind, ours, ref, flat, capturable)
        monkeypatch.setattr(momentum_cuda.optim, "_capturing", lambda: True)
        with pytest.raises(RuntimeError, match="CUDA graph is captured.*capturable=True"):
            opt.zero_grad()
            scaler.scale(ours(torch.ones(5, 7)).square().mean()).backward()
            before = [(p.detach().clone(), p.grad.clone()) for p in ours.parameters()]
            scaler.step(opt)
        for (p0, g0), p in zip(before, ours.parameters()):
            assert torch.equal(bits(p0), bits(p)) and torch.equal(bits(g0), bits(p.grad))
        assert not opt.state and not opt._unsure
        monkeypatch.setattr(momentum_cuda.optim, "_capturing", lambda: False)
    # capturable=True, one eager step (skipped), then "captured" steps
    ours, ref = _model(seed=33)
    opt, topt = _pair(kind, ours, ref, flat, capturable=True)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1000.0) for _ in range(2)]
    for k in range(5):
        if k == 1:
            monkeypatch.setattr(momentum_cuda.optim, "_capturing", lambda: True)
        for model, o, s in ((ours, opt, scalers[0]), (ref, topt, scalers[1])):
            scaler = s
            with no_host_reads() if o is opt else contextlib.nullcontext():
                step(o, model, overflow=k in (0, 1))
        assert_twins(ours, ref, opt, topt, f"step {k + 1}")


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_a_step_that_would_raise_under_gradscaler(flat):
    """A sparse gradient with weight_decay makes torch's step raise (part-way through), and
    ours before anything is written. Under GradScaler torch's step runs only when GradScaler
    finds no overflow: on an overflowed step neither raises; otherwise both raise after
    GradScaler's unscale (the gradients unscaled alike), ours with the parameters as they
    were."""
    torch.manual_seed(35)
    ours = torch.nn.ModuleDict({"lin": torch.nn.Linear(4, 3),
                                "emb": torch.nn.Embedding(7, 3, sparse=True)})
    ref = copy.deepcopy(ours)
    h = dict(lr=0.1, momentum=0.9, weight_decay=1e-2)
    opt = momentum_cuda.SGD(ours.parameters(), flat=flat, **h)
    topt = torch.optim.SGD(ref.parameters(), foreach=False, **h)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1000.0) for _ in range(2)]
    idx = torch.tensor([1, 3, 3])
    for overflow in (True, False):
        raised = []
        for model, o, s in ((ours, opt, scalers[0]), (ref, topt, scalers[1])):
            o.zero_grad()
            loss = (model["lin"](torch.ones(2, 4)).sum() + model["emb"](idx).sum())
            s.scale(loss * (math.inf if overflow else 1.0)).backward()
            before = [p.detach().clone() for p in model.parameters()]
            try:
                s.step(o)
                raised.append(None)
            except RuntimeError as e:
                raised.append(e)
                if o is opt:
                    assert all(torch.equal(bits(a), bits(p))
                               for a, p in zip(before, model.parameters()))
            s.update()
        assert (raised[0] is None) == (raised[1] is None) == overflow, raised
        for p, q in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(bits(p.grad.to_dense()), bits(q.grad.to_dense()))
            assert torch.equal(bits(p), bits(q)) or not overflow  # (torch's raised part-way)
            assert not opt.state.get(p) and not topt.state.get(q)
