// bf16_split.h — an fp32 master weight held exactly as its bf16 parameter plus a remainder.
//
// Inputs : an fp32 master m (split); a bf16 parameter's bits, a 16-bit remainder and a tie bit
//          (join).
// Split  : param = m rounded to the nearest bf16, ties to even (c10's conversion:
//          mc_float_to_bf16_bits), rem = m's low 16 bits, tie = m rounded UP from a halfway
//          point (rem == 0x8000 and param is not m's high half).
// Join   : m's high half is param, less one where m rounded up (rem > 0x8000, or rem == 0x8000
//          with tie); m = high << 16 | rem.
// Why the tie bit: an even bf16 value is the rounding of 65,537 fp32 patterns (both halfway
//          points next to it round to it), one more than a 16-bit remainder can name; the two
//          halfway points have the same low half 0x8000 and differ only in whether m rounded
//          up. An odd bf16 value has 65,535. So bf16 + 16 bits cannot be exact, bf16 + 17 bits
//          is (tests/cpp/test_bf16_split.cpp counts the preimages of every bf16 value).
// Invariant: join(split(m)) == m bit for bit for every fp32 pattern but NaNs, and split's param
//          is c10's: all 2^32 patterns are checked (test_bf16_split.cpp, group exhaustive). A NaN
//          master gives param 0x7FC0 (as c10) and joins to a NaN; its sign and payload are not
//          kept. join is defined on split's results; consistent() tells whether a (param, rem,
//          tie) triple is one (a parameter written since the split may leave one that is not).
// Step    : master_elem is torch's fp32 step (sgd_math) on one joined master, then the split;
//          master_math applies it to the elements of one tie byte (the CUDA kernel calls it),
//          the CPU loop to blocks of elements with their tie bits unpacked.
#pragma once

#include <cstdint>

#include "momentum_cuda/sgd_math.h"

namespace momentum_cuda {

/// The three parts of a split master.
struct Bf16Split {
  uint16_t param;  ///< the bf16 bits the model sees
  uint16_t rem;    ///< the master's low 16 bits
  bool tie;        ///< the master rounded up from a halfway point (only with rem == 0x8000)
};

/// m -> (its RNE bf16 bits, its low half, whether it rounded up from a tie).
MC_HD Bf16Split mc_bf16_split(float m) {
  const uint32_t u = mc_float_bits(m);
  const uint16_t param = mc_float_to_bf16_bits(m);
  const uint16_t rem = static_cast<uint16_t>(u & 0xffffu);
  return Bf16Split{param, rem, rem == 0x8000u && (u >> 16) != param};
}

/// The master that split into (param, rem, tie).
MC_HD float mc_bf16_join(uint16_t param, uint16_t rem, bool tie) {
  const uint32_t up = (rem > 0x8000u || (rem == 0x8000u && tie)) ? 1u : 0u;
  return mc_bits_float(((uint32_t(param) - up) << 16) | rem);
}

/// (param, rem, tie) is what mc_bf16_split gives for the master it joins to, for a non-NaN
/// master: false where the parameter was written after the split (its remainder belongs to
/// another value).
MC_HD bool mc_bf16_split_consistent(uint16_t param, uint16_t rem, bool tie) {
  const float m = mc_bf16_join(param, rem, tie);
  const Bf16Split s = mc_bf16_split(m);
  return s.param == param && s.rem == rem && s.tie == tie;
}

/// Element j of a master-weights step, the formula master_math applies to each element: the
/// master joined from (p[j], r[j], tie), stepped in fp32 by sgd_math with the bf16 gradient
/// widened exactly, split back into p[j] and r[j]; returns the new tie bit (0 or 1).
/// b[j] (fp32) is read unless the step has no kMomentum or is the first, written with
/// kMomentum (b is not touched otherwise and may be null). Branch-free for a constant `flags`,
/// so a CPU loop over elements vectorizes.
template <class Add>
MC_HD uint32_t master_elem(uint16_t* p, float* b, const uint16_t* g, uint16_t* r, int j,
                           uint32_t tie, const StepScalars<float>& s, uint32_t flags) {
  const bool read_buf = (flags & kMomentum) && !(flags & kFirstStep);
  float m = mc_bf16_join(p[j], r[j], tie != 0u);
  float bj = read_buf ? b[j] : 0.f;
  sgd_math(m, bj, mc_bf16_bits_to_float(g[j]), s, flags, RoundNone{}, Add{});
  Bf16Split o = mc_bf16_split(m);  // not const: GCC 12 keeps a const struct in memory (no SRA)
  p[j] = o.param;
  r[j] = o.rem;
  if (flags & kMomentum) b[j] = bj;
  return uint32_t(o.tie);
}

/// One tie byte's elements (n <= 8, from element 8k of a span) of a master-weights step:
/// master_elem on each, with bit j of `ties` as element j's tie bit; returns the new tie byte
/// (bits past n 0). Pointers may be memory or registers: n is a constant 8 on the CUDA vector
/// path.
template <class Add>
MC_HD uint8_t master_math(uint16_t* p, float* b, const uint16_t* g, uint16_t* r, uint32_t ties,
                          int n, const StepScalars<float>& s, uint32_t flags) {
  uint32_t out = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < n; ++j) {
    out |= master_elem<Add>(p, b, g, r, j, (ties >> j) & 1u, s, flags) << j;
  }
  return static_cast<uint8_t>(out);
}

}  // namespace momentum_cuda
