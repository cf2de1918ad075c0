"""csrc/build_flags.json is the one home of the compiler flags and the CUDA arch list. Each
consumer's effective command line must carry its flags (in the file's order), so a consumer that
stops reading the file, or adds a flag of its own to the shared part, fails here:
  * setup.py: the extension's extra_compile_args (a CPU and a CUDA build) and the default
    TORCH_CUDA_ARCH_LIST, from running setup.py with setuptools.setup() captured;
  * tools/cuda_check.py: its nvcc command line (tests/test_cuda_build.py also checks the command
    nvcc really ran);
  * tests/test_cuda_host.py: its g++ command line;
  * CMake: tools/cmake_test.py checks the configured compile_commands.json (`make cmake-test`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLAGS = json.loads((ROOT / "csrc" / "build_flags.json").read_text())

# Runs setup.py as pip would, with setup() replaced by a recorder; "cuda" makes this CPU torch
# claim to be a CUDA build so that setup.py takes its CUDA branch (nothing is compiled).
CAPTURE = r"""
import json, os, runpy, sys
import setuptools, torch
captured = {}
setuptools.setup = lambda **kw: captured.update(kw)
if sys.argv[1] == "cuda":
    torch.version.cuda = "13.0"
runpy.run_path("setup.py", run_name="__main__")
ext = captured["ext_modules"][0]
print("CAPTURED " + json.dumps({"args": ext.extra_compile_args,
                                "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST")}))
"""


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _has_run(cmd: list[str], flags: list[str]) -> bool:
    """True if `flags` occur in `cmd` as one contiguous run, in order."""
    n = len(flags)
    return any(cmd[i:i + n] == flags for i in range(len(cmd) - n + 1))


def _setup_py(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH_CUDA_ARCH_LIST", "MOMENTUM_CUDA_NO_CUDA")}
    r = subprocess.run([sys.executable, "-c", CAPTURE, mode], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("CAPTURED ")]
    assert r.returncode == 0 and lines, f"setup.py ({mode}) failed:\n{r.stdout}\n{r.stderr[-3000:]}"
    return dict(json.loads(lines[-1][len("CAPTURED "):]), out=r.stdout)


def test_flags_file_explains_every_flag():
    assert FLAGS["cxx"] and FLAGS["nvcc"] and FLAGS["cuda_archs"]
    for flag in FLAGS["cxx"] + FLAGS["nvcc"]:
        assert flag in FLAGS["why"], f"{flag}: no reason in build_flags.json's \"why\""
    for arch in FLAGS["cuda_archs"]:
        major, _, minor = arch.partition(".")
        assert major.isdigit() and minor.isdigit(), f"{arch!r}: not TORCH_CUDA_ARCH_LIST's X.Y"
    for flags in (FLAGS["cxx"], FLAGS["nvcc"]):  # CMake takes the language standard from it
        assert sum(f.startswith("-std=c++") for f in flags) == 1, flags


def test_setup_py_cpu_build():
    got = _setup_py("cpu")
    assert "building the CPU kernel only" in got["out"], got["out"]
    assert _has_run(got["args"]["cxx"], FLAGS["cxx"]), got["args"]


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                    reason="no nvcc: setup.py would not take its CUDA branch")
def test_setup_py_cuda_build():
    got = _setup_py("cuda")
    assert "building the CPU and CUDA kernels" in got["out"], got["out"]
    assert _has_run(got["args"]["cxx"], FLAGS["cxx"]), got["args"]
    assert _has_run(got["args"]["nvcc"], FLAGS["nvcc"]), got["args"]
    assert got["arch_list"] == ";".join(FLAGS["cuda_archs"])


def test_cuda_check_nvcc_command():
    cc = _load("cuda_check_flags", ROOT / "tools" / "cuda_check.py")
    assert cc.ARCHS == tuple(a.replace(".", "") for a in FLAGS["cuda_archs"])
    for gate in (True, False):
        cmd = cc.nvcc_command("nvcc", "k.cu", "k.fatbin", gate=gate)
        assert _has_run(cmd, FLAGS["nvcc"]), cmd
        for a in cc.ARCHS:
            assert f"arch=compute_{a},code=sm_{a}" in cmd, cmd


def test_host_emulation_command():
    host = _load("test_cuda_host_flags", ROOT / "tests" / "test_cuda_host.py")
    cmd = host.compile_command(Path("out"), [])
    assert _has_run(cmd, FLAGS["cxx"]), cmd
    # Its one documented difference: -O1 after the shared -O3 (the last -O wins).
    opt = [f for f in cmd if f.startswith("-O")]
    assert opt[-1] == "-O1", cmd
