// momentum_dtype.h — fp32 parameters whose momentum buffer is stored narrow (momentum_dtype=),
// written once for the CPU loop and the CUDA kernel (the Triton kernel and
// momentum_cuda/reference.py write the same arithmetic).
//
// Inputs : an fp32 parameter and its fp32 gradient; the momentum buffer stored as
//          bf16  — one bf16 per element (16 bytes moved per element and step instead of 20), or
//          int8  — one int8 code per element and one fp32 scale per block of kQBlock elements
//                  (blocks counted from element 0 of each tensor in memory order, the last one
//                  partial): ~14 bytes per element and step, 1 byte of state (+ 4 / kQBlock).
// Step   : the buffer widened to fp32 (bf16: exactly; int8: code * scale, one fp32 multiply),
//          torch.optim.SGD's fp32 step (sgd_math, fp32 alphas) on (p, buffer, g); the parameter
//          written with the unrounded fp32 buffer of this step; the new buffer stored
//          bf16  — rounded to nearest even (NaN -> 0x7FC0);
//          int8  — per block: a = max |v| (a NaN counts as inf); scale = a / 127 (one correctly
//                  rounded fp32 division) where a is finite, NaN where it is not; each code is
//                  v / scale (correctly rounded), clamped to [-127, 127], rounded to the nearest
//                  integer, ties to even (q8_round rounds first and clamps after: the same);
//                  codes are 0 where scale is 0 or NaN. So a block whose
//                  buffer holds an inf or a NaN reads back as NaN in every element.
// Invariant: reference.sgd_momentum_dtype_reference_step is this contract in plain torch; the
//          arithmetic uses only correctly rounded fp32 operations (fma, *, /, + and an exact
//          max), so every backend gives the same bits.
#pragma once

#include <cstdint>

#include "momentum_cuda/sgd_math.h"

namespace momentum_cuda {

/// Elements per int8 block (one fp32 scale each).
constexpr int kQBlock = 256;
/// The largest code: codes are symmetric, -127 .. 127.
constexpr float kQMax = 127.f;

/// Correctly rounded fp32 division (nvcc's `/` is too, but explicit, as mc_mul).
MC_HD float mc_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

/// Element j of a step with a bf16 buffer: p[j] (fp32) stepped by sgd_math with b[j] (bf16
/// bits) widened, b[j] read unless the step has no kMomentum or is the first, written rounded to
/// nearest even with kMomentum (b is not touched otherwise and may be null).
template <class Add>
MC_HD void bf16mom_elem(float* p, uint16_t* b, const float* g, int j, const StepScalars<float>& s,
                        uint32_t flags) {
  const bool read_buf = (flags & kMomentum) && !(flags & kFirstStep);
  float pj = p[j];
  float bj = read_buf ? mc_bf16_bits_to_float(b[j]) : 0.f;
  sgd_math(pj, bj, g[j], s, flags, RoundNone{}, Add{});
  p[j] = pj;
  if (flags & kMomentum) b[j] = mc_float_to_bf16_bits(bj);
}

/// An int8 buffer element widened: code * scale.
MC_HD float q8_load(int8_t code, float scale) { return mc_mul(static_cast<float>(code), scale); }

/// Element j of a step with an int8 buffer (codes q, the block's `scale`): p[j] stepped by
/// sgd_math with q8_load(q[j], scale) (read unless no kMomentum or the first step); returns
/// the new buffer value in fp32 (0 without kMomentum), which the caller quantizes once the
/// block's absmax is known (q8_scale, q8_code).
template <class Add>
MC_HD float q8_elem(float* p, const int8_t* q, float scale, const float* g, int j,
                    const StepScalars<float>& s, uint32_t flags) {
  const bool read_buf = (flags & kMomentum) && !(flags & kFirstStep);
  float pj = p[j];
  float bj = read_buf ? q8_load(q[j], scale) : 0.f;
  sgd_math(pj, bj, g[j], s, flags, RoundNone{}, Add{});
  p[j] = pj;
  return bj;
}

/// The bits of |v|, a NaN as inf's: for non-negative floats the bit patterns order as the
/// values, so the block's absmax is an exact, order-free unsigned max (which vectorizes), and
/// a NaN makes the block non-finite.
MC_HD uint32_t q8_abs_bits(float v) {
  const uint32_t u = mc_float_bits(v) & 0x7fffffffu;
  return u > 0x7f800000u ? 0x7f800000u : u;
}

/// A block's scale from the max of its q8_abs_bits: absmax / 127, NaN if absmax is inf.
MC_HD float q8_scale(uint32_t absmax_bits) {
  return absmax_bits < 0x7f800000u ? mc_div(mc_bits_float(absmax_bits), kQMax)
                                   : mc_bits_float(0x7fc00000u);
}

/// v / scale as a code, for a scale > 0: rounded to the nearest integer, ties to even, then
/// clamped to [-127, 127] (the same as clamping first: the bounds are integers). |x| <= 190.5
/// for every scale q8_scale gives (a subnormal scale may sit below absmax / 127), so the
/// rounding by x + 1.5 * 2^23 - 1.5 * 2^23 is exact (it is for |x| <= 2^22), and the clamp is
/// an integer min/max, which a CPU loop vectorizes.
MC_HD int8_t q8_round(float x) {
  const int r = static_cast<int>(mc_add(mc_add(x, 12582912.f), -12582912.f));
  const int lo = r < -127 ? -127 : r;
  return static_cast<int8_t>(lo > 127 ? 127 : lo);
}

/// An fp32 buffer value's code for its block's q8_scale: q8_round(v / scale) (the division
/// correctly rounded), 0 where scale is 0 or NaN.
MC_HD int8_t q8_code(float v, float scale) {
  return scale > 0.f ? q8_round(mc_div(v, scale)) : int8_t(0);  // false for NaN
}

}  // namespace momentum_cuda
