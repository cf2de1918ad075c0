// elementwise_kernel.cuh — the one multi-tensor kernel of the element-wise modes (master weights,
// stochastic rounding, bf16 momentum, fp16 master weights), parameterized by a mode policy.
//
// Inputs    : a mode's argument struct (ElementwiseArgs: plain pointers and scalars, param, buf,
//             grad, numel per span, block_tensor / block_chunk, s, flags, found_inf, dev; plus the
//             mode's own per-span arrays and scalars), filled by
//             plan_elementwise from the mode's spans (cpu/momentum_cpu.h) checked by
//             csrc/momentum_ops.cpp.
// Mode      : a policy struct, the only code a mode has of its own:
//               Span, Args<kTensors, kBlocks>  its spans and argument struct;
//               chunk(a, t, start)             the policy of one chunk: its arrays (Array<Use, T>,
//                                              at the chunk's first element) and scalars;
//               arrays(f)                      f(array, ...): the arrays a group of 8 moves;
//               step(k, n, s, flags, x...)     the header function (csrc/include/momentum_cuda)
//                                              on elements [0, n) of group k, x... pointing at
//                                              them, in the order of arrays();
//               fill(args, slot, spans, k)     the table entries of span k beyond param, buf
//                                              (dropped without kMomentum), grad and numel.
// Invariant : every element goes through the mode's step exactly once, in a group of 8 or in
//             the span's last partial group; what an array reads and writes follows its Use.
//             found_inf (GradScaler's, device memory; null: none) != 0, NaN included, skips the
//             step: no array is read or written (the gradients were unscaled before the call).
//             The hyper-parameters held in device memory (dev) are read by device_step, as the
//             plain kernels read them (the modes' math is fp32: T = float there); a zero
//             momentum read there clears kMomentum, so the buffers are neither read nor written.
// Work      : a thread takes groups of 8 elements: one 16-byte access per 16 bytes of each array
//             where all of the chunk's arrays are 16-byte aligned (the group in registers),
//             element by element in memory otherwise and for a span's last partial group.
// Launch    : sgd_kernel.cuh's multi-tensor batching (plan_chunks), one block of kThreads per
//             chunk of kChunk elements (a multiple of 8: a chunk starts at a group).
// Host      : compiled by g++ through tests/cuda/host_shim.h as well (tests/test_cuda_host.py).
#pragma once

#include <cstdint>
#include <type_traits>

#include "sgd_kernel.cuh"

namespace momentum_cuda {
namespace cuda {

static_assert(kChunk % 8 == 0, "a chunk must start at a group of 8");

/// What the argument struct of every element-wise mode holds, passed by value (ListArgs'
/// layout); a mode's own per-span arrays and scalars extend it (SrListArgs, MasterListArgs, ...).
template <class P, class B, class G, int kTensors, int kBlocks>
struct ElementwiseArgs {
  P* param[kTensors];
  B* buf[kTensors];  ///< null without kMomentum
  const G* grad[kTensors];
  int64_t numel[kTensors];
  uint16_t block_tensor[kBlocks];
  int32_t block_chunk[kBlocks];
  StepScalars<float> s;
  uint32_t flags;
  const float* found_inf;  ///< GradScaler's; != 0 skips the step (null: never)
  HyperPtrs dev;           ///< hyper-parameters in device memory (null members: s holds them)
};

/// Whether GradScaler's found_inf (null: not given) skips the step: != 0, NaN included.
MC_HD bool amp_skips(const float* found_inf) {
  return found_inf != nullptr && *found_inf != 0.f;
}

/// How a step uses one of a mode's arrays, and so which accesses a group of 8 takes.
enum class Use {
  kRead,       ///< read, never written (the gradient)
  kWrite,      ///< written whole, never read (an fp16 parameter rounded from its master)
  kReadWrite,  ///< read and written back
  kBuffer,     ///< the momentum buffer: null without kMomentum, read unless kFirstStep
};

/// p + i, or null for a null p (a buffer without kMomentum).
template <class T>
MC_HD T* advance(T* p, int64_t i) {
  return p == nullptr ? nullptr : p + i;
}

/// One array of a chunk (T: uint16_t or float, const for kRead), used as U says.
template <Use U, class T>
struct Array {
  using Group = Group8<std::remove_const_t<T>>;
  T* ptr;  ///< the chunk's first element; only a kBuffer may be null

  MC_HD bool aligned() const { return (U == Use::kBuffer && ptr == nullptr) || aligned16(ptr); }
  MC_HD T* at(int64_t i) const { return advance(ptr, i); }
  /// Group i / 8 with 16-byte accesses, zeros where the step does not read it.
  MC_HD Group load(int64_t i, uint32_t flags) const {
    Group v{};
    const bool read = U == Use::kRead || U == Use::kReadWrite ||
                      (U == Use::kBuffer && (flags & kMomentum) && !(flags & kFirstStep));
    if (read) v = *reinterpret_cast<const Group*>(ptr + i);
    return v;
  }
  MC_HD void store(int64_t i, const Group& v, uint32_t flags) const {
    if constexpr (U != Use::kRead) {
      if (U != Use::kBuffer || (flags & kMomentum)) *reinterpret_cast<Group*>(ptr + i) = v;
    }
  }
};

/// Loads group i / 8 of every array x into registers, calls f with the registers' element
/// pointers (in the order of x), then stores what the arrays write.
template <class F, class A, class... R>
MC_HD void in_registers(int64_t i, uint32_t flags, F&& f, const A& x, const R&... rest) {
  auto v = x.load(i, flags);
  if constexpr (sizeof...(R) == 0) {
    f(v.v);
  } else {
    in_registers(i, flags, [&](auto*... w) { f(v.v, w...); }, rest...);
  }
  x.store(i, v, flags);
}

/// Elements [0, n) of one chunk, by `nthreads` workers of which this is `tid`.
template <class Mode>
MC_HD void elementwise_span(const Mode& mode, int64_t n, const StepScalars<float>& s,
                            uint32_t flags, int64_t tid, int64_t nthreads) {
  mode.arrays([&](const auto&... x) {
    const bool vec = (x.aligned() && ...);
    const int64_t full = n / 8, groups = full + (n % 8 != 0);
    for (int64_t k = tid; k < groups; k += nthreads) {
      const int64_t i = 8 * k;
      if (vec && k < full) {
        in_registers(i, flags, [&](auto*... v) { mode.step(k, 8, s, flags, v...); }, x...);
      } else {
        mode.step(k, static_cast<int>(n - i < 8 ? n - i : 8), s, flags, x.at(i)...);
      }
    }
  });
}

/// The kernel of an element-wise mode: block k updates chunk block_chunk[k] of span
/// block_tensor[k].
template <class Mode, int kTensors, int kBlocks>
__global__ void sgd_elementwise_kernel(typename Mode::template Args<kTensors, kBlocks> a) {
  if (amp_skips(a.found_inf)) return;
  const int t = a.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(a.block_chunk[blockIdx.x]) * kChunk;
  const int64_t left = a.numel[t] - start;
  const int64_t n = left < kChunk ? left : kChunk;
  const DeviceStep<float> d = device_step<float>(a.s, a.flags, a.dev);
  elementwise_span(Mode::chunk(a, t, start), n, d.s, d.flags, static_cast<int64_t>(threadIdx.x),
                   static_cast<int64_t>(blockDim.x));
}

/// Packs a mode's spans into its argument struct and calls launch(args, blocks) for each full
/// batch (plan_chunks). bufs are dropped without kMomentum (the host's flags: with a momentum in
/// device memory they are kept, and the kernel's flags decide).
template <class Mode, class Limits, class Launch>
void plan_elementwise(const typename Mode::Span* spans, int64_t n_spans,
                      const StepScalars<float>& s, uint32_t flags, const float* found_inf,
                      const HyperPtrs& dev, Launch&& launch) {
  using Args = typename Mode::template Args<Limits::kTensors, Limits::kBlocks>;
  Args a{};
  a.s = s;
  a.flags = flags;
  a.found_inf = found_inf;
  a.dev = dev;
  plan_chunks<Limits>(
      a, n_spans, [&](int64_t k) { return spans[k].numel; },
      [&](Args& x, int slot, int64_t k) {
        x.param[slot] = spans[k].param;
        x.buf[slot] = (flags & kMomentum) ? spans[k].buf : nullptr;
        x.grad[slot] = spans[k].grad;
        x.numel[slot] = spans[k].numel;
        Mode::fill(x, slot, spans, k);
      },
      launch);
}

}  // namespace cuda
}  // namespace momentum_cuda
