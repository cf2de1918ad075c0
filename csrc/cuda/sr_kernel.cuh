// sr_kernel.cuh — the CUDA kernel of the stochastic-rounding step: bf16 parameters, gradients
// and momentum buffers (csrc/include/momentum_cuda/stochastic.h).
//
// Inputs    : SrSpans (cpu/momentum_cpu.h) checked by csrc/momentum_ops.cpp: bf16 param and
//             buf (updated; buf null without kMomentum), bf16 grad (read), a 32-bit key each;
//             one numel each, all in memory order, no overlaps.
// Invariant : every element goes through sr_math (stochastic.h) exactly once, with the random
//             bits of its index in its whole tensor (the span's offset plus its index in the
//             span; a chunk passes its start), scalars rounded once to fp32 on the host.
// Work      : elementwise_kernel.cuh's groups of 8 (param and buf read and written, grad read:
//             one 16-byte access each), with SrMode below.
// Launch    : sgd_elementwise_kernel<SrMode> over plan_elementwise's batches, one block per chunk.
// Host      : compiled by g++ through tests/cuda/host_shim.h as well (tests/test_cuda_host.py).
#pragma once

#include <cstdint>

#include "elementwise_kernel.cuh"
#include "momentum_cuda/stochastic.h"

namespace momentum_cuda {
namespace cuda {

/// Multi-tensor metadata of the stochastic-rounding step: bf16 param, buf and grad, a key each.
template <int kTensors, int kBlocks>
struct SrListArgs : ElementwiseArgs<uint16_t, uint16_t, uint16_t, kTensors, kBlocks> {
  int64_t offset[kTensors];  ///< SrSpan::offset
  uint32_t key[kTensors];
};
static_assert(args_fit<SrListArgs>(), "kernel arguments over 4 KB or 32 KB");

/// The stochastic-rounding mode of elementwise_kernel.cuh: one chunk's arrays, its first
/// element's index in its span and the span's key.
struct SrMode {
  using Span = SrSpan;
  template <int kTensors, int kBlocks>
  using Args = SrListArgs<kTensors, kBlocks>;

  Array<Use::kReadWrite, uint16_t> param;
  Array<Use::kBuffer, uint16_t> buf;
  Array<Use::kRead, const uint16_t> grad;
  int64_t start;  ///< the random bits of element j of the chunk are those of index start + j
  uint32_t key;

  template <class A>
  MC_HD static SrMode chunk(const A& a, int t, int64_t start) {
    return {{a.param[t] + start}, {advance(a.buf[t], start)}, {a.grad[t] + start},
            a.offset[t] + start, a.key[t]};
  }
  template <class F>
  MC_HD void arrays(F&& f) const {
    f(param, buf, grad);
  }
  MC_HD void step(int64_t k, int n, const StepScalars<float>& s, uint32_t flags, uint16_t* p,
                  uint16_t* b, const uint16_t* g) const {
    sr_math<AddFma>(p, b, g, start + 8 * k, n, key, s, flags);
  }
  template <class A>
  static void fill(A& x, int slot, const SrSpan* spans, int64_t k) {
    x.offset[slot] = spans[k].offset;
    x.key[slot] = spans[k].key;
  }
};

}  // namespace cuda
}  // namespace momentum_cuda
