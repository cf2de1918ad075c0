// master_kernel.cuh — the CUDA kernel of the master-weights step: bf16 parameters with exact
// fp32 masters (csrc/include/momentum_cuda/bf16_split.h).
//
// Inputs    : MasterSpans (cpu/momentum_cpu.h) checked by csrc/momentum_ops.cpp: bf16 param and
//             int16 remainder (updated), fp32 buf (updated; null without kMomentum), bf16 grad
//             (read), the tie bits packed 8 to a byte (updated); one numel each, all in memory
//             order, no overlaps.
// Invariant : every element goes through master_math (bf16_split.h) exactly once: torch's fp32
//             step on its joined master, with scalars rounded once to fp32 on the host (CUDA
//             keeps fp32 alphas), then the split.
// Work      : elementwise_kernel.cuh's groups of 8 with MasterMode below: a thread owns whole
//             tie bytes (a group is 8 elements), so no two threads write one byte; 16-byte
//             accesses (param, grad, remainder: one each; buffer: two) where all four spans are
//             16-byte aligned.
// Launch    : sgd_elementwise_kernel<MasterMode> over plan_elementwise's batches: one block per
//             chunk of kChunk elements, a multiple of 8, so a chunk starts at a tie byte.
// Host      : compiled by g++ through tests/cuda/host_shim.h as well (tests/test_cuda_host.py).
#pragma once

#include <cstdint>

#include "elementwise_kernel.cuh"
#include "momentum_cuda/bf16_split.h"

namespace momentum_cuda {
namespace cuda {

/// Multi-tensor metadata of the master step: bf16 param and grad, fp32 buf, the remainders and
/// tie bytes.
template <int kTensors, int kBlocks>
struct MasterListArgs : ElementwiseArgs<uint16_t, float, uint16_t, kTensors, kBlocks> {
  uint16_t* rem[kTensors];
  uint8_t* ties[kTensors];
};
static_assert(args_fit<MasterListArgs>(), "kernel arguments over 4 KB or 32 KB");

/// The master-weights mode of elementwise_kernel.cuh: one chunk's arrays and tie bytes; ties[k]
/// holds the bits of the chunk's elements 8k .. 8k + 7, so the thread of group k owns byte k.
struct MasterMode {
  using Span = MasterSpan;
  template <int kTensors, int kBlocks>
  using Args = MasterListArgs<kTensors, kBlocks>;

  Array<Use::kReadWrite, uint16_t> param;
  Array<Use::kBuffer, float> buf;
  Array<Use::kRead, const uint16_t> grad;
  Array<Use::kReadWrite, uint16_t> rem;
  uint8_t* ties;

  template <class A>
  MC_HD static MasterMode chunk(const A& a, int t, int64_t start) {
    return {{a.param[t] + start}, {advance(a.buf[t], start)}, {a.grad[t] + start},
            {a.rem[t] + start}, a.ties[t] + start / 8};
  }
  template <class F>
  MC_HD void arrays(F&& f) const {
    f(param, buf, grad, rem);
  }
  MC_HD void step(int64_t k, int n, const StepScalars<float>& s, uint32_t flags, uint16_t* p,
                  float* b, const uint16_t* g, uint16_t* r) const {
    ties[k] = master_math<AddFma>(p, b, g, r, ties[k], n, s, flags);
  }
  template <class A>
  static void fill(A& x, int slot, const MasterSpan* spans, int64_t k) {
    x.rem[slot] = spans[k].rem;
    x.ties[slot] = spans[k].ties;
  }
};

}  // namespace cuda
}  // namespace momentum_cuda
