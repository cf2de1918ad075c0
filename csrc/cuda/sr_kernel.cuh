// sr_kernel.cuh — the CUDA kernel of the stochastic-rounding step: bf16 parameters, gradients
// and momentum buffers (csrc/include/momentum_cuda/stochastic.h).
//
// Inputs    : SrSpans (cpu/momentum_cpu.h) checked by csrc/momentum_ops.cpp: bf16 param and
//             buf (updated; buf null without kMomentum), bf16 grad (read), a 32-bit key each;
//             one numel each, all in memory order, no overlaps.
// Invariant : every element goes through sr_math (stochastic.h) exactly once, with the random
//             bits of its index in its span (a chunk passes its start), scalars rounded once to
//             fp32 on the host.
// Work      : a thread takes groups of 8 elements: one 16-byte access per array where all
//             three are 16-byte aligned, element by element otherwise and for a span's last
//             partial group.
// Launch    : sgd_kernel.cuh's multi-tensor batching (plan_chunks), one block per chunk.
// Host      : compiled by g++ through tests/cuda/host_shim.h as well (tests/test_cuda_host.py).
#pragma once

#include <cstdint>

#include "momentum_cuda/stochastic.h"
#include "sgd_kernel.cuh"

namespace momentum_cuda {
namespace cuda {

/// Multi-tensor metadata of the stochastic-rounding step, passed by value (ListArgs' layout).
template <int kTensors, int kBlocks>
struct SrListArgs {
  uint16_t* param[kTensors];
  uint16_t* buf[kTensors];
  const uint16_t* grad[kTensors];
  uint32_t key[kTensors];
  int64_t numel[kTensors];
  uint16_t block_tensor[kBlocks];
  int32_t block_chunk[kBlocks];
  StepScalars<float> s;
  uint32_t flags;
};
static_assert(sizeof(SrListArgs<ListLimits4K::kTensors, ListLimits4K::kBlocks>) <= 4096,
              "kernel arguments over 4 KB");
static_assert(sizeof(SrListArgs<ListLimits32K::kTensors, ListLimits32K::kBlocks>) <= 32764,
              "kernel arguments over 32 KB");

/// Elements [0, n) of one chunk starting at element `start` of its span, by `nthreads` workers
/// of which this is `tid` (p, b, g point at the chunk).
MC_HD void sr_span(uint16_t* p, uint16_t* b, const uint16_t* g, int64_t start, int64_t n,
                   uint32_t key, const StepScalars<float>& s, uint32_t flags, int64_t tid,
                   int64_t nthreads) {
  const bool vec = aligned16(p) && aligned16(g) && (b == nullptr || aligned16(b));
  const bool read_buf = (flags & kMomentum) && !(flags & kFirstStep);
  const int64_t full = n / 8, groups = full + (n % 8 != 0);
  for (int64_t k = tid; k < groups; k += nthreads) {
    const int64_t i = 8 * k;
    if (vec && k < full) {
      Bf16x8 pp = *reinterpret_cast<const Bf16x8*>(p + i);
      const Bf16x8 gg = *reinterpret_cast<const Bf16x8*>(g + i);
      Bf16x8 bb{};
      if (read_buf) bb = *reinterpret_cast<const Bf16x8*>(b + i);
      sr_math<AddFma>(pp.v, bb.v, gg.v, start + i, 8, key, s, flags);
      *reinterpret_cast<Bf16x8*>(p + i) = pp;
      if (flags & kMomentum) *reinterpret_cast<Bf16x8*>(b + i) = bb;
    } else {
      const int m = static_cast<int>(n - i < 8 ? n - i : 8);
      sr_math<AddFma>(p + i, b == nullptr ? nullptr : b + i, g + i, start + i, m, key, s, flags);
    }
  }
}

/// Stochastic-rounding kernel: block k updates chunk block_chunk[k] of span block_tensor[k].
template <int kTensors, int kBlocks>
__global__ void sgd_sr_kernel(SrListArgs<kTensors, kBlocks> a) {
  const int t = a.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(a.block_chunk[blockIdx.x]) * kChunk;
  const int64_t left = a.numel[t] - start;
  const int64_t n = left < kChunk ? left : kChunk;
  uint16_t* b = a.buf[t] == nullptr ? nullptr : a.buf[t] + start;
  sr_span(a.param[t] + start, b, a.grad[t] + start, start, n, a.key[t], a.s, a.flags,
          static_cast<int64_t>(threadIdx.x), static_cast<int64_t>(blockDim.x));
}

/// Packs stochastic-rounding spans into SrListArgs and calls launch(args, blocks) for each
/// full batch. bufs are dropped without kMomentum.
template <class Limits, class Launch>
void plan_sr_list(const SrSpan* spans, int64_t n_spans, const StepScalars<float>& s,
                  uint32_t flags, Launch&& launch) {
  using Args = SrListArgs<Limits::kTensors, Limits::kBlocks>;
  Args a{};
  a.s = s;
  a.flags = flags;
  plan_chunks<Limits>(
      a, n_spans, [&](int64_t k) { return spans[k].numel; },
      [&](Args& x, int slot, int64_t k) {
        x.param[slot] = spans[k].param;
        x.buf[slot] = (flags & kMomentum) ? spans[k].buf : nullptr;
        x.grad[slot] = spans[k].grad;
        x.key[slot] = spans[k].key;
        x.numel[slot] = spans[k].numel;
      },
      launch);
}

}  // namespace cuda
}  // namespace momentum_cuda
