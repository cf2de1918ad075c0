"""What this install and this machine are: `momentum-cuda info` prints it, and the benchmark can
store it next to its numbers (a timing means little without the CPU, the ISA and the GPU behind it).

collect() returns a plain, JSON-serialisable dict. Its keys are stable; new keys may be added,
existing ones are not renamed or removed:

    momentum_cuda   str    package version
    python          str    interpreter version, e.g. "3.11.9"
    platform        str    platform.platform()
    torch           dict   version (str), cuda (str | None: the CUDA torch was built with),
                           cpu_capability (str | None: torch.backends.cpu.get_cpu_capability()),
                           threads (int: torch.get_num_threads())
    triton          dict   version (str | None), reason (str: "" when usable, else why not)
    backends        dict   name -> {built (bool), reason (str)}, from available_backends()
    cpu             dict   model (str | None), logical_cpus (int | None),
                           flags ({flag: bool} for CPU_FLAGS; {} where /proc/cpuinfo is absent),
                           kernel_isa (str | None: the ISA momentum_cuda's C++ kernel runs)
    gpus            list   one dict per visible GPU: index (int), name (str),
                           capability (str, "major.minor"), memory_gib (float); [] if none
"""
from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

import momentum_cuda
from momentum_cuda._backends import _C, available_backends

# The x86 flags that decide which vector code can run (the C++ kernel's AVX2 path needs avx2 and
# fma; bf16/fp16 conversions use f16c / avx512_bf16 where present).
CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16")
CPUINFO = "/proc/cpuinfo"


def _cpuinfo(path: str = CPUINFO) -> tuple[str | None, dict[str, bool]]:
    """(model name, {flag: present}) from the first processor in /proc/cpuinfo; (None, {}) where
    the file does not exist (not Linux), so info still works there."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None, {}
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
    return model, ({f: f in flags for f in CPU_FLAGS} if flags is not None else {})


def _triton(status: tuple[bool, str]) -> dict:
    """Triton's version from the package metadata (the import may fail where the package is
    there) and, from the backend's (built, reason) status, why it cannot be used if it cannot."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return {"version": None, "reason": "not installed"}
    built, reason = status
    return {"version": version, "reason": "" if built else reason}


def _gpus() -> list[dict]:
    """Every GPU torch can see; [] on a CPU-only build or machine."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1)})
    return out


def collect() -> dict:
    """Everything `momentum-cuda info` reports, as a JSON-serialisable dict (keys: module doc)."""
    model, flags = _cpuinfo()
    backends = available_backends()
    return {
        "momentum_cuda": momentum_cuda.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  "threads": torch.get_num_threads()},
        "triton": _triton(backends["triton"]),
        "backends": {name: {"built": built, "reason": reason}
                     for name, (built, reason) in backends.items()},
        "cpu": {"model": model, "logical_cpus": os.cpu_count(), "flags": flags,
                "kernel_isa": _C.cpu_isa() if _C is not None and hasattr(_C, "cpu_isa") else None},
        "gpus": _gpus(),
    }


def format_text(info: dict) -> str:
    """The human-readable form of collect()'s dict, one fact per line."""
    t, tr, cpu = info["torch"], info["triton"], info["cpu"]
    lines = [
        f"momentum_cuda {info['momentum_cuda']} (python {info['python']}, {info['platform']})",
        f"torch         {t['version']} ("
        + (f"CUDA {t['cuda']}" if t["cuda"] else "CPU-only build, no CUDA") + ")",
        f"triton        {tr['version'] or 'not installed'}"
        + (f" (unusable: {tr['reason']})" if tr["version"] and tr["reason"] else ""),
        "backends:",
    ]
    for name, b in info["backends"].items():
        lines.append(f"  {name:<8}{'built' if b['built'] else 'not built':<11}{b['reason']}")
    flags = (" ".join(f"{f}={'yes' if v else 'no'}" for f, v in cpu["flags"].items())
             or f"unknown ({CPUINFO} not readable)")
    lines += [
        f"CPU           {cpu['model'] or 'unknown model'}, {cpu['logical_cpus']} logical CPUs",
        f"  flags       {flags}",
        f"  torch CPU capability      {t['cpu_capability']}",
        f"  momentum_cuda kernel ISA  {cpu['kernel_isa'] or 'unknown (_C has no cpu_isa)'}",
        f"  torch threads             {t['threads']}",
    ]
    if not info["gpus"]:
        lines.append("GPU           no GPU visible")
    for g in info["gpus"]:
        lines.append(f"GPU {g['index']}         {g['name']}, compute capability "
                     f"{g['capability']}, {g['memory_gib']} GiB")
    return "\n".join(lines)
