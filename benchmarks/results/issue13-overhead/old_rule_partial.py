"""momentum-cuda bench with the steady replay's old rule (before 8bb1018): a step with a flat
bucket stepped in part (some of its parameters without a gradient) is not kept, so every such
step is planned."""
import sys

from momentum_cuda import cli, optim

_orig = optim._FusedMomentum._keep_steady


def _old_rule(self, planned, plans, lent, kept):
    _orig(self, planned, plans, lent, kept)
    if any(r[1] != 0 or r[2] != len(r[0].params) for _, runs, _ in plans for r in runs):
        self._steady = None


optim._FusedMomentum._keep_steady = _old_rule
sys.exit(cli.main())
