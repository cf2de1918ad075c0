"""Shared helpers of the Python test-suite.

The reference for momentum_cuda.SGD is torch.optim.SGD(foreach=False) (torch's for-loop,
_single_tensor_sgd); for momentum_cuda.Momentum it is momentum_cuda.reference.MomentumReference.
Every bitwise claim below is checked with torch.equal, never with a tolerance.

Typical use:

    ours, ref = twin_params(make_values(SIZES, torch.bfloat16, seed=1))
    opt = momentum_cuda.SGD(ours, lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, foreach=False)
    run_steps(opt, ours, topt, ref, steps=10, seed=2)   # fresh random grads, checks every step
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys

import pytest
import torch

from momentum_cuda import _C

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
DTYPE_IDS = ("fp32", "fp64", "bf16", "fp16")
# Small odd sizes (0 and 1 included) plus a 2-D shape; 2**20 + 3 is used by a few tests only.
SIZES = (0, 1, 3, 97, (97, 33))
BIG = 2**20 + 3
STEPS = 10


def _shape(s):
    return (s,) if isinstance(s, int) else tuple(s)


# ---- hyper-parameter grid ------------------------------------------------------------------
def sgd_hyper_grid():
    """Every valid torch.optim.SGD combination of momentum 0/0.9, dampening 0/0.3, nesterov,
    weight_decay 0/1e-2 and maximize (nesterov needs momentum and no dampening)."""
    out = []
    for momentum, dampening, nesterov, wd, maximize in itertools.product(
            (0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 1e-2), (False, True)):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        out.append(dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=wd, maximize=maximize))
    return out


def hyper_id(h: dict) -> str:
    return (f"m{h['momentum']}-d{h['dampening']}-{'nest' if h['nesterov'] else 'plain'}"
            f"-wd{h['weight_decay']}-{'max' if h['maximize'] else 'min'}")


# ---- tensors ---------------------------------------------------------------------------------
def randn(shape, dtype, gen, memory_format=torch.contiguous_format) -> torch.Tensor:
    """Fresh standard-normal values (never all zeros), drawn in fp32 and rounded to dtype."""
    t = torch.randn(_shape(shape), generator=gen, dtype=torch.float32).to(dtype)
    if memory_format is not torch.contiguous_format:
        t = t.contiguous(memory_format=memory_format)
    return t


def make_values(sizes, dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [randn(s, dtype, gen) for s in sizes]


def twin_params(values, requires_grad=True):
    """Two lists of leaf tensors with identical values (ours, reference). requires_grad may be a
    list of flags (False: a frozen parameter)."""
    flags = (requires_grad if isinstance(requires_grad, (list, tuple))
             else [requires_grad] * len(values))
    a = [v.detach().clone().requires_grad_(f) for v, f in zip(values, flags)]
    b = [v.detach().clone().requires_grad_(f) for v, f in zip(values, flags)]
    return a, b


# ---- bitwise comparison ----------------------------------------------------------------------
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def isa_available(isa: str) -> bool:
    """Whether this CPU runs the C++ kernel's `isa` clone ("avx512", "avx2", "default")."""
    from momentum_cuda import _C
    try:
        old = _C.set_cpu_isa(isa)
    except RuntimeError:
        return False
    _C.set_cpu_isa(old)
    return True


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's bits, for torch.equal: a floating tensor viewed as the integer type of its size (a
    complex one as its real and imaginary parts), so -0.0 != 0.0 and a NaN equals its copy."""
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.view(_INT[t.element_size()]) if t.is_floating_point() else t


def fresh_grads(params, gen) -> list[torch.Tensor]:
    """One fresh random gradient per parameter, in the parameter's dtype and memory layout."""
    out = []
    for p in params:
        g = randn(p.shape, p.dtype, gen)
        out.append(torch.empty_like(p).copy_(g))  # preserve_format: the parameter's strides
    return out


def backward_grads(params, grads) -> None:
    """Delivers exactly `grads` through autograd, as a training loop does: sum(p * g) has the
    gradient g (times an exact 1), which backward() accumulates into each p.grad (in place into
    an existing .grad; where .grad is None, into momentum_cuda's flat view, which its hook
    attaches, or a new tensor)."""
    terms = [(p * g).sum().double() for p, g in zip(params, grads)]
    if terms:
        torch.stack(terms).sum().backward()


def set_grad(p: torch.Tensor, g: torch.Tensor, mode: str) -> None:
    """mode "copy": write into the existing .grad in place (keeps momentum_cuda's flat views);
    "assign": p.grad = g.clone() (a new tensor)."""
    if mode == "copy" and p.grad is not None:
        p.grad.copy_(g)
    else:
        p.grad = g.clone()


def same_address_new_storage(t: torch.Tensor, values: torch.Tensor) -> None:
    """t.data becomes `values` in memory at t's own address but in a new storage, its version
    unchanged: what p.data moved twice between steps gives when the allocator hands the first
    memory back (model.half().bfloat16() on CUDA's caching allocator). Made without relying
    on the allocator: a tensor over t's memory through numpy (a storage of its own), written,
    then given to t.data. (An empty t has no memory: left as it is.)"""
    if t.numel() == 0:
        return
    alias = torch.from_numpy(t.data.view(torch.int16).numpy()).view(t.dtype).view(t.shape)
    alias.copy_(values)
    version, ptr = t._version, t.data_ptr()
    t.data = alias
    assert (t._version, t.data_ptr()) == (version, ptr), "the version or address changed"


def write_grads(opt, params, grads) -> None:
    """The usual loop's first half: opt.zero_grad(), then backward() delivering `grads`."""
    opt.zero_grad()
    backward_grads(params, grads)


class Lender:
    """DDP with gradient_as_bucket_view=True: after each backward, called, it makes every .grad
    of `params` the same view of one bucket (reversed parameter order, an unaligned start,
    someone else's values before it) that it was at the last step, as DDP's reducer keeps them;
    the optimizer reads them in place (flat=True: a lent bucket, one list call)."""

    def __init__(self, params):
        ps = list(params)[::-1]
        self.bucket = torch.full((7 + sum(p.numel() for p in ps),), 1.5, dtype=ps[0].dtype,
                                 device=ps[0].device)
        self.views, off = {}, 7
        for p in ps:
            self.views[p] = self.bucket[off:off + p.numel()].view(p.shape)
            off += p.numel()

    def __call__(self):
        for p, v in self.views.items():
            if p.grad is not None and p.grad is not v:
                v.copy_(p.grad)
                p.grad = v


def forbid_planning(monkeypatch, opt) -> None:
    """From here on opt.step() must replay its kept step (optim._step_steady): planning
    raises."""
    def fail(*a, **k):
        raise AssertionError("planned although nothing changed")
    monkeypatch.setattr(opt, "_plan", fail)


def momentum_buffer(opt, p):
    st = opt.state.get(p)
    return None if st is None else st.get("momentum_buffer")


def assert_same(ours, ref, opt=None, topt=None, what=""):
    """Parameters (and, given the optimizers, momentum buffers) bitwise equal."""
    assert len(ours) == len(ref)
    for i, (p, q) in enumerate(zip(ours, ref)):
        assert p.dtype == q.dtype and p.shape == q.shape, f"{what} param {i}"
        assert torch.equal(p, q), (
            f"{what} param {i} ({p.dtype}, shape {tuple(p.shape)}) differs: "
            f"max |diff| {(p.double() - q.double()).abs().max().item() if p.numel() else 0}")
        if opt is not None:
            a, b = momentum_buffer(opt, p), momentum_buffer(topt, q)
            assert (a is None) == (b is None), (
                f"{what} momentum buffer of param {i}: ours {'absent' if a is None else 'present'},"
                f" reference {'absent' if b is None else 'present'}")
            if a is not None:
                assert a.dtype == b.dtype and a.shape == b.shape
                assert torch.equal(a, b), (
                    f"{what} momentum buffer {i} differs: max |diff| "
                    f"{(a.double() - b.double()).abs().max().item()}")


def assert_twins(ours, ref, opt, topt, what=""):
    """Two trained twins (modules, or lists of parameters) bit for bit: every parameter, each
    gradient's presence and bits (NaN and inf included), each momentum buffer's presence and
    bits."""
    ours = list(ours.parameters()) if hasattr(ours, "parameters") else list(ours)
    ref = list(ref.parameters()) if hasattr(ref, "parameters") else list(ref)
    assert len(ours) == len(ref)
    for i, (p, q) in enumerate(zip(ours, ref)):
        assert torch.equal(bits(p), bits(q)), f"{what}: parameter {i}"
        assert (p.grad is None) == (q.grad is None), f"{what}: gradient presence {i}"
        if p.grad is not None:
            assert torch.equal(bits(p.grad), bits(q.grad)), f"{what}: gradient {i}"
        ob, tb = momentum_buffer(opt, p), momentum_buffer(topt, q)
        assert (ob is None) == (tb is None), f"{what}: buffer presence {i}"
        if tb is not None:
            assert torch.equal(bits(ob), bits(tb)), f"{what}: momentum buffer {i}"


def run_steps(opt, ours, topt, ref, *, steps=STEPS, seed=0, mode="backward", skip=(),
              expect_path=None, check_grads=True, before_step=None):
    """`steps` steps of both optimizers with identical fresh random gradients; parameters and
    momentum buffers are compared after every step. The reference gets p.grad = g.clone().
    Ours, by mode: "backward" (default): the usual loop, opt.zero_grad() then backward()
    delivering the gradients (momentum_cuda's flat zero_grad sets every .grad to None, as
    torch's does, and backward attaches each parameter's flat view and accumulates into it); "copy": written in place into the existing .grad;
    "assign": p.grad = g.clone(). Parameters whose index is in `skip`, or that do not require
    grad, get no gradient (grad None). expect_path: "flat" / "per-tensor" checks every entry of
    opt.last_step. before_step(step) runs before each step."""
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        live = [i for i, p in enumerate(ours) if p.requires_grad and i not in skip]
        grads = fresh_grads([ours[i] for i in live], gen)
        if mode == "backward":
            opt.zero_grad()
        for i, p in enumerate(ours):
            if i not in live:
                p.grad = None
                ref[i].grad = None
        if mode == "backward":
            backward_grads([ours[i] for i in live], grads)
        else:
            for i, g in zip(live, grads):
                set_grad(ours[i], g, mode)
        for i, g in zip(live, grads):
            ref[i].grad = g.clone()
        opt.step()
        topt.step()
        assert_same(ours, ref, opt, topt, what=f"step {step + 1}:")
        if check_grads:  # the gradients are the ones meant, and the step did not write them
            for i, g in zip(live, grads):
                assert torch.equal(ours[i].grad, g), f"step {step + 1}: grad {i} differs"
        if expect_path is not None:
            paths = {e["path"] for e in opt.last_step}
            assert paths <= {expect_path}, f"step {step + 1}: paths {opt.last_step}"
    return gen


# ---- flat-layout inspection ------------------------------------------------------------------
def step_one(p, g, buf, **kw) -> None:
    """The list op on one (param, grad, buffer) triple; buf None when momentum == 0."""
    torch.ops.momentum_cuda.sgd_step_list_([p], [g], [] if buf is None else [buf], **kw)


def storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def byte_offset(t: torch.Tensor) -> int:
    return t.storage_offset() * t.element_size()


def whole_storage(t: torch.Tensor) -> torch.Tensor:
    """A 1-D tensor over t's entire storage (to look at the padding between views)."""
    n = t.untyped_storage().nbytes() // t.element_size()
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), 0, (n,), (1,))


def flat_paths(opt) -> list[str]:
    return [e["path"] for e in opt.last_step]


# ---- instruction sets ------------------------------------------------------------------------
_DEFAULT_ISA = _C.cpu_isa()


@pytest.fixture(params=["default", "avx2", "avx512"])
def isa(request):
    """Runs the test with the CPU kernel forced to each instruction set it can use here
    (skipped where the CPU lacks it), restoring the previous one after."""
    name = request.param
    try:
        prev = _C.set_cpu_isa(name)
    except RuntimeError as e:
        if "not supported by this CPU" not in str(e):
            raise
        pytest.skip(f"this CPU cannot run isa={name!r}")
    try:
        assert _C.cpu_isa() == name
        yield name
    finally:
        _C.set_cpu_isa(prev)


@pytest.fixture
def num_threads():
    """Sets torch's intra-op thread count for a test (torch's bf16/fp16 bits depend on it),
    restoring it after: use as num_threads(n)."""
    prev = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(prev)


@pytest.fixture(autouse=True)
def _restore_global_state():
    """No test may leak an ISA or thread-count change into the next one."""
    isa, threads = _C.cpu_isa(), torch.get_num_threads()
    yield
    assert _C.cpu_isa() == isa, "a test changed the CPU ISA without restoring it"
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        pytest.fail("a test changed torch's thread count without restoring it")


@contextlib.contextmanager
def no_host_reads(int64_tolist: bool = False):
    """Tensor.item, __bool__, __float__ and tolist raise inside: a Python-side host read (a sync
    on a GPU) shows as an AssertionError. int64_tolist: tolist of an int64 tensor is let
    through (the Triton flat op reads its segments, a CPU int64 tensor on a GPU too: host
    memory, no sync; GradScaler's and the optimizer's tensors are float or bool)."""
    saved = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "tolist",
                                                            "__float__")}

    def refuse(name):
        def read(t, *args, **kwargs):
            if int64_tolist and name == "tolist" and t.dtype == torch.int64:
                return saved[name](t, *args, **kwargs)
            raise AssertionError("a tensor was read on the host during the step")
        return read
    try:
        for name in saved:
            setattr(torch.Tensor, name, refuse(name))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def have(module: str) -> bool:
    """Whether `module` imports here."""
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# Test modules whose checks run in a Triton-interpreter child (interpreter_child). In a plain
# session the first one needed starts the children of all those collected, so that they run at
# once (one core each: each child is one single-threaded interpreter). Under pytest-xdist
# (`make test` runs two workers, each taking whole files) every worker collects everything, so
# a child is started only by the worker that runs its module.
INTERPRETER_MODULES = ("test_triton_amp", "test_triton_interp", "test_triton_master",
                       "test_triton_sr", "test_triton_qmom", "test_triton_fp16_master")
_collected: set = set()
_children: dict = {}  # module -> (Popen, stdout file, stderr file, start time)
_XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ


def pytest_collection_finish(session):
    _collected.update(item.module.__name__ for item in session.items
                      if getattr(item, "module", None) is not None)


def pytest_sessionfinish(session):
    for proc, *_ in _children.values():
        if proc.poll() is None:
            proc.kill()


def _start_child(module: str) -> None:
    import tempfile
    import time
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    code = f"import sys; sys.path.insert(0, {here!r}); import {module} as t; t._child_main()"
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # not pipes: no
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=out, stderr=err,
                            text=True, cwd=root)  # blocking on a full pipe buffer
    _children[module] = (proc, out, err, time.monotonic())


def interpreter_child(module: str, timeout: int) -> dict:
    """Runs tests/<module>.py's _child_main() in a child Python with TRITON_INTERPRET=1 (Triton
    reads it when a kernel is decorated, so only a fresh process interprets) and returns what
    it printed after @@RESULT@@: {check name: {"error": traceback or None, "seconds": ...}}.
    The children of the other INTERPRETER_MODULES this session collected start with it."""
    import time
    for m in INTERPRETER_MODULES:
        if m not in _children and (m == module or (m in _collected and not _XDIST_WORKER)):
            _start_child(m)
    proc, out, err, t0 = _children[module]
    try:
        proc.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    out.seek(0)
    err.seek(0)
    stdout, stderr = out.read(), err.read()
    marker = [ln for ln in stdout.splitlines() if ln.startswith("@@RESULT@@")]
    assert proc.returncode == 0 and marker, (
        f"interpreter child failed (rc={proc.returncode}, {timeout} s allowed):\n"
        f"{stdout[-4000:]}\n{stderr[-4000:]}")
    return json.loads(marker[-1][len("@@RESULT@@"):])


# (shape, layout of the parameter): each has a dimension of size 1, whose stride torch leaves
# free; "permuted" is dense but neither contiguous nor channels_last
SIZE1_LAYOUTS = [((3, 1, 5), "c"), ((1, 7), "c"), ((1,), "c"), ((1, 1), "c"),
                 ((2, 3, 1, 4), "channels_last"), ((3, 1, 5), "permuted")]


def size1_param(shape, form, dtype, gen):
    """A parameter value of SIZE1_LAYOUTS' shape and layout."""
    v = torch.randn(shape, generator=gen).to(dtype)
    if form == "channels_last":
        v = v.contiguous(memory_format=torch.channels_last)
    elif form == "permuted":
        v = torch.randn(shape[::-1], generator=gen).to(dtype).permute(2, 1, 0)
    return v


def free_size1(q, gen):
    """A tensor laid out like q except on its size-1 dimensions, whose strides are other
    values (as a gradient of a (n, 1) parameter may come: a transposed (1, n) one)."""
    strides = [s + 1 + int(torch.randint(0, 40, (), generator=gen)) if n == 1 else s
               for n, s in zip(q.shape, q.stride())]
    t = torch.empty_strided(q.shape, strides, dtype=q.dtype)
    assert t.stride() != q.stride() and t.untyped_storage().nbytes() == t.nbytes  # dense
    return t.copy_(torch.randn(q.shape, generator=gen))
