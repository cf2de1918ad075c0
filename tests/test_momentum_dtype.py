"""momentum_dtype (issue 14): fp32 parameters whose momentum buffers are stored bf16 or as int8
codes with an fp32 scale per 256 elements. The CPU op sgd_step_qmom_list_ bit for bit against
its plain-torch contract (momentum_cuda.reference.sgd_momentum_dtype_reference_step, written
after csrc/include/momentum_cuda/momentum_dtype.h), the quantization's error with a derived
bound, and the optimizers' momentum_dtype= against the reference stepped by hand, through
checkpoints, deepcopy, torch's checkpoints, GradScaler, clipping and mode changes."""
import copy
import itertools

import pytest
import torch

import momentum_cuda
from momentum_cuda import _C
from momentum_cuda.reference import (QBLOCK, dequantize_momentum, quantize_momentum,
                                     sgd_momentum_dtype_reference_step as reference_step)

from conftest import bits, isa_available

OP = torch.ops.momentum_cuda.sgd_step_qmom_list_.default
DTYPES = [torch.bfloat16, torch.int8]
FLAG_SETS = [dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
             for m in (0.0, 0.9) for d in (0.0, 0.1) for wd in (0.0, 0.01)
             for n in (False, True) for mx in (False, True)
             if not (n and (m == 0 or d != 0)) and not (m == 0 and d != 0)]
SHAPES = [(0,), (1,), (3,), (97,), (255,), (256,), (257,), (1000,), (5, 7), (2, 3, 4, 5)]


def hid(h):
    return "-".join(f"{k}={v}" for k, v in h.items())


def _tensors(gen, shapes, layout=None, scale=1.0):
    out = []
    for s in shapes:
        t = torch.randn(s, generator=gen) * scale
        if layout == "channels_last" and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        elif layout == "transposed" and t.dim() == 2:
            t = t.t().contiguous().t()
        out.append(t)
    return out


def _like(ts, gen, scale=1.0):
    return [torch.empty_like(t).copy_(torch.randn(t.shape, generator=gen) * scale) for t in ts]


def _new_state(ps, dtype):
    """What a first step is given: buffers (and int8 scales) of any content."""
    bufs = [torch.full_like(p, 77, dtype=dtype) for p in ps]
    scales = ([torch.full(((p.numel() + QBLOCK - 1) // QBLOCK,), 3.0) for p in ps]
              if dtype is torch.int8 else [])
    return bufs, scales


def _step_and_compare(ps, bufs, scales, ref, rbufs, rscales, gs, h, first, what):
    OP(ps, gs, bufs if h["momentum"] else [], scales if h["momentum"] else [], 0.05,
       h["momentum"], h["dampening"], h["weight_decay"], h["nesterov"], h["maximize"], first)
    rbufs, rscales = reference_step(ref, gs, rbufs, rscales, lr=0.05, **h)
    for i, (a, b) in enumerate(zip(ps, ref)):
        assert torch.equal(bits(a), bits(b)), f"{what}: param {i}"
        if h["momentum"]:
            assert bufs[i].stride() == a.stride()
            assert torch.equal(bits(bufs[i]), bits(rbufs[i])), f"{what}: buffer {i}"
            if rscales is not None:
                assert torch.equal(bits(scales[i]), bits(rscales[i])), f"{what}: scales {i}"
    return rbufs, rscales


@pytest.mark.parametrize("layout", [None, "channels_last", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h", FLAG_SETS, ids=hid)
def test_op_bitwise_against_reference(h, dtype, layout):
    """Four steps (the first one creating the buffers where momentum is on), fresh gradients
    of growing size (so scales change), against the reference on copies."""
    gen = torch.Generator().manual_seed(5)
    ps = _tensors(gen, SHAPES, layout)
    ref = [p.clone() for p in ps]
    bufs, scales = _new_state(ps, dtype)
    rbufs = [None] * len(ps)
    rscales = [None] * len(ps) if dtype is torch.int8 else None
    for step in range(1, 5):
        gs = _like(ps, gen, scale=10.0 ** (step - 2))
        rbufs, rscales = _step_and_compare(ps, bufs, scales, ref, rbufs, rscales, gs, h,
                                           bool(h["momentum"]) and step == 1, f"step {step}")



@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "default"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_op_large_threads_and_isa(dtype, isa, threads):
    """2^20 + 3 elements and a few small tensors, split over threads (an int8 block is one
    thread's), on each instruction set the CPU has."""
    if not isa_available(isa):
        pytest.skip(f"{isa} not available")
    gen = torch.Generator().manual_seed(6)
    ps = _tensors(gen, [(2**20 + 3,), (33,), (300,)])
    ref = [p.clone() for p in ps]
    gs = _like(ps, gen)
    wide = _like(ps, gen)
    if dtype is torch.int8:
        pairs = [quantize_momentum(w) for w in wide]
        bufs, scales = [q for q, _ in pairs], [s for _, s in pairs]
        rbufs, rscales = [b.clone() for b in bufs], [s.clone() for s in scales]
    else:
        bufs, scales = [w.to(torch.bfloat16) for w in wide], []
        rbufs, rscales = [b.clone() for b in bufs], None
    old_threads, old_isa = torch.get_num_threads(), _C.set_cpu_isa(isa)
    torch.set_num_threads(threads)
    try:
        OP(ps, gs, bufs, scales, 0.01, 0.9, 0.0, 1e-3, True, False, False)
    finally:
        torch.set_num_threads(old_threads)
        _C.set_cpu_isa(old_isa)
    rbufs, rscales = reference_step(ref, gs, rbufs, rscales, lr=0.01, momentum=0.9,
                                    weight_decay=1e-3, nesterov=True)
    for a, b in zip(ps + bufs + scales, ref + rbufs + (rscales or [])):
        assert torch.equal(bits(a), bits(b))


def _special_block(kind):
    x = torch.randn(3 * QBLOCK + 5, generator=torch.Generator().manual_seed(11))
    if kind == "nan":
        x[QBLOCK + 7] = float("nan")
    elif kind == "inf":
        x[2] = float("-inf")
    elif kind == "zero":
        x[QBLOCK:2 * QBLOCK] = 0.0
    elif kind == "tiny":  # subnormal absmax: a / 127 underflows to 0 in some blocks
        x[:QBLOCK] = torch.tensor(1e-45) * torch.randint(-60, 60, (QBLOCK,))
        x[QBLOCK:2 * QBLOCK] *= 1e-40
    elif kind == "huge":  # absmax near the largest float: v / scale must not overflow
        x[2 * QBLOCK:3 * QBLOCK] *= 3e37
    return x


@pytest.mark.parametrize("kind", ["nan", "inf", "zero", "tiny", "huge"])
def test_special_blocks(kind):
    """Buffers with a NaN or an inf (their block reads back NaN), an all-zero block (scale 0,
    codes 0), subnormal blocks, blocks near the float maximum: first step (buffer = gradient)
    and a second one, against the reference."""
    g = _special_block(kind)
    p = torch.randn(g.shape, generator=torch.Generator().manual_seed(12))
    ref = p.clone()
    bufs, scales = _new_state([p], torch.int8)
    rb, rs = [None], [None]
    for first in (True, False):
        OP([p], [g], bufs, scales, 0.01, 0.9, 0.0, 0.0, False, False, first)
        rb, rs = reference_step([ref], [g], rb, rs, lr=0.01, momentum=0.9)
        assert torch.equal(bits(p), bits(ref))
        assert torch.equal(bufs[0], rb[0]) and torch.equal(bits(scales[0]), bits(rs[0]))
    deq = dequantize_momentum(bufs[0], scales[0])
    if kind in ("nan", "inf"):
        bad = 1 if kind == "nan" else 0
        block = torch.arange(deq.numel()) // QBLOCK
        assert deq[block == bad].isnan().all()
        assert not deq[block != bad].isnan().any()
    if kind == "zero":
        assert scales[0][1] == 0 and (bufs[0][QBLOCK:2 * QBLOCK] == 0).all()
    if kind == "tiny":
        assert scales[0][0] == 0 and scales[0][1] > 0  # the first underflows, the second not


def test_quantization_error_bound():
    """|dequantize(quantize(v)) - v| <= (1/2 + 2 * 127 * 2^-24 + 127 * 2^-23) * scale per block:
    the code rounds v / scale to an integer (error 1/2), v / scale is itself rounded (relative
    2^-24 of at most 127 * (1 + 2^-23), since scale = RN(a / 127) may be below a / 127 by a
    relative 2^-24, which is also what the clamp at 127 can cut), and code * scale is rounded
    (relative 2^-24 of at most 127 scales). The bound is also nearly reached (> 0.49 scale),
    so a coarser quantizer would fail it."""
    gen = torch.Generator().manual_seed(13)
    v = torch.randn(QBLOCK * 4000, generator=gen) * torch.logspace(-30, 30, QBLOCK * 4000)
    codes, scales = quantize_momentum(v)
    err = (dequantize_momentum(codes, scales).double() - v.double()).abs()
    per = scales.double().repeat_interleave(QBLOCK)
    bound = (0.5 + 2 * 127 * 2.0**-24 + 127 * 2.0**-23) * per
    assert (err <= bound).all()
    assert (err / per).max() > 0.49
    assert codes.abs().max() == 127 and int(codes.min()) >= -127


def test_quantize_round_trip_is_idempotent():
    """Quantizing a dequantized buffer gives its codes and scales back (what a checkpoint
    exported to fp32 and loaded again relies on), except in blocks whose scale is not
    finite or 0."""
    gen = torch.Generator().manual_seed(14)
    codes, scales = quantize_momentum(torch.randn(QBLOCK * 50 + 3, generator=gen))
    c2, s2 = quantize_momentum(dequantize_momentum(codes, scales))
    assert torch.equal(codes, c2) and torch.equal(bits(scales), bits(s2))


@pytest.mark.parametrize("bad,match", [
    (dict(dtype=torch.float64), r"params\[0\] must be float32 \(momentum_dtype keeps float32"),
    (dict(buf_dtype=torch.float32), r"momentum_buffers\[0\] must be a BFloat16 tensor"),
    (dict(buf_dtype=torch.int8, scales=[]), r"momentum_buffers\[0\] must be a BFloat16"),
    (dict(scales=[torch.zeros(2)]), r"scales\[0\] must be a contiguous 1-D float32 tensor of 3"),
    (dict(scales=[torch.zeros(6)[::2]]), r"scales\[0\] must be a contiguous 1-D"),
    (dict(scales=[torch.zeros(3), torch.zeros(3)]), r"scales has 2 tensors but params has 1"),
    (dict(momentum=0.0, scales=[torch.zeros(3)]), r"scales has 1 tensors but momentum=0"),
    (dict(lr=float("nan")), r"lr must be a finite number"),
])
def test_errors_name_the_argument_and_write_nothing(bad, match):
    dtype = bad.get("dtype", torch.float32)
    n = 2 * QBLOCK + 1
    p, g = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    buf_dtype = bad.get("buf_dtype", torch.int8 if "scales" in bad else torch.bfloat16)
    b = torch.randn(n).to(buf_dtype) if buf_dtype != torch.int8 else torch.ones(n, dtype=torch.int8)
    scales = bad.get("scales", [])
    before = [t.clone() for t in (p, g, b, *scales)]
    with pytest.raises(RuntimeError, match=match):
        OP([p], [g], [b], scales, bad.get("lr", 0.1), bad.get("momentum", 0.9), 0.0, 0.0,
           False, False, False)
    for t, u in zip((p, g, b, *scales), before):
        assert torch.equal(bits(t), bits(u))


def test_version_counters_of_written_tensors():
    p, g = torch.randn(300), torch.randn(300)
    b, s = quantize_momentum(torch.randn(300))
    v = [t._version for t in (p, g, b, s)]
    OP([p], [g], [b], [s], 0.1, 0.9, 0.0, 0.0, False, False, False)
    assert [t._version for t in (p, g, b, s)] == [v[0] + 1, v[1], v[2] + 1, v[3] + 1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    gen = torch.Generator().manual_seed(9)
    ps = _tensors(gen, [(0,), (1,), (97,), (3, 100)])
    bufs, scales = _new_state(ps, dtype)
    args = (ps, _like(ps, gen), bufs, scales, 0.01, 0.9, 0.1, 0.01, False, True, False)
    result = torch.library.opcheck(OP, args)
    assert set(result.values()) == {"SUCCESS"}, result


# ---- the optimizers: momentum_dtype= against the reference stepped by hand ------------------
FLAT = pytest.mark.parametrize("flat", [True, False], ids=["flat", "per-tensor"])
OPT_CASES = [("sgd", dict(lr=0.05, momentum=0.9)),
             ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
             ("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, maximize=True)),
             ("sgd", dict(lr=0.05)),
             ("momentum", dict(lr=0.05, momentum=0.8, weight_decay=0.01))]


class Twins:
    """fp32 parameters (and one fp64 parameter in a group of its own) stepped by momentum_cuda
    with momentum_dtype; twins stepped by the reference (fp32) and by torch.optim.SGD
    (fp64)."""

    def __init__(self, flat, dtype, kind="sgd", h=None, seed=3):
        gen = torch.Generator().manual_seed(seed)
        shapes = [(1,), (3,), (97,), (40, 13), (2, 3, 5, 5)]
        self.ours = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        self.f64 = torch.nn.Parameter(torch.randn(9, generator=gen, dtype=torch.float64))
        self.ref = [p.detach().clone() for p in self.ours]
        self.t64 = torch.nn.Parameter(self.f64.detach().clone())
        self.h, self.kind, self.dtype = h or dict(lr=0.05, momentum=0.9), kind, dtype
        cls = momentum_cuda.SGD if kind == "sgd" else momentum_cuda.Momentum
        self.opt = cls([{"params": self.ours, "momentum_dtype": dtype}, {"params": [self.f64]}],
                       flat=flat, **self.h)
        if kind == "sgd":
            self.topt = torch.optim.SGD([self.t64], foreach=False, **self.h)
        else:
            from momentum_cuda.reference import MomentumReference
            self.topt = MomentumReference([self.t64], **self.h)
        self.bufs = [None] * len(self.ours)
        self.scales = [None] * len(self.ours) if dtype is torch.int8 else None
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.steps = 0

    def ref_h(self):
        h = dict(self.h)
        h.setdefault("momentum", 0.0)
        if self.kind != "sgd":
            h["dampening"] = h["momentum"]
            for i, p in enumerate(self.ref):  # the EMA form: buffers start at zero
                if self.bufs[i] is None:
                    self.bufs[i], s = (torch.zeros_like(p, dtype=self.dtype),
                                       torch.zeros((p.numel() + QBLOCK - 1) // QBLOCK))
                    if self.scales is not None:
                        self.scales[i] = s
        return h

    def grads(self):
        return [torch.randn(p.shape, generator=self.gen, dtype=p.dtype)
                for p in self.ours + [self.f64]]

    def step(self, n=1, grads=None):
        for _ in range(n):
            self.steps += 1
            gs = grads or self.grads()
            for p, g in zip(self.ours + [self.f64], gs):
                p.grad = g.clone()
            self.t64.grad = gs[-1].clone()
            self.opt.step()
            self.topt.step()
            self.ref_step(gs[:-1])
            self.check(f"step {self.steps}")

    def ref_step(self, gs):
        h = self.ref_h()
        self.bufs, self.scales = reference_step(self.ref, gs, self.bufs, self.scales, **h)

    def check(self, what):
        for i, (p, r) in enumerate(zip(self.ours, self.ref)):
            assert torch.equal(bits(p), bits(r)), f"{what}: param {i}"
            if self.h.get("momentum"):
                st = self.opt.state[p]
                assert st["momentum_buffer"].dtype == self.dtype
                assert torch.equal(bits(st["momentum_buffer"]), bits(self.bufs[i])), \
                    f"{what}: buffer {i}"
                if self.scales is not None:
                    assert torch.equal(bits(st["momentum_scales"]), bits(self.scales[i]))
        assert torch.equal(self.f64, self.t64), f"{what}: fp64 param"


@FLAT
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,h", OPT_CASES, ids=[f"{k}-{i}" for i, (k, _) in
                                                   enumerate(OPT_CASES)])
def test_optimizer_against_reference(flat, dtype, kind, h):
    tw = Twins(flat, dtype, kind, h)
    tw.step(4)
    assert "momentum-dtype" in {e["path"] for e in tw.opt.last_step}
    if h.get("momentum", 0.9 if kind != "sgd" else 0):
        nbytes = sum(tw.opt.state[p]["momentum_buffer"].nbytes
                     + tw.opt.state[p].get("momentum_scales", torch.empty(0)).nbytes
                     for p in tw.ours)
        numel = sum(p.numel() for p in tw.ours)
        blocks = sum((p.numel() + QBLOCK - 1) // QBLOCK for p in tw.ours)
        assert nbytes == (2 * numel if dtype is torch.bfloat16 else numel + 4 * blocks)


@FLAT
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("how", ["state_dict", "deepcopy", "torch.save"])
def test_checkpoint_and_deepcopy_continue_the_same_bits(flat, dtype, how, tmp_path):
    """The narrow state travels with state_dict (kept narrow: not widened to the parameter's
    dtype as torch's load_state_dict would), deepcopy and torch.save; the copy steps on with
    the bits of the original."""
    tw = Twins(flat, dtype)
    tw.step(2)
    if how == "deepcopy":
        copy_opt = copy.deepcopy(tw.opt)
        ps = [p for g in copy_opt.param_groups for p in g["params"]]
    else:
        ps = [torch.nn.Parameter(p.detach().clone()) for p in tw.ours + [tw.f64]]
        copy_opt = momentum_cuda.SGD([{"params": ps[:-1], "momentum_dtype": dtype},
                                      {"params": ps[-1:]}], flat=flat, **tw.h)
        sd = copy.deepcopy(tw.opt.state_dict())  # torch's load_state_dict shares tensors
        if how == "torch.save":
            torch.save(sd, tmp_path / "opt.pt")
            sd = torch.load(tmp_path / "opt.pt")
        copy_opt.load_state_dict(sd)
    for p, q in zip(tw.ours, ps):
        assert copy_opt.state[q]["momentum_buffer"].dtype == dtype
    gs = tw.grads()
    for p, g in zip(ps, gs):
        p.grad = g.clone()
    copy_opt.step()
    tw.step(grads=gs)
    for p, q in zip(tw.ours + [tw.f64], ps):
        assert torch.equal(bits(p), bits(q))
        assert torch.equal(bits(tw.opt.state[p]["momentum_buffer"]),
                           bits(copy_opt.state[q]["momentum_buffer"]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_checkpoint_loads_and_exports(dtype):
    """A torch.optim.SGD checkpoint (fp32 buffers) loads into momentum_dtype: each buffer is
    stored narrow at once, as a step would store it, and the setting stays; torch_state_dict()
    gives torch's format back (fp32 buffers read back exactly, no mode keys), which
    torch.optim.SGD loads and steps on."""
    gen = torch.Generator().manual_seed(21)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(300,), (7, 9)]]
    topt = torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)
    topt.step()
    opt = momentum_cuda.SGD(ps, lr=0.1, momentum=0.9, momentum_dtype=dtype)
    opt.load_state_dict(topt.state_dict())
    assert opt.param_groups[0]["momentum_dtype"] is dtype
    for p in ps:
        st = opt.state[p]
        tb = topt.state[p]["momentum_buffer"]
        if dtype is torch.int8:
            codes, scales = quantize_momentum(tb)
            assert torch.equal(st["momentum_buffer"], codes)
            assert torch.equal(bits(st["momentum_scales"]), bits(scales))
        else:
            assert torch.equal(bits(st["momentum_buffer"]), bits(tb.to(torch.bfloat16)))
    exported = opt.torch_state_dict()
    assert all("momentum_dtype" not in g for g in exported["param_groups"])
    for i, p in enumerate(ps):
        assert set(exported["state"][i]) == {"momentum_buffer"}
        assert torch.equal(exported["state"][i]["momentum_buffer"], opt.momentum_buffer(p))
        assert exported["state"][i]["momentum_buffer"].dtype == torch.float32
    back = torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False)
    back.load_state_dict(exported)
    assert back.state[ps[0]]["momentum_buffer"].dtype == torch.float32


@FLAT
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_turning_momentum_dtype_on_and_off_mid_training(flat, dtype):
    """Two steps with torch's fp32 buffers; momentum_dtype set on the group: the fp32 buffers
    are stored narrow at the next step (as loading them would), then stepped as the contract
    says; set back to None: the buffers are read back in fp32 and torch's SGD steps on."""
    gen = torch.Generator().manual_seed(22)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(300,), (7, 9)]]
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = momentum_cuda.SGD(ps, lr=0.1, momentum=0.9, flat=flat)
    topt = torch.optim.SGD(twin, lr=0.1, momentum=0.9, foreach=False)

    def grads():
        gs = [torch.randn(p.shape, generator=gen) for p in ps]
        for p, t, g in zip(ps, twin, gs):
            p.grad, t.grad = g.clone(), g.clone()
        return gs

    for _ in range(2):
        grads()
        opt.step()
        topt.step()
    opt.param_groups[0]["momentum_dtype"] = dtype
    ref = [t.detach().clone() for t in twin]
    bufs = [topt.state[t]["momentum_buffer"] for t in twin]
    if dtype is torch.int8:
        pairs = [quantize_momentum(b) for b in bufs]
        bufs, scales = [q for q, _ in pairs], [s for _, s in pairs]
    else:
        bufs, scales = [b.to(torch.bfloat16) for b in bufs], None
    for _ in range(2):
        gs = grads()
        opt.step()
        bufs, scales = reference_step(ref, gs, bufs, scales, lr=0.1, momentum=0.9)
        for p, r, b in zip(ps, ref, bufs):
            assert torch.equal(bits(p), bits(r))
            assert torch.equal(bits(opt.state[p]["momentum_buffer"]), bits(b))
    del opt.param_groups[0]["momentum_dtype"]
    with torch.no_grad():
        for p, t in zip(ps, twin):
            t.copy_(p)
            topt.state[t]["momentum_buffer"] = opt.momentum_buffer(p)
    for _ in range(2):
        grads()
        opt.step()
        topt.step()
        for p, t in zip(ps, twin):
            assert torch.equal(bits(p), bits(t))
            assert opt.state[p]["momentum_buffer"].dtype == torch.float32
            assert "momentum_scales" not in opt.state[p]
            assert torch.equal(opt.state[p]["momentum_buffer"], topt.state[t]["momentum_buffer"])


@FLAT
def test_with_master_weights_in_one_group(flat):
    """A group with master_weights=True and momentum_dtype=torch.int8: its bf16 parameters
    take the master op (fp32 buffers), its fp32 ones the int8 momentum; both against their
    references."""
    from momentum_cuda.reference import sgd_master_reference_step
    gen = torch.Generator().manual_seed(23)
    bf = torch.nn.Parameter(torch.randn(300, generator=gen).to(torch.bfloat16))
    f32 = torch.nn.Parameter(torch.randn(500, generator=gen))
    opt = momentum_cuda.SGD([bf, f32], lr=0.1, momentum=0.9, master_weights=True,
                            momentum_dtype=torch.int8, flat=flat)
    rbf, rf = bf.detach().clone(), f32.detach().clone()
    rem, ties = torch.zeros(300, dtype=torch.int16), torch.zeros(38, dtype=torch.uint8)
    mb, qb, qs = [None], [None], [None]
    for _ in range(3):
        gb, gf = torch.randn(300, generator=gen).to(torch.bfloat16), torch.randn(500, generator=gen)
        bf.grad, f32.grad = gb.clone(), gf.clone()
        opt.step()
        mb = sgd_master_reference_step([rbf], [gb], mb, [rem], [ties], lr=0.1, momentum=0.9)
        qb, qs = reference_step([rf], [gf], qb, qs, lr=0.1, momentum=0.9)
        assert torch.equal(bits(bf), bits(rbf)) and torch.equal(bits(f32), bits(rf))
        assert opt.state[bf]["momentum_buffer"].dtype == torch.float32
        assert torch.equal(opt.state[f32]["momentum_buffer"], qb[0])
    assert {e["path"] for e in opt.last_step} == {"master", "momentum-dtype"}


@FLAT
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradscaler_clip_scheduler_and_zero_grad(flat, dtype):
    """GradScaler (an overflow on step 2), clip_grad_norm_, a StepLR schedule and
    zero_grad(set_to_none=False): the twins step on the unscaled, clipped gradients with the
    scheduled lr, and skip the overflowed step."""
    tw = Twins(flat, dtype)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    sched = torch.optim.lr_scheduler.StepLR(tw.opt, step_size=2, gamma=0.5)
    lr = tw.h["lr"]
    for step in range(5):
        tw.opt.zero_grad(set_to_none=False)
        gs = tw.grads()
        if step == 1:
            gs[2][0] = float("inf")
        params = tw.ours + [tw.f64]
        scaler.scale(sum((p * g).sum() for p, g in zip(params, gs))).backward()
        scaler.unscale_(tw.opt)
        tw.opt.clip_grad_norm_(5.0)
        found = sum(v.item() for v in
                    scaler._per_optimizer_states[id(tw.opt)]["found_inf_per_device"].values())
        scaler.step(tw.opt)
        scaler.update()
        used = [p.grad.clone() for p in tw.ours]  # unscaled and clipped (torch's ops, first)
        used64 = tw.f64.grad.clone()
        if not found:
            tw.t64.grad = used64
            tw.topt.param_groups[0]["lr"] = lr
            tw.topt.step()
            h = tw.ref_h()
            h["lr"] = lr
            tw.bufs, tw.scales = reference_step(tw.ref, used, tw.bufs, tw.scales, **h)
        tw.check(f"step {step + 1}")
        sched.step()
        lr = tw.opt.param_groups[0]["lr"]


def test_channels_last_after_steps():
    """model.to(memory_format=channels_last) after steps: the parameter's memory order
    changes, so the int8 blocks are re-formed from the buffer read back in fp32 (the contract
    on the new layout), not copied code by code."""
    gen = torch.Generator().manual_seed(24)
    p = torch.nn.Parameter(torch.randn(2, 3, 10, 10, generator=gen))
    opt = momentum_cuda.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=torch.int8)
    p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    wide = opt.momentum_buffer(p)
    ref = p.detach().clone().contiguous(memory_format=torch.channels_last)
    p.data = p.data.contiguous(memory_format=torch.channels_last)
    g = torch.randn(p.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    p.grad = g.clone()
    opt.step()
    codes, scales = quantize_momentum(torch.empty_like(ref).copy_(wide))
    rb, rs = reference_step([ref], [g], [codes], [scales], lr=0.1, momentum=0.9)
    assert torch.equal(bits(p), bits(ref))
    assert opt.state[p]["momentum_buffer"].stride() == p.stride()
    assert torch.equal(opt.state[p]["momentum_buffer"], rb[0])


def test_momentum_dtype_errors():
    p = torch.nn.Parameter(torch.randn(5))
    for bad in (torch.float16, torch.float64, "int8", torch.uint8):
        with pytest.raises(ValueError, match="momentum_dtype must be None, torch.float32"):
            momentum_cuda.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=bad)
    with pytest.raises(ValueError, match="momentum_dtype=torch.int8 cannot be used with "
                                         "differentiable=True"):
        momentum_cuda.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=torch.int8,
                          differentiable=True)
    assert "momentum_dtype" not in momentum_cuda.SGD([p], momentum_dtype=torch.float32
                                                     ).param_groups[0]
    # a float64 parameter in the group: refused before anything is written
    q = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    p.grad, q.grad = torch.randn(5), torch.randn(5, dtype=torch.float64)
    before = (p.detach().clone(), q.detach().clone())
    for flat in (True, False):
        with pytest.raises(ValueError, match=r"momentum_dtype=torch.bfloat16 stores the "
                                             r"momentum of float32 parameters; the group also"):
            momentum_cuda.SGD([p, q], lr=0.1, momentum=0.9, momentum_dtype=torch.bfloat16,
                              flat=flat).step()
        assert torch.equal(p, before[0]) and torch.equal(q, before[1])
    # ... or added later by hand: refused at the step
    opt = momentum_cuda.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=torch.bfloat16)
    opt.param_groups[0]["params"].append(q)
    with pytest.raises(ValueError, match=r"the group also holds a parameter of shape \(5,\) "
                                         r"\(torch.float64"):
        opt.step()
    assert torch.equal(p, before[0]) and torch.equal(q, before[1]) and not opt.state
    # an int8 buffer without its scales cannot be read
    opt = momentum_cuda.SGD([p], lr=0.1, momentum=0.9, momentum_dtype=torch.int8)
    opt.state[p]["momentum_buffer"] = torch.ones(5, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"has an int8 momentum buffer without its 1 block "
                                         r"scales"):
        opt.step()


def test_int8_momentum_trains_like_fp32():
    """A small regression problem: SGD with int8 momentum ends within a few percent of the
    fp32 loss (a sanity check of usefulness, not part of the bitwise contract: the tolerance
    is loose on purpose, the bitwise tests above are the contract)."""
    gen = torch.Generator().manual_seed(25)
    x = torch.randn(512, 64, generator=gen)
    w_true = torch.randn(64, 1, generator=gen)
    y = x @ w_true
    losses = {}
    for dtype in (None, torch.bfloat16, torch.int8):
        w = torch.nn.Parameter(torch.zeros(64, 1))
        opt = momentum_cuda.SGD([w], lr=0.01, momentum=0.9, momentum_dtype=dtype)
        for _ in range(200):
            opt.zero_grad()
            loss = ((x @ w - y) ** 2).mean()
            loss.backward()
            opt.step()
        losses[dtype] = float(((x @ w.detach() - y) ** 2).mean())
    assert losses[None] < 1e-3 * float((y ** 2).mean())
    for dtype in (torch.bfloat16, torch.int8):
        assert losses[dtype] < 1e-2 * float((y ** 2).mean()), losses


def test_code_rounding_is_exact_for_every_scale():
    """q8_round (momentum_dtype.h) rounds v / scale by + 1.5 * 2^23 - 1.5 * 2^23 and clamps
    after, which equals clamping first only while |v / scale| <= 2^22. |v| <= absmax, so it is
    enough that absmax / scale stays small: checked for EVERY subnormal absmax (where scale =
    absmax / 127 loses precision) and for the normal ones at every exponent's edges."""
    sub = torch.arange(1, 1 << 23, dtype=torch.int32).view(torch.float32)
    edges = torch.tensor([e << 23 | m for e in range(1, 255)
                          for m in (0, 1, 0x3FFFFF, 0x400000, 0x7FFFFE, 0x7FFFFF)],
                         dtype=torch.int64).to(torch.int32).view(torch.float32)
    for a in (sub, edges):
        scale = (a.double() / 127).float()
        ok = scale > 0
        ratio = a.double()[ok] / scale.double()[ok]
        assert ratio.max() <= 190.5
        normal = scale[ok] >= 2.0 ** -126  # one relative rounding: at most 127 * (1 + 2^-24)
        if normal.any():
            assert ratio[normal].max() <= 127 * (1 + 2.0 ** -24) / (1 - 2.0 ** -24)


@FLAT
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clip_with_an_unused_parameter(flat, dtype):
    """opt.clip_grad_norm_ with one parameter unused on a step (.grad None): the norm is
    torch's over the others, the clipped gradients are stepped by the contract, the unused
    parameter and its buffer stay as they are."""
    tw = Twins(flat, dtype)
    tw.step(2)
    for step in range(3):
        gs = tw.grads()
        params = tw.ours + [tw.f64]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        tw.ours[1].grad = None
        norm = tw.opt.clip_grad_norm_(0.5)
        twins = [torch.zeros_like(g).requires_grad_() for g in gs]
        for t, g in zip(twins, gs):
            t.grad = g.clone()
        twins[1].grad = None
        want = torch.nn.utils.clip_grad_norm_(twins, 0.5)  # clips the twins' .grad in place
        assert torch.equal(norm, want)
        clipped = [t.grad for t in twins]
        before = (tw.ours[1].detach().clone(), tw.opt.state[tw.ours[1]]["momentum_buffer"].clone())
        tw.opt.step()
        for p, c in zip(params, clipped):  # the clip reached every gradient, as torch's does
            assert (p.grad is None) == (c is None) and (c is None or torch.equal(p.grad, c))
        tw.t64.grad = clipped[-1]
        tw.topt.step()
        h = tw.ref_h()
        used = [k for k in range(len(tw.ours)) if k != 1]
        bufs, scales = reference_step([tw.ref[k] for k in used], [clipped[k] for k in used],
                                      [tw.bufs[k] for k in used],
                                      [tw.scales[k] for k in used] if tw.scales else None, **h)
        for j, k in enumerate(used):
            tw.bufs[k] = bufs[j]
            if scales is not None:
                tw.scales[k] = scales[j]
        tw.check(f"clip step {step}")
        assert torch.equal(tw.ours[1], before[0])
        assert torch.equal(tw.opt.state[tw.ours[1]]["momentum_buffer"], before[1])


def test_dtensor_checkpoint_form_of_int8_scales():
    """The per-element form state_dict gives a DTensor's int8 scales (reference.block_scales
    with optim._block_marks) is read back to the same scales bit for bit (NaN and zero scales too)
    where the shard's blocks are the saved ones, and refused (None: the buffer is quantized
    again) where another sharding cut a block short or began one elsewhere. The lossless path
    matters: quantizing a dequantized buffer again does not always give its scales back, as
    for a block whose largest |v| is this subnormal."""
    from momentum_cuda.optim import _block_marks, _scales_of_blocks
    from momentum_cuda.reference import block_scales
    gen = torch.Generator().manual_seed(21)
    for n in (1, 255, 256, 257, 900, 1200):
        v = torch.randn(n, generator=gen)
        v[n // 2] = float("nan") if n > 300 else v[n // 2]
        codes, scales = quantize_momentum(v)
        if n >= 512:
            codes[256:512] = 0
            scales[1] = 0.0
        per, marks = block_scales(codes, scales), _block_marks(codes)
        assert torch.equal(bits(_scales_of_blocks(per, marks)), bits(scales))
        # a shard of the first 900 elements of this one: its last block cut short
        if n == 1200:
            assert _scales_of_blocks(per[:900], marks[:900]) is None
            assert _scales_of_blocks(per[100:], marks[100:]) is None  # begun elsewhere
    tiny = torch.zeros(QBLOCK)
    tiny[3] = torch.tensor(0x1BD, dtype=torch.int32).view(torch.float32)  # a subnormal absmax
    codes, scales = quantize_momentum(tiny)
    again = quantize_momentum(dequantize_momentum(codes, scales))
    assert not torch.equal(bits(again[1]), bits(scales)), "the example no longer shows it"
