"""The `momentum-cuda` command: argument handling, `info`, `demo` and the hand-over to the
benchmark. Most tests call cli.main in-process (fast); the demo runs in a subprocess because it
seeds torch's global RNG."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import types

import pytest
import torch

import momentum_cuda
from momentum_cuda import cli, demo, info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_PY = os.path.join(ROOT, "momentum_cuda", "bench.py")
INFO_KEYS = {"momentum_cuda", "python", "platform", "torch", "triton", "backends", "cpu", "gpus"}


def _exit_code(capsys, argv) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of cli.main(argv), whether it returns or exits (argparse)."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def fake_bench(monkeypatch):
    """A stand-in momentum_cuda.bench that records its argv and returns the code asked for."""
    fake = types.SimpleNamespace(calls=[], rc=0)
    fake.main = lambda argv: fake.calls.append(list(argv)) or fake.rc
    monkeypatch.setitem(sys.modules, "momentum_cuda.bench", fake)
    monkeypatch.setattr(momentum_cuda, "bench", fake, raising=False)
    return fake


# ---- argument handling ------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["frob"], "invalid choice: 'frob'"),
    (["info", "--bogus"], "unrecognized arguments for 'info': --bogus"),
    (["demo", "--epochs", "0"], "argument --epochs: must be a positive integer (>= 1), got 0"),
    (["demo", "--epochs", "-3"], "argument --epochs: must be a positive integer (>= 1), got -3"),
    (["demo", "--epochs", "two"], "argument --epochs: must be a positive integer, got 'two'"),
    (["demo", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
])
def test_bad_arguments_exit_2_with_usage(capsys, argv, message):
    code, out, err = _exit_code(capsys, argv)
    assert code == 2
    assert err.startswith("usage: momentum-cuda")
    assert message in err
    assert out == ""


def test_bench_forwards_every_argument_in_order_and_its_exit_code(capsys, fake_bench):
    fake_bench.rc = 3
    argv = ["--quick", "--out", "some dir", "--device", "cpu", "-h", "--", "x"]
    code, _, _ = _exit_code(capsys, ["bench", *argv])
    assert code == 3
    assert fake_bench.calls == [argv]


@pytest.mark.skipif(not os.path.exists(BENCH_PY),
                    reason="momentum_cuda/bench.py does not exist yet (written separately)")
def test_bench_help_is_the_benchmarks_own(capsys):
    code, out, _ = _exit_code(capsys, ["bench", "--help"])
    assert code == 0
    assert out.startswith("usage: momentum-cuda bench")
    assert "--quick" in out


def test_info_and_demo_work_when_bench_cannot_import(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "momentum_cuda.bench", None)  # import raises ImportError
    monkeypatch.delattr(momentum_cuda, "bench", raising=False)
    assert _exit_code(capsys, ["info"])[0] == 0
    assert demo.run_bench("unused") is False
    assert "bench FAILED to import" in capsys.readouterr().out


def test_demo_reports_a_failing_bench(capsys, fake_bench, tmp_path):
    fake_bench.rc = 1
    assert demo.run_bench(str(tmp_path)) is False
    assert fake_bench.calls == [["--quick", "--out", str(tmp_path)]]
    assert "bench FAILED: exit code 1" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_demo_device_cuda_without_gpu_names_the_argument(capsys, tmp_path):
    code, _, _ = _exit_code(capsys, ["demo", "--device", "cuda", "--out", str(tmp_path / "o")])
    assert "--device cuda: torch.cuda.is_available() is False" in str(code)
    assert not (tmp_path / "o").exists()  # checked before anything is written


# ---- info -------------------------------------------------------------------------------------
def test_info_text_names_versions_and_every_backend(capsys):
    code, out, _ = _exit_code(capsys, ["info"])
    assert code == 0
    assert f"momentum_cuda {momentum_cuda.__version__}" in out
    assert f"torch         {torch.__version__}" in out
    for name, (built, reason) in momentum_cuda.available_backends().items():
        assert f"  {name:<8}{'built' if built else 'not built':<11}{reason}" in out
    assert "momentum_cuda kernel ISA" in out
    assert ("no GPU visible" in out) == (not torch.cuda.is_available())


def test_info_json_has_the_documented_keys(capsys):
    code, out, _ = _exit_code(capsys, ["info", "--json"])
    assert code == 0
    data = json.loads(out)
    assert set(data) == INFO_KEYS
    assert data["momentum_cuda"] == momentum_cuda.__version__
    assert data["backends"] == {name: {"built": b, "reason": r}
                                for name, (b, r) in momentum_cuda.available_backends().items()}
    assert set(data["torch"]) == {"version", "cuda", "cpu_capability", "threads"}
    assert set(data["triton"]) == {"version", "reason"}
    assert set(data["cpu"]) == {"model", "logical_cpus", "flags", "kernel_isa"}
    assert set(data["cpu"]["flags"]) in (set(), set(info.CPU_FLAGS))
    assert data["cpu"]["kernel_isa"] == momentum_cuda._C.cpu_isa()
    assert len(data["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_cpuinfo_parsing(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
                 "\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    model, flags = info._cpuinfo(str(f))
    assert model == "Test CPU 9000"
    assert flags == {flag: flag in ("sse4_2", "avx", "avx2", "fma") for flag in info.CPU_FLAGS}
    assert info._cpuinfo(str(tmp_path / "missing")) == (None, {})


# ---- demo -------------------------------------------------------------------------------------
def test_convergence_wording_follows_the_numbers():
    assert demo.first_reach([3.0, 2.5, 2.0, 2.2], 2.2) == 3
    assert demo.first_reach([3.0, 2.5], 1.0) is None
    assert demo.compare(74, 445) == (True, "faster: 74 vs 445 steps (6.0x fewer)")
    assert demo.compare(74, 78)[0] is False and demo.compare(74, 78)[1].startswith("about as fast")
    assert demo.compare(100, 50) == (False, "slower: 100 vs 50 steps (2.0x more)")
    assert demo.compare(None, 50) == (False, "not faster: never vs 50 steps")


def test_demo_no_bench_one_epoch_writes_png_and_verdict(tmp_path):
    out = tmp_path / "demo out"
    r = subprocess.run([sys.executable, "-m", "momentum_cuda", "demo", "--no-bench", "--epochs",
                        "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("bitwise equal: yes") == 1
    assert "verdict: BITWISE EQUAL in every epoch" in r.stdout
    assert "target: the train loss plain SGD (lr 0.05) ends with" in r.stdout
    assert "== (d)" not in r.stdout  # --no-bench
    png = (out / demo.PNG_NAME).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 1000 and height >= 500 and len(png) > 30_000, (width, height, len(png))
    assert f"wrote {out / demo.PNG_NAME}" in r.stdout


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "momentum-cuda")
    if not os.path.exists(script):
        pytest.skip(f"{script} not installed: pip install --no-build-isolation -e .")
    r = subprocess.run([script, "info", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert set(json.loads(r.stdout)) == INFO_KEYS
