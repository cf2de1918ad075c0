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
// Work      : a thread owns whole tie bytes (8 elements), so no two threads write one byte. A
//             group is read with 16-byte accesses (param, grad, remainder: one each; buffer:
//             two) where all four spans are 16-byte aligned, element by element otherwise and
//             for a span's last partial group.
// Launch    : sgd_kernel.cuh's multi-tensor batching (plan_chunks): one block per chunk of
//             kChunk elements, a multiple of 8, so a chunk starts at a tie byte.
// Host      : compiled by g++ through tests/cuda/host_shim.h as well (tests/test_cuda_host.py).
#pragma once

#include <cstdint>

#include "momentum_cuda/bf16_split.h"
#include "sgd_kernel.cuh"

namespace momentum_cuda {
namespace cuda {

static_assert(kChunk % 8 == 0, "a chunk must start at a tie byte");

/// Multi-tensor metadata of the master step, passed by value (ListArgs' layout).
template <int kTensors, int kBlocks>
struct MasterListArgs {
  uint16_t* param[kTensors];
  float* buf[kTensors];
  const uint16_t* grad[kTensors];
  uint16_t* rem[kTensors];
  uint8_t* ties[kTensors];
  int64_t numel[kTensors];
  uint16_t block_tensor[kBlocks];
  int32_t block_chunk[kBlocks];
  StepScalars<float> s;
  uint32_t flags;
};
static_assert(sizeof(MasterListArgs<ListLimits4K::kTensors, ListLimits4K::kBlocks>) <= 4096,
              "kernel arguments over 4 KB");
static_assert(sizeof(MasterListArgs<ListLimits32K::kTensors, ListLimits32K::kBlocks>) <= 32764,
              "kernel arguments over 32 KB");

/// The tie-byte groups of elements [0, n) of one span, by `nthreads` workers of which this is
/// `tid`; ties[k] holds the bits of elements 8k .. 8k + 7.
MC_HD void master_span(uint16_t* p, float* b, const uint16_t* g, uint16_t* r, uint8_t* ties,
                       int64_t n, const StepScalars<float>& s, uint32_t flags, int64_t tid,
                       int64_t nthreads) {
  const bool vec = aligned16(p) && aligned16(g) && aligned16(r) && (b == nullptr || aligned16(b));
  const bool read_buf = (flags & kMomentum) && !(flags & kFirstStep);
  const int64_t full = n / 8, groups = full + (n % 8 != 0);
  for (int64_t k = tid; k < groups; k += nthreads) {
    const int64_t i = 8 * k;
    if (vec && k < full) {
      Bf16x8 pp = *reinterpret_cast<const Bf16x8*>(p + i);
      const Bf16x8 gg = *reinterpret_cast<const Bf16x8*>(g + i);
      Bf16x8 rr = *reinterpret_cast<const Bf16x8*>(r + i);
      F32x8 bb{};
      if (read_buf) bb = *reinterpret_cast<const F32x8*>(b + i);
      ties[k] = master_math<AddFma>(pp.v, bb.v, gg.v, rr.v, ties[k], 8, s, flags);
      *reinterpret_cast<Bf16x8*>(p + i) = pp;
      *reinterpret_cast<Bf16x8*>(r + i) = rr;
      if (flags & kMomentum) *reinterpret_cast<F32x8*>(b + i) = bb;
    } else {
      const int m = static_cast<int>(n - i < 8 ? n - i : 8);
      ties[k] = master_math<AddFma>(p + i, b == nullptr ? nullptr : b + i, g + i, r + i, ties[k],
                                    m, s, flags);
    }
  }
}

/// Master kernel: block k updates chunk block_chunk[k] of span block_tensor[k].
template <int kTensors, int kBlocks>
__global__ void sgd_master_kernel(MasterListArgs<kTensors, kBlocks> a) {
  const int t = a.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(a.block_chunk[blockIdx.x]) * kChunk;
  const int64_t left = a.numel[t] - start;
  const int64_t n = left < kChunk ? left : kChunk;
  float* b = a.buf[t] == nullptr ? nullptr : a.buf[t] + start;
  master_span(a.param[t] + start, b, a.grad[t] + start, a.rem[t] + start, a.ties[t] + start / 8,
              n, a.s, a.flags, static_cast<int64_t>(threadIdx.x),
              static_cast<int64_t>(blockDim.x));
}

/// Packs master spans into MasterListArgs and calls launch(args, blocks) for each full batch.
/// bufs are dropped without kMomentum.
template <class Limits, class Launch>
void plan_master_list(const MasterSpan* spans, int64_t n_spans, const StepScalars<float>& s,
                      uint32_t flags, Launch&& launch) {
  using Args = MasterListArgs<Limits::kTensors, Limits::kBlocks>;
  Args a{};
  a.s = s;
  a.flags = flags;
  plan_chunks<Limits>(
      a, n_spans, [&](int64_t k) { return spans[k].numel; },
      [&](Args& x, int slot, int64_t k) {
        x.param[slot] = spans[k].param;
        x.buf[slot] = (flags & kMomentum) ? spans[k].buf : nullptr;
        x.grad[slot] = spans[k].grad;
        x.rem[slot] = spans[k].rem;
        x.ties[slot] = spans[k].ties;
        x.numel[slot] = spans[k].numel;
      },
      launch);
}

}  // namespace cuda
}  // namespace momentum_cuda
