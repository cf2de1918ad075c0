"""Small helpers shared by the optimizer and the Triton backend."""
import torch


def is_dense(t: torch.Tensor) -> bool:
    """Dense and non-overlapping (contiguous, channels_last, ...): its numel elements fill one
    block of memory. The same test as ATen's is_non_overlapping_and_dense."""
    if t.layout != torch.strided:
        return False
    if t.numel() == 0:  # no element, no overlap: ATen calls every empty tensor contiguous
        return True
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True
