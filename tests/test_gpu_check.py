"""tools/gpu_check.py's plumbing, with stand-in stages (the real stages run in `make
gpu-check-dry`, part of `make test`): stage timeouts kill whole process groups and keep the
output so far, the deadline skips what no longer fits, a failed required stage stops the run,
the summary is rewritten after every stage (a run killed mid-stage leaves it), the file plan is
enforced, and the sanitizer's output is judged right."""
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gc = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gc  # dataclasses look their module up there
_spec.loader.exec_module(gc)


def _py(code: str) -> list:
    return [sys.executable, "-c", code]


def _stage(name, budget, body, required=False):
    return gc.Stage(name, budget, budget, body, required=required)


def _ok(ctx):
    r = ctx.run(_py("print('hello from a stage')"))
    return (gc.PASS if r.rc == 0 else gc.FAIL), "said hello"


def _fail(ctx):
    ctx.run(_py("import sys; print('broken'); sys.exit(3)"))
    return gc.FAIL, "exit 3"


def _hang(ctx):
    # A grandchild in the same process group must die with its parent.
    ctx.run(_py("import subprocess, sys, time; print('partial output', flush=True); "
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                "time.sleep(60)"))
    return gc.PASS, "should not pass"


def _run(monkeypatch, tmp_path, stages, *args):
    monkeypatch.setattr(gc, "STAGES", tuple(stages))
    rc = gc.main(["--out", str(tmp_path), *args])
    return rc, (tmp_path / "summary.txt").read_text(), (tmp_path / "check.log").read_text()


def test_all_pass(monkeypatch, tmp_path, capsys):
    rc, summary, log = _run(monkeypatch, tmp_path, [_stage("a", 10, _ok), _stage("b", 10, _ok)])
    assert rc == 0
    assert "[PASS   ] a" in summary and "[PASS   ] b" in summary
    assert summary.rstrip().endswith("RESULT: PASS")
    assert log.splitlines().count("hello from a stage") == 2
    assert "RESULT: PASS" in capsys.readouterr().out  # printed last


def test_timeout_kills_the_group_and_keeps_the_output(monkeypatch, tmp_path):
    t0 = time.monotonic()
    rc, summary, log = _run(monkeypatch, tmp_path,
                            [_stage("slow", 2, _hang), _stage("after", 10, _ok)])
    assert time.monotonic() - t0 < 30
    assert rc == 1
    assert "[TIMEOUT] slow" in summary and "[PASS   ] after" in summary
    assert "partial output" in log and "killed at the stage's timeout" in log
    out = subprocess.run(["pgrep", "-f", "time.sleep(60)"], capture_output=True, text=True)
    assert out.stdout.strip() == "", "a process of the killed stage survived"


def test_timeout_kills_descendants_in_their_own_session(monkeypatch, tmp_path):
    """torchrun starts each worker in a session of its own, out of reach of a signal to its
    group: the kill at the timeout must reach them too."""
    marker = tmp_path / "worker.pid"

    def launcher(ctx):
        ctx.run(_py("import subprocess, sys, time; "
                    "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(61)'], "
                    "start_new_session=True); "
                    f"open({str(marker)!r}, 'w').write(str(w.pid)); "
                    "print('launched', flush=True); time.sleep(60)"))
        return gc.PASS, "should not pass"
    rc, summary, log = _run(monkeypatch, tmp_path / "out", [_stage("launch", 3, launcher)])
    assert rc == 1 and "[TIMEOUT] launch" in summary and "launched" in log
    pid = int(marker.read_text())
    for _ in range(50):  # SIGKILLed; gone once its parent (init by now) has reaped it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break  # killed, not yet reaped
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("a descendant in its own session survived the stage's timeout")


def test_deadline_skips_what_no_longer_fits(monkeypatch, tmp_path):
    def slow_ok(ctx):
        time.sleep(3)
        return gc.PASS, "slept"
    rc, summary, _ = _run(monkeypatch, tmp_path,
                          [_stage("first", 100, slow_ok), _stage("second", 100, _ok)],
                          "--deadline-s", str(gc.RESERVE_S + gc.MIN_STAGE_S + 2))
    assert "[PASS   ] first" in summary
    assert "[SKIP   ] second" in summary and "before the deadline" in summary
    assert rc == 0  # a stage the deadline left out is not a failure


def test_required_failure_stops_the_run(monkeypatch, tmp_path):
    rc, summary, log = _run(monkeypatch, tmp_path, [
        _stage("must", 10, _fail, required=True), _stage("next", 10, _ok)])
    assert rc == 1
    assert "[FAIL   ] must" in summary and "not run: must failed" in summary
    assert "broken" in log and "hello" not in log
    assert "RESULT: FAIL (must)" in summary


def test_a_raising_stage_is_a_failure_with_its_traceback(monkeypatch, tmp_path):
    def boom(ctx):
        raise KeyError("gpu_name")
    rc, summary, log = _run(monkeypatch, tmp_path, [_stage("boom", 10, boom), _stage("b", 10, _ok)])
    assert rc == 1 and "[FAIL   ] boom" in summary and "KeyError" in summary
    assert "Traceback" in log and "[PASS   ] b" in summary


def test_unexpected_files_fail_the_file_plan(monkeypatch, tmp_path):
    def litter(ctx):
        for i in range(3):
            (ctx.out / f"extra-{i}.txt").write_text("x")
        return gc.PASS, "wrote 3 files outside the plan"
    rc, summary, _ = _run(monkeypatch, tmp_path, [_stage("litter", 10, litter)])
    assert rc == 1 and "[FAIL   ] files" in summary and "unexpected file extra-0.txt" in summary


def test_file_plan_fits_what_a_rented_machine_returns():
    assert len(gc.FILES) <= gc.MAX_FILES == 8
    assert all(n.replace("-", "").replace(".", "").replace("_", "").isalnum() for n in gc.FILES)


def test_killed_run_leaves_the_summary_of_finished_stages(tmp_path):
    """SIGKILL (what a command limit does) during stage 2: stage 1's verdict and stage 2's
    output so far are on disk."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("gc_", {str(ROOT / 'tools' / 'gpu_check.py')!r})
        gc = importlib.util.module_from_spec(spec); sys.modules["gc_"] = gc
        spec.loader.exec_module(gc)
        def ok(ctx):
            return gc.PASS, "first done"
        def long(ctx):
            ctx.run([sys.executable, "-c", "import time; print('stage two running', flush=True); time.sleep(60)"])
            return gc.PASS, "never"
        gc.STAGES = (gc.Stage("one", 10, 10, ok), gc.Stage("two", 100, 100, long))
        sys.exit(gc.main(["--out", {str(tmp_path / 'out')!r}]))
    """))
    p = subprocess.Popen([sys.executable, str(script)], start_new_session=True)
    log = tmp_path / "out" / "check.log"
    for _ in range(200):
        if log.exists() and "stage two running" in log.read_text():
            break
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert "[PASS   ] one" in (tmp_path / "out" / "summary.txt").read_text()
    assert "stage two running" in log.read_text()


SAN_CLEAN = """========= COMPUTE-SANITIZER
gpu_smoke: every kernel path ran
========= ERROR SUMMARY: 0 errors
"""
SAN_API_ONLY = """========= COMPUTE-SANITIZER
========= Program hit cudaErrorPeerAccessUnsupported (error 217) due to "peer access is not supported between these two devices" on CUDA API call to cudaDeviceCanAccessPeer.
=========     Saved host backtrace up to driver entry point at error
gpu_smoke: every kernel path ran
========= ERROR SUMMARY: 1 error
"""
SAN_MEMORY = """========= COMPUTE-SANITIZER
========= Invalid __global__ read of size 4 bytes
=========     at momentum_cuda::cuda::sgd_flat_kernel<float>(...)+0x1a0
=========     Address 0x7f0000001000 is out of bounds
========= Program hit cudaErrorPeerAccessUnsupported (error 217) on CUDA API call to cudaDeviceCanAccessPeer.
gpu_smoke: every kernel path ran
========= ERROR SUMMARY: 2 errors
"""


@pytest.mark.parametrize("out, rc, verdict", [
    (SAN_CLEAN, 0, gc.PASS), (SAN_API_ONLY, 0, gc.PASS), (SAN_MEMORY, 0, gc.FAIL),
    (SAN_CLEAN.replace("gpu_smoke: every kernel path ran\n", ""), 1, gc.FAIL),
    ("Python crashed before the sanitizer summary", 1, gc.FAIL)])
def test_sanitizer_verdict(out, rc, verdict):
    assert gc.sanitizer_verdict(out, rc)[0] == verdict


def test_stage_plan():
    names = [s.name for s in gc.STAGES]
    assert names == ["preflight", "build", "probe", "tests-cuda", "tests-triton", "distributed",
                     "bench-headline", "memcheck", "bench-rest"]
    assert [s.name for s in gc.STAGES if s.required] == ["preflight", "build"]
    fixed = [s.budget for s in gc.STAGES if s.budget is not None]
    assert sum(fixed) <= gc.DEADLINE_S <= 540  # 9 minutes, under the 10-minute command limit
    assert sum(s.dry_budget for s in gc.STAGES if s.dry_budget is not None) <= gc.DRY_DEADLINE_S
    assert gc.STAGES[-1].budget is None  # the rest of the benchmark gets what is left


def test_summary_stays_short(tmp_path):
    ctx = gc.Ctx(tmp_path, True, gc.Log(tmp_path / "check.log"))
    results = [dict(stage=f"s{i}", verdict=gc.PASS, seconds=1, budget=1, detail="x" * 300)
               for i in range(40)]
    text = gc.write_summary(tmp_path, ["header"], results, ctx)
    assert len(text) <= gc.SUMMARY_MAX and "cut" in text


EXAMPLE_PASS = """momentum_cuda 0.1.0, torch 2.11.0+cu130: 1 processes, nccl on cuda; ...
== fsdp2: fully_shard on each Linear and on the model: the optimizers get DTensor parameters
     momentum_cuda.SGD:                             bitwise equal on all 1 processes
VERDICT fsdp2: BITWISE EQUAL to torch.optim.SGD(foreach=False) on every process, before and after
== ddp: DistributedDataParallel: every process holds the whole model
VERDICT ddp: BITWISE EQUAL to torch.optim.SGD(foreach=False) on every process, before and after
RESULT: PASS (fsdp2 bitwise equal, ddp bitwise equal; 1 processes, nccl)
"""
EXAMPLE_MISMATCH = """== fsdp2: fully_shard on each Linear and on the model: the optimizers get DTensor parameters
     momentum_cuda.SGD:                             MISMATCH on 1 of 2 processes
       rank 1: 0.weight momentum buffer: 3 of 4096 elements differ, max |diff| 1.4e-09
VERDICT fsdp2: MISMATCH (above)
VERDICT ddp: BITWISE EQUAL to torch.optim.SGD(foreach=False) on every process, before and after
RESULT: FAIL (fsdp2 MISMATCH, ddp bitwise equal; 2 processes, gloo)
"""


@pytest.mark.parametrize("out, rc, ok, words", [
    (EXAMPLE_PASS, 0, True, "nccl x1: fsdp2, ddp bitwise equal"),
    (EXAMPLE_MISMATCH, 1, False, "MISMATCH in fsdp2: rank 1: 0.weight momentum buffer: 3 of"),
    (EXAMPLE_PASS, 1, False, "exit 1"),  # a verdict printed, then a crash: not a pass
    (EXAMPLE_PASS.replace("RESULT: PASS", "RESULT: ?"), 0, False, "exit 0"),
    ("Traceback ...\nRuntimeError: NCCL error", 1, False, "RuntimeError: NCCL error"),
    ("VERDICT fsdp2: BITWISE EQUAL\n", None, False, "killed at the timeout")])
def test_distributed_verdict(out, rc, ok, words):
    passed, what = gc.fsdp_verdict("nccl x1", gc.Proc(rc, out))
    assert passed is ok and words in what, what


@pytest.mark.parametrize("dry, facts, want", [
    (True, {}, ["gloo x2 cpu"]),
    (False, {"gpus": 1, "triton": "3.6.0"}, ["nccl x1", "nccl x1 triton", "gloo x2 cpu"]),
    (False, {"gpus": 8, "triton": "3.6.0"}, ["nccl x8", "nccl x8 triton"]),
    (False, {"gpus": 1, "triton": "not importable: No module named 'triton'"},
     ["nccl x1", "gloo x2 cpu"])])
def test_distributed_stage_runs_one_process_per_gpu(tmp_path, dry, facts, want):
    ctx = gc.Ctx(tmp_path, dry, gc.Log(tmp_path / "check.log"))
    ctx.facts.update(facts)
    jobs = gc.distributed_jobs(ctx)
    assert [label for label, _ in jobs] == want
    for label, cmd in jobs:
        cmd = list(map(str, cmd))
        i = cmd.index("--nproc-per-node")
        assert cmd[:4] == [ctx.py, "-m", "torch.distributed.run", "--standalone"]
        assert cmd[i + 1] == label.split()[1][1:]  # x1 -> 1 process, x8 -> 8
        assert cmd[i + 2:i + 4] == ["-m", "momentum_cuda.examples.fsdp"]
        assert cmd[cmd.index("--device") + 1] == ("cuda" if label.startswith("nccl") else "cpu")
        assert ("--backend" in cmd) == label.endswith("triton")


@pytest.mark.parametrize("built, carried, dry, verdict", [
    (True, True, False, "built"),          # a build that works never uses the carried module
    (False, True, False, "carried"),       # no Python.h on the GPU machine, say
    (False, False, False, "FAIL"),
    (False, True, True, "FAIL"),           # the dry run proves the build itself: no stand-in
    (True, False, True, "left")])          # the dry run leaves its module to be carried
def test_build_falls_back_to_a_carried_module_and_says_so(monkeypatch, tmp_path, built, carried,
                                                          dry, verdict):
    name = gc._module_name()
    (tmp_path / "momentum_cuda").mkdir()
    monkeypatch.setattr(gc, "ROOT", tmp_path)
    monkeypatch.setattr(gc, "CARRIED", tmp_path / "carried")
    if carried:
        gc.CARRIED.mkdir()
        (gc.CARRIED / name).write_bytes(b"module bytes")
    if verdict == "left":  # what build_ext --inplace made
        (tmp_path / "momentum_cuda" / name).write_bytes(b"built by the dry run")
    ctx = gc.Ctx(tmp_path, dry, gc.Log(tmp_path / "check.log"))
    ran = []

    def run(cmd, env=None, label=""):
        ran.append(cmd[1])
        if cmd[1] == "setup.py":
            return gc.Proc(0 if built else 1, "momentum_cuda: building the CPU and CUDA kernels"
                           if built else "fatal error: Python.h: No such file or directory")
        return gc.Proc(0, "cuda_ext_check: passed")
    monkeypatch.setattr(ctx, "run", run)
    got, detail = gc.build(ctx)
    copied = (tmp_path / "momentum_cuda" / name).is_file()
    if verdict == "built":
        assert got == gc.PASS and "built for sm_90" in detail and not copied
    elif verdict == "left":
        assert got == gc.PASS and (gc.CARRIED / name).read_bytes() == b"built by the dry run"
    elif verdict == "carried":
        assert got == gc.PASS and copied
        assert detail.startswith("NOT BUILT HERE: build failed") and "Python.h" in detail
        assert ran == ["setup.py", "tools/cuda_ext_check.py"]  # the carried module is checked
    else:
        assert got == gc.FAIL and not copied and ran == ["setup.py"]


@pytest.mark.parametrize("carried", [False, True])
def test_preflight_lets_a_carried_module_stand_in_for_a_missing_python_h(monkeypatch, tmp_path,
                                                                        carried):
    monkeypatch.setattr(gc, "CARRIED", tmp_path / "carried")
    if carried:
        gc.CARRIED.mkdir()
        (gc.CARRIED / gc._module_name()).write_bytes(b"module")
    monkeypatch.setattr(gc.sysconfig, "get_paths", lambda: {"include": str(tmp_path / "none")})
    ctx = gc.Ctx(tmp_path, False, gc.Log(tmp_path / "check.log"))
    facts = ('FACTS {"python": "3.12.3", "torch": "2.11.0+cu130", "torch_cuda": "13.0", '
             '"triton": "3.6.0", "gpu": true, "cpus": 16, "gpu_name": "NVIDIA H200", '
             '"capability": "9.0", "sms": 132, "memory_gib": 139.8, "gpus": 1}')
    monkeypatch.setattr(ctx, "run", lambda cmd, env=None, label="": gc.Proc(0, facts))
    verdict, detail = gc.preflight(ctx)
    assert "no Python.h at" in detail
    assert verdict == (gc.PASS if carried else gc.FAIL)
    assert ("(a module is carried in)" in detail) == carried


@pytest.mark.parametrize("jobs, verdict, words", [
    (["a", "not a"], gc.PASS, "dry: 3 tests collected in 2 jobs (1, 2)"),
    (["a", "b"], gc.FAIL, "1 in none, 0 twice"),           # c is in no job
    (["a or b", "not b"], gc.FAIL, "0 in none, 1 twice")])  # a is in both
def test_dry_run_checks_that_the_jobs_split_the_tests(monkeypatch, tmp_path, jobs, verdict,
                                                      words):
    tests = ["tests/test_gpu.py::test_x[a]", "tests/test_gpu.py::test_x[b]",
             "tests/test_gpu.py::test_x[c]"]

    def collect(cmd_jobs, env=None):  # -k's last term picks the ids it names
        out = []
        for _, cmd in cmd_jobs:
            k = cmd[cmd.index("-k") + 1]
            term = k.split(" and ", 1)[1] if " and " in k else "True"
            picked = [t for t in tests if eval(term, {}, {n: n in t for n in "abc"})]
            out.append(gc.Proc(0, "\n".join(picked) + f"\n\n{len(picked)} tests collected"))
        return out
    ctx = gc.Ctx(tmp_path, True, gc.Log(tmp_path / "check.log"))
    monkeypatch.setattr(ctx, "run_many", collect)
    got, detail = gc._pytest(ctx, "not triton", jobs=jobs)
    assert got == verdict and words in detail, detail


def test_gpu_pytest_verdict_names_the_first_failures(monkeypatch, tmp_path):
    outs = ["....F\nFAILED tests/test_gpu.py::test_a[cuda-x] - AssertionError: step 1\n"
            "1 failed, 4 passed in 3.0s", "..\n2 passed in 1.0s",
            "E\nERROR tests/test_gpu.py::test_b - RuntimeError\n1 error in 1.0s"]
    ctx = gc.Ctx(tmp_path, False, gc.Log(tmp_path / "check.log"))
    monkeypatch.setattr(ctx, "run_many",
                        lambda jobs, env=None: [gc.Proc(1 if "F" in o or "E" in o else 0, o)
                                                for o in outs[:len(jobs)]])
    verdict, what = gc._pytest(ctx, "not triton", jobs=["a", "b", "c"])
    assert verdict == gc.FAIL
    assert what == "1 failed, 6 passed, 1 error; first: test_a[cuda-x], test_b", what


def test_summary_shows_the_overhead_targets_before_the_headline(tmp_path):
    import json
    target = dict(tensors=148, implementation="mc-flat-cuda", base="torch-fused", ratio=0.25,
                  met=True)
    (tmp_path / "bench-overhead.json").write_text(json.dumps(
        {"cases": [{"targets": [target, dict(target, tensors=2000, ratio=0.5, met=False)]}]}))
    (tmp_path / "bench-headline.json").write_text(json.dumps({"cases": [
        {"layout": "gpt2", "numel": 10, "dtype": "float32", "results": {}}]}))
    ctx = gc.Ctx(tmp_path, False, gc.Log(tmp_path / "check.log"))
    text = gc.write_summary(tmp_path, ["header"], [], ctx)
    assert ("148: mc-flat-cuda / torch-fused 0.250 met; 2000: mc-flat-cuda / torch-fused 0.500 "
            "NOT met") in text
    assert text.index("overhead") < text.index("headline")
