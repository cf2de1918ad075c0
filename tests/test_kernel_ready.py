"""momentum_cuda._C.kernel_ready (one C++ call per group and step, optim._plan) against the Python
check it stands in for, optim._check_loose: True exactly where _check_loose returns None without
raising, on triples that each break one condition (and a few that break none)."""
from __future__ import annotations

import pytest
import torch

import momentum_cuda
from momentum_cuda import _C

H = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)


def _t(*shape, dtype=torch.float32, **kw):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)),
                       dtype=torch.float32, **kw).to(dtype)


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _size1(t):
    """t's values laid out as t is but with other strides on its dimensions of size 1."""
    strides = [s + 7 if n == 1 else s for n, s in zip(t.shape, t.stride())]
    return torch.empty_strided(t.shape, strides, dtype=t.dtype).copy_(t)


CASES = {
    "fp32": lambda: (_t(7), _t(7), _t(7)),
    "no buffer": lambda: (_t(7), _t(7), None),
    "bf16": lambda: (_t(7, dtype=torch.bfloat16), _t(7, dtype=torch.bfloat16),
                     _t(7, dtype=torch.bfloat16)),
    "fp16 channels_last": lambda: (_cl(_t(2, 3, 4, 5, dtype=torch.float16)),
                                   _cl(_t(2, 3, 4, 5, dtype=torch.float16)),
                                   _cl(_t(2, 3, 4, 5, dtype=torch.float16))),
    "empty": lambda: (_t(0), _t(0), _t(0)),
    "fp32 grad transposed": lambda: (_t(4, 6), _t(6, 4).t(), _t(4, 6)),
    "bf16 grad transposed": lambda: (_t(4, 6, dtype=torch.bfloat16),
                                     _t(6, 4, dtype=torch.bfloat16).t(),
                                     _t(4, 6, dtype=torch.bfloat16)),
    "buffer transposed": lambda: (_t(4, 6), _t(4, 6), _t(6, 4).t()),
    "buffer fp64": lambda: (_t(7), _t(7), _t(7, dtype=torch.float64)),
    "grad fp64": lambda: (_t(7), _t(7, dtype=torch.float64), _t(7)),
    "grad shape": lambda: (_t(7), _t(8), _t(7)),
    "buffer shape": lambda: (_t(7), _t(7), _t(8)),
    "grad sparse": lambda: (_t(7), _t(7).to_sparse(), _t(7)),
    "buffer sparse": lambda: (_t(7), _t(7), _t(7).to_sparse()),
    "complex": lambda: (_t(7, dtype=torch.complex64), _t(7, dtype=torch.complex64),
                        _t(7, dtype=torch.complex64)),
    "meta": lambda: (torch.empty(7, device="meta"), torch.empty(7, device="meta"),
                     torch.empty(7, device="meta")),
    "grad on meta": lambda: (_t(7), torch.empty(7, device="meta"), _t(7)),
    "strided slice": lambda: (_t(14)[::2], _t(14)[::2], _t(14)[::2]),
    "integer": lambda: (torch.arange(7), torch.arange(7), torch.arange(7)),
    # other strides on dimensions of size 1 only: laid out alike (optim._same_layout), and for
    # bf16/fp16 walked alike by torch's ops where the parameter is contiguous or channels_last
    # (optim._walked_alike)
    "bf16 grad size-1 stride": lambda: (_t(3, 1, 5, dtype=torch.bfloat16),
                                        _size1(_t(3, 1, 5, dtype=torch.bfloat16)),
                                        _t(3, 1, 5, dtype=torch.bfloat16)),
    "fp16 channels_last buffer size-1 stride": lambda: (
        _cl(_t(2, 3, 1, 4, dtype=torch.float16)), _cl(_t(2, 3, 1, 4, dtype=torch.float16)),
        _size1(_cl(_t(2, 3, 1, 4, dtype=torch.float16)))),
    "fp32 buffer size-1 stride": lambda: (_t(3, 1, 5), _t(3, 1, 5), _size1(_t(3, 1, 5))),
    "bf16 permuted grad size-1 stride": lambda: (
        _t(5, 1, 3, dtype=torch.bfloat16).permute(2, 1, 0),
        _size1(_t(5, 1, 3, dtype=torch.bfloat16).permute(2, 1, 0)),
        _t(5, 1, 3, dtype=torch.bfloat16).permute(2, 1, 0)),
    "fp32 permuted buffer size-1 stride": lambda: (
        _t(5, 1, 3).permute(2, 1, 0), _t(5, 1, 3).permute(2, 1, 0),
        _size1(_t(5, 1, 3).permute(2, 1, 0))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_ready_mirrors_check_loose(case):
    p, g, b = CASES[case]()
    opt = momentum_cuda.SGD([torch.nn.Parameter(torch.zeros(1))], **H)
    try:
        python_ready = opt._check_loose(p, g, b, H) is None
    except Exception:
        python_ready = False
    assert _C.kernel_ready([p], [g], [b]) == [python_ready], case


def test_kernel_ready_one_entry_each():
    with pytest.raises(RuntimeError, match="one entry each, got 1, 0 and 1"):
        _C.kernel_ready([_t(3)], [], [None])


def test_both_answers_occur():
    """The cases above are not all one answer: the kernels take exactly these."""
    ready = {case for case in CASES if _C.kernel_ready(*([x] for x in CASES[case]()))[0]}
    assert ready == {"fp32", "no buffer", "bf16", "fp16 channels_last", "empty",
                     "fp32 grad transposed", "bf16 grad size-1 stride",
                     "fp16 channels_last buffer size-1 stride", "fp32 buffer size-1 stride",
                     "fp32 permuted buffer size-1 stride"}


def _bucket(n=5):
    """A BucketCheck over n parameters with flat gradient and buffer views, those views, and
    the buffers' storage (check's buf_storage: each view over it at its parameter's offset)."""
    flat_p, flat_g, flat_b = (torch.randn(3 * n + 1) for _ in range(3))  # (+1: room to shift)
    params = [torch.nn.Parameter(flat_p[3 * i:3 * i + 3]) for i in range(n)]
    gviews = [flat_g[3 * i:3 * i + 3] for i in range(n)]
    bviews = [flat_b[3 * i:3 * i + 3] for i in range(n)]
    for p, g in zip(params, gviews):
        p.grad = g
    check = _C.BucketCheck(params, gviews, [p.data_ptr() for p in params],
                           [g.data_ptr() for g in gviews], flat_p, flat_g,
                           [(p.shape, p.stride()) for p in params])
    return check, params, bviews, flat_b.untyped_storage()._cdata


def _state(params, bufs):
    from collections import defaultdict
    state = defaultdict(dict)
    for p, b in zip(params, bufs):
        if b is not ...:
            state[p]["momentum_buffer"] = b
    return state


@pytest.mark.parametrize("case,want", [
    ("all views", 0), ("no entries", 1), ("all None", 1), ("entries without key", 1),
    ("one None", 2), ("one other tensor", 2), ("one moved", 2), ("one missing", 2),
    ("views list short", 2),
    ("no views list", 1), ("entry not a dict", 2), ("state not a dict", 2),
])
def test_bucket_buffers(case, want):
    """BucketCheck.check (optim._whole_bucket_run's read of state[p]['momentum_buffer'] for a
    whole bucket): 0 only if every buffer is its flat view, 1 only if none has one, else 2;
    -1 whenever a parameter is not intact, whatever the buffers."""
    check, params, views, shift = _bucket()
    views_arg = list(views)
    if case == "all views":
        state = _state(params, views)
    elif case == "no entries":
        state = _state(params, [...] * 5)
    elif case == "all None":
        state = _state(params, [None] * 5)
    elif case == "entries without key":
        state = _state(params, [...] * 5)
        for p in params:
            state[p]["other"] = 1
    elif case == "one None":
        state = _state(params, views[:2] + [None] + views[3:])
    elif case == "one other tensor":
        state = _state(params, views[:4] + [views[4].clone()])
    elif case == "one moved":  # the view itself, given other memory (buf.data = ...)
        state = _state(params, views)
        views[1].data = views[1].data.clone()
    elif case == "one missing":
        state = _state(params, views[:1] + [...] + views[2:])
    elif case == "views list short":
        state = _state(params, views)
        views_arg = views_arg[:4]
    elif case == "no views list":
        state = _state(params, [None] * 5)
        views_arg = None
    elif case == "entry not a dict":
        state = _state(params, views)
        state[params[2]] = [views[2]]
    else:
        state = list(_state(params, views).items())
    assert check.check(state, views_arg, shift) == want
    assert check.check(None, None, shift) == 0
    params[3].grad = params[3].grad.clone()  # no longer its flat view
    assert check.check(state, views_arg, shift) == -1
    assert check.check(None, None, shift) == -1


@pytest.mark.parametrize("n", [1, 5, 40])
@pytest.mark.parametrize("broken", [None, 0, "middle", "last"])
def test_bucket_intact_at_every_position(n, broken):
    """BucketCheck.check over buckets longer than its prefetch distance (it reads ahead of the
    parameter it checks): one parameter not intact, at the start, the middle or the end, gives
    -1; a moved parameter (set_ to other memory) or gradient likewise, and a parameter or
    gradient over the right storage at another offset. A flat storage given other memory
    (resize_) moves every tensor over it: -1 too."""
    check, params, views, shift = _bucket(n)
    state = _state(params, views)
    if broken is None:
        assert check.check(state, views, shift) == 0
        return
    i = {0: 0, "middle": n // 2, "last": n - 1}[broken]
    for how in ("grad replaced", "param moved", "grad moved", "grad None", "param shifted",
                "grad shifted", "param storage resized", "grad storage resized"):
        check, params, views, shift = _bucket(n)
        state = _state(params, views)
        assert check.check(state, views, shift) == 0
        with torch.no_grad():
            if how == "grad replaced":
                params[i].grad = params[i].grad.clone()
            elif how == "param moved":
                params[i].set_(params[i].clone())
            elif how == "grad moved":
                params[i].grad.set_(params[i].grad.clone())
            elif how in ("param shifted", "grad shifted"):  # same storage, one element on
                t = params[i] if how == "param shifted" else params[i].grad
                t.set_(t.untyped_storage(), t.storage_offset() + 1, t.shape, t.stride())
            elif how in ("param storage resized", "grad storage resized"):
                s = (params[i] if how == "param storage resized" else params[i].grad
                     ).untyped_storage()
                s.resize_(s.nbytes() + 64)  # new memory, same StorageImpl
            else:
                params[i].grad = None
        assert check.check(state, views, shift) == -1, (n, i, how)
        assert check.check(None, None, shift) == -1, (n, i, how)


def test_bucket_holds_its_storages_weakly():
    """A BucketCheck holds the flat storages it compares against without raising their use
    counts (optim._alone reads them to decide whether anyone else sees a bucket's memory), and
    a storage whose last tensor is gone fails the check instead of matching a new one."""
    from momentum_cuda.optim import _use_count
    flat_p, flat_g = torch.randn(7), torch.randn(7)
    p = torch.nn.Parameter(torch.empty(0).set_(flat_p.untyped_storage(), 2, (3,), (1,)))
    g = torch.empty(0).set_(flat_g.untyped_storage(), 2, (3,), (1,))
    p.grad = g
    counts = (_use_count(flat_p), _use_count(flat_g))
    check = _C.BucketCheck([p], [g], [p.data_ptr()], [g.data_ptr()], flat_p, flat_g,
                           [(p.shape, p.stride())])
    assert (_use_count(flat_p), _use_count(flat_g)) == counts
    assert check.check(None, None, 0) == 0
    del flat_g
    g.set_(torch.randn(3))  # the flat gradient storage's last holder lets go of it
    p.grad = g
    assert check.check(None, None, 0) == -1


@pytest.mark.parametrize("n", [1, 40])
def test_bucket_bump(n):
    """BucketCheck.bump(i0, i1): each of params[i0:i1]'s version counters up by one (as the
    in-place op that wrote them through the flat buffer would), no other's; a range outside the
    bucket raises before any is bumped."""
    # own version counters (the optimizer's parameters are set_ onto the flat buffer, not
    # views of it: _bucket's views would share their base's counter)
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(3)
    check = _C.BucketCheck(params, [p.grad for p in params], [p.data_ptr() for p in params],
                           [p.grad.data_ptr() for p in params], params[0], params[0].grad,
                           [(p.shape, p.stride()) for p in params])
    before = [p._version for p in params]
    i0, i1 = (0, 1) if n == 1 else (3, 37)
    check.bump(i0, i1)
    assert [p._version - v for p, v in zip(params, before)] == [
        int(i0 <= k < i1) for k in range(n)]
    check.bump(0, n)
    for bad in ((0, n + 1), (2, 1) if n > 1 else (1, 0)):
        with pytest.raises(RuntimeError, match=r"BucketCheck.bump: \[\d+, \d+\) is not a range"):
            check.bump(*bad)
    assert [p._version - v for p, v in zip(params, before)] == [
        1 + int(i0 <= k < i1) for k in range(n)]


def _list_check(n=6, gen_seed=31):
    """A ListCheck over n parameters with gradients and momentum buffers (state key
    "momentum_buffer"), armed with SGD hyper-parameters, and the state dict it reads."""
    from collections import defaultdict
    gen = torch.Generator().manual_seed(gen_seed)
    params = [torch.nn.Parameter(torch.randn(3 + i, generator=gen)) for i in range(n)]
    bufs = [torch.randn(3 + i, generator=gen) for i in range(n)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    state = defaultdict(dict)
    for p, b in zip(params, bufs):
        state[p]["momentum_buffer"] = b
    check = _C.ListCheck(params, True, ["momentum_buffer"], [[b] for b in bufs], [False] * n)
    check.forbid([(t.data_ptr(), t.nbytes) for t in params + bufs])
    check.arm(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False,
              maximize=False)
    return check, params, bufs, state


def test_list_replay_is_the_op():
    """ListCheck.replay (the one-call replay of a lone list call): the op's bits on the
    gradients it finds, and the op's version bumps (parameters and buffers, not gradients)."""
    check, params, bufs, state = _list_check()
    twins = [p.detach().clone() for p in params]
    tbufs = [b.clone() for b in bufs]
    versions = [(p._version, b._version, p.grad._version) for p, b in zip(params, bufs)]
    assert check.replay(state)
    torch.ops.momentum_cuda.sgd_step_list_(twins, [p.grad for p in params], tbufs, lr=0.1,
                                           momentum=0.9, dampening=0.0, weight_decay=0.01,
                                           nesterov=False, maximize=False, first_step=False)
    assert all(torch.equal(p, t) for p, t in zip(params, twins))
    assert all(torch.equal(b, t) for b, t in zip(bufs, tbufs))
    assert [(p._version, b._version, p.grad._version) for p, b in zip(params, bufs)] == [
        (v + 1, w + 1, g) for v, w, g in versions]


@pytest.mark.parametrize("how", ["grad is a param", "grad in a buffer", "grads shared",
                                 "grads overlap", "buffer replaced", "grad gone"])
def test_list_replay_refuses_what_the_kept_step_cannot_take(how):
    """ListCheck.replay returns False, writing nothing, where a gradient now shares memory with
    the step's parameters, buffers or another gradient (torch's for-loop would read what the
    parameters before it wrote: planned again, then torch's ops), a buffer is not the one
    kept, or a gradient is gone."""
    check, params, bufs, state = _list_check()
    with torch.no_grad():
        if how == "grad is a param":
            params[1].grad = params[1].detach()
        elif how == "grad in a buffer":
            params[3].grad = bufs[4][:6]
        elif how == "grads shared":
            params[0].grad = params[5].grad[:3]
        elif how == "grads overlap":
            big = torch.randn(20)
            params[0].grad, params[1].grad = big[:3], big[2:6]
        elif how == "buffer replaced":
            state[params[4]]["momentum_buffer"] = bufs[4].clone()
        else:
            params[2].grad = None
    before = [p.detach().clone() for p in params] + [b.clone() for b in bufs]
    assert not check.replay(state)
    assert all(torch.equal(a, b) for a, b in zip(before, [p.detach() for p in params] + bufs))
