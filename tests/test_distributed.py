"""momentum_cuda in real multi-process training on CPU (gloo): FSDP2, DTensor, DDP, ZeRO.

tests/dist_harness.py starts the ranks (2, then 3 for uneven shards and a checkpoint saved by 2
ranks and loaded by 3); tests/dist_scenarios.py holds the scenarios, each comparing
momentum_cuda bit for bit with torch's optimizer doing the same thing in the same
distributed setting, on every rank (its docstring says what is compared). One launch runs every
scenario of its world size in sequence (process start and `import torch` cost seconds on 2
cores); a module-scoped fixture launches once and each test below checks one scenario's result
on every rank. A rank that hangs is killed at the launch's deadline and every scenario it had
not finished fails with the rank, the scenario it was in and the tail of its stderr (its
Python stacks); a collective that hangs raises in the rank after gloo's timeout.

Measured on this project's machine (2 cores, torch 2.13 CPU): the 2-rank launch (57 scenarios)
25-31 s, the 3-rank one (8) 18-24 s, the whole file 55-65 s.

Environment: MOMENTUM_CUDA_DIST_TIMEOUT (seconds, default 240) bounds each launch.
"""
from __future__ import annotations

import os
import signal
import textwrap
import time

import pytest

import dist_scenarios
from dist_harness import run_ranks


def _unavailable() -> str | None:
    if os.name != "posix" or not hasattr(signal, "SIGUSR1"):
        return "the harness needs POSIX sessions and signals (os.killpg, SIGUSR1)"
    try:
        import torch.distributed as dist
    except Exception as e:  # noqa: BLE001 - any import failure means: cannot run here
        return f"torch.distributed cannot be imported: {type(e).__name__}: {e}"
    if not dist.is_available():
        return "torch.distributed is not available in this build of torch"
    if not dist.is_gloo_available():
        return "torch.distributed has no gloo backend in this build of torch"
    return None


UNAVAILABLE = _unavailable()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")

TIMEOUT_S = float(os.environ.get("MOMENTUM_CUDA_DIST_TIMEOUT", "240"))


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory):
    """Checkpoints: written by the 2-rank launch, read by the 3-rank one."""
    return tmp_path_factory.mktemp("dist-shared")


@pytest.fixture(scope="module")
def launch2(tmp_path_factory, shared_dir):
    return run_ranks(2, dist_scenarios.LAUNCHES[2], TIMEOUT_S,
                     work_dir=tmp_path_factory.mktemp("dist-launch2"), shared_dir=shared_dir)


@pytest.fixture(scope="module")
def launch3(tmp_path_factory, shared_dir, launch2):
    # after launch2: its fsdp2-ckpt-xworld-save scenario wrote what this launch loads
    return run_ranks(3, dist_scenarios.LAUNCHES[3], TIMEOUT_S,
                     work_dir=tmp_path_factory.mktemp("dist-launch3"), shared_dir=shared_dir)


def _check(launch, name, record_property):
    info = launch.info(name)
    record_property("info", info)  # opt.last_step paths and the like, in the junit XML
    reason = launch.skip_reason(name)
    if reason:
        pytest.skip(reason)
    problems = launch.problems(name)
    if problems:
        paths = {rank: (i or {}).get("paths") for rank, i in info.items()}
        pytest.fail(f"{name} on {launch.world_size} ranks:\n" + "\n".join(problems)
                    + f"\n(opt.last_step paths by rank: {paths})", pytrace=False)
    print(f"{name}: {info}")  # shown with -rP


@pytest.mark.parametrize("name", dist_scenarios.LAUNCHES[2])
def test_two_ranks(launch2, name, record_property):
    _check(launch2, name, record_property)


@pytest.mark.parametrize("name", dist_scenarios.LAUNCHES[3])
def test_three_ranks(launch3, name, record_property):
    _check(launch3, name, record_property)


# ---- the harness itself, with a stand-in for the rank script (no torch: starts in ms) --------
STAND_IN = textwrap.dedent('''
    import faulthandler, json, os, signal, sys, time
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    args = sys.argv[1:]
    results = args[args.index("--results") + 1]
    names = [a for a in args if a.startswith("selftest/")]
    rank = int(os.environ["RANK"])
    assert os.environ["WORLD_SIZE"] == "2" and os.environ["OMP_NUM_THREADS"] == "1"
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0
    out = {"current": None, "results": {}}

    def write():
        with open(results + ".tmp", "w") as f:
            json.dump(out, f)
        os.replace(results + ".tmp", results)

    def sleep_forever():  # a rank stuck (in a collective, say)
        while True:
            time.sleep(0.05)

    for name in names:
        out["current"] = name
        write()
        if name == "selftest/hang" or (name == "selftest/crash" and rank == 0):
            sleep_forever()
        if name == "selftest/crash":
            print("about to crash", file=sys.stderr, flush=True)
            os._exit(3)
        status = "mismatch" if name == "selftest/mismatch" and rank == 1 else "ok"
        out["results"][name] = {"status": status, "detail": "param 0 differs", "info": {}}
    out["current"] = None
    write()
''')


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def stand_in(tmp_path):
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return script


def test_harness_reports_results_per_rank(stand_in, tmp_path):
    launch = run_ranks(2, ["selftest/ok", "selftest/mismatch"], 30, work_dir=tmp_path / "w",
                       script=stand_in)
    assert launch.failure is None and launch.returncodes == {0: 0, 1: 0}
    assert launch.problems("selftest/ok") == []
    assert launch.problems("selftest/mismatch") == ["rank 1: mismatch: param 0 differs"]


def test_harness_kills_a_hung_launch(stand_in, tmp_path):
    """A rank that never finishes is killed at the deadline; the scenario it was in (and every
    later one) fails naming the rank, the scenario and its stack; finished ones keep their
    results."""
    t0 = time.monotonic()
    launch = run_ranks(2, ["selftest/ok", "selftest/hang", "selftest/later"], 3,
                       work_dir=tmp_path / "w", script=stand_in)
    assert time.monotonic() - t0 < 15
    assert launch.problems("selftest/ok") == []
    assert "timeout" in launch.failure and "rank 1 was in scenario 'selftest/hang'" in (
        launch.failure)
    assert "sleep_forever" in launch.failure  # faulthandler's stack, in the stderr tail
    for name in ("selftest/hang", "selftest/later"):
        problems = launch.problems(name)
        assert len(problems) == 3 and all("no result" in p for p in problems[:2]), problems
        assert problems[2].startswith("the launch: timeout"), problems
    assert all(_gone(pid) for pid in launch.pids)


def test_harness_stops_after_a_crash(stand_in, tmp_path):
    """A rank that dies gets the others (waiting for it) killed after the grace period."""
    t0 = time.monotonic()
    launch = run_ranks(2, ["selftest/crash"], 60, work_dir=tmp_path / "w", script=stand_in,
                       crash_grace_s=0.5)
    assert time.monotonic() - t0 < 15
    assert launch.returncodes[1] == 3
    assert "rank 1 exited with status 3 in scenario 'selftest/crash'" in launch.failure
    assert "about to crash" in launch.failure
    assert len(launch.problems("selftest/crash")) == 3
    assert all(_gone(pid) for pid in launch.pids)
