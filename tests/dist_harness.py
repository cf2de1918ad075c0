"""Runs tests/dist_scenarios.py on `world_size` CPU processes (gloo) and collects their results.

    launch = run_ranks(2, ["ddp/...", "fsdp2/..."], timeout_s=150, shared_dir=tmp)
    launch.problems("ddp/...")   # [] when the scenario passed on every rank

How a launch works:

- The rendezvous store (a TCPStore) is served by this process on a port the OS picks (port 0:
  no window in which another process can take a port we chose); each rank gets MASTER_ADDR=
  127.0.0.1, MASTER_PORT, RANK, WORLD_SIZE (and OMP_NUM_THREADS=1: the ranks share the machine's
  cores, and torch's bf16 bits depend on its thread count) and connects to it as a client
  before `dist.init_process_group("gloo", timeout=...)`.
- Each rank is `sys.executable tests/dist_scenarios.py ...` in its own session (process group),
  its stdout and stderr going to files (never pipes: a rank that writes a lot cannot block).
  It runs the scenarios one after the other and rewrites `rank<r>.json` after each (status
  "ok" / "mismatch" / "error" / "skip", the detail, info such as `opt.last_step` paths), with the
  scenario it is in as `current`: a launch cut short keeps every finished result and says where
  each rank was.
- The harness waits until every rank has exited or the deadline passes. A rank still running at
  the deadline is asked for its Python stacks (SIGUSR1: dist_scenarios registers faulthandler
  on it), then every rank's process group is killed (SIGKILL). A rank that exits early with a
  nonzero status (a crash: scenarios catch their own exceptions) gets the others killed after a
  short grace period, since they would wait for it in their next collective. Either way the
  launch carries a `failure` message naming the rank, the scenario it was in and the tail of its
  stderr, and every scenario without a result on some rank fails with it: a hung collective
  fails the tests, it never hangs the run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIO_SCRIPT = HERE / "dist_scenarios.py"
STDERR_TAIL = 3000  # characters of a rank's stderr quoted in a failure message
CRASH_GRACE_S = 5.0  # how long the other ranks may finish after one rank crashed


def tail(path: Path, n: int = STDERR_TAIL) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no output file)"
    return text[-n:] if text.strip() else "(empty)"


@dataclass
class Launch:
    """What one launch left: per rank, the scenario results and where it was at the end."""

    world_size: int
    scenarios: list
    results: dict = field(default_factory=dict)  # rank -> {scenario: result dict}
    current: dict = field(default_factory=dict)  # rank -> scenario it was in, or None
    returncodes: dict = field(default_factory=dict)  # rank -> exit status (None: killed by us)
    failure: str | None = None  # why the launch did not end normally
    wall_s: float = 0.0
    logs: dict = field(default_factory=dict)  # rank -> stderr path
    pids: list = field(default_factory=list)

    def result(self, rank: int, name: str) -> dict | None:
        return self.results.get(rank, {}).get(name)

    def problems(self, name: str) -> list[str]:
        """Why `name` did not pass on every rank (empty: it passed everywhere). A scenario that
        skipped on every rank with one reason is reported by skip_reason() instead."""
        out, missing = [], False
        for rank in range(self.world_size):
            r = self.result(rank, name)
            if r is None:
                missing = True
                where = self.current.get(rank)
                out.append(f"rank {rank}: no result for {name!r}"
                           + (f" (the rank was in {where!r})" if where else "")
                           + ("" if self.failure or rank not in self.logs else
                              f"; exit status {self.returncodes.get(rank)}, stderr tail:\n"
                              f"{tail(self.logs[rank])}"))
            elif r["status"] not in ("ok", "skip"):
                out.append(f"rank {rank}: {r['status']}: {r['detail']}")
        if missing and self.failure:
            out.append(f"the launch: {self.failure}")
        statuses = {(self.result(rank, name) or {}).get("status") for rank in
                    range(self.world_size)}
        if "skip" in statuses and statuses != {"skip"}:
            out.append(f"skipped on some ranks only: {statuses}")
        return out

    def skip_reason(self, name: str) -> str | None:
        rs = [self.result(rank, name) for rank in range(self.world_size)]
        if all(r is not None and r["status"] == "skip" for r in rs):
            return rs[0]["detail"]
        return None

    def info(self, name: str) -> dict:
        """rank -> the scenario's info (recorded, not asserted: e.g. opt.last_step paths)."""
        return {rank: (self.result(rank, name) or {}).get("info") for rank in
                range(self.world_size)}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # not written yet (each write is atomic: a rename)


def _kill(procs, signum) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signum)  # its own session: pgid == pid
            except ProcessLookupError:
                pass


def run_ranks(world_size: int, scenario_names, timeout_s: float, *, work_dir,
              shared_dir=None, collective_timeout_s: float = 30.0, script=SCENARIO_SCRIPT,
              crash_grace_s: float = CRASH_GRACE_S) -> Launch:
    """Starts `world_size` ranks running `scenario_names` in order and waits for them (at most
    `timeout_s`). `work_dir`: where the result and log files go (one launch per directory);
    `shared_dir`: a directory every rank may read and write (checkpoints), given to the
    scenarios. `collective_timeout_s`: the gloo timeout of every process group (a collective
    that waits longer raises in the rank, which records it and goes on to the next scenario).
    `script`: what each rank runs (the harness's own tests give a stand-in)."""
    import torch.distributed as dist

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    shared = Path(shared_dir) if shared_dir is not None else work / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    names = list(scenario_names)
    launch = Launch(world_size, names)
    # The store server lives here for the whole launch; port 0: the OS picks a free port.
    store = dist.TCPStore("127.0.0.1", 0, None, True,
                          timeout=timedelta(seconds=collective_timeout_s + 30),
                          wait_for_workers=False)
    port = store.port
    procs = []
    start = time.monotonic()
    try:
        for rank in range(world_size):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                       PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
            env.pop("TORCH_DISTRIBUTED_DEBUG", None)
            out, err = work / f"rank{rank}.out", work / f"rank{rank}.err"
            launch.logs[rank] = err
            cmd = [sys.executable, str(script), "--results", str(work / f"rank{rank}.json"),
                   "--shared", str(shared), "--collective-timeout", str(collective_timeout_s),
                   *names]
            with open(out, "wb") as fo, open(err, "wb") as fe:
                procs.append(subprocess.Popen(cmd, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                              cwd=str(HERE.parent), env=env,
                                              start_new_session=True))
        deadline = start + timeout_s
        crashed_at = None
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            bad = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if bad and crashed_at is None:
                crashed_at = now
            if crashed_at is not None and now - crashed_at > crash_grace_s:
                r = bad[0]
                launch.failure = (f"rank {r} exited with status {codes[r]} "
                                  f"{_where(work, r)}; the other ranks were killed "
                                  f"{crash_grace_s:g} s later. rank {r}'s stderr tail:\n"
                                  f"{tail(work / f'rank{r}.err')}")
                _kill(procs, signal.SIGKILL)
                break
            if now > deadline:
                hung = [r for r, c in enumerate(codes) if c is None]
                _kill(procs, signal.SIGUSR1)  # faulthandler: every thread's stack to stderr
                time.sleep(1.5)
                _kill(procs, signal.SIGKILL)
                launch.failure = (
                    f"timeout: rank(s) {hung} still running after {timeout_s:.0f} s and killed; "
                    + "; ".join(f"rank {r} was {_where(work, r)}" for r in hung)
                    + "".join(f"\n--- rank {r} stderr tail (stacks at the deadline) ---\n"
                              f"{tail(work / f'rank{r}.err')}" for r in hung))
                break
            time.sleep(0.05)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
    finally:
        _kill(procs, signal.SIGKILL)
        for p in procs:
            if p.poll() is None:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        del store
    launch.wall_s = time.monotonic() - start
    launch.pids = [p.pid for p in procs]
    for rank, p in enumerate(procs):
        launch.returncodes[rank] = p.returncode
        data = _read(work / f"rank{rank}.json") or {}
        launch.results[rank] = data.get("results", {})
        launch.current[rank] = data.get("current")
    return launch


def _where(work: Path, rank: int) -> str:
    data = _read(work / f"rank{rank}.json")
    if data is None:
        return "before its first scenario (no results file: start-up or init_process_group)"
    if data.get("current"):
        return f"in scenario {data['current']!r}"
    return "after its last scenario"
