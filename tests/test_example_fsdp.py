"""momentum_cuda/examples/fsdp.py under torchrun: 2 processes on gloo (CPU), FSDP2 and DDP, bitwise
against torch.optim.SGD(foreach=False) before and after a torch.distributed.checkpoint round trip;
and a planted difference (momentum_cuda's lr off by 2^-20) that must make it exit 1 naming what
differs. Each run is a process group killed at its timeout: a hung collective fails the test
instead of hanging the run. About 15 s each on 2 cores."""
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 150  # a healthy run takes 10-25 s on 2 busy cores

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch without distributed/gloo")


def torchrun(tmp_path, module: str, *args, pythonpath=()) -> tuple[int, str]:
    """python -m torch.distributed.run --standalone --nproc-per-node 2 -m MODULE ARGS, on the CPU
    (gloo; no GPU even where one is visible), in its own session; (exit status, output)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*map(str, pythonpath), str(ROOT)]),
               OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp_path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", module, *args]
    p = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and both workers
        out, _ = p.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {TIMEOUT_S} s (killed):\n{out[-4000:]}")
    return p.returncode, out


def test_fsdp2_and_ddp_are_bitwise_equal_to_torch_through_a_checkpoint(tmp_path):
    rc, out = torchrun(tmp_path, "momentum_cuda.examples.fsdp", "--steps", "3")
    assert rc == 0, out[-4000:]
    for setup in ("fsdp2", "ddp"):
        assert re.search(rf"^VERDICT {setup}: BITWISE EQUAL", out, re.M), out
    assert re.search(r"^RESULT: PASS \(fsdp2 bitwise equal, ddp bitwise equal; 2 processes, "
                     r"gloo\)$", out, re.M), out
    # Both processes report, once per setup; FSDP2 hands over DTensor shards and momentum_cuda
    # keeps DTensor momentum buffers, stepped on the local shards by its kernel (per tensor);
    # under DDP the parameters are plain tensors in one flat call.
    for rank in (0, 1):
        lines = re.findall(rf"^   rank {rank}: (.*)$", out, re.M)
        assert len(lines) == 2, out
        fsdp, ddp = lines
        assert ("13,061 of 26,122 parameter elements here; parameters and momentum buffers: "
                "DTensor Shard(dim=0), DTensor Shard(dim=0); momentum_cuda's step: 1 per-tensor "
                "call over 6 tensors (cpu)") in fsdp
        assert "26,122 of 26,122" in ddp and "1 flat call over 6 tensors (cpu)" in ddp
    # Before the checkpoint one line, after it three (uninterrupted, resumed from ours and from
    # torch's checkpoint), per setup; nothing else is a verdict.
    assert len(re.findall(r"bitwise equal on all 2 processes$", out, re.M)) == 8, out
    assert "MISMATCH" not in out
    assert not list(tmp_path.glob("momentum_cuda-fsdp-*")), "the checkpoint folder was left"


PLANTED = """
    import sys
    import momentum_cuda
    from momentum_cuda.examples import fsdp

    class Nudged:  # a planted bug: momentum_cuda's lr off by 2^-20
        __version__ = momentum_cuda.__version__

        @staticmethod
        def SGD(params, **kw):
            return momentum_cuda.SGD(params, **{**kw, "lr": kw["lr"] * (1 + 2**-20)})

    fsdp.momentum_cuda = Nudged
    sys.exit(fsdp.main())
"""


def test_a_difference_fails_and_names_what_differs(tmp_path):
    (tmp_path / "planted_fsdp.py").write_text(textwrap.dedent(PLANTED))
    rc, out = torchrun(tmp_path, "planted_fsdp", "--steps", "2", "--setups", "fsdp2",
                       pythonpath=[tmp_path])
    assert rc != 0, out[-4000:]
    assert re.search(r"^VERDICT fsdp2: MISMATCH", out, re.M), out
    assert re.search(r"^RESULT: FAIL \(fsdp2 MISMATCH", out, re.M), out
    assert "momentum_cuda.SGD:                             MISMATCH on 2 of 2 processes" in out
    for rank in (0, 1):
        assert re.search(rf"rank {rank}: 0\.weight parameter: \d+ of 4096 elements differ, "
                         r"max \|diff\| ", out), out
        assert re.search(rf"rank {rank}: 0\.weight momentum buffer: \d+ of 4096", out), out
