"""Backends: which kernels exist, which can run where, and the choice made for the user.

A backend is asked for by name ("cpu", "cuda", "triton") or chosen (backend=None: the fastest one
that can run on the parameters' device). An explicit backend that cannot run raises, with the
reason; nothing falls back silently.
"""
from __future__ import annotations

import torch

try:
    from . import _C
    _C_ERROR = None
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    _C = None
    _C_ERROR = f"momentum_cuda._C did not import ({e}); build it with `pip install --no-build-isolation -e .`"

BACKENDS = ("cpu", "cuda", "triton")
# Preference on each device type when backend=None, fastest first.
_PREFERENCE = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


def backend_status(name: str) -> tuple[bool, str]:
    """(built, reason): whether the backend's kernels exist in this install, and why not."""
    if name == "cpu":
        return (_C is not None, "C++ CPU kernel" if _C is not None else _C_ERROR)
    if name == "cuda":
        if _C is None:
            return False, _C_ERROR
        if not getattr(_C, "built_with_cuda", False):
            return False, ("momentum_cuda._C was built without its CUDA kernel (torch is a CPU "
                           "build, nvcc was not found, or MOMENTUM_CUDA_NO_CUDA=1)")
        return True, "CUDA kernel" + ("" if torch.cuda.is_available() else " (no GPU visible)")
    if name == "triton":
        from . import triton_kernels as tk  # imports triton only when asked about it
        if not tk.TRITON_AVAILABLE:
            return False, tk.TRITON_UNAVAILABLE_REASON
        return True, "Triton kernel" + ("" if torch.cuda.is_available() else " (no GPU visible)")
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


def available_backends() -> dict[str, tuple[bool, str]]:
    """Every backend with (built, reason) for this install."""
    return {name: backend_status(name) for name in BACKENDS}


def _runs_on(name: str, device: torch.device) -> tuple[bool, str]:
    built, why = backend_status(name)
    if not built:
        return False, why
    if device.type not in _PREFERENCE or name not in _PREFERENCE[device.type]:
        return False, f"backend {name!r} does not run on {device.type} tensors"
    return True, ""


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """The backend that will run on `device`; raises if `requested` cannot run there."""
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {requested!r}")
        ok, why = _runs_on(requested, device)
        if not ok:
            raise RuntimeError(f"backend={requested!r} cannot run on device {device}: {why}")
        return requested
    reasons = []
    for name in _PREFERENCE.get(device.type, ()):
        ok, why = _runs_on(name, device)
        if ok:
            return name
        reasons.append(f"{name}: {why}")
    raise RuntimeError(f"no momentum_cuda backend can run on device {device}"
                       + (f" ({'; '.join(reasons)})" if reasons else ""))
