"""The flat layout (flat=True): parameters, gradients and momentum buffers as views of one
buffer per (param group, device, dtype), one kernel call per step, and bitwise correctness
(vs torch.optim.SGD(foreach=False)) whenever the user breaks the layout."""
from __future__ import annotations

import copy

import pytest
import torch

import momentum_cuda
from conftest import (DTYPE_IDS, DTYPES, STEPS, assert_same, backward_grads, byte_offset,
                      flat_paths, fresh_grads, make_values, momentum_buffer, run_steps,
                      storage_ptr, twin_params, whole_storage)

ALIGN = momentum_cuda.ALIGN_BYTES
H = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-2)


def _pair(ours, ref, **h):
    h = {**H, **h}
    return (momentum_cuda.SGD(ours, **h), torch.optim.SGD(ref, foreach=False, **h))


def _grads_both(ours, ref, gen):
    """Fresh gradients: written in place into an existing .grad; where .grad is None, delivered
    by backward() (which attaches the flat view, as in a training loop). torch's get clones."""
    grads = fresh_grads(ours, gen)
    missing = [k for k, p in enumerate(ours) if p.grad is None]
    backward_grads([ours[k] for k in missing], [grads[k] for k in missing])
    for p, q, g in zip(ours, ref, grads):
        if p.grad is not None:
            p.grad.copy_(g)
        q.grad = g.clone()
    return grads


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _step_both(opt, topt, ours, ref, what=""):
    opt.step()
    topt.step()
    assert_same(ours, ref, opt, topt, what=what)


def _check_views(tensors, align=ALIGN):
    """tensors share one storage, start at multiples of `align` bytes and do not overlap."""
    assert len({storage_ptr(t) for t in tensors}) == 1
    spans = sorted((byte_offset(t), byte_offset(t) + t.numel() * t.element_size()) for t in tensors)
    for lo, _ in spans:
        assert lo % align == 0, f"offset {lo} is not a multiple of {align} bytes"
    for (_, hi), (lo, _) in zip(spans, spans[1:]):
        assert hi <= lo, "views overlap"


def _covered_mask(tensors):
    """Elements of the shared storage covered by the views (the rest is padding)."""
    whole = whole_storage(tensors[0])
    mask = torch.zeros(whole.numel(), dtype=torch.bool)
    for t in tensors:
        if t.numel():
            mask[t.storage_offset():t.storage_offset() + t.numel()] = True
    return whole, mask


# ---- the layout itself -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_params_grads_buffers_are_views_of_one_buffer(dtype):
    sizes = [0, 1, 3, 97, (97, 33), 5, 0, 2]
    values = make_values(sizes, dtype, seed=301)
    ours, ref = twin_params(values)
    ids = [id(p) for p in ours]
    opt, topt = _pair(ours, ref)
    opt.zero_grad()
    # the Parameter objects stay the same, their values and shapes too
    assert [id(p) for p in ours] == ids
    for p, v in zip(ours, values):
        assert torch.equal(p, v) and p.is_contiguous()
    _check_views(ours)
    assert all(p.grad is None for p in ours)  # torch's zero_grad() leaves None too
    backward_grads(ours, fresh_grads(ours, torch.Generator().manual_seed(303)))
    grads = [p.grad for p in ours]
    assert all(g is not None for g in grads)  # backward attached the flat views
    _check_views(grads)
    assert storage_ptr(grads[0]) != storage_ptr(ours[0])
    for p, g in zip(ours, grads):  # same offsets in the gradient buffer
        assert g.storage_offset() == p.storage_offset() and g.stride() == p.stride()
    run_steps(opt, ours, topt, ref, seed=302, expect_path="flat")
    bufs = [momentum_buffer(opt, p) for p in ours]
    _check_views(bufs)
    assert len({storage_ptr(ours[0]), storage_ptr(grads[0]), storage_ptr(bufs[0])}) == 3
    for p, b in zip(ours, bufs):
        assert b.storage_offset() == p.storage_offset() and b.stride() == p.stride()
    # still the same views after the steps (nothing was re-allocated)
    assert all(p.grad is g for p, g in zip(ours, grads))
    _check_views(ours)
    # the padding between parameters stays +0.0 (bit pattern 0) in the parameter and momentum
    # buffers, whether the kernel skips it (bf16/fp16) or runs over it (fp32/fp64:
    # test_cpu_fp32_fp64_steps_cover_the_padding); zero_grad() fills the whole gradient buffer
    # with -0.0, padding included, in one pass (tests/test_presence.py: why the padding's signs
    # are harmless)
    for ts in (ours, bufs):
        whole, covered = _covered_mask(ts)
        assert not _bits(whole[~covered]).any()
    opt.zero_grad()
    whole = whole_storage(grads[0])
    assert torch.equal(_bits(whole), _bits(torch.full_like(whole, -0.0)))
    assert flat_paths(opt) == ["flat"]
    assert opt.last_step[0]["tensors"] == len(sizes)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cpu_fp32_fp64_steps_cover_the_padding(dtype):
    """On the CPU a flat fp32/fp64 step is one span over the whole bucket, padding included
    (torch's fp32/fp64 bits do not depend on an element's position in its tensor); bf16/fp16
    run each parameter's segment. Over every flag (maximize, nesterov, dampening, weight decay,
    momentum 0) and a first step, after zero_grad(set_to_none=True: -0.0 gradient padding) and
    zero_grad(set_to_none=False: +0.0), and with a parameter in the middle left without a
    gradient (one call over two runs, each covering only its own parameters and the padding
    between them), the parameter and momentum buffer padding stays +0.0 (bit pattern 0) and the
    bits are torch's."""
    from conftest import sgd_hyper_grid
    sizes = [1, 3, 97, (5, 7), 2]
    for k, h in enumerate(sgd_hyper_grid()):
        ours, ref = twin_params(make_values(sizes, dtype, seed=700 + k))
        opt = momentum_cuda.SGD(ours, lr=0.1, **h)
        topt = torch.optim.SGD(ref, lr=0.1, foreach=False, **h)
        gen = torch.Generator().manual_seed(800 + k)
        for step in range(6):
            opt.zero_grad(set_to_none=step % 2 == 0)
            topt.zero_grad()
            _grads_both(ours, ref, gen)
            unused = step >= 4  # parameter 2 gets no gradient: two runs around it
            if unused:
                ours[2].grad, ref[2].grad = None, None
            _step_both(opt, topt, ours, ref, f"{h} step {step}")
            (b,) = opt._layouts[id(opt.param_groups[0])].buckets
            segs = b.run_segments(0, len(sizes))
            cover = dtype in (torch.float32, torch.float64)
            assert b.covers_padding == cover and segs.shape == ((1, 2) if cover else (5, 2))
            assert flat_paths(opt) == ["flat"]  # (unused: one call over both runs)
            assert [e["tensors"] for e in opt.last_step] == ([4] if unused else [5])
            bufs = [momentum_buffer(opt, p) for p in ours] if h["momentum"] else []
            for ts in (ours, bufs):
                if ts:
                    whole, covered = _covered_mask(ts)
                    assert not _bits(whole[~covered]).any(), f"{h} step {step}: padding"


def test_one_buffer_per_group_and_dtype():
    groups_a, groups_b, by_key = [], [], {}
    for k, lr in enumerate((0.1, 0.01)):
        vals = []
        for j, dt in enumerate((torch.float32, torch.bfloat16, torch.float32, torch.float64,
                                torch.bfloat16)):
            vals += make_values([7 + j, (3, 5)], dt, seed=310 + 10 * k + j)
        a, b = twin_params(vals)
        groups_a.append(dict(params=a, lr=lr))
        groups_b.append(dict(params=b, lr=lr))
        for p in a:
            by_key.setdefault((k, p.dtype), []).append(p)
    opt = momentum_cuda.SGD(groups_a, momentum=0.9)
    topt = torch.optim.SGD(groups_b, momentum=0.9, foreach=False)
    for ps in by_key.values():
        _check_views(ps, align=ALIGN)
    # different (group, dtype) keys never share a buffer
    assert len({storage_ptr(ps[0]) for ps in by_key.values()}) == len(by_key) == 6
    ours = [p for g in groups_a for p in g["params"]]
    ref = [p for g in groups_b for p in g["params"]]
    run_steps(opt, ours, topt, ref, seed=320, expect_path="flat")
    assert len(opt.last_step) == 6  # one kernel call per (group, dtype)
    got = sorted((str(e["dtype"]), e["tensors"], e["numel"]) for e in opt.last_step)
    want = sorted((str(dt), len(ps), sum(p.numel() for p in ps)) for (_, dt), ps in by_key.items())
    assert got == want


# ---- the user breaks the layout: always torch's bits, and the path says what ran -------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_user_replaces_grad(dtype):
    ours, ref = twin_params(make_values([97, (9, 7), 3, 33], dtype, seed=331))
    opt, topt = _pair(ours, ref)
    gen = torch.Generator().manual_seed(332)
    for step in range(STEPS):
        if step == 6:
            opt.zero_grad()  # every .grad None: backward below attaches the views again
        grads = _grads_both(ours, ref, gen)
        if 3 <= step < 6:
            ours[1].grad = grads[1].clone()  # a new tensor: no longer the flat view
        _step_both(opt, topt, ours, ref, what=f"step {step + 1}:")
        per = [e for e in opt.last_step if e["path"] == "per-tensor"]
        if 3 <= step < 6:
            assert len(per) == 1 and per[0]["tensors"] == 1
            assert sum(e["tensors"] for e in opt.last_step if e["path"] == "flat") == 3
        else:
            assert flat_paths(opt) == ["flat"], f"step {step + 1}: {opt.last_step}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grad_set_to_none_skips_param(dtype):
    """p.grad = None: the parameter is skipped, like torch (no decay, no momentum). When
    backward brings a gradient again it gets the flat view back (flat path); one assigned by
    the user (p.grad = g) is a new tensor (per-tensor path) while it stays."""
    ours, ref = twin_params(make_values([97, 5, (7, 3)], dtype, seed=341))
    opt, topt = _pair(ours, ref)
    gen = torch.Generator().manual_seed(342)
    for step in range(STEPS):
        if step == 6:
            opt.zero_grad()
        if step == 3:
            ours[1].grad = None  # then assigned: not the view
            grads = _grads_both(ours, ref, gen)
            ours[1].grad = grads[1].clone()
        else:
            _grads_both(ours, ref, gen)
        skipped = step % 3 == 1
        if skipped:
            ours[1].grad = None
            ref[1].grad = None
        before = ours[1].detach().clone()
        _step_both(opt, topt, ours, ref, what=f"step {step + 1}:")
        paths = flat_paths(opt)
        if skipped:
            assert torch.equal(ours[1], before)
            assert sum(e["tensors"] for e in opt.last_step) == 2 and set(paths) == {"flat"}
        elif step == 3:
            # (one flat call over the runs around parameter 1)
            assert sorted(paths) == ["flat", "per-tensor"], f"step {step + 1}: {paths}"
        else:
            assert paths == ["flat"], f"step {step + 1}: {opt.last_step}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_zero_grad_then_backward(dtype):
    """model.zero_grad() (set_to_none, without filling the flat buffer) and opt.zero_grad(),
    switched back and forth: backward attaches the flat views after either (the hook fills a
    view with -0.0 first where zero_grad did not), so every step is one flat call."""
    torch.manual_seed(351)
    model = torch.nn.Sequential(torch.nn.Linear(11, 23), torch.nn.Tanh(),
                                torch.nn.Linear(23, 5)).to(dtype)
    tmodel = copy.deepcopy(model)
    opt = momentum_cuda.SGD(model.parameters(), **H)
    topt = torch.optim.SGD(tmodel.parameters(), foreach=False, **H)
    gen = torch.Generator().manual_seed(352)
    for step in range(12):
        x = torch.randn(8, 11, generator=gen).to(dtype)
        use_model = step in (2, 3, 4, 8)
        if use_model:
            model.zero_grad()
        else:
            opt.zero_grad()
        tmodel.zero_grad()
        model(x).float().square().mean().backward()
        tmodel(x).float().square().mean().backward()
        _step_both(opt, topt, list(model.parameters()), list(tmodel.parameters()),
                   what=f"step {step + 1}:")
        assert flat_paths(opt) == ["flat"], f"step {step + 1}: {opt.last_step}"


def _first_step_break(kind, dtype, seed):
    """Steps 1-2 with the gradients replaced by new tensors after backward (per-tensor path),
    then the usual loop (flat views)."""
    from momentum_cuda.reference import MomentumReference
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(),
                                torch.nn.Linear(9, 4)).to(dtype)
    tmodel = copy.deepcopy(model)
    if kind == "SGD":
        opt = momentum_cuda.SGD(model.parameters(), **H)
        topt = torch.optim.SGD(tmodel.parameters(), foreach=False, **H)
    else:
        opt = momentum_cuda.Momentum(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
        topt = MomentumReference(tmodel.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(8):
        x = torch.randn(5, 6, generator=gen).to(dtype)
        opt.zero_grad()
        tmodel.zero_grad()
        model(x).float().square().mean().backward()
        tmodel(x).float().square().mean().backward()
        if step < 2:
            for p in model.parameters():
                p.grad = p.grad.clone()
        _step_both(opt, topt, list(model.parameters()), list(tmodel.parameters()),
                   what=f"step {step + 1}:")
        if step < 2:
            assert flat_paths(opt) == ["per-tensor"]
    return opt


@pytest.mark.parametrize("kind", ["SGD", "Momentum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_zero_grad_on_the_first_step(kind, dtype):
    """Correctness (torch's bits, no exception) when the first steps ran per-tensor and the
    gradients then become the flat views again."""
    _first_step_break(kind, dtype, seed=361)


@pytest.mark.parametrize("kind", ["SGD", "Momentum"])
def test_flat_path_returns_after_first_step_break(kind):
    """README: after opt.zero_grad() backward attaches the views again and a step is one flat
    kernel call, also when the layout was broken on the very first step."""
    opt = _first_step_break(kind, torch.float32, seed=365)
    assert flat_paths(opt) == ["flat"], opt.last_step


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_param_data_replaced(dtype):
    ours, ref = twin_params(make_values([97, (5, 9), 3], dtype, seed=371))
    opt, topt = _pair(ours, ref)
    gen = torch.Generator().manual_seed(372)
    for step in range(STEPS):
        if step == 4:
            new = make_values([(5, 9)], dtype, seed=373)[0]
            ours[1].data = new.clone()
            ref[1].data = new.clone()
        _grads_both(ours, ref, gen)
        _step_both(opt, topt, ours, ref, what=f"step {step + 1}:")
        # The new data is the parameter's own (nothing else holds it): the step lays the
        # group out again and stays one flat call.
        assert flat_paths(opt) == ["flat"], opt.last_step
        assert storage_ptr(ours[1]) == storage_ptr(ours[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_momentum_buffer_replaced_by_user(dtype):
    ours, ref = twin_params(make_values([97, (5, 9), 3], dtype, seed=381))
    opt, topt = _pair(ours, ref)
    gen = torch.Generator().manual_seed(382)
    for step in range(STEPS):
        _grads_both(ours, ref, gen)
        if step == 3:  # a new tensor, with other values: it must be the one that is used
            for o, p, q in ((opt, ours[1], None), (topt, ref[1], None)):
                o.state[p]["momentum_buffer"] = o.state[p]["momentum_buffer"].mul(0.5)
        if step == 5:  # in place on the flat view: stays flat, and is used
            opt.state[ours[0]]["momentum_buffer"].mul_(-1.0)
            topt.state[ref[0]]["momentum_buffer"].mul_(-1.0)
        _step_both(opt, topt, ours, ref, what=f"step {step + 1}:")
        if step >= 3:
            per = [e for e in opt.last_step if e["path"] == "per-tensor"]
            assert len(per) == 1 and per[0]["tensors"] == 1
        else:
            assert flat_paths(opt) == ["flat"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_grad(dtype):
    """A transposed gradient for a 2-D parameter (p.grad strides differ from p's) at every
    step: torch's first buffer is its clone, transposed like it, and later steps mix the
    layouts; torch's own ops step it (every dtype), and the buffer keeps torch's strides."""
    ours, ref = twin_params(make_values([(97, 33), 5], dtype, seed=391))
    opt, topt = _pair(ours, ref)
    gen = torch.Generator().manual_seed(392)
    with pytest.warns(UserWarning, match="torch's own ops"):
        _run_non_contiguous(ours, ref, opt, topt, gen, dtype)
    assert opt.state[ours[0]]["momentum_buffer"].stride() == \
        topt.state[ref[0]]["momentum_buffer"].stride() == (1, 97)


def _run_non_contiguous(ours, ref, opt, topt, gen, dtype):
    for step in range(STEPS):
        grads = _grads_both(ours, ref, gen)
        gt = make_values([(33, 97)], dtype, seed=400 + step)[0].t()
        assert not gt.is_contiguous()
        ours[0].grad, ref[0].grad = gt.clone(), gt.clone()  # clone keeps the transposed strides
        assert ours[0].grad.stride() == (1, 97)
        _step_both(opt, topt, ours, ref, what=f"step {step + 1}:")
        assert torch.equal(ours[0].grad, gt) and torch.equal(ours[1].grad, grads[1])
        # bf16/fp16: torch's bits depend on its loop over mixed layouts, which the kernel does
        # not model; and the buffer is transposed like the first gradient: torch's own ops
        assert sorted(flat_paths(opt)) == ["flat", "torch-ops"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_channels_last_conv_weight(dtype):
    torch.manual_seed(411)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 5, 3)).to(dtype)
    model = model.to(memory_format=torch.channels_last)
    tmodel = copy.deepcopy(model)
    w = model[0].weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    opt = momentum_cuda.SGD(model.parameters(), **H)
    topt = torch.optim.SGD(tmodel.parameters(), foreach=False, **H)
    model(torch.randn(1, 3, 9, 9).to(dtype)).float().sum().backward()  # attaches the views
    for m in (model[0], model[2]):  # still channels_last, now as views of the flat buffer
        assert m.weight.is_contiguous(memory_format=torch.channels_last)
        assert not m.weight.is_contiguous()
        assert m.weight.grad.stride() == m.weight.stride()
    _check_views(list(model.parameters()))
    gen = torch.Generator().manual_seed(412)
    for step in range(STEPS):
        x = torch.randn(2, 3, 9, 9, generator=gen).to(dtype).contiguous(
            memory_format=torch.channels_last)
        opt.zero_grad()
        topt.zero_grad()
        model(x).float().square().mean().backward()
        tmodel(x).float().square().mean().backward()
        _step_both(opt, topt, list(model.parameters()), list(tmodel.parameters()),
                   what=f"step {step + 1}:")
        assert flat_paths(opt) == ["flat"]
        for m in (model[0], model[2]):
            assert m.weight.is_contiguous(memory_format=torch.channels_last)
            assert opt.state[m.weight]["momentum_buffer"].stride() == m.weight.stride()


# ---- unused parameters ------------------------------------------------------------------------
class _TwoHeads(torch.nn.Module):
    """head_b is used only when asked: an unused parameter in the other steps."""

    def __init__(self):
        super().__init__()
        self.trunk = torch.nn.Linear(7, 9)
        self.head_a = torch.nn.Linear(9, 3)
        self.head_b = torch.nn.Linear(9, 3)

    def forward(self, x, use_b):
        h = torch.tanh(self.trunk(x))
        return self.head_a(h) + (self.head_b(h) if use_b else 0)


def _run_two_heads(momentum, seed, zero_ours, zero_torch, check):
    torch.manual_seed(seed)
    model = _TwoHeads()
    tmodel = copy.deepcopy(model)
    h = {**H, "momentum": momentum}
    opt = momentum_cuda.SGD(model.parameters(), **h)
    topt = torch.optim.SGD(tmodel.parameters(), foreach=False, **h)
    gen = torch.Generator().manual_seed(seed + 1)
    for step in range(STEPS):
        x = torch.randn(4, 7, generator=gen)
        zero_ours(opt)
        zero_torch(topt)
        use_b = step == 0
        model(x, use_b).square().mean().backward()
        tmodel(x, use_b).square().mean().backward()
        before = model.head_b.weight.detach().clone()
        _step_both(opt, topt, list(model.parameters()), list(tmodel.parameters()),
                   what=f"step {step + 1}:")
        check(use_b, before, model)
        assert set(flat_paths(opt)) == {"flat"}  # the flat layout holds throughout


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_unused_param_zero_grad_false_is_torch_set_to_none_false(momentum):
    """opt.zero_grad(set_to_none=False) is torch's: head_b, used in step 1 only, keeps a zero
    gradient and is still moved (momentum, weight decay)."""
    def check(use_b, before, model):
        assert torch.equal(model.head_b.weight.grad, torch.zeros_like(before)) or use_b
        if not use_b:  # weight decay (and momentum) keep moving it, as in torch
            assert not torch.equal(model.head_b.weight, before)
    _run_two_heads(momentum, 421, lambda o: o.zero_grad(set_to_none=False),
                   lambda o: o.zero_grad(set_to_none=False), check)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_unused_param_default_zero_grad_is_torch_default(momentum):
    """opt.zero_grad() (flat, default) is torch's default (set_to_none=True): head_b, used in
    step 1 only, has .grad None afterwards and is skipped, as torch skips it; and the step stays
    on the flat path (backward attaches the views of the parameters it reaches)."""
    def check(use_b, before, model):
        if not use_b:
            assert torch.equal(model.head_b.weight, before)
    _run_two_heads(momentum, 425, lambda o: o.zero_grad(), lambda o: o.zero_grad(), check)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_unused_param_set_to_none_is_skipped_like_torch_default(momentum):
    """opt.zero_grad(set_to_none=True), given explicitly, is the default: a parameter without a
    gradient is skipped, like torch.optim.SGD with its default zero_grad(), and the others stay
    on the flat path."""
    torch.manual_seed(431)
    model = _TwoHeads()
    tmodel = copy.deepcopy(model)
    h = {**H, "momentum": momentum}
    opt = momentum_cuda.SGD(model.parameters(), **h)
    topt = torch.optim.SGD(tmodel.parameters(), foreach=False, **h)
    gen = torch.Generator().manual_seed(432)
    for step in range(STEPS):
        x = torch.randn(4, 7, generator=gen)
        opt.zero_grad(set_to_none=True)
        topt.zero_grad()
        use_b = step in (0, 5)
        model(x, use_b).square().mean().backward()
        tmodel(x, use_b).square().mean().backward()
        before = model.head_b.weight.detach().clone()
        assert (model.head_b.weight.grad is None) == (not use_b)
        _step_both(opt, topt, list(model.parameters()), list(tmodel.parameters()),
                   what=f"step {step + 1}:")
        if not use_b:
            assert torch.equal(model.head_b.weight, before)
        assert set(flat_paths(opt)) == {"flat"}, opt.last_step


@pytest.mark.parametrize("loop", ["step-then-zero_grad", "zero_grad-then-step"])
def test_never_used_param_like_torch_set_to_none_false(loop):
    """A parameter that never gets a gradient. torch never touches it: its .grad stays None
    (zero_grad(set_to_none=False) only zeroes gradients that exist), so neither weight decay
    nor momentum applies; the same with torch's default zero_grad(), which opt.zero_grad() is.
    The loop `backward(); step(); zero_grad()` runs its first step before any zero_grad().
    Both loops must leave the never-used parameter exactly where it was, as torch does."""
    torch.manual_seed(441)
    model = _TwoHeads()
    tmodel = copy.deepcopy(model)
    opt = momentum_cuda.SGD(model.parameters(), **H)
    topt = torch.optim.SGD(tmodel.parameters(), foreach=False, **H)
    gen = torch.Generator().manual_seed(442)
    b0 = model.head_b.weight.detach().clone()
    for step in range(4):
        x = torch.randn(4, 7, generator=gen)
        if loop == "zero_grad-then-step":
            opt.zero_grad()
            topt.zero_grad(set_to_none=False)
        model(x, False).square().mean().backward()
        tmodel(x, False).square().mean().backward()
        assert tmodel.head_b.weight.grad is None
        _step_both(opt, topt, list(model.parameters()), list(tmodel.parameters()),
                   what=f"step {step + 1}:")
        if loop == "step-then-zero_grad":
            opt.zero_grad()
            topt.zero_grad(set_to_none=False)
    assert torch.equal(model.head_b.weight, b0)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_never_used_param_is_never_touched(wd):
    """A parameter no backward ever reaches keeps its bits and gets no state, as in torch, on
    the first step too (before any zero_grad)."""
    w, u = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3))
    u0 = u.detach().clone()
    opt = momentum_cuda.SGD([w, u], lr=0.1, momentum=0.9, weight_decay=wd)
    for step in range(3):
        (2 * w).square().sum().backward()
        opt.step()
        assert torch.equal(u, u0), f"step {step + 1}: the unused parameter moved"
        assert "momentum_buffer" not in opt.state.get(u, {})
        opt.zero_grad()


def test_step_bumps_versions_like_torch():
    """The kernel writes through raw pointers; autograd must still see the in-place update: a
    parameter saved for backward, then stepped, makes backward raise, as with torch's SGD."""
    for make in (lambda ps: momentum_cuda.SGD(ps, lr=0.1, momentum=0.9),
                 lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False)):
        w = torch.nn.Parameter(torch.randn(4))
        opt = make([w])
        w.square().sum().backward()
        opt.step()
        loss = w.square().sum()  # saves w
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_lent_gradients_zero_grad_touches_only_this_optimizers():
    """Gradients read in place from someone else's bucket (DDP's, gradient_as_bucket_view):
    zero_grad(set_to_none=False) zeroes this optimizer's gradients one by one, as torch does,
    never the other gradients of that bucket; set_to_none=True writes nothing into it."""
    ours, ref = twin_params(make_values([5, 8, 3], torch.float32, seed=561))
    opt, topt = _pair(ours, ref)
    other = torch.nn.Parameter(torch.randn(4))  # a parameter of the same bucket, not ours
    bucket = torch.randn(5 + 8 + 3 + 4)
    offs = [4, 9, 17]
    for p, o in zip(ours, offs):
        p.grad = bucket[o:o + p.numel()].view_as(p)
    other.grad = bucket[:4]
    for q, p in zip(ref, ours):
        q.grad = p.grad.clone()
    _step_both(opt, topt, ours, ref, what="lent:")
    assert flat_paths(opt) == ["flat"] and all(p.grad.data_ptr() ==
                                               bucket[o:].data_ptr() for p, o in zip(ours, offs))
    before = bucket.clone()
    opt.zero_grad(set_to_none=True)
    topt.zero_grad(set_to_none=True)
    assert torch.equal(bucket, before)
    for p, o in zip(ours, offs):
        p.grad = bucket[o:o + p.numel()].view_as(p)
    for q, p in zip(ref, ours):
        q.grad = p.grad.clone()
    opt.zero_grad(set_to_none=False)
    topt.zero_grad(set_to_none=False)
    assert torch.equal(other.grad, before[:4]) and not bucket[4:].any()
    _step_both(opt, topt, ours, ref, what="after zero_grad(set_to_none=False):")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grads_as_views_of_another_bucket(dtype):
    """What DDP does with gradient_as_bucket_view=True: every .grad becomes a view of DDP's own
    flat bucket (other offsets, reversed order). The group is laid out again at the offsets of
    that bucket and the flat call reads the gradients in place (a new bucket every step here:
    laid out every step); after opt.zero_grad() and a backward without the bucket it is laid
    out in its own buffers again. torch's bits throughout, on the flat path."""
    ours, ref = twin_params(make_values([97, (9, 7), 3, 33, 1], dtype, seed=551))
    opt, topt = _pair(ours, ref)
    gen = torch.Generator().manual_seed(552)
    for step in range(STEPS):
        grads = fresh_grads(ours, gen)
        ddp = step < 5
        if ddp:  # a bucket in reverse parameter order, as DDP builds them
            bucket = torch.empty(sum(g.numel() for g in grads) + 7, dtype=dtype)
            off = 7  # DDP offsets need not be aligned
            for p, g in reversed(list(zip(ours, grads))):
                p.grad = bucket[off:off + g.numel()].view_as(g)
                p.grad.copy_(g)
                off += g.numel()
        else:
            if step == 5:
                opt.zero_grad()  # .grad None: backward attaches the flat views again
                backward_grads(ours, grads)
            else:
                for p, g in zip(ours, grads):
                    p.grad.copy_(g)
        for q, g in zip(ref, grads):
            q.grad = g.clone()
        _step_both(opt, topt, ours, ref, what=f"step {step + 1}:")
        assert set(flat_paths(opt)) == {"flat"}, opt.last_step
        if ddp:  # read where they are: .grad is still the bucket's view
            assert all(p.grad.untyped_storage().data_ptr() == bucket.untyped_storage().data_ptr()
                       for p in ours)


def _momentum_pair(ours, ref, **h):
    from momentum_cuda.reference import MomentumReference
    h = dict(lr=0.1, momentum=0.9, weight_decay=1e-2, **h)
    return momentum_cuda.Momentum(ours, **h), MomentumReference(ref, **h)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pair,h", [(_pair, dict()), (_pair, dict(momentum=0.0)),
                                    (_pair, dict(dampening=0.3, maximize=True)),
                                    (_momentum_pair, dict(maximize=True))],
                         ids=["damp-wd", "no-momentum", "damp-max", "ema"])
def test_lent_buckets_step_in_one_call(dtype, pair, h):
    """Gradients spread over four buckets of someone else's (DDP's, several 25 MiB buckets;
    the last holds one gradient and nothing else, as DDP's bucket of a large tensor does): ONE
    kernel call per step over all of them (joined spans for fp32/fp64, one per parameter for
    the CPU's bf16/fp16, whose bits depend on positions), torch's bits, first step included;
    the buckets stay the same objects step after step, as DDP's do."""
    sizes = [97, (9, 7), 3, 33, 1, 0, (4, 5), 64, 2]
    ours, ref = twin_params(make_values(sizes, dtype, seed=571))
    opt, topt = pair(ours, ref, **h)
    gen = torch.Generator().manual_seed(572)
    cuts = [0, 3, 6, len(ours) - 1, len(ours)]
    buckets = []
    for a, b in zip(cuts, cuts[1:]):  # reversed within each bucket, 5 elements of another's first
        pad = 5 if b - a > 1 else 0
        bucket = torch.full((pad + sum(p.numel() for p in ours[a:b]),), 7.0, dtype=dtype)
        off = pad
        for p in reversed(ours[a:b]):
            p.grad = bucket[off:off + p.numel()].view_as(p)
            off += p.numel()
        buckets.append(bucket)
    for step in range(STEPS):
        for p, g in zip(ours, fresh_grads(ours, gen)):
            p.grad.copy_(g)
        for q, p in zip(ref, ours):
            q.grad = p.grad.clone()
        _step_both(opt, topt, ours, ref, what=f"step {step + 1}:")
        assert [(c["path"], c["tensors"]) for c in opt.last_step] == [("flat", len(ours))]
        assert all(b[:5].eq(7.0).all() for b in buckets[:-1])  # another's, never written
