// fp16_master_kernel.cuh — the CUDA kernel of the fp16 master-weights step: fp16 parameters
// with a separate fp32 master (csrc/include/momentum_cuda/fp16_master.h).
//
// Inputs    : Fp16MasterSpans (cpu/momentum_cpu.h) checked by csrc/momentum_ops.cpp: fp16 param
//             (written, never read), fp32 master (updated), fp32 buf (updated; null without
//             kMomentum), fp16 grad (read); one numel each, all in memory order, no overlaps.
// Invariant : every element goes through fp16_master_elem exactly once: torch's fp32 step on
//             the master with the gradient widened, scalars rounded once to fp32 on the host
//             (CUDA keeps fp32 alphas); the parameter is the new master rounded to nearest even.
// Work      : a thread takes groups of 8 elements, one 16-byte access per 16 bytes (param,
//             grad: one each; master, buffer: two each) where param, master, grad and buffer
//             are 16-byte aligned, element by element otherwise and for a span's last partial
//             group.
// Launch    : sgd_kernel.cuh's multi-tensor batching (plan_chunks), one block of kThreads per
//             chunk of kChunk elements.
// Host      : compiled by g++ through tests/cuda/host_shim.h as well (tests/cuda/
//             host_qmom_test.cpp, run by tests/test_cuda_host.py).
#pragma once

#include <cstdint>

#include "momentum_cuda/fp16_master.h"
#include "sgd_kernel.cuh"

namespace momentum_cuda {
namespace cuda {

/// Multi-tensor metadata of the fp16 master-weights step, passed by value (ListArgs' layout).
template <int kTensors, int kBlocks>
struct Fp16MasterListArgs {
  uint16_t* param[kTensors];
  float* master[kTensors];
  float* buf[kTensors];
  const uint16_t* grad[kTensors];
  int64_t numel[kTensors];
  uint16_t block_tensor[kBlocks];
  int32_t block_chunk[kBlocks];
  StepScalars<float> s;
  uint32_t flags;
};
static_assert(sizeof(Fp16MasterListArgs<ListLimits4K::kTensors, ListLimits4K::kBlocks>) <= 4096,
              "kernel arguments over 4 KB");
static_assert(sizeof(Fp16MasterListArgs<ListLimits32K::kTensors, ListLimits32K::kBlocks>) <=
                  32764,
              "kernel arguments over 32 KB");

/// Elements [0, n) of one fp16 master-weights chunk, by `nthreads` workers of which this is
/// `tid` (p, m, b, g point at the chunk; b null without kMomentum). A group of 8 fp16 values
/// travels as one Bf16x8 (8 x 16 bits, whatever their format).
MC_HD void fp16_master_span(uint16_t* p, float* m, float* b, const uint16_t* g, int64_t n,
                            const StepScalars<float>& s, uint32_t flags, int64_t tid,
                            int64_t nthreads) {
  const bool vec = aligned16(p) && aligned16(m) && aligned16(g) && (b == nullptr || aligned16(b));
  const bool read_buf = (flags & kMomentum) && !(flags & kFirstStep);
  const int64_t full = n / 8, groups = full + (n % 8 != 0);
  for (int64_t k = tid; k < groups; k += nthreads) {
    const int64_t i = 8 * k;
    if (vec && k < full) {
      Bf16x8 pp{};  // written whole, never read: the master is the value
      F32x8 mm = *reinterpret_cast<const F32x8*>(m + i);
      const Bf16x8 gg = *reinterpret_cast<const Bf16x8*>(g + i);
      F32x8 bb{};
      if (read_buf) bb = *reinterpret_cast<const F32x8*>(b + i);
#pragma unroll
      for (int j = 0; j < 8; ++j) fp16_master_elem<AddFma>(pp.v, mm.v, bb.v, gg.v, j, s, flags);
      *reinterpret_cast<Bf16x8*>(p + i) = pp;
      *reinterpret_cast<F32x8*>(m + i) = mm;
      if (flags & kMomentum) *reinterpret_cast<F32x8*>(b + i) = bb;
    } else {
      const int r = static_cast<int>(n - i < 8 ? n - i : 8);
      for (int j = 0; j < r; ++j) {
        fp16_master_elem<AddFma>(p + i, m + i, b == nullptr ? nullptr : b + i, g + i, j, s,
                                 flags);
      }
    }
  }
}

/// fp16 master-weights kernel: block k updates chunk block_chunk[k] of span block_tensor[k].
template <int kTensors, int kBlocks>
__global__ void sgd_fp16_master_kernel(Fp16MasterListArgs<kTensors, kBlocks> a) {
  const int t = a.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(a.block_chunk[blockIdx.x]) * kChunk;
  const int64_t left = a.numel[t] - start;
  const int64_t n = left < kChunk ? left : kChunk;
  float* b = a.buf[t] == nullptr ? nullptr : a.buf[t] + start;
  fp16_master_span(a.param[t] + start, a.master[t] + start, b, a.grad[t] + start, n, a.s,
                   a.flags, static_cast<int64_t>(threadIdx.x), static_cast<int64_t>(blockDim.x));
}

/// Packs fp16 master-weights spans into Fp16MasterListArgs and calls launch(args, blocks) for
/// each full batch. bufs are dropped without kMomentum.
template <class Limits, class Launch>
void plan_fp16_master_list(const Fp16MasterSpan* spans, int64_t n_spans,
                           const StepScalars<float>& s, uint32_t flags, Launch&& launch) {
  using Args = Fp16MasterListArgs<Limits::kTensors, Limits::kBlocks>;
  Args a{};
  a.s = s;
  a.flags = flags;
  plan_chunks<Limits>(
      a, n_spans, [&](int64_t k) { return spans[k].numel; },
      [&](Args& x, int slot, int64_t k) {
        x.param[slot] = spans[k].param;
        x.master[slot] = spans[k].master;
        x.buf[slot] = (flags & kMomentum) ? spans[k].buf : nullptr;
        x.grad[slot] = spans[k].grad;
        x.numel[slot] = spans[k].numel;
      },
      launch);
}

}  // namespace cuda
}  // namespace momentum_cuda
