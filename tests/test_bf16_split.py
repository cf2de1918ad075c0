"""momentum_cuda.reference.bf16_split / bf16_join, the plain-torch twin of
csrc/include/momentum_cuda/bf16_split.h (whose exhaustive test over all 2^32 fp32 patterns is
tests/cpp/test_bf16_split.cpp): every bf16 value's neighbourhood, bit for bit."""
import pytest
import torch

from momentum_cuda.reference import bf16_join, bf16_split

# the low halves where rounding decides: halfway points and their neighbours, the ends
LOWS = [0x0000, 0x0001, 0x3FFF, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0x8002, 0xC000, 0xFFFE, 0xFFFF]


def _masters(extra_random: int = 1 << 16) -> torch.Tensor:
    """Every high half (all 65,536: every sign, exponent and bf16 mantissa) with each of LOWS,
    plus random patterns; as float32 (their bits)."""
    high = torch.arange(1 << 16, dtype=torch.int64).repeat_interleave(len(LOWS))
    low = torch.tensor(LOWS, dtype=torch.int64).repeat(1 << 16)
    rand = torch.randint(0, 1 << 32, (extra_random,), dtype=torch.int64,
                         generator=torch.Generator().manual_seed(0))
    u = torch.cat([(high << 16) | low, rand])
    return (u - ((u >> 31) << 32)).to(torch.int32).view(torch.float32)


def test_split_join_is_exact():
    m = _masters()
    param, rem, tie = bf16_split(m)
    nan = m.isnan()
    # torch's rounding; a NaN's parameter is c10's 0x7FC0 (torch's CPU conversion: 0xFFFF)
    want = m.to(torch.bfloat16).view(torch.int16).masked_fill(nan, 0x7FC0)
    assert torch.equal(param.view(torch.int16), want)
    assert torch.equal(rem, m.view(torch.int32).to(torch.int16))  # the low half
    low = m.view(torch.int32) & 0xFFFF
    assert not tie[low != 0x8000].any()  # the tie bit only at a halfway point
    assert tie.any() and (~tie[low == 0x8000]).any()  # both ways at halfway points
    back = bf16_join(param, rem, tie)
    assert torch.equal(back[~nan].view(torch.int32), m[~nan].view(torch.int32))
    assert back[nan].isnan().all() and nan.any()


def test_without_the_tie_bit_halfway_points_are_lost():
    """The tie bit is needed: without it, the halfway points that rounded up come back as the
    other halfway point (an even bf16 value is the rounding of 65,537 fp32 patterns)."""
    m = _masters(0)
    param, rem, tie = bf16_split(m)
    back = bf16_join(param, rem, torch.zeros_like(tie))
    lost = (back.view(torch.int32) != m.view(torch.int32)) & ~m.isnan()
    assert torch.equal(lost, tie & ~m.isnan())
    one_up = torch.tensor([0x3F7F8000], dtype=torch.int32).view(torch.float32)  # to 1.0
    p, r, t = bf16_split(one_up)
    assert p.item() == 1.0 and t.item() and r.item() == -0x8000
    assert bf16_join(p, r, t).view(torch.int32).item() == 0x3F7F8000
    assert bf16_join(p, r, ~t).view(torch.int32).item() == 0x3F808000  # the other halfway point


def test_wrong_dtypes_are_named():
    with pytest.raises(TypeError, match="master must be float32, got torch.float64"):
        bf16_split(torch.zeros(3, dtype=torch.float64))
    p, r, t = bf16_split(torch.ones(2))
    with pytest.raises(TypeError, match=r"\(bfloat16, int16, bool\).*torch.float16"):
        bf16_join(p.half(), r, t)
