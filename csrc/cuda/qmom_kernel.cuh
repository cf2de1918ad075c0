// qmom_kernel.cuh — the CUDA kernels of momentum_dtype: fp32 parameters and gradients whose
// momentum buffer is stored bf16, or int8 with one fp32 scale per block
// (csrc/include/momentum_cuda/momentum_dtype.h).
//
// Inputs    : Bf16MomSpans and Q8Spans (cpu/momentum_cpu.h) checked by csrc/momentum_ops.cpp:
//             fp32 param (updated) and grad (read); the buffer (updated; null without kMomentum):
//             bf16 bits, or int8 codes plus one fp32 scale per kQBlock elements counted from
//             the span's element 0 (the last block partial); one numel each, all in memory order,
//             no overlaps.
// Invariant : every element goes through bf16mom_elem / q8_elem exactly once, with scalars
//             rounded once to fp32 on the host. An int8 block is quantized once all of its new
//             buffer values are known: its absmax is the unsigned max of their q8_abs_bits
//             (exact, so the reduction order does not matter), then q8_scale and q8_code. The
//             first step reads no codes and no scales; without kMomentum nothing of the buffer
//             is touched.
//             found_inf (GradScaler's, null: none) != 0 skips the step (amp_skips): nothing is
//             read or written.
// Work      : bf16: elementwise_kernel.cuh's groups of 8 with Bf16MomMode below (param: two
//             16-byte accesses each way, grad two loads, the buffer one each way). int8: a warp
//             takes a whole block, lane l its elements 8l .. 8l + 7 (param, grad: two 16-byte
//             accesses each; codes: one 8-byte access, where aligned), reduces the absmax by a
//             butterfly of shuffles (every lane gets it) and codes its own 8 elements; lane 0
//             writes the scale.
// Launch    : sgd_kernel.cuh's multi-tensor batching (plan_chunks; bf16: sgd_elementwise_kernel
//             over plan_elementwise's batches), one block of kThreads per chunk; an int8 chunk
//             is whole blocks (kQChunk), so no block straddles two chunks.
// Host      : compiled by g++ through tests/cuda/host_shim.h as well, the int8 kernel under its
//             warp runner (tests/test_cuda_host.py).
#pragma once

#include <cstdint>

#include "elementwise_kernel.cuh"
#include "momentum_cuda/momentum_dtype.h"

namespace momentum_cuda {
namespace cuda {

/// Multi-tensor metadata of the bf16-momentum step: fp32 param and grad, bf16 buf.
template <int kTensors, int kBlocks>
using Bf16MomListArgs = ElementwiseArgs<float, uint16_t, float, kTensors, kBlocks>;
static_assert(args_fit<Bf16MomListArgs>(), "kernel arguments over 4 KB or 32 KB");

/// Multi-tensor metadata of the int8-momentum step, passed by value (ListArgs' layout).
template <int kTensors, int kBlocks>
struct Q8ListArgs {
  float* param[kTensors];
  int8_t* codes[kTensors];
  const float* grad[kTensors];
  float* scales[kTensors];
  int64_t numel[kTensors];
  uint16_t block_tensor[kBlocks];
  int32_t block_chunk[kBlocks];
  StepScalars<float> s;
  uint32_t flags;
  const float* found_inf;  ///< GradScaler's; != 0 skips the step (null: never)
  HyperPtrs dev;           ///< hyper-parameters in device memory (read by device_step)
};
static_assert(args_fit<Q8ListArgs>(), "kernel arguments over 4 KB or 32 KB");

/// The bf16-momentum mode of elementwise_kernel.cuh: one chunk's arrays.
struct Bf16MomMode {
  using Span = Bf16MomSpan;
  template <int kTensors, int kBlocks>
  using Args = Bf16MomListArgs<kTensors, kBlocks>;

  Array<Use::kReadWrite, float> param;
  Array<Use::kBuffer, uint16_t> buf;
  Array<Use::kRead, const float> grad;

  template <class A>
  MC_HD static Bf16MomMode chunk(const A& a, int t, int64_t start) {
    return {{a.param[t] + start}, {advance(a.buf[t], start)}, {a.grad[t] + start}};
  }
  template <class F>
  MC_HD void arrays(F&& f) const {
    f(param, buf, grad);
  }
  MC_HD void step(int64_t, int n, const StepScalars<float>& s, uint32_t flags, float* p,
                  uint16_t* b, const float* g) const {
#pragma unroll
    for (int j = 0; j < n; ++j) bf16mom_elem<AddFma>(p, b, g, j, s, flags);
  }
  template <class A>
  static void fill(A&, int, const Bf16MomSpan*, int64_t) {}  // nothing beyond the common four
};

constexpr int kWarp = 32;
/// Elements of an int8 block per lane: one F32x8 of param and grad, one Q8x8 of codes.
constexpr int kQLane = kQBlock / kWarp;
static_assert(kQLane == 8, "a lane's share of a block is one group of 8");
static_assert(kThreads % kWarp == 0, "the int8 kernel runs whole warps");
/// Elements per chunk (one block of threads) of the int8 kernel.
constexpr int64_t kQChunk = kChunk;
static_assert(kQChunk % kQBlock == 0, "an int8 chunk must be whole blocks");

/// 8 int8 codes, as one 8-byte access brings them.
struct alignas(8) Q8x8 {
  int8_t v[8];
};

MC_HD bool aligned8(const void* p) { return reinterpret_cast<uintptr_t>(p) % 8 == 0; }

/// The max of `a` over the 32 lanes of the warp, in every lane; all 32 lanes call it together.
__device__ __forceinline__ uint32_t warp_max(uint32_t a) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) {
    const uint32_t b = __shfl_xor_sync(0xffffffffu, a, o);
    a = b > a ? b : a;
  }
  return a;
}

/// One int8 block of n <= kQBlock elements (p, q, g at its first element; `scale` its scale;
/// q and scale null without kMomentum) by the 32 lanes of a warp, which all call it; `lane`
/// owns elements kQLane * lane .. + kQLane - 1. vec: p and g are 16-byte and q 8-byte aligned.
__device__ __forceinline__ void q8_block_warp(float* p, int8_t* q, float* scale, const float* g,
                                              int n, bool vec, const StepScalars<float>& s,
                                              uint32_t flags, int lane) {
  const bool read_buf = (flags & kMomentum) && !(flags & kFirstStep);
  const float sc = read_buf ? *scale : 0.f;
  const int i = kQLane * lane;
  const int m = n - i < 0 ? 0 : (n - i < kQLane ? n - i : kQLane);  // this lane's elements
  const bool lane_vec = vec && m == kQLane;
  float v[kQLane];
  Q8x8 qq{};
  if (lane_vec) {
    F32x8 pp = *reinterpret_cast<const F32x8*>(p + i);
    const F32x8 gg = *reinterpret_cast<const F32x8*>(g + i);
    if (read_buf) qq = *reinterpret_cast<const Q8x8*>(q + i);
#pragma unroll
    for (int j = 0; j < kQLane; ++j) v[j] = q8_elem<AddFma>(pp.v, qq.v, sc, gg.v, j, s, flags);
    *reinterpret_cast<F32x8*>(p + i) = pp;
  } else {
#pragma unroll
    for (int j = 0; j < kQLane; ++j) {
      // 0 beyond the block: q8_abs_bits(0) leaves the max alone
      v[j] = j < m ? q8_elem<AddFma>(p + i, q == nullptr ? nullptr : q + i, sc, g + i, j, s, flags)
                   : 0.f;
    }
  }
  if (!(flags & kMomentum)) return;  // the same in every lane
  uint32_t a = 0;
#pragma unroll
  for (int j = 0; j < kQLane; ++j) {
    const uint32_t x = q8_abs_bits(v[j]);
    a = x > a ? x : a;
  }
  const float ns = q8_scale(warp_max(a));
#pragma unroll
  for (int j = 0; j < kQLane; ++j) qq.v[j] = q8_code(v[j], ns);
  if (lane_vec) {
    *reinterpret_cast<Q8x8*>(q + i) = qq;
  } else {
#pragma unroll
    for (int j = 0; j < kQLane; ++j) {
      if (j < m) q[i + j] = qq.v[j];  // unrolled: qq stays in registers
    }
  }
  if (lane == 0) *scale = ns;  // every lane has read the old one before warp_max
}

/// int8-momentum kernel: block k updates chunk block_chunk[k] (kQChunk elements) of span
/// block_tensor[k], its warps taking the chunk's int8 blocks in turn.
template <int kTensors, int kBlocks>
__global__ void sgd_q8_kernel(Q8ListArgs<kTensors, kBlocks> a) {
  if (amp_skips(a.found_inf)) return;
  const int t = a.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(a.block_chunk[blockIdx.x]) * kQChunk;
  const int64_t left = a.numel[t] - start;
  const int64_t n = left < kQChunk ? left : kQChunk;
  float* p = a.param[t] + start;
  const float* g = a.grad[t] + start;
  int8_t* q = a.codes[t] == nullptr ? nullptr : a.codes[t] + start;
  float* sc = a.scales[t] == nullptr ? nullptr : a.scales[t] + start / kQBlock;
  const bool vec = aligned16(p) && aligned16(g) && (q == nullptr || aligned8(q));
  const int lane = static_cast<int>(threadIdx.x % kWarp);
  // the same in every lane: a zero momentum read here leaves codes and scales alone
  const DeviceStep<float> d = device_step<float>(a.s, a.flags, a.dev);
  const int64_t warp = threadIdx.x / kWarp, warps = blockDim.x / kWarp;
  const int64_t blocks = (n + kQBlock - 1) / kQBlock;
  for (int64_t k = warp; k < blocks; k += warps) {  // the same trip count in every lane
    const int64_t i = k * kQBlock;
    const int m = static_cast<int>(n - i < kQBlock ? n - i : kQBlock);
    q8_block_warp(p + i, q == nullptr ? nullptr : q + i, sc == nullptr ? nullptr : sc + k, g + i,
                  m, vec, d.s, d.flags, lane);
  }
}

/// Packs int8-momentum spans into Q8ListArgs (chunks of kQChunk elements) and calls
/// launch(args, blocks) for each full batch. codes and scales are dropped without kMomentum.
template <class Limits, class Launch>
void plan_q8_list(const Q8Span* spans, int64_t n_spans, const StepScalars<float>& s,
                  uint32_t flags, const float* found_inf, const HyperPtrs& dev,
                  Launch&& launch) {
  using Args = Q8ListArgs<Limits::kTensors, Limits::kBlocks>;
  const bool mom = (flags & kMomentum) != 0;
  Args a{};
  a.s = s;
  a.flags = flags;
  a.found_inf = found_inf;
  a.dev = dev;
  plan_chunks<Limits, kQChunk>(
      a, n_spans, [&](int64_t k) { return spans[k].numel; },
      [&](Args& x, int slot, int64_t k) {
        x.param[slot] = spans[k].param;
        x.codes[slot] = mom ? spans[k].codes : nullptr;
        x.grad[slot] = spans[k].grad;
        x.scales[slot] = mom ? spans[k].scales : nullptr;
        x.numel[slot] = spans[k].numel;
      },
      launch);
}

}  // namespace cuda
}  // namespace momentum_cuda
