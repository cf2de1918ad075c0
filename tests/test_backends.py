"""Backend choice: what exists in this build, what backend=None picks, and that an explicit
backend which cannot run raises at construction with the reason (no silent fallback)."""
from __future__ import annotations

import pytest
import torch

import momentum_cuda
from momentum_cuda import _C
from momentum_cuda._backends import BACKENDS, backend_status, resolve_backend

CLASSES = [momentum_cuda.SGD, momentum_cuda.Momentum]
CLASS_IDS = ["SGD", "Momentum"]


def _params(seed, sizes=(7, (3, 5), 1)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s if isinstance(s, tuple) else (s,), generator=gen))
            for s in sizes]


def _make(cls, params, **kw):
    return cls(params, lr=0.1, momentum=0.9, **kw)


# ---- available_backends() --------------------------------------------------------------------
def test_available_backends_lists_all_with_reasons():
    av = momentum_cuda.available_backends()
    assert list(av) == ["cpu", "cuda", "triton"] == list(BACKENDS)
    for name, entry in av.items():
        assert isinstance(entry, tuple) and len(entry) == 2, name
        built, why = entry
        assert isinstance(built, bool), name
        assert isinstance(why, str) and why.strip(), f"{name}: empty reason"
        assert (built, why) == backend_status(name)


def test_available_backends_this_build():
    av = momentum_cuda.available_backends()
    assert av["cpu"][0] is True  # _C imported
    assert "C++" in av["cpu"][1]
    # cuda is built exactly when _C says so; its reason explains a missing kernel
    assert av["cuda"][0] is bool(getattr(_C, "built_with_cuda", False))
    if not av["cuda"][0]:
        assert "CUDA" in av["cuda"][1] and "without" in av["cuda"][1]
    # triton is built exactly when triton imports; its reason says why not
    from momentum_cuda import triton_kernels as tk
    assert av["triton"][0] is tk.TRITON_AVAILABLE
    assert "Triton" in av["triton"][1] or not tk.TRITON_AVAILABLE


def test_backend_status_unknown_name():
    with pytest.raises(ValueError, match="'nope'"):
        backend_status("nope")


def test_available_backends_returns_fresh_dict():
    a = momentum_cuda.available_backends()
    a["cpu"] = (False, "tampered")
    assert momentum_cuda.available_backends()["cpu"][0] is True


# ---- backend=None picks cpu on CPU parameters -------------------------------------------------
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
def test_default_backend_on_cpu(cls, flat):
    ps = _params(1)
    opt = _make(cls, ps, flat=flat)
    assert opt.backend == "cpu"
    assert opt.last_step == []  # no step yet
    gen = torch.Generator().manual_seed(2)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)  # a new tensor: flat=True goes per-tensor
    opt.step()
    assert opt.last_step, "step() reported no kernel call"
    assert {e["backend"] for e in opt.last_step} == {"cpu"}
    assert {e["device"] for e in opt.last_step} == {"cpu"}
    assert sum(e["tensors"] for e in opt.last_step) == len(ps)
    assert sum(e["numel"] for e in opt.last_step) == sum(p.numel() for p in ps)
    assert opt.backend == "cpu"


@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
def test_last_step_flat_path(cls):
    ps = _params(3)
    opt = _make(cls, ps)
    gen = torch.Generator().manual_seed(4)
    for p in ps:  # backward attaches each flat view and accumulates into it
        (p * torch.randn(p.shape, generator=gen)).sum().backward()
    opt.step()
    assert opt.last_step == [dict(backend="cpu", path="flat", device="cpu", dtype=torch.float32,
                                  tensors=len(ps), numel=sum(p.numel() for p in ps))]


def test_last_step_per_dtype_and_reset():
    gen = torch.Generator().manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(9, generator=gen).to(dt))
          for dt in (torch.float32, torch.bfloat16, torch.float64)]
    opt = momentum_cuda.SGD(ps, lr=0.1, momentum=0.9)
    for p in ps:
        p.grad = torch.randn(9, generator=gen).to(p.dtype)
    opt.step()
    assert sorted(str(e["dtype"]) for e in opt.last_step) == sorted(
        str(p.dtype) for p in ps)
    assert {e["backend"] for e in opt.last_step} == {"cpu"}
    for p in ps:
        p.grad = None
    opt.step()
    assert opt.last_step == []  # reports only the last step


def test_explicit_cpu_backend():
    ps = _params(6)
    opt = momentum_cuda.SGD(ps, lr=0.1, backend="cpu")
    assert opt.backend == "cpu"


def test_backend_none_before_any_param():
    opt = momentum_cuda.SGD([{"params": []}], lr=0.1)
    assert opt.backend is None


# ---- explicit backends that cannot run: RuntimeError at construction, with the reason ---------
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_unavailable_backend_raises_at_construction(name, cls, flat):
    ps = _params(7)
    before = [p.detach().clone() for p in ps]
    built, why = momentum_cuda.available_backends()[name]
    with pytest.raises(RuntimeError) as e:
        _make(cls, ps, backend=name, flat=flat)
    msg = str(e.value)
    assert f"backend={name!r}" in msg and "cpu" in msg
    # not built: the build's reason; built (a later version): it does not run on cpu tensors
    assert (why if not built else "does not run on cpu") in msg, msg
    for p, b in zip(ps, before):  # nothing was moved into a flat buffer
        assert torch.equal(p, b)
        assert p.grad is None


@pytest.mark.parametrize("name", ["cuda", "triton"])
def test_unavailable_backend_raises_even_for_frozen_params(name):
    """The check covers every parameter, not just those a step would touch."""
    ps = _params(8)
    for p in ps:
        p.requires_grad_(False)
    with pytest.raises(RuntimeError, match=name):
        momentum_cuda.SGD(ps, lr=0.1, backend=name)


def test_unavailable_backend_in_added_group():
    opt = momentum_cuda.SGD(_params(9), lr=0.1, backend="cpu")
    with pytest.raises(RuntimeError, match="meta"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.empty(4, device="meta"))]})


# ---- cpu on a device that is not the CPU (meta stands in for a GPU) ---------------------------
@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
@pytest.mark.parametrize("flat", [True, False], ids=["flat", "pertensor"])
def test_cpu_backend_on_meta_raises(cls, flat):
    ps = [torch.nn.Parameter(torch.empty(5, device="meta"))]
    with pytest.raises(RuntimeError) as e:
        _make(cls, ps, backend="cpu", flat=flat)
    assert "backend='cpu'" in str(e.value) and "meta" in str(e.value)


@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
def test_default_backend_on_meta_builds(cls):
    """Deferred initialisation: with no backend asked for, an optimizer over meta parameters
    is built, as torch's is (its steps run torch's meta ops: tests/test_relayout.py)."""
    ps = [torch.nn.Parameter(torch.empty(5, device="meta"))]
    assert _make(cls, ps).backend is None


def test_requested_backend_raises_for_parameters_moved_to_meta():
    p = torch.nn.Parameter(torch.randn(5))
    opt = momentum_cuda.SGD([p], lr=0.1, backend="cpu")
    torch.utils.swap_tensors(p, torch.nn.Parameter(torch.empty(5, device="meta")))
    p.grad = torch.empty(5, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        opt.step()


def test_mixed_devices_raise():
    """A backend asked for must run on every parameter's device."""
    gen = torch.Generator().manual_seed(10)
    ps = [torch.nn.Parameter(torch.randn(5, generator=gen)),
          torch.nn.Parameter(torch.empty(5, device="meta"))]
    with pytest.raises(RuntimeError, match="meta"):
        momentum_cuda.SGD(ps, lr=0.1, backend="cpu")


def test_resolve_backend_direct():
    cpu = torch.device("cpu")
    assert resolve_backend(None, cpu) == "cpu"
    assert resolve_backend("cpu", cpu) == "cpu"
    with pytest.raises(ValueError, match="'x'"):
        resolve_backend("x", cpu)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run on device cpu"):
        resolve_backend("triton", cpu)
    # a cuda device (no GPU needed to name one): the cpu backend refuses it
    with pytest.raises(RuntimeError, match="does not run on cuda"):
        resolve_backend("cpu", torch.device("cuda", 0))
    av = momentum_cuda.available_backends()
    if av["cuda"][0] or av["triton"][0]:
        # backend=None on a GPU: the CUDA kernel if built, else Triton
        assert resolve_backend(None, torch.device("cuda", 0)) == (
            "cuda" if av["cuda"][0] else "triton")
    else:
        # backend=None on a GPU with neither GPU backend built: raises, giving each reason
        with pytest.raises(RuntimeError) as e:
            resolve_backend(None, torch.device("cuda", 0))
        msg = str(e.value)
        assert "no momentum_cuda backend can run on device cuda" in msg
        for name in ("cuda", "triton"):
            assert f"{name}: {momentum_cuda.available_backends()[name][1]}" in msg
