"""Smoke tests: `make demo` and `make bench` keep working (they are not timed here; speed is
shown by the benchmark itself, never by a test)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_bench_entry_points_run_and_check_bits(tmp_path):
    """`make bench`'s command and the old script path both reach momentum_cuda.bench.main (its
    behaviour is tested in tests/test_bench.py); a tiny case, files written."""
    tiny = ["--quick", "--params", "3000", "--layouts", "few-large", "--dtypes", "float32",
            "--rounds", "2"]
    for entry in (["-m", "momentum_cuda", "bench"], ["benchmarks/bench_step.py"]):
        out = tmp_path / entry[-1].replace("/", "_")
        r = _run([*entry, *tiny, "--out", str(out)])
        assert r.returncode == 0, r.stdout + r.stderr
        assert "momentum_cuda flat (cpu)" in r.stdout and "== for-loop" in r.stdout
        assert sorted(p.suffix for p in out.iterdir()) == [".csv", ".json", ".png"]


def test_demo_is_bitwise_equal_every_epoch(tmp_path):
    """`make demo`'s module entry point, default epochs; the bench part has its own tests."""
    r = _run(["-m", "momentum_cuda.demo", "--no-bench", "--out", str(tmp_path)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "verdict: BITWISE EQUAL in every epoch" in r.stdout
    assert r.stdout.count("bitwise equal: yes") == 10  # one per epoch, demo.DEFAULT_EPOCHS
    assert "First reached after:" in r.stdout
    # (e): fp32, bf16 round to nearest, stochastic rounding and master weights, each with its
    # final loss
    assert "== (e) bf16 parameters" in r.stdout
    assert r.stdout.count("final train loss") == 4
    assert (tmp_path / "demo-loss.png").stat().st_size > 30_000
