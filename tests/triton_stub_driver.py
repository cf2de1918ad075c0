"""A stand-in Triton driver: Triton's JIT without a GPU (used by tests/test_triton_jit.py).

With it active, a launch `kernel[grid](...)` on CPU tensors runs Triton's own binder,
specialization, in-memory and on-disk kernel caches and compiler (TTIR, PTX, and a cubin from the
triton wheel's ptxas) for the target given (default sm_90); only loading the binary and launching
it do nothing. The JIT takes a tensor's data_ptr() and dtype, so a CPU tensor stands in for a
CUDA one; no kernel runs, so no tensor changes.

    with stub_driver([kernel]):
        compiled = kernel[(1,)](x, y, n, BLOCK=1024)   # a triton CompiledKernel
        compiled.asm["ptx"]

stub_driver restores the previous driver and each kernel's in-memory cache on exit: kernels
compiled under the stand-in (whose launcher does nothing) never serve a later real launch in
the same process, and kernels compiled before are found again after.
"""
from __future__ import annotations

import contextlib
import importlib
from collections import defaultdict

from triton.backends.compiler import GPUTarget

# triton.runtime.driver is shadowed by the DriverConfig instance of that name in
# triton.runtime's namespace; the module holds it as .driver.
_DRIVER_CONFIG = importlib.import_module("triton.runtime.driver").driver


class _Utils:
    """The driver.utils calls Triton makes around a launch."""

    @staticmethod
    def get_device_properties(device):
        # H200 (sm_90) values: Triton checks a kernel's shared memory against max_shared_mem.
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 3201000,
                "mem_bus_width": 6144}

    @staticmethod
    def load_binary(name, kernel, shared, device):
        # (module, function, n_regs, n_spills, n_max_threads). module None: CompiledKernel's
        # __del__ then has nothing to unload through whichever driver is active by then.
        return None, None, 0, 0, 1024

    @staticmethod
    def unload_module(module):
        pass


class _Launcher:
    """launcher_cls(src, metadata): the launch itself, here nothing."""

    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        return None


class StubDriver:
    """Answers the driver calls of Triton's JIT path (triton/runtime/jit.py,
    triton/compiler/compiler.py) for one virtual device 0."""

    utils = _Utils()
    launcher_cls = _Launcher

    def __init__(self, arch: int = 90):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    @staticmethod
    def is_active():
        return False


@contextlib.contextmanager
def stub_driver(kernels, arch: int = 90):
    """StubDriver(arch) active, and each JITFunction in `kernels` with an empty in-memory cache
    (so every specialization compiles, or loads from TRITON_CACHE_DIR); both restored on exit."""
    if not hasattr(_DRIVER_CONFIG, "_active"):
        raise RuntimeError("triton.runtime.driver.DriverConfig has no _active: this triton's "
                           "driver selection changed; tests/triton_stub_driver.py needs updating")
    # Saved as is (None when no driver was ever chosen, as on a machine without a GPU, where
    # reset_active() would raise): restoring it leaves Triton exactly as found.
    saved_active = _DRIVER_CONFIG._active
    saved_caches = [k.device_caches for k in kernels]
    for k in kernels:
        k.device_caches = defaultdict(k.create_binder)
    _DRIVER_CONFIG.set_active(StubDriver(arch))
    try:
        yield _DRIVER_CONFIG.active
    finally:
        _DRIVER_CONFIG._active = saved_active
        for k, caches in zip(kernels, saved_caches):
            k.device_caches = caches
