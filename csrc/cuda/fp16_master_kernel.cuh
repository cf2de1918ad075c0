// fp16_master_kernel.cuh — the CUDA kernel of the fp16 master-weights step: fp16 parameters
// with a separate fp32 master (csrc/include/momentum_cuda/fp16_master.h).
//
// Inputs    : Fp16MasterSpans (cpu/momentum_cpu.h) checked by csrc/momentum_ops.cpp: fp16 param
//             (written, never read), fp32 master (updated), fp32 buf (updated; null without
//             kMomentum), fp16 grad (read); one numel each, all in memory order, no overlaps.
// Invariant : every element goes through fp16_master_elem exactly once: torch's fp32 step on
//             the master with the gradient widened, scalars rounded once to fp32 on the host
//             (CUDA keeps fp32 alphas); the parameter is the new master rounded to nearest even.
// Work      : elementwise_kernel.cuh's groups of 8 with Fp16MasterMode below: one 16-byte
//             access per 16 bytes (param: one store, grad: one load; master, buffer: two each
//             way) where all four arrays are 16-byte aligned.
// Launch    : sgd_elementwise_kernel<Fp16MasterMode> over plan_elementwise's batches, one block
//             of kThreads per chunk of kChunk elements.
// Host      : compiled by g++ through tests/cuda/host_shim.h as well (tests/cuda/
//             host_qmom_test.cpp, run by tests/test_cuda_host.py).
#pragma once

#include <cstdint>

#include "elementwise_kernel.cuh"
#include "momentum_cuda/fp16_master.h"

namespace momentum_cuda {
namespace cuda {

/// Multi-tensor metadata of the fp16 master-weights step: fp16 param and grad, fp32 buf and
/// masters.
template <int kTensors, int kBlocks>
struct Fp16MasterListArgs : ElementwiseArgs<uint16_t, float, uint16_t, kTensors, kBlocks> {
  float* master[kTensors];
};
static_assert(args_fit<Fp16MasterListArgs>(), "kernel arguments over 4 KB or 32 KB");

/// The fp16 master-weights mode of elementwise_kernel.cuh: one chunk's arrays. A group of 8 fp16
/// values travels as one Bf16x8 (8 x 16 bits, whatever their format).
struct Fp16MasterMode {
  using Span = Fp16MasterSpan;
  template <int kTensors, int kBlocks>
  using Args = Fp16MasterListArgs<kTensors, kBlocks>;

  Array<Use::kWrite, uint16_t> param;  // the master is the value
  Array<Use::kReadWrite, float> master;
  Array<Use::kBuffer, float> buf;
  Array<Use::kRead, const uint16_t> grad;

  template <class A>
  MC_HD static Fp16MasterMode chunk(const A& a, int t, int64_t start) {
    return {{a.param[t] + start}, {a.master[t] + start}, {advance(a.buf[t], start)},
            {a.grad[t] + start}};
  }
  template <class F>
  MC_HD void arrays(F&& f) const {
    f(param, master, buf, grad);
  }
  MC_HD void step(int64_t, int n, const StepScalars<float>& s, uint32_t flags, uint16_t* p,
                  float* m, float* b, const uint16_t* g) const {
#pragma unroll
    for (int j = 0; j < n; ++j) fp16_master_elem<AddFma>(p, m, b, g, j, s, flags);
  }
  template <class A>
  static void fill(A& x, int slot, const Fp16MasterSpan* spans, int64_t k) {
    x.master[slot] = spans[k].master;
  }
};

}  // namespace cuda
}  // namespace momentum_cuda
