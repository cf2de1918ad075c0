"""The ops' CPU implementations called directly (torch.ops.momentum_cuda), against
torch.optim.SGD(foreach=False) run on separate copies: sgd_step_list_ on one tensor
(conftest.step_one), sgd_step_flat_ (segments of flat buffers, with gaps and empty segments),
sgd_step_list_ (100+ tensors of random sizes, 0 included) and views that start 1..7 elements into their storage. Every kernel ISA the CPU
has ('default' and 'avx2', via the conftest `isa` fixture, restored after)."""
from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import momentum_cuda  # noqa: F401  (registers torch.ops.momentum_cuda)
from conftest import step_one

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DTYPE_IDS = ("fp32", "fp64", "bf16", "fp16")
# Odd hyper-parameters: float(1 - dampening) and friends are not exact in fp32/bf16.
LR, MOMENTUM, DAMPENING, WD = 0.0123, 0.87, 0.13, 3e-3
STEPS = 3


def _modes():
    """(momentum, dampening, nesterov) x weight_decay x maximize: every flag set the kernel has."""
    out = []
    for (m, d, nest), wd, mx in itertools.product(
            [(0.0, 0.0, False), (MOMENTUM, 0.0, False), (MOMENTUM, DAMPENING, False),
             (MOMENTUM, 0.0, True)], (0.0, WD), (False, True)):
        out.append(dict(momentum=m, dampening=d, nesterov=nest, weight_decay=wd, maximize=mx))
    return out


MODES = _modes()


def _mode_id(h):
    kind = "sgd" if h["momentum"] == 0 else ("nest" if h["nesterov"] else
                                              ("damp" if h["dampening"] else "mom"))
    return f"{kind}-wd{int(h['weight_decay'] != 0)}-{'max' if h['maximize'] else 'min'}"


def seed_of(*parts) -> int:
    """A per-test seed that is the same in every run (str hash() is salted per process)."""
    return zlib.crc32(repr(parts).encode())


def randn(shape, gen, dtype):
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    return torch.where(t == 0, torch.ones_like(t), t).to(dtype)


# ---- reference and kernel drivers -------------------------------------------------------------
class TorchRef:
    """torch.optim.SGD(foreach=False) over copies of the given tensors."""

    def __init__(self, values, lr=LR, **h):
        self.params = [torch.nn.Parameter(v.detach().clone()) for v in values]
        self.opt = torch.optim.SGD(self.params, lr=lr, foreach=False, **h)

    def step(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        self.opt.step()

    def buf(self, i):
        st = self.opt.state.get(self.params[i], {})
        return st.get("momentum_buffer")


def kernel_kwargs(h, first_step, lr=LR):
    return dict(lr=lr, momentum=h["momentum"], dampening=h["dampening"],
                weight_decay=h["weight_decay"], nesterov=h["nesterov"], maximize=h["maximize"],
                first_step=first_step)


def assert_equal(ours, ref, what):
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, what
    if not torch.equal(ours, ref):
        bad = torch.nonzero((ours != ref).flatten()).flatten()
        pytest.fail(f"{what}: {bad.numel()} of {ours.numel()} elements differ, first at "
                    f"{bad[:6].tolist()}")


# ---- cpu_sgd_step_: one tensor, every dtype x flag set x ISA ----------------------------------
def _single_tensor_steps(dtype, h, shapes, gen):
    use_buf = h["momentum"] != 0
    for shape in shapes:
        p0 = randn(shape, gen, dtype)
        ref = TorchRef([p0], **h)
        p = p0.clone()
        # a buffer full of garbage: first_step must overwrite it without reading it
        buf = randn(shape, gen, dtype) if use_buf else None
        for step in range(STEPS):
            g = randn(shape, gen, dtype)
            g_before = g.clone()
            ref.step([g])
            step_one(p, g, buf, **kernel_kwargs(h, first_step=use_buf and step == 0))
            assert torch.equal(g, g_before), "the kernel wrote into the gradient"
            assert_equal(p, ref.params[0].detach(), f"{shape} step {step + 1} param")
            if use_buf:
                assert_equal(buf, ref.buf(0), f"{shape} step {step + 1} buffer")


@pytest.mark.parametrize("h", MODES, ids=[_mode_id(h) for h in MODES])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_single_tensor(dtype, h, isa):
    gen = torch.Generator().manual_seed(seed_of(str(dtype), _mode_id(h)))
    # 1001: a bf16/fp16 tail of 9 elements; (13, 77): 2-D
    _single_tensor_steps(dtype, h, (1, 31, (13, 77), 1001), gen)


BIG_MODES = [MODES[i] for i in (1, 7, 10, 14)]


@pytest.mark.parametrize("h", BIG_MODES, ids=[_mode_id(h) for h in BIG_MODES])
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
def test_single_tensor_big(dtype, h, isa):
    """70001 elements: two torch chunks with 2 threads, each with a bf16/fp16 tail (fp32/fp64
    have no position dependence; test_sgd_bitwise.py covers their big tensors)."""
    gen = torch.Generator().manual_seed(seed_of(str(dtype), _mode_id(h), "big"))
    _single_tensor_steps(dtype, h, (70001,), gen)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_single_tensor_empty_and_channels_last(dtype, isa):
    gen = torch.Generator().manual_seed(3)
    h = dict(momentum=MOMENTUM, dampening=DAMPENING, nesterov=False, weight_decay=WD,
             maximize=False)
    e = torch.empty(0, dtype=dtype)
    step_one(e, e.clone(), e.clone(), **kernel_kwargs(h, True))  # no-op, no error
    # channels_last: dense, not contiguous; grad and buffer share its strides
    p0 = randn((2, 3, 5, 7), gen, dtype).contiguous(memory_format=torch.channels_last)
    ref = TorchRef([p0], **h)
    p = p0.clone()
    buf = torch.empty_like(p)
    assert p.stride() == p0.stride() == buf.stride() and not p.is_contiguous()
    for step in range(STEPS):
        g = randn((2, 3, 5, 7), gen, dtype).contiguous(memory_format=torch.channels_last)
        ref.step([g])
        step_one(p, g, buf, **kernel_kwargs(h, step == 0))
        assert_equal(p, ref.params[0].detach(), f"step {step + 1}")
        assert_equal(buf, ref.buf(0), f"buffer step {step + 1}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_single_tensor_other_strides_on_size1_dims(dtype, isa):
    """A gradient and buffer whose strides differ from the parameter's on its dimensions of
    size 1 only (the gradient of a (n, 1) parameter may come transposed) place every element
    where the parameter does: the op takes them and gives the bits it gives with the
    parameter's own strides. Other strides on a dimension of size > 1 are still refused."""
    gen = torch.Generator().manual_seed(5)
    h = dict(momentum=MOMENTUM, dampening=DAMPENING, nesterov=True, weight_decay=WD,
             maximize=False)
    for shape in ((3, 1, 5), (1, 7), (1,), (2, 3, 1, 4)):
        p0 = randn(shape, gen, dtype)
        odd = [s + 3 if n == 1 else s for n, s in zip(shape, p0.stride())]
        p, q = p0.clone(), p0.clone()
        b, c = torch.zeros_like(p), torch.empty_strided(shape, odd, dtype=dtype).zero_()
        for step in range(STEPS):
            g = randn(shape, gen, dtype)
            odd_g = torch.empty_strided(shape, odd, dtype=dtype).copy_(g)
            assert odd_g.stride() != p.stride()
            step_one(p, g, b, **kernel_kwargs(h, step == 0))
            step_one(q, odd_g, c, **kernel_kwargs(h, step == 0))
            assert_equal(q, p, f"{shape} step {step + 1}")
            assert_equal(c, b, f"{shape} buffer step {step + 1}")
    p = randn((4, 6), gen, dtype)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has strides \[1, 4\] but params\[0\]"):
        step_one(p, randn((6, 4), gen, dtype).t(), torch.zeros_like(p),
                 **kernel_kwargs(h, True))


def test_lr_zero_and_momentum_one_edge_values(isa):
    """lr=0 leaves params bit-identical; momentum=1, dampening=1 keeps the buffer."""
    gen = torch.Generator().manual_seed(4)
    p0, b0 = randn(999, gen, torch.float32), randn(999, gen, torch.float32)
    p, b = p0.clone(), b0.clone()
    step_one(p, randn(999, gen, torch.float32), b, lr=0.0, momentum=1.0, dampening=1.0,
                     weight_decay=0.0, nesterov=False, maximize=False, first_step=False)
    assert torch.equal(p, p0) and torch.equal(b, b0)


# ---- cpu_sgd_step_flat_: segments with gaps and empty segments ---------------------------------
# (gap before, numel) per segment; 70001 has bf16/fp16 tails in both of torch's 2-thread chunks,
# so each segment must keep its own positions (the gaps shift the offsets by odd amounts).
FLAT_LAYOUT = [(3, 5), (0, 0), (7, 70001), (1, 33), (0, 0), (0, 1), (5, 0), (2, 40), (0, 257)]


def _flat_layout(layout):
    segs, off = [], 0
    for gap, n in layout:
        off += gap
        segs.append((off, n))
        off += n
    return segs, off + 6  # trailing gap


@pytest.mark.parametrize("h", [MODES[i] for i in (0, 7, 11, 15)],
                         ids=[_mode_id(MODES[i]) for i in (0, 7, 11, 15)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flat_segments(dtype, h, isa):
    gen = torch.Generator().manual_seed(seed_of(str(dtype), _mode_id(h), "flat"))
    segs, total = _flat_layout(FLAT_LAYOUT)
    use_buf = h["momentum"] != 0
    flat_p = randn(total, gen, dtype)
    flat_b = randn(total, gen, dtype) if use_buf else None  # gaps: random, never zero
    in_seg = torch.zeros(total, dtype=torch.bool)
    for off, n in segs:
        in_seg[off:off + n] = True
    assert (~in_seg).sum() > 0
    gaps_p = flat_p[~in_seg].clone()
    gaps_b = flat_b[~in_seg].clone() if use_buf else None
    ref = TorchRef([flat_p[off:off + n] for off, n in segs], **h)
    seg_t = torch.tensor(segs, dtype=torch.int64)
    for step in range(STEPS):
        flat_g = randn(total, gen, dtype)
        ref.step([flat_g[off:off + n] for off, n in segs])
        torch.ops.momentum_cuda.sgd_step_flat_(flat_p, flat_g, flat_b, seg_t,
                              **kernel_kwargs(h, first_step=use_buf and step == 0))
        for i, (off, n) in enumerate(segs):
            assert_equal(flat_p[off:off + n], ref.params[i].detach(),
                         f"segment {i} (offset {off}, {n}) step {step + 1}")
            if use_buf:
                assert_equal(flat_b[off:off + n], ref.buf(i), f"buffer segment {i} step {step + 1}")
        assert torch.equal(flat_p[~in_seg], gaps_p), "an element in a gap of params was written"
        if use_buf:
            assert torch.equal(flat_b[~in_seg], gaps_b), "an element in a gap of buffers was written"


def test_flat_no_segments_is_a_noop(isa):
    gen = torch.Generator().manual_seed(6)
    p, g, b = (randn(50, gen, torch.float32) for _ in range(3))
    p0, b0 = p.clone(), b.clone()
    torch.ops.momentum_cuda.sgd_step_flat_(p, g, b, torch.empty((0, 2), dtype=torch.int64), lr=0.1, momentum=0.9,
                          dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False,
                          first_step=False)
    assert torch.equal(p, p0) and torch.equal(b, b0)


def test_flat_segment_is_not_the_whole_tensor(isa):
    """bf16: a segment of 70001 elements inside a bigger buffer follows torch's chunking for a
    70001-element tensor, not for the buffer: the same elements stepped as one 140011-element
    segment give other bits (so the segment identity is really used)."""
    if torch.get_num_threads() < 2:
        pytest.skip("torch's chunking only splits with 2+ threads")
    gen = torch.Generator().manual_seed(7)
    n = 70001
    total = 2 * n + 9
    p0, g = randn(total, gen, torch.bfloat16), randn(total, gen, torch.bfloat16)
    kw = dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
              maximize=False, first_step=False)
    a, b = p0.clone(), p0.clone()
    torch.ops.momentum_cuda.sgd_step_flat_(a, g, None, torch.tensor([[0, n], [n + 9, n]]), **kw)
    torch.ops.momentum_cuda.sgd_step_flat_(b, g, None, torch.tensor([[0, total]]), **kw)
    ref = TorchRef([p0[:n], p0[n + 9:]], lr=0.1)
    ref.step([g[:n], g[n + 9:]])
    assert_equal(a[:n], ref.params[0].detach(), "segment 0")
    assert_equal(a[n + 9:], ref.params[1].detach(), "segment 1")
    assert not torch.equal(a[:n], b[:n]) or not torch.equal(a[n + 9:], b[n + 9:])


# ---- cpu_sgd_step_list_: 100+ tensors of random sizes, 0 included ------------------------------
def _list_shapes(gen, count=120):
    sizes = torch.randint(0, 400, (count,), generator=gen).tolist()
    sizes[::17] = [0] * len(sizes[::17])
    sizes[5], sizes[50] = 70001, 33000  # torch chunks these (2 threads)
    shapes = []
    for k, n in enumerate(sizes):
        if k % 7 == 3 and n > 0:
            shapes.append((1, n))
        elif k % 11 == 4:
            shapes.append((n % 13 + 1, 3))
        else:
            shapes.append((n,))
    return shapes


@pytest.mark.parametrize("h", [MODES[i] for i in (1, 10, 14)],
                         ids=[_mode_id(MODES[i]) for i in (1, 10, 14)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_list_many_tensors(dtype, h, isa):
    gen = torch.Generator().manual_seed(seed_of(str(dtype), _mode_id(h), "list"))
    shapes = _list_shapes(gen)
    assert len(shapes) >= 100 and any(s == (0,) for s in shapes)
    use_buf = h["momentum"] != 0
    ps = [randn(s, gen, dtype) for s in shapes]
    # a few transposed (dense, non-contiguous) parameters, grads with the same strides
    transposed = [k for k, s in enumerate(shapes) if len(s) == 2 and s[0] > 1]
    assert transposed
    for k in transposed:
        ps[k] = randn(shapes[k][::-1], gen, dtype).t()
    ref = TorchRef(ps, **h)
    bufs = [torch.empty_like(p) for p in ps] if use_buf else []
    for step in range(STEPS):
        gs = []
        for p in ps:
            g = torch.empty_like(p)  # preserves the parameter's strides
            g.copy_(randn(p.shape, gen, dtype))
            gs.append(g)
        ref.step(gs)
        torch.ops.momentum_cuda.sgd_step_list_(ps, gs, bufs, **kernel_kwargs(h, first_step=use_buf and step == 0))
        for i, p in enumerate(ps):
            assert_equal(p, ref.params[i].detach(), f"tensor {i} {tuple(p.shape)} step {step + 1}")
            if use_buf:
                assert_equal(bufs[i], ref.buf(i), f"buffer {i} step {step + 1}")


def test_list_empty_is_a_noop():
    torch.ops.momentum_cuda.sgd_step_list_([], [], [], lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0,
                          nesterov=False, maximize=False, first_step=False)


def test_list_same_as_single_calls(isa):
    """One list call == one single-tensor call per tensor (all spans share one parallel region,
    which must not mix up which tensor an element belongs to)."""
    gen = torch.Generator().manual_seed(8)
    shapes = [(n,) for n in (0, 1, 40000, 3, 70001, 0, 64, 65)]
    for dtype in DTYPES:
        ps = [randn(s, gen, dtype) for s in shapes]
        gs = [randn(s, gen, dtype) for s in shapes]
        bs = [randn(s, gen, dtype) for s in shapes]
        a_p, a_b = [p.clone() for p in ps], [b.clone() for b in bs]
        kw = dict(lr=LR, momentum=MOMENTUM, dampening=DAMPENING, weight_decay=WD,
                  nesterov=False, maximize=True, first_step=False)
        torch.ops.momentum_cuda.sgd_step_list_(a_p, gs, a_b, **kw)
        for i in range(len(ps)):
            p, b = ps[i].clone(), bs[i].clone()
            step_one(p, gs[i], b, **kw)
            assert_equal(a_p[i], p, f"{dtype} tensor {i}")
            assert_equal(a_b[i], b, f"{dtype} buffer {i}")


# ---- views that start 1..7 elements into their storage ------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("offset", range(1, 8))
def test_unaligned_views(offset, dtype, isa):
    gen = torch.Generator().manual_seed(100 + offset)
    h = dict(momentum=MOMENTUM, dampening=DAMPENING, nesterov=False, weight_decay=WD,
             maximize=False)
    sizes = (1, 37, 1001)
    if offset in (1, 6):  # a tensor torch splits in two chunks (bf16/fp16: tails differ)
        sizes += (70001 if dtype in (torch.bfloat16, torch.float16) else 5003,)
    stores, views = [], {"p": [], "b": []}
    for n in sizes:
        sp, sb = randn(n + 16, gen, dtype), randn(n + 16, gen, dtype)
        ob = (offset * 3) % 8 + 1  # the buffer at another misalignment
        stores.append((sp, sp.clone(), offset, sb, sb.clone(), ob, n))
        views["p"].append(sp[offset:offset + n])
        views["b"].append(sb[ob:ob + n])
    ps, bs = views["p"], views["b"]
    assert all(p.storage_offset() == offset for p in ps)
    ref = TorchRef(ps, **h)
    for step in range(STEPS):
        og = (offset * 5) % 8 + 1
        gstores = [randn(n + 16, gen, dtype) for n in sizes]
        gs = [s[og:og + n] for s, n in zip(gstores, sizes)]
        ref.step(gs)
        if step % 2 == 0:
            torch.ops.momentum_cuda.sgd_step_list_(ps, gs, bs, **kernel_kwargs(h, first_step=step == 0))
        else:
            for p, g, b in zip(ps, gs, bs):
                step_one(p, g, b, **kernel_kwargs(h, first_step=False))
        for i in range(len(sizes)):
            assert_equal(ps[i], ref.params[i].detach(), f"size {sizes[i]} step {step + 1}")
            assert_equal(bs[i], ref.buf(i), f"buffer size {sizes[i]} step {step + 1}")
    for sp, sp0, op, sb, sb0, ob, n in stores:  # nothing outside the views was written
        assert torch.equal(sp[:op], sp0[:op]) and torch.equal(sp[op + n:], sp0[op + n:])
        assert torch.equal(sb[:ob], sb0[:ob]) and torch.equal(sb[ob + n:], sb0[ob + n:])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_flat_unaligned_buffers(dtype, isa):
    """Flat buffers that are themselves views at odd offsets (1..7 elements) into storages."""
    gen = torch.Generator().manual_seed(9)
    segs, total = _flat_layout([(1, 17), (3, 1000), (0, 5)])
    h = dict(momentum=MOMENTUM, dampening=0.0, nesterov=True, weight_decay=WD, maximize=False)
    for offset in range(1, 8):
        sp, sb = randn(total + 8, gen, dtype), randn(total + 8, gen, dtype)
        fp, fb = sp[offset:offset + total], sb[8 - offset:8 - offset + total]
        ref = TorchRef([fp[o:o + n] for o, n in segs], **h)
        seg_t = torch.tensor(segs)
        for step in range(2):
            st = randn(total + 8, gen, dtype)
            fg = st[(offset + 3) % 8:(offset + 3) % 8 + total]
            ref.step([fg[o:o + n] for o, n in segs])
            torch.ops.momentum_cuda.sgd_step_flat_(fp, fg, fb, seg_t, **kernel_kwargs(h, first_step=step == 0))
            for i, (o, n) in enumerate(segs):
                assert_equal(fp[o:o + n], ref.params[i].detach(), f"offset {offset} seg {i}")
                assert_equal(fb[o:o + n], ref.buf(i), f"offset {offset} buffer seg {i}")
