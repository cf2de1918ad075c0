// sgd_kernel.cuh — the CUDA kernels: a flat one and a multi-tensor one.
//
// Inputs    : plain structs of pointers and scalars (never ATen types). param and buf are updated
//             in place, grad is read (and written once unscaled and clipped, when GradScaler's
//             grad_scale or a clip coefficient is given); all three of a span have the same
//             dtype T and numel and do not overlap (csrc/momentum_ops.cpp checks before any
//             launch). GradScaler's found_inf and grad_scale, the clip coefficient and the
//             hyper-parameters given as tensors (HyperPtrs) are read from device memory by every
//             thread: no host sync.
// Invariant : every element goes through sgd_math() (sgd_math.h) exactly once, in opmath, with
//             scalars rounded once (on the host, or by device_step from device memory). On CUDA torch's add_ computes in opmath with an
//             opmath alpha (also for bf16/fp16), so there is no CPU-style "tail" arithmetic here.
// Speed     : one pass reading p, buf, g and writing p, buf, with 16-byte vector accesses (uint4)
//             where the three pointers share their alignment; a scalar head and tail otherwise.
//             int64 indexing throughout: spans of more than 2^31 elements work.
// Host      : this header is also compiled by g++ through tests/cuda/host_shim.h, which runs the
//             same kernels serially on the CPU (the GPU-less evidence of tests/test_cuda_host.py).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cpu/momentum_cpu.h"  // AmpPtrs (plain pointers)
#include "momentum_cuda/sgd_math.h"
#include "storage_types.h"

namespace momentum_cuda {
namespace cuda {

/// Storage type T <-> opmath (sgd_math.h's StorageSame for fp32/fp64; bf16/fp16 below).
template <class T>
struct Storage : StorageSame<T> {};
template <>
struct Storage<bf16_t> {
  using opmath = float;
  using Round = RoundBF16;
  static MC_HD float load(bf16_t x) { return mc_bf16_bits_to_float(x.x); }
  static MC_HD bf16_t store(float x) { return bf16_t{mc_float_to_bf16_bits(x)}; }
};
struct RoundHalf {
  MC_HD float operator()(float x) const { return __half2float(__float2half_rn(x)); }
};
template <>
struct Storage<fp16_t> {
  using opmath = float;
  using Round = RoundHalf;
  static MC_HD float load(fp16_t x) { return __half2float(__ushort_as_half(x.x)); }
  static MC_HD fp16_t store(float x) { return fp16_t{__half_as_ushort(__float2half_rn(x))}; }
};

template <class T>
using CudaScalars = StepScalars<typename Storage<T>::opmath>;

/// One contiguous span of a flat step.
template <class T>
struct FlatArgs {
  T* param;
  T* buf;  ///< null without kMomentum
  T* grad;
  int64_t numel;
  CudaScalars<T> s;
  uint32_t flags;
  AmpPtrs amp;
  HyperPtrs dev;
};

/// The scalars and flags of a step after the hyper-parameters held in device memory
/// (HyperPtrs) are read, each as torch's CUDA ops take a 0-dim CUDA tensor: the alphas (-lr,
/// weight_decay, nesterov's momentum, 1 - dampening) through .item(), a double rounded once to
/// opmath as make_scalars rounds the host's; 1 - dampening computed in the tensor's own dtype
/// first (torch's `1 - dampening` is a tensor op); the factor of buf.mul_(momentum) loaded as
/// the buffer's dtype T first (TensorIterator casts a 0-dim CUDA operand to the common dtype:
/// our reading of torch, to be confirmed on a GPU by tests/test_gpu.py).
/// A zero weight_decay or momentum clears its flags, as torch's `!= 0` tests skip those ops;
/// the host set them (and gave the buffers) for a tensor it does not read.
template <class T>
struct DeviceStep {
  CudaScalars<T> s;
  uint32_t flags;
};
MC_HD bool read_scalar(const ScalarPtr& p, double* v) {
  if (p.f32 != nullptr) *v = static_cast<double>(*p.f32);
  if (p.f64 != nullptr) *v = *p.f64;
  return p.f32 != nullptr || p.f64 != nullptr;
}
template <class T>
MC_HD DeviceStep<T> device_step(CudaScalars<T> s, uint32_t flags, const HyperPtrs& d) {
  using St = Storage<T>;
  using O = typename St::opmath;
  double v;
  if (read_scalar(d.lr, &v)) s.neg_lr = static_cast<O>(-v);
  if (read_scalar(d.weight_decay, &v)) {
    s.weight_decay = static_cast<O>(v);
    if (v == 0) flags &= ~kWeightDecay;
  }
  if (read_scalar(d.momentum, &v)) {
    s.momentum_add = static_cast<O>(v);
    s.momentum_mul = St::load(St::store(static_cast<O>(v)));
    if (v == 0) flags &= ~(kMomentum | kNesterov | kFirstStep);
  }
  if (d.dampening.f32 != nullptr) {
    s.one_minus_dampening = static_cast<O>(mc_add(1.0f, -*d.dampening.f32));
  } else if (d.dampening.f64 != nullptr) {
    s.one_minus_dampening = static_cast<O>(mc_add(1.0, -*d.dampening.f64));
  }
  return {s, flags};
}

/// The flags after the device's first-step decision (AmpPtrs::first_step): kFirstStep, which
/// the host set, cleared when the buffers were stepped before.
MC_HD uint32_t device_flags(uint32_t flags, const AmpPtrs& a) {
  return a.first_step != nullptr && !*a.first_step ? flags & ~kFirstStep : flags;
}

/// What a thread reads of AmpPtrs before its first element: skip the update (found_inf != 0),
/// unscale the gradients by inv (1: not at all), multiply them by a clip coefficient.
template <class O>
struct AmpStep {
  bool skip;
  float inv;
  bool clip;
  O coef;
  /// The gradient changes, so it is written back.
  MC_HD bool writes_grad() const { return inv != 1.f || clip; }
};
template <class T>
MC_HD AmpStep<typename Storage<T>::opmath> amp_step(const AmpPtrs& a) {
  using St = Storage<T>;
  const T* coef = static_cast<const T*>(a.clip_coef);
  return {a.found_inf != nullptr && *a.found_inf != 0.f,
          a.grad_scale != nullptr ? amp_inv_scale(*a.grad_scale) : 1.f, coef != nullptr,
          coef != nullptr ? St::load(*coef) : typename St::opmath(1)};
}

/// The gradient as the update sees it: GradScaler's unscale, then the clip (torch's order:
/// scaler.unscale_(opt), clip_grad_norm_, scaler.step(opt)).
template <class T>
MC_HD typename Storage<T>::opmath amp_grad(typename Storage<T>::opmath g,
                                           const AmpStep<typename Storage<T>::opmath>& amp) {
  using St = Storage<T>;
  if (amp.inv != 1.f) g = amp_unscale(g, amp.inv, typename St::Round{});
  if (amp.clip) g = clip_scale(g, amp.coef, typename St::Round{});
  return g;
}

/// Updates element i of a span: the scalar path (head, tail, unaligned spans).
template <class T>
MC_HD void update_one(T* p, T* b, T* g, int64_t i, const CudaScalars<T>& s, uint32_t flags,
                      const AmpStep<typename Storage<T>::opmath>& amp) {
  using St = Storage<T>;
  using O = typename St::opmath;
  O gi = St::load(g[i]);
  if (amp.writes_grad()) {
    gi = amp_grad<T>(gi, amp);
    g[i] = St::store(gi);
  }
  if (amp.skip) return;
  O pi = St::load(p[i]);
  O bi = ((flags & kMomentum) && !(flags & kFirstStep)) ? St::load(b[i]) : O(0);
  sgd_math(pi, bi, gi, s, flags, typename St::Round{});
  p[i] = St::store(pi);
  if (flags & kMomentum) b[i] = St::store(bi);
}

/// 16 bytes of T: what one uint4 load brings.
template <class T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

/// Updates the kN elements at i (16-byte aligned in p, b and g) with 128-bit loads and stores.
template <class T>
MC_HD void update_pack(T* p, T* b, T* g, int64_t i, const CudaScalars<T>& s, uint32_t flags,
                       const AmpStep<typename Storage<T>::opmath>& amp) {
  using St = Storage<T>;
  using O = typename St::opmath;
  constexpr int kN = Pack<T>::kN;
  Pack<T> gg = *reinterpret_cast<const Pack<T>*>(g + i);
  if (amp.writes_grad()) {
#pragma unroll
    for (int j = 0; j < kN; ++j) gg.v[j] = St::store(amp_grad<T>(St::load(gg.v[j]), amp));
    *reinterpret_cast<Pack<T>*>(g + i) = gg;
  }
  if (amp.skip) return;
  Pack<T> pp = *reinterpret_cast<const Pack<T>*>(p + i);
  Pack<T> bb;
  const bool read_buf = (flags & kMomentum) && !(flags & kFirstStep);
  if (read_buf) bb = *reinterpret_cast<const Pack<T>*>(b + i);
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    O pj = St::load(pp.v[j]);
    O bj = read_buf ? St::load(bb.v[j]) : O(0);
    sgd_math(pj, bj, St::load(gg.v[j]), s, flags, typename St::Round{});
    pp.v[j] = St::store(pj);
    bb.v[j] = St::store(bj);
  }
  *reinterpret_cast<Pack<T>*>(p + i) = pp;
  if (flags & kMomentum) *reinterpret_cast<Pack<T>*>(b + i) = bb;
}

/// 8 elements of a group of the element-wise mode kernels (elementwise_kernel.cuh) and the int8
/// kernel (qmom_kernel.cuh), as 16-byte accesses bring them (one for 16-bit T, two for fp32).
template <class T>
struct alignas(16) Group8 {
  T v[8];
};
using Bf16x8 = Group8<uint16_t>;
using F32x8 = Group8<float>;

MC_HD bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

/// Elements before the first 16-byte boundary, or -1 if p, b and g are misaligned differently
/// (then the whole span takes the scalar path).
template <class T>
MC_HD int64_t aligned_head(const T* p, const T* b, const T* g, uint32_t flags, int64_t n) {
  const uintptr_t mis = reinterpret_cast<uintptr_t>(p) % 16;
  if (reinterpret_cast<uintptr_t>(g) % 16 != mis) return -1;
  if ((flags & kMomentum) && reinterpret_cast<uintptr_t>(b) % 16 != mis) return -1;
  if (mis % sizeof(T) != 0) return -1;
  const int64_t head = static_cast<int64_t>((16 - mis) % 16 / sizeof(T));
  return head < n ? head : n;
}

/// The grid-stride walk over elements [0, n) of one span, by `nthreads` workers of which this
/// is `tid`: scalar head, 16-byte packs, scalar tail. Shared by both kernels.
template <class T>
MC_HD void update_span(T* p, T* b, T* g, int64_t n, const CudaScalars<T>& s, uint32_t flags,
                       const AmpStep<typename Storage<T>::opmath>& amp, int64_t tid,
                       int64_t nthreads) {
  constexpr int kN = Pack<T>::kN;
  if (amp.skip && !amp.writes_grad()) return;  // nothing to write
  const int64_t head = aligned_head(p, b, g, flags, n);
  if (head < 0) {
    for (int64_t i = tid; i < n; i += nthreads) update_one(p, b, g, i, s, flags, amp);
    return;
  }
  for (int64_t i = tid; i < head; i += nthreads) update_one(p, b, g, i, s, flags, amp);
  const int64_t packs = (n - head) / kN;
  for (int64_t k = tid; k < packs; k += nthreads) {
    update_pack(p, b, g, head + k * kN, s, flags, amp);
  }
  for (int64_t i = head + packs * kN + tid; i < n; i += nthreads) {
    update_one(p, b, g, i, s, flags, amp);
  }
}

/// Threads a block of either kernel.
constexpr int kThreads = 256;

/// Blocks of a flat launch over `numel` elements: one 16-byte pack per thread until the GPU is
/// full, never more than `blocks_per_sm * sms` (what can be resident at once: one wave, the
/// grid-stride loop does the rest, so no tail wave runs on part of the machine) nor more than the
/// work needs. 0 for an empty span. `blocks_per_sm` comes from the occupancy API and `sms` from
/// the device (sgd_cuda.cu); both are at least 1. int64 throughout: spans of 2^31+ elements.
template <class T>
inline int64_t flat_grid(int64_t numel, int blocks_per_sm, int sms) {
  constexpr int64_t per_block = int64_t{kThreads} * Pack<T>::kN;
  const int64_t want = numel / per_block + (numel % per_block != 0);  // no overflow near 2^63
  const int64_t resident = int64_t{blocks_per_sm} * sms;
  return want < resident ? want : resident;
}

/// Flat kernel: one span, any grid.
template <class T>
__global__ void sgd_flat_kernel(FlatArgs<T> a) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const DeviceStep<T> d = device_step<T>(a.s, device_flags(a.flags, a.amp), a.dev);
  update_span(a.param, a.buf, a.grad, a.numel, d.s, d.flags, amp_step<T>(a.amp), tid, nthreads);
}

/// Multi-tensor metadata passed by value as the kernel's argument: up to kTensors spans, and for
/// each block the span and the chunk it works on. Hopper-era toolkits (CUDA >= 12.1, sm_70+)
/// accept 32 KB of kernel arguments; older ones 4 KB (ListLimits4K).
template <class T, int kTensors, int kBlocks>
struct ListArgs {
  T* param[kTensors];
  T* buf[kTensors];
  T* grad[kTensors];
  int64_t numel[kTensors];
  uint16_t block_tensor[kBlocks];
  int32_t block_chunk[kBlocks];
  CudaScalars<T> s;
  uint32_t flags;
  AmpPtrs amp;
  HyperPtrs dev;
};

constexpr int64_t kChunk = 65536;  ///< elements per block and launch, as torch's multi_tensor_apply
struct ListLimits4K {
  static constexpr int kTensors = 36, kBlocks = 320;
  static constexpr size_t kArgBytes = 4096;  ///< the kernel-argument space these limits fill
};
struct ListLimits32K {
  static constexpr int kTensors = 320, kBlocks = 2048;
  static constexpr size_t kArgBytes = 32764;
};

/// A mode's argument struct Args<kTensors, kBlocks> fits the argument space of both limits.
template <template <int, int> class Args>
constexpr bool args_fit() {
  return sizeof(Args<ListLimits4K::kTensors, ListLimits4K::kBlocks>) <= ListLimits4K::kArgBytes &&
         sizeof(Args<ListLimits32K::kTensors, ListLimits32K::kBlocks>) <= ListLimits32K::kArgBytes;
}

/// Multi-tensor kernel: block k updates chunk block_chunk[k] of span block_tensor[k].
template <class T, int kTensors, int kBlocks>
__global__ void sgd_list_kernel(ListArgs<T, kTensors, kBlocks> a) {
  const int t = a.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(a.block_chunk[blockIdx.x]) * kChunk;
  const int64_t left = a.numel[t] - start;
  const int64_t n = left < kChunk ? left : kChunk;
  T* b = a.buf[t] == nullptr ? nullptr : a.buf[t] + start;
  const DeviceStep<T> d = device_step<T>(a.s, device_flags(a.flags, a.amp), a.dev);
  update_span(a.param[t] + start, b, a.grad[t] + start, n, d.s, d.flags, amp_step<T>(a.amp), static_cast<int64_t>(threadIdx.x),
              static_cast<int64_t>(blockDim.x));
}

/// The batching of a multi-tensor step, for any argument struct Args with block_tensor and
/// block_chunk tables (ListArgs, MasterListArgs): numel(k) is span k's length, fill(a, slot, k)
/// writes span k's pointers and numel into table entry `slot`; launch(a, blocks) runs each full
/// batch. Chunk c of a span is its elements [c * kSize, (c + 1) * kSize). Empty spans are
/// skipped; a span longer than one batch goes on in the next, as its entry 0. Shared by the CUDA
/// launchers and the host emulation.
template <class Limits, int64_t kSize = kChunk, class Args, class Numel, class Fill, class Launch>
void plan_chunks(Args& a, int64_t n_spans, Numel&& numel, Fill&& fill, Launch&& launch) {
  int tensors = 0, blocks = 0;
  for (int64_t k = 0; k < n_spans; ++k) {
    if (numel(k) == 0) continue;
    fill(a, tensors, k);
    const int64_t chunks = (numel(k) + kSize - 1) / kSize;
    for (int64_t c = 0; c < chunks; ++c) {
      a.block_tensor[blocks] = static_cast<uint16_t>(tensors);
      a.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool blocks_full = blocks == Limits::kBlocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks_full || (last_chunk && tensors + 1 == Limits::kTensors)) {
        launch(a, blocks);
        blocks = 0;
        if (last_chunk) {
          tensors = -1;  // this span is done; start the next batch empty
        } else {
          fill(a, 0, k);
          tensors = 0;
        }
      }
    }
    ++tensors;
  }
  if (blocks > 0) launch(a, blocks);
}

/// Packs spans into ListArgs and calls launch(args, blocks) for each full batch (plan_chunks).
template <class T, class Limits, class Launch>
void plan_list(T* const* params, T* const* bufs, T* const* grads, const int64_t* numels,
               int64_t n_spans, const CudaScalars<T>& s, uint32_t flags, const AmpPtrs& amp,
               const HyperPtrs& dev, Launch&& launch) {
  using Args = ListArgs<T, Limits::kTensors, Limits::kBlocks>;
  Args a{};
  a.s = s;
  a.flags = flags;
  a.amp = amp;
  a.dev = dev;
  plan_chunks<Limits>(
      a, n_spans, [&](int64_t k) { return numels[k]; },
      [&](Args& x, int slot, int64_t k) {
        x.param[slot] = params[k];
        x.buf[slot] = bufs == nullptr ? nullptr : bufs[k];
        x.grad[slot] = grads[k];
        x.numel[slot] = numels[k];
      },
      launch);
}

}  // namespace cuda
}  // namespace momentum_cuda
