// stochastic.h — stochastic rounding of bf16 parameters, written once for the CPU loop and the
// CUDA kernel (the Triton kernel and momentum_cuda/reference.py write the same arithmetic).
//
// Inputs : a bf16 parameter, its bf16 gradient and bf16 momentum buffer (one element, or up to
//          8 of one span); a 32-bit key per tensor and step (reference.sr_key: the optimizer's
//          seed, the parameter's step count and its position, hashed on the host).
// Step   : torch.optim.SGD's fp32 step (sgd_math, fp32 alphas) on the widened parameter,
//          gradient and buffer; then the parameter rounded stochastically to bf16 with the
//          random bits of its memory-order index i in the whole tensor (a shard of it, e.g.
//          FSDP2's, counts from its offset: the same bits as the unsharded step), the buffer
//          rounded to nearest even.
// Random : r = lowbias32(lowbias32(key ^ (i >> 32)) ^ (i mod 2^32)): counter based (no state),
//          the same bits on every backend for the same key and element; for one key, distinct
//          elements below 2^32 get distinct r (lowbias32 is a bijection).
// Round  : bits = (bits(m) + (r mod 2^16)) >> 16: m rounds up in magnitude with probability
//          low16(m) / 2^16, so its mean is m (tests/test_stochastic_rounding.py bounds it). NaN
//          gives 0x7FC0, as the round-to-nearest conversion; a finite value above the largest
//          bf16 may round to inf.
#pragma once

#include <cstdint>

#include "momentum_cuda/sgd_math.h"

namespace momentum_cuda {

/// C. Wellons' lowbias32: a bijective 32-bit mixer (two multiplies, three xor-shifts).
MC_HD uint32_t mc_lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

/// The 32-bit key of one tensor at one step (reference.sr_key): the optimizer's seed, the
/// parameter's own step count and its position in the optimizer, each taken mod 2^32.
MC_HD uint32_t mc_sr_key(uint64_t seed, uint64_t step, uint64_t stream) {
  return mc_lowbias32(mc_lowbias32(mc_lowbias32(static_cast<uint32_t>(seed)) ^
                                   static_cast<uint32_t>(step)) ^
                      static_cast<uint32_t>(stream));
}

/// The first half of mc_sr_random: the key mixed with the high 32 bits of the index (one value
/// for 2^32 consecutive elements, so a loop may hoist it).
MC_HD uint32_t mc_sr_key_hi(uint32_t key, int64_t i) {
  return mc_lowbias32(key ^ static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32));
}

/// The second half: the random bits of the element whose index has low 32 bits `lo`, given
/// mc_sr_key_hi of its index.
MC_HD uint32_t mc_sr_random_lo(uint32_t key_hi, uint32_t lo) { return mc_lowbias32(key_hi ^ lo); }

/// The 32 random bits of element i (memory order) of a tensor whose key is `key`.
MC_HD uint32_t mc_sr_random(uint32_t key, int64_t i) {
  return mc_sr_random_lo(mc_sr_key_hi(key, i), static_cast<uint32_t>(static_cast<uint64_t>(i)));
}

/// fp32 -> bf16 bits, rounded stochastically with the low 16 bits of r.
MC_HD uint16_t mc_float_to_bf16_sr(float f, uint32_t r) {
  const uint32_t u = mc_float_bits(f);
  const uint32_t up = (u + (r & 0xffffu)) >> 16;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : up);
}

/// Element j of a stochastic-rounding step with random bits `rnd` (mc_sr_random of its index),
/// the formula sr_math applies to each element: p[j] (bf16 bits) stepped in fp32 and rounded
/// stochastically, b[j] (bf16 bits) read unless the step has no kMomentum or is the first,
/// written rounded to nearest even with kMomentum (b is not touched otherwise and may be null).
/// Branch-free for a constant `flags`, so a CPU loop over elements vectorizes.
template <class Add>
MC_HD void sr_elem(uint16_t* p, uint16_t* b, const uint16_t* g, int j, uint32_t rnd,
                   const StepScalars<float>& s, uint32_t flags) {
  const bool read_buf = (flags & kMomentum) && !(flags & kFirstStep);
  float m = mc_bf16_bits_to_float(p[j]);
  float bj = read_buf ? mc_bf16_bits_to_float(b[j]) : 0.f;
  sgd_math(m, bj, mc_bf16_bits_to_float(g[j]), s, flags, RoundNone{}, Add{});
  p[j] = mc_float_to_bf16_sr(m, rnd);
  if (flags & kMomentum) b[j] = mc_float_to_bf16_bits(bj);
}

/// n <= 8 elements of a stochastic-rounding step, elements i0 .. i0 + n - 1 of their span:
/// sr_elem on each with the random bits of its index. Pointers may be memory or registers (n is
/// a constant 8 on the CUDA vector path).
template <class Add>
MC_HD void sr_math(uint16_t* p, uint16_t* b, const uint16_t* g, int64_t i0, int n,
                   uint32_t key, const StepScalars<float>& s, uint32_t flags) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < n; ++j) {
    sr_elem<Add>(p, b, g, j, mc_sr_random(key, i0 + j), s, flags);
  }
}

}  // namespace momentum_cuda
