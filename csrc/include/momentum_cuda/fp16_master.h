// fp16_master.h — master weights for fp16 parameters: a separate fp32 copy, written once for
// the CPU loop and the CUDA kernel (the Triton kernel and momentum_cuda/reference.py write the
// same arithmetic).
//
// Inputs : an fp16 parameter, its fp16 gradient, its fp32 master and fp32 momentum buffer.
// Step   : torch.optim.SGD's fp32 step (sgd_math, fp32 alphas) on the master with the gradient
//          widened exactly; the parameter is the new master rounded to nearest even (c10's
//          conversion: mc_float_to_fp16_bits, subnormals and overflow to inf included).
// Why not split as bf16 (bf16_split.h): an fp16 value covers a range of fp32 masters that
//          depends on its exponent (and fp32 masters beyond fp16's range round to inf), so no
//          fixed-width remainder makes it exact; the master is kept whole (4 + 2 bytes of
//          weights per parameter).
#pragma once

#include <cstdint>

#include "momentum_cuda/sgd_math.h"

namespace momentum_cuda {

/// Element j of an fp16 master-weights step: m[j] (fp32) stepped by sgd_math with g[j] (fp16
/// bits) widened, p[j] (fp16 bits) written as its rounding; b[j] (fp32) read unless the step
/// has no kMomentum or is the first, written with kMomentum (b is not touched otherwise and may
/// be null). p[j] is not read: the master is the value.
template <class Add>
MC_HD void fp16_master_elem(uint16_t* p, float* m, float* b, const uint16_t* g, int j,
                            const StepScalars<float>& s, uint32_t flags) {
  const bool read_buf = (flags & kMomentum) && !(flags & kFirstStep);
  float mj = m[j];
  float bj = read_buf ? b[j] : 0.f;
  sgd_math(mj, bj, mc_fp16_bits_to_float(g[j]), s, flags, RoundNone{}, Add{});
  m[j] = mj;
  p[j] = mc_float_to_fp16_bits(mj);
  if (flags & kMomentum) b[j] = bj;
}

}  // namespace momentum_cuda
