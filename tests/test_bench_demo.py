"""Smoke tests: `make demo` and `make bench` keep working (they are not timed here; speed is
shown by the benchmark itself, never by a test)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_bench_quick_checks_bits_and_runs():
    r = _run(["benchmarks/bench_step.py", "--quick", "--no-json"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "bitwise check: momentum_cuda flat and per-tensor == torch for-loop" in r.stdout
    assert "flat = 1 kernel call" in r.stdout


def test_demo_is_bitwise_equal_every_epoch(tmp_path):
    """`make demo`'s module entry point, default epochs; the bench part has its own tests."""
    r = _run(["-m", "momentum_cuda.demo", "--no-bench", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verdict: BITWISE EQUAL in every epoch" in r.stdout
    assert r.stdout.count("bitwise equal: yes") == 10  # one per epoch, demo.DEFAULT_EPOCHS
    assert "First reached after:" in r.stdout
    assert (tmp_path / "demo-loss.png").stat().st_size > 30_000
