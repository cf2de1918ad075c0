"""master_weights=True for fp16 parameters (issue 14): the CPU op sgd_step_fp16_master_list_
bit for bit against its plain-torch contract (reference.sgd_fp16_master_reference_step: torch's
fp32 step on a separate fp32 master with the fp16 gradient widened, the parameter the master
rounded to nearest even), its errors, version counters and opcheck. The optimizers are held to
torch's fp32 twins in tests/test_master_weights.py (MasterTwins with dtype=torch.float16) and
tests/test_master_sequences.py."""
import pytest
import torch

import momentum_cuda
from momentum_cuda import _C
from momentum_cuda.reference import sgd_fp16_master_reference_step as reference_step

from conftest import bits, isa_available

OP = torch.ops.momentum_cuda.sgd_step_fp16_master_list_.default
FLAG_SETS = [dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
             for m in (0.0, 0.9) for d in (0.0, 0.1) for wd in (0.0, 0.01)
             for n in (False, True) for mx in (False, True)
             if not (n and (m == 0 or d != 0)) and not (m == 0 and d != 0)]
SHAPES = [(0,), (1,), (3,), (97,), (1025,), (5, 7), (2, 3, 4, 5)]


def _state(gen, shapes, layout=None, scale=1.0):
    masters, params = [], []
    for s in shapes:
        m = torch.randn(s, generator=gen) * scale
        if layout == "channels_last" and m.dim() == 4:
            m = m.contiguous(memory_format=torch.channels_last)
        masters.append(m)
        params.append(m.to(torch.float16))
    return params, masters


@pytest.mark.parametrize("layout", [None, "channels_last"])
@pytest.mark.parametrize("h", FLAG_SETS, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
def test_op_bitwise_against_reference(h, layout):
    """Four steps with gradients from tiny to huge (fp16 subnormals, overflow of the parameter
    to inf while the master stays finite), against the reference on copies."""
    gen = torch.Generator().manual_seed(5)
    ps, ms = _state(gen, SHAPES, layout)
    rps, rms = [p.clone() for p in ps], [m.clone() for m in ms]
    bufs = [torch.empty_like(m) for m in ms] if h["momentum"] else []
    rbufs = [None] * len(ps)
    for step, scale in enumerate((1e-6, 1.0, 1e3, 1e5)):
        gs = [torch.empty_like(p).copy_(torch.randn(p.shape, generator=gen) * scale)
              for p in ps]
        OP(ps, gs, bufs, ms, 0.05, h["momentum"], h["dampening"], h["weight_decay"],
           h["nesterov"], h["maximize"], bool(h["momentum"]) and step == 0)
        rbufs = reference_step(rps, gs, rbufs, rms, lr=0.05, **h)
        for i in range(len(ps)):
            assert torch.equal(bits(ps[i]), bits(rps[i])), f"step {step} param {i}"
            assert torch.equal(bits(ms[i]), bits(rms[i])), f"step {step} master {i}"
            if h["momentum"]:
                assert torch.equal(bits(bufs[i]), bits(rbufs[i])), f"step {step} buffer {i}"


def test_range_edges():
    """A master stepped across fp16's largest value (65504; from 65520 on it rounds to inf) and
    back, and one among fp16's subnormals: the parameter is inf while its master is finite and
    comes back with it; the subnormal parameter is the master's rounding."""
    ms = [torch.tensor([65500.0, -65500.0, 3e-6, -1e-7])]
    ps = [ms[0].half()]
    rps, rms = [ps[0].clone()], [ms[0].clone()]
    seen_inf = False
    for g in (-400.0, -400.0, 500.0, 500.0, 1e-5):
        gs = [torch.tensor([g, -g, g * 1e-9, -g * 1e-9]).half()]
        OP(ps, gs, [], ms, 0.1, 0.0, 0.0, 0.0, False, False, False)
        reference_step(rps, gs, [None], rms, lr=0.1, momentum=0.0)
        assert torch.equal(bits(ps[0]), bits(rps[0])) and torch.equal(bits(ms[0]), bits(rms[0]))
        seen_inf |= bool((ps[0].isinf() & ms[0].isfinite()).any())
    assert seen_inf and ps[0][:2].isfinite().all()



@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "default"])
def test_op_large_threads_and_isa(isa, threads):
    if not isa_available(isa):
        pytest.skip(f"{isa} not available")
    gen = torch.Generator().manual_seed(6)
    ps, ms = _state(gen, [(2**20 + 3,), (33,)])
    rps, rms = [p.clone() for p in ps], [m.clone() for m in ms]
    gs = [torch.randn(p.shape, generator=gen).half() for p in ps]
    bufs = [torch.randn(p.shape, generator=gen) for p in ps]
    rb = [b.clone() for b in bufs]
    old_threads, old_isa = torch.get_num_threads(), _C.set_cpu_isa(isa)
    torch.set_num_threads(threads)
    try:
        OP(ps, gs, bufs, ms, 0.01, 0.9, 0.0, 1e-3, True, False, False)
    finally:
        torch.set_num_threads(old_threads)
        _C.set_cpu_isa(old_isa)
    rb = reference_step(rps, gs, rb, rms, lr=0.01, momentum=0.9, weight_decay=1e-3,
                        nesterov=True)
    for a, b in zip(ps + ms + bufs, rps + rms + rb):
        assert torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("bad,match", [
    (dict(dtype=torch.bfloat16), r"params\[0\] must be float16 \(fp16 master weights keep"),
    (dict(master_dtype=torch.float16), r"masters\[0\] must be a Float tensor"),
    (dict(buf_dtype=torch.float16), r"momentum_buffers\[0\] must be a Float tensor"),
    (dict(n_masters=2), r"masters has 2 tensors but params has 1"),
    (dict(lr=float("nan")), r"lr must be a finite number"),
])
def test_errors_name_the_argument_and_write_nothing(bad, match):
    dtype = bad.get("dtype", torch.float16)
    p, g = torch.randn(9).to(dtype), torch.randn(9).to(dtype)
    b = torch.randn(9).to(bad.get("buf_dtype", torch.float32))
    ms = [torch.randn(9).to(bad.get("master_dtype", torch.float32))
          for _ in range(bad.get("n_masters", 1))]
    before = [t.clone() for t in (p, g, b, *ms)]
    with pytest.raises(RuntimeError, match=match):
        OP([p], [g], [b], ms, bad.get("lr", 0.1), 0.9, 0.0, 0.0, False, False, False)
    for t, u in zip((p, g, b, *ms), before):
        assert torch.equal(bits(t), bits(u))


def test_version_counters_and_opcheck():
    gen = torch.Generator().manual_seed(9)
    ps, ms = _state(gen, [(0,), (1,), (97,), (3, 5)])
    gs = [torch.randn(p.shape, generator=gen).half() for p in ps]
    bufs = [torch.randn(p.shape, generator=gen) for p in ps]
    v = [t._version for t in (ps[2], gs[2], bufs[2], ms[2])]
    OP(ps, gs, bufs, ms, 0.01, 0.9, 0.1, 0.01, False, True, False)
    assert [t._version for t in (ps[2], gs[2], bufs[2], ms[2])] == [v[0] + 1, v[1], v[2] + 1,
                                                                    v[3] + 1]
    result = torch.library.opcheck(OP, (ps, gs, bufs, ms, 0.01, 0.9, 0.1, 0.01, False, True,
                                        False))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("flat", [True, False])
def test_small_updates_accumulate_where_fp16_alone_stalls(flat):
    """Updates under half an fp16 ulp: plain fp16 SGD leaves the parameter where it is, the
    fp16 master moves it (the master accumulates them)."""
    start = torch.full((64,), 1.0, dtype=torch.float16)
    plain = torch.nn.Parameter(start.clone())
    mast = torch.nn.Parameter(start.clone())
    o1 = momentum_cuda.SGD([plain], lr=1e-4, flat=flat)
    o2 = momentum_cuda.SGD([mast], lr=1e-4, flat=flat, master_weights=True)
    for _ in range(50):
        for p, o in ((plain, o1), (mast, o2)):
            p.grad = torch.full_like(p, 1.0)
            o.step()
    assert torch.equal(plain, start)
    assert (mast < start).all() and o2.master_weight(mast).sub(1 - 50e-4).abs().max() < 1e-5
