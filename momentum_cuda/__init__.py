"""momentum_cuda: a fused momentum optimizer for PyTorch, bitwise equal to torch.optim.SGD.

    opt = momentum_cuda.SGD(model.parameters(), lr=0.1, momentum=0.9)      # drop-in for torch's
    opt = momentum_cuda.Momentum(model.parameters(), lr=1e-3, momentum=0.9)  # EMA form
"""
from . import reference
from ._backends import available_backends
from .optim import ALIGN_BYTES, SGD, Momentum

__all__ = ["SGD", "Momentum", "reference", "available_backends", "ALIGN_BYTES"]
__version__ = "0.1.0"
