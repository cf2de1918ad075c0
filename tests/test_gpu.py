"""GPU tests: momentum_cuda on CUDA tensors (CUDA and Triton backends), bitwise against
torch.optim.SGD(foreach=False) on the same GPU and dtype, and every step's backend and path
asserted (a silent fallback to torch's own ops fails). They skip where no GPU is visible or a
backend is not built (this machine, CI), except under MOMENTUM_CUDA_REQUIRE_GPU=1, which the GPU
check (tools/gpu_check.py) sets: there a skip would hide a broken build, so it fails instead.
The kernels themselves run here too, through the host emulation of tests/test_cuda_host.py."""
import contextlib
import copy
import itertools
import os
import warnings

import pytest
import torch

import momentum_cuda
from momentum_cuda.reference import MomentumReference

REQUIRE_GPU = os.environ.get("MOMENTUM_CUDA_REQUIRE_GPU") == "1"


def _missing(what: bool, reason: str):
    """Skip where `what` is missing, except under MOMENTUM_CUDA_REQUIRE_GPU=1 (_require fails)."""
    return pytest.mark.skipif(what and not REQUIRE_GPU, reason=reason)


@pytest.fixture(autouse=True)
def _require(request):
    if not REQUIRE_GPU:
        return
    backend = getattr(request.node, "callspec", None) and request.node.callspec.params.get(
        "backend")
    ok = torch.cuda.is_available() and (
        backend is None or momentum_cuda.available_backends()[backend][0])
    if not ok:
        pytest.fail(f"MOMENTUM_CUDA_REQUIRE_GPU=1 but this test cannot run here: GPU visible: "
                    f"{torch.cuda.is_available()}; backends: {momentum_cuda.available_backends()}")


pytestmark = _missing(not torch.cuda.is_available(), "needs a visible GPU")
# Each GPU backend that this install has; a missing one is a skip that says why.
BACKENDS = [pytest.param(name, marks=_missing(not momentum_cuda.available_backends()[name][0],
                                              momentum_cuda.available_backends()[name][1]))
            for name in ("cuda", "triton")]

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
HYPER = [dict(momentum=m, dampening=d, weight_decay=wd, nesterov=n, maximize=mx)
         for m, d, wd, n, mx in itertools.product((0.0, 0.9), (0.0, 0.3), (0.0, 1e-2),
                                                  (False, True), (False, True))
         if not (n and (m == 0 or d != 0)) and not (m == 0 and d != 0)]
SIZES = [[0, 1, 3, 97], [2**20 + 3], [(97, 33), 5, (64, 3, 3, 3)]]
STEPS = 10


def _twins(sizes, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    vals = [torch.randn(s if isinstance(s, tuple) else (s,), generator=g).to(dtype).cuda()
            for s in sizes]
    return ([torch.nn.Parameter(v.clone()) for v in vals],
            [torch.nn.Parameter(v.clone()) for v in vals])


def _run(ours, ref, opt, topt, dtype, seed, backend, flat):
    g = torch.Generator(device="cpu").manual_seed(seed)
    for step in range(STEPS):
        grads = [torch.randn(p.shape, generator=g).to(dtype).cuda() for p in ours]
        for p, q, gr in zip(ours, ref, grads):
            if p.grad is not None:
                p.grad.copy_(gr)
            else:  # backward attaches momentum_cuda's flat view; its gradient is exactly gr
                (p * gr).sum().backward()
            q.grad = gr.clone()
        opt.step()
        topt.step()
        got = [(e["backend"], e["path"]) for e in opt.last_step]
        assert got == [(backend, "flat" if flat else "per-tensor")], \
            f"step {step + 1}: calls {opt.last_step}"
        for i, (p, q) in enumerate(zip(ours, ref)):
            assert torch.equal(p, q), f"step {step + 1} param {i} ({dtype}) differs"
            if "momentum_buffer" in topt.state[q]:
                assert torch.equal(opt.state[p]["momentum_buffer"],
                                   topt.state[q]["momentum_buffer"])


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("sizes", SIZES, ids=["small", "2^20+3", "shapes"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sgd_bitwise_vs_torch_forloop(backend, hyper, dtype, sizes, flat):
    ours, ref = _twins(sizes, dtype, seed=1)
    opt = momentum_cuda.SGD(ours, lr=0.05, backend=backend, flat=flat, **hyper)
    topt = torch.optim.SGD(ref, lr=0.05, foreach=False, **hyper)
    _run(ours, ref, opt, topt, dtype, seed=2, backend=backend, flat=flat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_sgd_bitwise_vs_torch_foreach(dtype):
    """fp32/fp64: torch's foreach path gives the for-loop's bits, so ours too."""
    ours, ref = _twins(SIZES[0] + SIZES[2], dtype, seed=3)
    h = dict(momentum=0.9, weight_decay=1e-2, nesterov=True)
    opt = momentum_cuda.SGD(ours, lr=0.05, **h)
    _run(ours, ref, opt, torch.optim.SGD(ref, lr=0.05, foreach=True, **h), dtype, seed=4,
         backend=opt.backend, flat=True)


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_bitwise_vs_reference(backend, dtype, flat):
    ours, ref = _twins(SIZES[0] + SIZES[2], dtype, seed=5)
    h = dict(lr=0.01, momentum=0.9, weight_decay=1e-3)
    _run(ours, ref, momentum_cuda.Momentum(ours, flat=flat, backend=backend, **h),
         MomentumReference(ref, **h), dtype, seed=6, backend=backend, flat=flat)


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_with_other_size1_strides_on_gpu(backend, dtype, flat):
    """tests/test_torch_parity.py's size-1 layouts on the GPU: gradients whose strides differ
    from their parameter's on dimensions of size 1 only, new ones each step, taken by the
    kernels as they are (the permuted layout, which bf16/fp16 step with torch's ops, is left
    out), bitwise against torch's for-loop on the same GPU."""
    from conftest import SIZE1_LAYOUTS, free_size1, size1_param
    device = torch.empty(0).cuda().device  # (.cuda(): tests/test_triton_jit.py replays this)

    def on_gpu(t):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).copy_(t)
    gen = torch.Generator().manual_seed(29)
    vals = [on_gpu(size1_param(s, f, dtype, gen)) for s, f in SIZE1_LAYOUTS if f != "permuted"]
    ours = [torch.nn.Parameter(v.clone()) for v in vals]
    ref = [torch.nn.Parameter(v.clone()) for v in vals]
    h = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True)
    opt = momentum_cuda.SGD(ours, flat=flat, backend=backend, **h)
    topt = torch.optim.SGD(ref, foreach=False, **h)
    for step in range(4):
        for p, q in zip(ours, ref):
            g = on_gpu(free_size1(q.detach(), gen))
            assert g.stride() != q.stride()
            p.grad, q.grad = g.clone(), g
        opt.step()
        topt.step()
        for i, (p, q) in enumerate(zip(ours, ref)):
            assert torch.equal(p, q), f"step {step + 1}: parameter {i}"
            tb = topt.state[q].get("momentum_buffer")  # (none in test_triton_jit's replay)
            assert tb is not None or not torch.cuda.is_available()
            if tb is not None:
                assert torch.equal(opt.state[p]["momentum_buffer"], tb), \
                    f"step {step + 1}: buffer {i}"
        # (gradients assigned at every step are not the flat buffer's views: per-tensor)
        assert {(e["backend"], e["path"]) for e in opt.last_step} == {
            (backend, "per-tensor")}, opt.last_step


def test_default_backend_on_cuda():
    """The CUDA kernel when built, else Triton."""
    p = torch.nn.Parameter(torch.randn(5, device="cuda"))
    want = "cuda" if momentum_cuda.available_backends()["cuda"][0] else "triton"
    assert momentum_cuda.SGD([p], lr=0.1).backend == want


@pytest.mark.parametrize("kind", ["flat", "list"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_on_gpu(backend, dtype, kind):
    """torch.library.opcheck on the CUDA and Triton ops with CUDA tensors (tests/test_ops.py
    does the CPU ones): the schema's writes, the fake kernel, aot_autograd."""
    prefix = "triton_" if backend == "triton" else ""
    op = getattr(torch.ops.momentum_cuda, f"{prefix}sgd_step_{kind}_").default
    g = torch.Generator().manual_seed(7)
    h = dict(lr=0.0123, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
             maximize=True, first_step=False)
    if kind == "flat":
        p, gr, b = (torch.randn(1163, generator=g).to(dtype).cuda() for _ in range(3))
        args = (p, gr, b, torch.tensor([[0, 1], [5, 97], [102, 0], [120, 3], [130, 1030]]))
    else:
        args = tuple([torch.randn(n, generator=g).to(dtype).cuda() for n in (0, 1, 3, 97, 1030)]
                     for _ in range(3))
    result = torch.library.opcheck(op, args, h)
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("kind", ["flat", "list"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_first_step_tensor_on_gpu(dtype, kind):
    """The CUDA ops' first_step_tensor (capturable's device decision, read by the kernels):
    the bits of first_step=True where it is true and of first_step=False where it is false;
    opcheck with it."""
    if not momentum_cuda.available_backends()["cuda"][0]:
        pytest.skip(momentum_cuda.available_backends()["cuda"][1])
    op = getattr(torch.ops.momentum_cuda, f"sgd_step_{kind}_").default
    h = dict(lr=0.0123, momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False,
             maximize=True)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    for value in (True, False):
        g = torch.Generator().manual_seed(8)
        if kind == "flat":
            p, gr, b = (torch.randn(1163, generator=g).to(dtype).cuda() for _ in range(3))
            got = (p, gr, b, torch.tensor([[0, 1], [5, 97], [102, 0], [120, 3], [130, 1030]]))
        else:
            got = tuple([torch.randn(n, generator=g).to(dtype).cuda()
                         for n in (0, 1, 3, 97, 1030)] for _ in range(3))
        want = copy.deepcopy(got)
        op(*want, first_step=value, **h)
        op(*got, first_step=True, first_step_tensor=torch.tensor(value, device="cuda"), **h)
        for a, b in zip(got[:3], want[:3]):
            for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                assert torch.equal(x.view(bits), y.view(bits)), (dtype, kind, value)
        result = torch.library.opcheck(op, got, dict(h, first_step=True, first_step_tensor=(
            torch.tensor(value, device="cuda"))))
        assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_hyper_parameters_read_on_the_device(backend, dtype, flat):
    """lr, momentum, dampening and weight_decay as CUDA tensors (fp32 for fp32/bf16
    parameters, fp64 for fp64/fp16: each hyper dtype with a 16-bit and a wide one, and 4 more
    Triton compilations per dtype, not 8), changed in place every step (momentum and
    weight_decay 0 on some steps), read by the kernels: torch.optim.SGD(foreach=False) given
    the same tensors gives the same bits, buffers included. This is where torch's CUDA mul_
    takes buf.mul_(momentum)'s 0-dim CUDA tensor as the buffer's dtype (bf16/fp16: rounded
    first), which the kernels copy (sgd_kernel.cuh, device_step)."""
    hdtype = torch.float64 if dtype in (torch.float64, torch.float16) else torch.float32
    ours, ref = _twins(SIZES[0] + SIZES[2], dtype, seed=33)
    schedule = [(0.05, 0.9, 0.1, 1e-2), (0.04, 0.0, 0.35, 1e-2), (0.03, 0.8, 0.29, 0.0),
                (0.02, 0.7, 0.0, 3e-2), (0.01, 0.0, 0.2, 0.0), (0.02, 0.85, 0.3, 1e-3)]
    names = ("lr", "momentum", "dampening", "weight_decay")

    def hyper():
        return {n: torch.tensor(v, dtype=hdtype).cuda()
                for n, v in zip(names, schedule[0])}
    opt = momentum_cuda.SGD(ours, backend=backend, flat=flat, **hyper())
    topt = torch.optim.SGD(ref, foreach=False, **hyper())
    g = torch.Generator(device="cpu").manual_seed(34)
    for step, values in enumerate(schedule):
        for o in (opt, topt):
            for n, v in zip(names, values):
                o.param_groups[0][n].fill_(v)
        grads = [torch.randn(p.shape, generator=g).to(dtype).cuda() for p in ours]
        for p, q, gr in zip(ours, ref, grads):
            if p.grad is not None:
                p.grad.copy_(gr)
            else:
                (p * gr).sum().backward()
            q.grad = gr.clone()
        opt.step()
        topt.step()
        assert {e["backend"] for e in opt.last_step} == {backend}, opt.last_step
        for i, (p, q) in enumerate(zip(ours, ref)):
            assert torch.equal(p, q), f"step {step + 1} param {i} ({dtype}) differs"
            if "momentum_buffer" in topt.state[q]:  # always on a GPU; not in the JIT replay
                assert torch.equal(opt.state[p]["momentum_buffer"],
                                   topt.state[q]["momentum_buffer"])


@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradscaler_in_the_kernel(backend, dtype, flat, clip):
    """GradScaler hands the CUDA or Triton backend grad_scale and found_inf
    (_step_supports_amp_scaling):
    the kernel unscales in the step's pass and skips overflowed steps on the device. Bitwise
    against GradScaler + torch.optim.SGD(foreach=False), gradients included, with overflows on
    step 1 and twice in a row, and a scale that is not a power of two. With clip: torch's AMP
    recipe (scaler.unscale_, clip_grad_norm_, scaler.step) with opt.clip_grad_norm_, whose
    coefficient the kernel reads on the device and multiplies in the same pass (not torch's
    clip: path "torch-clip" only on the overflowed step 1); the total norms are equal too.
    Every later step runs on the backend's kernels."""
    ours, ref = _twins(SIZES[0] + SIZES[2], dtype, seed=31)
    h = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)
    opt = momentum_cuda.SGD(ours, backend=backend, flat=flat, **h)
    topt = torch.optim.SGD(ref, foreach=False, **h)
    assert opt._step_supports_amp_scaling
    scalers = [torch.amp.GradScaler("cuda", init_scale=1000.0, growth_interval=2)
               for _ in range(2)]
    g = torch.Generator(device="cpu").manual_seed(32)
    bits = {2: torch.int16, 4: torch.int32}
    for step in range(8):
        grads = [torch.randn(p.shape, generator=g).to(dtype).cuda() for p in ours]
        norms = []
        for params, o, s in ((ours, opt, scalers[0]), (ref, topt, scalers[1])):
            loss = sum((p.float() * gr.float()).sum() for p, gr in zip(params, grads))
            if step in (0, 3, 4):
                loss = loss * float("inf")
            o.zero_grad()
            s.scale(loss).backward()
            if clip:
                s.unscale_(o)
                norms.append(o.clip_grad_norm_(0.5) if o is opt
                             else torch.nn.utils.clip_grad_norm_(params, 0.5))
            s.step(o)
            s.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        if clip:
            n, tn = norms
            assert n.dtype == tn.dtype
            assert torch.equal(n.view(bits[n.element_size()]), tn.view(bits[tn.element_size()]))
            if step > 0:
                assert "torch-clip" not in [e["path"] for e in opt.last_step], opt.last_step
        if step > 0:
            assert {e["backend"] for e in opt.last_step} == {backend}, opt.last_step
        for i, (p, q) in enumerate(zip(ours, ref)):
            b = bits[p.element_size()]
            assert torch.equal(p.detach().view(b), q.detach().view(b)), f"step {step + 1} p{i}"
            assert torch.equal(p.grad.view(b), q.grad.view(b)), f"step {step + 1} grad {i}"
            assert ("momentum_buffer" in opt.state[p]) == ("momentum_buffer" in topt.state[q])


@pytest.mark.parametrize("hyper", ["lr", "all"])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("flat", [True, False])
def test_cuda_graph_training_iteration(flat, clip, hyper):
    """A whole training iteration (forward, backward, GradScaler step, zero_grad; with clip:
    scaler.unscale_ and opt.clip_grad_norm_ before the step) captured in a CUDA graph and
    replayed 20 times, with the lr a device tensor changed between replays by a scheduler
    (hyper="all": momentum, dampening and weight_decay device tensors too, changed in place
    between replays), gives the bits of the same iterations run eagerly with
    torch.optim.SGD (foreach=False), torch's clip_grad_norm_ and GradScaler's own path. The
    step reads the hyper-parameters, GradScaler's tensors and the clip coefficient on the
    device: nothing in it syncs, so it can be captured."""
    if not momentum_cuda.available_backends()["cuda"][0]:
        pytest.skip(momentum_cuda.available_backends()["cuda"][1])
    torch.manual_seed(41)
    model = torch.nn.Sequential(torch.nn.Linear(32, 97), torch.nn.Tanh(),
                                torch.nn.Linear(97, 5)).cuda()
    twin = copy.deepcopy(model)
    lr, tlr = (torch.tensor(0.05, device="cuda") for _ in range(2))
    values = dict(momentum=0.9, dampening=0.1, weight_decay=1e-2)

    def h():
        if hyper == "lr":
            return dict(values)
        return {k: torch.tensor(v, device="cuda") for k, v in values.items()}
    opt = momentum_cuda.SGD(model.parameters(), lr=lr, backend="cuda", flat=flat, **h())
    topt = torch.optim.SGD(twin.parameters(), lr=tlr, foreach=False, **h())

    def change_hyper(k):  # in place, as a capturable schedule must (hyper="all")
        if hyper == "all":
            for o in (opt, topt):
                o.param_groups[0]["momentum"].fill_(0.0 if k % 7 == 6 else 0.9 - 0.01 * k)
                o.param_groups[0]["weight_decay"].fill_(0.0 if k % 5 == 4 else 1e-2)
                o.param_groups[0]["dampening"].fill_(0.1 + 0.01 * k)
    decay = lambda k: 0.97 ** k  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    tsched = torch.optim.lr_scheduler.LambdaLR(topt, decay)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    tscaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    static_x = torch.zeros(8, 32, device="cuda")
    gen = torch.Generator(device="cpu").manual_seed(42)
    xs = [torch.randn(8, 32, generator=gen).cuda() for _ in range(23)]

    def iteration():
        opt.zero_grad(set_to_none=False)
        loss = model(static_x).square().mean()
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(opt)
            opt.clip_grad_norm_(0.5)
        scaler.step(opt)
        scaler.update()

    def twin_iteration(x):
        topt.zero_grad(set_to_none=False)
        tscaler.scale(twin(x).square().mean()).backward()
        if clip:
            tscaler.unscale_(topt)
            torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
        tscaler.step(topt)
        tscaler.update()
        tsched.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: buffers and flat layout exist before capture
        for k in range(3):
            static_x.copy_(xs[k])
            iteration()
            sched.step()
            twin_iteration(xs[k])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        iteration()
    for k in range(3, 23):
        static_x.copy_(xs[k])
        change_hyper(k)
        graph.replay()
        sched.step()
        twin_iteration(xs[k])
        torch.cuda.synchronize()
        for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
            assert torch.equal(p, q), f"replay {k - 2}: parameter {i} differs"
        assert scaler.get_scale() == tscaler.get_scale()


def _apart_twins(backend, how, seed):
    """(ours, torch's twin, give(in_place), same(what)) for the replays of flat=True steps whose
    gradients are not the flat views: assigned (p.grad = g: the bucket stepped apart, by a list
    call) or DDP-style bucket views (a lent bucket's list call); or ("unused") the flat views
    but for the first layer's bias, which gets no gradient (the bucket stepped in part: one
    flat call over its two runs). give() draws new gradients, assigned anew (unused: through
    backward) or written in place; same() compares parameters and buffers bitwise."""
    from conftest import Lender, backward_grads
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 97), torch.nn.Tanh(),
                                torch.nn.Linear(97, 5)).cuda()
    twin = copy.deepcopy(model)
    h = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    opt = momentum_cuda.SGD(model.parameters(), backend=backend, flat=True, **h)
    topt = torch.optim.SGD(twin.parameters(), foreach=False, **h)
    ps, qs = list(model.parameters()), list(twin.parameters())
    lend = Lender(ps) if how == "lent" else None
    gen = torch.Generator().manual_seed(seed + 1)

    def give(in_place):
        used = [k for k in range(len(ps)) if how != "unused" or k != 1]
        grads = {k: torch.randn(ps[k].shape, generator=gen).cuda() for k in used}
        if how == "unused" and not in_place:
            opt.zero_grad()
            backward_grads([ps[k] for k in used], [grads[k] for k in used])
        for k, g in grads.items():
            qs[k].grad = g.clone()
            if in_place:
                ps[k].grad.copy_(g)
            elif how != "unused":
                ps[k].grad = g.clone()
        if lend is not None:
            lend()

    def same(what):  # (the buffers torch has: none in the Triton JIT replay, which stubs
        for i, (p, q) in enumerate(zip(ps, qs)):  # torch's step)
            assert torch.equal(p, q), f"{what}: parameter {i}"
            b = topt.state[q].get("momentum_buffer")
            assert b is None or torch.equal(opt.state[p]["momentum_buffer"], b), \
                f"{what}: buffer {i}"
    return opt, topt, give, same


def _apart_steps(opt, topt, give, same, mp, how):
    """Five eager steps; from the third on planning is forbidden (the replay, through the
    MonkeyPatch mp) and nothing is read on the host."""
    from conftest import forbid_planning, no_host_reads
    for k in range(5):
        if k == 2:
            forbid_planning(mp, opt)
        give(in_place=False)
        # (the Triton flat op reads its segments, a CPU int64 tensor: host memory, no sync)
        with no_host_reads(int64_tolist=True) if k >= 2 else contextlib.nullcontext():
            opt.step()
        topt.step()
        same(f"step {k + 1}")
    assert [e["path"] for e in opt.last_step] == [
        "per-tensor" if how == "assigned" else "flat"], opt.last_step


@pytest.mark.parametrize("how", ["assigned", "lent", "unused"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_replay_without_flat_gradient_views_on_gpu(backend, how):
    """flat=True on CUDA with the gradients assigned, DDP-style bucket views or an unused
    parameter in the middle of the bucket (_apart_twins):
    from the third step on the step replays with no host read and torch.optim.SGD
    (foreach=False)'s bits (tests/test_steady.py has it on the CPU). (No fixture: the Triton
    JIT replay, tests/test_triton_jit.py, calls it with its parameters only.)"""
    with pytest.MonkeyPatch.context() as mp:
        _apart_steps(*_apart_twins(backend, how, 47), mp, how)


@pytest.mark.parametrize("how", ["assigned", "lent", "unused"])
def test_cuda_graph_replay_without_flat_gradient_views(how):
    """The same steps (CUDA backend), then the replayed step captured in a CUDA graph and
    replayed 5 times, the gradients written in place, against eager twins."""
    if not momentum_cuda.available_backends()["cuda"][0]:
        pytest.skip(momentum_cuda.available_backends()["cuda"][1])
    opt, topt, give, same = _apart_twins("cuda", how, 49)
    with pytest.MonkeyPatch.context() as mp:
        _apart_steps(opt, topt, give, same, mp, how)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            opt.step()
    for k in range(5):
        give(in_place=True)
        graph.replay()
        topt.step()
        torch.cuda.synchronize()
        same(f"graph replay {k + 1}")


def _capturable_twins(kind, seed, flat=True):
    """(model, twin, momentum_cuda's optimizer with capturable=True, torch's) on CUDA."""
    if not momentum_cuda.available_backends()["cuda"][0]:
        pytest.skip(momentum_cuda.available_backends()["cuda"][1])
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 97), torch.nn.Tanh(),
                                torch.nn.Linear(97, 5)).cuda()
    twin = copy.deepcopy(model)
    if kind == "sgd":
        h = dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-2)
        return (model, twin,
                momentum_cuda.SGD(model.parameters(), backend="cuda", capturable=True, flat=flat,
                                  **h),
                torch.optim.SGD(twin.parameters(), foreach=False, **h))
    h = dict(lr=0.05, momentum=0.8, weight_decay=1e-3)
    return (model, twin,
            momentum_cuda.Momentum(model.parameters(), backend="cuda", capturable=True, flat=flat,
                                   **h),
            MomentumReference(twin.parameters(), **h))


def _same_state(opt, topt, what):
    sd, tsd = opt.state_dict(), topt.state_dict()  # (reads the flags: optim._Unsure)
    assert sd["state"].keys() == tsd["state"].keys(), what
    for i, st in tsd["state"].items():
        a, b = sd["state"][i]["momentum_buffer"], st["momentum_buffer"]
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{what}: buffer {i}"


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("kind", ["sgd", "momentum"])
def test_capturable_first_step_on_the_device(kind, flat):
    """capturable=True on CUDA: the steps that create the momentum buffers (steps 1 and 2
    overflow) read nothing on the host either (conftest.no_host_reads around every step):
    each bucket's flag (flat) or list call's (per-tensor) tells the kernel whether it is a
    first step. Bits of GradScaler +
    torch.optim.SGD(foreach=False) (or MomentumReference) every step; state_dict() at the end
    (which reads the flags) gives torch's buffers."""
    from conftest import no_host_reads
    model, twin, opt, topt = _capturable_twins(kind, seed=45, flat=flat)
    scalers = [torch.amp.GradScaler("cuda", init_scale=1024.0) for _ in range(2)]
    gen = torch.Generator(device="cpu").manual_seed(46)
    for k in range(8):
        x = torch.randn(8, 32, generator=gen).cuda()
        for m, o, s in ((model, opt, scalers[0]), (twin, topt, scalers[1])):
            o.zero_grad()
            s.scale(m(x).square().mean() * (float("inf") if k in (0, 1, 4) else 1.0)).backward()
            if o is opt:
                with no_host_reads():
                    s.step(o)
            else:
                s.step(o)
            s.update()
        torch.cuda.synchronize()
        for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
            assert torch.equal(p.view(torch.int32), q.view(torch.int32)), f"step {k + 1} p{i}"
            assert torch.equal(p.grad.view(torch.int32), q.grad.view(torch.int32)), \
                f"step {k + 1} grad {i}"
        assert [(e["backend"], e["path"]) for e in opt.last_step] == [
            ("cuda", "flat" if flat else "per-tensor")], opt.last_step
    _same_state(opt, topt, "end")


@pytest.mark.parametrize("kind", ["sgd", "momentum"])
def test_capturable_partial_first_steps_on_the_device(kind):
    """The same with the last layer frozen until step 5 (overflowed) and unfrozen then: the
    first steps of only some parameters of the bucket (steps 1 and 5) go to a per-tensor list
    call with a flag of its own, and read nothing on the host; once the flags are back, the
    bucket is stepped whole again. Bits and state as above."""
    from conftest import no_host_reads
    model, twin, opt, topt = _capturable_twins(kind, seed=47)
    scalers = [torch.amp.GradScaler("cuda", init_scale=1024.0) for _ in range(2)]
    gen = torch.Generator(device="cpu").manual_seed(48)
    for k in range(9):
        for m in (model, twin):
            m[2].requires_grad_(k >= 4)
        x = torch.randn(8, 32, generator=gen).cuda()
        for m, o, s in ((model, opt, scalers[0]), (twin, topt, scalers[1])):
            o.zero_grad()
            s.scale(m(x).square().mean() * (float("inf") if k in (0, 4) else 1.0)).backward()
            with no_host_reads() if o is opt else contextlib.nullcontext():
                s.step(o)
            s.update()
        torch.cuda.synchronize()
        for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
            assert torch.equal(p.view(torch.int32), q.view(torch.int32)), f"step {k + 1} p{i}"
            assert (p.grad is None) == (q.grad is None), f"step {k + 1} grad {i}"
            if p.grad is not None:
                assert torch.equal(p.grad.view(torch.int32), q.grad.view(torch.int32)), \
                    f"step {k + 1} grad {i}"
    assert [(e["backend"], e["path"]) for e in opt.last_step] == [("cuda", "flat")], \
        opt.last_step
    _same_state(opt, topt, "end")


def test_compiled_capturable_step_on_gpu():
    """capturable=True on CUDA, the step compiled with fullgraph=True (aot_eager: no code
    generation, to keep the GPU check short) from step 1: the traced step makes each call's
    flag on the device (optim._LooseFirst) and neither reads it back nor records an event
    while traced; overflows on steps 1, 2 and 5. Bits of eager GradScaler + torch's for-loop
    every step; state_dict() at the end (reading the flags) gives torch's buffers."""
    torch._dynamo.reset()
    model, twin, opt, topt = _capturable_twins("sgd", seed=49, flat=True)
    compiled = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    scalers = [torch.amp.GradScaler("cuda", init_scale=1024.0) for _ in range(2)]
    gen = torch.Generator(device="cpu").manual_seed(50)
    try:
        for k in range(8):
            x = torch.randn(8, 32, generator=gen).cuda()
            for m, o, s in ((model, opt, scalers[0]), (twin, topt, scalers[1])):
                o.zero_grad()
                s.scale(m(x).square().mean() * (float("inf") if k in (0, 1, 4) else 1.0)
                        ).backward()
                if o is opt:
                    opt.step = compiled  # (on the instance: GradScaler.step calls it)
                try:
                    s.step(o)
                finally:
                    vars(o).pop("step", None)
                s.update()
            torch.cuda.synchronize()
            for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
                assert torch.equal(p.view(torch.int32), q.view(torch.int32)), \
                    f"step {k + 1} p{i}"
            assert opt._unsure, "no flag left to the device"
        _same_state(opt, topt, "end")
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("flat,eager_first", [(True, False), (False, True)],
                         ids=["flat-compiled-from-step-1", "pertensor-eager-first"])
def test_compiled_training_step_reduce_overhead(flat, eager_first):
    """A training step (zero_grad, forward, backward, step) compiled by inductor with
    mode="reduce-overhead" (CUDA graphs through cudagraph trees), capturable=True, the lr a
    device tensor that a scheduler changes every step. Inductor's backward need not give
    eager's gradient bits, so torch.optim.SGD(foreach=False) steps its twin eagerly with the
    gradients the compiled step used: parameters and momentum buffers must be its bits at every
    step. The buffers that a graph makes (compiled from step 1) live where cudagraph trees put
    them: a later replay must not overwrite them. The scheduler's lr causes no recompilation
    after step 3. Which graphs cudagraph trees skipped is reported as a warning (not failed:
    whether torch graphs a step that mutates its inputs is torch's choice)."""
    if not momentum_cuda.available_backends()["cuda"][0]:
        pytest.skip(momentum_cuda.available_backends()["cuda"][1])
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(51)
    model = torch.nn.Sequential(torch.nn.Linear(32, 97), torch.nn.Tanh(),
                                torch.nn.Linear(97, 5)).cuda()
    twin = copy.deepcopy(model)
    h = dict(momentum=0.9, dampening=0.1, weight_decay=1e-2)
    lr, tlr = (torch.tensor(0.05, device="cuda") for _ in range(2))
    opt = momentum_cuda.SGD(model.parameters(), lr=lr, backend="cuda", flat=flat,
                            capturable=True, **h)
    topt = torch.optim.SGD(twin.parameters(), lr=tlr, foreach=False, **h)
    decay = lambda k: 0.97 ** k  # noqa: E731
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in (opt, topt)]

    def train(x):
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        opt.step()

    compiled = torch.compile(train, mode="reduce-overhead")
    gen = torch.Generator(device="cpu").manual_seed(52)
    graphs = []
    try:
        for k in range(10):
            x = torch.randn(8, 32, generator=gen).cuda()
            torch.compiler.cudagraph_mark_step_begin()
            (train if eager_first and k == 0 else compiled)(x)
            for p, q in zip(model.parameters(), twin.parameters()):
                q.grad = p.grad.clone()
            topt.step()
            for s in scheds:
                s.step()
            torch.cuda.synchronize()
            for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
                assert torch.equal(p.view(torch.int32), q.view(torch.int32)), \
                    f"step {k + 1}: parameter {i} differs"
                b, tb = opt.state[p].get("momentum_buffer"), topt.state[q]["momentum_buffer"]
                assert b is not None and torch.equal(b.view(torch.int32),
                                                     tb.view(torch.int32)), \
                    f"step {k + 1}: momentum buffer {i} differs"
            graphs.append(counters["stats"]["unique_graphs"])
        assert graphs[-1] == graphs[2], f"graphs compiled by step: {graphs}"
        skips = dict(counters["inductor"])
        warnings.warn(f"reduce-overhead ({'flat' if flat else 'per-tensor'}, "
                      f"{'eager first' if eager_first else 'compiled from step 1'}): "
                      f"graphs by step {graphs}; inductor counters {skips}")
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("kind", ["sgd", "momentum"])
def test_cuda_graph_captures_the_first_step(kind, flat):
    """capturable=True: one eager warm-up iteration that GradScaler skips (no buffer in torch's
    state), then an iteration captured in a CUDA graph before any step was taken and replayed
    12 times, the loss multiplied by a device tensor set to inf for replays 1 and 4: the first
    replay that is not skipped is the first step (the bucket's flag, read by the kernel),
    every later one a momentum step. Bits of the same iterations run eagerly with torch's
    optimizer and GradScaler; state_dict() after the replays gives torch's buffers."""
    model, twin, opt, topt = _capturable_twins(kind, seed=47, flat=flat)
    scaler, tscaler = (torch.amp.GradScaler("cuda", init_scale=1024.0) for _ in range(2))
    static_x = torch.zeros(8, 32, device="cuda")
    mul = torch.ones((), device="cuda")
    gen = torch.Generator(device="cpu").manual_seed(48)
    xs = [torch.randn(8, 32, generator=gen).cuda() for _ in range(13)]
    overflow = (0, 1, 4)

    def iteration():
        opt.zero_grad(set_to_none=False)
        scaler.scale(model(static_x).square().mean() * mul).backward()
        scaler.step(opt)
        scaler.update()

    def twin_iteration(k):
        topt.zero_grad(set_to_none=False)
        tscaler.scale(twin(xs[k]).square().mean() * mul).backward()
        tscaler.step(topt)
        tscaler.update()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: skipped; the flat layout and buffers exist
        static_x.copy_(xs[0])
        mul.fill_(float("inf"))
        iteration()
        twin_iteration(0)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert not topt.state or not any(topt.state.values())
    _same_state(opt, topt, "after the skipped warm-up")  # (reads the flag: buffers hidden)
    assert not any("momentum_buffer" in st for st in opt.state.values())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        iteration()
    for k in range(1, 13):
        static_x.copy_(xs[k])
        mul.fill_(float("inf") if k in overflow else 1.0)
        graph.replay()
        twin_iteration(k)
        torch.cuda.synchronize()
        for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
            assert torch.equal(p.view(torch.int32), q.view(torch.int32)), \
                f"replay {k}: parameter {i} differs"
        assert scaler.get_scale() == tscaler.get_scale()
    _same_state(opt, topt, "after the replays")


# plain SGD, momentum with weight decay, nesterov, dampening, every flag but nesterov
MASTER_HYPER = [dict(momentum=0.0), dict(momentum=0.9, weight_decay=1e-2),
                dict(momentum=0.9, nesterov=True), dict(momentum=0.9, dampening=0.3),
                dict(momentum=0.9, dampening=0.3, weight_decay=1e-2, maximize=True)]


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("hyper", MASTER_HYPER,
                         ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_bitwise_vs_fp32_torch(backend, hyper, flat):
    """master_weights=True on the GPU: after every step each bf16 parameter's fp32 master is
    torch.optim.SGD(foreach=False)'s fp32 parameter stepped with the gradients widened (same
    GPU), the parameter is that master rounded to nearest even, the buffers are torch's; an
    fp32 parameter of the same group stays on the flat (or per-tensor) path."""
    g = torch.Generator().manual_seed(11)
    shapes = [(0,), (1,), (3,), (97,), (2**20 + 3,), (97, 33), (64, 3, 3, 3)]
    masters = [(torch.randn(s, generator=g) * 4).cuda() for s in shapes]
    ours = [torch.nn.Parameter(m.to(torch.bfloat16)) for m in masters]
    twin = [torch.nn.Parameter(m.to(torch.bfloat16).float()) for m in masters]
    extra, extra_twin = (torch.nn.Parameter(torch.randn(129, generator=g).cuda())
                         for _ in range(2))
    extra_twin.data.copy_(extra)
    opt = momentum_cuda.SGD(ours + [extra], lr=0.0123, backend=backend, flat=flat,
                            master_weights=True, **hyper)
    topt = torch.optim.SGD(twin + [extra_twin], lr=0.0123, foreach=False, **hyper)
    for step in range(STEPS):
        for p, t in zip(ours + [extra], twin + [extra_twin]):
            gr = torch.randn(p.shape, generator=g).to(p.dtype).cuda()
            if p.grad is not None:
                p.grad.copy_(gr)
            else:  # the flat parameter's gradient becomes its flat view, as in _run
                (p * gr).sum().backward()
            t.grad = gr.float()
        opt.step()
        topt.step()
        paths = sorted((e["backend"], e["path"]) for e in opt.last_step)
        assert paths == sorted([(backend, "master"), (backend, "flat" if flat else "per-tensor")])
        for i, (p, t) in enumerate(zip(ours, twin)):
            assert torch.equal(opt.master_weight(p).view(torch.int32), t.view(torch.int32)), \
                f"step {step + 1}: master {i} differs"
            assert torch.equal(p.view(torch.int16), t.to(torch.bfloat16).view(torch.int16))
            if "momentum_buffer" in topt.state[t]:
                assert torch.equal(opt.state[p]["momentum_buffer"].view(torch.int32),
                                   topt.state[t]["momentum_buffer"].view(torch.int32))
        assert torch.equal(extra, extra_twin)


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_opcheck_on_gpu(backend):
    """opcheck on the master-weights op of each GPU backend with CUDA tensors."""
    prefix = "triton_" if backend == "triton" else ""
    op = getattr(torch.ops.momentum_cuda, f"{prefix}sgd_step_master_list_").default
    g = torch.Generator().manual_seed(8)
    ns = (0, 1, 3, 97, 1030)
    ps = [torch.randn(n, generator=g).to(torch.bfloat16).cuda() for n in ns]
    gs = [torch.randn(n, generator=g).to(torch.bfloat16).cuda() for n in ns]
    bs = [torch.randn(n, generator=g).cuda() for n in ns]
    rs = [torch.randint(-2**15, 2**15, (n,), generator=g, dtype=torch.int16).cuda() for n in ns]
    ts = [torch.randint(0, 256, ((n + 7) // 8,), generator=g, dtype=torch.uint8).cuda()
          for n in ns]
    result = torch.library.opcheck(op, (ps, gs, bs, rs, ts, 0.0123, 0.9, 0.1, 0.01, False, True,
                                        False))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("flat", [True, False])
@pytest.mark.parametrize("hyper", MASTER_HYPER,
                         ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_bitwise_vs_reference(backend, hyper, flat):
    """stochastic_rounding=True on the GPU: every step's bf16 parameters and buffers are
    momentum_cuda.reference.sgd_sr_reference_step's on copies (same GPU, keys
    sr_key(sr_seed, step, position)); an fp32 parameter of the same group is torch's."""
    from momentum_cuda.reference import sgd_sr_reference_step, sr_key
    g = torch.Generator().manual_seed(12)
    shapes = [(0,), (1,), (3,), (97,), (2**20 + 3,), (97, 33), (64, 3, 3, 3)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g).to(torch.bfloat16).cuda())
            for s in shapes]
    ref = [p.detach().clone() for p in ours]
    extra, extra_twin = (torch.nn.Parameter(torch.randn(129, generator=g).cuda())
                         for _ in range(2))
    extra_twin.data.copy_(extra)
    opt = momentum_cuda.SGD(ours + [extra], lr=0.0123, backend=backend, flat=flat,
                            stochastic_rounding=True, sr_seed=2**32 - 5, **hyper)
    topt = torch.optim.SGD([extra_twin], lr=0.0123, foreach=False, **hyper)
    h = dict(dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False), **hyper)
    bufs = [None] * len(ours)
    for step in range(1, STEPS + 1):
        grads = [torch.randn(p.shape, generator=g).to(p.dtype).cuda() for p in ours + [extra]]
        for p, gr in zip(ours + [extra], grads):
            if p.grad is not None:
                p.grad.copy_(gr)
            else:
                (p * gr).sum().backward()
        extra_twin.grad = grads[-1].clone()
        opt.step()
        topt.step()
        keys = [sr_key(2**32 - 5, step, i) for i in range(len(ours))]
        bufs = sgd_sr_reference_step(ref, grads[:-1], bufs, keys, lr=0.0123, **h)
        paths = sorted((e["backend"], e["path"]) for e in opt.last_step)
        assert paths == sorted([(backend, "stochastic-rounding"),
                                (backend, "flat" if flat else "per-tensor")])
        for i, (p, r) in enumerate(zip(ours, ref)):
            assert torch.equal(p.view(torch.int16), r.view(torch.int16)), \
                f"step {step}: param {i} differs"
            if h["momentum"]:
                assert torch.equal(opt.state[p]["momentum_buffer"].view(torch.int16),
                                   bufs[i].view(torch.int16))
        assert torch.equal(extra, extra_twin)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sr_opcheck_on_gpu(backend):
    """opcheck on the stochastic-rounding op of each GPU backend with CUDA tensors."""
    prefix = "triton_" if backend == "triton" else ""
    op = getattr(torch.ops.momentum_cuda, f"{prefix}sgd_step_sr_list_").default
    g = torch.Generator().manual_seed(9)
    ns = (0, 1, 3, 97, 1030)
    ps, gs, bs = ([torch.randn(n, generator=g).to(torch.bfloat16).cuda() for n in ns]
                  for _ in range(3))
    result = torch.library.opcheck(op, (ps, gs, bs, [1, 2, 3, 4, 2**32 - 1], 0.0123, 0.9, 0.1,
                                        0.01, False, True, False))
    assert set(result.values()) == {"SUCCESS"}, result
    result = torch.library.opcheck(op, (ps, gs, bs, [1, 2, 3, 4, 2**32 - 1], 0.0123, 0.9, 0.1,
                                        0.01, False, True, False),
                                   dict(offsets=[5, 2**32 - 1, 2**32 - 2, 2**40, 2**32 - 500]))
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("backend", BACKENDS)
def test_sr_shard_offsets_on_gpu(backend):
    """The stochastic-rounding op with shard offsets (FSDP2's local shards) whose indices
    cross 2^32 inside a tensor, inside a chunk and not at a group of 8: the reference's bits
    on copies, two steps (the first creating the buffers, which start at zero as the
    optimizer's: tests/test_triton_jit.py replays this without running a kernel)."""
    from momentum_cuda.reference import sgd_sr_reference_step
    op = getattr(torch.ops.momentum_cuda,
                 f"{'triton_' if backend == 'triton' else ''}sgd_step_sr_list_").default
    g = torch.Generator().manual_seed(19)
    ns = (0, 1, 3, 97, 1030, 70001, 2**20 + 3)
    offsets = [7, 2**32 - 1, 2**32 - 2, 2**40 + 3, 2**32 - 500, 2**32 - 33333, 2**33 - 2**19 - 5]
    ps = [torch.randn(n, generator=g).to(torch.bfloat16).cuda() for n in ns]
    bs = [torch.zeros_like(p) for p in ps]
    ref, rbufs = [p.clone() for p in ps], [None] * len(ns)
    for step in range(2):
        gs = [torch.randn(n, generator=g).to(torch.bfloat16).cuda() for n in ns]
        keys = [(0x9E3779B9 * (step + 1) + i) % 2**32 for i in range(len(ns))]
        op(ps, gs, bs, keys, 0.0123, 0.9, 0.1, 0.01, False, True, step == 0, offsets=offsets)
        rbufs = sgd_sr_reference_step(ref, gs, rbufs, keys, lr=0.0123, momentum=0.9,
                                      dampening=0.1, weight_decay=0.01, maximize=True,
                                      offsets=offsets)
        for i in range(len(ns)):
            assert torch.equal(ps[i].view(torch.int16), ref[i].view(torch.int16)), (step, i)
            assert torch.equal(bs[i].view(torch.int16), rbufs[i].view(torch.int16)), (step, i)


# momentum_dtype (csrc/include/momentum_cuda/momentum_dtype.h): its op per backend (qmom_op)
QMOM_SHAPES = [(0,), (1,), (3,), (7,), (255,), (256,), (257,), (1000,), (2**16 + 3,),
               (2**20 + 3,), (97, 33), (64, 3, 3, 3)]
QMOM_CASES = [pytest.param(kind, h, id=f"{kind}-" + "-".join(f"{k}={v}" for k, v in h.items()))
              for kind in ("bf16", "int8") for h in MASTER_HYPER
              if not (kind == "int8" and h["momentum"] == 0)]  # int8 buffers need momentum


def _qmom_buffers(kind, shapes, g):
    """Garbage a first step must not read: random buffer bits, scales with NaN and inf."""
    if kind == "bf16":
        bufs = [torch.randint(-2**15, 2**15, s, generator=g, dtype=torch.int16)
                .view(torch.bfloat16).cuda() for s in shapes]
        return bufs, []
    bufs = [torch.randint(-128, 128, s, generator=g, dtype=torch.int8).cuda() for s in shapes]
    scales = []
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        sc = torch.randn((n + 255) // 256, generator=g)
        sc[::3] = float("nan")
        sc[1::5] = float("inf")
        scales.append(sc.cuda())
    return bufs, scales


@pytest.mark.parametrize("kind,hyper", QMOM_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_dtype_bitwise_vs_reference(backend, kind, hyper):
    """The momentum_dtype op of each GPU backend on CUDA tensors: after every step the fp32
    parameters, the narrow buffers (bf16 bits, or int8 codes) and the int8 scales are
    momentum_cuda.reference.sgd_momentum_dtype_reference_step's on copies (same GPU), bit for
    bit. The first step (first_step=True) finds garbage buffers and NaN / inf scales, which it
    must not read. Some blocks get zero, subnormal, NaN or infinite gradients."""
    from momentum_cuda._ops import qmom_op
    from momentum_cuda.reference import sgd_momentum_dtype_reference_step
    op = qmom_op(backend)
    h = dict(dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False), **hyper)
    mom, int8 = h["momentum"] != 0, kind == "int8"
    g = torch.Generator().manual_seed(14)
    ps = [(torch.randn(s, generator=g) * 4).cuda() for s in QMOM_SHAPES]
    ref = [p.clone() for p in ps]
    bufs, scales = _qmom_buffers(kind, QMOM_SHAPES, g) if mom else ([], [])
    rbufs, rscales = [None] * len(ps), ([None] * len(ps) if int8 else None)
    big = QMOM_SHAPES.index((2**16 + 3,))
    for step in range(1, STEPS + 1):
        grads = [(torch.randn(s, generator=g) * 2.0 ** (step % 5 - 2)).cuda()
                 for s in QMOM_SHAPES]
        gb = grads[big]
        gb[3 * 256:4 * 256] = 0.0                                  # a zero block
        gb[5 * 256:6 * 256] *= 1e-40                               # a subnormal block
        if step == 4:
            gb[7 * 256 + 17] = float("nan")                        # a block turns NaN
        if step == 6:
            gb[9 * 256 + 255] = float("-inf")
        op(ps, grads, bufs, scales, 0.0123, h["momentum"], h["dampening"], h["weight_decay"],
           h["nesterov"], h["maximize"], mom and step == 1)
        rbufs, rscales = sgd_momentum_dtype_reference_step(
            ref, grads, rbufs, rscales, lr=0.0123, **h)
        for i, (p, r) in enumerate(zip(ps, ref)):
            # a NaN parameter's sign and payload are not the contract's (torch's maximize
            # negates a NaN gradient; the GPU's arithmetic returns its canonical NaN)
            nan = p.isnan()
            assert torch.equal(nan, r.isnan()) and torch.equal(
                p.view(torch.int32)[~nan], r.view(torch.int32)[~nan]), \
                f"step {step}: param {i} {tuple(p.shape)} differs"
        if not mom:
            continue
        bits = torch.int8 if int8 else torch.int16
        for i, (b, r) in enumerate(zip(bufs, rbufs)):
            assert torch.equal(b.view(bits), r.view(bits)), f"step {step}: buffer {i} differs"
        for i, (s, r) in enumerate(zip(scales, rscales or [])):
            assert torch.equal(s.view(torch.int32), r.view(torch.int32)), \
                f"step {step}: scales {i} differ"


@pytest.mark.parametrize("kind", ["bf16", "int8"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_qmom_opcheck_on_gpu(backend, kind):
    """opcheck on the momentum_dtype op of each GPU backend with CUDA tensors, both buffer
    kinds."""
    from momentum_cuda._ops import qmom_op
    g = torch.Generator().manual_seed(10)
    ns = (0, 1, 3, 97, 1030)
    ps, gs = ([torch.randn(n, generator=g).cuda() for n in ns] for _ in range(2))
    if kind == "bf16":
        bs = [torch.randn(n, generator=g).to(torch.bfloat16).cuda() for n in ns]
        ss = []
    else:
        bs = [torch.randint(-127, 128, (n,), generator=g, dtype=torch.int8).cuda() for n in ns]
        ss = [torch.rand((n + 255) // 256, generator=g).cuda() for n in ns]
    result = torch.library.opcheck(qmom_op(backend), (ps, gs, bs, ss, 0.0123, 0.9, 0.1, 0.01,
                                                      False, True, False))
    assert set(result.values()) == {"SUCCESS"}, result


# fp16 master weights (csrc/include/momentum_cuda/fp16_master.h): its op per backend
# (fp16_master_op). Arrays given a storage offset (the vector path off for that array alone):
# shape index -> (param, master, grad, buffer) element offsets.
FP16M_SHAPES = [(0,), (1,), (3,), (7,), (8,), (9,), (97,), (1000,), (2**16 + 3,),
                (2**20 + 3,), (97, 33), (64, 3, 3, 3)]
FP16M_OFFSETS = {5: (0, 0, 3, 0), 7: (1, 0, 0, 0), 8: (0, 0, 0, 2), 10: (0, 1, 0, 0),
                 11: (3, 3, 3, 3)}


def _at_offset(t, off):
    """t's values in a fresh tensor `off` elements into its storage (off=0: a plain copy)."""
    if off == 0:
        return t.clone()
    base = torch.empty(t.numel() + off, dtype=t.dtype, device=t.device)
    v = base[off:].view(t.shape)
    v.copy_(t)
    return v


def _same_bits(a, b, bits):
    """Bit for bit, except that a NaN's sign and payload are not the contract's (torch's
    maximize negates a NaN gradient; the GPU's arithmetic returns its canonical NaN)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a.view(bits)[~nan], b.view(bits)[~nan])


def _on(t, device):
    """t on `device`: .cuda() for "cuda" (tests/test_triton_jit.py's replay stands in for it
    with CPU tensors), .to(device) otherwise."""
    return t.cuda() if device == "cuda" else t.to(device)


def _fp16_master_run(op, device, hyper, steps, shapes=FP16M_SHAPES, offsets=FP16M_OFFSETS,
                     seed=15):
    """`steps` steps of the fp16 master op on `device` against
    momentum_cuda.reference.sgd_fp16_master_reference_step on copies (same device): after each
    step the fp16 parameters, fp32 masters and buffers agree bit for bit (NaNs as NaNs). The
    first step (first_step=True where there is momentum) finds garbage buffers. The
    2^16 + 3-element tensor has masters around fp16's largest value 65504 (the parameter inf
    from 65520 on while the master is finite) and one far beyond it, masters and gradients in
    fp16's subnormal range, a zero block, a NaN and an infinite gradient; the fp16 parameter
    goes inf while its master is finite somewhere (returned: how many elements did, in all)."""
    from momentum_cuda.reference import sgd_fp16_master_reference_step
    h = dict(dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                  maximize=False), **hyper)
    mom = h["momentum"] != 0
    g = torch.Generator().manual_seed(seed)
    offs = [offsets.get(i, (0, 0, 0, 0)) for i in range(len(shapes))]
    masters = [torch.randn(s, generator=g) * 4 for s in shapes]
    big = shapes.index((2**16 + 3,)) if (2**16 + 3,) in shapes else None
    if big is not None:
        mb = masters[big]
        mb[:512] = 65504.0 + torch.linspace(-600.0, 600.0, 512)
        mb[256:512] *= -1
        mb[512:1024] = torch.randn(512, generator=g) * 1e-6    # fp16 subnormal range
        mb[1024:1280] = 0.0
        mb[1300] = 1e30
    ms = [_at_offset(_on(m, device), o[1]) for m, o in zip(masters, offs)]
    ps = [_at_offset(_on(m.to(torch.float16), device), o[0]) for m, o in zip(masters, offs)]
    rms = [_on(m, device) for m in masters]
    rps = [_on(m.to(torch.float16), device) for m in masters]
    bufs = ([_at_offset(_on(torch.randint(-2**31, 2**31 - 1, s, generator=g,
                                          dtype=torch.int32).view(torch.float32), device), o[3])
             for s, o in zip(shapes, offs)] if mom else [])
    rbufs = [None] * len(shapes)
    inf_with_finite_master = 0
    for step in range(1, steps + 1):
        grads = [torch.randn(s, generator=g) * 2.0 ** (step % 5 - 2) for s in shapes]
        if big is not None:
            gb = grads[big]
            gb[:512] = torch.randn(512, generator=g) * 1e4     # lr * g crosses 65520
            gb[512:1024] = torch.randn(512, generator=g) * 1e-6
            gb[1024:1280] = 0.0
            if step == 4:
                gb[2000] = float("nan")
            if step == 6:
                gb[3000] = float("-inf")
        grads = [_on(gr.to(torch.float16), device) for gr in grads]
        ours_g = [_at_offset(gr, o[2]) for gr, o in zip(grads, offs)]
        op(ps, ours_g, bufs, ms, 0.0123, h["momentum"], h["dampening"], h["weight_decay"],
           h["nesterov"], h["maximize"], mom and step == 1)
        rbufs = sgd_fp16_master_reference_step(rps, grads, rbufs, rms, lr=0.0123, **h)
        for i in range(len(shapes)):
            assert _same_bits(ps[i], rps[i], torch.int16), \
                f"step {step}: param {i} {shapes[i]} differs"
            assert _same_bits(ms[i], rms[i], torch.int32), \
                f"step {step}: master {i} {shapes[i]} differs"
            if mom:
                assert _same_bits(bufs[i], rbufs[i], torch.int32), \
                    f"step {step}: buffer {i} {shapes[i]} differs"
            inf_with_finite_master += int((ps[i].isinf() & ms[i].isfinite()).sum())
    return inf_with_finite_master


@pytest.mark.parametrize("hyper", MASTER_HYPER,
                         ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_master_bitwise_vs_reference(backend, hyper):
    """The fp16 master-weights op of each GPU backend on CUDA tensors, bit for bit against
    momentum_cuda.reference.sgd_fp16_master_reference_step over STEPS steps (_fp16_master_run:
    first step, fp16 range edges, misaligned arrays)."""
    from momentum_cuda._ops import fp16_master_op
    assert _fp16_master_run(fp16_master_op(backend), "cuda", hyper, STEPS) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_master_many_tensors(backend):
    """700 small tensors (several launches of the CUDA kernel's batches), three steps."""
    from momentum_cuda._ops import fp16_master_op
    shapes = [((k * 37) % 300,) for k in range(700)]
    _fp16_master_run(fp16_master_op(backend), "cuda", dict(momentum=0.9, weight_decay=1e-2), 3,
                     shapes=shapes, offsets={k: (k % 2, k % 3, k % 5, k % 7) for k in range(700)})


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_master_opcheck_on_gpu(backend):
    """opcheck on the fp16 master-weights op of each GPU backend with CUDA tensors."""
    from momentum_cuda._ops import fp16_master_op
    g = torch.Generator().manual_seed(11)
    ns = (0, 1, 3, 97, 1030)
    ps, gs = ([torch.randn(n, generator=g).to(torch.float16).cuda() for n in ns]
              for _ in range(2))
    bs, ms = ([torch.randn(n, generator=g).cuda() for n in ns] for _ in range(2))
    result = torch.library.opcheck(fp16_master_op(backend), (ps, gs, bs, ms, 0.0123, 0.9, 0.1,
                                                             0.01, False, True, False))
    assert set(result.values()) == {"SUCCESS"}, result


# GradScaler's found_inf in the modes' ops (master, fp16 master, momentum_dtype bf16 and int8):
# the kernels skip on the device (tests/test_mode_amp.py has the CPU ops, test_cuda_host.py the
# CUDA kernels on the host, test_triton_amp.py the Triton ones under the interpreter)
MODE_AMP = ("master", "fp16-master", "bf16-momentum", "int8-momentum")


def _mode_gpu_op(backend, mode):
    from momentum_cuda._ops import fp16_master_op, master_op, qmom_op, sr_op
    return {"master": master_op, "fp16-master": fp16_master_op,
            "sr": sr_op}.get(mode, qmom_op)(backend)


@pytest.mark.parametrize("mode", MODE_AMP)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_ops_found_inf_on_gpu(backend, mode):
    """Each GPU backend's mode op on CUDA tensors given found_inf: 0 steps with the bits of the
    call without it, 1 or NaN leaves every tensor's bits (three steps, the first a first step);
    opcheck with found_inf."""
    from test_mode_amp import HYPER, _bits, _clone, _tensors
    op = _mode_gpu_op(backend, mode)
    plain = [[t.cuda() for t in ts] for ts in _tensors(mode, 3)]
    given = _clone(plain)
    for step in range(3):
        fresh = [g.cuda() for g in _tensors(mode, 10 + step)[1]]
        for lists in (plain, given):
            for g, n in zip(lists[1], fresh):
                g.copy_(n)
        op(*plain, *HYPER, step == 0)
        op(*given, *HYPER, step == 0, found_inf=torch.zeros(()).cuda())
        for value in (1.0, float("nan")):
            before = _clone(given)
            op(*given, *HYPER, False, found_inf=torch.tensor(value).cuda())
            for k, (a_ts, b_ts) in enumerate(zip(given, before)):
                for i, (a, b) in enumerate(zip(a_ts, b_ts)):
                    assert torch.equal(_bits(a), _bits(b)), \
                        f"{mode} step {step}: found_inf={value} wrote argument {k}[{i}]"
        for k, (a_ts, b_ts) in enumerate(zip(given, plain)):
            for i, (a, b) in enumerate(zip(a_ts, b_ts)):
                assert torch.equal(_bits(a), _bits(b)), \
                    f"{mode} step {step}: found_inf=0 differs in argument {k}[{i}]"
    result = torch.library.opcheck(op, (*[[t.cuda() for t in ts] for ts in _tensors(mode, 5)],
                                        *HYPER, False),
                                   {"found_inf": torch.ones(()).cuda()})
    assert set(result.values()) == {"SUCCESS"}, result


@pytest.mark.parametrize("mode", MODE_AMP)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_replays_under_gradscaler_on_gpu(backend, mode):
    """momentum_cuda.SGD in a mode under GradScaler("cuda") on CUDA tensors: from the third step
    on no host read (the kept calls replay: torch's unscale, found_inf to the kernels), overflows
    on steps 4 and 5; bits of the same optimizer planning every step (found_inf read on the
    host): parameters, gradients, every state tensor (test_mode_amp.replay_under_gradscaler)."""
    from test_mode_amp import replay_under_gradscaler
    replay_under_gradscaler(mode, backend, move=lambda t: t.cuda(), scaler_device="cuda")


# Hyper-parameters held in tensors in the modes' ops (tests/test_mode_hyper.py has the CPU ops,
# test_cuda_host.py the CUDA kernels on the host, test_triton_amp.py the Triton ones under the
# interpreter)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_ops_hyper_tensors_on_gpu(backend):
    """Each GPU backend's mode ops (master, fp16 master, bf16 and int8 momentum, stochastic
    rounding) given lr, momentum, dampening and weight_decay as CUDA tensors (fp32 and fp64,
    a zero momentum and weight_decay among them): the bits of the same op given their values
    as floats, three steps each (test_mode_hyper.op_mismatches)."""
    from test_mode_hyper import op_mismatches
    bad = op_mismatches(lambda mode: _mode_gpu_op(backend, mode), move=lambda t: t.cuda(),
                        ref_of=lambda mode: _mode_gpu_op(backend, mode))
    assert not bad, bad[:10]


@pytest.mark.parametrize("mode", MODE_AMP)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mode_tensor_hyper_under_gradscaler_on_gpu(backend, mode):
    """momentum_cuda.SGD in a mode under GradScaler("cuda") with lr, momentum, dampening and
    weight_decay in CUDA tensors changed in place every step: the bits of the same optimizer
    given their values as floats, no host read after the step that made the state
    (test_mode_amp.replay_under_gradscaler, tensors=True)."""
    from test_mode_amp import replay_under_gradscaler
    replay_under_gradscaler(mode, backend, move=lambda t: t.cuda(), scaler_device="cuda",
                            tensors=True)


@pytest.mark.parametrize("mode", MODE_AMP)
def test_cuda_graph_mode_step_with_tensor_hyper_parameters(mode):
    """A mode's step (the CUDA backend) with lr, momentum, dampening and weight_decay in CUDA
    tensors, captured in a CUDA graph after two eager steps and replayed 6 times with new
    values filled in place (a zero momentum among them) and new gradients in the static .grad
    tensors: the bits of the same optimizer stepped eagerly with the values as floats
    (parameters, every state tensor). The kernels read the tensors on the device, so nothing in
    the step syncs."""
    if not momentum_cuda.available_backends()["cuda"][0]:
        pytest.skip(momentum_cuda.available_backends()["cuda"][1])
    from test_mode_amp import HYPER_DTYPES, MODE_CONFIGS, _bits, scheduled_hyper
    dtype, kw = MODE_CONFIGS[mode]
    gen = torch.Generator().manual_seed(71)
    values = [torch.randn(s, generator=gen).to(dtype).cuda() for s in ((97,), (5, 61), (300,))]
    grads = [[torch.randn(v.shape, generator=gen).to(dtype).cuda() for v in values]
             for _ in range(8)]
    ps, qs = [v.clone() for v in values], [v.clone() for v in values]
    h0 = scheduled_hyper(0)
    opt = momentum_cuda.SGD(ps, backend="cuda", **kw,
                            **{n: torch.tensor(v, dtype=HYPER_DTYPES[n], device="cuda")
                               for n, v in h0.items()})
    topt = momentum_cuda.SGD(qs, backend="cuda", **kw, **h0)
    for p in ps:
        p.grad = torch.empty_like(p)  # the static gradients the graph reads

    def ours(k):
        for p, g in zip(ps, grads[k]):
            p.grad.copy_(g)
        for n, v in scheduled_hyper(k).items():
            opt.param_groups[0][n].fill_(v)

    def twin(k):
        for q, g in zip(qs, grads[k]):
            q.grad = g.clone()
        topt.param_groups[0].update({n: float(torch.tensor(v, dtype=HYPER_DTYPES[n]))
                                     for n, v in scheduled_hyper(k).items()})
        topt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: the state exists before the capture
        for k in range(2):
            ours(k)
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    twin(0)
    for k in range(1, 8):
        if k >= 2:
            ours(k)
            graph.replay()
        twin(k)
        torch.cuda.synchronize()
        for i, (p, q) in enumerate(zip(ps, qs)):
            assert torch.equal(_bits(p), _bits(q)), f"{mode} step {k + 1}: parameter {i}"
            for key, a in opt.state[p].items():
                if isinstance(a, torch.Tensor):
                    assert torch.equal(_bits(a), _bits(topt.state[q][key])), \
                        f"{mode} step {k + 1}: {key} {i}"


def test_cuda_graph_refuses_stochastic_rounding():
    """A step with stochastic_rounding=True captured in a CUDA graph raises before anything is
    written: a replay would reuse one step's random keys (tests/test_mode_hyper.py has the same
    on the CPU, the capture simulated)."""
    if not momentum_cuda.available_backends()["cuda"][0]:
        pytest.skip(momentum_cuda.available_backends()["cuda"][1])
    gen = torch.Generator().manual_seed(73)
    ps = [torch.randn(97, generator=gen).bfloat16().cuda()]
    opt = momentum_cuda.SGD(ps, lr=torch.tensor(0.05, device="cuda"), momentum=0.9,
                            backend="cuda", stochastic_rounding=True)
    ps[0].grad = torch.randn(97, generator=gen).bfloat16().cuda()
    opt.step()
    torch.cuda.synchronize()
    before = ps[0].clone()
    with pytest.raises(RuntimeError, match="stochastic_rounding=True cannot be captured"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    torch.cuda.synchronize()
    assert torch.equal(ps[0].view(torch.int16), before.view(torch.int16))

