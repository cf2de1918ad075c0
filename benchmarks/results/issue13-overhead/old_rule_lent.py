"""momentum-cuda bench with the steady replay's old rule (before ae14437): a step whose flat
buckets are lent (DDP's bucket views) is not kept, so every such step is planned."""
import sys

from momentum_cuda import cli, optim

_orig = optim._FusedMomentum._keep_steady


def _old_rule(self, planned, plans, lent, kept):
    _orig(self, planned, plans, lent, kept)
    if any(lent):
        self._steady = None


optim._FusedMomentum._keep_steady = _old_rule
sys.exit(cli.main())
