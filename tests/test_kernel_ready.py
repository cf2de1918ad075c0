"""momentum_cuda._C.kernel_ready (one C++ call per group and step, optim._plan) against the Python
check it stands in for, optim._check_loose: True exactly where _check_loose returns None without
raising, on triples that each break one condition (and a few that break none)."""
from __future__ import annotations

import pytest
import torch

import momentum_cuda
from momentum_cuda import _C

H = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)


def _t(*shape, dtype=torch.float32, **kw):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)),
                       dtype=torch.float32, **kw).to(dtype)


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


CASES = {
    "fp32": lambda: (_t(7), _t(7), _t(7)),
    "no buffer": lambda: (_t(7), _t(7), None),
    "bf16": lambda: (_t(7, dtype=torch.bfloat16), _t(7, dtype=torch.bfloat16),
                     _t(7, dtype=torch.bfloat16)),
    "fp16 channels_last": lambda: (_cl(_t(2, 3, 4, 5, dtype=torch.float16)),
                                   _cl(_t(2, 3, 4, 5, dtype=torch.float16)),
                                   _cl(_t(2, 3, 4, 5, dtype=torch.float16))),
    "empty": lambda: (_t(0), _t(0), _t(0)),
    "fp32 grad transposed": lambda: (_t(4, 6), _t(6, 4).t(), _t(4, 6)),
    "bf16 grad transposed": lambda: (_t(4, 6, dtype=torch.bfloat16),
                                     _t(6, 4, dtype=torch.bfloat16).t(),
                                     _t(4, 6, dtype=torch.bfloat16)),
    "buffer transposed": lambda: (_t(4, 6), _t(4, 6), _t(6, 4).t()),
    "buffer fp64": lambda: (_t(7), _t(7), _t(7, dtype=torch.float64)),
    "grad fp64": lambda: (_t(7), _t(7, dtype=torch.float64), _t(7)),
    "grad shape": lambda: (_t(7), _t(8), _t(7)),
    "buffer shape": lambda: (_t(7), _t(7), _t(8)),
    "grad sparse": lambda: (_t(7), _t(7).to_sparse(), _t(7)),
    "buffer sparse": lambda: (_t(7), _t(7), _t(7).to_sparse()),
    "complex": lambda: (_t(7, dtype=torch.complex64), _t(7, dtype=torch.complex64),
                        _t(7, dtype=torch.complex64)),
    "meta": lambda: (torch.empty(7, device="meta"), torch.empty(7, device="meta"),
                     torch.empty(7, device="meta")),
    "grad on meta": lambda: (_t(7), torch.empty(7, device="meta"), _t(7)),
    "strided slice": lambda: (_t(14)[::2], _t(14)[::2], _t(14)[::2]),
    "integer": lambda: (torch.arange(7), torch.arange(7), torch.arange(7)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_ready_mirrors_check_loose(case):
    p, g, b = CASES[case]()
    opt = momentum_cuda.SGD([torch.nn.Parameter(torch.zeros(1))], **H)
    try:
        python_ready = opt._check_loose(p, g, b, H) is None
    except Exception:
        python_ready = False
    assert _C.kernel_ready([p], [g], [b]) == [python_ready], case


def test_kernel_ready_one_entry_each():
    with pytest.raises(RuntimeError, match="one entry each, got 1, 0 and 1"):
        _C.kernel_ready([_t(3)], [], [None])


def test_both_answers_occur():
    """The cases above are not all one answer: the kernels take exactly these."""
    ready = {case for case in CASES if _C.kernel_ready(*([x] for x in CASES[case]()))[0]}
    assert ready == {"fp32", "no buffer", "bf16", "fp16 channels_last", "empty",
                     "fp32 grad transposed"}
