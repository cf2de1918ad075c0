"""The step ops as dispatcher ops (csrc/momentum_ops.cpp, momentum_cuda/_ops.py): their schemas,
torch.library.opcheck on the CPU implementations (schema vs what the kernel writes, fake kernel
vs real, aot_autograd with dynamic shapes), version counters, meta and FakeTensor calls, and a
planted op whose schema hides a write, which opcheck must catch. The Triton ops get opcheck in
tests/test_triton_interp.py (interpreter child) and the CUDA ones in the GPU check."""
from __future__ import annotations

import zlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import momentum_cuda  # noqa: F401  (registers torch.ops.momentum_cuda)
from conftest import bits, randn

OPS = torch.ops.momentum_cuda
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DTYPE_IDS = ("fp32", "fp64", "bf16", "fp16")
SIZES = (0, 1, 3, 97, 1030)
# (momentum, dampening, weight_decay, nesterov, maximize, first_step)
HYPERS = [(0.0, 0.0, 0.0, False, False, False), (0.9, 0.0, 0.01, False, False, True),
          (0.9, 0.1, 0.01, False, True, False), (0.9, 0.0, 0.0, True, False, False)]
HYPER_IDS = ("sgd", "first", "damp-max", "nesterov")


def _h(hyper) -> dict:
    m, d, wd, nesterov, maximize, first = hyper
    return dict(lr=0.0123, momentum=m, dampening=d, weight_decay=wd, nesterov=nesterov,
                maximize=maximize, first_step=first)


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _flat_args(dtype, hyper):
    """Three flat buffers with gaps between segments, an empty segment and an odd end."""
    gen = _gen("flat", dtype, hyper)
    segs = torch.tensor([[0, 1], [5, 97], [102, 0], [120, 3], [130, 1030]])
    p, g, b = (randn(1163, dtype, gen) for _ in range(3))
    return (p, g, b if hyper[0] else None, segs), _h(hyper)


def _list_args(dtype, hyper):
    gen = _gen("list", dtype, hyper)
    ps, gs, bs = ([randn(n, dtype, gen) for n in SIZES] for _ in range(3))
    ps.append(randn((4, 6), dtype, gen).t())  # a transposed, dense layout
    gs.append(randn((4, 6), dtype, gen).t())
    bs.append(randn((4, 6), dtype, gen).t())
    return (ps, gs, bs if hyper[0] else []), _h(hyper)


def test_schemas_mark_exactly_what_the_kernels_write():
    written = {}
    for name in ("sgd_step_flat_", "sgd_step_list_", "triton_sgd_step_flat_",
                 "triton_sgd_step_list_", "triton_sgd_step_amp_flat_",
                 "triton_sgd_step_amp_list_"):
        schema = getattr(OPS, name).default._schema
        written[name] = [a.name for a in schema.arguments
                         if a.alias_info is not None and a.alias_info.is_write]
        assert not schema.returns, f"{name} returns {schema.returns}"
    # the gradients are written when grad_scale or clip_coef is given (unscaled / clipped in
    # place); the Triton ops that take them declare it, the plain ones (found_inf at most) read
    assert written == {"sgd_step_flat_": ["param", "grad", "momentum_buffer"],
                       "sgd_step_list_": ["params", "grads", "momentum_buffers"],
                       "triton_sgd_step_flat_": ["param", "momentum_buffer"],
                       "triton_sgd_step_list_": ["params", "momentum_buffers"],
                       "triton_sgd_step_amp_flat_": ["param", "grad", "momentum_buffer"],
                       "triton_sgd_step_amp_list_": ["params", "grads", "momentum_buffers"]}
    for name in ("sgd_step_flat_", "sgd_step_list_"):
        for key in ("CPU", "Meta", "ADInplaceOrView"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"momentum_cuda::{name}", key)


@pytest.mark.parametrize("hyper", HYPERS, ids=HYPER_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ["flat", "list"])
def test_opcheck_cpu(op, dtype, hyper):
    args, kwargs = (_flat_args if op == "flat" else _list_args)(dtype, hyper)
    fn = OPS.sgd_step_flat_ if op == "flat" else OPS.sgd_step_list_
    result = torch.library.opcheck(fn.default, args, kwargs)
    assert set(result.values()) <= {"SUCCESS"}, result  # every test ran and passed


@pytest.mark.parametrize("found", [0.0, 1.0], ids=["finite", "overflow"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", ["flat", "list"])
def test_opcheck_cpu_with_gradscaler_tensors(op, dtype, found):
    args, kwargs = (_flat_args if op == "flat" else _list_args)(dtype, HYPERS[2])
    kwargs = dict(kwargs, grad_scale=torch.tensor(1000.0), found_inf=torch.tensor(found))
    fn = OPS.sgd_step_flat_ if op == "flat" else OPS.sgd_step_list_
    result = torch.library.opcheck(fn.default, args, kwargs)
    assert set(result.values()) <= {"SUCCESS"}, result


def test_opcheck_catches_a_schema_that_hides_a_write():
    """Control: an op declared as NOT writing its param, implemented by our op (which does),
    fails opcheck's schema test. So the passes above mean something."""
    lib = torch.library.Library("momentum_cuda_planted", "DEF")
    try:
        lib.define("step(Tensor param, Tensor grad) -> ()")

        def step(param, grad):
            OPS.sgd_step_list_([param], [grad], [], lr=0.1, momentum=0.0, dampening=0.0,
                               weight_decay=0.0, nesterov=False, maximize=False,
                               first_step=False)
        lib.impl("step", step, "CPU")
        torch.library.register_fake("momentum_cuda_planted::step", lambda param, grad: None,
                                    lib=lib)
        gen = _gen("planted")
        with pytest.raises(Exception, match="mutat|modif"):
            torch.library.opcheck(torch.ops.momentum_cuda_planted.step.default,
                                  (randn(7, torch.float32, gen), randn(7, torch.float32, gen)),
                                  test_utils="test_schema")
    finally:
        lib._destroy()


@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "grad_scale"])
@pytest.mark.parametrize("op", ["flat", "list"])
def test_versions_bumped_for_written_tensors_only(op, scaled):
    """Parameters and buffers go up once; gradients only when grad_scale is given (they are
    unscaled in place then, as GradScaler.unscale_ does; else torch's for-loop leaves them)."""
    args, kwargs = (_flat_args if op == "flat" else _list_args)(torch.float32, HYPERS[1])
    if scaled:
        kwargs = dict(kwargs, grad_scale=torch.tensor(1024.0))
    fn = OPS.sgd_step_flat_ if op == "flat" else OPS.sgd_step_list_
    flat = lambda a: [t for x in a for t in (x if isinstance(x, list) else [x])]  # noqa: E731
    p, g, b = (flat([a]) for a in args[:3])
    before = [t._version for t in p + g + b]
    fn(*args, **kwargs)
    after = [t._version for t in p + g + b]
    n = len(p)
    assert [a - x for a, x in zip(after, before)] == [1] * n + [int(scaled)] * n + [1] * n
    with pytest.raises(RuntimeError, match="lr must be a finite number"):
        fn(*args, **dict(kwargs, lr=float("inf")))
    assert [t._version for t in p + g + b] == after, "a refused call bumped a version"


def test_meta_only_call_is_shape_only_and_mixed_meta_refused():
    p, g, b = (torch.empty(10, device="meta") for _ in range(3))
    OPS.sgd_step_list_([p], [g], [b], **_h(HYPERS[1]))
    OPS.sgd_step_flat_(p, g, b, torch.tensor([[0, 10]]), **_h(HYPERS[1]))
    gen = _gen("meta")
    q, bq = randn(10, torch.float32, gen), randn(10, torch.float32, gen)
    q0 = q.clone()
    with pytest.raises(RuntimeError, match=r"grads\[0\] is on meta but params\[0\] is on cpu"):
        OPS.sgd_step_list_([q], [g], [bq], **_h(HYPERS[1]))
    with pytest.raises(RuntimeError, match="segments must be a CPU tensor"):
        OPS.sgd_step_flat_(q, q0.clone(), bq, torch.tensor([[0, 10]], device="meta"),
                           **_h(HYPERS[1]))
    assert torch.equal(q, q0)


def test_fake_tensor_calls_run_the_fake_kernel():
    with FakeTensorMode() as mode:
        ps = [torch.empty(7), torch.empty(3, 4)]
        gs, bs = [torch.empty_like(p) for p in ps], [torch.empty_like(p) for p in ps]
        OPS.sgd_step_list_(ps, gs, bs, **_h(HYPERS[2]))
        OPS.sgd_step_flat_(torch.empty(9), torch.empty(9), None, torch.tensor([[0, 9]]),
                           **_h(HYPERS[0]))
    assert all(type(p).__name__ == "FakeTensor" and p.fake_mode is mode for p in ps)


def test_empty_lists_checked_and_no_op():
    OPS.sgd_step_list_([], [], [], **_h(HYPERS[1]))
    with pytest.raises(RuntimeError, match="momentum must be a finite number, got nan"):
        OPS.sgd_step_list_([], [], [], **dict(_h(HYPERS[1]), momentum=float("nan")))


def test_step_ops_routes_backends():
    from momentum_cuda._ops import step_ops
    assert step_ops("cpu") == (OPS.sgd_step_flat_.default, OPS.sgd_step_list_.default)
    # Triton: functions that pick the amp op or the plain one by the call's keywords
    # (tests/test_triton_amp.py, check_step_ops_dispatch)
    flat, lst = step_ops("triton")
    assert (flat.__name__, lst.__name__) == ("triton_sgd_step_flat", "triton_sgd_step_list")
    with pytest.raises(ValueError, match="backend must be 'cpu', 'cuda' or 'triton', got 'tpu'"):
        step_ops("tpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("op", ["flat", "list"])
def test_first_step_tensor_decides_the_first_step(op, dtype):
    """first_step_tensor (with first_step=True) gives the bits of first_step=True where it is
    true and of first_step=False where it is false (it replaces a host decision: the
    optimizer's _Unsure); opcheck passes with it."""
    fn = OPS.sgd_step_flat_ if op == "flat" else OPS.sgd_step_list_
    for value in (True, False):
        args, kwargs = (_flat_args if op == "flat" else _list_args)(dtype, HYPERS[1])
        want_args = [[t.clone() for t in a] if isinstance(a, list) else
                     (a.clone() if isinstance(a, torch.Tensor) else a) for a in args]
        fn(*want_args, **dict(kwargs, first_step=value))
        fn(*args, **kwargs, first_step_tensor=torch.tensor(value))
        for got, want in zip(args[:3], want_args[:3]):
            for x, y in zip(got if isinstance(got, list) else [got],
                            want if isinstance(want, list) else [want]):
                assert torch.equal(bits(x), bits(y)), (op, dtype, value)
        result = torch.library.opcheck(fn.default, args,
                                       dict(kwargs, first_step_tensor=torch.tensor(value)))
        assert set(result.values()) <= {"SUCCESS"}, result


@pytest.mark.parametrize("bad, frag", [
    (dict(first_step_tensor=torch.tensor(1.0)), "first_step_tensor must be a 1-element bool"),
    (dict(first_step_tensor=torch.tensor([True, False])),
     "first_step_tensor must be a 1-element bool"),
    (dict(first_step_tensor=torch.tensor(True), first_step=False),
     "first_step_tensor is given with first_step=False"),
])
def test_first_step_tensor_checked(bad, frag):
    args, kwargs = _flat_args(torch.float32, HYPERS[1])
    before = [t.clone() for t in args[:3]]
    with pytest.raises(RuntimeError, match=frag):
        OPS.sgd_step_flat_(*args, **dict(kwargs, **bad))
    assert all(torch.equal(a, b) for a, b in zip(args[:3], before))  # nothing written
