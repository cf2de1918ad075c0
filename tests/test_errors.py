"""Bad inputs: every one raises a clear error that names the argument and the bad value, and
changes NO tensor (each is cloned before the call and compared with torch.equal after).

The ops' CPU implementations (torch.ops.momentum_cuda.sgd_step_flat_ and sgd_step_list_, the
latter also with one item: "single") promise to validate everything before touching memory
(csrc/momentum_ops.cpp). In the list entry
the bad item is always the LAST one (index 2), so a check that ran item by item, updating as it
went, would have changed params[0] and params[1] already: the snapshot catches that.

The optimizer classes: torch.optim.SGD's own ValueErrors (compared with torch's messages),
Momentum's range check, backend names, and errors at step time (sparse gradient, a non-finite
hyper-parameter), which must leave parameters AND optimizer state as they were.
"""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import momentum_cuda
from momentum_cuda import _C

OPS = torch.ops.momentum_cuda

N = 10  # elements per tensor in the entry-point cases
BAD = 2  # index of the bad item in the list entry
HYPER = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=False,
             maximize=False, first_step=False)


def rnd(shape, gen, dtype=torch.float32) -> torch.Tensor:
    """Fresh random values, never zeros."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    t = torch.where(t == 0, torch.ones_like(t), t)
    return t.to(dtype)


@pytest.fixture
def gen(request):
    # a fixed, per-test seed: fresh values for every test, reproducible runs
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ---- snapshot: clone every inspectable tensor, compare after ---------------------------------
def _inspectable(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "cpu"


def snapshot(tensors):
    out = []
    for t in tensors:
        if not _inspectable(t):
            continue
        out.append((t, t.to_dense().clone() if t.layout != torch.strided else t.clone()))
    return out


def assert_unchanged(snap, what=""):
    for k, (t, before) in enumerate(snap):
        now = t.to_dense() if t.layout != torch.strided else t
        assert torch.equal(now, before), f"{what}: tensor #{k} (shape {tuple(t.shape)}) changed"


def expect_error(fn, tensors, fragments, exc=RuntimeError):
    """fn() must raise exc whose message contains every fragment, and change no tensor."""
    snap = snapshot(tensors)
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"error message lacks {f!r}: {msg!r}"
    assert_unchanged(snap, f"after {msg.splitlines()[0]!r}")
    return msg


# ---- the three entry points, one bad (param, grad, buf) triple --------------------------------
def _call(entry, p, g, b, segments=None, **over):
    h = dict(HYPER, **over)
    if entry == "single":
        OPS.sgd_step_list_([p], [g], [] if b is None else [b], **h)
    elif entry == "flat":
        seg = segments if segments is not None else torch.tensor([[0, p.numel()]])
        OPS.sgd_step_flat_(p, g, b, seg, **h)
    else:
        raise AssertionError(entry)


def _list_call(ps, gs, bs, **over):
    OPS.sgd_step_list_(ps, gs, bs, **dict(HYPER, **over))


def _good(gen, n=N, dtype=torch.float32):
    return rnd(n, gen, dtype), rnd(n, gen, dtype), rnd(n, gen, dtype)


# Each case builds the bad triple (p, g, b) and says which argument the message must name
# ("p", "g" or "b": params[i] / grads[i] / momentum_buffers[i]) and which value fragments it
# must contain. `flat` is False for cases the flat entry cannot express (it takes 1-D
# contiguous buffers only) or a different (name, fragments) for the flat entry's own check.
CASES = {
    # dtype
    "param_int32": (lambda gen: tuple(rnd(N, gen).mul(10).to(torch.int32) for _ in range(3)),
                    "p", ["Int", "float32, float64, bfloat16 or float16"], None),
    "param_complex": (lambda gen: tuple(torch.complex(rnd(N, gen), rnd(N, gen)) for _ in range(3)),
                      "p", ["ComplexFloat"], None),
    "param_float_grad_double": (lambda gen: (rnd(N, gen), rnd(N, gen, torch.float64), rnd(N, gen)),
                                "g", ["Double", "Float"], None),
    "grad_complex": (lambda gen: (rnd(N, gen), torch.complex(rnd(N, gen), rnd(N, gen)), rnd(N, gen)),
                     "g", ["ComplexFloat"], None),
    "buf_bf16": (lambda gen: (rnd(N, gen), rnd(N, gen), rnd(N, gen, torch.bfloat16)),
                 "b", ["BFloat16", "Float"], None),
    "buf_int32": (lambda gen: (rnd(N, gen), rnd(N, gen), rnd(N, gen).mul(10).to(torch.int32)),
                  "b", ["Int"], None),
    # device (meta tensors stand in for a non-CPU device)
    "param_meta": (lambda gen: (torch.empty(N, device="meta"), rnd(N, gen), rnd(N, gen)),
                   "p", ["meta", "cpu"], None),
    "grad_meta": (lambda gen: (rnd(N, gen), torch.empty(N, device="meta"), rnd(N, gen)),
                  "g", ["meta", "cpu"], None),
    "buf_meta": (lambda gen: (rnd(N, gen), rnd(N, gen), torch.empty(N, device="meta")),
                 "b", ["meta", "cpu"], None),
    # size / shape
    "grad_longer": (lambda gen: (rnd(N, gen), rnd(N + 1, gen), rnd(N, gen)),
                    "g", ["[11]", "[10]"], None),
    "buf_shorter": (lambda gen: (rnd(N, gen), rnd(N, gen), rnd(N - 1, gen)),
                    "b", ["[9]", "[10]"], None),
    "grad_reshaped": (lambda gen: (rnd(N, gen), rnd((2, 5), gen), rnd(N, gen)),
                      "g", ["[2, 5]", "[10]"], False),
    # layout
    "param_strided_slice": (lambda gen: (rnd(2 * N, gen)[::2], rnd(2 * N, gen)[::2],
                                         rnd(2 * N, gen)[::2]),
                            "p", ["dense", "[2]"], ("param", ["contiguous 1-D", "[2]"])),
    "grad_strides_differ": (lambda gen: (rnd((5, 4), gen).t(), rnd((4, 5), gen), rnd((5, 4), gen).t()),
                            "g", ["strides", "[5, 1]", "[1, 4]"], False),
    "buf_strides_differ": (lambda gen: (rnd((5, 4), gen).t(), rnd((5, 4), gen).t(), rnd((4, 5), gen)),
                           "b", ["strides", "[5, 1]", "[1, 4]"], False),
    "grad_strided_slice": (lambda gen: (rnd(N, gen), rnd(2 * N, gen)[::2], rnd(N, gen)),
                           "g", ["strides", "[2]", "[1]"], ("grad", ["contiguous 1-D", "[2]"])),
}


def _overlap_cases():
    def grad_is_param(gen):
        p = rnd(N, gen)
        return p, p, rnd(N, gen)

    def buf_is_param(gen):
        p = rnd(N, gen)
        return p, rnd(N, gen), p

    def buf_is_grad(gen):
        g = rnd(N, gen)
        return rnd(N, gen), g, g

    def buf_partially_overlaps_param(gen):
        s = rnd(2 * N, gen)
        return s[0:N], rnd(N, gen), s[N // 2:N // 2 + N]

    def grad_partially_overlaps_param(gen):
        s = rnd(2 * N, gen)
        return s[0:N], s[N - 1:2 * N - 1], rnd(N, gen)

    def grad_is_view_of_param(gen):
        p = rnd(N, gen)
        return p, p.view(2, 5).view(-1), rnd(N, gen)

    return {
        "grad_is_param": (grad_is_param, "g", ["overlaps", "param"], None),
        "grad_is_view_of_param": (grad_is_view_of_param, "g", ["overlaps", "param"], None),
        "buf_is_param": (buf_is_param, "b", ["overlaps", "param"], None),
        "buf_is_grad": (buf_is_grad, "b", ["overlaps", "grad"], None),
        "buf_partially_overlaps_param": (buf_partially_overlaps_param, "b", ["overlaps"], None),
        "grad_partially_overlaps_param": (grad_partially_overlaps_param, "g", ["overlaps"], None),
    }


CASES.update(_overlap_cases())
_NAMES = {"p": "params", "g": "grads", "b": "momentum_buffers"}
# Single-tensor and flat entries name their own arguments.
_SINGLE = {"p": "param", "g": "grad", "b": "momentum_buffer"}


def _sparse_case(gen):
    return rnd(N, gen), rnd(N, gen).to_sparse(), rnd(N, gen)


# The flat entry must say that the tensor is sparse ("parse" matches Sparse and sparse), not
# describe it as a strided tensor.
CASES["grad_sparse"] = (_sparse_case, "g", ["sparse"], ("grad", ["parse"]))
CASES["param_sparse"] = (lambda gen: (rnd(N, gen).to_sparse(), rnd(N, gen), rnd(N, gen)),
                         "p", ["Sparse"], ("param", ["parse"]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_single_entry(case, gen):
    build, who, frags, _ = CASES[case]
    p, g, b = build(gen)
    expect_error(lambda: _call("single", p, g, b), [p, g, b], [f"{_NAMES[who]}[0]"] + frags)


@pytest.mark.parametrize("case", sorted(CASES))
def test_list_entry_bad_item_last(case, gen):
    """Items 0 and 1 are good, item 2 is bad: the message names item 2 and items 0 and 1 keep
    their values (nothing ran before the check of the last item)."""
    build, who, frags, _ = CASES[case]
    good = [_good(gen) for _ in range(BAD)]
    bad = build(gen)
    ps, gs, bs = (list(x) for x in zip(*good, bad))
    expect_error(lambda: _list_call(ps, gs, bs), ps + gs + bs, [f"{_NAMES[who]}[{BAD}]"] + frags)


@pytest.mark.parametrize("case", sorted(c for c in CASES if CASES[c][3] is not False))
def test_flat_entry(case, gen):
    build, who, frags, flat = CASES[case]
    p, g, b = build(gen)
    if p.dim() != 1:
        pytest.skip("not a 1-D case")
    if flat is None:
        name, frags = _SINGLE[who], frags
    else:
        name, frags = flat
    segs = torch.tensor([[0, min(p.shape[0], g.shape[0], b.shape[0])]])
    expect_error(lambda: _call("flat", p, g, b, segments=segs), [p, g, b, segs], [name] + frags)


def test_good_calls_do_update(gen):
    """Control: the same harness with good tensors changes params and buffers, so the
    'unchanged' checks above can fail."""
    for entry in ("single", "flat"):
        p, g, b = _good(gen)
        snap = snapshot([p, b])
        _call(entry, p, g, b)
        assert not torch.equal(p, snap[0][1]) and not torch.equal(b, snap[1][1]), entry
    good = [_good(gen) for _ in range(3)]
    ps, gs, bs = (list(x) for x in zip(*good))
    snap = snapshot(ps + bs)
    _list_call(ps, gs, bs)
    for t, before in snap:
        assert not torch.equal(t, before)


# ---- mixed dtypes / devices between list items ---------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_list_item_dtype_differs_from_first(dtype, gen):
    good = [_good(gen) for _ in range(BAD)]
    bad = _good(gen, dtype=dtype)  # consistent within itself, differs from params[0]
    ps, gs, bs = (list(x) for x in zip(*good, bad))
    name = {torch.float64: "Double", torch.bfloat16: "BFloat16", torch.float16: "Half"}[dtype]
    expect_error(lambda: _list_call(ps, gs, bs), ps + gs + bs,
                 [f"params[{BAD}]", name, "params[0]", "Float"])


def test_list_item_device_differs_from_first(gen):
    good = [_good(gen) for _ in range(BAD)]
    bad = tuple(torch.empty(N, device="meta") for _ in range(3))
    ps, gs, bs = (list(x) for x in zip(*good, bad))
    expect_error(lambda: _list_call(ps, gs, bs), ps + gs + bs, [f"params[{BAD}]", "meta"])


# ---- tensors aliased ACROSS list items -------------------------------------------------------
def _cross_alias(gen, where):
    good = [_good(gen) for _ in range(BAD + 1)]
    ps, gs, bs = (list(x) for x in zip(*good))
    if where == "params":
        ps[BAD] = ps[0]
    elif where == "grads":
        gs[BAD] = ps[0]  # read as a gradient while item 0 writes it
    else:
        bs[BAD] = ps[0]  # written as a buffer while item 0 writes it as a parameter
    return ps, gs, bs


@pytest.mark.parametrize("where", ["params", "grads", "momentum_buffers"])
def test_list_entry_rejects_aliasing_across_items(where, gen):
    """params[2] (or grads[2], momentum_buffers[2]) IS params[0]. The kernel runs all items in
    one parallel region, so the result depends on scheduling (test_aliased_params_race shows
    wrong bits); the entry point should reject it like the same-item overlap."""
    ps, gs, bs = _cross_alias(gen, where)
    expect_error(lambda: _list_call(ps, gs, bs), ps + gs + bs, [f"{where}[{BAD}]", "overlaps"])


def test_aliased_params_race():
    """params = [a, a]: torch's for-loop (and any sequential reading of the call) applies both
    updates; the kernel splits the 2M-element range over threads that read the same memory at
    the same time, and one update is lost."""
    if torch.get_num_threads() < 2:
        pytest.skip("needs 2 threads")
    gen = torch.Generator().manual_seed(5)
    n = 1 << 20
    a, g1, g2 = rnd(n, gen), rnd(n, gen), rnd(n, gen)
    ref = a.clone().add_(g1, alpha=-0.1).add_(g2, alpha=-0.1)
    try:
        OPS.sgd_step_list_([a, a], [g1, g2], [], lr=0.1, momentum=0.0, dampening=0.0,
                              weight_decay=0.0, nesterov=False, maximize=False, first_step=False)
    except RuntimeError as e:  # rejecting the call is the fix
        assert "overlaps" in str(e)
        return
    assert torch.equal(a, ref), "aliased list items were updated concurrently (lost update)"


# ---- buffer None / list lengths / flags -------------------------------------------------------
def test_single_momentum_without_buffer(gen):
    p, g, _ = _good(gen)
    expect_error(lambda: _call("single", p, g, None), [p, g],
                 ["momentum_buffers", "momentum=0.9"])


def test_flat_momentum_without_buffer(gen):
    p, g, _ = _good(gen)
    expect_error(lambda: _call("flat", p, g, None), [p, g], ["momentum_buffer", "None",
                                                             "momentum=0.9"])


def test_list_momentum_without_buffers(gen):
    good = [_good(gen) for _ in range(3)]
    ps, gs, bs = (list(x) for x in zip(*good))
    expect_error(lambda: _list_call(ps, gs, []), ps + gs + bs,
                 ["momentum_buffers has 0", "params has 3", "momentum=0.9"])
    expect_error(lambda: _list_call(ps, gs, bs[:2]), ps + gs + bs,
                 ["momentum_buffers has 2", "params has 3"])


def test_list_none_buffer_rejected(gen):
    good = [_good(gen) for _ in range(3)]
    ps, gs, bs = (list(x) for x in zip(*good))
    bs[BAD] = None
    expect_error(lambda: _list_call(ps, gs, bs), ps + gs + bs[:BAD],
                 ["momentum_buffers", "List[Tensor]", "None"])


@pytest.mark.parametrize("short", ["grads", "params"])
def test_list_length_mismatch(short, gen):
    good = [_good(gen) for _ in range(3)]
    ps, gs, bs = (list(x) for x in zip(*good))
    if short == "grads":
        args, frags = (ps, gs[:2], bs), ["grads has 2", "params has 3"]
    else:
        args, frags = (ps[:2], gs, bs), ["grads has 3", "params has 2"]
    expect_error(lambda: _list_call(*args), ps + gs + bs, frags)


def test_list_momentum_buffers_longer_than_params(gen):
    good = [_good(gen) for _ in range(3)]
    ps, gs, bs = (list(x) for x in zip(*good))
    expect_error(lambda: _list_call(ps[:2], gs[:2], bs), ps + gs + bs,
                 ["momentum_buffers has 3", "params has 2"])


@pytest.mark.parametrize("entry", ["single", "flat", "list"])
@pytest.mark.parametrize("flag", ["nesterov", "first_step"])
def test_flag_needs_momentum(flag, entry, gen):
    p, g, b = _good(gen)
    over = {flag: True, "momentum": 0.0}
    if entry == "list":
        fn = lambda: _list_call([p], [g], [b], **over)  # noqa: E731
    else:
        fn = lambda: _call(entry, p, g, b, **over)  # noqa: E731
    expect_error(fn, [p, g, b], [flag, "momentum=0"])


@pytest.mark.parametrize("entry", ["single", "flat", "list"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", ["lr", "momentum", "dampening", "weight_decay"])
def test_non_finite_scalar(name, value, entry, gen):
    p, g, b = _good(gen)
    over = {name: value}
    if entry == "list":
        good = [_good(gen) for _ in range(2)]
        ps, gs, bs = (list(x) for x in zip(*good, (p, g, b)))
        fn, tensors = (lambda: _list_call(ps, gs, bs, **over)), ps + gs + bs
    else:
        fn, tensors = (lambda: _call(entry, p, g, b, **over)), [p, g, b]
    expect_error(fn, tensors, [f"{name} must be a finite number", f"got {value}".lower()])


# ---- segments of the flat entry --------------------------------------------------------------
SEGMENT_CASES = {
    "float_dtype": (torch.tensor([[0.0, 4.0]]), ["segments", "Float"]),
    "int32_dtype": (torch.tensor([[0, 4]], dtype=torch.int32), ["segments", "Int"]),
    "1d": (torch.tensor([0, 4]), ["segments", "shape [k, 2]", "[2]"]),
    "k_by_3": (torch.tensor([[0, 4, 1]]), ["segments", "[1, 3]"]),
    "3d": (torch.tensor([[[0, 4]]]), ["segments", "[1, 1, 2]"]),
    "non_contiguous": (torch.tensor([[0, 5], [2, 3]]).t(), ["segments", "contiguous"]),
    "meta": (torch.empty((1, 2), dtype=torch.int64, device="meta"), ["segments", "meta"]),
    "past_end": (torch.tensor([[0, 2], [4, 3], [6, 5]]), ["segments[2]", "(6, 5)", "10 elements"]),
    "offset_past_end": (torch.tensor([[0, 2], [4, 3], [11, 0]]), ["segments[2]", "(11, 0)"]),
    "negative_offset": (torch.tensor([[0, 2], [4, 3], [-1, 1]]), ["segments[2]", "(-1, 1)"]),
    "negative_numel": (torch.tensor([[0, 2], [4, 3], [8, -1]]), ["segments[2]", "(8, -1)"]),
    "overlapping": (torch.tensor([[0, 2], [4, 3], [6, 2]]), ["segments[2]", "(6, 2)", "ends at 7"]),
    "unsorted": (torch.tensor([[0, 2], [6, 3], [3, 2]]), ["segments[2]", "(3, 2)", "ends at 9"]),
    "duplicate": (torch.tensor([[0, 2], [4, 3], [4, 3]]), ["segments[2]", "(4, 3)"]),
}


@pytest.mark.parametrize("case", sorted(SEGMENT_CASES))
def test_flat_segments_malformed(case, gen):
    segs, frags = SEGMENT_CASES[case]
    p, g, b = _good(gen)
    expect_error(lambda: _call("flat", p, g, b, segments=segs), [p, g, b] + [segs], frags)


def test_flat_segments_none(gen):
    p, g, b = _good(gen)
    expect_error(lambda: OPS.sgd_step_flat_(p, g, b, None, **HYPER), [p, g, b],
                 ["segments", "None"])


@pytest.mark.parametrize("name,t", [("param", "2d"), ("grad", "2d"), ("momentum_buffer", "2d"),
                                    ("grad", "slice")])
def test_flat_buffers_must_be_1d_contiguous(name, t, gen):
    bufs = dict(zip(("param", "grad", "momentum_buffer"), _good(gen)))
    bufs[name] = rnd((2, 5), gen) if t == "2d" else rnd(2 * N, gen)[::2]
    args = list(bufs.values())
    expect_error(lambda: _call("flat", *args, segments=torch.tensor([[0, N]])), args,
                 [f"{name} of a flat step", "contiguous 1-D", "[2, 5]" if t == "2d" else "[2]"])


# Segments whose offset + numel overflows int64 pass the bounds check in
# csrc/momentum_ops.cpp (sgd_step_flat: `seg[2*i] + seg[2*i+1] <= param.numel()` is computed in
# int64 and wraps negative) and the kernel then writes far outside the buffer. They run in a
# child process, so a crash fails this test instead of killing the suite.
OVERFLOW_SEGMENTS = {
    "numel_max": "[[1, 2**63 - 1]]",
    "offset_max": "[[2**63 - 1, 1]]",
    "second_wraps": "[[0, 5], [3 * 2**61, 3 * 2**61]]",
}


@pytest.mark.parametrize("case", sorted(OVERFLOW_SEGMENTS))
def test_flat_segments_int64_overflow(case):
    code = textwrap.dedent(f"""
        import torch
        import momentum_cuda
        g = torch.Generator().manual_seed(0)
        p, gr, b = (torch.randn(10, generator=g) for _ in range(3))
        before = [t.clone() for t in (p, gr, b)]
        try:
            torch.ops.momentum_cuda.sgd_step_flat_(
                p, gr, b, torch.tensor({OVERFLOW_SEGMENTS[case]}), lr=0.1, momentum=0.9,
                dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                first_step=False)
        except RuntimeError as e:
            ok = "segments[" in str(e) and all(torch.equal(t, u) for t, u in zip((p, gr, b), before))
            print("RAISED_OK" if ok else "RAISED_BAD " + str(e))
        else:
            print("NO_ERROR")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "RAISED_OK" in r.stdout, (
        f"segments {OVERFLOW_SEGMENTS[case]} were not rejected: rc={r.returncode} "
        f"(negative: killed by signal), stdout={r.stdout.strip()!r}, stderr={r.stderr[-500:]!r}")


def test_flat_bad_last_segment_updates_nothing(gen):
    """Segments 0 and 1 are good, segment 2 is out of range: nothing is updated."""
    p, g, b = _good(gen, n=30)
    segs = torch.tensor([[0, 5], [8, 6], [20, 11]])
    expect_error(lambda: _call("flat", p, g, b, segments=segs), [p, g, b, segs],
                 ["segments[2]", "(20, 11)", "30 elements"])


def test_set_cpu_isa_bad_name():
    before = _C.cpu_isa()
    with pytest.raises(RuntimeError, match="isa must be 'avx512', 'avx2' or 'default', got 'sse9'"):
        _C.set_cpu_isa("sse9")
    assert _C.cpu_isa() == before


# ---- optimizer classes: constructor checks ---------------------------------------------------
def _params(gen, k=3, n=N):
    return [torch.nn.Parameter(rnd(n, gen)) for _ in range(k)]


TORCH_VALUE_ERRORS = [
    dict(lr=-0.1),
    dict(lr=-1e-9, momentum=0.9),
    dict(lr=0.1, momentum=-0.5),
    dict(lr=0.1, weight_decay=-1e-4),
    dict(lr=0.1, nesterov=True),
    dict(lr=0.1, nesterov=True, momentum=0.9, dampening=0.1),
    dict(lr=torch.tensor([0.1, 0.2])),
]


@pytest.mark.parametrize("kw", TORCH_VALUE_ERRORS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_sgd_constructor_errors_match_torch(kw, gen):
    ps = _params(gen)
    snap = snapshot(ps)
    with pytest.raises(ValueError) as theirs:
        torch.optim.SGD(ps, **kw)
    with pytest.raises(ValueError) as ours:
        momentum_cuda.SGD(ps, **kw)
    assert str(ours.value) == str(theirs.value)
    assert_unchanged(snap)
    assert all(p.grad is None for p in ps)  # nothing was attached before the check


def test_sgd_differentiable_leaf_rejected_at_step(gen):
    """differentiable=True runs torch's own step (tests/test_conformance.py compares it with
    torch). torch's in-place update refuses a leaf that requires grad part way through its
    step; momentum_cuda refuses it before touching anything."""
    ps = _params(gen)
    opt = momentum_cuda.SGD(ps, lr=0.1, momentum=0.9, differentiable=True)
    for p in ps:
        p.grad = rnd(N, gen)
    snap = snapshot(ps)
    with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
        opt.step()
    assert_unchanged(snap, "params after a failed step")
    assert len(opt.state) == 0


@pytest.mark.parametrize("m", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_momentum_range(m, gen):
    ps = _params(gen)
    with pytest.raises(ValueError) as e:
        momentum_cuda.Momentum(ps, lr=0.1, momentum=m)
    assert "momentum" in str(e.value) and str(m) in str(e.value)


@pytest.mark.parametrize("kw,frag", [(dict(lr=-0.1), "learning rate: -0.1"),
                                     (dict(lr=0.1, weight_decay=-0.5), "weight_decay value: -0.5")])
def test_momentum_lr_weight_decay(kw, frag, gen):
    with pytest.raises(ValueError, match=frag):
        momentum_cuda.Momentum(_params(gen), **kw)


@pytest.mark.parametrize("cls", [momentum_cuda.SGD, momentum_cuda.Momentum])
@pytest.mark.parametrize("name", ["bogus", "CPU", "gpu", ""])
def test_unknown_backend(cls, name, gen):
    ps = _params(gen)
    snap = snapshot(ps)
    with pytest.raises(ValueError) as e:
        cls(ps, lr=0.1, momentum=0.9, backend=name)
    assert repr(name) in str(e.value) and "cpu" in str(e.value)
    assert_unchanged(snap)


# ---- optimizer classes: errors at step time leave params AND state unchanged -----------------
def _state_keys(opt, ps):
    return [sorted(opt.state[p].keys()) if p in opt.state else [] for p in ps]


def _torch_twin(ps, **kw):
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    return twin, torch.optim.SGD(twin, foreach=False, **kw)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_sparse_grad_with_weight_decay_at_step(flat, gen):
    """dampening=0.1, so a buffer that starts at zero (or garbage) instead of the gradient gives
    other bits than torch. params[0], params[1] have dense gradients (written in place: with
    flat=True they stay the flat views, as after backward()); params[2] has a sparse one, which
    torch.optim.SGD cannot combine with weight_decay (it fails after updating params[0] and
    params[1]). step() raises, and neither a parameter nor the optimizer state changes; once
    the gradient is dense the next step matches torch's first step."""
    ps = _params(gen)
    twin, topt = _torch_twin(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    opt = momentum_cuda.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01,
                            flat=flat)
    grads = [rnd(N, gen) for _ in ps]
    for p, g in zip(ps[:2], grads):
        if p.grad is not None:
            p.grad.copy_(g)
        else:
            p.grad = g.clone()
    ps[2].grad = grads[2].to_sparse()
    snap = snapshot(ps)
    with pytest.raises(RuntimeError, match="weight_decay=0.01 .*sparse"):
        opt.step()
    assert_unchanged(snap, "params after a failed step")
    leaked = _state_keys(opt, ps)
    # recover: dense gradient, step again; must equal torch's first step
    ps[2].grad = grads[2].clone()
    opt.step()
    _assert_recovered_like_torch(ps, twin, topt, grads, leaked, opt=opt)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("name,value", [("lr", math.nan), ("lr", math.inf),
                                        ("weight_decay", math.nan)])
def test_non_finite_hyper_at_step(name, value, flat, gen):
    """torch.optim.SGD's checks let lr=nan through (nan < 0 is False); momentum_cuda rejects it
    at step time. The failed step must not change params or state: after restoring the
    hyper-parameter the next step equals torch's first step."""
    ps = _params(gen)
    twin, topt = _torch_twin(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    opt = momentum_cuda.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01,
                            flat=flat)
    grads = [rnd(N, gen) for _ in ps]
    for p, g in zip(ps, grads):
        if p.grad is not None:
            p.grad.copy_(g)
        else:
            p.grad = g.clone()
    opt.param_groups[0][name] = value
    snap = snapshot(ps)
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        opt.step()
    assert_unchanged(snap, "params after a failed step")
    leaked = _state_keys(opt, ps)
    opt.param_groups[0][name] = {"lr": 0.1, "weight_decay": 0.01}[name]
    opt.step()
    _assert_recovered_like_torch(ps, twin, topt, grads, leaked)


def test_momentum_out_of_range_at_step_second_group(gen):
    """A scheduler sets group 1's momentum to 1.0: step() raises, and group 0 (checked first,
    valid) must not have been updated either."""
    ps = _params(gen, k=4)
    opt = momentum_cuda.Momentum([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.1, momentum=0.9)
    for p in ps:
        p.grad = rnd(N, gen)
    opt.param_groups[1]["momentum"] = 1.0
    snap = snapshot(ps)
    with pytest.raises(ValueError, match="momentum value: 1.0"):
        opt.step()
    assert_unchanged(snap, "params after a failed step")


def _assert_recovered_like_torch(ps, twin, topt, grads, leaked, opt=None):
    """After a failed step and a good one, ps equal torch's first step on the same gradients
    (and, with opt, so do the momentum buffers); the failed step left no state."""
    for q, g in zip(twin, grads):
        q.grad = g.clone()
    topt.step()
    for i, (p, q) in enumerate(zip(ps, twin)):
        assert torch.equal(p, q), (f"param {i} after recovering from a failed step differs from "
                                   f"torch (state left by the failed step: {leaked})")
        if opt is not None:
            assert torch.equal(opt.state[p]["momentum_buffer"], topt.state[q]["momentum_buffer"])
    assert leaked == [[], [], []], "a failed step left momentum buffers in state"
